//! seccomp filters per thread class, built with `seccompiler` as Firecracker does (docs/limits.md,
//! "System calls").
//!
//! Each class of thread installs its own filter on itself (a filter binds the installing thread and
//! the threads it spawns afterwards):
//! - **vCPU threads**, at the end of their set-up (after their `/proc` files are opened);
//! - the **VMM thread** (the main thread: event loop, API, metrics, the end of the run), once every
//!   vCPU thread has been spawned;
//! - the **console** writer thread, when it starts.
//!
//! A system call outside a thread's list is trapped (`SECCOMP_RET_TRAP`): the SIGSYS handler writes
//! one line naming the thread class and the call's number and ends the process with exit code 101.
//! The lists are what the static build was seen to call (`strace -f` on every workload and command
//! path); a call that is missing from them is a quietvm bug, found at once and loudly.
//!
//! On by default; `--no-seccomp` (or `seccomp = false` in the config) turns the filters off for
//! debugging. `QUIETVM_SECCOMP_AUDIT=1` installs the filters but allows (and audit-logs) every call (for tracing new
//! code paths with strace), and `QUIETVM_DEBUG_FORBIDDEN_SYSCALL=vcpu` makes each vCPU thread make
//! one forbidden call right after its filter is installed (the test of the trap).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Which filter a thread gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadClass {
    Vcpu = 1,
    Vmm = 2,
    Console = 3,
}

impl ThreadClass {
    fn name(code: u8) -> &'static [u8] {
        match code {
            1 => b"a vCPU thread",
            2 => b"the VMM thread",
            3 => b"the console thread",
            _ => b"a thread",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread's class, for the SIGSYS handler's line (0: no filter).
    static CLASS: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// Turns the filters on or off for the threads that install theirs from now on.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Release);
}

/// Whether filters are installed.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// System calls every class makes: memory (the allocator, a thread's exit), futexes, clocks and
/// sleeps, signal returns and masks, writes to stderr (logs) and their `poll`, kicks (`tgkill`),
/// exit. Traced with `strace -f` on every workload, kvm-lapic, the API session, SIGTERM, SIGHUP,
/// the console flood and the timeout (docs/limits.md); `getrandom` is the first `HashMap` of a
/// thread.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_write,
    libc::SYS_poll,
    libc::SYS_close,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// vCPU threads: `KVM_RUN` and the vCPU ioctls (and KVM's binary statistics, when a thread ends), the
/// halt path's deadline timer and its sleep (`rt_sigtimedwait`), their `/proc` files (opened before
/// the filter, read with `pread`).
const VCPU: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_timer_create,
    libc::SYS_timer_settime,
    libc::SYS_timer_delete,
];

/// The VMM thread: the event loop (epoll, eventfds, timerfds), the API socket (accept, peer
/// credentials, non-blocking mode, reads and writes), `/proc` reads for the live statistics, the
/// metrics and statistics files, the socket file's removal, process CPU time.
const VMM: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_accept4,
    libc::SYS_getsockopt,
    libc::SYS_ioctl,
    libc::SYS_timerfd_settime,
    libc::SYS_openat,
    libc::SYS_statx,
    libc::SYS_unlink,
    libc::SYS_getuid,
    libc::SYS_getrusage,
];

/// The console thread: waits on its eventfd and writes standard output.
const CONSOLE: &[i64] = &[libc::SYS_read];

fn program(class: ThreadClass, audit: bool) -> Result<BpfProgram, String> {
    let own = match class {
        ThreadClass::Vcpu => VCPU,
        ThreadClass::Vmm => VMM,
        ThreadClass::Console => CONSOLE,
    };
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = COMMON
        .iter()
        .chain(own)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let mismatch = if audit {
        SeccompAction::Log
    } else {
        SeccompAction::Trap
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| format!("seccomp filter: {e}"))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| format!("seccomp filter: {e}"))
}

/// Installs `class`'s filter on the calling thread, if filters are on.
pub fn install(class: ThreadClass) -> Result<(), String> {
    if !enabled() {
        return Ok(());
    }
    install_sigsys_handler()?;
    let audit = std::env::var_os("QUIETVM_SECCOMP_AUDIT").is_some_and(|v| v == "1");
    let prog = program(class, audit)?;
    CLASS.with(|c| c.set(class as u8));
    seccompiler::apply_filter(&prog).map_err(|e| format!("cannot install the seccomp filter: {e}"))
}

/// The test of the trap: a vCPU thread makes a call its filter forbids, when asked to by
/// `QUIETVM_DEBUG_FORBIDDEN_SYSCALL=vcpu` (read once, before any thread starts: [`read_debug_env`]).
pub fn debug_forbidden_call(class: ThreadClass) {
    if class == ThreadClass::Vcpu && DEBUG_VCPU_CALL.load(Ordering::Acquire) {
        let mut info = std::mem::MaybeUninit::<libc::sysinfo>::uninit();
        // SAFETY: sysinfo writes one struct sysinfo to a valid, writable buffer of that size.
        unsafe { libc::sysinfo(info.as_mut_ptr()) };
    }
}

static DEBUG_VCPU_CALL: AtomicBool = AtomicBool::new(false);

/// Reads `QUIETVM_DEBUG_FORBIDDEN_SYSCALL` (on the main thread, before the filters).
pub fn read_debug_env() {
    let on = std::env::var_os("QUIETVM_DEBUG_FORBIDDEN_SYSCALL").is_some_and(|v| v == "vcpu");
    DEBUG_VCPU_CALL.store(on, Ordering::Release);
}

fn install_sigsys_handler() -> Result<(), String> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
            .map_err(|e| format!("cannot install the SIGSYS handler: {e}"));
    });
    result
}

/// Appends the decimal digits of `n` to `buf` at `*at`.
fn push_decimal(buf: &mut [u8], at: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in digits[..len].iter().rev() {
        if *at < buf.len() {
            buf[*at] = d;
            *at += 1;
        }
    }
}

fn push(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    for &b in s {
        if *at < buf.len() {
            buf[*at] = b;
            *at += 1;
        }
    }
}

/// SIGSYS from a seccomp trap: one line, then the process ends with 101. Async-signal-safe: no
/// allocation, no lock; only `write` and `_exit`.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t; for SIGSYS its union holds `_call_addr` (a
    // pointer) then `_syscall` (an int), at offset 16 + 8 from the start (linux siginfo layout on
    // x86-64).
    let nr = unsafe { *((info as *const u8).add(24) as *const libc::c_int) };
    let class = CLASS.try_with(|c| c.get()).unwrap_or(0);
    let mut buf = [0u8; 256];
    let mut at = 0;
    push(&mut buf, &mut at, b"quietvm: seccomp: ");
    push(&mut buf, &mut at, ThreadClass::name(class));
    push(&mut buf, &mut at, b" made system call ");
    push_decimal(&mut buf, &mut at, nr as u64);
    push(
        &mut buf,
        &mut at,
        b", which its filter forbids; ending the VM (--no-seccomp turns the filters off)\n",
    );
    // SAFETY: write and _exit are async-signal-safe; `buf[..at]` is valid for reads.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr() as *const libc::c_void, at);
        libc::_exit(crate::exit_code::VMM_ERROR);
    }
}

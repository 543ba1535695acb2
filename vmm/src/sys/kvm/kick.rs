//! Kicking vCPU threads: one real-time signal, per-thread POSIX timers, and the halt sleep.
//!
//! # Design
//! Every vCPU thread keeps [`kick_signal`] blocked at all times, except inside `KVM_RUN` (through
//! `KVM_SET_SIGNAL_MASK`, see [`super::vcpu::Vcpu::unblock_kick_in_guest`]). So:
//! - a kick sent while the thread runs guest code makes `KVM_RUN` return `EINTR`;
//! - a kick sent while the thread is in quietvm stays pending, and the next `KVM_RUN` returns at once,
//!   so a kick is never lost between "check for work" and "enter the guest" (no `immediate_exit` race);
//! - a halted vCPU sleeps in `sigtimedwait` on the same signal, so the same kick wakes it.
//!
//! Deadlines use one POSIX timer per vCPU thread (`SIGEV_THREAD_ID`, absolute `CLOCK_MONOTONIC`) that
//! delivers the same signal: it kicks a running vCPU out of the guest, or wakes a halted one, at the
//! deadline. Nothing else ever blocks the thread, so each blocking `sigtimedwait` is exactly one
//! voluntary context switch in the kernel's own count.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::{os_err, KvmError};
use crate::sys::os::gettid;

/// The signal that kicks vCPU threads (the first real-time signal above glibc's reserved ones).
pub fn kick_signal() -> c_int {
    static SIG: OnceLock<c_int> = OnceLock::new();
    *SIG.get_or_init(|| SIGRTMIN() + 1)
}

extern "C" fn on_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // Nothing to do: the signal's only job is to interrupt KVM_RUN or sigtimedwait.
}

/// Installs the (empty) kick handler for the process. A real-time signal's default action is to
/// terminate, so this must run before any kick is sent.
pub fn install_kick_handler() -> Result<(), KvmError> {
    register_signal_handler(kick_signal(), on_kick).map_err(|e| KvmError::Os {
        what: "install the vCPU kick signal handler",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })
}

fn kick_sigset() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given; sigaddset then adds a valid signal.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), kick_signal());
        set.assume_init()
    }
}

/// Blocks the kick signal in the calling thread (every vCPU thread does this first), and SIGTERM and
/// SIGINT too: those belong to the VMM thread's event loop, and a vCPU thread must not be interrupted
/// in its halt sleep by them (it would sleep twice for one counted wakeup).
pub fn block_kick_in_this_thread() -> Result<(), KvmError> {
    let mut set = kick_sigset();
    // SAFETY: `set` is an initialised signal set and both signals are valid.
    unsafe {
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: `set` is a valid, initialised signal set; the old mask is not requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(KvmError::Os {
            what: "block the kick signal",
            source: std::io::Error::from_raw_os_error(rc),
        });
    }
    Ok(())
}

/// The calling thread's signal mask as the 64-bit kernel sigset, without the kick signal: the mask
/// `KVM_RUN` runs the guest with.
pub(crate) fn guest_sigmask_without_kick() -> u64 {
    let mut cur = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: a null new set only reads the current mask into `cur`, which it initialises.
    let cur = unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), cur.as_mut_ptr());
        cur.assume_init()
    };
    let mut mask = 0u64;
    for sig in 1..=64 {
        // SAFETY: `cur` is initialised and `sig` is in the valid range for sigismember.
        if sig != kick_signal() && unsafe { libc::sigismember(&cur, sig) } == 1 {
            mask |= 1 << (sig - 1);
        }
    }
    mask
}

/// Sleeps until a kick arrives (from another thread or this thread's deadline timer) and consumes it.
/// Returns `true` if the thread really slept (a kick was not already pending), which is what the
/// kernel counts as one voluntary context switch.
pub fn sleep_until_kicked() -> bool {
    if take_pending_kick() {
        return false;
    }
    let set = kick_sigset();
    loop {
        // SAFETY: `set` is valid; a null siginfo pointer is allowed.
        let rc = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if rc >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return true;
        }
    }
}

/// Consumes one pending kick without sleeping; `true` if there was one.
pub fn take_pending_kick() -> bool {
    let set = kick_sigset();
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `set` and `zero` are valid for the call; a null siginfo pointer is allowed.
    unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) >= 0 }
}

/// Consumes every pending kick (real-time signals queue) without sleeping.
pub fn drain_kicks() {
    while take_pending_kick() {}
}

/// A handle to kick one thread from any other thread.
///
/// It sends with `tgkill` rather than `pthread_kill`: glibc's `pthread_kill` takes a per-target lock
/// that puts a second concurrent kicker of the same thread to sleep, and every sleep of a vCPU thread
/// must be a halt (quietvm's wakeup counts are checked against the kernel's).
#[derive(Clone, Copy, Debug)]
pub struct ThreadKicker {
    pid: libc::pid_t,
    tid: libc::pid_t,
}

impl ThreadKicker {
    /// The kicker of the calling thread.
    pub fn current() -> Self {
        ThreadKicker {
            pid: std::process::id() as libc::pid_t,
            tid: gettid() as libc::pid_t,
        }
    }

    /// Sends the kick signal. The caller guarantees the thread has not exited (quietvm unregisters a
    /// vCPU thread's kicker, under the lock its kickers hold, before the thread ends), so the id
    /// cannot have been reused.
    pub fn kick(&self) {
        // SAFETY: tgkill takes three integers and has no memory arguments.
        unsafe { libc::syscall(libc::SYS_tgkill, self.pid, self.tid, kick_signal()) };
    }
}

/// A POSIX timer that sends the kick signal to the thread that created it at an absolute
/// `CLOCK_MONOTONIC` time.
pub struct DeadlineTimer {
    id: libc::timer_t,
    armed_at: u64,
}

// SAFETY: a timer_t is a process-wide kernel timer id; using it from another thread is allowed.
unsafe impl Send for DeadlineTimer {}

impl DeadlineTimer {
    /// Creates the timer for the calling thread (disarmed).
    pub fn for_this_thread() -> Result<Self, KvmError> {
        // SAFETY: an all-zero sigevent is a valid starting value; the fields are set below.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = kick_signal();
        sev.sigev_notify_thread_id = gettid() as i32;
        let mut id = MaybeUninit::<libc::timer_t>::uninit();
        // SAFETY: `sev` is initialised and `id` is a valid place for the new timer id.
        let rc = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, id.as_mut_ptr()) };
        if rc != 0 {
            return Err(os_err("create the vCPU deadline timer"));
        }
        Ok(DeadlineTimer {
            // SAFETY: timer_create succeeded, so it wrote the id.
            id: unsafe { id.assume_init() },
            armed_at: 0,
        })
    }

    /// Arms the timer for `monotonic_ns` (0 disarms): one `timer_settime`. The vCPU thread skips
    /// calls that would change nothing (it knows the guest time a deadline stands for).
    pub fn arm_at(&mut self, monotonic_ns: u64) {
        self.armed_at = monotonic_ns;
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (monotonic_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (monotonic_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: `self.id` is a live timer and `spec` is valid; the old value is not requested.
        unsafe { libc::timer_settime(self.id, libc::TIMER_ABSTIME, &spec, std::ptr::null_mut()) };
    }

    /// The time the timer is armed for (0 if disarmed).
    pub fn armed_at(&self) -> u64 {
        self.armed_at
    }
}

impl Drop for DeadlineTimer {
    fn drop(&mut self) {
        // SAFETY: `self.id` is a live timer owned by this value and deleted exactly once.
        unsafe { libc::timer_delete(self.id) };
    }
}

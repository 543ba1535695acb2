//! Small OS helpers that need `libc`: thread ids, the monotonic clock, timer slack, process CPU time.

/// A memory file of `size` bytes (a `memfd`, close-on-exec), holding no pages until they are
/// touched. Its mappings show in `/proc/PID/maps` as `/memfd:NAME (deleted)`, so tools can find them
/// from outside; an anonymous mapping has no name and the kernel merges it with its neighbours.
pub fn memory_file(name: &std::ffi::CStr, size: u64) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create only reads it.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created, is valid and owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// The calling thread's kernel thread id.
pub fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// `CLOCK_MONOTONIC` in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The host kernel's current clocksource (`tsc`, `kvm-clock`, `hpet`, ...), if it can be read.
pub fn host_clocksource() -> Option<String> {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The host's time-stamp counter (`RDTSC`): with the vCPUs' TSC offset, the guest's TSC, which is
/// the device clock (docs/timer-abi.md, "The clock").
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter; quietvm is x86-64 only.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Sets the calling thread's timer slack to 1 ns, so its sleeps end at their deadline.
pub fn set_minimal_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument; the others are ignored.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// User and system CPU time of the whole process so far, in nanoseconds, from `getrusage`.
pub fn process_cpu_ns() -> (u64, u64) {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage to write to; RUSAGE_SELF always exists.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000;
    (ns(ru.ru_utime), ns(ru.ru_stime))
}

/// The real user id of this process.
pub fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// The user id of the process on the other end of Unix socket `fd` (`SO_PEERCRED`).
pub fn peer_uid(fd: std::os::unix::io::RawFd) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for the kernel to write a ucred of the given length.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// The eventfd SIGTERM, SIGINT and SIGHUP write to (-1: none yet).
static TERMINATION_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);
/// The last termination signal received (0: none).
static TERMINATION_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn on_termination(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    use std::sync::atomic::Ordering;
    TERMINATION_SIGNAL.store(sig, Ordering::Relaxed);
    let fd = TERMINATION_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer for the eventfd.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// Makes SIGTERM, SIGINT and SIGHUP (the terminal went away: treated like SIGTERM) write to eventfd `fd` (which must stay open for the process's life), so
/// the event loop can shut the VM down in order. Returns the signal later with [`termination_signal`].
pub fn route_termination_signals(fd: std::os::unix::io::RawFd) -> Result<(), std::io::Error> {
    TERMINATION_FD.store(fd, std::sync::atomic::Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(sig, on_termination)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

/// The termination signal received, if any.
pub fn termination_signal() -> Option<i32> {
    match TERMINATION_SIGNAL.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        s => Some(s),
    }
}

/// How a child process ended and what it used, from `wait4`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChildExit {
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Its peak resident set size in KiB (`ru_maxrss`).
    pub max_rss_kib: u64,
    /// Its user and system CPU time in nanoseconds.
    pub user_ns: u64,
    pub system_ns: u64,
}

/// Waits for child process `pid` to end, reaps it, and returns its exit status and resource usage
/// (`wait4`). The caller must own the child, and nothing else may wait for it or signal it afterwards
/// (for a `std::process::Child`, drop it without waiting or killing).
pub fn wait_child(pid: u32) -> std::io::Result<ChildExit> {
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `ru` are valid for wait4 to write; waiting for one given pid has no
        // effect beyond reaping that child.
        let rc = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut ru) };
        if rc == pid as libc::pid_t {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    let ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000;
    Ok(ChildExit {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        max_rss_kib: ru.ru_maxrss.max(0) as u64,
        user_ns: ns(ru.ru_utime),
        system_ns: ns(ru.ru_stime),
    })
}

/// Restores SIGPIPE's default action (the Rust runtime ignores it), so a reporting command whose
/// output pipe closes (`quietvm ctl ... | head`) ends quietly, as Unix tools do, instead of failing
/// on the write. Not for `run`: a closed console must never take a VM down.
pub fn default_sigpipe() {
    // SAFETY: signal() with SIG_DFL installs no handler code; SIGPIPE is a valid signal.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// Keeps glibc's allocator from mapping, growing or trimming heaps in small steps. Each `mmap`,
/// `mprotect` or `munmap` takes the process's `mmap_lock` for writing, and KVM faulting guest memory in
/// for another vCPU waits for it: a sleep the kernel counts, on a thread that was not halted. With a
/// 1 MiB top pad, no trimming and no small mmaps, the vCPU threads' heaps settle after start-up.
pub fn quiet_allocator() {
    // SAFETY: mallopt only sets allocator parameters; the values are in range for each parameter.
    unsafe {
        libc::mallopt(libc::M_TOP_PAD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

/// Writes as much of `buf` to `fd` as the reader takes before `deadline`, without ever blocking past
/// it and without changing the descriptor's flags (an inherited stdout or stderr is shared with the
/// parent shell, so it must never be switched to non-blocking): each write waits for `POLLOUT` first
/// and is at most 512 bytes, which a pipe, socket or terminal that reports `POLLOUT` takes without
/// blocking. Returns the bytes written, or the error that makes further writes pointless (e.g. `EPIPE`
/// once the reader is gone).
pub fn write_within(
    fd: std::os::unix::io::RawFd,
    buf: &[u8],
    deadline: std::time::Instant,
) -> Result<usize, (usize, std::io::Error)> {
    const CHUNK: usize = 512;
    let mut done = 0;
    while done < buf.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // Round up, so a deadline less than 1 ms away still gets one look.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `pfd` is one valid pollfd for the kernel to read and write.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err((done, err));
        }
        if ready == 0 {
            break; // the deadline passed with the reader not reading
        }
        if pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 && pfd.revents & libc::POLLOUT == 0 {
            return Err((done, std::io::Error::from_raw_os_error(libc::EPIPE)));
        }
        let n = (buf.len() - done).min(CHUNK);
        // SAFETY: `buf[done..done + n]` is valid for reads of `n` bytes.
        let rc = unsafe { libc::write(fd, buf[done..].as_ptr() as *const libc::c_void, n) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            match err.kind() {
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => continue,
                _ => return Err((done, err)),
            }
        }
        done += rc as usize;
        if std::time::Instant::now() >= deadline && done < buf.len() {
            break;
        }
    }
    Ok(done)
}

/// Waits up to `timeout` for `fd` to become readable; true if it did.
pub fn poll_readable(fd: std::os::unix::io::RawFd, timeout: std::time::Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is one valid pollfd for the kernel to read and write.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    rc > 0
}

/// Writes `buf` to standard error, giving up (silently) at `deadline` if nothing reads it: quietvm's
/// last words (the outcome, the statistics table) must not hold the process on an unread pipe.
pub fn write_stderr_within(buf: &[u8], deadline: std::time::Instant) {
    let _ = write_within(libc::STDERR_FILENO, buf, deadline);
}

/// Sets `O_NONBLOCK` on a descriptor quietvm created itself (never on an inherited one).
pub fn set_nonblocking(fd: std::os::unix::io::RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL only read and set the flags of `fd`; no memory is passed.
    let rc = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Makes the child that `cmd` starts get SIGTERM when the thread that spawned it ends
/// (`PR_SET_PDEATHSIG`): `quietvm fleet` killed with SIGKILL cannot stop its VMs itself, so each
/// VM shuts itself down in order (SIGTERM is its orderly shutdown) when its fleet thread is gone.
pub fn terminate_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl and getppid,
    // which are async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then nobody would send the signal.
            if libc::getppid() == 1 {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Sends `signal` to process `pid` (an error if it is gone).
pub fn send_signal(pid: u32, signal: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory.
    if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

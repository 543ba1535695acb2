//! The `qemu` policy: the same built-in guest, workload, vCPU count, memory, seed and arguments, run by
//! QEMU with KVM instead of quietvm, as a peer to measure against (docs/qemu.md).
//!
//! `quietvm run --policy qemu` lands here. It starts `qemu-system-x86_64` on a minimal `microvm`
//! machine (no periodic device), hands the guest its arguments on the kernel command line (the guest
//! boots through its PVH entry), forwards the guest's console, and when the guest prints its end line
//! reads every vCPU thread's counters from `/proc` before it lets the guest end (one byte on the
//! UART). The guest's timer report comes from its memory, which QEMU keeps in a file
//! (`memory-backend-file`) that this module reads after QEMU exited. CPU time and peak RSS are
//! QEMU's own, from `wait4`.

mod launch;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use quietvm_vmm::accounting::WakeupCause;
use quietvm_vmm::config::VmConfig;
use quietvm_vmm::exit_code;
use quietvm_vmm::stats::{PeerStats, ThreadCounters, TimerStats, VcpuStats, VmStats};
use quietvm_vmm::sys::os::{send_signal, terminate_with_parent, wait_child};

pub use launch::{
    argv, find_qemu, guest_cmdline, parse_end_line, vcpu_index_of_thread, EndLine, Launch,
    END_MARKER, MEMORY_FILE_PREFIX, QEMU_BINARY, START_MARKER,
};

/// The most vCPUs the guest's PVH start can bring up (it numbers vCPUs by their 8-bit APIC id).
pub const MAX_VCPUS: u32 = 255;

/// Why a VM could not be run under QEMU. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("cannot find {QEMU_BINARY} on PATH: install QEMU (Debian: `apt-get install qemu-system-x86`) or give --qemu PATH")]
    NotFound,
    #[error("--qemu {}: not an executable file: install QEMU (Debian: `apt-get install qemu-system-x86`) or give its path", .0.display())]
    NotExecutable(PathBuf),
    #[error("policy qemu: {0}")]
    Unsupported(String),
    #[error("policy qemu: cannot read the host's TSC frequency (KVM_GET_TSC_KHZ): {0}")]
    TscKhz(String),
    #[error("policy qemu: {what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {}: {source}", path.display())]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot wait for QEMU (pid {pid}): {source}")]
    Wait { pid: u32, source: std::io::Error },
    #[error("{} failed (exit status {status}) before the guest ended: {message}", path.display())]
    QemuFailed {
        path: PathBuf,
        status: String,
        message: String,
    },
}

/// Files a run creates, removed when it ends, or as soon as QEMU has them open (the guest's start
/// line), so that a launcher killed afterwards leaves nothing behind.
struct TempFiles(Vec<PathBuf>);

impl TempFiles {
    fn remove_all(&mut self) {
        for p in self.0.drain(..) {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// Where the guest memory file goes: tmpfs if there is one (it is the guest's RAM while QEMU runs).
fn memory_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

/// What the console reader saw.
struct ConsoleEnd {
    end: Option<EndLine>,
    /// The vCPU threads' counters over the guest's run: read when the start line came and when the
    /// end line came, the difference: (index, tid, counters).
    threads: Vec<(u32, u32, ThreadCounters)>,
    first_line_at: Option<Instant>,
    start_at: Option<Instant>,
    end_at: Option<Instant>,
    last_line: Option<String>,
}

/// Runs `cfg` under QEMU (`qemu`: `--qemu`, else found on PATH); the guest's console goes to standard
/// output if `echo`. Errors are for runs that could not happen; a guest that failed or crashed is a
/// [`VmStats`] with its exit code, as under quietvm.
pub fn run_vm(cfg: &VmConfig, qemu: Option<&Path>, echo: bool) -> Result<VmStats, QemuError> {
    let qemu = find_qemu(qemu)?;
    check_config(cfg)?;
    let tsc_khz = quietvm_vmm::sys::kvm::vm::KvmVm::host_tsc_khz()
        .map_err(|e| QemuError::TscKhz(e.to_string()))?;
    let id = format!("{}-{}", std::process::id(), unique());
    let mut temp = TempFiles(Vec::new());
    let kernel = match &cfg.guest {
        Some(path) => path.clone(),
        None => {
            let path = std::env::temp_dir().join(format!("quietvm-qemu-guest-{id}.elf"));
            temp.0.push(path.clone());
            std::fs::write(&path, quietvm_vmm::vm::builtin_guest_elf()).map_err(|source| {
                QemuError::File {
                    what: "cannot write the guest image to",
                    path: path.clone(),
                    source,
                }
            })?;
            path
        }
    };
    let memory_file = memory_dir().join(format!("{}{id}.mem", launch::MEMORY_FILE_PREFIX));
    temp.0.push(memory_file.clone());
    let launch = Launch {
        qemu: qemu.clone(),
        kernel,
        memory_file: memory_file.clone(),
        vcpus: cfg.vcpus,
        memory_mib: cfg.memory_mib,
        cmdline: guest_cmdline(cfg, tsc_khz),
        name: format!("quietvm-{id}"),
        initrd: cfg.payload.clone(),
    };
    let command_line = argv(&launch);
    let mut cmd = Command::new(&command_line[0]);
    cmd.args(&command_line[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    terminate_with_parent(&mut cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| QemuError::Spawn {
        path: qemu.clone(),
        source,
    })?;
    let pid = child.id();
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    // From here on wait_child reaps QEMU: `child` must not wait or kill.
    drop(child);

    let stderr_tail = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_string(&mut text);
        }
        text
    });
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let timeout = (cfg.timeout_ms > 0).then(|| Duration::from_millis(cfg.timeout_ms));
    let watchdog = std::thread::spawn(move || {
        let Some(limit) = timeout else {
            let _ = done_rx.recv();
            return false;
        };
        match done_rx.recv_timeout(limit) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = send_signal(pid, libc::SIGKILL);
                true
            }
            _ => false,
        }
    });
    // Once the guest runs, QEMU has loaded the kernel and mapped the memory file: keep the memory file
    // open for the report, and unlink both.
    let mut memory: Option<std::fs::File> = None;
    let console = read_console(pid, stdout, stdin, echo, || {
        memory = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&memory_file)
            .map_err(|e| log::warn!("cannot open {}: {e}", memory_file.display()))
            .ok();
        temp.remove_all();
    });
    let exit = wait_child(pid);
    let _ = done_tx.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let stderr_text = stderr_tail.join().unwrap_or_default();
    let exit = exit.map_err(|source| QemuError::Wait { pid, source })?;

    let (mut exit_code, mut outcome) = outcome_of(&console, &exit, timed_out);
    // Every vCPU's thread must have been read over the whole run, or its counts are not exact.
    if console.start_at.is_some() && console.end.as_ref().is_some_and(|e| !e.start_answered) {
        exit_code = exit_code::GUEST_CRASH;
        outcome =
            "the guest went on before the launcher answered its start line (a host too busy?): \
                   the counts would not be the run's"
                .into();
    } else if console.end.is_some() && console.threads.len() != cfg.vcpus as usize {
        exit_code = exit_code::GUEST_CRASH;
        outcome = format!(
            "found {} of QEMU's {} vCPU threads (named CPU n/KVM) at the guest's end",
            console.threads.len(),
            cfg.vcpus
        );
    }
    if console.end.is_none() && !timed_out && exit.signal.is_none() && exit.code == Some(1) {
        // QEMU's own failures exit 1 without any guest output: not a run.
        let message = stderr_text
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("no message")
            .to_owned();
        return Err(QemuError::QemuFailed {
            path: qemu,
            status: "1".into(),
            message,
        });
    }
    let timers_and_per_vcpu = match (&console.end, memory) {
        (Some(end), Some(file)) if end.report_page != 0 => Some(
            quietvm_vmm::vm::read_report_file(
                file,
                cfg.memory_mib << 20,
                end.report_page,
                cfg.vcpus,
            )
            .map_err(|why| log::warn!("no timer figures from the guest: {why}")),
        ),
        _ => None,
    };
    let (timers, per_vcpu) = match timers_and_per_vcpu {
        Some(Ok((t, v))) => (t, v),
        _ => (TimerStats::default(), Vec::new()),
    };
    let vcpus = vcpu_stats(&console, &per_vcpu);
    // The guest's run, from its start line to its end line, as quietvm's wall time is from the first
    // vCPU's start to the VM's end.
    let wall_ns = console
        .end_at
        .unwrap_or_else(Instant::now)
        .duration_since(console.start_at.unwrap_or(started))
        .as_nanos() as u64;
    Ok(VmStats {
        policy: cfg.policy.to_string(),
        workload: cfg.workload_label(),
        exit_code,
        outcome,
        wall_ns,
        process_user_ns: exit.user_ns,
        process_system_ns: exit.system_ns,
        vcpus,
        timers,
        console_dropped_bytes: 0,
        // quietvm sees none of QEMU's exits.
        per_fired_timer: None,
        peer: Some(PeerStats {
            command: command_line,
            pid,
            exit_status: exit.code,
            exit_signal: exit.signal,
            max_rss_kib: exit.max_rss_kib,
            startup_ns: console
                .first_line_at
                .map(|t| t.duration_since(started).as_nanos() as u64),
            counters_read: match (console.start_at, &console.end) {
                (Some(_), Some(_)) => "guest_start_to_end".into(),
                (None, Some(_)) => "thread_start_to_guest_end: no start line".into(),
                (_, None) => "never: the guest did not print its end line".into(),
            },
        }),
    })
}

/// A number distinct for each run of this process (several VMs per process in tests).
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// What the guest under QEMU cannot do: each is refused with one line, never run half-way.
fn check_config(cfg: &VmConfig) -> Result<(), QemuError> {
    let no = |what: &str| Err(QemuError::Unsupported(what.to_owned()));
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return no(&format!("vcpus must be 1..={MAX_VCPUS} (the guest's PVH start numbers vCPUs by their 8-bit APIC id)"));
    }
    if cfg.vcpus_online.is_some_and(|k| k != cfg.vcpus) {
        return no("vCPU hotplug (--vcpus-online) needs quietvm's timer device");
    }
    if let Some(path) = &cfg.payload {
        // Bounded as quietvm bounds it: QEMU reads the file whole.
        let meta = std::fs::metadata(path).map_err(|source| QemuError::File {
            what: "cannot read the payload",
            path: path.clone(),
            source,
        })?;
        if !meta.is_file() || meta.len() > quietvm_vmm::limits::MAX_PAYLOAD_BYTES {
            return no("the payload must be a regular file of at most 1 GiB");
        }
    }
    if !cfg.isolated_vcpus.is_empty() {
        return no("isolated vCPUs are a quietvm hierarchy setting");
    }
    if cfg.memory_mib < 16 || cfg.memory_mib > 3072 {
        return no(
            "memory must be 16..=3072 MiB (microvm's RAM below 4 GiB, where the guest maps it)",
        );
    }
    Ok(())
}

/// Reads QEMU's standard output to its end: echoes it, notes the first line, and at the guest's end
/// line reads every vCPU thread's counters, then answers the guest (one byte) so that it ends.
fn read_console(
    pid: u32,
    stdout: Option<std::process::ChildStdout>,
    mut stdin: Option<std::process::ChildStdin>,
    echo: bool,
    mut on_start: impl FnMut(),
) -> ConsoleEnd {
    let mut c = ConsoleEnd {
        end: None,
        threads: Vec::new(),
        first_line_at: None,
        start_at: None,
        end_at: None,
        last_line: None,
    };
    let mut at_start: Vec<(u32, u32, ThreadCounters)> = Vec::new();
    // The guest waits for this after each of its two lines: nothing of its run is missed, and what
    // QEMU's threads do before and after it is not counted (docs/qemu.md, "What is measured").
    let answer = |stdin: &mut Option<std::process::ChildStdin>| {
        if let Some(s) = stdin.as_mut() {
            let _ = s.write_all(b"\n");
            let _ = s.flush();
        }
    };
    let Some(stdout) = stdout else {
        return c;
    };
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    let mut out = std::io::stdout();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        let now = Instant::now();
        c.first_line_at.get_or_insert(now);
        let text = String::from_utf8_lossy(&line);
        if c.start_at.is_none() && text.trim_end() == START_MARKER {
            at_start = read_vcpu_threads(pid);
            c.start_at = Some(now);
            answer(&mut stdin);
            on_start();
        } else if c.end.is_none() {
            if let Some(end) = parse_end_line(text.trim_end()) {
                c.threads = read_vcpu_threads(pid)
                    .into_iter()
                    .map(|(index, tid, k)| {
                        let before = at_start
                            .iter()
                            .find(|(_, t, _)| *t == tid)
                            .map(|(_, _, k)| *k)
                            .unwrap_or_default();
                        (index, tid, k.since(&before))
                    })
                    .collect();
                c.end = Some(end);
                c.end_at = Some(now);
                answer(&mut stdin);
                stdin = None;
            }
        }
        if echo {
            let _ = out.write_all(&line);
            let _ = out.flush();
        }
        let trimmed = text.trim();
        if !trimmed.is_empty() {
            c.last_line = Some(trimmed.to_owned());
        }
    }
    c
}

/// QEMU's vCPU threads (named `CPU n/KVM` by `-name ...,debug-threads=on`) and their counters now.
fn read_vcpu_threads(pid: u32) -> Vec<(u32, u32, ThreadCounters)> {
    let mut found = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return found;
    };
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        if let Some(index) = vcpu_index_of_thread(comm.trim_end()) {
            if let Some(counters) = ThreadCounters::read(pid, tid) {
                found.push((index, tid, counters));
            }
        }
    }
    found.sort_by_key(|(index, _, _)| *index);
    found
}

/// Per-vCPU figures: the kernel's counts of QEMU's threads, the guest's halts and timer counts.
fn vcpu_stats(console: &ConsoleEnd, per_vcpu: &[(u64, u64)]) -> Vec<VcpuStats> {
    console
        .threads
        .iter()
        .map(|&(index, tid, k)| {
            let mut v = VcpuStats::new(index);
            v.tid = tid;
            v.host_wakeups = k.voluntary_switches;
            v.kernel_voluntary_switches = k.voluntary_switches;
            v.kernel_cpu_ns = k.cpu_ns;
            v.kernel_timeslices = k.timeslices;
            v.wakeup_causes.insert(
                WakeupCause::KernelHalt.name().to_owned(),
                k.voluntary_switches,
            );
            if let Some(end) = &console.end {
                v.halts = end.halts.get(index as usize).copied().unwrap_or(0);
            }
            if let Some(&(fired, remote)) = per_vcpu.get(index as usize) {
                v.timers_fired = fired;
                v.remote_expiries = remote;
            }
            v
        })
        .collect()
}

/// quietvm's exit code and outcome for how QEMU ended (docs/qemu.md, "Exit codes").
fn outcome_of(
    console: &ConsoleEnd,
    exit: &quietvm_vmm::sys::os::ChildExit,
    timed_out: bool,
) -> (i32, String) {
    let crash = exit_code::GUEST_CRASH;
    if timed_out {
        return (crash, "timeout: QEMU was killed".into());
    }
    if let Some(sig) = exit.signal {
        return (crash, format!("QEMU was ended by signal {sig}"));
    }
    let status = exit.code.unwrap_or(-1);
    match &console.end {
        Some(end) if status == 2 * end.code as i32 + 1 => {
            let code = (end.code as i32).min(99);
            let outcome = if code == 0 {
                "guest exited with code 0".to_owned()
            } else {
                format!("guest exited with code {}", end.code)
            };
            (code, outcome)
        }
        Some(end) => (
            crash,
            format!(
                "guest ended with code {} but QEMU exited with status {status}",
                end.code
            ),
        ),
        // isa-debug-exit without the end line: the ring-0 exception printer (code 90).
        None if status >= 3 && status % 2 == 1 => {
            let code = ((status - 1) / 2).min(99);
            let last = console.last_line.as_deref().unwrap_or("no output");
            (code, format!("guest exited with code {code}: {last}"))
        }
        None if status == 0 => (
            crash,
            "guest crash: QEMU ended without the guest's end line (a triple fault or reset, -no-reboot)"
                .into(),
        ),
        None => (crash, format!("QEMU exited with status {status}")),
    }
}

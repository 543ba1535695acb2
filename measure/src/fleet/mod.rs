//! `quietvm fleet`: many small VMs on one host, one `quietvm run` process each (as users run them),
//! all started as fast as possible, and what they cost together: host wakeups of their vCPU threads
//! (quietvm's count and the kernel's), VMM CPU time, memory per VM and start-up time. See
//! docs/fleet.md for the output and its JSON schema.

mod procfs;
mod report;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;

pub use procfs::MemSample;
use quietvm_vmm::config::VmPolicy;
use quietvm_vmm::stats::VmStats;
use quietvm_vmm::sys::os::{wait_child, ChildExit};
pub use report::{Aggregate, Dist, FleetReport, VmRecord};

/// The most VMs one `fleet` starts.
pub const MAX_VMS: u32 = 10_000;
/// The longest `--interval-ms` and `--sample-ms`.
const MAX_PERIOD_MS: u64 = 3_600_000;

/// Run many VMs at once, one `quietvm run` process each, and report what they cost together.
#[derive(Args, Debug)]
pub struct FleetArgs {
    /// VM configs (see configs/): VM i runs the (i mod K)-th of the K configs given.
    #[arg(required = true, value_name = "CONFIG")]
    pub configs: Vec<PathBuf>,
    /// How many VMs to run.
    #[arg(long)]
    pub vms: u32,
    /// Run every VM with this policy (local, push, pull, kvm-lapic or qemu) instead of its config's.
    #[arg(long, value_parser = parse_policy)]
    pub policy: Option<VmPolicy>,
    /// Run this workload of the built-in guest in every VM instead of its config's (e.g. `hello`,
    /// which prints at once: the start-up figure then measures boot to the first guest output).
    #[arg(long)]
    pub workload: Option<String>,
    /// Extra KEY=VALUE words for every VM's guest (repeatable), after its config's: e.g.
    /// `--arg period_min_us=10000 --arg period_max_us=100000` for sparser timers.
    #[arg(long = "arg", value_name = "KEY=VALUE")]
    pub args: Vec<String>,
    /// Run every VM's workload for this long instead of its config's duration.
    #[arg(long)]
    pub duration_ms: Option<u64>,
    /// End every VM as failed after this long instead of its config's timeout (0 = no limit).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Every VM's `timer-slack-ns` (the least slack of MOVABLE timers, ns; docs/timer-abi.md).
    #[arg(long, value_name = "NS")]
    pub timer_slack_ns: Option<u64>,
    /// Start the VMs this many milliseconds apart (0: all at once, as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
    /// Sample each running VM's memory from /proc/PID/smaps this often (0: never; then the VMM
    /// overhead is not reported).
    #[arg(long, default_value_t = 250)]
    pub sample_ms: u64,
    /// Write every per-VM figure and the aggregate as JSON (docs/fleet.md).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// With --policy qemu: the QEMU binary (default: qemu-system-x86_64 on PATH; docs/qemu.md).
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
}

fn parse_policy(s: &str) -> Result<VmPolicy, String> {
    s.parse()
}

/// `quietvm fleet ...`: exits 0 if every VM succeeded, 1 if any failed, 101 if the fleet could not run.
pub fn main(args: FleetArgs) -> ExitCode {
    match run(&args) {
        Ok(report) => {
            print!("{}", report::render(&report));
            let mut ok = report.aggregate.failed == 0;
            if !ok {
                eprintln!(
                    "quietvm: {} of {} VMs failed (listed above)",
                    report.aggregate.failed, report.aggregate.vms
                );
            }
            if let Some(path) = &args.json {
                if let Err(e) = quietvm_vmm::stats::write_json(path, &report) {
                    eprintln!("quietvm: error: {e}");
                    ok = false;
                }
            }
            if let Some(sig) = report.interrupted_by_signal {
                eprintln!("quietvm: the fleet was interrupted by signal {sig}");
                ExitCode::from(quietvm_vmm::exit_code::INTERRUPTED as u8)
            } else if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("quietvm: error: {e}");
            ExitCode::from(quietvm_vmm::exit_code::VMM_ERROR as u8)
        }
    }
}

/// Each fleet's directory of per-VM files: `DIR_PREFIX` + the fleet's pid, in the temp directory.
const DIR_PREFIX: &str = "quietvm-fleet-";

/// Removes the directories of fleets that are gone (killed with SIGKILL, which no cleanup survives):
/// a directory whose pid is not a live process, or is one that is not quietvm.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim_end().starts_with("quietvm"));
        if !alive && pid != std::process::id() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// What a VM's thread (which spawns the VM, reads its console and reaps it) tells the main thread.
enum Event {
    /// The VM's process exists.
    Started { index: usize, pid: u32 },
    /// The VM has ended and been reaped, or could not be started (`Err`, with why).
    Ended {
        index: usize,
        spawned_at: Instant,
        result: Result<Finished, String>,
    },
}

/// How a VM that ran ended.
struct Finished {
    pid: u32,
    console: Console,
    exit: std::io::Result<ChildExit>,
    reaped_at: Instant,
    memory: Option<MemSample>,
    memory_samples: u32,
}

/// A running VM's memory samples, shared by its reader thread (which samples whenever the VM writes
/// to its console), the sampler thread (periodically) and the main thread (at the end).
struct Watch {
    pid: u32,
    /// The VM runs under QEMU (`--policy qemu`): its memory is QEMU's, a child of `pid`, found on the
    /// first sample that sees it (0 until then).
    qemu: bool,
    qemu_pid: std::sync::atomic::AtomicU32,
    /// `--sample-ms` is not 0.
    enabled: bool,
    /// Set by the reader thread once the VM's standard output closed (it is exiting): no more samples.
    exiting: AtomicBool,
    sampled: Mutex<Sampled>,
}

#[derive(Default)]
struct Sampled {
    last: Option<MemSample>,
    count: u32,
}

impl Watch {
    fn sample(&self) {
        if !self.enabled || self.exiting.load(Ordering::Acquire) {
            return;
        }
        let pid = if self.qemu {
            match self.qemu_pid.load(Ordering::Acquire) {
                0 => match procfs::child_named(self.pid, "qemu-system") {
                    Some(child) => {
                        self.qemu_pid.store(child, Ordering::Release);
                        child
                    }
                    None => return,
                },
                child => child,
            }
        } else {
            self.pid
        };
        if let Some(s) = procfs::sample(pid) {
            let mut sampled = self.sampled.lock().unwrap_or_else(|e| e.into_inner());
            sampled.count += 1;
            // Keep the last sample that found the guest mapping (guest memory only grows).
            if s.guest_rss_kib.is_some() || sampled.last.is_none() {
                sampled.last = Some(s);
            }
        }
    }

    fn samples(&self) -> (Option<MemSample>, u32) {
        let s = self.sampled.lock().unwrap_or_else(|e| e.into_inner());
        (s.last, s.count)
    }
}

/// The thread that samples every running VM's memory every `every`, least-sampled first, until
/// `stop`. Separate from the launching thread, whose `spawn`s wait for each child's `exec` and can
/// take long on a loaded host.
struct Sampler {
    watches: Arc<Mutex<Vec<Arc<Watch>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(every: Duration) -> Self {
        let watches: Arc<Mutex<Vec<Arc<Watch>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (w, st) = (Arc::clone(&watches), Arc::clone(&stop));
        let thread = (!every.is_zero())
            .then(|| {
                std::thread::Builder::new()
                    .name("fleet-sampler".into())
                    .stack_size(256 << 10)
                    .spawn(move || loop {
                        std::thread::park_timeout(every);
                        if st.load(Ordering::Acquire) {
                            return;
                        }
                        let mut now: Vec<(u32, Arc<Watch>)> = {
                            let mut all = w.lock().unwrap_or_else(|e| e.into_inner());
                            all.retain(|x| !x.exiting.load(Ordering::Acquire));
                            all.iter().map(|x| (x.samples().1, Arc::clone(x))).collect()
                        };
                        now.sort_by_key(|(count, _)| *count);
                        for (_, watch) in now {
                            watch.sample();
                        }
                    })
                    .ok()
            })
            .flatten();
        Sampler {
            watches,
            stop,
            thread,
        }
    }

    /// Where VM threads register their VM (`None` when not sampling).
    fn registry(&self) -> Option<Arc<Mutex<Vec<Arc<Watch>>>>> {
        self.thread.as_ref().map(|_| Arc::clone(&self.watches))
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// The files one VM writes.
struct VmFiles {
    stats: PathBuf,
    stderr: PathBuf,
}

/// Why a fleet could not be run. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("--vms must be between 1 and {MAX_VMS}")]
    Vms,
    #[error("{0} must be at most {MAX_PERIOD_MS} (one hour)")]
    Period(&'static str),
    #[error("cannot find the quietvm binary: {0}")]
    NoBinary(#[source] std::io::Error),
    #[error("cannot create {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Qemu(#[from] crate::qemu::QemuError),
}

/// Runs the fleet and measures it.
pub fn run(args: &FleetArgs) -> Result<FleetReport, FleetError> {
    if !(1..=MAX_VMS).contains(&args.vms) {
        return Err(FleetError::Vms);
    }
    for (flag, v) in [
        ("--interval-ms", args.interval_ms),
        ("--sample-ms", args.sample_ms),
    ] {
        if v > MAX_PERIOD_MS {
            return Err(FleetError::Period(flag));
        }
    }
    if args.policy == Some(VmPolicy::Qemu) {
        crate::qemu::find_qemu(args.qemu.as_deref())?;
    }
    let exe = std::env::current_exe().map_err(FleetError::NoBinary)?;
    remove_stale_dirs();
    let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| FleetError::Dir {
        path: dir.clone(),
        source,
    })?;
    // SIGINT, SIGTERM, SIGHUP: stop launching, shut the running VMs down in order, report them as
    // interrupted, and remove the directory (SIGKILL cannot be caught: the next fleet run removes
    // the directory, and each VM is told by PR_SET_PDEATHSIG).
    let signals = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
        .map_err(FleetError::Signals)?;
    quietvm_vmm::sys::os::route_termination_signals(std::os::unix::io::AsRawFd::as_raw_fd(
        &signals,
    ))
    .map_err(FleetError::Signals)?;
    // The handler may write to it until the process ends.
    std::mem::forget(signals);
    let mut interrupted: Option<i32> = None;
    let mut reaped = vec![false; args.vms as usize];
    let n = args.vms as usize;
    let mut records: Vec<VmRecord> = (0..n)
        .map(|i| VmRecord::new(i as u32, config_of(args, i).display().to_string()))
        .collect();
    let files: Vec<VmFiles> = (0..n)
        .map(|i| VmFiles {
            stats: dir.join(format!("vm{i}.json")),
            stderr: dir.join(format!("vm{i}.stderr")),
        })
        .collect();
    let (tx, rx) = mpsc::channel::<Event>();

    let load_average_before = procfs::load_average();
    let start = Instant::now();
    let sampler = Sampler::start(Duration::from_millis(args.sample_ms));
    let progress_every = Duration::from_millis(500);
    let mut next_progress = start + progress_every;
    let mut launched = 0usize;
    let (mut starting, mut running, mut ended, mut failed) = (0usize, 0usize, 0usize, 0usize);
    let mut last_reaped = start;
    loop {
        // Start every VM that is due: with --interval-ms 0, all of them now. Each VM's own thread
        // spawns it (a spawn waits for the child's exec, which takes long on a busy host), so the
        // spawns overlap.
        if interrupted.is_none() {
            if let Some(sig) = quietvm_vmm::sys::os::termination_signal() {
                interrupted = Some(sig);
                for (rec, done) in records.iter().zip(&reaped) {
                    if let (Some(pid), false) = (rec.pid, done) {
                        let _ = quietvm_vmm::sys::os::send_signal(pid, libc::SIGTERM);
                    }
                }
                for rec in records.iter_mut().skip(launched) {
                    rec.error = Some(format!(
                        "not started: the fleet was interrupted (signal {sig})"
                    ));
                }
                failed += n - launched;
                ended += n - launched;
                launched = n;
            }
        }
        while launched < n
            && (args.interval_ms == 0
                || Instant::now()
                    >= start + Duration::from_millis(args.interval_ms) * launched as u32)
        {
            let i = launched;
            launched += 1;
            let vm = VmLaunch {
                qemu: args.policy == Some(VmPolicy::Qemu),
                index: i,
                command: command(args, &exe, i, &files[i]),
                stderr: files[i].stderr.clone(),
                registry: sampler.registry(),
            };
            let thread_tx = tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("fleet-vm{i}"))
                .stack_size(128 << 10)
                .spawn(move || vm.run(&thread_tx));
            match spawned {
                Ok(_) => starting += 1,
                Err(e) => {
                    records[i].error = Some(format!("cannot start a thread to run the VM: {e}"));
                    ended += 1;
                    failed += 1;
                }
            }
        }
        if launched == n && starting + running == 0 {
            break;
        }
        // Look at the signal flag at least every 100 ms.
        let mut wake = next_progress.min(Instant::now() + Duration::from_millis(100));
        if launched < n {
            wake = wake.min(start + Duration::from_millis(args.interval_ms) * launched as u32);
        }
        let got = rx.recv_timeout(wake.saturating_duration_since(Instant::now()));
        let mut batch: Vec<Event> = got.into_iter().collect();
        batch.extend(rx.try_iter());
        for event in batch {
            match event {
                Event::Started { index, pid } => {
                    records[index].pid = Some(pid);
                    if interrupted.is_some() {
                        let _ = quietvm_vmm::sys::os::send_signal(pid, libc::SIGTERM);
                    }
                    starting -= 1;
                    running += 1;
                }
                Event::Ended {
                    index,
                    spawned_at,
                    result,
                } => {
                    let rec = &mut records[index];
                    reaped[index] = true;
                    rec.launched_at_ns = spawned_at.duration_since(start).as_nanos() as u64;
                    ended += 1;
                    match result {
                        Ok(f) => {
                            running -= 1;
                            last_reaped = last_reaped.max(f.reaped_at);
                            if !record_end(rec, spawned_at, f) {
                                failed += 1;
                            }
                        }
                        Err(e) => {
                            starting -= 1;
                            rec.error = Some(e);
                            failed += 1;
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        if now >= next_progress {
            progress(launched, n, starting + running, ended, failed);
            next_progress = now + progress_every;
        }
    }
    sampler.stop();
    let wall_ns = last_reaped.duration_since(start).as_nanos() as u64;
    let load_average_after = procfs::load_average();
    eprintln!(
        "\rquietvm fleet: all {n} VMs ended, {failed} failed, in {:.2} s{:30}",
        wall_ns as f64 / 1e9,
        ""
    );

    for (rec, f) in records.iter_mut().zip(&files) {
        collect(rec, f);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let host_cpus = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    let (user, system) = quietvm_vmm::sys::os::process_cpu_ns();
    Ok(FleetReport {
        configs: args
            .configs
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        policy: args.policy.map(|p| p.to_string()),
        workload: args.workload.clone(),
        args: args.args.clone(),
        duration_ms: args.duration_ms,
        timeout_ms: args.timeout_ms,
        interval_ms: args.interval_ms,
        sample_ms: args.sample_ms,
        load_average_before,
        load_average_after,
        fleet_cpu_ns: user + system,
        aggregate: Aggregate::of(&records, wall_ns, host_cpus),
        per_vm: records,
        interrupted_by_signal: interrupted,
    })
}

fn config_of(args: &FleetArgs, i: usize) -> &Path {
    &args.configs[i % args.configs.len()]
}

fn progress(launched: usize, n: usize, in_flight: usize, ended: usize, failed: usize) {
    eprint!(
        "\rquietvm fleet: {launched}/{n} started, {in_flight} running, {ended} ended, {failed} failed    "
    );
}

/// `quietvm run CONFIG --quiet --stats-json FILE` plus the overrides, for VM `i`.
fn command(args: &FleetArgs, exe: &Path, i: usize, files: &VmFiles) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("run").arg(config_of(args, i));
    if let Some(p) = args.policy {
        cmd.args(["--policy", &p.to_string()]);
    }
    if let (Some(VmPolicy::Qemu), Some(q)) = (args.policy, &args.qemu) {
        cmd.arg("--qemu").arg(q);
    }
    if let Some(w) = &args.workload {
        cmd.args(["--workload", w]);
    }
    for a in &args.args {
        cmd.args(["--arg", a]);
    }
    if let Some(d) = args.duration_ms {
        cmd.args(["--duration-ms", &d.to_string()]);
    }
    if let Some(t) = args.timeout_ms {
        cmd.args(["--timeout-ms", &t.to_string()]);
    }
    if let Some(s) = args.timer_slack_ns {
        cmd.args(["--timer-slack-ns", &s.to_string()]);
    }
    quietvm_vmm::sys::os::terminate_with_parent(&mut cmd);
    cmd.arg("--quiet")
        .arg("--stats-json")
        .arg(&files.stats)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    cmd
}

/// Everything a VM's thread needs.
struct VmLaunch {
    /// Under `--policy qemu` (the memory to sample is QEMU's).
    qemu: bool,
    index: usize,
    command: Command,
    stderr: PathBuf,
    registry: Option<Arc<Mutex<Vec<Arc<Watch>>>>>,
}

impl VmLaunch {
    /// Spawns the VM, reads its console to the end, reaps it, and reports.
    fn run(mut self, tx: &mpsc::Sender<Event>) {
        let index = self.index;
        let mut spawned_at = Instant::now();
        let result = self.spawn_and_wait(&mut spawned_at, tx);
        let _ = tx.send(Event::Ended {
            index,
            spawned_at,
            result,
        });
    }

    fn spawn_and_wait(
        &mut self,
        spawned_at: &mut Instant,
        tx: &mpsc::Sender<Event>,
    ) -> Result<Finished, String> {
        let stderr = File::create(&self.stderr)
            .map_err(|e| format!("cannot create {}: {e}", self.stderr.display()))?;
        self.command.stderr(stderr);
        *spawned_at = Instant::now();
        let mut child = self
            .command
            .spawn()
            .map_err(|e| format!("cannot start quietvm run: {e}"))?;
        let pid = child.id();
        let stdout = child.stdout.take();
        // From here on this thread reaps the child with wait4: `child` must not wait or kill.
        drop(child);
        let _ = tx.send(Event::Started {
            index: self.index,
            pid,
        });
        let watch = Arc::new(Watch {
            pid,
            qemu: self.qemu,
            qemu_pid: std::sync::atomic::AtomicU32::new(0),
            enabled: self.registry.is_some(),
            exiting: AtomicBool::new(false),
            sampled: Mutex::default(),
        });
        if let Some(registry) = &self.registry {
            let mut all = registry.lock().unwrap_or_else(|e| e.into_inner());
            all.push(Arc::clone(&watch));
        }
        let console = match stdout {
            Some(out) => read_console(out, &watch),
            None => Console::default(),
        };
        watch.exiting.store(true, Ordering::Release);
        let exit = wait_child(pid);
        let reaped_at = Instant::now();
        let (memory, memory_samples) = watch.samples();
        Ok(Finished {
            pid,
            console,
            exit,
            reaped_at,
            memory,
            memory_samples,
        })
    }
}

/// Fills a VM's record from how it ended; `false` if it did not exit with code 0.
fn record_end(rec: &mut VmRecord, spawned_at: Instant, f: Finished) -> bool {
    rec.pid = Some(f.pid);
    rec.memory = f.memory;
    rec.memory_samples = f.memory_samples;
    rec.startup_ns = f
        .console
        .first
        .map(|t| t.duration_since(spawned_at).as_nanos() as u64);
    rec.stdout_bytes = f.console.bytes;
    rec.last_output_line = f.console.last_line;
    rec.run_ns = f.reaped_at.duration_since(spawned_at).as_nanos() as u64;
    match f.exit {
        Ok(exit) => {
            rec.exit_code = exit.code;
            rec.signal = exit.signal;
            rec.max_rss_kib = Some(exit.max_rss_kib);
            rec.rusage_user_ns = Some(exit.user_ns);
            rec.rusage_system_ns = Some(exit.system_ns);
            exit.code == Some(0)
        }
        Err(e) => {
            rec.error = Some(format!("cannot wait for process {}: {e}", f.pid));
            false
        }
    }
}

/// What a VM wrote to its console.
#[derive(Default)]
struct Console {
    /// When its first byte came.
    first: Option<Instant>,
    bytes: u64,
    /// Its last line that is not empty (at most [`TAIL`] bytes of it).
    last_line: Option<String>,
}

/// How much of the console's end is kept, for the last line.
const TAIL: usize = 1024;

/// Reads a VM's console to its end. Samples the VM's memory each time output comes (at most every
/// 10 ms): the built-in guest's timer workloads print their result just before the VM ends, so that
/// sample sees all the guest memory it touched.
fn read_console(mut out: impl Read, watch: &Watch) -> Console {
    let mut last_sample: Option<Instant> = None;
    let mut c = Console::default();
    let mut tail: Vec<u8> = Vec::with_capacity(2 * TAIL);
    let mut buf = [0u8; 4096];
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                let now = Instant::now();
                c.first.get_or_insert(now);
                c.bytes += k as u64;
                tail.extend_from_slice(&buf[..k]);
                if tail.len() > TAIL {
                    tail.drain(..tail.len() - TAIL);
                }
                if last_sample.is_none_or(|t| now.duration_since(t) >= Duration::from_millis(10)) {
                    watch.sample();
                    last_sample = Some(Instant::now());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    c.last_line = String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned);
    c
}

/// Reads a finished VM's statistics and error line, removes its files, and decides whether it
/// succeeded.
fn collect(rec: &mut VmRecord, files: &VmFiles) {
    let stats: Result<VmStats, String> = std::fs::read_to_string(&files.stats)
        .map_err(|e| format!("wrote no statistics ({e})"))
        .and_then(|t| {
            serde_json::from_str(&t).map_err(|e| format!("statistics do not parse: {e}"))
        });
    let stderr_line = std::fs::read_to_string(&files.stderr).ok().and_then(|t| {
        t.lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
    });
    let _ = std::fs::remove_file(&files.stats);
    let _ = std::fs::remove_file(&files.stderr);
    let exited_ok = rec.exit_code == Some(0);
    // Exit code 0 after a shutdown request (a signal, Ctrl-C reaching the whole process group) is an
    // orderly end, not a guest that finished: not ok.
    if let Ok(s) = &stats {
        if rec.error.is_none() && s.outcome.starts_with(quietvm_vmm::vm::SHUT_DOWN_PREFIX) {
            rec.error = Some(s.outcome.clone());
        }
    }
    rec.ok = exited_ok && stats.is_ok() && rec.error.is_none();
    if !rec.ok && rec.error.is_none() {
        rec.error = Some(match (rec.exit_code, rec.signal, &stats) {
            (Some(0), _, Err(e)) => e.clone(),
            (Some(c), _, _) => {
                let line = stderr_line.unwrap_or_else(|| format!("exited with code {c}"));
                // The guest says why its checks failed, or where it crashed, on its console.
                match (&rec.last_output_line, c) {
                    (Some(guest), 1..=100) => format!("{line}; guest's last line: {guest}"),
                    _ => line,
                }
            }
            (None, Some(sig), _) => match stderr_line {
                Some(l) => format!("ended by signal {sig}; last message: {l}"),
                None => format!("ended by signal {sig}"),
            },
            (None, None, _) => "ended in an unknown way".into(),
        });
    }
    rec.stats = stats.ok();
    // Under QEMU the process fleet started is quietvm's launcher; the VM's own peak is QEMU's.
    if let Some(peer) = rec.stats.as_ref().and_then(|s| s.peer.as_ref()) {
        rec.max_rss_kib = Some(peer.max_rss_kib);
    }
    rec.derive();
}

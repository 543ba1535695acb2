//! The `quietvm` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use quietvm_vmm::config::VmConfig;
use quietvm_vmm::config::VmPolicy;
use quietvm_vmm::exit_code;
use quietvm_vmm::vm::{run_vm, RunOptions};

/// A small KVM VMM whose idle vCPUs stay asleep.
///
/// quietvm launches SMP test guests with userspace vCPU timers and an emulated idle HLT, and expires
/// movable guest timers with the Linux kernel's pull model, so that halted vCPUs are not woken just to
/// expire them.
#[derive(Parser, Debug)]
#[command(name = "quietvm", version, about, long_about = None)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace). RUST_LOG-style filtering is not needed.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a VM and run a guest workload until the guest ends it.
    Run(RunArgs),
    /// Run the same VM under several policies (interleaved rounds) and compare host wakeups, exits,
    /// lateness and CPU time, cross-checked against the kernel's per-thread counters.
    Compare(quietvm_measure::compare::CompareArgs),
    /// Simulate the timer policies on virtual time (no KVM): wakeups, remote expiries, lateness.
    Simulate(quietvm_measure::simulate::SimulateArgs),
    /// Send one request to a running VMM's API socket (docs/api.md).
    Ctl(quietvm_vmm::api::client::CtlArgs),
    /// Run many VMs at once, one `quietvm run` process each, and report host wakeups, VMM CPU,
    /// memory per VM and start-up time.
    Fleet(quietvm_measure::fleet::FleetArgs),
    /// Replay a Linux timer trace under each policy, beside the kernel's own decisions.
    Replay(quietvm_measure::replay::ReplayArgs),
    /// Record this machine's timer activity (tracefs, root) for `quietvm replay`.
    TraceHost(quietvm_measure::replay::TraceHostArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// A TOML config (see configs/); flags below override its settings.
    config: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long)]
    vcpus: Option<u32>,
    /// Start only vCPUs 0..K; the others wait parked for `quietvm ctl SOCK vcpu-online N`.
    #[arg(long, value_name = "K")]
    vcpus_online: Option<u32>,
    /// Guest memory in MiB.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// A guest ELF of your own (docs/boot.md) instead of the built-in test guest.
    #[arg(long)]
    guest: Option<PathBuf>,
    /// The built-in guest's workload: hello, timers, idle-movable, all-idle, mixed, rearm-heavy,
    /// ping-pong, cancel-race, abi-check, triple-fault, never-ack.
    #[arg(long)]
    workload: Option<String>,
    /// Workload duration in milliseconds.
    #[arg(long)]
    duration_ms: Option<u64>,
    /// Timer policy: local, push or pull (quietvm's placement of movable timers), kvm-lapic (the
    /// in-kernel LAPIC baseline), or qemu (the same guest under QEMU with KVM, docs/qemu.md).
    #[arg(long, value_parser = parse_policy)]
    policy: Option<VmPolicy>,
    /// Seed for the guest's random choices.
    #[arg(long)]
    seed: Option<u64>,
    /// Extra KEY=VALUE words for the guest (repeatable).
    #[arg(long = "arg", value_name = "KEY=VALUE")]
    args: Vec<String>,
    /// End the VM as failed if it runs longer than this (0 = no limit).
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Write the statistics as JSON (docs/stats.md) to this file.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Do not print the statistics table at exit.
    #[arg(long)]
    quiet: bool,
    /// Serve the control API on this Unix socket (docs/api.md; `quietvm ctl`).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Do not install the seccomp filters (for debugging; docs/limits.md).
    #[arg(long)]
    no_seccomp: bool,
    /// Append one JSON line of counters to this file every --metrics-period-s seconds.
    #[arg(long, value_name = "PATH")]
    metrics: Option<PathBuf>,
    /// vCPUs kept out of the timer hierarchy, e.g. `0` or `0-3,7` (docs/timer-abi.md, "Isolated
    /// vCPUs"): they never expire other vCPUs' timers; their own movable timers expire on them.
    #[arg(long, value_name = "LIST")]
    isolated_vcpus: Option<String>,
    /// Spread the vCPUs over N NUMA nodes of consecutive vCPUs (the hierarchy groups them per node).
    #[arg(long, value_name = "N")]
    numa_nodes: Option<u32>,
    /// With --policy qemu: the QEMU binary (default: qemu-system-x86_64 on PATH).
    #[arg(long, value_name = "PATH")]
    qemu: Option<PathBuf>,
    /// How often --metrics gets a line.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS", value_parser = parse_period)]
    metrics_period_s: f64,
    /// The least slack quietvm gives MOVABLE timers, in ns (0..=1000000000; default 0): each may fire
    /// anywhere in [deadline, deadline + slack], so expiries coalesce (docs/timer-abi.md, "Timer
    /// windows"). Pinned timers keep the guest's own slack. No effect under kvm-lapic.
    #[arg(long, value_name = "NS")]
    timer_slack_ns: Option<u64>,
    /// A halt whose next timer is at most this many ns off waits for it awake instead of sleeping
    /// (0..=1000000; default 0: always sleep; KVM's own halts poll up to 200000 by default;
    /// docs/performance.md, "Short halts"). Not under kvm-lapic.
    #[arg(long, value_name = "NS")]
    halt_poll_ns: Option<u64>,
    /// Write one JSON line per timer arming when it ends (fired, cancelled, replaced, or pending at
    /// exit) to this file (docs/timer-abi.md, "The timer log"). If it cannot be written, the run fails.
    #[arg(long, value_name = "PATH")]
    timer_log: Option<PathBuf>,
}

fn parse_period(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.01..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not a period between 0.01 and 3600 seconds"
        )),
    }
}

fn parse_policy(s: &str) -> Result<VmPolicy, String> {
    s.parse()
}

impl RunArgs {
    fn config(&self) -> Result<VmConfig, String> {
        let mut cfg = match &self.config {
            Some(path) => VmConfig::from_file(path).map_err(|e| e.to_string())?,
            None => VmConfig::default(),
        };
        if let Some(v) = self.vcpus {
            cfg.vcpus = v;
        }
        if let Some(v) = self.vcpus_online {
            cfg.vcpus_online = Some(v);
        }
        if let Some(v) = self.memory_mib {
            cfg.memory_mib = v;
        }
        if let Some(v) = &self.guest {
            cfg.guest = Some(v.clone());
        }
        if let Some(v) = &self.workload {
            cfg.workload = v.clone();
        }
        if let Some(v) = self.duration_ms {
            cfg.duration_ms = v;
        }
        if let Some(v) = self.policy {
            cfg.policy = v;
        }
        if let Some(v) = self.seed {
            cfg.seed = v;
        }
        cfg.args.extend(self.args.iter().cloned());
        if let Some(v) = self.timeout_ms {
            cfg.timeout_ms = v;
        }
        if let Some(list) = &self.isolated_vcpus {
            cfg.isolated_vcpus =
                quietvm_vmm::config::parse_cpu_list(list, quietvm_vmm::config::MAX_VCPUS)?;
        }
        if let Some(n) = self.numa_nodes {
            cfg.set_numa_nodes(n);
        } else if self.vcpus.is_some() && !cfg.vcpu_nodes.is_empty() {
            // --vcpus changed the count a config's node map was written for.
            let nodes = cfg.vcpu_nodes.iter().max().map_or(1, |m| m + 1);
            cfg.set_numa_nodes(nodes);
        }
        if self.no_seccomp {
            cfg.seccomp = false;
        }
        if let Some(v) = self.timer_slack_ns {
            cfg.timer_slack_ns = v;
        }
        if let Some(v) = self.halt_poll_ns {
            cfg.halt_poll_ns = v;
        }
        Ok(cfg)
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    log::set_max_level(level);
    let _ = log::set_logger(&StderrLogger);
}

/// Log lines go to stderr, so stdout carries only the guest's console.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            // Never held up by a stderr nobody reads: a line that cannot go out soon is dropped.
            let line = format!(
                "quietvm: {}: {}\n",
                r.level().as_str().to_lowercase(),
                r.args()
            );
            quietvm_vmm::sys::os::write_stderr_within(
                line.as_bytes(),
                std::time::Instant::now() + std::time::Duration::from_millis(100),
            );
        }
    }
    fn flush(&self) {}
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("quietvm: error: {msg}");
    ExitCode::from(exit_code::VMM_ERROR as u8)
}

/// Checks that `--stats-json` can be written before the VM starts, not after its whole run: creates
/// (or truncates) the file, without blocking on a FIFO.
fn check_stats_json(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map(drop)
        .map_err(|e| format!("--stats-json {}: {e}", path.display()))
}

fn run(args: RunArgs) -> ExitCode {
    let started = std::time::Instant::now();
    let cfg = match args.config() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if let Some(path) = &args.stats_json {
        if let Err(e) = check_stats_json(path) {
            return fail(e);
        }
    }
    let opts = RunOptions {
        api_sock: args.api_sock.clone(),
        metrics: args.metrics.clone(),
        metrics_period: std::time::Duration::from_secs_f64(args.metrics_period_s),
        started: Some(started),
        timer_log: args.timer_log.clone(),
    };
    let stats = if cfg.policy == VmPolicy::Qemu {
        if args.api_sock.is_some() || args.metrics.is_some() {
            return fail("--api-sock and --metrics need quietvm's own VMM, not --policy qemu");
        }
        match quietvm_measure::qemu::run_vm(&cfg, args.qemu.as_deref(), true) {
            Ok(s) => s,
            Err(e) => return fail(e),
        }
    } else {
        match run_vm(&cfg, &opts) {
            Ok(s) => s,
            Err(e) => return fail(e),
        }
    };
    // The last words go to stderr without ever blocking on a reader that does not read.
    let deadline = std::time::Instant::now() + quietvm_vmm::limits::EXIT_FLUSH;
    let mut last_words = String::new();
    if stats.exit_code != 0 {
        last_words += &format!("quietvm: {}\n", stats.outcome);
    }
    if !args.quiet {
        last_words += &stats.table();
    }
    quietvm_vmm::sys::os::write_stderr_within(last_words.as_bytes(), deadline);
    if let Some(path) = &args.stats_json {
        if let Err(e) = quietvm_vmm::stats::write_json(path, &stats) {
            return fail(e);
        }
    }
    ExitCode::from(stats.exit_code as u8)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    if matches!(cli.command, Command::Run(_)) {
        quietvm_vmm::sys::os::quiet_allocator();
    } else {
        quietvm_vmm::sys::os::default_sigpipe();
    }
    match cli.command {
        Command::Run(args) => run(args),
        Command::Compare(args) => quietvm_measure::compare::main(args),
        Command::Simulate(args) => quietvm_measure::simulate::main(args),
        Command::Ctl(args) => quietvm_vmm::api::client::main(args),
        Command::Fleet(args) => quietvm_measure::fleet::main(args),
        Command::Replay(args) => quietvm_measure::replay::main(args),
        Command::TraceHost(args) => quietvm_measure::replay::trace_host_main(args),
    }
}

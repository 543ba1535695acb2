//! The `quietvm simulate` command line.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use tmigr::service::Policy;

use super::workloads::WorkloadKind;
use super::{simulate, SimConfig, SimError};

const EXIT_USAGE: u8 = quietvm_vmm::exit_code::USAGE as u8;
const EXIT_CHECK_FAILED: u8 = quietvm_vmm::exit_code::CHECK_FAILED as u8;

/// Simulate a VM's timers under the placement policies (no KVM): wakeups of idle vCPUs, remote
/// expiries, lateness and hierarchy operations, on virtual time.
#[derive(clap::Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Number of vCPUs (1..=16384).
    #[arg(long, default_value_t = 8)]
    pub vcpus: u32,
    /// local, push, pull, or all (the three, with ratios against local).
    #[arg(long, default_value = "all")]
    pub policy: String,
    /// one-busy, all-idle, mostly-busy, rearm-heavy or ping-pong.
    #[arg(long, default_value = "one-busy")]
    pub workload: String,
    /// Simulated seconds.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub duration_s: f64,
    /// Seed of the workload's random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Timers per vCPU (default: 2; rearm-heavy 8, at least 5; ping-pong always 1).
    #[arg(long)]
    pub timers: Option<u32>,
    /// A halted vCPU runs this long after its wake time or kick.
    #[arg(long, default_value_t = 50.0, allow_negative_numbers = true)]
    pub wake_latency_us: f64,
    /// A running vCPU expires this long after its exit time or kick; a woken vCPU stays up one
    /// exit cost, plus one per callback it runs, before it halts again.
    #[arg(long, default_value_t = 5.0, allow_negative_numbers = true)]
    pub exit_cost_us: f64,
    /// vCPUs kept out of the hierarchy, e.g. `0-63` (as `quietvm run --isolated-vcpus`): they never
    /// expire another vCPU's timer; checked.
    #[arg(long, value_name = "LIST")]
    pub isolated_vcpus: Option<String>,
    /// Each arming's slack in percent of its period (periodic timers) or timeout: it may fire
    /// anywhere in `[deadline, deadline + slack]` (0..=100; 0: exact deadlines).
    #[arg(long, default_value_t = 0)]
    pub slack_pct: u32,
    /// Periodic timers (one-busy, all-idle, mostly-busy): shortest period, in us.
    #[arg(long, default_value_t = 1_000)]
    pub period_min_us: u64,
    /// Periodic timers: longest period, in us (periods are drawn from [min, max)).
    #[arg(long, default_value_t = 10_000)]
    pub period_max_us: u64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

fn usage(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("quietvm simulate: error: {msg}");
    ExitCode::from(EXIT_USAGE)
}

fn micros(flag: &'static str, us: f64) -> Result<u64, SimError> {
    if !us.is_finite() || !(0.0..=1e6).contains(&us) {
        return Err(SimError::Micros { flag, value: us });
    }
    Ok((us * 1e3).round() as u64)
}

impl SimulateArgs {
    /// The policies and the configuration these arguments ask for, or one line saying what is wrong.
    pub fn config(&self) -> Result<(Vec<Policy>, SimConfig), SimError> {
        let policies = match self.policy.as_str() {
            "all" => vec![Policy::Local, Policy::Push, Policy::Pull],
            p => vec![p
                .parse::<Policy>()
                .map_err(|_| SimError::UnknownPolicy(p.to_owned()))?],
        };
        let workload: WorkloadKind = self.workload.parse().map_err(SimError::UnknownWorkload)?;
        let s = self.duration_s;
        if !s.is_finite() || s <= 0.0 || s > (super::MAX_DURATION_NS / 1_000_000_000) as f64 {
            return Err(SimError::Duration(s));
        }
        let mut cfg = SimConfig::new(self.vcpus, workload);
        cfg.duration_ns = ((s * 1e9).round() as u64).max(1);
        cfg.seed = self.seed;
        if workload == WorkloadKind::PingPong {
            if self.timers.is_some_and(|t| t != 1) {
                return Err(SimError::PingPongTimers);
            }
        } else if let Some(t) = self.timers {
            cfg.timers_per_vcpu = t;
        }
        cfg.wake_latency_ns = micros("--wake-latency-us", self.wake_latency_us)?;
        cfg.exit_cost_ns = micros("--exit-cost-us", self.exit_cost_us)?;
        cfg.progress = !self.quiet;
        cfg.slack_pct = self.slack_pct;
        cfg.periods_ns = (
            self.period_min_us.saturating_mul(1_000),
            self.period_max_us.saturating_mul(1_000),
        );
        if let Some(list) = &self.isolated_vcpus {
            cfg.isolated = quietvm_vmm::config::parse_cpu_list(list, super::MAX_VCPUS)
                .map_err(SimError::IsolatedList)?;
        }
        cfg.validate()?;
        Ok((policies, cfg))
    }
}

/// `quietvm simulate`: prints the table on stdout, writes `--json`; exits 2 on bad input, 1 if a
/// correctness check failed.
pub fn main(args: SimulateArgs) -> ExitCode {
    let (policies, cfg) = match args.config() {
        Ok(x) => x,
        Err(e) => return usage(e),
    };
    // Created before the run, so a bad path fails at once rather than after a long simulation.
    let json_file = match &args.json {
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => Some((path, f)),
            Err(e) => return usage(format!("cannot write {}: {e}", path.display())),
        },
        None => None,
    };
    let (report, wall_ms) = match simulate(&cfg, &policies) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("quietvm simulate: error: {e}");
            return ExitCode::from(EXIT_CHECK_FAILED);
        }
    };
    print!("{}", report.table(&wall_ms));
    if let Some((path, mut file)) = json_file {
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = file.write_all((json + "\n").as_bytes()) {
            eprintln!(
                "quietvm simulate: error: cannot write {}: {e}",
                path.display()
            );
            return ExitCode::from(EXIT_CHECK_FAILED);
        }
    }
    let failures: Vec<String> = report.policies.iter().flat_map(|p| p.failures()).collect();
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        for f in &failures {
            eprintln!("quietvm simulate: check failed: {f}");
        }
        ExitCode::from(EXIT_CHECK_FAILED)
    }
}

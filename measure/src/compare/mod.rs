//! `quietvm compare`: the same VM and workload once per policy, interleaved over K rounds
//! (A B C A B C ...), with every wakeup count cross-checked against the kernel's own per-thread
//! counters. See docs/compare.md for the output and its JSON schema.

mod external;
mod plot;
mod summary;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use clap::Args;
use serde::Serialize;

use crate::optimum::timer_log::{self, TimerLogSummary};
use quietvm_vmm::config::{ConfigError, VmConfig, VmPolicy};
use quietvm_vmm::stats::VmStats;
pub use summary::{CrossCheck, PolicySummary, Spread};
use thiserror::Error;

/// Run the same VM under several policies and compare host wakeups, lateness and CPU time.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// The VM config to run (see configs/). Not needed with --external.
    #[arg(required_unless_present = "external")]
    pub config: Option<PathBuf>,
    /// Policies to compare, in the order each round runs them.
    #[arg(long, value_delimiter = ',', default_value = "kvm-lapic,local,push,pull", value_parser = parse_policy)]
    pub policies: Vec<VmPolicy>,
    /// Rounds: each policy runs K times, interleaved.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Override the config's workload duration.
    #[arg(long)]
    pub duration_ms: Option<u64>,
    /// Override the config's `timer-slack-ns` (the least slack of MOVABLE timers, ns; docs/timer-abi.md).
    #[arg(long, value_name = "NS")]
    pub timer_slack_ns: Option<u64>,
    /// Override the config's `halt-poll-ns` (a halt whose next timer is that close waits awake;
    /// docs/performance.md, "Short halts"). Not under kvm-lapic or qemu.
    #[arg(long, value_name = "NS")]
    pub halt_poll_ns: Option<u64>,
    /// Write every figure as JSON (docs/compare.md).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an SVG of wakeups per second and of lateness per policy.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Instead of running VMs, sample another running VMM process from outside by the same kernel
    /// counters (any VMM: quietvm, or one using KVM's in-kernel LAPIC timer).
    #[arg(long, value_name = "PID", conflicts_with_all = ["repeat", "json", "plot"])]
    pub external: Option<u32>,
    /// With --external: how long to sample.
    #[arg(long, default_value_t = 5.0, requires = "external")]
    pub seconds: f64,
    /// Keep each run's `--timer-log` as DIR/POLICY-ROUND.jsonl (round 0-based) instead of a
    /// temporary file, so the optimum can be recomputed from outside.
    #[arg(long, value_name = "DIR", conflicts_with = "external")]
    pub keep_timer_logs: Option<PathBuf>,
    /// For the qemu policy: the QEMU binary (default: qemu-system-x86_64 on PATH; docs/qemu.md).
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
}

fn parse_policy(s: &str) -> Result<VmPolicy, String> {
    s.parse()
}

/// One VM run of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub policy: String,
    pub round: u32,
    pub stats: VmStats,
    /// What the run's `--timer-log` held and its optimum (docs/compare.md, "The optimum"); null
    /// for kvm-lapic (quietvm does not see its timers).
    pub timer_log: Option<TimerLogSummary>,
}

/// Everything `compare` measured.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub config: VmConfig,
    pub repeat: u32,
    pub runs: Vec<RunRecord>,
    pub summary: Vec<PolicySummary>,
    pub cross_check: CrossCheck,
    /// The optimum over every run that has a timer log (`total` of each), or null if none has.
    pub optimum: Option<Spread>,
}

/// `quietvm compare ...`
pub fn main(args: CompareArgs) -> ExitCode {
    if let Some(pid) = args.external {
        return external::main(pid, args.seconds);
    }
    match run(&args) {
        Ok(cmp) => {
            print!("{}", summary::render(&cmp));
            let mut ok = cmp.cross_check.flagged.is_empty();
            if !ok {
                eprintln!(
                    "quietvm: {} vCPU(s) where quietvm's wakeup count and the kernel's differ by more than 5% (see the cross-check above)",
                    cmp.cross_check.flagged.len()
                );
            }
            if let Some(path) = &args.json {
                if let Err(e) = quietvm_vmm::stats::write_json(path, &cmp) {
                    eprintln!("quietvm: error: {e}");
                    ok = false;
                }
            }
            if let Some(path) = &args.plot {
                if let Err(e) = plot::write_svg(&cmp, path) {
                    eprintln!("quietvm: error: cannot write {}: {e}", path.display());
                    ok = false;
                }
            }
            if ok {
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

/// Runs every policy `repeat` times, interleaved, each VM in its own `quietvm run` process (as users
/// run them, so each one's CPU time is its own process's).
pub fn run(args: &CompareArgs) -> Result<Comparison, CompareError> {
    let config_path = args.config.as_deref().ok_or(CompareError::NoConfig)?;
    let mut config = VmConfig::from_file(config_path)?;
    if let Some(d) = args.duration_ms {
        config.duration_ms = d;
    }
    if let Some(v) = args.timer_slack_ns {
        config.timer_slack_ns = v;
    }
    if let Some(v) = args.halt_poll_ns {
        config.halt_poll_ns = v;
    }
    config.validate()?;
    if args.repeat == 0 {
        return Err(CompareError::NoRounds);
    }
    if args.policies.is_empty() {
        return Err(CompareError::NoPolicies);
    }
    let exe = std::env::current_exe().map_err(CompareError::NoBinary)?;
    if let Some(dir) = &args.keep_timer_logs {
        std::fs::create_dir_all(dir).map_err(|source| CompareError::LogDir {
            dir: dir.clone(),
            source,
        })?;
    }
    // Before any run: without QEMU the comparison could not be whole.
    let qemu = if args.policies.contains(&VmPolicy::Qemu) {
        Some(crate::qemu::find_qemu(args.qemu.as_deref())?)
    } else {
        None
    };
    let total = args.repeat as usize * args.policies.len();
    let mut runs = Vec::with_capacity(total);
    for round in 0..args.repeat {
        for policy in &args.policies {
            eprint!(
                "\rquietvm compare: run {}/{total}: {policy}, round {}        ",
                runs.len() + 1,
                round + 1
            );
            // quietvm sees a kvm-lapic guest's timers no more than its halts.
            let log =
                matches!(policy, VmPolicy::Userspace(_)).then(|| match &args.keep_timer_logs {
                    Some(dir) => (dir.join(format!("{policy}-{round}.jsonl")), true),
                    None => (
                        std::env::temp_dir().join(format!(
                            "quietvm-compare-{}-{policy}-{round}.timers.jsonl",
                            std::process::id()
                        )),
                        false,
                    ),
                });
            let stats = run_one(
                &exe,
                config_path,
                &config,
                *policy,
                log.as_ref(),
                qemu.as_deref(),
            )?;
            let timer_log = match &log {
                Some((path, keep)) => {
                    let s = timer_log::summarize_file(path);
                    if !keep {
                        let _ = std::fs::remove_file(path);
                    }
                    Some(s?)
                }
                None => None,
            };
            runs.push(RunRecord {
                policy: policy.to_string(),
                round,
                stats,
                timer_log,
            });
        }
    }
    eprintln!("\rquietvm compare: {total} runs done{:30}", "");
    let policies: Vec<String> = args.policies.iter().map(|p| p.to_string()).collect();
    let summary = summary::summarize(&policies, &runs);
    let cross_check = summary::cross_check(&runs);
    let optimum = summary::optimum_over_runs(&runs);
    Ok(Comparison {
        config,
        repeat: args.repeat,
        runs,
        summary,
        cross_check,
        optimum,
    })
}

fn run_one(
    exe: &Path,
    config_path: &Path,
    config: &VmConfig,
    policy: VmPolicy,
    timer_log: Option<&(PathBuf, bool)>,
    qemu: Option<&Path>,
) -> Result<VmStats, CompareError> {
    let json = std::env::temp_dir().join(format!(
        "quietvm-compare-{}-{policy}.json",
        std::process::id()
    ));
    let mut cmd = Command::new(exe);
    cmd.arg("run").arg(config_path);
    if let (VmPolicy::Qemu, Some(qemu)) = (policy, qemu) {
        cmd.arg("--qemu").arg(qemu);
    }
    cmd.args(["--policy", &policy.to_string()])
        .args(["--duration-ms", &config.duration_ms.to_string()])
        .args(["--timer-slack-ns", &config.timer_slack_ns.to_string()])
        .args(["--halt-poll-ns", &config.halt_poll_ns.to_string()])
        .arg("--quiet")
        .arg("--stats-json")
        .arg(&json)
        .stdin(Stdio::null());
    if let Some((path, _)) = timer_log {
        cmd.arg("--timer-log").arg(path);
    }
    let out = cmd.output().map_err(CompareError::Spawn)?;
    let text = std::fs::read_to_string(&json);
    let _ = std::fs::remove_file(&json);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(CompareError::RunFailed {
            policy,
            code: out.status.code().unwrap_or(-1),
            message: stderr.lines().last().unwrap_or("no message").to_owned(),
        });
    }
    let text = text.map_err(|source| CompareError::NoStats { policy, source })?;
    serde_json::from_str(&text).map_err(|source| CompareError::BadStats { policy, source })
}

/// Why a comparison could not be made. Each is one line for the user.
#[derive(Debug, Error)]
pub enum CompareError {
    #[error("a config is needed")]
    NoConfig,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--repeat must be at least 1")]
    NoRounds,
    #[error("--policies needs at least one policy")]
    NoPolicies,
    #[error(transparent)]
    Qemu(#[from] crate::qemu::QemuError),
    #[error("cannot find the quietvm binary: {0}")]
    NoBinary(#[source] std::io::Error),
    #[error("cannot start quietvm run: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the {policy} run failed (exit {code}): {message}")]
    RunFailed {
        policy: VmPolicy,
        code: i32,
        message: String,
    },
    #[error("the {policy} run wrote no statistics: {source}")]
    NoStats {
        policy: VmPolicy,
        source: std::io::Error,
    },
    #[error("cannot create {}: {source}", dir.display())]
    LogDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    TimerLog(#[from] timer_log::TimerLogError),
    #[error("the {policy} run's statistics do not parse: {source}")]
    BadStats {
        policy: VmPolicy,
        source: serde_json::Error,
    },
}

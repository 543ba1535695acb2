//! `quietvm replay`: real Linux timer traces through the real [`tmigr::TimerService`] under each
//! policy, beside the kernel's own decisions recorded in the same trace; and `quietvm trace-host`,
//! which records such a trace on this machine. See docs/replay.md.
//!
//! - [`parse`]: the text of `/sys/kernel/tracing/trace` (or `trace-cmd report`) into records;
//! - [`timeline`]: tick rate, jiffies to nanoseconds, timer ids, idle timeline, the kernel's figures;
//! - [`engine`]: the replay itself, on virtual time;
//! - [`capture`]: tracefs capture for `trace-host`;
//! - [`guest`]: the compact form the built-in guest's `replay` workload re-enacts (`--guest-out`).
//!
//! The replay has an engine of its own rather than `quietvm simulate`'s: the simulator's vCPUs
//! decide when they run from a workload's callbacks (busy phases, halts after callbacks), while a
//! replay's CPUs run and idle when the trace says, and its timers are armed at the trace's times
//! whatever the policy did. What the two share is reused: the lateness histogram
//! ([`quietvm_vmm::accounting::LatenessRecorder`]), the miss grace, and the calling contract of
//! the service as the VMM follows it.

pub mod capture;
pub mod engine;
pub mod guest;
pub mod parse;
pub mod timeline;

#[cfg(test)]
mod tests;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;
use tmigr::service::Policy;

pub use engine::Windows;
use engine::{Costs, PolicyFigures};
use timeline::{ArmingCounts, HzInfo, KernelFigures, Timeline};

const EXIT_USAGE: u8 = quietvm_vmm::exit_code::USAGE as u8;
const EXIT_CHECK_FAILED: u8 = quietvm_vmm::exit_code::CHECK_FAILED as u8;
const EXIT_INTERRUPTED: u8 = quietvm_vmm::exit_code::INTERRUPTED as u8;

/// Replay a Linux timer trace (the text of /sys/kernel/tracing/trace or `trace-cmd report`)
/// through the timer service under each policy, beside the kernel's own figures.
#[derive(clap::Args, Debug, Clone)]
pub struct ReplayArgs {
    /// The trace file (see `quietvm trace-host`).
    pub trace: PathBuf,
    /// local, push, pull, or all.
    #[arg(long, default_value = "all")]
    pub policy: String,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Timer windows: `none` (deadline at the wheel's bucket, no slack), `wheel` (each timer may
    /// fire from its `expires` to its `bucket_expiry`), or `both` (every policy twice, side by side).
    #[arg(long, value_enum, default_value = "none")]
    pub windows: WindowsArg,
    /// The kernel's tick rate (CONFIG_HZ); inferred from the trace when not given.
    #[arg(long)]
    pub hz: Option<u32>,
    /// A CPU woken by the policy runs this long after its wake time or kick.
    #[arg(long, default_value_t = 50.0, allow_negative_numbers = true)]
    pub wake_latency_us: f64,
    /// A running CPU expires this long after its next event or kick.
    #[arg(long, default_value_t = 5.0, allow_negative_numbers = true)]
    pub exit_cost_us: f64,
    /// Also write the trace in the compact form the built-in guest's `replay` workload re-enacts
    /// (the VM config's `payload`; docs/replay.md).
    #[arg(long)]
    pub guest_out: Option<PathBuf>,
}

/// `--windows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WindowsArg {
    None,
    Wheel,
    Both,
}

impl WindowsArg {
    /// The replays to run for each policy, in column order.
    pub fn each(self) -> &'static [Windows] {
        match self {
            WindowsArg::None => &[Windows::None],
            WindowsArg::Wheel => &[Windows::Wheel],
            WindowsArg::Both => &[Windows::None, Windows::Wheel],
        }
    }
}

/// Record this machine's timer activity for `quietvm replay` (root; uses a tracefs instance of
/// its own, or puts the top-level buffer back as it was).
#[derive(clap::Args, Debug, Clone)]
pub struct TraceHostArgs {
    /// Seconds to record.
    #[arg(long, default_value_t = 5.0, allow_negative_numbers = true)]
    pub seconds: f64,
    /// The trace file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Ring buffer per CPU, in KiB.
    #[arg(long, default_value_t = 4096)]
    pub buffer_kb: u32,
}

/// The whole report (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    pub trace: String,
    pub lines: usize,
    pub cpus: u32,
    pub duration_ns: u64,
    pub hz: Option<HzInfo>,
    pub events: std::collections::BTreeMap<String, u64>,
    pub unknown_events: u64,
    pub lost_events: u64,
    pub timers: u32,
    pub armings: ArmingCounts,
    pub wake_latency_ns: u64,
    pub exit_cost_ns: u64,
    pub kernel: KernelFigures,
    pub policies: Vec<PolicyFigures>,
}

fn usage(cmd: &str, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("quietvm {cmd}: error: {msg}");
    ExitCode::from(EXIT_USAGE)
}

fn micros(flag: &str, us: f64) -> Result<u64, String> {
    if !us.is_finite() || !(0.0..=1e6).contains(&us) {
        return Err(format!("{flag} must be 0..=1000000, not {us}"));
    }
    Ok((us * 1e3).round() as u64)
}

/// The policies `--policy` names.
pub fn parse_policies(s: &str) -> Result<Vec<Policy>, String> {
    if s == "all" {
        return Ok(vec![Policy::Local, Policy::Push, Policy::Pull]);
    }
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<Policy>()
                .map_err(|_| format!("--policy must be local, push, pull or all, not {p:?}"))
        })
        .collect()
}

/// Reads, parses and prepares a trace file; errors are one line naming the file.
pub fn load(path: &std::path::Path, hz: Option<u32>) -> Result<Timeline, LoadError> {
    let bytes = quietvm_vmm::limits::read_input(path, quietvm_vmm::limits::InputKind::Trace)
        .map_err(LoadError::Read)?;
    let text = String::from_utf8_lossy(&bytes);
    let bad = |message: String| LoadError::Trace {
        path: path.to_owned(),
        message,
    };
    let parsed = parse::parse_trace(&text).map_err(|e| bad(e.to_string()))?;
    timeline::build(&parsed, hz).map_err(bad)
}

/// Why a trace could not be loaded: the file (its limits and checks, docs/limits.md), or a line of
/// it, named with its number.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Read(String),
    #[error("{}: {message}", path.display())]
    Trace {
        path: std::path::PathBuf,
        message: String,
    },
}

/// Replays a loaded trace under `policies`, each with every one of `windows`.
pub fn run(
    trace: &str,
    tl: &Timeline,
    policies: &[Policy],
    costs: Costs,
    windows: &[Windows],
) -> Result<ReplayReport, engine::EngineError> {
    let mut figs = Vec::new();
    for &p in policies {
        for &w in windows {
            figs.push(engine::replay_with(tl, p, costs, w)?);
        }
    }
    Ok(ReplayReport {
        trace: trace.to_string(),
        lines: tl.lines,
        cpus: tl.cpus,
        duration_ns: tl.end,
        hz: tl.hz.clone(),
        events: tl.events.clone(),
        unknown_events: tl.unknown_events,
        lost_events: tl.lost_events,
        timers: tl.timers,
        armings: tl.armings.clone(),
        wake_latency_ns: costs.wake_latency_ns,
        exit_cost_ns: costs.exit_cost_ns,
        kernel: tl.kernel.clone(),
        policies: figs,
    })
}

fn us(ns: u64) -> String {
    format!("{:.0}", ns as f64 / 1e3)
}

impl ReplayReport {
    /// The table printed on stdout.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let hz = match &self.hz {
            Some(h) => match h.estimate {
                Some(e) => format!(
                    "HZ {} ({}; jiffies advance at {e:.1} Hz over {} samples)",
                    h.hz, h.source, h.samples
                ),
                None => format!("HZ {} ({})", h.hz, h.source),
            },
            None => "no timers".to_string(),
        };
        let _ = writeln!(
            s,
            "replay {}: {} CPUs, {:.3} s, {hz}",
            self.trace,
            self.cpus,
            self.duration_ns as f64 / 1e9
        );
        let a = &self.armings;
        let total: u64 = self.events.values().sum();
        let _ = writeln!(
            s,
            "  {total} events ({} unknown skipped, {} lost); {} armings of {} timers: {} pinned, {} \
             movable, {} deferrable, {} on another CPU's wheel; {} cancels",
            self.unknown_events,
            self.lost_events,
            a.armings,
            self.timers,
            a.pinned,
            a.movable,
            a.deferrable,
            a.on_other_cpu,
            a.cancels
        );
        let _ = writeln!(
            s,
            "  wake latency {} us, exit cost {} us; kernel: {} expiries ({} of timers armed \
             before the trace), {} idle exits",
            us(self.wake_latency_ns),
            us(self.exit_cost_ns),
            self.kernel.expiries,
            self.kernel.expiries_armed_before_trace,
            self.kernel.idle_exits
        );
        let _ = write!(s, "\n{:<44}", "");
        for p in &self.policies {
            let _ = write!(s, " {:>13}", p.label());
        }
        let _ = writeln!(s, " {:>13}", "kernel");
        let k = &self.kernel;
        let row = |s: &mut String, name: &str, f: &dyn Fn(&PolicyFigures) -> String, kv: String| {
            let _ = write!(s, "{name:<44}");
            for p in &self.policies {
                let _ = write!(s, " {:>13}", f(p));
            }
            let _ = writeln!(s, " {kv:>13}");
        };
        row(
            &mut s,
            "idle-CPU wakeups for timers",
            &|p| p.timer_wakeups.to_string(),
            k.timer_wakeups.to_string(),
        );
        row(
            &mut s,
            "  for an own pinned timer",
            &|p| p.timer_wakeups_own_pinned.to_string(),
            k.timer_wakeups_own_pinned.to_string(),
        );
        row(
            &mut s,
            "  for an own movable timer",
            &|p| p.timer_wakeups_own_movable.to_string(),
            k.timer_wakeups_own_movable.to_string(),
        );
        row(
            &mut s,
            "  for other CPUs' timers",
            &|p| p.timer_wakeups_remote.to_string(),
            k.timer_wakeups_remote.to_string(),
        );
        row(
            &mut s,
            "  of a CPU idle with its tick running",
            &|_| "-".to_string(),
            k.timer_wakeups_tick_running.to_string(),
        );
        row(
            &mut s,
            "  made by the policy (trace idle on)",
            &|p| p.timer_wakeups_policy_made.to_string(),
            "-".to_string(),
        );
        row(
            &mut s,
            "other policy wakeups (kicks, stale)",
            &|p| p.other_wakeups.to_string(),
            "-".to_string(),
        );
        row(
            &mut s,
            "timers expired (non-deferrable)",
            &|p| p.expired.to_string(),
            (k.expiries - k.expiries_armed_before_trace - k.deferrable_expiries).to_string(),
        );
        row(
            &mut s,
            "remote expiries (not on the timer's wheel)",
            &|p| p.remote_expiries.to_string(),
            k.remote_expiries.to_string(),
        );
        row(
            &mut s,
            "expired off the arming CPU",
            &|p| p.expired_off_arming_cpu.to_string(),
            k.expired_off_arming_cpu.to_string(),
        );
        row(
            &mut s,
            "idle CPUs handled remotely",
            &|p| p.remote_cpu_handled.to_string(),
            format!("{} (*)", k.tmigr_handle_remote_cpu),
        );
        row(
            &mut s,
            "lateness p50 / p99 / max (us)",
            &|p| {
                let l = &p.lateness_ns;
                format!("{}/{}/{}", us(l.p50), us(l.p99), us(l.max))
            },
            {
                let l = &k.lateness_ns;
                format!("{}/{}/{}", us(l.p50), us(l.p99), us(l.max))
            },
        );
        row(
            &mut s,
            "deferrable expired",
            &|p| p.deferrable_expired.to_string(),
            k.deferrable_expiries.to_string(),
        );
        row(
            &mut s,
            "deferrable lateness p50 / max (us)",
            &|p| {
                let l = &p.deferrable_lateness_ns;
                format!("{}/{}", us(l.p50), us(l.max))
            },
            {
                let l = &k.deferrable_lateness_ns;
                format!("{}/{}", us(l.p50), us(l.max))
            },
        );
        row(
            &mut s,
            "fired after their window",
            &|p| p.after_window.to_string(),
            "-".to_string(),
        );
        row(
            &mut s,
            "optimum: fewest idle-CPU wakeups (**)",
            &|p| p.optimum.total.to_string(),
            "-".to_string(),
        );
        row(
            &mut s,
            "  policy-made timer wakeups / optimum",
            &|p| {
                p.policy_made_per_optimum
                    .map_or("-".to_string(), |r| format!("{r:.3}"))
            },
            "-".to_string(),
        );
        row(
            &mut s,
            "checks",
            &|p| {
                if p.checks.failures().is_empty() {
                    "ok".to_string()
                } else {
                    "FAILED".to_string()
                }
            },
            "".to_string(),
        );
        let _ = writeln!(
            s,
            "(*) kernel: tmigr_handle_remote_cpu events (also those that found nothing due); \
             tmigr_cpu_idle {}, tmigr_cpu_active {}, tick_stop {}",
            k.tmigr_cpu_idle, k.tmigr_cpu_active, k.tick_stops
        );
        let _ = writeln!(
            s,
            "(**) serving every timer the column fired inside its window, timers whose window meets \
             a span the trace runs a CPU that may expire them needing none (docs/replay.md)"
        );
        let _ = writeln!(
            s,
            "kernel: {} timers cancelled or re-armed after their deadline before its softirq ran, \
             {} due but still pending at the end (the replay fires both on time)",
            k.cancelled_when_due, k.due_at_end
        );
        for p in &self.policies {
            for f in p.checks.failures() {
                let _ = writeln!(s, "{}: check failed: {f}", p.policy);
            }
        }
        s
    }
}

/// `quietvm replay`.
pub fn main(args: ReplayArgs) -> ExitCode {
    let cmd = "replay";
    let policies = match parse_policies(&args.policy) {
        Ok(p) => p,
        Err(e) => return usage(cmd, e),
    };
    if let Some(hz) = args.hz {
        if !(10..=10_000).contains(&hz) {
            return usage(cmd, format!("--hz must be 10..=10000, not {hz}"));
        }
    }
    let costs = match (
        micros("--wake-latency-us", args.wake_latency_us),
        micros("--exit-cost-us", args.exit_cost_us),
    ) {
        (Ok(w), Ok(x)) => Costs {
            wake_latency_ns: w,
            exit_cost_ns: x,
        },
        (Err(e), _) | (_, Err(e)) => return usage(cmd, e),
    };
    let tl = match load(&args.trace, args.hz) {
        Ok(t) => t,
        Err(e) => return usage(cmd, e),
    };
    if let Some(path) = &args.guest_out {
        let bytes = match guest::encode(&tl) {
            Ok(b) => b,
            Err(e) => return usage(cmd, e),
        };
        if let Err(e) = std::fs::write(path, bytes) {
            return usage(cmd, format!("cannot write {}: {e}", path.display()));
        }
    }
    let report = match run(
        &args.trace.display().to_string(),
        &tl,
        &policies,
        costs,
        args.windows.each(),
    ) {
        Ok(r) => r,
        Err(e) => return usage(cmd, e),
    };
    print!("{}", report.table());
    if let Some(path) = &args.json {
        if let Err(e) = quietvm_vmm::stats::write_json(path, &report) {
            return usage(cmd, e);
        }
    }
    if report
        .policies
        .iter()
        .any(|p| !p.checks.failures().is_empty())
    {
        return ExitCode::from(EXIT_CHECK_FAILED);
    }
    ExitCode::SUCCESS
}

/// `quietvm trace-host`.
pub fn trace_host_main(args: TraceHostArgs) -> ExitCode {
    let cmd = "trace-host";
    if !args.seconds.is_finite() || !(0.0..=3600.0).contains(&args.seconds) || args.seconds == 0.0 {
        return usage(cmd, "--seconds must be more than 0 and at most 3600");
    }
    if !(64..=1_048_576).contains(&args.buffer_kb) {
        return usage(cmd, "--buffer-kb must be 64..=1048576");
    }
    match capture::capture(args.seconds, &args.out, args.buffer_kb) {
        Ok(c) => {
            eprintln!(
                "quietvm trace-host: {:.2} s, {} bytes to {} ({}); events: {}{}",
                c.seconds,
                c.bytes,
                args.out.display(),
                if c.instance {
                    "own tracefs instance, removed"
                } else {
                    "top-level buffer, restored"
                },
                c.events.join(" "),
                if c.missing.is_empty() {
                    String::new()
                } else {
                    format!("; not in this kernel: {}", c.missing.join(" "))
                }
            );
            if c.interrupted {
                eprintln!("quietvm trace-host: interrupted; the partial capture was written");
                return ExitCode::from(EXIT_INTERRUPTED);
            }
            ExitCode::SUCCESS
        }
        Err(e) => usage(cmd, e),
    }
}

//! What a simulation reports: the figures of one policy, the run's JSON, and the table printed on
//! stdout (with each policy's ratio against `local` when they were run together).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::optimum::Optimum;

pub use quietvm_vmm::accounting::Lateness;

/// Timer figures from the simulator's own record of every arming (not the service's counters).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TimerFigures {
    /// Armings (new or replacing a pending one).
    pub armed: u64,
    /// Armings replaced by a re-arm before they fired.
    pub replaced: u64,
    /// Armings cancelled before they fired.
    pub cancelled: u64,
    /// Armings that fired (their callback ran).
    pub fired: u64,
    /// Fired on a vCPU other than the one that armed them.
    pub remote_expiries: u64,
    /// Fired before their deadline (must be 0).
    pub early: u64,
    /// Of `remote_expiries`, those run on an isolated vCPU (must be 0).
    pub isolated_remote_expiries: u64,
    /// Still pending at the end although due long before it (must be 0).
    pub missed: u64,
    /// Expiries of a timer that was not pending with that deadline: cancelled, replaced, or fired
    /// twice (must be 0).
    pub bogus: u64,
    /// `arm`/`cancel` results that disagree with the record of what was pending (must be 0).
    pub api_mismatches: u64,
    /// Periods the periodic workloads skipped because the next deadline had already passed.
    pub skipped_periods: u64,
    /// Fired after the end of their window (`deadline + slack`): the wake latency or exit cost, or
    /// a policy's delay (counted, not a failure).
    pub after_window: u64,
    /// Distinct instants at which at least one timer expired.
    pub expiry_instants: u64,
    pub lateness_ns: Lateness,
}

/// The timer service's own counters ([`tmigr::service::ServiceStats`]).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ServiceFigures {
    pub arms: u64,
    pub rearms: u64,
    pub cancels: u64,
    pub local_expiries: u64,
    /// Timers a migrator expired for an idle vCPU (pull).
    pub remote_expiries: u64,
    /// Movable timers push placed on another vCPU.
    pub push_remote_placements: u64,
    pub halts: u64,
    pub kicks: u64,
}

/// Hierarchy operations ([`tmigr::hierarchy::HierStatsSnapshot`]): all zero except under pull.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct HierarchyFigures {
    pub activate_walks: u64,
    pub deactivate_walks: u64,
    /// Groups visited by all walks.
    pub levels_walked: u64,
    pub new_timer_walks: u64,
    /// Idle vCPUs whose timers a migrator expired.
    pub remote_cpu_handled: u64,
    pub remote_backoffs: u64,
    pub cas_retries: u64,
}

/// One policy's run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PolicyReport {
    pub policy: String,
    /// Sleeps of halted vCPUs that ended before the end of the run (host wakeups).
    pub wakeups: u64,
    /// Of those, for a movable timer (`own_movable_timer` + `remote_movable_timer`).
    pub movable_wakeups: u64,
    /// `wakeups` by cause, as `quietvm run` counts them (every cause listed).
    pub wakeup_causes: BTreeMap<&'static str, u64>,
    /// Exits of running vCPUs to expire timers or because they were kicked.
    pub guest_exits: u64,
    /// Kicks the service asked for that reached another vCPU (each one an exit or a wakeup).
    pub kicks_delivered: u64,
    pub timers: TimerFigures,
    pub service: ServiceFigures,
    pub hierarchy: HierarchyFigures,
    /// `TimerService::check_invariants` at the end: "ok" or the violation.
    pub invariants: String,
    /// Simulation events processed.
    pub events: u64,
    /// The fewest wakeups that could have served every arming this run fired inside its window
    /// (crate::optimum; as if every vCPU were idle).
    pub optimum: Optimum,
    /// `wakeups / optimum.total` (`null` if the optimum is 0).
    pub wakeups_per_optimum: Option<f64>,
}

impl PolicyReport {
    /// The correctness failures of this run, in words (empty: all checks passed).
    pub fn failures(&self) -> Vec<String> {
        let t = &self.timers;
        let mut f = Vec::new();
        for (n, what) in [
            (t.early, "early"),
            (
                t.isolated_remote_expiries,
                "other vCPUs' timers expired on isolated vCPUs",
            ),
            (t.missed, "missed"),
            (t.bogus, "bogus expiries"),
            (t.api_mismatches, "arm/cancel mismatches"),
        ] {
            if n > 0 {
                f.push(format!("{}: {n} {what}", self.policy));
            }
        }
        if self.invariants != "ok" {
            f.push(format!("{}: invariants: {}", self.policy, self.invariants));
        }
        f
    }
}

/// A policy's wakeups against `local`'s.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ratio {
    pub policy: String,
    /// `wakeups / local wakeups` (`null` if local had none).
    pub wakeups: Option<f64>,
    pub movable_wakeups: Option<f64>,
}

/// Everything `quietvm simulate` reports (the `--json` file).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SimReport {
    pub workload: String,
    pub vcpus: u32,
    pub duration_ns: u64,
    pub seed: u64,
    pub timers_per_vcpu: u32,
    pub wake_latency_ns: u64,
    pub exit_cost_ns: u64,
    /// `--slack-pct`: each arming's slack in percent of its period or timeout.
    pub slack_pct: u32,
    /// The periodic timers' periods, `[min, max)` ns.
    pub periods_ns: (u64, u64),
    pub policies: Vec<PolicyReport>,
    /// Each other policy against `local`, when `local` was run.
    pub ratios_vs_local: Vec<Ratio>,
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

impl SimReport {
    /// Fills `ratios_vs_local` from `policies`.
    pub fn compute_ratios(&mut self) {
        self.ratios_vs_local.clear();
        let Some(local) = self.policies.iter().find(|p| p.policy == "local") else {
            return;
        };
        self.ratios_vs_local = self
            .policies
            .iter()
            .filter(|p| p.policy != "local")
            .map(|p| Ratio {
                policy: p.policy.clone(),
                wakeups: ratio(p.wakeups, local.wakeups),
                movable_wakeups: ratio(p.movable_wakeups, local.movable_wakeups),
            })
            .collect();
    }

    /// The table printed on stdout: one row per policy, then the ratios.
    pub fn table(&self, wall_ms: &[f64]) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "simulate: workload {}, {} vCPUs, {:.3} s simulated, seed {}, {} timers/vCPU, wake latency {:.1} us, exit cost {:.1} us, slack {}%, periods {}-{} us",
            self.workload,
            self.vcpus,
            self.duration_ns as f64 / 1e9,
            self.seed,
            self.timers_per_vcpu,
            self.wake_latency_ns as f64 / 1e3,
            self.exit_cost_ns as f64 / 1e3,
            self.slack_pct,
            self.periods_ns.0 / 1_000,
            self.periods_ns.1 / 1_000,
        );
        let _ = writeln!(
            s,
            "{:<6} {:>10} {:>10} {:>10} {:>10} {:>11} {:>9} {:>9} {:>9} {:>11} {:>11} {:>9}",
            "policy",
            "wakeups",
            "movable",
            "fired",
            "remote",
            "exits",
            "p50 us",
            "p99 us",
            "max us",
            "activates",
            "levels",
            "wall ms"
        );
        for (i, p) in self.policies.iter().enumerate() {
            let t = &p.timers;
            let _ = writeln!(
                s,
                "{:<6} {:>10} {:>10} {:>10} {:>10} {:>11} {:>9.1} {:>9.1} {:>9.1} {:>11} {:>11} {:>9.0}",
                p.policy,
                p.wakeups,
                p.movable_wakeups,
                t.fired,
                t.remote_expiries,
                p.guest_exits,
                t.lateness_ns.p50 as f64 / 1e3,
                t.lateness_ns.p99 as f64 / 1e3,
                t.lateness_ns.max as f64 / 1e3,
                p.hierarchy.activate_walks,
                p.hierarchy.levels_walked,
                wall_ms.get(i).copied().unwrap_or(0.0),
            );
        }
        for p in &self.policies {
            let causes: Vec<String> = p
                .wakeup_causes
                .iter()
                .filter(|(_, &n)| n > 0)
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            let t = &p.timers;
            let _ = writeln!(
                s,
                "{}: wakeups by cause: {}; armed {} replaced {} cancelled {} early {} missed {} bogus {}; invariants {}",
                p.policy,
                if causes.is_empty() { "none".to_string() } else { causes.join(", ") },
                t.armed,
                t.replaced,
                t.cancelled,
                t.early,
                t.missed,
                t.bogus,
                p.invariants,
            );
        }
        let fmt_ratio = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.4}"));
        for r in &self.ratios_vs_local {
            let _ = writeln!(
                s,
                "{} vs local: wakeups x{}, movable wakeups x{}",
                r.policy,
                fmt_ratio(r.wakeups),
                fmt_ratio(r.movable_wakeups)
            );
        }
        let _ = writeln!(
            s,
            "optimum: the fewest wakeups that could have served every timer each policy fired inside \
             its window (all vCPUs idle; docs/performance.md):"
        );
        for p in &self.policies {
            let o = &p.optimum;
            let _ = writeln!(
                s,
                "  {:<6} optimum {} (movable {}, pinned {}; {} fired, {} after their window); wakeups / optimum {}",
                p.policy,
                o.total,
                o.movable,
                o.pinned,
                o.armings,
                p.timers.after_window,
                p.wakeups_per_optimum.map_or("-".to_string(), |r| format!("{r:.3}"))
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use quietvm_vmm::accounting::LatenessRecorder;

    /// The simulator's lateness is the VMM's recorder: nearest-rank percentiles to within 1%, the
    /// exact maximum, whatever the range.
    #[test]
    fn histogram_percentiles_are_nearest_rank_within_one_percent() {
        let close = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 0.01;
        let mut h = LatenessRecorder::new();
        for v in 1..=100u64 {
            h.record(v * 1_000);
        }
        let l = h.summary();
        assert!(close(l.p50, 50_000) && close(l.p99, 99_000), "{l:?}");
        assert_eq!(l.max, 100_000);
        let mut h = LatenessRecorder::new();
        let far = 300_000_000;
        h.record(2_050);
        h.record(far);
        let l = h.summary();
        assert!(close(l.p50, 2_050) && close(l.p99, far), "{l:?}");
        assert_eq!(l.max, far);
        assert_eq!(LatenessRecorder::new().summary(), Default::default());
    }
}

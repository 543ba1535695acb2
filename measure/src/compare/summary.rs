//! Per-policy figures over K rounds, the savings against the baselines, and the cross-check of every
//! wakeup count against the kernel's.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::{Comparison, RunRecord};
use crate::optimum::timer_log::TimerLogSummary;
use quietvm_vmm::stats::VmStats;

/// A figure over the K rounds: its median and its range.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Spread::default();
        }
        values.sort_by(|a, b| a.total_cmp(b));
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Spread {
            median,
            min: values[0],
            max: values[n - 1],
        }
    }

    /// max - min.
    pub fn range(&self) -> f64 {
        self.max - self.min
    }
}

/// One policy's figures over its rounds.
#[derive(Debug, Clone, Serialize)]
pub struct PolicySummary {
    pub policy: String,
    pub rounds: usize,
    /// Host wakeups of all vCPU threads while halted, per run.
    pub host_wakeups: Spread,
    pub host_wakeups_per_s: Spread,
    /// Host wakeups per timer fired.
    pub wakeups_per_timer: Spread,
    /// The kernel's voluntary context switches of the vCPU threads, per run.
    pub kernel_voluntary_switches: Spread,
    pub timers_fired: Spread,
    /// Summed over all rounds (each must be 0).
    pub timers_missed: u64,
    pub timers_early: u64,
    pub remote_expiries: Spread,
    pub lateness_p50_ns: Spread,
    pub lateness_p99_ns: Spread,
    pub lateness_max_ns: Spread,
    /// CPU time of the VMM process, from the kernel (getrusage), per run.
    pub cpu_user_ms: Spread,
    pub cpu_system_ms: Spread,
    /// Median VM exits per run, by reason.
    pub exits: BTreeMap<String, f64>,
    /// 1 - (this policy's wakeups / local's), per round; absent if local was not run.
    pub savings_vs_local: Option<Spread>,
    /// The same against kvm-lapic.
    pub savings_vs_kvm_lapic: Option<Spread>,
    /// The same against qemu (only when qemu ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub savings_vs_qemu: Option<Spread>,
    /// Lateness histogram summed over the rounds (`[upper_bound_ns, count]`, as in the stats).
    pub lateness_histogram: Vec<[u64; 2]>,
    /// `host_wakeups` less the VM-end wakeups (cause `control`), per run: what the optimum is
    /// compared with.
    pub host_wakeups_less_end: Spread,
    /// The optimum of each run's own timer log (null without logs; docs/compare.md).
    pub optimum: Option<Spread>,
    /// `host_wakeups_less_end / optimum`, each run against its own optimum.
    pub wakeups_per_optimum: Option<Spread>,
    /// From the timer logs, summed over rounds: fired before their deadline (must be 0), and after
    /// the end of their window (counted, not hidden).
    pub log_fired_early: u64,
    pub log_fired_after_window: u64,
    /// What one fired timer cost, per run (`VmStats::per_fired_timer`): exits that reached quietvm,
    /// every exit KVM took (null where KVM's figures are missing: `qemu`), and the VMM's CPU in us
    /// (`cpu user + cpu sys` over fired; for `qemu`, QEMU's).
    pub exits_per_fired_timer: Option<Spread>,
    /// The same by reason (`hlt`, `io_timer`: the timer device's commands and queue mode's `SYNC`
    /// doorbell writes, `kick`, ...): a reason missing from a run counts 0 there.
    pub exits_per_fired_timer_by_reason: BTreeMap<String, Spread>,
    pub kvm_exits_per_fired_timer: Option<Spread>,
    pub vmm_cpu_us_per_fired_timer: Spread,
}

/// One vCPU whose counts disagree.
#[derive(Debug, Clone, Serialize)]
pub struct Disagreement {
    pub policy: String,
    pub round: u32,
    pub vcpu: u32,
    pub quietvm: u64,
    pub kernel: u64,
}

/// quietvm's own wakeup counts against the kernel's voluntary context switches, per vCPU and run.
#[derive(Debug, Clone, Serialize)]
pub struct CrossCheck {
    /// vCPU runs compared (kvm-lapic runs are kernel-only and not counted).
    pub checked: usize,
    /// Those differing by more than 5% (and by more than 2, so that 0 against 1 is not flagged).
    pub flagged: Vec<Disagreement>,
}

fn halted_wakeups(s: &VmStats) -> u64 {
    s.vcpus.iter().map(|v| v.host_wakeups).sum()
}

/// The wakeups that ended the VM: each vCPU halted when the VM ends is woken once to stop, with
/// the cause `control` (nothing pauses or reconfigures a compare run, the cause's other uses).
/// kvm-lapic runs count every wakeup as `kernel_halt`, so nothing is left out of them.
pub fn end_wakeups(s: &VmStats) -> u64 {
    s.vcpus
        .iter()
        .map(|v| v.wakeups(quietvm_vmm::accounting::WakeupCause::Control))
        .sum()
}

/// Host wakeups of halted vCPUs less the VM-end ones.
pub fn wakeups_less_end(s: &VmStats) -> u64 {
    halted_wakeups(s).saturating_sub(end_wakeups(s))
}

/// The optimum over every run with a timer log, whatever its policy.
pub fn optimum_over_runs(runs: &[RunRecord]) -> Option<Spread> {
    let v: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.timer_log.as_ref())
        .map(|l| l.optimum.total as f64)
        .collect();
    (!v.is_empty()).then(|| Spread::of(v))
}

/// Figures per policy, in the order given.
pub fn summarize(policies: &[String], runs: &[RunRecord]) -> Vec<PolicySummary> {
    let by_round = |policy: &str| -> BTreeMap<u32, &VmStats> {
        runs.iter()
            .filter(|r| r.policy == policy)
            .map(|r| (r.round, &r.stats))
            .collect()
    };
    let savings_against = |mine: &BTreeMap<u32, &VmStats>, base: &str| -> Option<Spread> {
        let base = by_round(base);
        if base.is_empty() {
            return None;
        }
        let v: Vec<f64> = mine
            .iter()
            .filter_map(|(round, s)| {
                let b = halted_wakeups(base.get(round)?) as f64;
                (b > 0.0).then(|| 1.0 - halted_wakeups(s) as f64 / b)
            })
            .collect();
        (!v.is_empty()).then(|| Spread::of(v))
    };
    policies
        .iter()
        .map(|policy| {
            let mine = by_round(policy);
            let all: Vec<&VmStats> = mine.values().copied().collect();
            let logs: Vec<(&VmStats, &TimerLogSummary)> = runs
                .iter()
                .filter(|r| &r.policy == policy)
                .filter_map(|r| Some((&r.stats, r.timer_log.as_ref()?)))
                .collect();
            let optimum = (!logs.is_empty())
                .then(|| Spread::of(logs.iter().map(|(_, l)| l.optimum.total as f64).collect()));
            let ratios: Vec<f64> = logs
                .iter()
                .filter(|(_, l)| l.optimum.total > 0)
                .map(|(s, l)| wakeups_less_end(s) as f64 / l.optimum.total as f64)
                .collect();
            let per = |f: &dyn Fn(&VmStats) -> f64| Spread::of(all.iter().map(|s| f(s)).collect());
            let mut exit_kinds: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for s in &all {
                let mut per_run: BTreeMap<&str, u64> = BTreeMap::new();
                for v in &s.vcpus {
                    for (k, n) in &v.exits {
                        *per_run.entry(k).or_default() += n;
                    }
                }
                for (k, n) in per_run {
                    exit_kinds.entry(k.to_owned()).or_default().push(n as f64);
                }
            }
            let mut histogram: BTreeMap<u64, u64> = BTreeMap::new();
            for s in &all {
                for [bound, n] in &s.timers.lateness_ns.histogram {
                    *histogram.entry(*bound).or_default() += n;
                }
            }
            PolicySummary {
                policy: policy.clone(),
                rounds: all.len(),
                host_wakeups: per(&|s| halted_wakeups(s) as f64),
                host_wakeups_per_s: per(&|s| {
                    halted_wakeups(s) as f64 / (s.wall_ns.max(1) as f64 / 1e9)
                }),
                wakeups_per_timer: per(&|s| {
                    halted_wakeups(s) as f64 / s.timers.fired.max(1) as f64
                }),
                kernel_voluntary_switches: per(&|s| {
                    s.vcpus
                        .iter()
                        .map(|v| v.kernel_voluntary_switches)
                        .sum::<u64>() as f64
                }),
                timers_fired: per(&|s| s.timers.fired as f64),
                timers_missed: all.iter().map(|s| s.timers.missed).sum(),
                timers_early: all.iter().map(|s| s.timers.early).sum(),
                remote_expiries: per(&|s| s.timers.remote_expiries as f64),
                lateness_p50_ns: per(&|s| s.timers.lateness_ns.p50 as f64),
                lateness_p99_ns: per(&|s| s.timers.lateness_ns.p99 as f64),
                lateness_max_ns: per(&|s| s.timers.lateness_ns.max as f64),
                cpu_user_ms: per(&|s| s.process_user_ns as f64 / 1e6),
                cpu_system_ms: per(&|s| s.process_system_ns as f64 / 1e6),
                exits: exit_kinds
                    .into_iter()
                    .map(|(k, v)| (k, Spread::of(v).median))
                    .collect(),
                savings_vs_local: (policy != "local")
                    .then(|| savings_against(&mine, "local"))
                    .flatten(),
                savings_vs_kvm_lapic: (policy != "kvm-lapic")
                    .then(|| savings_against(&mine, "kvm-lapic"))
                    .flatten(),
                savings_vs_qemu: (policy != "qemu")
                    .then(|| savings_against(&mine, "qemu"))
                    .flatten(),
                lateness_histogram: histogram.into_iter().map(|(b, n)| [b, n]).collect(),
                host_wakeups_less_end: per(&|s| wakeups_less_end(s) as f64),
                optimum,
                wakeups_per_optimum: (!ratios.is_empty()).then(|| Spread::of(ratios)),
                log_fired_early: logs.iter().map(|(_, l)| l.early).sum(),
                log_fired_after_window: logs.iter().map(|(_, l)| l.after_window).sum(),
                exits_per_fired_timer: spread_of_some(
                    all.iter()
                        .map(|s| s.per_fired_timer.as_ref().map(|p| p.exits)),
                ),
                exits_per_fired_timer_by_reason: by_reason_spreads(&all),
                kvm_exits_per_fired_timer: spread_of_some(
                    all.iter()
                        .map(|s| s.per_fired_timer.as_ref().and_then(|p| p.kvm_exits)),
                ),
                vmm_cpu_us_per_fired_timer: per(&|s| {
                    (s.process_user_ns + s.process_system_ns) as f64
                        / 1e3
                        / s.timers.fired.max(1) as f64
                }),
            }
        })
        .collect()
}

/// The spread of the runs' values, `None` unless every run has one.
/// Every exit reason's per-fired-timer figure over `runs` (0 where a run has none of it); empty if a
/// run has no `per_fired_timer` (nothing fired, or not quietvm's VMM).
fn by_reason_spreads(runs: &[&VmStats]) -> BTreeMap<String, Spread> {
    let Some(per) = runs
        .iter()
        .map(|s| s.per_fired_timer.as_ref())
        .collect::<Option<Vec<_>>>()
        .filter(|v| !v.is_empty())
    else {
        return BTreeMap::new();
    };
    let reasons: std::collections::BTreeSet<&String> =
        per.iter().flat_map(|p| p.exits_by_reason.keys()).collect();
    reasons
        .into_iter()
        .map(|r| {
            let values = per
                .iter()
                .map(|p| p.exits_by_reason.get(r).copied().unwrap_or(0.0))
                .collect();
            (r.clone(), Spread::of(values))
        })
        .collect()
}

fn spread_of_some(values: impl Iterator<Item = Option<f64>>) -> Option<Spread> {
    values
        .collect::<Option<Vec<f64>>>()
        .filter(|v| !v.is_empty())
        .map(Spread::of)
}

/// Flags every vCPU whose quietvm count and kernel count differ by more than 5% (and more than 2).
/// For `qemu` runs, where quietvm sees nothing, the count set against the kernel's is the guest's own
/// count of its halts (docs/qemu.md): each halt that slept is one host wakeup of QEMU's thread.
pub fn cross_check(runs: &[RunRecord]) -> CrossCheck {
    let mut checked = 0;
    let mut flagged = Vec::new();
    for r in runs.iter().filter(|r| r.policy != "kvm-lapic") {
        for v in &r.stats.vcpus {
            checked += 1;
            let ours = if r.policy == "qemu" {
                v.halts
            } else {
                v.host_wakeups
            };
            let kernel = v.kernel_voluntary_switches;
            if disagree(ours, kernel) {
                flagged.push(Disagreement {
                    policy: r.policy.clone(),
                    round: r.round,
                    vcpu: v.index,
                    quietvm: ours,
                    kernel,
                });
            }
        }
    }
    CrossCheck { checked, flagged }
}

/// More than 5% apart, and more than 2 apart (thread start-up and the final stop can each add a
/// switch that is not a halt).
pub fn disagree(ours: u64, kernel: u64) -> bool {
    let diff = ours.abs_diff(kernel);
    diff > 2 && diff as f64 > 0.05 * ours.max(kernel) as f64
}

fn pct(s: &Spread) -> String {
    format!("{:.1}%", s.median * 100.0)
}

fn spread_pct(s: &Spread) -> String {
    format!("spread {:.1}%", s.range() * 100.0)
}

/// The table, the cross-check and the summary lines.
pub fn render(cmp: &Comparison) -> String {
    let mut out = String::new();
    let c = &cmp.config;
    let _ = writeln!(
        out,
        "quietvm compare: {} vCPUs, workload {}, {} ms, {} round(s) per policy (medians; [min-max])",
        c.vcpus, c.workload, c.duration_ms, cmp.repeat
    );
    let _ = writeln!(
        out,
        "{:<10} {:>16} {:>10} {:>9} {:>8} {:>6} {:>6} {:>8} {:>9} {:>9} {:>10} {:>9} {:>9}",
        "policy",
        "host wakeups",
        "/s",
        "/timer",
        "fired",
        "missed",
        "early",
        "remote",
        "lat p50",
        "lat p99",
        "lat max",
        "cpu user",
        "cpu sys"
    );
    for s in &cmp.summary {
        let _ = writeln!(
            out,
            "{:<10} {:>16} {:>10.0} {:>9.3} {:>8.0} {:>6} {:>6} {:>8.0} {:>7.0}us {:>7.0}us {:>8.0}us {:>7.0}ms {:>7.0}ms",
            s.policy,
            format!("{:.0} [{:.0}-{:.0}]", s.host_wakeups.median, s.host_wakeups.min, s.host_wakeups.max),
            s.host_wakeups_per_s.median,
            s.wakeups_per_timer.median,
            s.timers_fired.median,
            s.timers_missed,
            s.timers_early,
            s.remote_expiries.median,
            s.lateness_p50_ns.median / 1e3,
            s.lateness_p99_ns.median / 1e3,
            s.lateness_max_ns.median / 1e3,
            s.cpu_user_ms.median,
            s.cpu_system_ms.median,
        );
    }
    if let Some(o) = &cmp.optimum {
        // The optimum as a row beside the policies: the fewest wakeups that could have served
        // every fired arming in its window, over every run with a timer log.
        let fired = Spread::of(
            cmp.runs
                .iter()
                .filter_map(|r| r.timer_log.as_ref())
                .map(|l| l.fired as f64)
                .collect(),
        );
        let _ = writeln!(
            out,
            "{:<10} {:>16} {:>10} {:>9.3} {:>8.0}",
            "optimum",
            format!("{:.0} [{:.0}-{:.0}]", o.median, o.min, o.max),
            "-",
            o.median / fired.median.max(1.0),
            fired.median,
        );
    }
    let _ = writeln!(out, "VM exits per run, by reason (medians):");
    for s in &cmp.summary {
        let exits: Vec<String> = s.exits.iter().map(|(k, n)| format!("{k} {n:.0}")).collect();
        let exits = if exits.is_empty() {
            "none seen by quietvm (another VMM's)".to_owned()
        } else {
            exits.join(", ")
        };
        let _ = writeln!(out, "  {:<10} {exits}", s.policy);
    }
    let _ = writeln!(
        out,
        "per fired timer (medians): exits that reached quietvm / every exit KVM took / VMM CPU"
    );
    for s in &cmp.summary {
        let or_dash = |x: &Option<Spread>| {
            x.as_ref()
                .map_or("-".to_owned(), |x| format!("{:.2}", x.median))
        };
        let reasons: Vec<String> = s
            .exits_per_fired_timer_by_reason
            .iter()
            .filter(|(_, x)| x.median >= 0.005)
            .map(|(k, x)| format!("{k} {:.2}", x.median))
            .collect();
        let reasons = if reasons.is_empty() {
            String::new()
        } else {
            format!("  ({})", reasons.join(", "))
        };
        let _ = writeln!(
            out,
            "  {:<10} {:>6} / {:>6} / {:.0} us{reasons}",
            s.policy,
            or_dash(&s.exits_per_fired_timer),
            or_dash(&s.kvm_exits_per_fired_timer),
            s.vmm_cpu_us_per_fired_timer.median
        );
    }
    let x = &cmp.cross_check;
    if x.flagged.is_empty() {
        let _ = writeln!(
            out,
            "kernel cross-check: {} vCPU runs, quietvm's wakeup counts agree with the kernel's voluntary context switches within 5%",
            x.checked
        );
    } else {
        let _ = writeln!(
            out,
            "kernel cross-check: {} of {} vCPU runs DISAGREE by more than 5%:",
            x.flagged.len(),
            x.checked
        );
        for d in &x.flagged {
            let _ = writeln!(
                out,
                "  {} round {} vCPU {}: quietvm {} kernel {}",
                d.policy,
                d.round + 1,
                d.vcpu,
                d.quietvm,
                d.kernel
            );
        }
    }
    for s in &cmp.summary {
        if let (Some(r), Some(o)) = (&s.wakeups_per_optimum, &s.optimum) {
            let _ = writeln!(
                out,
                "{}: host wakeups less the VM-end ones {:.0} = {:.2}x the optimum of its own runs ({:.0}) \
                 (K={}, [{:.2}-{:.2}]); timer logs of the {} runs: {} fired early, {} more than 1 ms after their window",
                s.policy,
                s.host_wakeups_less_end.median,
                r.median,
                o.median,
                s.rounds,
                r.min,
                r.max,
                s.rounds,
                s.log_fired_early,
                s.log_fired_after_window
            );
        }
    }
    for s in &cmp.summary {
        for (base, v) in [
            ("local", &s.savings_vs_local),
            ("kvm-lapic", &s.savings_vs_kvm_lapic),
            ("qemu", &s.savings_vs_qemu),
        ] {
            if let Some(v) = v {
                let _ = writeln!(
                    out,
                    "{} saves {} of host wakeups vs {base} (K={}, {})",
                    s.policy,
                    pct(v),
                    s.rounds,
                    spread_pct(v)
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_median_and_range() {
        let s = Spread::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(vec![1.0, 2.0, 3.0, 4.0]).median, 2.5);
        assert_eq!(Spread::of(vec![]), Spread::default());
    }

    /// A run whose vCPUs woke `wakeups[i]` times, of which `end[i]` at the VM's end.
    fn stats(policy: &str, wakeups: &[u64], end: &[u64], fired: u64) -> VmStats {
        use quietvm_vmm::stats::{TimerStats, VcpuStats, WakeupCause};
        let vcpus = wakeups
            .iter()
            .zip(end)
            .enumerate()
            .map(|(i, (&w, &e))| {
                let mut v = VcpuStats::new(i as u32);
                for _ in 0..e {
                    v.count_wakeup(WakeupCause::Control);
                }
                for _ in e..w {
                    v.count_wakeup(WakeupCause::RemoteMovableTimer);
                }
                v.kernel_voluntary_switches = w;
                v
            })
            .collect();
        VmStats {
            policy: policy.to_string(),
            workload: "all-idle".to_string(),
            exit_code: 0,
            outcome: "ok".to_string(),
            wall_ns: 1_000_000_000,
            process_user_ns: 0,
            process_system_ns: 0,
            vcpus,
            timers: TimerStats {
                fired,
                ..TimerStats::default()
            },
            console_dropped_bytes: 0,
            per_fired_timer: None,
            peer: None,
        }
    }

    /// A timer log of `n` movable timers 1 ms apart with `slack` each, fired at their deadlines.
    fn log(n: u64, slack: u64) -> TimerLogSummary {
        let text: String = (0..n)
            .map(|i| {
                let d = 1_000_000 * (i + 1);
                format!(
                    "{{\"owner\":{},\"id\":{i},\"flags\":\"movable\",\"armed_at_ns\":0,\"deadline_ns\":{d},\"slack_ns\":{slack},\"outcome\":\"fired\",\"at_ns\":{d},\"fired_on\":0,\"held\":false}}\n",
                    i % 4
                )
            })
            .collect();
        crate::optimum::timer_log::summarize(text.as_bytes(), std::path::Path::new("t"))
            .expect("sample log parses")
    }

    #[test]
    fn each_run_is_set_against_its_own_optimum_without_the_vm_end_wakeups() {
        let runs = vec![
            // 10 timers 1 ms apart, no slack: optimum 10. local woke 12 + 4 at the end.
            RunRecord {
                policy: "local".into(),
                round: 0,
                stats: stats("local", &[4, 4, 4, 4], &[1, 1, 1, 1], 10),
                timer_log: Some(log(10, 0)),
            },
            // pull, with 2.5 ms slack: windows [1, 3.5], [2, 4.5], ... ms: points at 3.5, 6.5, 9.5
            // and 12.5 ms, optimum 4. It woke 4 + 2 at the end (two vCPUs ran at the VM's end).
            RunRecord {
                policy: "pull".into(),
                round: 0,
                stats: stats("pull", &[4, 2, 0, 0], &[1, 1, 0, 0], 10),
                timer_log: Some(log(10, 2_500_000)),
            },
            RunRecord {
                policy: "kvm-lapic".into(),
                round: 0,
                stats: stats("kvm-lapic", &[5, 5, 5, 5], &[0, 0, 0, 0], 10),
                timer_log: None,
            },
        ];
        let policies = ["local", "pull", "kvm-lapic"].map(String::from);
        let sum = summarize(&policies, &runs);
        assert_eq!(sum[0].host_wakeups.median, 16.0);
        assert_eq!(sum[0].host_wakeups_less_end.median, 12.0);
        assert_eq!(sum[0].optimum.unwrap().median, 10.0);
        assert_eq!(sum[0].wakeups_per_optimum.unwrap().median, 1.2);
        assert_eq!(sum[1].host_wakeups_less_end.median, 4.0);
        assert_eq!(sum[1].optimum.unwrap().median, 4.0);
        assert_eq!(sum[1].wakeups_per_optimum.unwrap().median, 1.0);
        assert!(sum[2].optimum.is_none() && sum[2].wakeups_per_optimum.is_none());
        assert_eq!(sum[2].host_wakeups_less_end.median, 20.0);
        let over = optimum_over_runs(&runs).unwrap();
        assert_eq!((over.min, over.max), (4.0, 10.0));

        let cmp = Comparison {
            config: quietvm_vmm::config::VmConfig::default(),
            repeat: 1,
            runs: runs.clone(),
            summary: sum,
            cross_check: cross_check(&runs),
            optimum: Some(over),
        };
        let text = render(&cmp);
        assert!(text.contains("\noptimum "), "{text}");
        assert!(
            text.contains(
                "pull: host wakeups less the VM-end ones 4 = 1.00x the optimum of its own runs (4)"
            ),
            "{text}"
        );
        assert!(!text.contains("kvm-lapic: host wakeups less"), "{text}");
    }

    #[test]
    fn without_timer_logs_there_is_no_optimum_row() {
        let runs = vec![RunRecord {
            policy: "pull".into(),
            round: 0,
            stats: stats("pull", &[2], &[1], 1),
            timer_log: None,
        }];
        assert!(optimum_over_runs(&runs).is_none());
        let sum = summarize(&["pull".to_string()], &runs);
        assert!(sum[0].optimum.is_none());
    }

    #[test]
    fn disagreement_needs_5_percent_and_more_than_2() {
        assert!(!disagree(0, 2));
        assert!(!disagree(100, 104));
        assert!(disagree(100, 106));
        assert!(disagree(0, 3));
    }
}

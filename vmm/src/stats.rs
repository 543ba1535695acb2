//! Statistics: counted by quietvm while the VM runs, cross-checked against the kernel's own per-thread
//! counters, printed as a table at exit and written as JSON (`--stats-json`, schema in docs/stats.md).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

pub use crate::accounting::{Lateness, WakeupCause};

/// One vCPU's figures.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct VcpuStats {
    pub index: u32,
    /// Kernel thread id of the vCPU thread.
    pub tid: u32,
    /// `HLT` exits.
    pub halts: u64,
    /// Times the halted thread went to sleep and was woken (each one a voluntary context switch).
    pub host_wakeups: u64,
    /// `host_wakeups` by cause (every cause listed, zeros included).
    pub wakeup_causes: BTreeMap<String, u64>,
    /// The kernel's `voluntary_ctxt_switches` for this thread over its run (end minus start), from
    /// `/proc/self/task/TID/status`.
    pub kernel_voluntary_switches: u64,
    /// CPU time the thread used over its run, from `/proc/self/task/TID/schedstat` (field 1).
    #[serde(default)]
    pub kernel_cpu_ns: u64,
    /// Times the thread was scheduled in over its run (schedstat field 3; preemptions included).
    #[serde(default)]
    pub kernel_timeslices: u64,
    /// VM exits by reason.
    pub exits: BTreeMap<String, u64>,
    /// KVM's own counts for this vCPU, from its binary statistics (`KVM_GET_STATS_FD`), read when its
    /// thread ended: the exits that reach quietvm ([`KVM_USERSPACE_EXITS`]) and `exits`, every VM
    /// exit KVM took, those it handled in the kernel included (the `(kvm)` column of the table).
    /// Names as KVM's; a name the kernel lacks is absent. Empty in live figures.
    #[serde(default)]
    pub kvm_exits: BTreeMap<String, u64>,
    /// Timer callbacks handed to this vCPU (`POP`s that returned a timer).
    pub timers_fired: u64,
    /// Of those, timers armed on another vCPU (expired here as migrator or push target).
    pub remote_expiries: u64,
}

/// KVM's statistics for the exits that return to quietvm, with the reasons of [`VcpuStats::exits`]
/// each one counts (by prefix: every `io_*` reason is a port I/O exit). `halt_exits` reaches quietvm
/// only without KVM's in-kernel irqchip.
pub const KVM_USERSPACE_EXITS: [(&str, &str); 5] = [
    ("io_exits", "io_"),
    ("mmio_exits", "mmio"),
    ("halt_exits", "hlt"),
    ("signal_exits", "kick"),
    ("request_irq_exits", "irq_window"),
];

/// KVM's statistic of every VM exit, those it handled in the kernel included.
pub const KVM_ALL_EXITS: &str = "exits";

impl VcpuStats {
    pub fn new(index: u32) -> Self {
        VcpuStats {
            index,
            wakeup_causes: WakeupCause::ALL
                .iter()
                .map(|c| (c.name().to_owned(), 0))
                .collect(),
            ..Default::default()
        }
    }

    /// Makes `self` equal to `other`, reusing `self`'s maps: no allocation once both have the same
    /// keys (a vCPU thread publishes its figures this way at every halt).
    pub fn copy_counts_from(&mut self, other: &VcpuStats) {
        fn copy_map(to: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
            if to.len() > from.len() || from.keys().any(|k| !to.contains_key(k)) {
                to.clone_from(from);
                return;
            }
            for (k, v) in from {
                if let Some(x) = to.get_mut(k) {
                    *x = *v;
                }
            }
        }
        let VcpuStats {
            index,
            tid,
            halts,
            host_wakeups,
            wakeup_causes,
            kernel_voluntary_switches,
            kernel_cpu_ns,
            kernel_timeslices,
            exits,
            kvm_exits,
            timers_fired,
            remote_expiries,
        } = other;
        self.index = *index;
        self.tid = *tid;
        self.halts = *halts;
        self.host_wakeups = *host_wakeups;
        copy_map(&mut self.wakeup_causes, wakeup_causes);
        self.kernel_voluntary_switches = *kernel_voluntary_switches;
        self.kernel_cpu_ns = *kernel_cpu_ns;
        self.kernel_timeslices = *kernel_timeslices;
        copy_map(&mut self.exits, exits);
        copy_map(&mut self.kvm_exits, kvm_exits);
        self.timers_fired = *timers_fired;
        self.remote_expiries = *remote_expiries;
    }

    pub fn count_exit(&mut self, kind: &'static str) {
        match self.exits.get_mut(kind) {
            Some(n) => *n += 1,
            None => {
                self.exits.insert(kind.to_owned(), 1);
            }
        }
    }

    pub fn count_wakeup(&mut self, cause: WakeupCause) {
        self.host_wakeups += 1;
        if let Some(n) = self.wakeup_causes.get_mut(cause.name()) {
            *n += 1;
        }
    }

    /// Wakeups with the given cause.
    pub fn wakeups(&self, cause: WakeupCause) -> u64 {
        self.wakeup_causes.get(cause.name()).copied().unwrap_or(0)
    }

    /// quietvm's exits of the reasons a KVM statistic counts (see [`KVM_USERSPACE_EXITS`]).
    fn own_exits(&self, reason_prefix: &str) -> u64 {
        self.exits
            .iter()
            .filter(|(k, _)| k.starts_with(reason_prefix))
            .map(|(_, v)| v)
            .sum()
    }

    /// Where quietvm's exit counts disagree with KVM's: one line per statistic. Each statistic of
    /// [`KVM_USERSPACE_EXITS`] must equal quietvm's count of its reasons, except one that KVM leaves
    /// at 0 (this host's KVM does not count port or MMIO exits: docs/kvm-host.md); and KVM's `exits`,
    /// every VM exit, can be no fewer than quietvm's exits other than kicks (a kick may end
    /// `KVM_RUN` before the guest is entered). With `halts_in_kernel` (KVM's irqchip), `HLT` never
    /// reaches quietvm and is not compared.
    pub fn kvm_exit_mismatches(&self, halts_in_kernel: bool) -> Vec<String> {
        let mut out: Vec<String> = KVM_USERSPACE_EXITS
            .iter()
            .filter(|(stat, _)| !(halts_in_kernel && *stat == "halt_exits"))
            .filter_map(|(stat, prefix)| {
                let kvm = *self.kvm_exits.get(*stat)?;
                let own = self.own_exits(prefix);
                (kvm != own && kvm != 0).then(|| {
                    format!(
                        "vCPU {}: KVM's {stat} {kvm}, quietvm counted {own}",
                        self.index
                    )
                })
            })
            .collect();
        if let Some(&all) = self.kvm_exits.get(KVM_ALL_EXITS) {
            let own: u64 = self
                .exits
                .iter()
                .filter(|(k, _)| k.as_str() != "kick")
                .map(|(_, v)| v)
                .sum();
            if own > all {
                out.push(format!(
                    "vCPU {}: KVM took {all} exits, quietvm counted {own} besides kicks",
                    self.index
                ));
            }
        }
        out
    }
}

/// The VM's timer figures.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct TimerStats {
    /// Successful `ARM` commands.
    pub armed: u64,
    /// Timers handed to a callback.
    pub fired: u64,
    /// `CANCEL`/`CANCEL_SYNC` that stopped a pending arming.
    pub cancelled: u64,
    /// Fired before the deadline (must be 0).
    pub early: u64,
    /// Fired more than the tolerance (`quietvm_abi::timer::WINDOW_TOLERANCE_NS`) after the end of
    /// their window (`deadline + slack`; slack 0: the deadline) (docs/stats.md).
    #[serde(default)]
    pub late_beyond_window: u64,
    /// Window end (`deadline + slack`) passed, but neither fired nor cancelled when the VM ended.
    pub missed: u64,
    /// Fired on a vCPU other than the one that armed it.
    pub remote_expiries: u64,
    /// Expiries held back because the timer's previous callback was still running.
    pub serialized: u64,
    /// Queue mode (docs/timer-abi.md, "Queue mode"): submission entries read.
    #[serde(default)]
    pub queue_entries: u64,
    /// `SYNC` commands (queue mode's doorbell writes).
    #[serde(default)]
    pub queue_syncs: u64,
    /// Ring indices or entries a guest wrote that made no sense, skipped (its own timers suffer).
    #[serde(default)]
    pub queue_errors: u64,
    pub lateness_ns: Lateness,
    /// Another NUMA node's timers taken by a migrator below the hierarchy's cross-node level (must be
    /// 0; always 0 with one node).
    #[serde(default)]
    pub cross_node_below_crossnode: u64,
    /// The hierarchy's invariants checked when the VM ended: "ok", or what is broken ("" where
    /// quietvm keeps no hierarchy: `kvm-lapic`, and live figures).
    #[serde(default)]
    pub hierarchy_check: String,
}

/// Everything quietvm reports about one run.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VmStats {
    pub policy: String,
    pub workload: String,
    /// quietvm's exit code for the run.
    pub exit_code: i32,
    /// How the VM ended, in words.
    pub outcome: String,
    /// Wall time from the first vCPU start to the VM's end.
    pub wall_ns: u64,
    /// CPU time of the whole quietvm process, from `getrusage`.
    pub process_user_ns: u64,
    pub process_system_ns: u64,
    pub vcpus: Vec<VcpuStats>,
    pub timers: TimerStats,
    /// Console bytes that could not be written to standard output (docs/stats.md).
    #[serde(default)]
    pub console_dropped_bytes: u64,
    /// What one fired timer cost, over the whole run (`None` if no timer fired).
    #[serde(default)]
    pub per_fired_timer: Option<PerFiredTimer>,
    /// Under `--policy qemu` only: the foreign VMM that ran the guest (docs/qemu.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerStats>,
}

/// A run's costs divided by its fired timers: what one timer cost, whichever vCPU paid.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct PerFiredTimer {
    /// Exits that reached quietvm, all vCPUs.
    pub exits: f64,
    /// The same by reason (`VcpuStats::exits`' reasons).
    pub exits_by_reason: BTreeMap<String, f64>,
    /// Every VM exit KVM took, those it handled in the kernel included (`None` without KVM's
    /// statistics): the fair figure beside `kvm-lapic`, whose timer exits never reach quietvm.
    pub kvm_exits: Option<f64>,
    /// CPU time of the whole quietvm process (user + system), in ns.
    pub vmm_cpu_ns: f64,
}

impl PerFiredTimer {
    /// The costs of `vcpus` and the process's CPU time, over `fired` timers (`None` if 0).
    pub fn of(vcpus: &[VcpuStats], process_cpu_ns: u64, fired: u64) -> Option<Self> {
        if fired == 0 {
            return None;
        }
        let per = |n: u64| n as f64 / fired as f64;
        let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
        for v in vcpus {
            for (k, n) in &v.exits {
                *by_reason.entry(k.clone()).or_default() += n;
            }
        }
        let kvm = vcpus
            .iter()
            .map(|v| v.kvm_exits.get(KVM_ALL_EXITS).copied())
            .sum::<Option<u64>>();
        Some(PerFiredTimer {
            exits: per(by_reason.values().sum()),
            exits_by_reason: by_reason.into_iter().map(|(k, n)| (k, per(n))).collect(),
            kvm_exits: kvm.map(per),
            vmm_cpu_ns: per(process_cpu_ns),
        })
    }
}

/// The foreign VMM process of a `--policy qemu` run (docs/qemu.md): how it was started, and what the
/// kernel says it cost. The vCPU and timer figures of such a run are in [`VmStats`] as for kvm-lapic.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct PeerStats {
    /// The exact command line, program first, so that anyone can rerun it.
    pub command: Vec<String>,
    /// Its process id, and its exit status as the kernel gave it.
    pub pid: u32,
    pub exit_status: Option<i32>,
    pub exit_signal: Option<i32>,
    /// Its peak resident set size (`wait4`'s `ru_maxrss`), KiB.
    pub max_rss_kib: u64,
    /// From its start to the guest's first console line.
    pub startup_ns: Option<u64>,
    /// Over what the vCPU threads' counters were taken (docs/qemu.md): `guest_start_to_end` when the
    /// guest's start and end lines came and the threads were read at each before the guest went on;
    /// otherwise a note of what was missing.
    pub counters_read: String,
}

impl VmStats {
    /// True when KVM's in-kernel irqchip handled `HLT` (the `kvm-lapic` baseline): those exits never
    /// reach quietvm.
    pub fn halts_in_kernel(&self) -> bool {
        self.policy == "kvm-lapic"
    }

    /// Where quietvm's exit counts differ from KVM's own (empty: every count confirmed, or KVM's
    /// figures missing).
    pub fn kvm_exit_mismatches(&self) -> Vec<String> {
        self.vcpus
            .iter()
            .flat_map(|v| v.kvm_exit_mismatches(self.halts_in_kernel()))
            .collect()
    }

    /// The short table printed at exit.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "quietvm: {} ({} vCPUs, policy {}, workload {}, {:.1} ms)",
            self.outcome,
            self.vcpus.len(),
            self.policy,
            self.workload,
            self.wall_ns as f64 / 1e6
        );
        let _ = writeln!(
            s,
            "{:>5} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
            "vcpu",
            "halts",
            "wakeups",
            "(kernel)",
            "pinned",
            "movable",
            "remote",
            "fired",
            "exits",
            "(kvm)"
        );
        for v in &self.vcpus {
            let kvm = v
                .kvm_exits
                .get(KVM_ALL_EXITS)
                .map_or_else(|| "-".to_owned(), u64::to_string);
            let _ = writeln!(
                s,
                "{:>5} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
                v.index,
                v.halts,
                v.host_wakeups,
                v.kernel_voluntary_switches,
                v.wakeups(WakeupCause::OwnPinnedTimer),
                v.wakeups(WakeupCause::OwnMovableTimer),
                v.wakeups(WakeupCause::RemoteMovableTimer),
                v.timers_fired,
                v.exits.values().sum::<u64>(),
                kvm
            );
        }
        if let Some(p) = &self.per_fired_timer {
            let reasons: Vec<String> = p
                .exits_by_reason
                .iter()
                .filter(|(_, n)| **n >= 0.005)
                .map(|(k, n)| format!("{k} {n:.2}"))
                .collect();
            let kvm = p
                .kvm_exits
                .map_or_else(String::new, |k| format!(", KVM took {k:.2}"));
            let _ = writeln!(
                s,
                "per fired timer: exits {:.2} ({}){kvm}, VMM CPU {:.1} us",
                p.exits,
                reasons.join(", "),
                p.vmm_cpu_ns / 1e3
            );
        }
        let t = &self.timers;
        let _ = writeln!(
            s,
            "timers: armed {} fired {} cancelled {} early {} late_beyond_window {} missed {} remote {} | lateness p50 {:.1} us p99 {:.1} us max {:.1} us",
            t.armed,
            t.fired,
            t.cancelled,
            t.early,
            t.late_beyond_window,
            t.missed,
            t.remote_expiries,
            t.lateness_ns.p50 as f64 / 1e3,
            t.lateness_ns.p99 as f64 / 1e3,
            t.lateness_ns.max as f64 / 1e3
        );
        s
    }
}

/// Why a JSON file could not be written; one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum WriteJsonError {
    #[error("cannot encode {}: {source}", path.display())]
    Encode {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Writes `value` as pretty JSON (with a final newline) to `path`.
pub fn write_json<T: Serialize>(path: &std::path::Path, value: &T) -> Result<(), WriteJsonError> {
    let json = serde_json::to_string_pretty(value).map_err(|source| WriteJsonError::Encode {
        path: path.to_owned(),
        source,
    })?;
    std::fs::write(path, json + "\n").map_err(|source| WriteJsonError::Write {
        path: path.to_owned(),
        source,
    })
}

/// A thread's own counters, as the kernel keeps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadCounters {
    /// `voluntary_ctxt_switches` from `status`: each time the thread slept.
    pub voluntary_switches: u64,
    /// Field 1 of `schedstat`: CPU time in ns.
    pub cpu_ns: u64,
    /// Field 3 of `schedstat`: times scheduled in.
    pub timeslices: u64,
}

impl ThreadCounters {
    /// Reads thread `tid` of process `pid` from `/proc` (`None` if it is gone or unreadable).
    pub fn read(pid: u32, tid: u32) -> Option<Self> {
        let dir = format!("/proc/{pid}/task/{tid}");
        let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
        let schedstat = std::fs::read_to_string(format!("{dir}/schedstat")).ok()?;
        Self::parse(&status, &schedstat)
    }

    /// The counters from the text of a thread's `status` and `schedstat` files.
    pub fn parse(status: &str, schedstat: &str) -> Option<Self> {
        let voluntary_switches = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())?;
        let mut fields = schedstat.split_whitespace().map(|f| f.parse::<u64>().ok());
        let cpu_ns = fields.next().flatten()?;
        let _wait_ns = fields.next();
        let timeslices = fields.next().flatten()?;
        Some(ThreadCounters {
            voluntary_switches,
            cpu_ns,
            timeslices,
        })
    }

    /// The calling thread's counters.
    pub fn of_this_thread() -> Self {
        Self::read(std::process::id(), crate::sys::os::gettid()).unwrap_or_default()
    }

    /// What changed from `earlier` to `self`.
    pub fn since(&self, earlier: &ThreadCounters) -> ThreadCounters {
        ThreadCounters {
            voluntary_switches: self
                .voluntary_switches
                .saturating_sub(earlier.voluntary_switches),
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            timeslices: self.timeslices.saturating_sub(earlier.timeslices),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn exit_counts_are_checked_against_kvm() {
        let mut v = VcpuStats::new(2);
        for (k, n) in [("io_timer", 10), ("io_serial", 2), ("hlt", 5), ("kick", 1)] {
            v.exits.insert(k.to_owned(), n);
        }
        v.kvm_exits = [
            ("io_exits", 12),
            ("halt_exits", 5),
            ("signal_exits", 1),
            ("exits", 40),
        ]
        .iter()
        .map(|&(k, n)| (k.to_owned(), n))
        .collect();
        assert!(v.kvm_exit_mismatches(false).is_empty());
        // A KVM that leaves io_exits at 0 (this host's) is not contradicted.
        v.kvm_exits.insert("io_exits".into(), 0);
        assert!(v.kvm_exit_mismatches(false).is_empty());
        // A halt quietvm missed, and fewer VM exits than quietvm saw.
        v.kvm_exits.insert("halt_exits".into(), 6);
        v.kvm_exits.insert("exits".into(), 16);
        let m = v.kvm_exit_mismatches(false);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].contains("halt_exits 6, quietvm counted 5"), "{m:?}");
        assert!(
            m[1].contains("KVM took 16 exits, quietvm counted 17"),
            "{m:?}"
        );
        // KVM's irqchip handles HLT: not compared.
        assert_eq!(v.kvm_exit_mismatches(true).len(), 1);
    }

    use super::*;

    #[test]
    fn lateness_percentiles_are_nearest_rank() {
        let of = |v: &[u64]| {
            let mut r = crate::accounting::LatenessRecorder::new();
            v.iter().for_each(|&x| r.record(x));
            r.summary()
        };
        let v: Vec<u64> = (1..=100).collect();
        let l = of(&v);
        assert_eq!((l.p50, l.p99, l.max), (50, 99, 100));
        assert_eq!(l.histogram, vec![[1000, 100]]);
        let l = of(&[500, 1500, 1600, 5000]);
        assert_eq!(
            l.histogram,
            vec![[1000, 1], [2000, 2], [4000, 0], [8000, 1]]
        );
        assert_eq!(of(&[]), Lateness::default());
    }

    #[test]
    fn copying_counts_gives_an_equal_copy() {
        let mut a = VcpuStats::new(3);
        a.count_exit("hlt");
        a.count_wakeup(WakeupCause::Spurious);
        a.halts = 7;
        let mut b = VcpuStats::new(3);
        b.copy_counts_from(&a);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        a.count_exit("hlt");
        a.count_exit("io_timer");
        b.copy_counts_from(&a);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    #[test]
    fn own_thread_counters_are_readable_and_count_sleeps() {
        let before = ThreadCounters::of_this_thread();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let after = ThreadCounters::of_this_thread();
        assert!(after.since(&before).voluntary_switches >= 1);
        assert!(after.cpu_ns > 0);
    }
}

//! Statistics: counted by quietvm while the VM runs, cross-checked against the kernel's own per-thread
//! counters, printed as a table at exit and written as JSON (`--stats-json`, schema in docs/stats.md).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// Why a halted vCPU's thread was woken. Every host wakeup has exactly one cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WakeupCause {
    /// One of its own pinned timers was due.
    OwnPinnedTimer,
    /// One of its own movable timers was due (what `pull` avoids).
    OwnMovableTimer,
    /// It woke, as the last idle vCPU or migrator, to expire other vCPUs' movable timers.
    RemoteMovableTimer,
    /// Another vCPU handed it work (a timer delivery) and kicked it.
    Interrupt,
    /// The hierarchy asked it to re-read its next event.
    MigratorKick,
    /// quietvm itself: the VM is ending, pausing, or being reconfigured.
    Control,
    /// Woken with nothing to do (a stale deadline).
    Spurious,
    /// Under `kvm-lapic`: the vCPU halted in the kernel (in-kernel irqchip), which woke it for its LAPIC
    /// timer or an IPI. quietvm sees none of these halts; the count is the thread's voluntary context
    /// switches.
    KernelHalt,
}

impl WakeupCause {
    pub const ALL: [WakeupCause; 8] = [
        WakeupCause::OwnPinnedTimer,
        WakeupCause::OwnMovableTimer,
        WakeupCause::RemoteMovableTimer,
        WakeupCause::Interrupt,
        WakeupCause::MigratorKick,
        WakeupCause::Control,
        WakeupCause::Spurious,
        WakeupCause::KernelHalt,
    ];

    /// The key used in the JSON statistics.
    pub fn name(self) -> &'static str {
        match self {
            WakeupCause::OwnPinnedTimer => "own_pinned_timer",
            WakeupCause::OwnMovableTimer => "own_movable_timer",
            WakeupCause::RemoteMovableTimer => "remote_movable_timer",
            WakeupCause::Interrupt => "interrupt",
            WakeupCause::MigratorKick => "migrator_kick",
            WakeupCause::Control => "control",
            WakeupCause::Spurious => "spurious",
            WakeupCause::KernelHalt => "kernel_halt",
        }
    }
}

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
    /// Timer callbacks handed to this vCPU (`POP`s that returned a timer).
    pub timers_fired: u64,
    /// Of those, timers armed on another vCPU (expired here as migrator or push target).
    pub remote_expiries: u64,
}

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
}

/// Timer lateness (delivery time minus deadline), in nanoseconds: exact nearest-rank percentiles and
/// a log-scale histogram for plotting.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Lateness {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    /// `[upper_bound_ns, count]` pairs: bucket `i` counts samples in `(bound[i-1], bound[i]]`, with
    /// bounds 1 us, 2 us, 4 us, ... (doubling); empty buckets at the top are left out.
    pub histogram: Vec<[u64; 2]>,
}

impl Lateness {
    /// Percentiles and histogram of `samples`, which it sorts.
    pub fn from_samples(samples: &mut [u64]) -> Self {
        if samples.is_empty() {
            return Lateness::default();
        }
        samples.sort_unstable();
        let rank = |p: f64| {
            samples[((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        let mut histogram: Vec<[u64; 2]> = Vec::new();
        let mut bound = 1_000u64;
        let mut i = 0;
        while i < samples.len() {
            let start = i;
            while i < samples.len() && samples[i] <= bound {
                i += 1;
            }
            histogram.push([bound, (i - start) as u64]);
            bound = bound.saturating_mul(2);
        }
        Lateness {
            p50: rank(0.50),
            p99: rank(0.99),
            max: *samples.last().unwrap_or(&0),
            histogram,
        }
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
    /// Deadline passed, but neither fired nor cancelled when the VM ended.
    pub missed: u64,
    /// Fired on a vCPU other than the one that armed it.
    pub remote_expiries: u64,
    /// Expiries held back because the timer's previous callback was still running.
    pub serialized: u64,
    pub lateness_ns: Lateness,
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
}

impl VmStats {
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
            "{:>5} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9}",
            "vcpu", "halts", "wakeups", "(kernel)", "pinned", "movable", "remote", "fired", "exits"
        );
        for v in &self.vcpus {
            let _ = writeln!(
                s,
                "{:>5} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9}",
                v.index,
                v.halts,
                v.host_wakeups,
                v.kernel_voluntary_switches,
                v.wakeups(WakeupCause::OwnPinnedTimer),
                v.wakeups(WakeupCause::OwnMovableTimer),
                v.wakeups(WakeupCause::RemoteMovableTimer),
                v.timers_fired,
                v.exits.values().sum::<u64>()
            );
        }
        let t = &self.timers;
        let _ = writeln!(
            s,
            "timers: armed {} fired {} cancelled {} early {} missed {} remote {} | lateness p50 {:.1} us p99 {:.1} us max {:.1} us",
            t.armed,
            t.fired,
            t.cancelled,
            t.early,
            t.missed,
            t.remote_expiries,
            t.lateness_ns.p50 as f64 / 1e3,
            t.lateness_ns.p99 as f64 / 1e3,
            t.lateness_ns.max as f64 / 1e3
        );
        s
    }
}

/// Writes `value` as pretty JSON (with a final newline) to `path`; the error is one line for the user.
pub fn write_json<T: Serialize>(path: &std::path::Path, value: &T) -> Result<(), String> {
    let json = serde_json::to_string_pretty(value)
        .map_err(|e| format!("cannot encode {}: {e}", path.display()))?;
    std::fs::write(path, json + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))
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
    use super::*;

    #[test]
    fn lateness_percentiles_are_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).collect();
        let l = Lateness::from_samples(&mut v);
        assert_eq!((l.p50, l.p99, l.max), (50, 99, 100));
        assert_eq!(l.histogram, vec![[1000, 100]]);
        let l = Lateness::from_samples(&mut [500, 1500, 1600, 5000]);
        assert_eq!(
            l.histogram,
            vec![[1000, 1], [2000, 2], [4000, 0], [8000, 1]]
        );
        assert_eq!(Lateness::from_samples(&mut []), Lateness::default());
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

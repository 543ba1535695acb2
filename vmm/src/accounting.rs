//! What a vCPU's timer work counts as, defined once for the VMM, `quietvm simulate` and `quietvm
//! replay`: why a halted vCPU was woken ([`WakeupCause`], decided by [`classify_wakeup`] from what the
//! expiry found and why the thread was kicked), and how late timers fired ([`LatenessRecorder`]).
//!
//! Pure logic: no KVM, no clock. The timer device feeds it on real KVM; the simulator and the replay
//! engine feed it on virtual time, so the three engines cannot drift apart.

use std::fmt;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tmigr::service::{CpuId, Expired, TimerKind};

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

    /// Its position in [`WakeupCause::ALL`], for per-cause counters kept in arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why a vCPU thread was kicked: a set of reasons, each set by whoever kicked it and taken together by
/// the thread (`vm::kicks`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KickReasons(u32);

impl KickReasons {
    pub const NONE: KickReasons = KickReasons(0);
    /// Another vCPU handed this one a timer to run.
    pub const DELIVERY: KickReasons = KickReasons(1);
    /// The hierarchy moved this vCPU's next event earlier (it must re-read it).
    pub const HIERARCHY: KickReasons = KickReasons(2);
    /// The VM is ending.
    pub const STOP: KickReasons = KickReasons(4);
    /// Pause, resume or hotplug: the thread re-reads its control state.
    pub const CONTROL: KickReasons = KickReasons(8);

    /// The raw bits, for an atomic word.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// The reasons in `bits`; unknown bits are dropped.
    pub const fn from_bits_truncate(bits: u32) -> Self {
        KickReasons(bits & 0xf)
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether any reason of `other` is in `self`.
    pub const fn intersects(self, other: KickReasons) -> bool {
        self.0 & other.0 != 0
    }
}

impl std::ops::BitOr for KickReasons {
    type Output = KickReasons;
    fn bitor(self, rhs: KickReasons) -> KickReasons {
        KickReasons(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for KickReasons {
    fn bitor_assign(&mut self, rhs: KickReasons) {
        self.0 |= rhs.0;
    }
}

impl fmt::Display for KickReasons {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (KickReasons::DELIVERY, "delivery"),
            (KickReasons::HIERARCHY, "hierarchy"),
            (KickReasons::STOP, "stop"),
            (KickReasons::CONTROL, "control"),
        ];
        let mut first = true;
        for (r, name) in names {
            if self.intersects(r) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// What one expiry on a vCPU found, by the base each timer was queued on: the vCPU's own pinned and
/// movable timers, and other vCPUs' timers it expired for them (as migrator, last idle vCPU or push
/// target).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpiryCounts {
    pub own_pinned: u32,
    pub own_movable: u32,
    pub remote: u32,
}

impl ExpiryCounts {
    /// Counts timer `e` expired on vCPU `cpu`.
    pub fn count(&mut self, cpu: CpuId, e: &Expired) {
        match (e.owner == cpu, e.kind) {
            (true, TimerKind::Pinned) => self.own_pinned += 1,
            (true, TimerKind::Movable) => self.own_movable += 1,
            (false, _) => self.remote += 1,
        }
    }

    /// The counts of everything in `expired`, expired on `cpu`.
    pub fn of(cpu: CpuId, expired: &[Expired]) -> Self {
        let mut c = ExpiryCounts::default();
        for e in expired {
            c.count(cpu, e);
        }
        c
    }

    pub fn any(&self) -> bool {
        self.own_pinned + self.own_movable + self.remote > 0
    }

    /// The timer cause these counts give a wakeup, if any timer was found: own pinned first (it would
    /// have woken the vCPU under any policy), then own movable (what pull avoids), then remote.
    pub fn timer_cause(&self) -> Option<WakeupCause> {
        if self.own_pinned > 0 {
            Some(WakeupCause::OwnPinnedTimer)
        } else if self.own_movable > 0 {
            Some(WakeupCause::OwnMovableTimer)
        } else if self.remote > 0 {
            Some(WakeupCause::RemoteMovableTimer)
        } else {
            None
        }
    }
}

/// The cause of one host wakeup of a halted vCPU: quietvm's own control first (the VM ends, pauses,
/// or changes), then the timers its expiry found, then work another vCPU handed it, then a hierarchy
/// kick; with none of these it woke for nothing.
pub fn classify_wakeup(
    found: ExpiryCounts,
    reasons: KickReasons,
    handed_work: bool,
) -> WakeupCause {
    if reasons.intersects(KickReasons::STOP | KickReasons::CONTROL) {
        WakeupCause::Control
    } else if let Some(cause) = found.timer_cause() {
        cause
    } else if handed_work || reasons.intersects(KickReasons::DELIVERY) {
        WakeupCause::Interrupt
    } else if reasons.intersects(KickReasons::HIERARCHY) {
        WakeupCause::MigratorKick
    } else {
        WakeupCause::Spurious
    }
}

/// Timer lateness (delivery time minus deadline), in nanoseconds: nearest-rank percentiles and a
/// log-scale histogram for plotting. The summary every engine reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lateness {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    /// `[upper_bound_ns, count]` pairs: bucket `i` counts samples in `(bound[i-1], bound[i]]`, with
    /// bounds 1 us, 2 us, 4 us, ... (doubling); empty buckets at the top are left out. Recorded in
    /// constant memory, each bound is known to 1% (a sample within 1% above a bound may count below
    /// it).
    #[serde(default)]
    pub histogram: Vec<[u64; 2]>,
}

/// The largest lateness a recorder tells apart (60 s); later ones count as 60 s, and `max` says so.
pub const LATENESS_MAX_NS: u64 = 60_000_000_000;
/// Significant decimal digits the recorder keeps: every value is known to within 1% (at most 0.4%
/// once reported as the middle of its bucket).
const LATENESS_DIGITS: u8 = 2;

/// Lateness samples in constant memory: an HDR histogram over 1 ns to 60 s with two significant
/// digits (about 30 KiB), allocated once and never resized, however long the VM runs.
#[derive(Clone)]
pub struct LatenessRecorder {
    hist: Histogram<u64>,
    /// Exact, for `max` (the histogram only knows it to 1%).
    max: u64,
}

impl fmt::Debug for LatenessRecorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatenessRecorder")
            .field("samples", &self.hist.len())
            .field("max", &self.max)
            .finish()
    }
}

impl Default for LatenessRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl LatenessRecorder {
    pub fn new() -> Self {
        let mut hist = Histogram::new_with_bounds(1, LATENESS_MAX_NS, LATENESS_DIGITS)
            .expect("constant histogram bounds are valid");
        // Never grow: a resize would allocate on a vCPU thread mid-run.
        hist.auto(false);
        LatenessRecorder { hist, max: 0 }
    }

    /// Records one lateness. Values past [`LATENESS_MAX_NS`] are clamped (`max` keeps the real one).
    pub fn record(&mut self, ns: u64) {
        self.hist.saturating_record(ns.min(LATENESS_MAX_NS));
        self.max = self.max.max(ns);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Bytes of memory the histogram's counters take (for the docs' memory figures and a test).
    pub fn footprint_bytes(&self) -> usize {
        self.hist.distinct_values() * std::mem::size_of::<u64>()
    }

    /// The nearest-rank `p`-quantile (the sample of rank ceil(p * n)), to within 1%.
    fn rank(&self, p: f64) -> u64 {
        let n = self.hist.len();
        let want = ((p * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0u64;
        for v in self.hist.iter_recorded() {
            seen += v.count_since_last_iteration();
            if seen >= want {
                let at = v.value_iterated_to();
                return self.hist.median_equivalent(at).min(self.max);
            }
        }
        self.max
    }

    /// The summary: p50, p99, max and the doubling histogram from 1 us.
    pub fn summary(&self) -> Lateness {
        if self.hist.is_empty() {
            return Lateness::default();
        }
        // One pass over the recorded values, each into its doubling bucket.
        let mut histogram: Vec<[u64; 2]> = vec![[1_000, 0]];
        for v in self.hist.iter_recorded() {
            let value = self.hist.highest_equivalent(v.value_iterated_to());
            while value > histogram[histogram.len() - 1][0]
                && histogram[histogram.len() - 1][0] < LATENESS_MAX_NS
            {
                let bound = histogram[histogram.len() - 1][0].saturating_mul(2);
                histogram.push([bound, 0]);
            }
            let last = histogram.len() - 1;
            histogram[last][1] += v.count_at_value();
        }
        Lateness {
            p50: self.rank(0.50),
            p99: self.rank(0.99),
            max: self.max,
            histogram,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact_rank(sorted: &[u64], p: f64) -> u64 {
        sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
    }

    #[test]
    fn percentiles_are_within_one_percent_of_the_exact_values() {
        // A lateness-like spread: most around tens of microseconds, a tail to tens of milliseconds.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut samples = Vec::new();
        let mut rec = LatenessRecorder::new();
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = if x.is_multiple_of(100) {
                1_000_000 + x % 30_000_000
            } else {
                5_000 + x % 80_000
            };
            samples.push(v);
            rec.record(v);
        }
        samples.sort_unstable();
        let s = rec.summary();
        for (got, p) in [(s.p50, 0.50), (s.p99, 0.99)] {
            let want = exact_rank(&samples, p);
            let err = (got as f64 - want as f64).abs() / want as f64;
            assert!(err <= 0.01, "p{p}: {got} vs exact {want}");
        }
        assert_eq!(s.max, *samples.last().unwrap());
        assert_eq!(
            s.histogram.iter().map(|b| b[1]).sum::<u64>(),
            samples.len() as u64
        );
    }

    #[test]
    fn memory_is_fixed_and_small_whatever_is_recorded() {
        let mut rec = LatenessRecorder::new();
        let before = rec.footprint_bytes();
        assert!(before < 64 << 10, "{before} bytes");
        for v in [0, 1, 999, 10_u64.pow(9), LATENESS_MAX_NS, u64::MAX] {
            rec.record(v);
        }
        assert_eq!(rec.footprint_bytes(), before);
        assert_eq!(rec.count(), 6);
        assert_eq!(rec.summary().max, u64::MAX);
    }

    #[test]
    fn small_sets_and_the_empty_set() {
        let mut rec = LatenessRecorder::new();
        assert_eq!(rec.summary(), Lateness::default());
        for v in [500, 1500, 1600, 5000] {
            rec.record(v);
        }
        let s = rec.summary();
        assert_eq!((s.p50, s.p99, s.max), (1500, 5000, 5000));
        assert_eq!(
            s.histogram,
            vec![[1000, 1], [2000, 2], [4000, 0], [8000, 1]]
        );
    }

    #[test]
    fn causes_follow_their_order_of_precedence() {
        let pinned = ExpiryCounts {
            own_pinned: 1,
            own_movable: 1,
            remote: 1,
        };
        let remote = ExpiryCounts {
            remote: 2,
            ..Default::default()
        };
        let none = ExpiryCounts::default();
        use KickReasons as K;
        assert_eq!(classify_wakeup(pinned, K::STOP, true), WakeupCause::Control);
        assert_eq!(
            classify_wakeup(pinned, K::DELIVERY, true),
            WakeupCause::OwnPinnedTimer
        );
        assert_eq!(
            classify_wakeup(remote, K::NONE, false),
            WakeupCause::RemoteMovableTimer
        );
        assert_eq!(classify_wakeup(none, K::NONE, true), WakeupCause::Interrupt);
        assert_eq!(
            classify_wakeup(none, K::HIERARCHY, false),
            WakeupCause::MigratorKick
        );
        assert_eq!(classify_wakeup(none, K::NONE, false), WakeupCause::Spurious);
        for (i, c) in WakeupCause::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
        assert_eq!((K::DELIVERY | K::STOP).to_string(), "delivery|stop");
    }
}

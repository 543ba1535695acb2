//! The per-vCPU timer base: a PINNED and a MOVABLE queue (timer.c's
//! `BASE_LOCAL` and `BASE_GLOBAL`).
//!
//! Each queue is a binary min-heap of `(deadline, id, generation)` with lazy
//! deletion, plus a second heap of the same entries by window end
//! (`deadline + slack`: the time to wake for them, "Windows" in the crate docs); a shared per-timer slot table ([`TimerSlots`], indexed by the dense
//! caller-chosen [`TimerId`]) says where each timer is pending and its current
//! generation. Cancel is O(1) (bump the generation), arm is O(log n), and stale
//! heap entries are skipped when they reach the top or purged in bulk once they
//! outnumber the live ones. `benches/base.rs` measures an arm+cancel pair
//! against a `BTreeSet` queue; the heap won at every size we tried (see the
//! crate README for figures).
//!
//! Locking: a [`TimerBase`] is always used under its vCPU's base lock (a
//! `Mutex` in the service). A timer's slot only changes under the lock of the
//! base it is pending on (or, when it is pending nowhere, under the lock of the
//! base that claims it with a compare-and-swap), so while that lock is held the
//! slot is stable.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::sync::{AtomicU32, Ordering};
use crate::types::{CpuId, Expired, Expiry, TimerId, TimerKind, KTIME_MAX};

/// `loc` value of a timer that is pending nowhere.
const LOC_NONE: u32 = u32::MAX;

fn kind_index(kind: TimerKind) -> usize {
    match kind {
        TimerKind::Pinned => 0,
        TimerKind::Movable => 1,
    }
}

fn encode_loc(cpu: CpuId, kind: TimerKind) -> u32 {
    debug_assert!(cpu < (1 << 31));
    (cpu << 1) | kind_index(kind) as u32
}

fn decode_loc(loc: u32) -> Option<(CpuId, TimerKind)> {
    if loc == LOC_NONE {
        return None;
    }
    let kind = if loc & 1 == 0 {
        TimerKind::Pinned
    } else {
        TimerKind::Movable
    };
    Some((loc >> 1, kind))
}

/// Where each timer is pending, and its generation (shared by all bases).
pub struct TimerSlots {
    /// `cpu << 1 | kind`, or `LOC_NONE`.
    loc: Box<[AtomicU32]>,
    /// Bumped each time the timer leaves a queue; a heap entry is live iff it
    /// carries the current generation. (Wraps after 2^32 removals of one timer
    /// while a stale entry of it survives: not a practical concern, and the
    /// bulk purge removes stale entries long before.)
    gen: Box<[AtomicU32]>,
}

impl TimerSlots {
    /// A table for timers `0..max_timers`.
    pub fn new(max_timers: u32) -> Self {
        Self {
            loc: (0..max_timers).map(|_| AtomicU32::new(LOC_NONE)).collect(),
            gen: (0..max_timers).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Number of timer ids.
    pub fn len(&self) -> usize {
        self.loc.len()
    }

    /// True if the table has no ids.
    pub fn is_empty(&self) -> bool {
        self.loc.is_empty()
    }

    /// Where `id` is pending (a racy snapshot unless the named base is locked).
    pub fn location(&self, id: TimerId) -> Option<(CpuId, TimerKind)> {
        decode_loc(self.loc[id as usize].load(Ordering::Acquire))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct Entry {
    deadline: u64,
    id: TimerId,
    gen: u32,
    slack: u64,
}

/// An entry of the window-end heap: `(deadline + slack, id, generation)`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct EndEntry {
    hard: u64,
    id: TimerId,
    gen: u32,
}

#[derive(Default, Debug)]
struct TimerQueue {
    /// By deadline: what is due (`pop_due`).
    heap: BinaryHeap<Reverse<Entry>>,
    /// The same entries by window end: when to wake. With slack 0 everywhere
    /// it mirrors `heap`.
    ends: BinaryHeap<Reverse<EndEntry>>,
    live: usize,
}

impl TimerQueue {
    fn is_live(slots: &TimerSlots, id: TimerId, gen: u32) -> bool {
        slots.gen[id as usize].load(Ordering::Relaxed) == gen
    }

    fn push(&mut self, slots: &TimerSlots, e: Entry) {
        self.heap.push(Reverse(e));
        self.ends.push(Reverse(EndEntry {
            hard: e.deadline.saturating_add(e.slack),
            id: e.id,
            gen: e.gen,
        }));
        self.live += 1;
        // Bulk purge keeps both heaps O(live) even if nothing ever reaches the top.
        if self.heap.len() > 2 * self.live + 64 {
            self.heap
                .retain(|Reverse(e)| Self::is_live(slots, e.id, e.gen));
        }
        if self.ends.len() > 2 * self.live + 64 {
            self.ends
                .retain(|Reverse(e)| Self::is_live(slots, e.id, e.gen));
        }
    }

    /// The live entry with the first deadline, dropping stale ones on the way.
    fn peek(&mut self, slots: &TimerSlots) -> Option<Entry> {
        while let Some(Reverse(e)) = self.heap.peek().copied() {
            if Self::is_live(slots, e.id, e.gen) {
                return Some(e);
            }
            self.heap.pop();
        }
        None
    }

    /// The first window end of a live entry, dropping stale ones on the way.
    fn first_end(&mut self, slots: &TimerSlots) -> u64 {
        while let Some(Reverse(e)) = self.ends.peek().copied() {
            if Self::is_live(slots, e.id, e.gen) {
                return e.hard;
            }
            self.ends.pop();
        }
        KTIME_MAX
    }

    fn clear(&mut self) {
        self.heap.clear();
        self.ends.clear();
        self.live = 0;
    }
}

/// Counters kept under the base lock (free to update).
#[derive(Default, Debug, Clone, Copy)]
pub struct BaseCounters {
    /// Arms queued on this base (new or re-arm).
    pub arms: u64,
    /// Arms that replaced a pending arming (counted on the new base).
    pub rearms: u64,
    /// Cancels that removed a pending timer from this base.
    pub cancels: u64,
    /// Timers of this base expired by its own vCPU.
    pub local_expiries: u64,
    /// Timers of this base expired by another vCPU (pull model).
    pub remote_expiries: u64,
}

/// One vCPU's timers: pinned and movable queues. Use under the base lock.
#[derive(Debug)]
pub struct TimerBase {
    cpu: CpuId,
    queues: [TimerQueue; 2],
    /// Statistics, updated by the service under the lock.
    pub counters: BaseCounters,
}

impl TimerBase {
    /// An empty base for `cpu`.
    pub fn new(cpu: CpuId) -> Self {
        Self {
            cpu,
            queues: Default::default(),
            counters: BaseCounters::default(),
        }
    }

    /// The vCPU owning this base.
    pub fn cpu(&self) -> CpuId {
        self.cpu
    }

    /// Arms `id` on this base for `[deadline, deadline + slack]` (insert, or
    /// move between this base's queues and change its window). Returns `Ok(true)` if it was pending here (re-arm),
    /// `Ok(false)` if it was pending nowhere, and `Err(cpu)` without changing
    /// anything if it is pending on another base `cpu` (the caller must lock
    /// that base and [`cancel`](Self::cancel) it there first).
    pub fn arm(
        &mut self,
        slots: &TimerSlots,
        id: TimerId,
        deadline: u64,
        slack: u64,
        kind: TimerKind,
    ) -> Result<bool, CpuId> {
        let slot = &slots.loc[id as usize];
        let new = encode_loc(self.cpu, kind);
        let was_pending = match decode_loc(slot.load(Ordering::Acquire)) {
            Some((cpu, old_kind)) if cpu == self.cpu => {
                self.remove_live(slots, id, old_kind);
                slot.store(new, Ordering::Release);
                true
            }
            Some((cpu, _)) => return Err(cpu),
            None => {
                // Claim the timer: another base may be claiming it at the same time.
                if let Err(cur) =
                    slot.compare_exchange(LOC_NONE, new, Ordering::AcqRel, Ordering::Acquire)
                {
                    return Err(decode_loc(cur).map_or(self.cpu, |(c, _)| c));
                }
                false
            }
        };
        self.queue(slots, id, deadline, slack, kind);
        Ok(was_pending)
    }

    /// Pushes `id`'s current generation into the `kind` queue (its slot already points here).
    fn queue(
        &mut self,
        slots: &TimerSlots,
        id: TimerId,
        deadline: u64,
        slack: u64,
        kind: TimerKind,
    ) {
        let gen = slots.gen[id as usize].load(Ordering::Relaxed);
        self.queues[kind_index(kind)].push(
            slots,
            Entry {
                deadline,
                id,
                gen,
                slack,
            },
        );
    }

    /// Removes `id` if it is pending on this base; true if it was.
    pub fn cancel(&mut self, slots: &TimerSlots, id: TimerId) -> bool {
        match decode_loc(slots.loc[id as usize].load(Ordering::Acquire)) {
            Some((cpu, kind)) if cpu == self.cpu => {
                self.remove_live(slots, id, kind);
                slots.loc[id as usize].store(LOC_NONE, Ordering::Release);
                true
            }
            _ => false,
        }
    }

    fn remove_live(&mut self, slots: &TimerSlots, id: TimerId, kind: TimerKind) {
        slots.gen[id as usize].fetch_add(1, Ordering::Relaxed);
        self.queues[kind_index(kind)].live -= 1;
    }

    /// When the `kind` queue needs a wake-up: its first window end, `KTIME_MAX`
    /// if empty.
    pub fn first(&mut self, slots: &TimerSlots, kind: TimerKind) -> u64 {
        self.queues[kind_index(kind)].first_end(slots)
    }

    /// The `kind` queue's earliest window end and earliest deadline.
    pub fn expiry(&mut self, slots: &TimerSlots, kind: TimerKind) -> Expiry {
        let q = &mut self.queues[kind_index(kind)];
        Expiry {
            hard: q.first_end(slots),
            soft: q.peek(slots).map_or(KTIME_MAX, |e| e.deadline),
        }
    }

    /// The movable event the hierarchy must know about when this vCPU idles
    /// (timer.c's `tevt.global`): the movable queue's expiry if its window
    /// end comes before the pinned queue's, else none (the vCPU wakes for its
    /// pinned timer first, expires the movable ones whose deadline passed,
    /// and reports the rest when it idles again).
    pub fn global_event(&mut self, slots: &TimerSlots) -> Expiry {
        let local = self.first(slots, TimerKind::Pinned);
        let global = self.expiry(slots, TimerKind::Movable);
        if global.hard < local {
            global
        } else {
            Expiry::NONE
        }
    }

    /// Pops every `kind` timer with `deadline <= now` (its window is open)
    /// into `out`; returns how many.
    pub fn pop_due(
        &mut self,
        slots: &TimerSlots,
        kind: TimerKind,
        now: u64,
        out: &mut Vec<Expired>,
    ) -> usize {
        let mut n = 0;
        let q = kind_index(kind);
        while let Some(e) = self.queues[q].peek(slots) {
            if e.deadline > now {
                break;
            }
            self.queues[q].heap.pop();
            self.remove_live(slots, e.id, kind);
            slots.loc[e.id as usize].store(LOC_NONE, Ordering::Release);
            out.push(Expired {
                id: e.id,
                owner: self.cpu,
                deadline: e.deadline,
                slack: e.slack,
                kind,
            });
            n += 1;
        }
        n
    }

    /// Removes every pending timer (for hotplug migration): `(id, deadline,
    /// slack, kind)`, sorted by deadline. The slots keep pointing at this base: the
    /// caller, holding this base's lock and the destination's, must
    /// [`insert_taken`](Self::insert_taken) each one (a timer never passes
    /// through "pending nowhere", so no concurrent arm can claim it).
    pub fn take_all(&mut self, slots: &TimerSlots) -> Vec<(TimerId, u64, u64, TimerKind)> {
        let mut v = Vec::new();
        for kind in [TimerKind::Pinned, TimerKind::Movable] {
            let q = &mut self.queues[kind_index(kind)];
            for Reverse(e) in std::mem::take(&mut q.heap) {
                if TimerQueue::is_live(slots, e.id, e.gen) {
                    slots.gen[e.id as usize].fetch_add(1, Ordering::Relaxed);
                    v.push((e.id, e.deadline, e.slack, kind));
                }
            }
            q.clear();
        }
        v.sort_unstable_by_key(|&(id, d, _, _)| (d, id));
        v
    }

    /// Removes `id` from this base, leaving its slot pointing here (see
    /// [`take_all`](Self::take_all)); its kind if it was pending here.
    pub fn take(&mut self, slots: &TimerSlots, id: TimerId) -> Option<TimerKind> {
        match decode_loc(slots.loc[id as usize].load(Ordering::Acquire)) {
            Some((cpu, kind)) if cpu == self.cpu => {
                self.remove_live(slots, id, kind);
                Some(kind)
            }
            _ => None,
        }
    }

    /// Queues a timer taken from another base whose lock the caller holds.
    pub fn insert_taken(
        &mut self,
        slots: &TimerSlots,
        id: TimerId,
        deadline: u64,
        slack: u64,
        kind: TimerKind,
    ) {
        slots.loc[id as usize].store(encode_loc(self.cpu, kind), Ordering::Release);
        self.queue(slots, id, deadline, slack, kind);
    }

    /// Number of pending timers of `kind`.
    pub fn len(&self, kind: TimerKind) -> usize {
        self.queues[kind_index(kind)].live
    }

    /// True if no timer is pending on this base.
    pub fn is_empty(&self) -> bool {
        self.queues.iter().all(|q| q.live == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TimerKind::*;

    #[test]
    fn arm_cancel_first_pop() {
        let slots = TimerSlots::new(16);
        let mut b = TimerBase::new(3);
        assert_eq!(b.arm(&slots, 1, 100, 0, Pinned), Ok(false));
        assert_eq!(b.arm(&slots, 2, 50, 0, Movable), Ok(false));
        assert_eq!(b.arm(&slots, 3, 70, 0, Movable), Ok(false));
        assert_eq!(b.first(&slots, Pinned), 100);
        assert_eq!(b.first(&slots, Movable), 50);
        assert_eq!(b.global_event(&slots), Expiry { hard: 50, soft: 50 });
        assert!(b.cancel(&slots, 2));
        assert!(!b.cancel(&slots, 2));
        assert_eq!(b.first(&slots, Movable), 70);
        // Re-arm moves between queues.
        assert_eq!(b.arm(&slots, 3, 200, 0, Pinned), Ok(true));
        assert_eq!(b.first(&slots, Movable), KTIME_MAX);
        assert_eq!(b.global_event(&slots), Expiry::NONE);
        assert_eq!(slots.location(3), Some((3, Pinned)));
        let mut out = vec![];
        assert_eq!(b.pop_due(&slots, Pinned, 150, &mut out), 1);
        assert_eq!(out[0].id, 1);
        assert_eq!(out[0].owner, 3);
        assert_eq!(slots.location(1), None);
        assert_eq!(b.len(Pinned), 1);
    }

    #[test]
    fn pinned_first_hides_global_event() {
        let slots = TimerSlots::new(4);
        let mut b = TimerBase::new(0);
        b.arm(&slots, 0, 10, 0, Pinned).unwrap();
        b.arm(&slots, 1, 10, 0, Movable).unwrap();
        assert_eq!(b.global_event(&slots), Expiry::NONE);
    }

    #[test]
    fn arm_refuses_timer_pending_elsewhere() {
        let slots = TimerSlots::new(4);
        let mut a = TimerBase::new(0);
        let mut b = TimerBase::new(1);
        a.arm(&slots, 2, 10, 0, Movable).unwrap();
        assert_eq!(b.arm(&slots, 2, 20, 0, Movable), Err(0));
        assert!(!b.cancel(&slots, 2));
        assert!(a.cancel(&slots, 2));
        assert_eq!(b.arm(&slots, 2, 20, 0, Movable), Ok(false));
    }

    #[test]
    fn lazy_deletion_stays_bounded() {
        let slots = TimerSlots::new(8);
        let mut b = TimerBase::new(0);
        for i in 0..100_000u64 {
            b.arm(&slots, (i % 8) as u32, 1000 + i, 0, Movable).unwrap();
            b.cancel(&slots, ((i + 3) % 8) as u32);
        }
        assert!(b.queues[1].heap.len() <= 2 * b.queues[1].live + 65);
        assert!(b.queues[1].ends.len() <= 2 * b.queues[1].live + 65);
    }

    #[test]
    fn take_all_and_insert_taken_move_timers_between_bases() {
        let slots = TimerSlots::new(8);
        let mut a = TimerBase::new(0);
        let mut b = TimerBase::new(1);
        a.arm(&slots, 1, 30, 0, Movable).unwrap();
        a.arm(&slots, 2, 10, 0, Pinned).unwrap();
        a.arm(&slots, 3, 20, 0, Movable).unwrap();
        a.cancel(&slots, 3);
        let taken = a.take_all(&slots);
        assert_eq!(taken, vec![(2, 10, 0, Pinned), (1, 30, 0, Movable)]);
        assert!(a.is_empty());
        for (id, d, sl, k) in taken {
            b.insert_taken(&slots, id, d, sl, k);
        }
        assert_eq!(slots.location(1), Some((1, Movable)));
        assert_eq!(b.first(&slots, Pinned), 10);
        assert_eq!(b.take(&slots, 1), Some(Movable));
        b.insert_taken(&slots, 1, 5, 0, Pinned);
        assert_eq!(b.first(&slots, Pinned), 5);
        assert_eq!(b.first(&slots, Movable), KTIME_MAX);
    }

    #[test]
    fn windows_wake_at_the_first_end_and_pop_what_has_started() {
        let slots = TimerSlots::new(8);
        let mut b = TimerBase::new(0);
        // [100, 200], [150, 160], [300, 300]
        b.arm(&slots, 0, 100, 100, Movable).unwrap();
        b.arm(&slots, 1, 150, 10, Movable).unwrap();
        b.arm(&slots, 2, 300, 0, Movable).unwrap();
        assert_eq!(
            b.expiry(&slots, Movable),
            Expiry {
                hard: 160,
                soft: 100
            }
        );
        assert_eq!(
            b.global_event(&slots),
            Expiry {
                hard: 160,
                soft: 100
            }
        );
        // A pinned timer that ends earlier hides the movable event.
        b.arm(&slots, 3, 155, 0, Pinned).unwrap();
        assert_eq!(b.global_event(&slots), Expiry::NONE);
        assert!(b.cancel(&slots, 3));
        // Woken at 160: both started windows go, the later one stays.
        let mut out = vec![];
        assert_eq!(b.pop_due(&slots, Movable, 160, &mut out), 2);
        assert_eq!(
            out.iter()
                .map(|e| (e.id, e.deadline, e.slack))
                .collect::<Vec<_>>(),
            vec![(0, 100, 100), (1, 150, 10)]
        );
        assert_eq!(
            b.expiry(&slots, Movable),
            Expiry {
                hard: 300,
                soft: 300
            }
        );
        // A cancelled timer leaves the end heap too.
        assert!(b.cancel(&slots, 2));
        assert_eq!(b.expiry(&slots, Movable), Expiry::NONE);
        // Saturating end.
        b.arm(&slots, 4, KTIME_MAX - 1, 10, Movable).unwrap();
        assert_eq!(b.first(&slots, Movable), KTIME_MAX);
    }
}

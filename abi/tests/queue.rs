//! The pure protocol of queue mode (`quietvm_abi::queue`): every state-word transition, on well-formed
//! and hostile words, `update` and `expire` against cells that win, lose and refuse, the shared clock
//! and the ring arithmetic. The concurrent interleavings are `loom_queue.rs`'s.

use core::cell::Cell;
use core::sync::atomic::AtomicU64;

use proptest::prelude::*;
use quietvm_abi::queue::{
    clock_ns, expire, ns_per_tick_q32, ring_len, update, Expiry, State, StateCell, Update,
    CAS_TRIES, STATE_CPU_SHIFT, STATE_GEN_MASK, STATE_HELD, STATE_PENDING, STATE_RUNNING,
};
use quietvm_abi::timer::{DEADLOCK, OK, RUNNING};

const CPU_MASK: u64 = 0xffff << STATE_CPU_SHIFT;
/// Bits 35-47: 0 in every word a transition writes from a well-formed one.
const ZERO_BITS: u64 = !(STATE_GEN_MASK | STATE_PENDING | STATE_RUNNING | STATE_HELD | CPU_MASK);

fn pending(gen: u32) -> State {
    State(STATE_PENDING | u64::from(gen))
}

fn running(cpu: u16, gen: u32) -> State {
    State(STATE_RUNNING | (u64::from(cpu) << STATE_CPU_SHIFT) | u64::from(gen))
}

// ---- Decoding ---------------------------------------------------------------------------------------

#[test]
fn decode() {
    let idle = State::default();
    assert_eq!(
        (idle.gen(), idle.pending(), idle.running(), idle.held()),
        (0, false, false, false)
    );
    assert_eq!(idle.running_on(), None);

    let w = State(running(3, 7).0 | STATE_PENDING | STATE_HELD);
    assert_eq!(
        (w.gen(), w.pending(), w.running(), w.held()),
        (7, true, true, true)
    );
    assert_eq!(w.running_on(), Some(3));

    // A cpu field without RUNNING names no vCPU.
    assert_eq!(State(CPU_MASK | 5).running_on(), None);
    // Every bit set: all flags, generation u32::MAX, cpu 0xffff (beyond any vCPU).
    let all = State(u64::MAX);
    assert_eq!(
        (all.gen(), all.pending(), all.running(), all.held()),
        (u32::MAX, true, true, true)
    );
    assert_eq!(all.running_on(), Some(0xffff));
}

// ---- ARM and CANCEL ---------------------------------------------------------------------------------

#[test]
fn armed() {
    assert_eq!(State(0).armed(), pending(1));
    // A re-arm: the next generation, still pending.
    assert_eq!(pending(1).armed(), pending(2));
    // A cancelled timer armed again.
    assert_eq!(State(2).armed(), pending(3));
    // Armed in its callback: RUNNING and its cpu stay, and so does a (now stale) HELD.
    let w = State(running(4, 9).0 | STATE_PENDING | STATE_HELD);
    assert_eq!(w.armed(), State(w.0 + 1));
    assert_eq!(
        running(4, 9).armed(),
        State(running(4, 10).0 | STATE_PENDING)
    );
    // The generation wraps at 2^32 without carrying into PENDING or anything above.
    assert_eq!(State(STATE_GEN_MASK).armed(), pending(0));
    assert_eq!(pending(u32::MAX).armed(), pending(0));
    assert_eq!(State(u64::MAX).armed(), State(!STATE_GEN_MASK));
}

#[test]
fn cancelled() {
    assert_eq!(State(0).cancelled(), State(1));
    assert_eq!(pending(1).cancelled(), State(2));
    // Cancelled in its callback: RUNNING, its cpu and HELD stay; the generation moves on.
    let w = State(running(4, 9).0 | STATE_PENDING | STATE_HELD);
    assert_eq!(w.cancelled(), State(running(4, 10).0 | STATE_HELD));
    // Wrap.
    assert_eq!(pending(u32::MAX).cancelled(), State(0));
    assert_eq!(State(STATE_GEN_MASK).cancelled(), State(0));
    assert_eq!(
        State(u64::MAX).cancelled(),
        State(!STATE_GEN_MASK & !STATE_PENDING)
    );
}

/// The `value` of ARM and CANCEL is the old word's PENDING, and each answers for the arming its
/// generation names.
#[test]
fn arm_cancel_sequence_counts_generations() {
    let mut w = State(u64::from(u32::MAX - 2));
    let mut values = Vec::new();
    for op in ["arm", "arm", "cancel", "cancel", "arm", "cancel"] {
        let old = w;
        w = if op == "arm" {
            w.armed()
        } else {
            w.cancelled()
        };
        assert_eq!(w.gen(), old.gen().wrapping_add(1));
        values.push(u32::from(old.pending()));
    }
    assert_eq!(values, [0, 1, 1, 0, 0, 1]);
    assert_eq!(w, State(u64::from(3u32)));
}

// ---- Hand-over, hold, end of a callback -----------------------------------------------------------

#[test]
fn handed_over() {
    // The live arming, no callback running: it runs on `cpu` from now, not pending, not held.
    assert_eq!(pending(5).handed_over(5, 2), Some(running(2, 5)));
    assert_eq!(pending(5).handed_over(5, 0xffff), Some(running(0xffff, 5)));
    assert_eq!(
        pending(u32::MAX).handed_over(u32::MAX, 1),
        Some(running(1, u32::MAX))
    );
    // Stale: cancelled (not pending), re-armed (another generation), or never armed.
    assert_eq!(State(6).handed_over(5, 2), None);
    assert_eq!(State(5).handed_over(5, 2), None);
    assert_eq!(pending(6).handed_over(5, 2), None);
    assert_eq!(pending(0).handed_over(u32::MAX, 2), None);
    assert_eq!(State(0).handed_over(0, 0), None);
    // A callback runs: hold it instead, on any vCPU, also on the one it would go to.
    let w = State(running(2, 5).0 | STATE_PENDING);
    assert_eq!(w.handed_over(5, 2), None);
    assert_eq!(w.handed_over(5, 3), None);
    // A stale HELD left on a pending, not running word (only a guest writes that): handed over, the
    // word cleaned.
    assert_eq!(
        State(pending(5).0 | STATE_HELD).handed_over(5, 1),
        Some(running(1, 5))
    );
    // Garbage in bits 35-47 and a cpu field without RUNNING are dropped by the hand-over.
    assert_eq!(
        State(pending(5).0 | ZERO_BITS | CPU_MASK).handed_over(5, 1),
        Some(running(1, 5))
    );
    // Every bit set: RUNNING, so never handed over.
    assert_eq!(State(u64::MAX).handed_over(u32::MAX, 0), None);
}

#[test]
fn held_back() {
    let w = State(running(2, 5).0 | STATE_PENDING);
    assert_eq!(w.held_back(5), Some(State(w.0 | STATE_HELD)));
    // Idempotent: held twice is held.
    assert_eq!(
        State(w.0 | STATE_HELD).held_back(5),
        Some(State(w.0 | STATE_HELD))
    );
    // Stale, or no callback runs any more (hand it over instead).
    assert_eq!(w.held_back(4), None);
    assert_eq!(State(running(2, 5).0).held_back(5), None);
    assert_eq!(pending(5).held_back(5), None);
    // Every bit set: pending gen u32::MAX behind a callback on cpu 0xffff.
    assert_eq!(State(u64::MAX).held_back(u32::MAX), Some(State(u64::MAX)));
    assert_eq!(State(u64::MAX).held_back(0), None);
}

#[test]
fn callback_ended() {
    assert_eq!(running(2, 5).callback_ended(2), Some(State(5)));
    // Re-armed during the callback and held: PENDING and the generation stay; RUNNING, HELD, cpu go.
    let w = State(running(2, 5).0 | STATE_PENDING | STATE_HELD);
    assert_eq!(w.callback_ended(2), Some(pending(5)));
    // Not this vCPU's callback, or none runs.
    assert_eq!(w.callback_ended(1), None);
    assert_eq!(w.callback_ended(3), None);
    assert_eq!(pending(5).callback_ended(0), None);
    assert_eq!(State(0).callback_ended(0), None);
    // A cpu field without RUNNING names no vCPU: nobody ends a callback there.
    assert_eq!(State(CPU_MASK).callback_ended(0xffff), None);
    // A word that names a cpu beyond any vCPU: no real vCPU matches it.
    let far = running(0xffff, 1);
    for cpu in [0, 1, 2, 255, 4095] {
        assert_eq!(far.callback_ended(cpu), None);
    }
    // Every bit set: only "cpu 0xffff" ends it; the garbage bits 35-47 stay (nothing adds them).
    assert_eq!(State(u64::MAX).callback_ended(0), None);
    assert_eq!(
        State(u64::MAX).callback_ended(0xffff),
        Some(State(!(STATE_RUNNING | STATE_HELD | CPU_MASK)))
    );
}

#[test]
fn cancel_sync_status() {
    assert_eq!(State(5).cancel_sync_status(0), OK);
    assert_eq!(pending(5).cancelled().cancel_sync_status(0), OK);
    assert_eq!(running(2, 5).cancel_sync_status(2), DEADLOCK);
    assert_eq!(running(2, 5).cancel_sync_status(3), RUNNING);
    assert_eq!(running(0, 5).cancel_sync_status(1), RUNNING);
    // A cpu beyond any vCPU: running elsewhere, never a deadlock of a real vCPU.
    assert_eq!(running(0xffff, 5).cancel_sync_status(0), RUNNING);
    assert_eq!(State(u64::MAX).cancel_sync_status(7), RUNNING);
    // A cpu field without RUNNING: nothing runs.
    assert_eq!(State(CPU_MASK | 5).cancel_sync_status(0xffff), OK);
}

// ---- update and expire ------------------------------------------------------------------------------

/// A cell every compare-and-swap of which loses: another writer always got there first, and wrote
/// `theirs(word)`.
struct AlwaysLoses {
    word: Cell<u64>,
    cas: Cell<u32>,
    theirs: fn(u64) -> u64,
}

impl AlwaysLoses {
    /// The other writer: CANCEL and ARM, pending again, next generation but one.
    fn new(word: u64) -> Self {
        Self::with(word, |w| State(w).cancelled().armed().0)
    }

    fn with(word: u64, theirs: fn(u64) -> u64) -> Self {
        AlwaysLoses {
            word: Cell::new(word),
            cas: Cell::new(0),
            theirs,
        }
    }
}

impl StateCell for AlwaysLoses {
    fn load(&self) -> u64 {
        self.word.get()
    }
    fn compare_exchange(&self, _current: u64, _new: u64) -> Result<(), u64> {
        self.cas.set(self.cas.get() + 1);
        self.word.set((self.theirs)(self.word.get()));
        Err(self.word.get())
    }
}

/// A cell that loses its first `losses` compare-and-swaps to a writer that sets `theirs`.
struct LosesThenWins {
    word: Cell<u64>,
    losses: Cell<u32>,
    theirs: u64,
}

impl StateCell for LosesThenWins {
    fn load(&self) -> u64 {
        self.word.get()
    }
    fn compare_exchange(&self, current: u64, new: u64) -> Result<(), u64> {
        if self.losses.get() > 0 {
            self.losses.set(self.losses.get() - 1);
            self.word.set(self.theirs);
            return Err(self.theirs);
        }
        if self.word.get() != current {
            return Err(self.word.get());
        }
        self.word.set(new);
        Ok(())
    }
}

#[test]
fn update_done() {
    let cell = AtomicU64::new(pending(4).0);
    assert_eq!(
        update(&cell, CAS_TRIES, |s| Some(s.armed())),
        Update::Done(pending(4), pending(5))
    );
    assert_eq!(StateCell::load(&cell), pending(5).0);
}

#[test]
fn update_refused_writes_nothing() {
    let cell = AtomicU64::new(pending(4).0);
    let mut calls = 0;
    let r = update(&cell, CAS_TRIES, |s| {
        calls += 1;
        s.callback_ended(0)
    });
    assert_eq!(r, Update::Refused(pending(4)));
    assert_eq!(calls, 1);
    assert_eq!(StateCell::load(&cell), pending(4).0);
}

#[test]
fn update_contended_after_tries() {
    for tries in [1, 2, 7, CAS_TRIES] {
        let cell = AlwaysLoses::new(pending(4).0);
        let mut calls = 0;
        let r = update(&cell, tries, |s| {
            calls += 1;
            Some(s.armed())
        });
        assert_eq!(r, Update::Contended, "tries {tries}");
        assert_eq!(cell.cas.get(), tries, "one CAS per try");
        assert_eq!(calls, tries, "one transition per try");
    }
    // No tries: nothing attempted.
    let cell = AlwaysLoses::new(0);
    assert_eq!(update(&cell, 0, |s| Some(s.armed())), Update::Contended);
    assert_eq!(cell.cas.get(), 0);
}

#[test]
fn update_retries_on_the_word_it_lost_to() {
    // The first CAS loses to a CANCEL; the transition is applied again to what the cell returned.
    let cell = LosesThenWins {
        word: Cell::new(pending(4).0),
        losses: Cell::new(1),
        theirs: State(5).0,
    };
    let mut seen = Vec::new();
    let r = update(&cell, CAS_TRIES, |s| {
        seen.push(s);
        Some(s.armed())
    });
    assert_eq!(seen, [pending(4), State(5)]);
    assert_eq!(r, Update::Done(State(5), pending(6)));
    assert_eq!(cell.word.get(), pending(6).0);
    // A retry may be refused: the word it lost to no longer allows the transition.
    let cell = LosesThenWins {
        word: Cell::new(running(1, 4).0),
        losses: Cell::new(1),
        theirs: State(4).0,
    };
    assert_eq!(
        update(&cell, CAS_TRIES, |s| s.callback_ended(1)),
        Update::Refused(State(4))
    );
    assert_eq!(cell.word.get(), State(4).0);
    // It wins on the last try, not one later.
    let cell = LosesThenWins {
        word: Cell::new(0),
        losses: Cell::new(2),
        theirs: 0,
    };
    assert_eq!(
        update(&cell, 3, |s| Some(s.armed())),
        Update::Done(State(0), pending(1))
    );
    let cell = LosesThenWins {
        word: Cell::new(0),
        losses: Cell::new(3),
        theirs: 0,
    };
    assert_eq!(update(&cell, 3, |s| Some(s.armed())), Update::Contended);
    assert_eq!(cell.word.get(), 0);
}

#[test]
fn expire_outcomes() {
    // Handed over: the word runs on the vCPU now.
    let cell = AtomicU64::new(pending(8).0);
    assert_eq!(expire(&cell, 8, 3, CAS_TRIES), Expiry::HandedOver);
    assert_eq!(StateCell::load(&cell), running(3, 8).0);
    // Expired a second time (a duplicate): stale, the word untouched.
    assert_eq!(expire(&cell, 8, 3, CAS_TRIES), Expiry::Stale);
    assert_eq!(StateCell::load(&cell), running(3, 8).0);

    // Held behind the running callback; held again is still held; after the callback ends, handed
    // over.
    let w = State(running(1, 8).0 | STATE_PENDING);
    let cell = AtomicU64::new(w.0);
    assert_eq!(expire(&cell, 8, 2, CAS_TRIES), Expiry::Held);
    assert_eq!(StateCell::load(&cell), w.0 | STATE_HELD);
    assert_eq!(expire(&cell, 8, 2, CAS_TRIES), Expiry::Held);
    let Update::Done(old, _) = update(&cell, CAS_TRIES, |s| s.callback_ended(1)) else {
        panic!("the callback ends")
    };
    assert!(old.held(), "the end of the callback sees HELD and syncs");
    assert_eq!(expire(&cell, 8, 2, CAS_TRIES), Expiry::HandedOver);
    assert_eq!(StateCell::load(&cell), running(2, 8).0);

    // Stale: cancelled, re-armed, never armed, a generation from before the wrap.
    for (word, gen) in [
        (State(9), 8),
        (pending(9), 8),
        (State(0), 0),
        (pending(0), u32::MAX),
        (State(running(1, 9).0 | STATE_PENDING), 8),
    ] {
        let cell = AtomicU64::new(word.0);
        assert_eq!(expire(&cell, gen, 2, CAS_TRIES), Expiry::Stale, "{word:?}");
        assert_eq!(
            StateCell::load(&cell),
            word.0,
            "a stale expiry writes nothing"
        );
    }

    // Contended: a guest flips a reserved bit in a loop, so the arming stays live but every CAS
    // loses: dropped as stale after `tries`, nothing written by quietvm.
    let cell = AlwaysLoses::with(pending(8).0, |w| w ^ (1 << 40));
    assert_eq!(expire(&cell, 8, 2, 5), Expiry::Stale);
    assert_eq!(cell.cas.get(), 5);
    let cell = AlwaysLoses::with(pending(8).0, |w| w ^ (1 << 40));
    assert_eq!(expire(&cell, 8, 2, CAS_TRIES), Expiry::Stale);
    assert_eq!(cell.cas.get(), CAS_TRIES);
    // A writer that moves the generation on: stale at once, after one lost CAS.
    let cell = AlwaysLoses::new(pending(8).0);
    assert_eq!(expire(&cell, 8, 2, 5), Expiry::Stale);
    assert_eq!(cell.cas.get(), 1);

    // The hold is decided on the word the CAS wins on: the first try finds the callback running, the
    // CAS loses to its end, and the retry hands over.
    let cell = LosesThenWins {
        word: Cell::new(State(running(1, 8).0 | STATE_PENDING).0),
        losses: Cell::new(1),
        theirs: pending(8).0,
    };
    assert_eq!(expire(&cell, 8, 2, CAS_TRIES), Expiry::HandedOver);
    assert_eq!(cell.word.get(), running(2, 8).0);
    // And the other way round: it would hand over, loses to a re-arm in a callback of... the same
    // generation can only be written by a guest, but the retry decides on it: held.
    let cell = LosesThenWins {
        word: Cell::new(pending(8).0),
        losses: Cell::new(1),
        theirs: State(running(0, 8).0 | STATE_PENDING).0,
    };
    assert_eq!(expire(&cell, 8, 2, CAS_TRIES), Expiry::Held);
    assert_eq!(
        cell.word.get(),
        running(0, 8).0 | STATE_PENDING | STATE_HELD
    );

    // Every bit set: pending gen u32::MAX behind a callback on "cpu 0xffff": held, never handed over.
    let cell = AtomicU64::new(u64::MAX);
    assert_eq!(expire(&cell, u32::MAX, 0, CAS_TRIES), Expiry::Held);
    assert_eq!(expire(&cell, 0, 0, CAS_TRIES), Expiry::Stale);
    assert_eq!(StateCell::load(&cell), u64::MAX);
}

// ---- The clock --------------------------------------------------------------------------------------

#[test]
fn ns_per_tick() {
    assert_eq!(ns_per_tick_q32(0), 0);
    // 2.6 GHz: 1/2.6 ns per tick.
    assert_eq!(ns_per_tick_q32(2_600_000), 1_651_910_498);
    // 1 kHz: 10^6 ns per tick, exact.
    assert_eq!(ns_per_tick_q32(1), 1_000_000 << 32);
    assert_eq!(ns_per_tick_q32(1_000_000), 1 << 32);
    assert_eq!(
        ns_per_tick_q32(u32::MAX),
        (1_000_000u64 << 32) / u64::from(u32::MAX)
    );
}

#[test]
fn clock() {
    let q = ns_per_tick_q32(2_600_000);
    let base = 1_000_000;
    // 0 before and at the base.
    assert_eq!(clock_ns(0, base, q), 0);
    assert_eq!(clock_ns(base - 1, base, q), 0);
    assert_eq!(clock_ns(base, base, q), 0);
    // One second of a 2.6 GHz TSC is a second, rounded down by less than a nanosecond.
    assert_eq!(clock_ns(base + 2_600_000_000, base, q), 999_999_999);
    assert_eq!(clock_ns(base + 26, base, q), 9);
    // 1 kHz: a millisecond per tick.
    let k = ns_per_tick_q32(1);
    assert_eq!(clock_ns(base + 1, base, k), 1_000_000);
    assert_eq!(clock_ns(base + 1_000, base, k), 1_000_000_000);
    // A frequency of 0 (unknown): the clock stands at 0.
    assert_eq!(clock_ns(u64::MAX, 0, ns_per_tick_q32(0)), 0);
    // A 1 GHz TSC: ticks are ns.
    assert_eq!(
        clock_ns(123_456_789, 0, ns_per_tick_q32(1_000_000)),
        123_456_789
    );
}

#[test]
fn clock_at_huge_tsc() {
    // 2.6 GHz: 2^64 - 1 ticks are ~225 years, no overflow in the 128-bit product or the result.
    let q = ns_per_tick_q32(2_600_000);
    assert_eq!(clock_ns(u64::MAX, 0, q), 7_094_901_564_829_073_407);
    assert!(clock_ns(u64::MAX - 1, 0, q) <= clock_ns(u64::MAX, 0, q));
    // Below 1 GHz a tick is more than a ns: past 2^64 ns (584 years) the clock saturates, it does not
    // wrap back to a small time.
    let k = ns_per_tick_q32(1);
    assert_eq!(clock_ns(u64::MAX, 0, k), u64::MAX);
    assert_eq!(clock_ns(u64::MAX / 1_000_000 + 1, 0, k), u64::MAX);
    assert_eq!(
        clock_ns(u64::MAX / 1_000_000, 0, k),
        u64::MAX / 1_000_000 * 1_000_000
    );
    assert_eq!(clock_ns(u64::MAX, 0, u64::MAX), u64::MAX);
}

// ---- The rings --------------------------------------------------------------------------------------

#[test]
fn ring_lengths() {
    assert_eq!(ring_len(0, 0, 32), Some(0));
    assert_eq!(ring_len(5, 2, 32), Some(3));
    assert_eq!(ring_len(32, 0, 32), Some(32));
    assert_eq!(ring_len(33, 0, 32), None);
    // Across the wrap of the indices at 2^32.
    assert_eq!(ring_len(0, u32::MAX, 32), Some(1));
    assert_eq!(ring_len(5, u32::MAX - 2, 32), Some(8));
    assert_eq!(ring_len(31, u32::MAX, 32), Some(32));
    assert_eq!(ring_len(32, u32::MAX, 32), None);
    // The consumer ahead of the producer: nonsense.
    assert_eq!(ring_len(0, 1, 32), None);
    assert_eq!(ring_len(u32::MAX, 0, 32), None);
    // A ring of no slots holds nothing.
    assert_eq!(ring_len(7, 7, 0), Some(0));
    assert_eq!(ring_len(8, 7, 0), None);
}

// ---- Properties -------------------------------------------------------------------------------------

proptest! {
    /// ARM and CANCEL move the generation on by one (wrapping), set or clear PENDING, and leave every
    /// other bit as it was, on any word.
    #[test]
    fn prop_arm_cancel(w in any::<u64>()) {
        let s = State(w);
        let rest = !(STATE_GEN_MASK | STATE_PENDING);
        for (n, pend) in [(s.armed(), true), (s.cancelled(), false)] {
            prop_assert_eq!(n.gen(), s.gen().wrapping_add(1));
            prop_assert_eq!(n.pending(), pend);
            prop_assert_eq!(n.0 & rest, w & rest);
        }
    }

    /// Expiry: at most one of hand-over and hold applies; exactly one when the arming is live; the
    /// hand-over writes a well-formed word running on `cpu`, the hold only adds HELD.
    #[test]
    fn prop_hand_over_or_hold(w in any::<u64>(), gen_same in any::<bool>(), g in any::<u32>(), cpu in 0u32..=0xffff) {
        let s = State(w);
        let gen = if gen_same { s.gen() } else { g };
        let live = s.pending() && s.gen() == gen;
        match (s.handed_over(gen, cpu), s.held_back(gen)) {
            (Some(_), Some(_)) => prop_assert!(false, "both"),
            (None, None) => prop_assert!(!live),
            (Some(n), None) => {
                prop_assert!(live && !s.running());
                prop_assert_eq!(n, running(cpu as u16, gen));
                prop_assert_eq!(n.0 & ZERO_BITS, 0);
            }
            (None, Some(n)) => {
                prop_assert!(live && s.running());
                prop_assert_eq!(n.0, w | STATE_HELD);
            }
        }
    }

    /// The end of a callback: only by the vCPU the word names, and it leaves no callback, no hold,
    /// the pending arming and the generation as they were.
    #[test]
    fn prop_callback_ended(w in any::<u64>(), other in any::<bool>(), cpu in 0u32..=0xffff) {
        let s = State(w);
        let cpu = match s.running_on() {
            Some(c) if !other => c,
            _ => cpu,
        };
        match s.callback_ended(cpu) {
            None => prop_assert_ne!(s.running_on(), Some(cpu)),
            Some(n) => {
                prop_assert_eq!(s.running_on(), Some(cpu));
                prop_assert_eq!(n.running_on(), None);
                prop_assert!(!n.held() && !n.running());
                prop_assert_eq!(n.0 & CPU_MASK, 0);
                prop_assert_eq!((n.pending(), n.gen()), (s.pending(), s.gen()));
                // The one vCPU whose end this was now gets OK from CANCEL_SYNC.
                prop_assert_eq!(n.cancelled().cancel_sync_status(cpu), OK);
            }
        }
    }

    /// `expire` on a real atomic agrees with the transitions it is made of.
    #[test]
    fn prop_expire(w in any::<u64>(), gen_same in any::<bool>(), g in any::<u32>(), cpu in 0u32..=0xffff) {
        let s = State(w);
        let gen = if gen_same { s.gen() } else { g };
        let cell = AtomicU64::new(w);
        let e = expire(&cell, gen, cpu, CAS_TRIES);
        let now = StateCell::load(&cell);
        if let Some(n) = s.handed_over(gen, cpu) {
            prop_assert_eq!((e, now), (Expiry::HandedOver, n.0));
        } else if let Some(n) = s.held_back(gen) {
            prop_assert_eq!((e, now), (Expiry::Held, n.0));
        } else {
            prop_assert_eq!((e, now), (Expiry::Stale, w));
        }
    }

    /// The clock is 0 up to its base, never goes back as the TSC moves on, never runs faster than
    /// the ticks times the rate.
    #[test]
    fn prop_clock_monotone(a in any::<u64>(), b in any::<u64>(), base in any::<u64>(), khz in any::<u32>()) {
        let (lo, hi) = (a.min(b), a.max(b));
        let q = ns_per_tick_q32(khz);
        prop_assert!(clock_ns(lo, base, q) <= clock_ns(hi, base, q));
        if lo <= base {
            prop_assert_eq!(clock_ns(lo, base, q), 0);
        }
        let exact = (u128::from(hi.saturating_sub(base)) * u128::from(q)) >> 32;
        prop_assert_eq!(u128::from(clock_ns(hi, base, q)), exact.min(u128::from(u64::MAX)));
    }

    /// Monotone for any rate at all, also ones no `ns_per_tick_q32` gives.
    #[test]
    fn prop_clock_monotone_any_rate(a in any::<u64>(), b in any::<u64>(), base in any::<u64>(), q in any::<u64>()) {
        let (lo, hi) = (a.min(b), a.max(b));
        prop_assert!(clock_ns(lo, base, q) <= clock_ns(hi, base, q));
    }

    /// `ring_len` is the wrapping distance when it fits, and nothing else.
    #[test]
    fn prop_ring_len(tail in any::<u32>(), d in any::<u32>(), size in 0u32..=64) {
        let head = tail.wrapping_add(d);
        match ring_len(head, tail, size) {
            Some(len) => {
                prop_assert!(len <= size);
                prop_assert_eq!(tail.wrapping_add(len), head);
            }
            None => prop_assert!(d > size),
        }
    }

    /// A sequential run of ARMs, CANCELs, expiries (of any generation, on any vCPU) and callback ends
    /// on one word, against a reference: each arming is handed over at most once, only while it is
    /// the live one and no callback runs, ARM/CANCEL answer whether an arming was pending, and a held
    /// arming is handed over once the callback ends.
    #[test]
    fn prop_sequential_reference(start in any::<u32>(), ops in proptest::collection::vec((0u8..4, 0u32..4, 0u32..3), 1..64)) {
        // Reference: the live arming, the running callback's vCPU, the armings handed over.
        let cell = AtomicU64::new(u64::from(start));
        let mut gen = start;
        let mut live: Option<u32> = None;
        let mut runs_on: Option<u32> = None;
        let mut held: Option<u32> = None;
        let mut fired: Vec<u32> = Vec::new();
        for (op, back, cpu) in ops {
            match op {
                0 | 1 => {
                    let arm = op == 0;
                    let Update::Done(old, new) = update(&cell, CAS_TRIES, |s| Some(if arm { s.armed() } else { s.cancelled() })) else {
                        return Err(TestCaseError::fail("ARM/CANCEL always succeed uncontended"));
                    };
                    prop_assert_eq!(old.pending(), live.is_some(), "value");
                    gen = gen.wrapping_add(1);
                    prop_assert_eq!(new.gen(), gen);
                    live = arm.then_some(gen);
                }
                2 => {
                    // quietvm expires generation gen - back.
                    let g = gen.wrapping_sub(back);
                    let e = expire(&cell, g, cpu, CAS_TRIES);
                    let expected = match (live, runs_on) {
                        (Some(l), None) if l == g => Expiry::HandedOver,
                        (Some(l), Some(_)) if l == g => Expiry::Held,
                        _ => Expiry::Stale,
                    };
                    prop_assert_eq!(e, expected);
                    match e {
                        Expiry::HandedOver => {
                            prop_assert!(!fired.contains(&g), "fired twice");
                            fired.push(g);
                            live = None;
                            runs_on = Some(cpu);
                        }
                        Expiry::Held => held = Some(g),
                        Expiry::Stale => {}
                    }
                }
                _ => {
                    // vCPU `cpu` ends its callback; a HELD word makes it SYNC: quietvm retries the
                    // held expiry, on the vCPU that synced.
                    let r = update(&cell, CAS_TRIES, |s| s.callback_ended(cpu));
                    match r {
                        Update::Done(old, _) => {
                            prop_assert_eq!(runs_on, Some(cpu));
                            runs_on = None;
                            prop_assert_eq!(old.held(), held.is_some());
                            if let Some(h) = held.take() {
                                let e = expire(&cell, h, cpu, CAS_TRIES);
                                if live == Some(h) {
                                    prop_assert_eq!(e, Expiry::HandedOver);
                                    prop_assert!(!fired.contains(&h), "fired twice");
                                    fired.push(h);
                                    live = None;
                                    runs_on = Some(cpu);
                                } else {
                                    prop_assert_eq!(e, Expiry::Stale);
                                }
                            }
                        }
                        Update::Refused(_) => prop_assert_ne!(runs_on, Some(cpu)),
                        Update::Contended => return Err(TestCaseError::fail("contended")),
                    }
                }
            }
            let s = State(StateCell::load(&cell));
            prop_assert_eq!(s.gen(), gen);
            prop_assert_eq!(s.pending(), live.is_some());
            prop_assert_eq!(s.running_on(), runs_on);
            prop_assert_eq!(s.0 & ZERO_BITS, 0);
        }
    }
}

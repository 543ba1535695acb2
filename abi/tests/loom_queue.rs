//! Loom models of queue mode's concurrent paths (docs/timer-abi.md, "Queue mode"; `quietvm_abi::queue`).
//! Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p quietvm-abi --release --test loom_queue`.
//!
//! Each model runs the ABI's own transitions (`update`, `expire`, `State::*`) on a loom atomic, so loom
//! explores every interleaving and every value a load may return under the C11 memory model, and
//! asserts one guarantee of the protocol after all threads joined:
//!
//! - `horizon_handshake`: an arming the guest publishes is seen by quietvm, or the guest `SYNC`s, or
//!   quietvm's horizon still comes before its window ends: never lost (Dekker's handshake). The
//!   `*_without_*_fence` models show that each of the two fences is needed.
//! - `rearm_or_cancel_vs_hand_over`: a re-arm or cancel racing quietvm's expiry of the pending arming:
//!   exactly one of them ends it; `value` says which.
//! - `callback_end_vs_hold`: a callback ending while quietvm expires the next arming: it is handed over
//!   exactly once, never while the callback runs (directly, or on the `SYNC` after `HELD`). The
//!   `*_hold_recorded_outside_the_lock` model shows what the device must do for that.
//! - `arm_vs_cancel`: two vCPUs arming and cancelling one timer: one generation each, exactly one of
//!   them ends the pending arming.
//! - `arm_cancel_and_expire`: both, and quietvm's expiry, at once.
//!
//! `LOOM_MAX_PREEMPTIONS` bounds the search if set; by default it is exhaustive (the models are small:
//! seconds in release).
#![cfg(loom)]

use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;
use quietvm_abi::queue::{
    expire, ring_len, update, Expiry, State, StateCell, Update, CAS_TRIES, STATE_CPU_SHIFT,
    STATE_PENDING, STATE_RUNNING, SUB_ENTRIES,
};

fn builder() -> loom::model::Builder {
    // Builder::new() reads LOOM_MAX_PREEMPTIONS; none set: every interleaving.
    loom::model::Builder::new()
}

/// A state word in loom's shared memory, with the orderings of the ABI's own `AtomicU64` cell
/// (`SeqCst` load and compare-and-swap).
struct Word(AtomicU64);

impl Word {
    fn new(s: State) -> Self {
        Word(AtomicU64::new(s.0))
    }
}

impl StateCell for Word {
    fn load(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
    fn compare_exchange(&self, current: u64, new: u64) -> Result<(), u64> {
        self.0
            .compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
            .map(|_| ())?;
        // Every model: a callback starts (a hand-over) only on a word where none runs, so a timer's
        // callbacks never overlap. `current` is the word this compare-and-swap replaced.
        let (old, new) = (State(current), State(new));
        if new.running() && new.running_on() != old.running_on() {
            assert!(
                !old.running(),
                "handed over while a callback runs: {old:?} -> {new:?}"
            );
        }
        Ok(())
    }
}

fn pending(gen: u32) -> State {
    State(STATE_PENDING | u64::from(gen))
}

fn running(cpu: u16, gen: u32) -> State {
    State(STATE_RUNNING | (u64::from(cpu) << STATE_CPU_SHIFT) | u64::from(gen))
}

/// The guest's side of an operation that always applies (ARM, CANCEL, the end of its own callback):
/// the word it found.
fn apply(word: &Word, transition: impl FnMut(State) -> Option<State>) -> State {
    match update(word, CAS_TRIES, transition) {
        Update::Done(old, _) => old,
        other => panic!("the guest's operation did not apply: {other:?}"),
    }
}

// ---- a. The horizon handshake --------------------------------------------------------------------

/// quietvm's horizon before the model: it will read the ring by then anyway, so an arming whose window
/// ends after it needs no `SYNC`.
const H_OLD: u64 = 50;
/// The end of the guest's arming's window (`deadline + slack`).
const WINDOW_END: u64 = 100;
/// The later horizon quietvm publishes (the vCPU halts until then): past the window's end.
const H_NEW: u64 = 200;

/// One vCPU's queue block, as far as the handshake goes: one submission slot (the model pushes one
/// entry), the ring indices and the horizon.
struct Queue {
    /// The entry's window end (its `deadline + slack`); written by the guest before `sub_head`.
    slot: AtomicU64,
    sub_head: AtomicU32,
    sub_tail: AtomicU32,
    horizon: AtomicU64,
}

#[derive(Clone, Copy)]
struct Fences {
    guest: bool,
    quietvm: bool,
}

impl Queue {
    /// quietvm reads the ring: every entry from `sub_tail` to `sub_head`, then `sub_tail`. Returns the
    /// window ends it read.
    fn consume(&self, seen: &mut Vec<u64>) {
        // Acquire pairs with the guest's Release of `sub_head`: the entries before it are written.
        let head = self.sub_head.load(Ordering::Acquire);
        let tail = self.sub_tail.load(Ordering::Relaxed);
        let len = ring_len(head, tail, SUB_ENTRIES).expect("a ring the model wrote is valid");
        for _ in 0..len {
            seen.push(self.slot.load(Ordering::Relaxed));
        }
        self.sub_tail.store(head, Ordering::Release);
    }
}

/// The guest pushes one `ARM` entry and decides on `SYNC` while quietvm reads the ring and publishes a
/// later horizon (the vCPU going to sleep, say).
///
/// Why each fence: without them this is the store-buffering litmus test. The guest's store of
/// `sub_head` and its load of `horizon` are to different locations, as are quietvm's store of
/// `horizon` and its load of `sub_head`; release/acquire orders neither store before the later load
/// (on x86 the stores may wait in the store buffer while the loads run), so both loads may return the
/// old values: the guest reads `H_OLD` (no `SYNC`, quietvm will look by 50 anyway) and quietvm's
/// second read misses the entry and its new horizon of 200 stands: the arming due at 100 is noticed
/// only at 200. With a `SeqCst` fence between each side's store and load, the fences are totally
/// ordered: whichever side's fence comes second, its load sees the other side's store.
fn handshake(fences: Fences) {
    builder().check(move || {
        let q = Arc::new(Queue {
            slot: AtomicU64::new(0),
            // The indices wrap at 2^32 with this push.
            sub_head: AtomicU32::new(u32::MAX),
            sub_tail: AtomicU32::new(u32::MAX),
            horizon: AtomicU64::new(H_OLD),
        });

        let guest = {
            let q = q.clone();
            thread::spawn(move || {
                // Write the entry, then publish it (`sub_head` is the guest's own index).
                let head = q.sub_head.load(Ordering::Relaxed);
                q.slot.store(WINDOW_END, Ordering::Relaxed);
                q.sub_head.store(head.wrapping_add(1), Ordering::Release);
                if fences.guest {
                    fence(Ordering::SeqCst);
                }
                // SYNC iff the window ends before quietvm looks anyway.
                WINDOW_END < q.horizon.load(Ordering::Acquire)
            })
        };

        // quietvm: read the ring, publish the later horizon, read `sub_head` again.
        let mut seen = Vec::new();
        q.consume(&mut seen);
        q.horizon.store(H_NEW, Ordering::Release);
        if fences.quietvm {
            fence(Ordering::SeqCst);
        }
        q.consume(&mut seen);
        let horizon = q.horizon.load(Ordering::Relaxed);

        let sync = guest.join().unwrap();
        assert!(
            !seen.is_empty() || sync || horizon <= WINDOW_END,
            "arming lost: quietvm read no entry, the guest did not SYNC, horizon {horizon} > window end {WINDOW_END}"
        );
        // A SYNC reads the ring: by then the entry has been read exactly once, and as written.
        if sync {
            q.consume(&mut seen);
        }
        assert!(seen.len() <= 1, "an entry read twice: {seen:?}");
        assert!(seen.iter().all(|&w| w == WINDOW_END), "a torn entry: {seen:?}");
    });
}

#[test]
fn horizon_handshake() {
    handshake(Fences {
        guest: true,
        quietvm: true,
    });
}

/// Negative check: without the guest's fence its load of `horizon` may pass its store of `sub_head`.
#[test]
#[should_panic(expected = "arming lost")]
fn horizon_handshake_without_guest_fence() {
    handshake(Fences {
        guest: false,
        quietvm: true,
    });
}

/// Negative check: without quietvm's fence its re-read of `sub_head` may pass its store of `horizon`.
#[test]
#[should_panic(expected = "arming lost")]
fn horizon_handshake_without_quietvm_fence() {
    handshake(Fences {
        guest: true,
        quietvm: false,
    });
}

// ---- b. Re-arm or cancel vs hand-over ------------------------------------------------------------

/// The word is `PENDING` with generation `gen` (an arming quietvm has consumed and now expires for vCPU
/// 1). A guest re-arms (or cancels) the timer at the same moment. Exactly one of them ends that
/// arming: either quietvm hands it over (and the guest's operation found it not pending: `value` 0, it
/// ran or will run), or quietvm finds it stale (and the guest found it pending: `value` 1, it will
/// never run). Never both (fired and reported as replaced/cancelled), never neither.
fn rearm_or_cancel(op: fn(State) -> State, gen: u32) {
    builder().check(move || {
        let word = Arc::new(Word::new(pending(gen)));
        let guest = {
            let word = word.clone();
            thread::spawn(move || apply(&word, |s| Some(op(s))))
        };
        let expiry = expire(&*word, gen, 1, CAS_TRIES);
        let old = guest.join().unwrap();
        let value = u32::from(old.pending());
        match expiry {
            Expiry::HandedOver => {
                assert_eq!(value, 0, "handed over and reported pending");
                assert_eq!(old, running(1, gen), "the guest came after the hand-over");
            }
            Expiry::Stale => {
                assert_eq!(value, 1, "neither handed over nor reported pending");
                assert_eq!(old, pending(gen), "the guest ended generation {gen}");
            }
            Expiry::Held => panic!("held, but no callback ran"),
        }
        // The guest's operation always counts: one generation on, whatever came first.
        let now = State(word.load());
        assert_eq!(now, op(old));
        assert_eq!(now.gen(), gen.wrapping_add(1));
    });
}

#[test]
fn rearm_vs_hand_over() {
    rearm_or_cancel(State::armed, 7);
}

#[test]
fn cancel_vs_hand_over() {
    rearm_or_cancel(State::cancelled, 7);
}

#[test]
fn rearm_and_cancel_vs_hand_over_at_the_generation_wrap() {
    rearm_or_cancel(State::armed, u32::MAX);
    rearm_or_cancel(State::cancelled, u32::MAX);
}

// ---- c. The end of a callback vs a hold ------------------------------------------------------------

/// quietvm's device: the state word, and (under the device lock, which `SYNC` takes too) the expiry it
/// holds back for a running callback.
struct Device {
    word: Word,
    held: Mutex<Option<u32>>,
}

/// The callback of the timer runs on vCPU 0 (the guest) and re-armed the timer (generation `gen`,
/// pending). The guest ends the callback while quietvm expires that arming for vCPU 1. If the guest's
/// end found `HELD` it issues `SYNC`, and quietvm (on the guest's vCPU thread, under the device lock)
/// retries the held expiry. The arming is handed over exactly once, and never while the callback runs
/// (`Word` asserts that the compare-and-swap that hands it over replaced a word without `RUNNING`; the
/// final word shows the hand-over on vCPU 1 with the callback's end applied).
///
/// `hold_under_lock`: quietvm's compare-and-swap that sets `HELD` and its record of the held expiry are
/// one step under the device lock. If they are not, the guest can see `HELD` and `SYNC` before the
/// record exists: the `SYNC` finds nothing to release, and the arming is never handed over.
fn callback_end(gen: u32, hold_under_lock: bool) {
    builder().check(move || {
        let dev = Arc::new(Device {
            word: Word::new(State(running(0, gen).0 | STATE_PENDING)),
            held: Mutex::new(None),
        });

        let guest = {
            let dev = dev.clone();
            thread::spawn(move || {
                let old = apply(&dev.word, |s| s.callback_ended(0));
                assert!(old.running_on() == Some(0), "the callback was running here");
                if !old.held() {
                    return (false, None);
                }
                // SYNC: quietvm releases the expiries held for callbacks that ended.
                let held = dev.held.lock().unwrap().take();
                let Some(g) = held else {
                    panic!("arming lost: HELD seen, but quietvm holds no expiry at the SYNC");
                };
                (true, Some(expire(&dev.word, g, 1, CAS_TRIES)))
            })
        };

        let first = if hold_under_lock {
            let mut held = dev.held.lock().unwrap();
            let e = expire(&dev.word, gen, 1, CAS_TRIES);
            if e == Expiry::Held {
                *held = Some(gen);
            }
            e
        } else {
            let e = expire(&dev.word, gen, 1, CAS_TRIES);
            if e == Expiry::Held {
                *dev.held.lock().unwrap() = Some(gen);
            }
            e
        };

        let (synced, retry) = guest.join().unwrap();
        match first {
            Expiry::HandedOver => assert!(!synced, "handed over, yet HELD seen"),
            Expiry::Held => {
                assert!(synced, "held, and nobody synced");
                assert_eq!(retry, Some(Expiry::HandedOver), "the SYNC hands it over");
            }
            Expiry::Stale => panic!("the live arming found stale"),
        }
        let handed = [Some(first), retry]
            .iter()
            .filter(|e| **e == Some(Expiry::HandedOver))
            .count();
        assert_eq!(handed, 1, "handed over {handed} times");
        // Handed over after the callback ended: running on vCPU 1, nothing pending or held.
        assert_eq!(State(dev.word.load()), running(1, gen));
    });
}

#[test]
fn callback_end_vs_hold() {
    callback_end(7, true);
}

#[test]
fn callback_end_vs_hold_at_the_generation_wrap() {
    callback_end(u32::MAX, true);
}

/// Negative check: the device must record the hold in the same critical section as the `HELD`
/// compare-and-swap (the lock its `SYNC` takes), else an arming can be lost.
#[test]
#[should_panic(expected = "arming lost")]
fn callback_end_vs_hold_recorded_outside_the_lock() {
    callback_end(7, false);
}

/// Two guest threads, one ARM and one CANCEL of the word; each returns the word it found.
fn spawn_arm_and_cancel(
    word: &Arc<Word>,
) -> (thread::JoinHandle<State>, thread::JoinHandle<State>) {
    let arm = {
        let word = word.clone();
        thread::spawn(move || apply(&word, |s| Some(s.armed())))
    };
    let cancel = {
        let word = word.clone();
        thread::spawn(move || apply(&word, |s| Some(s.cancelled())))
    };
    (arm, cancel)
}

// ---- d. ARM vs CANCEL -----------------------------------------------------------------------------

/// Two vCPUs ARM and CANCEL the same timer while arming `gen` is pending. The word's generation moves
/// on by exactly one per operation (wrapping), and exactly one of them found arming `gen` pending
/// (the first; the second found the first's word).
fn arm_and_cancel(gen: u32) {
    builder().check(move || {
        let word = Arc::new(Word::new(pending(gen)));
        let (arm, cancel) = spawn_arm_and_cancel(&word);
        let (a, c) = (arm.join().unwrap(), cancel.join().unwrap());
        let ended_gen = [a, c].iter().filter(|&&s| s == pending(gen)).count();
        assert_eq!(ended_gen, 1, "ARM found {a:?}, CANCEL found {c:?}");
        let g1 = gen.wrapping_add(1);
        let g2 = gen.wrapping_add(2);
        let now = State(word.load());
        if a == pending(gen) {
            // ARM first: it replaced `gen` (value 1); CANCEL cancelled the ARM's arming (value 1).
            assert_eq!(c, pending(g1));
            assert_eq!(now, State(u64::from(g2)));
        } else {
            // CANCEL first (value 1); the ARM found the timer cancelled (value 0).
            assert_eq!(c, pending(gen));
            assert_eq!(a, State(u64::from(g1)));
            assert_eq!(now, pending(g2));
        }
    });
}

#[test]
fn arm_vs_cancel() {
    arm_and_cancel(7);
}

#[test]
fn arm_vs_cancel_at_the_generation_wrap() {
    arm_and_cancel(u32::MAX);
}

// ---- e. ARM, CANCEL and the expiry at once ---------------------------------------------------------

/// b and d together: a re-arm, a cancel and quietvm's expiry of pending arming `gen` race. Exactly one
/// of the three ends that arming (ARM's or CANCEL's `value` 1 for it, or the hand-over), the
/// generations move on by two, and whatever quietvm did, the word ends up consistent with it.
#[test]
fn arm_cancel_and_expire() {
    let gen = u32::MAX;
    builder().check(move || {
        let word = Arc::new(Word::new(pending(gen)));
        let (arm, cancel) = spawn_arm_and_cancel(&word);
        let expiry = expire(&*word, gen, 1, CAS_TRIES);
        let (a, c) = (arm.join().unwrap(), cancel.join().unwrap());
        let ended = [a, c].iter().filter(|&&s| s == pending(gen)).count()
            + usize::from(expiry == Expiry::HandedOver);
        assert_eq!(
            ended, 1,
            "ARM found {a:?}, CANCEL found {c:?}, expiry {expiry:?}"
        );
        assert_ne!(expiry, Expiry::Held);
        let now = State(word.load());
        assert_eq!(now.gen(), gen.wrapping_add(2));
        assert_eq!(
            now.running_on(),
            (expiry == Expiry::HandedOver).then_some(1)
        );
    });
}

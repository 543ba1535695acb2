//! Queue mode of the timer device (docs/timer-abi.md, "Queue mode"): timer operations without VM
//! exits. A guest that opts in with [`crate::timer::CMD_ENABLE_QUEUES`] arms and cancels by writing
//! to shared memory and takes expired timers from shared memory; it exits (one `SYNC`) only when an
//! arming is due before the time quietvm will look at its queue anyway.
//!
//! ```text
//!   per-timer state words (boot info `timer_states`, one u64 per timer id, shared by all vCPUs)
//!   +-----------------------------------------------------------------+
//!   | cpu (16) | 0 (13) | HELD | RUNNING | PENDING | gen (32)           |   changed only by CAS,
//!   +-----------------------------------------------------------------+   by guests and quietvm
//!
//!   vCPU i's device page (crate::timer), from OFF_QUEUES:
//!     QueueControl   enabled, ring indices, horizon, clock parameters
//!     submission ring   guest -> quietvm   ARM / CANCEL entries    (SUB_ENTRIES slots)
//!     delivery ring     quietvm -> guest   expired timers          (DELIVERY_ENTRIES slots)
//! ```
//!
//! # Who decides what
//! Every answer the command ABI gives is decided on the state word, at the instant of a successful
//! compare-and-swap, by whoever makes it:
//! - the guest's `ARM` ([`State::armed`]): `PAST` against the shared clock ([`clock_ns`]), and the
//!   re-arm `value` (the old word was `PENDING`);
//! - the guest's `CANCEL` ([`State::cancelled`]): `value` (the old word was `PENDING`);
//! - the guest's `CANCEL_SYNC`: `RUNNING` / `DEADLOCK` from the word after its cancel
//!   ([`State::cancel_sync_status`]);
//! - quietvm's hand-over of an expired arming ([`State::handed_over`]): only an arming whose
//!   generation is still the word's and still `PENDING` fires, and never while a callback of the timer
//!   runs (then quietvm marks it `HELD` instead, [`State::held`]);
//! - the end of a callback ([`State::callback_ended`]), by the vCPU running it; if the word was
//!   `HELD` it tells quietvm at once (`SYNC`).
//!
//! The generation counts every `ARM` and `CANCEL` of the timer: a `PENDING` word's generation is the
//! one its `ARM` wrote, so an entry's generation tells quietvm whether that arming is still the live
//! one, whatever order it reads the vCPUs' queues in.
//!
//! # The horizon handshake
//! quietvm publishes in each vCPU's [`QueueControl::horizon`] the guest time by which it will look at
//! that vCPU's submission ring anyway (the vCPU's next wakeup or kick). The guest, after publishing an
//! entry (`sub_head`), reads the horizon and issues `SYNC` if the arming's window ends before it.
//! quietvm, before it publishes a later horizon, has read the ring; after publishing, it reads
//! `sub_head` again. Both sides put a full fence between their store and their load (Dekker's
//! handshake), so either quietvm sees the entry or the guest sees the new horizon (`abi/tests/
//! loom_queue.rs` checks every interleaving).

use core::mem::offset_of;

use crate::timer::{DEVICE_PAGE_SIZE, FLAG_MOVABLE, FLAG_PINNED, OFF_WINDOW};

// ---- State words ----------------------------------------------------------------------------------

/// The generation: bits 0-31.
pub const STATE_GEN_MASK: u64 = 0xffff_ffff;
/// An arming is pending (armed, not yet handed over).
pub const STATE_PENDING: u64 = 1 << 32;
/// A callback of the timer runs on the vCPU in bits 48-63.
pub const STATE_RUNNING: u64 = 1 << 33;
/// quietvm holds the pending arming's expiry until the running callback ends.
pub const STATE_HELD: u64 = 1 << 34;
/// Where the running vCPU's index starts.
pub const STATE_CPU_SHIFT: u32 = 48;
const STATE_CPU_MASK: u64 = 0xffff << STATE_CPU_SHIFT;

/// One timer's state word, decoded. Any 64-bit value is a state (a guest may write anything); the
/// transitions below only ever produce well-formed ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct State(pub u64);

impl State {
    pub fn gen(self) -> u32 {
        (self.0 & STATE_GEN_MASK) as u32
    }
    pub fn pending(self) -> bool {
        self.0 & STATE_PENDING != 0
    }
    pub fn running(self) -> bool {
        self.0 & STATE_RUNNING != 0
    }
    pub fn held(self) -> bool {
        self.0 & STATE_HELD != 0
    }
    /// The vCPU running the callback, if one runs.
    pub fn running_on(self) -> Option<u32> {
        self.running()
            .then_some(((self.0 & STATE_CPU_MASK) >> STATE_CPU_SHIFT) as u32)
    }

    fn with_next_gen(self) -> u64 {
        (self.0 & !STATE_GEN_MASK) | u64::from(self.gen().wrapping_add(1))
    }

    /// After an `ARM`: the next generation, pending; a running callback (and a held expiry, now
    /// stale) stay as they were.
    pub fn armed(self) -> State {
        State(self.with_next_gen() | STATE_PENDING)
    }

    /// After a `CANCEL`: the next generation, not pending.
    pub fn cancelled(self) -> State {
        State(self.with_next_gen() & !STATE_PENDING)
    }

    /// quietvm hands the arming of generation `gen` to vCPU `cpu`: its callback runs there from now.
    /// `None` if that arming is no longer pending (cancelled or re-armed) or a callback of the timer
    /// still runs (hold it, [`State::held`]).
    pub fn handed_over(self, gen: u32, cpu: u32) -> Option<State> {
        if !self.pending() || self.gen() != gen || self.running() {
            return None;
        }
        Some(State(
            u64::from(gen) | STATE_RUNNING | (u64::from(cpu as u16) << STATE_CPU_SHIFT),
        ))
    }

    /// quietvm holds the expiry of arming `gen` until the running callback ends. `None` if the arming
    /// is no longer pending, or no callback runs any more (hand it over instead).
    pub fn held_back(self, gen: u32) -> Option<State> {
        if !self.pending() || self.gen() != gen || !self.running() {
            return None;
        }
        Some(State(self.0 | STATE_HELD))
    }

    /// vCPU `cpu` ends the callback it runs. `None` if the word says no callback runs there.
    pub fn callback_ended(self, cpu: u32) -> Option<State> {
        if self.running_on() != Some(u32::from(cpu as u16)) {
            return None;
        }
        Some(State(
            self.0 & !(STATE_RUNNING | STATE_HELD | STATE_CPU_MASK),
        ))
    }

    /// `CANCEL_SYNC`'s status on vCPU `cpu`, from the word its cancel left.
    pub fn cancel_sync_status(self, cpu: u32) -> u32 {
        match self.running_on() {
            Some(c) if c == u32::from(cpu as u16) => crate::timer::DEADLOCK,
            Some(_) => crate::timer::RUNNING,
            None => crate::timer::OK,
        }
    }
}

/// A state word in shared memory: the guest's and quietvm's `AtomicU64` (and a model checker's).
pub trait StateCell {
    fn load(&self) -> u64;
    /// Stores `new` if the word is `current`; else returns what it is.
    fn compare_exchange(&self, current: u64, new: u64) -> Result<(), u64>;
}

impl StateCell for core::sync::atomic::AtomicU64 {
    fn load(&self) -> u64 {
        self.load(core::sync::atomic::Ordering::SeqCst)
    }
    fn compare_exchange(&self, current: u64, new: u64) -> Result<(), u64> {
        self.compare_exchange(
            current,
            new,
            core::sync::atomic::Ordering::SeqCst,
            core::sync::atomic::Ordering::SeqCst,
        )
        .map(|_| ())
    }
}

/// How many times quietvm retries a compare-and-swap that other writers keep beating: only a guest
/// that rewrites one word in a loop gets there, and then its operation is dropped ([`Update::Contended`]).
pub const CAS_TRIES: u32 = 1024;

/// What [`update`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// The word went from `.0` to `.1`.
    Done(State, State),
    /// The transition refused the word it found (`.0`); nothing written.
    Refused(State),
    /// Every one of `tries` compare-and-swaps lost to another writer; nothing written.
    Contended,
}

/// Applies `transition` to the word by compare-and-swap, at most `tries` times.
pub fn update<S: StateCell + ?Sized>(
    cell: &S,
    tries: u32,
    mut transition: impl FnMut(State) -> Option<State>,
) -> Update {
    let mut current = cell.load();
    for _ in 0..tries {
        let Some(next) = transition(State(current)) else {
            return Update::Refused(State(current));
        };
        match cell.compare_exchange(current, next.0) {
            Ok(()) => return Update::Done(State(current), next),
            Err(now) => current = now,
        }
    }
    Update::Contended
}

/// What quietvm's expiry of an arming did to the word ([`expire`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Handed over: the callback runs on the given vCPU from now.
    HandedOver,
    /// A callback of the timer still runs: the word is marked `HELD`, hand it over when it ends.
    Held,
    /// The arming is no longer pending (cancelled, re-armed, or the guest scribbled on the word).
    Stale,
}

/// quietvm expires arming `gen` of a timer for vCPU `cpu`: hands it over, or holds it behind the
/// running callback, or finds it stale.
pub fn expire<S: StateCell + ?Sized>(cell: &S, gen: u32, cpu: u32, tries: u32) -> Expiry {
    let mut held = false;
    let update = update(cell, tries, |s| {
        held = false;
        if let Some(n) = s.handed_over(gen, cpu) {
            return Some(n);
        }
        held = true;
        s.held_back(gen)
    });
    match update {
        Update::Done(..) if held => Expiry::Held,
        Update::Done(..) => Expiry::HandedOver,
        Update::Refused(_) | Update::Contended => Expiry::Stale,
    }
}

// ---- The shared clock ------------------------------------------------------------------------------

/// Guest ns from a TSC reading: `(tsc - tsc_base) * ns_per_tick_q32 >> 32`, 0 before `tsc_base`,
/// `u64::MAX` once that exceeds 64 bits (never wraps back). The one formula quietvm's device clock and
/// the guest both use, so both read the same time.
pub fn clock_ns(tsc: u64, tsc_base: u64, ns_per_tick_q32: u64) -> u64 {
    let ticks = tsc.saturating_sub(tsc_base);
    let ns = (u128::from(ticks) * u128::from(ns_per_tick_q32)) >> 32;
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// `ns_per_tick_q32` for a TSC of `tsc_khz` kHz (32 fraction bits); 0 for 0.
pub fn ns_per_tick_q32(tsc_khz: u32) -> u64 {
    if tsc_khz == 0 {
        return 0;
    }
    ((1_000_000u128 << 32) / u128::from(tsc_khz)) as u64
}

/// The clock parameters quietvm publishes (kvmclock's idea): written once when a vCPU enables queue
/// mode, with `version` even; a guest reads them as a seqlock (an odd `version`, or a change across
/// the read, means read again), so quietvm may update them later.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ClockParams {
    pub version: u32,
    pub reserved: u32,
    /// The guest TSC at guest time 0.
    pub tsc_base: u64,
    /// Nanoseconds per TSC tick, 32 fraction bits.
    pub ns_per_tick_q32: u64,
}

// ---- The rings -------------------------------------------------------------------------------------

/// Slots of the submission ring.
pub const SUB_ENTRIES: u32 = 32;
/// Slots of the delivery ring.
pub const DELIVERY_ENTRIES: u32 = 32;

/// The control block of a vCPU's queues, at [`OFF_QUEUES`] in its device page. Indices count entries
/// from 0 and wrap at 2^32; an entry's slot is `index % ENTRIES`. A ring holds `head - tail`
/// (wrapping) entries, at most its size.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct QueueControl {
    /// Out: 1 once `ENABLE_QUEUES` succeeded on this vCPU.
    pub enabled: u32,
    /// In: the submission ring's producer index (the guest's).
    pub sub_head: u32,
    /// Out: its consumer index (quietvm's).
    pub sub_tail: u32,
    /// Out: the delivery ring's producer index (quietvm's).
    pub dlv_head: u32,
    /// In: its consumer index (the guest's).
    pub dlv_tail: u32,
    pub reserved: u32,
    /// Out: guest time by which quietvm reads this submission ring anyway; `u64::MAX` = no such time.
    pub horizon: u64,
    /// Out: the shared clock.
    pub clock: ClockParams,
}

/// `op` of a submission entry.
pub const OP_ARM: u32 = 1;
pub const OP_CANCEL: u32 = 2;
/// `flags` bit of a submission entry: this operation ended a pending arming (generation `gen - 1`):
/// the `ARM` was a re-arm (`value` 1), the `CANCEL` found it pending (`value` 1).
pub const ENDED_PENDING: u32 = 1 << 8;
/// The `flags` bits an `ARM` entry carries: [`FLAG_PINNED`] or [`FLAG_MOVABLE`].
pub const ARM_KIND_MASK: u32 = FLAG_PINNED | FLAG_MOVABLE;

/// One submission: an `ARM` or `CANCEL` the guest already decided on the state word.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct SubEntry {
    /// [`OP_ARM`] or [`OP_CANCEL`].
    pub op: u32,
    pub id: u32,
    /// The state word's generation after this operation.
    pub gen: u32,
    /// `ARM`: [`FLAG_PINNED`] or [`FLAG_MOVABLE`]; either: [`ENDED_PENDING`].
    pub flags: u32,
    /// `ARM`: absolute guest ns.
    pub deadline: u64,
    /// `ARM`: the guest's slack (as the window block's `slack`).
    pub slack: u64,
    /// The guest clock when the operation took effect.
    pub at: u64,
    pub reserved: u64,
}

/// One expired timer handed to the guest: its callback runs on this vCPU from the hand-over.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct DeliveryEntry {
    pub id: u32,
    /// The vCPU that armed it (`exp_owner`).
    pub owner: u32,
    /// The arming's generation.
    pub gen: u32,
    pub reserved: u32,
    pub deadline: u64,
    /// The applied slack (`exp_slack`).
    pub slack: u64,
    /// The guest clock at the hand-over (`exp_fired_at`).
    pub fired_at: u64,
    pub reserved2: u64,
}

/// Where [`QueueControl`] starts in a device page: the first 64-byte line after the window block.
pub const OFF_QUEUES: u64 = 0x80;
pub const OFF_Q_ENABLED: u64 = OFF_QUEUES + offset_of!(QueueControl, enabled) as u64;
pub const OFF_Q_SUB_HEAD: u64 = OFF_QUEUES + offset_of!(QueueControl, sub_head) as u64;
pub const OFF_Q_SUB_TAIL: u64 = OFF_QUEUES + offset_of!(QueueControl, sub_tail) as u64;
pub const OFF_Q_DLV_HEAD: u64 = OFF_QUEUES + offset_of!(QueueControl, dlv_head) as u64;
pub const OFF_Q_DLV_TAIL: u64 = OFF_QUEUES + offset_of!(QueueControl, dlv_tail) as u64;
pub const OFF_Q_HORIZON: u64 = OFF_QUEUES + offset_of!(QueueControl, horizon) as u64;
pub const OFF_Q_CLOCK: u64 = OFF_QUEUES + offset_of!(QueueControl, clock) as u64;
/// The submission ring: [`SUB_ENTRIES`] × [`SubEntry`].
pub const OFF_SUB_RING: u64 = 0x100;
/// The delivery ring: [`DELIVERY_ENTRIES`] × [`DeliveryEntry`].
pub const OFF_DELIVERY_RING: u64 = 0x800;

/// Offset of submission slot `index % SUB_ENTRIES` in the device page.
pub fn sub_slot(index: u32) -> u64 {
    OFF_SUB_RING + u64::from(index % SUB_ENTRIES) * core::mem::size_of::<SubEntry>() as u64
}

/// Offset of delivery slot `index % DELIVERY_ENTRIES` in the device page.
pub fn delivery_slot(index: u32) -> u64 {
    OFF_DELIVERY_RING
        + u64::from(index % DELIVERY_ENTRIES) * core::mem::size_of::<DeliveryEntry>() as u64
}

/// Entries in a ring of `size` slots with producer `head` and consumer `tail`; `None` if the indices
/// cannot both be right (a guest wrote nonsense).
pub fn ring_len(head: u32, tail: u32, size: u32) -> Option<u32> {
    let len = head.wrapping_sub(tail);
    (len <= size).then_some(len)
}

// Everything fits in the page, in order.
const _: () = assert!(OFF_WINDOW + 16 <= OFF_QUEUES);
const _: () = assert!(OFF_QUEUES + core::mem::size_of::<QueueControl>() as u64 <= OFF_SUB_RING);
const _: () = assert!(
    OFF_SUB_RING + SUB_ENTRIES as u64 * core::mem::size_of::<SubEntry>() as u64
        <= OFF_DELIVERY_RING
);
const _: () = assert!(
    OFF_DELIVERY_RING + DELIVERY_ENTRIES as u64 * core::mem::size_of::<DeliveryEntry>() as u64
        <= DEVICE_PAGE_SIZE
);

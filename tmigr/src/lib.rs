//! # tmigr: the timer-migration pull model for vCPUs
//!
//! A pure-Rust port of the design of Linux's `kernel/time/timer_migration.c`
//! (6.9+) to the vCPUs of a VMM: each vCPU keeps its timers in its own base
//! ([`base`]); when it halts, its first *movable* expiry is handed to a
//! hierarchy of groups ([`hierarchy`]) in which one running vCPU per group,
//! the *migrator*, expires the idle vCPUs' movable timers at expiry time
//! ("pull"), so idle vCPUs stay asleep. [`service::TimerService`] is the API
//! the VMM uses (with the calling contract and the kick protocol in its
//! module docs); [`model`] is the reference model and simulator the tests
//! compare it with. The basic types are in [`types`], which depends on
//! nothing else: the modules form the chain `types` <- `base` <-
//! `hierarchy` <- `service` <- `model`, without cycles. No `unsafe` anywhere
//! (`forbid(unsafe_code)`, with or without `--cfg loom`).
//!
//! ## The hierarchy
//!
//! ```text
//!  LVL 2                          [GRP2:0]                    root
//!                            migrator = GRP1:0
//!                            active   = GRP1:0
//!                           /                \
//!  LVL 1             [GRP1:0]                  [GRP1:1]
//!               migrator = GRP0:1            migrator = NONE
//!               active   = GRP0:1            active   = (none)
//!               /           \                    |
//!  LVL 0  [GRP0:0]         [GRP0:1]          [GRP0:2]
//!      migr = NONE        migr = CPU9        migr = NONE
//!      active = -         active = CPU9      active = -
//!      /  ...  \          /   ...   \         /  ...  \
//!  CPU 0 ..... 7      CPU 8 ..... 15     CPU 16 .... 23
//!  idle        idle   idle  (9 runs) idle idle         idle
//! ```
//!
//! Groups hold up to `group_size` children (8 as in the kernel, 2..=8 for
//! tests); there are as many levels as the online vCPUs need. With
//! `nodes`, groups below the *crossnode level* (the levels needed to gather
//! the largest node) only take children of one node. Per group:
//!
//! * `state`: the packed `{active: u8, migrator: u8, seq: u16}` word
//!   (`union tmigr_state`), changed only by compare-and-swap;
//! * a lock protecting the group's event queue (one event per child slot:
//!   the earliest window end and earliest deadline of that child's idle
//!   subtree, and the vCPU of that deadline; see "Windows") and the group's
//!   own event `next` (its two times mirrored in atomics for lockless
//!   readers, the kernel's `READ_ONCE` of `next_expiry`);
//! * `ignore` (`groupevt.ignore`): the group is active, so its event queued
//!   in the parent is stale and is purged lazily by whoever next holds the
//!   parent's lock.
//!
//! Per vCPU (`struct tmigr_cpu`): a lock over `online`, `idle`, `remote`
//! (a migrator is expiring its timers) and `wakeup` (set when it idled the
//! root), lockless mirrors of those, its level-0 group, and its event's
//! `ignore` flag.
//!
//! Operations (names as in the kernel): **activate** (`tmigr_active_up`
//! walk: set the bit, take the migrator role if the group had none and go
//! up); **deactivate** (`tmigr_inactive_up`: clear the bit, hand the role to
//! another active child, and while the group is idle queue its first event
//! in the parent (`tmigr_update_events`) and go up; the vCPU that idles the
//! root gets the hierarchy's first expiry back and wakes for it);
//! **new timer while idle** (`tmigr_new_timer_up`); **requires_handle_remote**
//! (lockless: is any group I am migrator of due? never for an idle vCPU);
//! **handle_remote** (pop due events of the groups I am migrator of; for
//! each, expire that idle vCPU's due movable timers and re-queue its next
//! expiry); **prepare** (grow the hierarchy for a vCPU before it runs, from
//! any thread: `tmigr_cpu_prepare` + `tmigr_setup_groups`); **online**
//! (prepare if nobody did, then activate); **offline** (deactivate with no
//! event, and report if this was the last active vCPU with events pending:
//! `tmigr_trigger_active`).
//!
//! Growth keeps the tree balanced: every vCPU at the same depth, each parent
//! exactly one level up, and below the crossnode level no group with vCPUs
//! of two nodes. When a vCPU's chain reaches the old root's level without
//! room, the old root and the chain are joined one level up, or, if their
//! nodes differ below the crossnode level, each gets parents of its own node
//! up to the crossnode level, where the new root takes both
//! (`Hierarchy::setup_groups`; the kernel's "Fix imbalanced NUMA trees" and
//! "Fix off-by-one root mis-connection").
//!
//! ## Windows
//!
//! Every arming has a window `[deadline, deadline + slack]` (slack 0: the
//! kernel's exact expiry). It must not fire before its deadline (`soft`) and
//! should fire by its window end (`hard`). The kernel's hierarchy carries one
//! exact expiry per event; its timer wheel rounds timeouts to a granularity
//! before they reach it, and hrtimers carry a soft and a hard expiry
//! (`hrtimer_start_range_ns`). Here the window goes all the way up:
//!
//! ```text
//!  time  0    50   100  150  200  250  300
//!  CPU1       [==================]          [50, 300]   (deadline, end)
//!  CPU2                      [====]         [200, 250]
//!  CPU3                                 [=] [290, 300]
//!
//!  GRP0:0 {CPU1, CPU2}: evt (hard 250, soft 50, cpu 1)
//!  GRP0:1 {CPU3}:       evt (hard 300, soft 290, cpu 3)
//!  root:                     (hard 250, soft 50, cpu 1)
//! ```
//!
//! * A base keeps each queue by deadline and by window end
//!   ([`base::TimerBase::expiry`]); a vCPU's event and every group event is
//!   an [`Expiry`]: the *earliest* window end and the *earliest* deadline of
//!   what it stands for (they may belong to different timers, as in GRP0:0).
//! * Whoever must wake (a halting vCPU for its own timers, the migrator,
//!   the vCPU that idles the root) wakes at the earliest window end, 250
//!   above, and then expires *every* timer whose deadline has passed (CPU1's
//!   and CPU2's; CPU3's window opens at 290, it stays). For intervals, that
//!   greedy (stab at the first end, take everything started) is optimal: no
//!   set of wake-ups that serves every window is smaller.
//! * `requires_handle_remote` asks whether a window is *open* (`soft <=
//!   now`), not whether one ends: a migrator that exits anyway expires what
//!   it may; `next_remote_expiry` (when it must look) is the earliest end.
//! * A group event names the vCPU of its `soft`, not of its `hard`.
//!   `handle_remote` dequeues events whose window is open and handles the
//!   named vCPU. Had GRP0:0's event named CPU2 (its `hard`) at time 100,
//!   the migrator would handle CPU2, find nothing due, re-queue the same
//!   event and loop for ever (RACE: livelock with windows; the test
//!   `windows_remote_handling_ends_when_soft_and_hard_cpus_differ`).
//!   Naming the deadline's vCPU, every handled vCPU leaves the set of vCPUs
//!   with an open window for good.
//! * Invariant 3 holds for both times: an idle subtree's event in its parent
//!   is never later than the subtree's, neither its end nor its deadline.
//! * Nothing here changes the state machine, the locks or the walks: only
//!   what an event carries, and the two comparisons above. With slack 0,
//!   `hard == soft` everywhere and every decision is the kernel's.
//!
//! ## Locking rules
//!
//! Lock order, outermost first:
//!
//! 1. the *setup* mutex (`tmigr_mutex`: group creation in `online`);
//! 2. **base locks** (one per vCPU, `timer_base.lock`); when two are held
//!    (moving a timer between bases on re-arm, hotplug migration) they are
//!    taken in vCPU-id order; nothing else holds two;
//! 3. **cpu locks** (`tmc->lock`);
//! 4. **group locks**, child before parent, at most two at a time
//!    (`tmigr_update_events` holds the child group's and the group's).
//!
//! A vCPU's base lock is held across its deactivate walk (as timer.c holds
//! the base locks around `tmigr_cpu_deactivate`) and across the re-queue
//! after a remote expiry (`timer_lock_remote_bases`), so an arm on an idle
//! vCPU and a migrator re-queueing that vCPU are serialised: the migrator's
//! re-queue sees the new timer. Activation, `requires_handle_remote`,
//! `next_remote_expiry` and the kick checks take no group lock: group states
//! are atomics and only ever changed by compare-and-swap.
//!
//! ## Lifetime rules
//!
//! Groups live in an arena sized for `max_cpus` at creation and are never
//! freed or reused. A group is initialised (state, level, node, child slots,
//! the new root's active mask) while unreachable, and published by a Release
//! store of the link that makes it reachable: the parent link of its child
//! group or the vCPU's group link. Links are published top-down, the onlined
//! vCPU's own link last, so every group a walker reaches through an Acquire
//! load of a link is connected up to the root. A new root gets its child
//! mask at creation (RACE: a new root published before its mask is set; see
//! `Hierarchy::reconcile_new_root`). A parent link is set once and never
//! changes.
//!
//! ## Memory ordering
//!
//! * **Group state**: loads are `Acquire`; successful compare-and-swaps are
//!   `AcqRel`; a failed compare-and-swap re-loads with `Acquire` (its
//!   failure ordering: in Rust, unlike the kernel's `atomic_try_cmpxchg`,
//!   the failure load of `compare_exchange(_, _, AcqRel, Acquire)` *is* an
//!   acquire load, which is exactly the review's "re-load with acquire").
//!   Why: a walker reads the group state and then, in `tmigr_inactive_up`,
//!   the child's state; a walker that re-activated the child CASed the
//!   child before CASing the group, with release semantics, so observing
//!   its group CAS with Acquire guarantees observing its child CAS. The
//!   child's state itself is read `Relaxed` (ordered by the group load).
//!   `tests/loom.rs` proves these are needed: weaken either and loom finds
//!   the lost event (see the crate README).
//! * **`seq`**: bumped by every CAS so a CAS computed from a state another
//!   walker changed since always fails (ABA on `active`/`migrator`).
//! * **Group `next_hard`/`next_soft`**, **cpu `wakeup`/`idle`/`online`** mirrors:
//!   written under their lock with `Release`, read locklessly with `Acquire`;
//!   lockless readers only use them as hints or re-check under the lock
//!   (`handle_remote_cpu` re-checks `idle`/`online` under the cpu lock).
//! * **`ignore` flags**: `Relaxed`. Set locklessly by activation, cleared
//!   under the parent lock by the idle path. A late view makes a migrator
//!   handle an active child once, harmlessly (it backs off for an active
//!   vCPU, base locks serialise the expiries); the idle path's clear can
//!   not be lost because it happens under the lock after the state CAS.
//! * **Links** (`parent`, vCPU `group`): Release store, Acquire load.
//! * **Kicks**: `fence(SeqCst)` on both sides of a store-buffering pattern
//!   (walker: write state, fence, read the migrator's programmed time;
//!   `next_event`: write programmed time, fence, re-read state); see
//!   [`service`].
//! * **Timer slots** ([`base::TimerSlots`]): claimed by compare-and-swap
//!   under the claiming base's lock; changed only under the lock of the base
//!   the timer is pending on.
//!
//! ## Known races and where they are prevented
//!
//! Each race of the design note is walked through in a `RACE:` comment at
//! the code that prevents it, and has a test named after it in
//! `src/tests/races.rs`:
//!
//! * out-of-order propagation: `seq`, in `Hierarchy::inactive_up`;
//! * reading the child's state without ordering / failed CAS: the Acquire
//!   loads in `Hierarchy::active_up` and `Hierarchy::inactive_up`;
//! * last vCPU idles while another arms a first movable timer: states read
//!   under the locks in `Hierarchy::update_events`;
//! * last active vCPU goes offline: [`hierarchy::Hierarchy::offline`]
//!   returns the hierarchy's first expiry, `TimerService::vcpu_offline`
//!   names a vCPU to force active;
//! * a new root published before its mask is set:
//!   `Hierarchy::setup_groups` and `Hierarchy::reconcile_new_root`;
//! * livelock in remote expiry: [`hierarchy::Hierarchy::handle_remote`]
//!   samples `now` once, and `Hierarchy::next_expired_groupevt` consumes an
//!   event before it is handled, so a back-off cannot find it again; with
//!   windows, an event names the vCPU of its earliest deadline ("Windows");
//! * chasing stale wake-ups: `wakeup` is cleared on activate and recomputed
//!   by every walk ([`hierarchy::Hierarchy::cpu_wakeup`]); `vcpu_halt`
//!   always recomputes;
//! * two vCPUs waking for the same root expiry for ever (an outside audit,
//!   after the kernel's "Fix endless timer requeue after idle interrupts"):
//!   a vCPU that idles the root leaves the wake-up to another halted vCPU
//!   already waking by then, [`hierarchy::Hierarchy::wakeup_covered`] (why
//!   that keeps invariant 4 is walked through there);
//! * a new top level racing with idle entry and exit (the kernel's "Move
//!   hierarchy setup into cpuhotplug prepare callback", "Fix another race
//!   between hotplug and idle entry/exit", "Enforce group initialization
//!   visibility to tree walkers"): groups above the old root are created
//!   with the bit below active and as migrator, published top-down, and the
//!   old root's state is reconciled by a read-modify-write,
//!   `Hierarchy::reconcile_new_root`;
//! * a parent link appearing in the middle of a walk (the kernel's "Do not
//!   rely always on group->parent"): `Hierarchy::walk_groups`;
//! * an idling vCPU's event left ignored by an early return (the kernel's
//!   "Fix ignored event due to missing CPU update"): `Hierarchy::inactive_up`
//!   updates the events before it returns.
//!
//! Every fix the kernel's hierarchy needed since 6.9 has a test named
//! `kernel_fix_*` in `src/tests/kernel_fixes.rs` (and `loom_kernel_fix_*` in
//! `tests/loom.rs`); the crate README has the table.
//!
//! ## Differences from the kernel
//!
//! * An idle vCPU never runs `handle_remote`: a vCPU woken at its root
//!   wake-up activates first and expires as the migrator.
//! * Running vCPUs have no periodic tick: the service computes when each
//!   migrator must look (`next_event`) and reports kicks when that moves
//!   earlier, so remote expiry is not late by a tick.
//! * `new_timer` always walks (no "same expiry" shortcut); update walks go
//!   up while groups are idle (no "first event unchanged" shortcut).
//! * The event queue of a group is an array by child slot (at most 8).
//! * Isolated vCPUs ([`service::ServiceConfig::isolated`]) are left out of the
//!   hierarchy from the start, as the kernel leaves out isolated CPUs; there
//!   is no run-time (un)isolation.
//! * The last halting vCPU does not wake for the root's first expiry if
//!   another halted vCPU already wakes by then (the kernel's last CPU always
//!   programs its own wake-up).

#![forbid(unsafe_code)]

pub mod base;
pub mod clock;
pub mod hierarchy;
pub mod model;
pub mod service;
pub(crate) mod sync;
pub mod types;

pub use clock::{Clock, FakeClock, MonotonicClock};
pub use service::{ServiceConfig, ServiceStats, TimerService};
pub use types::{CpuId, Expired, Expiry, Policy, TimerId, TimerKind, KTIME_MAX};

// Unit and race tests need the std primitives and the hooks (not loom).
#[cfg(all(test, not(loom)))]
mod tests;

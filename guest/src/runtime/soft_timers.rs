//! The timer device of docs/timer-abi.md in software, for `policy=kvm-lapic`, where quietvm has no
//! timer device: the workloads call the same `device` API, and `device::raw` runs each command here,
//! with the same statuses, values and `exp_*` fields, written to the same device page.
//!
//! Semantics are the device's under `local`: a timer fires on the vCPU that armed it (MOVABLE ones
//! too); a re-arm or cancel removes a pending arming wherever it is queued; an expiry whose previous
//! callback still runs on another vCPU is held back until that callback ends.
//!
//! # Structure
//! One lock over every timer's slot and every vCPU's queue (an unsorted intrusive list: a vCPU has
//! a handful of timers). Each vCPU programs its own LAPIC TSC-deadline timer (`lapic`) for the first
//! deadline of its queue: outside callbacks when that deadline changed, and whenever its doorbell
//! handler has `POP`ped the queue empty. The LAPIC interrupt takes the doorbell's path to the handler
//! (arch/ring0.s).
//! A vCPU cannot program another's LAPIC: a remote cancel leaves the owner's deadline as it is (its
//! handler finds nothing due and re-programs), and the end of a callback whose timer is due on another
//! vCPU sends that vCPU an IPI.
//!
//! # Report
//! The figures quietvm's device would count (armed, fired, cancelled, early, missed, serialized,
//! lateness) are counted here and handed to quietvm by `report` before the VM ends (docs/boot.md,
//! "The timer report").

use super::arena::{self, Zeroable};
use super::sync::{Published, SpinLock};
use super::timer_abi::{command, status, Expired, Reply, MOVABLE, NONE, PINNED};
use super::{boot, irq, lapic};
use crate::arch;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use quietvm_abi::report::{self as abi, offset as at};

/// "None" for vCPU and timer links.
const NIL: u32 = u32::MAX;

/// One timer id.
#[derive(Clone, Copy)]
struct Slot {
    /// Deadline of the pending arming (while `queue != NIL`).
    deadline: u64,
    /// The vCPU whose queue holds the pending arming, which is also its owner; `NIL`: not pending.
    queue: u32,
    next: u32,
    prev: u32,
    /// The vCPU running this timer's callback; `NIL`: none.
    running_on: u32,
    /// The pending arming is due but held back for a callback still running, and counted as such.
    held: bool,
}

/// One vCPU.
#[derive(Clone, Copy)]
struct Cpu {
    /// First timer of its queue (`NIL`: empty).
    head: u32,
    /// The timer whose callback it runs (`NIL`: none).
    running: u32,
    /// The guest time its LAPIC deadline was last set to (0: disarmed, or fired and not re-armed).
    programmed: u64,
}

// SAFETY: plain integers and a bool; all-zero is a valid (if not yet initialised) value of each.
unsafe impl Zeroable for Slot {}
// SAFETY: as above.
unsafe impl Zeroable for Cpu {}

struct State {
    slots: &'static mut [Slot],
    cpus: &'static mut [Cpu],
}

/// A vCPU's counters; changed under the lock, read without it by `report`.
#[derive(Default)]
struct Counters {
    armed: AtomicU64,
    fired: AtomicU64,
    cancelled: AtomicU64,
    early: AtomicU64,
    serialized: AtomicU64,
    /// Lateness samples recorded (at most `Soft::sample_cap`).
    samples: AtomicU64,
}

// SAFETY: atomics only.
unsafe impl Zeroable for Counters {}

struct Soft {
    state: SpinLock<State>,
    counters: &'static [Counters],
    /// `sample_cap` lateness samples (ns, saturated to u32) per vCPU, vCPU after vCPU.
    samples: &'static [AtomicU32],
    sample_cap: usize,
    /// The report page (see `report`).
    report: &'static [AtomicU64],
}

static SOFT: Published<Soft> = Published::new();

/// At most this many lateness samples per vCPU (256 KiB each); later ones are counted but not kept.
const MAX_SAMPLES: usize = 1 << 16;

/// Sets up the shared state (vCPU 0; the others wait for it at their first command).
pub fn init(cpu: u32) {
    if cpu != 0 {
        return;
    }
    let info = boot::info();
    let vcpus = info.vcpus as usize;
    let slots = arena::alloc_mut::<Slot>(info.max_timers as usize);
    for s in slots.iter_mut() {
        s.queue = NIL;
        s.running_on = NIL;
    }
    let cpus = arena::alloc_mut::<Cpu>(vcpus);
    for c in cpus.iter_mut() {
        c.head = NIL;
        c.running = NIL;
    }
    let counters = arena::alloc::<Counters>(vcpus);
    let report = arena::alloc_page_aligned::<AtomicU64>(
        ((at::VCPU_ENTRIES + abi::VCPU_ENTRY_SIZE * vcpus as u64) / 8) as usize,
    );
    // Samples may use a quarter of what is left, so that small VMs still have room for workloads.
    let sample_cap = (arena::remaining() / 4 / 4 / vcpus).min(MAX_SAMPLES);
    let samples = arena::alloc::<AtomicU32>(sample_cap * vcpus);
    SOFT.publish(arena::leak(Soft {
        state: SpinLock::new(State { slots, cpus }),
        counters,
        samples,
        sample_cap,
        report,
    }));
}

/// What a command did, and what this vCPU must do about it after the lock.
struct Done {
    status: u32,
    value: u64,
    expired: Option<Expired>,
    /// Program this vCPU's LAPIC deadline (`Some(None)`: disarm it).
    program: Option<Option<u64>>,
    /// Send this vCPU an IPI.
    ipi: Option<u32>,
}

impl Done {
    fn status(status: u32, value: u64) -> Self {
        Done {
            status,
            value,
            expired: None,
            program: None,
            ipi: None,
        }
    }
}

/// Runs command `cmd` for this vCPU (`cpu`) with the device page's inputs. Returns what the device
/// writes to the page: the reply, and the expired timer for a `POP` that answered `OK`.
pub fn command(cpu: u32, cmd: u32, id: u32, flags: u32, deadline: u64) -> (Reply, Option<Expired>) {
    if cmd == command::NOW {
        let now = lapic::now();
        return (
            Reply {
                status: status::OK,
                value: now,
                now,
            },
            None,
        );
    }
    // Masked from the lock to the LAPIC write, so that the doorbell handler, which programs this
    // vCPU's LAPIC too, cannot come in between.
    let was_unmasked = irq::mask();
    let soft = SOFT.get();
    let (done, now) = {
        let mut st = soft.state.lock();
        // Read under the lock, so that a wait for it does not make the lateness look smaller.
        let now = lapic::now();
        let cpu = cpu as usize;
        let mut done = match cmd {
            command::ARM => st.arm(soft, cpu, id, flags, deadline, now),
            command::CANCEL => st.cancel(soft, cpu, id).map_or_else(
                || Done::status(status::INVALID, 0),
                |was| Done::status(status::OK, was as u64),
            ),
            command::CANCEL_SYNC => match st.cancel(soft, cpu, id) {
                None => Done::status(status::INVALID, 0),
                Some(was) => {
                    let s = match st.slots[id as usize].running_on {
                        NIL => status::OK,
                        r if r as usize == cpu => status::DEADLOCK,
                        _ => status::RUNNING,
                    };
                    Done::status(s, was as u64)
                }
            },
            command::POP => st.pop(soft, cpu, id, now),
            command::ACK => {
                let (s, ipi) = st.end_callback(cpu, id, now);
                Done {
                    ipi,
                    ..Done::status(s, 0)
                }
            }
            // Under kvm-lapic nobody asks a vCPU to go offline: as quietvm without a request.
            command::OFFLINE_ACK => Done::status(status::INVALID, 0),
            _ => Done::status(status::UNKNOWN_COMMAND, 0),
        };
        // A cancel that took the first deadline off this vCPU's queue: re-program (so an idle vCPU
        // is not woken for nothing), as the kernel does for a local hrtimer cancel.
        if matches!(cmd, command::CANCEL | command::CANCEL_SYNC) && done.status != status::INVALID {
            done.program = st.reprogram(cpu, now, false);
        }
        (done, now)
    };
    if let Some(at) = done.program {
        lapic::set_deadline(at);
    }
    if let Some(target) = done.ipi {
        lapic::send_ipi(target);
    }
    irq::restore(was_unmasked);
    (
        Reply {
            status: done.status,
            value: done.value,
            now,
        },
        done.expired,
    )
}

impl State {
    fn unlink(&mut self, id: u32) {
        let s = self.slots[id as usize];
        match s.prev {
            NIL => self.cpus[s.queue as usize].head = s.next,
            p => self.slots[p as usize].next = s.next,
        }
        if s.next != NIL {
            self.slots[s.next as usize].prev = s.prev;
        }
        let s = &mut self.slots[id as usize];
        s.queue = NIL;
        s.held = false;
    }

    fn link(&mut self, cpu: usize, id: u32, deadline: u64) {
        let head = self.cpus[cpu].head;
        let s = &mut self.slots[id as usize];
        *s = Slot {
            deadline,
            queue: cpu as u32,
            next: head,
            prev: NIL,
            running_on: s.running_on,
            held: false,
        };
        if head != NIL {
            self.slots[head as usize].prev = id;
        }
        self.cpus[cpu].head = id;
    }

    /// Takes `id`'s pending arming off its queue, wherever it is; whether there was one.
    fn unqueue(&mut self, id: u32) -> bool {
        let pending = self.slots[id as usize].queue != NIL;
        if pending {
            self.unlink(id);
        }
        pending
    }

    fn queue(&self, cpu: usize) -> impl Iterator<Item = (u32, &Slot)> + '_ {
        let mut id = self.cpus[cpu].head;
        core::iter::from_fn(move || {
            (id != NIL).then(|| {
                let this = id;
                id = self.slots[id as usize].next;
                (this, &self.slots[this as usize])
            })
        })
    }

    /// The LAPIC write (if any) that makes `cpu`'s deadline its queue's first: due armings held back
    /// for a running callback are left out (the end of that callback sends an IPI instead).
    ///
    /// `drained`: the doorbell handler has just `POP`ped the queue empty, after an interrupt. Should the
    /// LAPIC ever fire before `now()` reaches the deadline it holds, nothing was due and the deadline is
    /// unchanged, yet the LAPIC is disarmed: so the deadline is written then even if it did not change.
    /// Otherwise a vCPU running a callback writes nothing (its handler writes once drained, so a callback
    /// that re-arms its timer costs one write, not two), and one that does not writes only a change.
    fn reprogram(&mut self, cpu: usize, now: u64, drained: bool) -> Option<Option<u64>> {
        if !drained && self.cpus[cpu].running != NIL {
            return None;
        }
        let first = self
            .queue(cpu)
            .filter(|(_, s)| s.deadline > now || s.running_on == NIL)
            .map(|(_, s)| s.deadline)
            .min();
        let programmed = self.cpus[cpu].programmed;
        match first {
            Some(at) if at != programmed || drained => {
                self.cpus[cpu].programmed = at;
                Some(Some(at))
            }
            // Still armed for it, or it fired and its interrupt is on its way (the handler, once
            // drained, writes the next one).
            Some(_) => None,
            // Nothing queued: disarm, unless the deadline has passed (the timer fired by itself).
            None => {
                self.cpus[cpu].programmed = 0;
                (programmed > now).then_some(None)
            }
        }
    }

    fn arm(
        &mut self,
        soft: &Soft,
        cpu: usize,
        id: u32,
        flags: u32,
        deadline: u64,
        now: u64,
    ) -> Done {
        if (flags != PINNED && flags != MOVABLE) || id as usize >= self.slots.len() {
            return Done::status(status::INVALID, 0);
        }
        if deadline <= now {
            return Done::status(status::PAST, 0);
        }
        let was_pending = self.unqueue(id);
        self.link(cpu, id, deadline);
        soft.counters[cpu].armed.fetch_add(1, Ordering::Relaxed);
        Done {
            program: self.reprogram(cpu, now, false),
            ..Done::status(status::OK, was_pending as u64)
        }
    }

    /// Cancels `id`: whether an arming was pending; `None` for an unknown id.
    fn cancel(&mut self, soft: &Soft, cpu: usize, id: u32) -> Option<bool> {
        if id as usize >= self.slots.len() {
            return None;
        }
        let was = self.unqueue(id);
        if was {
            soft.counters[cpu].cancelled.fetch_add(1, Ordering::Relaxed);
        }
        Some(was)
    }

    /// Ends the callback `cpu` runs if `id` names it (`NONE` while none runs is fine). If that timer
    /// was re-armed meanwhile and is due on another vCPU, that vCPU needs an IPI to fire it.
    fn end_callback(&mut self, cpu: usize, id: u32, now: u64) -> (u32, Option<u32>) {
        let running = self.cpus[cpu].running;
        if running == NIL {
            return (
                if id == NONE {
                    status::OK
                } else {
                    status::BAD_ACK
                },
                None,
            );
        }
        if running != id {
            return (status::BAD_ACK, None);
        }
        self.cpus[cpu].running = NIL;
        let s = &mut self.slots[id as usize];
        s.running_on = NIL;
        let ipi =
            (s.queue != NIL && s.queue as usize != cpu && s.deadline <= now).then_some(s.queue);
        (status::OK, ipi)
    }

    fn pop(&mut self, soft: &Soft, cpu: usize, prev: u32, now: u64) -> Done {
        let (s, ipi) = self.end_callback(cpu, prev, now);
        if s != status::OK {
            return Done::status(s, 0);
        }
        let mut best: Option<(u32, u64)> = None;
        let mut newly_held = 0;
        let mut id = self.cpus[cpu].head;
        while id != NIL {
            let s = &mut self.slots[id as usize];
            if s.deadline <= now {
                if s.running_on == NIL {
                    if best.is_none_or(|(_, d)| s.deadline < d) {
                        best = Some((id, s.deadline));
                    }
                } else if !s.held {
                    s.held = true;
                    newly_held += 1;
                }
            }
            id = s.next;
        }
        let counters = &soft.counters[cpu];
        counters.serialized.fetch_add(newly_held, Ordering::Relaxed);
        let Some((id, deadline)) = best else {
            return Done {
                ipi,
                program: self.reprogram(cpu, now, true),
                ..Done::status(status::EMPTY, 0)
            };
        };
        self.unlink(id);
        self.slots[id as usize].running_on = cpu as u32;
        self.cpus[cpu].running = id;
        counters.fired.fetch_add(1, Ordering::Relaxed);
        if now < deadline {
            counters.early.fetch_add(1, Ordering::Relaxed);
        }
        let n = counters.samples.load(Ordering::Relaxed) as usize;
        if n < soft.sample_cap {
            let late = now.saturating_sub(deadline).min(u64::from(u32::MAX)) as u32;
            soft.samples[cpu * soft.sample_cap + n].store(late, Ordering::Relaxed);
            counters.samples.store(n as u64 + 1, Ordering::Relaxed);
        }
        Done {
            ipi,
            expired: Some(Expired {
                id,
                owner: cpu as u32,
                deadline,
                fired_at: now,
                // No slack under kvm-lapic: the LAPIC timer fires at one deadline.
                slack: 0,
            }),
            ..Done::status(status::OK, 0)
        }
    }
}

/// Fills the report page and hands its page number to quietvm (a 32-bit `out` to `report_port`), and
/// returns it (`None` before the backend's set-up). Called by the vCPU that ends the VM, just before it
/// does.
pub fn report() -> Option<u32> {
    let soft = SOFT.try_get()?;
    let info = boot::info();
    let now = lapic::now();
    // The VM is ending: a lock held elsewhere will be released soon, but one held by this very vCPU
    // (a panic inside a command) never would, so only try for a while; `missed` stays 0 without it.
    let mut missed = 0;
    for _ in 0..100_000 {
        if let Some(st) = soft.state.try_lock() {
            missed = st
                .slots
                .iter()
                .filter(|s| s.queue != NIL && s.deadline < now)
                .count() as u64;
            break;
        }
        arch::pause();
    }
    let sum = |f: fn(&Counters) -> &AtomicU64| -> u64 {
        soft.counters
            .iter()
            .map(|c| f(c).load(Ordering::Relaxed))
            .sum()
    };
    let r = soft.report;
    // The report as u64 words (docs/boot.md, "The timer report"; the layout is quietvm-abi's).
    let put = |offset: u64, value: u64| r[(offset / 8) as usize].store(value, Ordering::Relaxed);
    put(at::MAGIC, abi::MAGIC);
    // `version` and `vcpus` are the two u32 halves of one word.
    const _: () = assert!(at::VERSION & 7 == 0 && at::VCPUS == at::VERSION + 4);
    put(
        at::VERSION,
        u64::from(abi::VERSION) | (u64::from(info.vcpus) << 32),
    );
    put(at::ARMED, sum(|c| &c.armed));
    put(at::FIRED, sum(|c| &c.fired));
    put(at::CANCELLED, sum(|c| &c.cancelled));
    put(at::EARLY, sum(|c| &c.early));
    put(at::MISSED, missed);
    put(at::REMOTE_EXPIRIES, 0); // every timer fires on its owner
    put(at::SERIALIZED, sum(|c| &c.serialized));
    for (cpu, c) in soft.counters.iter().enumerate() {
        let entry = at::VCPU_ENTRIES + abi::VCPU_ENTRY_SIZE * cpu as u64;
        let samples = &soft.samples[cpu * soft.sample_cap..];
        put(entry + at::ENTRY_FIRED, c.fired.load(Ordering::Relaxed));
        put(entry + at::ENTRY_REMOTE_FIRED, 0);
        put(entry + at::ENTRY_SAMPLES_ADDR, samples.as_ptr() as u64);
        put(
            entry + at::ENTRY_SAMPLES_LEN,
            c.samples.load(Ordering::Relaxed),
        );
    }
    // SeqCst: every store above comes before the `out` (which the compiler cannot see through).
    core::sync::atomic::fence(Ordering::SeqCst);
    let page = (r.as_ptr() as u64 >> abi::PAGE_SHIFT) as u32;
    arch::outl(info.report_port, page);
    Some(page)
}

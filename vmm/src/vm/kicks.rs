//! Telling a vCPU thread that something changed: a reason bit plus, at most once until the thread looks,
//! the kick signal (see `kvm::kick` for why a signal reaches the thread in and out of `KVM_RUN`).

use std::sync::atomic::{AtomicU32, Ordering};

use crate::sync::NoSleepMutex;
use crate::sys::kvm::kick::ThreadKicker;

/// Another vCPU handed this one a timer to run.
pub const KICK_DELIVERY: u32 = 1;
/// The hierarchy moved this vCPU's next event earlier (it must re-read it).
pub const KICK_HIERARCHY: u32 = 2;
/// The VM is ending.
pub const KICK_STOP: u32 = 4;
/// Pause, resume or hotplug: the thread re-reads its control state.
pub const KICK_CONTROL: u32 = 8;

struct Slot {
    reasons: AtomicU32,
    /// `None` before the thread started and after it finished, so no signal goes to a dead thread.
    thread: NoSleepMutex<Option<ThreadKicker>>,
}

/// The kick state of every vCPU of a VM.
pub struct VcpuKicks {
    slots: Vec<Slot>,
}

impl VcpuKicks {
    pub fn new(vcpus: u32) -> Self {
        VcpuKicks {
            slots: (0..vcpus)
                .map(|_| Slot {
                    reasons: AtomicU32::new(0),
                    thread: NoSleepMutex::new(None),
                })
                .collect(),
        }
    }

    /// Called by vCPU thread `cpu` when it starts (`Some`) and before it ends (`None`).
    pub fn register(&self, cpu: u32, thread: Option<ThreadKicker>) {
        *self.slots[cpu as usize].thread.lock() = thread;
    }

    /// Adds `reason` for `cpu` and signals its thread unless a signal is already on its way.
    pub fn kick(&self, cpu: u32, reason: u32) {
        let slot = &self.slots[cpu as usize];
        // SeqCst pairs with `take`: the thread either sees the reason, or the signal arrives after it
        // looked, so the reason is never stranded while the thread sleeps.
        if slot.reasons.fetch_or(reason, Ordering::SeqCst) == 0 {
            if let Some(t) = *slot.thread.lock() {
                t.kick();
            }
        }
    }

    /// Kicks every vCPU.
    pub fn kick_all(&self, reason: u32) {
        for cpu in 0..self.slots.len() as u32 {
            self.kick(cpu, reason);
        }
    }

    /// Takes `cpu`'s pending reasons (its own thread calls this after consuming its signals).
    pub fn take(&self, cpu: u32) -> u32 {
        self.slots[cpu as usize].reasons.swap(0, Ordering::SeqCst)
    }
}

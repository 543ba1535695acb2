//! Telling a vCPU thread that something changed: a [`KickReasons`] bit plus, at most once until the
//! thread looks, the kick signal (see `sys::kvm::kick` for why a signal reaches the thread in and out of
//! `KVM_RUN`). The timer device's [`VcpuKicker`] in the VMM.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::accounting::KickReasons;
use crate::devices::timer::VcpuKicker;
use crate::sync::NoSleepMutex;
use crate::sys::kvm::kick::ThreadKicker;

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
    pub fn kick(&self, cpu: u32, reason: KickReasons) {
        let slot = &self.slots[cpu as usize];
        // SeqCst pairs with `take`: the thread either sees the reason, or the signal arrives after it
        // looked, so the reason is never stranded while the thread sleeps.
        if slot.reasons.fetch_or(reason.bits(), Ordering::SeqCst) == 0 {
            if let Some(t) = *slot.thread.lock() {
                t.kick();
            }
        }
    }

    /// Kicks every vCPU.
    pub fn kick_all(&self, reason: KickReasons) {
        for cpu in 0..self.slots.len() as u32 {
            self.kick(cpu, reason);
        }
    }

    /// Takes `cpu`'s pending reasons (its own thread calls this after consuming its signals).
    pub fn take(&self, cpu: u32) -> KickReasons {
        KickReasons::from_bits_truncate(self.slots[cpu as usize].reasons.swap(0, Ordering::SeqCst))
    }
}

impl VcpuKicker for VcpuKicks {
    fn kick(&self, cpu: u32, why: KickReasons) {
        VcpuKicks::kick(self, cpu, why)
    }
}

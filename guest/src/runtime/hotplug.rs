//! vCPU hotplug, the guest's side (docs/api.md): quietvm writes "offline requested" to the device
//! page's `control` word and rings the doorbell; the handler notes it, and the vCPU's next halt
//! acknowledges with `OFFLINE_ACK`, outside any callback or lock. The `out` returns when quietvm brings
//! the vCPU back online, and the vCPU carries on where it was.

use super::device::{self, status};
use super::percpu::{self, PerCpu};
use super::{irq, queues};
use core::sync::atomic::Ordering;

/// Goes offline now if quietvm asked for it. Called on the halt paths only. In queue mode not while
/// expired timers wait in the delivery ring (their callbacks would wait for this vCPU to come back):
/// the doorbell for them is pending, so the halt path runs them first and comes back here.
pub fn go_offline_if_asked() {
    let cpu = percpu::this();
    if !cpu.offline_requested.load(Ordering::SeqCst) {
        return;
    }
    // Masked from the count to the answer: a callback that ran in between (after an exit that
    // delivered timers) would record its armings with the count of an offline that then does not
    // happen, or one that does but not since them.
    let was_unmasked = irq::mask();
    if !queues::delivery_waiting() {
        go_offline(cpu);
    }
    irq::restore(was_unmasked);
}

fn go_offline(cpu: &PerCpu) {
    cpu.offline_requested.store(false, Ordering::SeqCst);
    // Counted before quietvm moves this vCPU's timers, so a check on another vCPU that sees one of
    // them fire there also sees the count grown.
    cpu.offline_count.fetch_add(1, Ordering::SeqCst);
    let reply = device::offline_ack();
    match reply.status {
        status::OK => {}
        // quietvm withdrew the request (it waited too long): nothing moved.
        status::INVALID => {
            cpu.offline_count.fetch_sub(1, Ordering::SeqCst);
        }
        // Queue mode: expired timers arrived in the delivery ring meanwhile. Take them first (the
        // halt path runs the handler for them), and go offline at the next halt.
        status::BAD_ACK if queues::on() => {
            cpu.offline_count.fetch_sub(1, Ordering::SeqCst);
            cpu.offline_requested.store(true, Ordering::SeqCst);
        }
        s => panic!("OFFLINE_ACK answered {}", status::name(s)),
    }
}

/// Stops this vCPU for good, leaving the others running (it still leaves when asked to go offline).
/// A doorbell handler that runs here leaves its owed `SYNC`s to the next `HLT` exit (`queues`).
pub fn halt_forever() -> ! {
    let cpu = percpu::this();
    cpu.halting.store(true, Ordering::SeqCst);
    loop {
        go_offline_if_asked();
        super::irq::mask();
        super::queues::halt_then_unmask();
    }
}

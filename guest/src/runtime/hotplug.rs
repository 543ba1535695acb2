//! vCPU hotplug, the guest's side (docs/api.md): quietvm writes "offline requested" to the device
//! page's `control` word and rings the doorbell; the handler notes it, and the vCPU's next halt
//! acknowledges with `OFFLINE_ACK`, outside any callback or lock. The `out` returns when quietvm brings
//! the vCPU back online, and the vCPU carries on where it was.

use super::device::{self, status};
use super::percpu;
use core::sync::atomic::Ordering;

/// Goes offline now if quietvm asked for it. Called on the halt paths only.
pub fn go_offline_if_asked() {
    let cpu = percpu::this();
    if !cpu.offline_requested.swap(false, Ordering::SeqCst) {
        return;
    }
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
        s => panic!("OFFLINE_ACK answered {}", status::name(s)),
    }
}

/// Stops this vCPU for good, leaving the others running (it still leaves when asked to go offline).
pub fn halt_forever() -> ! {
    loop {
        go_offline_if_asked();
        crate::arch::unmask_and_halt();
    }
}

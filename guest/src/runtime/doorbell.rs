//! The doorbell handler: run by the ring-3 upcall trampoline (arch/upcall.s) when the doorbell rings
//! unmasked, or by `irq::unmask` for one that rang while masked. Drains the device with `POP` until
//! `EMPTY` (quietvm rings again only after an `EMPTY`), running each expired timer's callback in turn:
//! callbacks run one at a time per vCPU, with the doorbell masked.

use super::device::{self, status, Expired, NONE};
use super::sync::Published;
use super::{percpu, time};
use core::sync::atomic::Ordering;

/// Entry from the upcall trampoline (the doorbell was unmasked when it rang), and from `irq::unmask`
/// for one that rang masked (through `arch::run_doorbell_handler`): the symbol arch/ needs.
#[no_mangle]
pub extern "C" fn quietvm_doorbell() {
    handle();
}

/// The callback of every timer that is not the runtime's own (the workload's), set at boot.
static ON_TIMER: Published<fn(&Expired)> = Published::new();

/// Sets the callback for timers the runtime does not own itself (before any such timer is armed).
pub fn set_timer_callback(callback: &'static fn(&Expired)) {
    ON_TIMER.publish(callback);
}

/// Runs the callbacks of all expired timers, masked; returns unmasked.
fn handle() {
    let cpu = percpu::this();
    // Put back what interrupted code may have been in the middle of (like a signal handler and errno).
    let saved = device::save_page();
    cpu.upcalls.fetch_add(1, Ordering::Relaxed);
    loop {
        cpu.irq_masked.store(1, Ordering::SeqCst);
        cpu.irq_pending.store(0, Ordering::SeqCst);
        drain();
        cpu.irq_masked.store(0, Ordering::SeqCst);
        // A doorbell that rang while masked (a timer expired after our EMPTY): go round again. One
        // that rings from here on upcalls as usual.
        if cpu.irq_pending.load(Ordering::SeqCst) == 0 {
            break;
        }
    }
    if device::control() == device::control::OFFLINE_REQUESTED {
        cpu.offline_requested.store(true, Ordering::SeqCst);
    }
    device::restore_page(saved);
}

fn drain() {
    let cpu = percpu::this();
    loop {
        // A callback may have ended itself early with `ack_running`.
        let prev = cpu.running.load(Ordering::Relaxed);
        match device::pop(prev) {
            (_, Some(expired)) => {
                cpu.running.store(expired.id, Ordering::Relaxed);
                cpu.popped.fetch_add(1, Ordering::Relaxed);
                dispatch(&expired);
            }
            (reply, None) if reply.status == status::EMPTY => break,
            (reply, None) => panic!("POP({:#x}) answered {}", prev, status::name(reply.status)),
        }
    }
    cpu.running.store(NONE, Ordering::Relaxed);
}

fn dispatch(expired: &Expired) {
    if !time::on_timer(expired) {
        match ON_TIMER.try_get() {
            Some(callback) => callback(expired),
            None => panic!(
                "timer {} fired before the timer callback was set",
                expired.id
            ),
        }
    }
}

/// Ends the running callback now (`ACK`), from inside it; the handler then pops with `NONE`.
pub fn ack_running() -> device::Reply {
    let cpu = percpu::this();
    let id = cpu.running.load(Ordering::Relaxed);
    let reply = device::ack(id);
    if reply.status == status::OK {
        cpu.running.store(NONE, Ordering::Relaxed);
    }
    reply
}

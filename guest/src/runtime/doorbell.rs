//! The doorbell handler: run by the ring-3 upcall trampoline (arch/upcall.s) when the doorbell rings
//! unmasked, or by `irq::unmask` for one that rang while masked. Drains the device with `POP` until
//! `EMPTY` (quietvm rings again only after an `EMPTY`), running each expired timer's callback in turn:
//! callbacks run one at a time per vCPU, with the doorbell masked.
//!
//! In queue mode (`queues`) it takes the expired timers from the delivery ring instead, and ends each
//! callback on its state word: no exits (quietvm rings again once the guest has taken every entry).
//! Armings its callbacks make owe their `SYNC`, which it pays at its end unless it interrupted the
//! halt path (`queues`, "Owed SYNCs"). quietvm never leaves a queue-mode vCPU's timers for `POP`, but
//! nothing else would ever take one it did (after a hotplug hand-off, say): so a handler run that found
//! the ring empty throughout (a doorbell for a hotplug request, or one that raced with the previous
//! run's last take) also drains with `POP` commands, once. That costs one exit per such doorbell only;
//! the usual one, with entries, costs none.

use super::device::{self, control, status, Expired, NONE};
use super::percpu::PerCpu;
use super::sync::Published;
use super::{percpu, queues, time};
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
    let outer = cpu.in_handler.swap(true, Ordering::SeqCst);
    // Set by the halt path around its `hlt`: a `HLT` exit (or `wait_until`'s return) comes next.
    let halting = cpu.halting.load(Ordering::SeqCst);
    let mut taken = 0;
    let mut popped_commands = false;
    loop {
        cpu.irq_masked.store(1, Ordering::SeqCst);
        cpu.irq_pending.store(0, Ordering::SeqCst);
        if queues::on() {
            taken += drain(cpu, device::pop, false);
            if taken == 0 && !popped_commands {
                popped_commands = true;
                cpu.safety_pops.fetch_add(1, Ordering::Relaxed);
                let found = drain(cpu, device::pop_command, true);
                cpu.safety_pops_found.fetch_add(found, Ordering::Relaxed);
            }
            if !halting {
                queues::pay_owed();
            }
        } else {
            drain(cpu, device::pop, false);
        }
        cpu.irq_masked.store(0, Ordering::SeqCst);
        // A doorbell that rang while masked (a timer expired after our EMPTY): go round again. One
        // that rings from here on upcalls as usual.
        if cpu.irq_pending.load(Ordering::SeqCst) == 0 {
            break;
        }
    }
    cpu.in_handler.store(outer, Ordering::SeqCst);
    if device::control() == control::OFFLINE_REQUESTED {
        cpu.offline_requested.store(true, Ordering::SeqCst);
    }
    device::restore_page(saved);
}

/// Takes expired timers with `pop` (the `POP` command, or its queue-mode twin) until `EMPTY`, running
/// each one's callback; returns how many. `by_command`: the callbacks came from the `POP` command (in
/// queue mode, `ack_running` must then end them with a command too).
fn drain(cpu: &PerCpu, pop: fn(u32) -> (device::Reply, Option<Expired>), by_command: bool) -> u64 {
    let mut taken = 0;
    loop {
        // A callback may have ended itself early with `ack_running`.
        let prev = cpu.running.load(Ordering::Relaxed);
        match pop(prev) {
            (_, Some(expired)) => {
                cpu.running.store(expired.id, Ordering::Relaxed);
                cpu.running_popped.store(by_command, Ordering::Relaxed);
                cpu.popped.fetch_add(1, Ordering::Relaxed);
                taken += 1;
                dispatch(&expired);
                if !by_command {
                    queues::pay_owed_if_overdue();
                }
            }
            (reply, None) if reply.status == status::EMPTY => break,
            (reply, None) if !by_command || !queues::on() => {
                panic!("POP({:#x}) answered {}", prev, status::name(reply.status))
            }
            (reply, None) => panic!(
                "queue mode: POP({:#x}) after draining the delivery ring answered {} (with NONE: the guest had ended every callback it took from the ring)",
                prev,
                status::name(reply.status)
            ),
        }
    }
    cpu.running.store(NONE, Ordering::Relaxed);
    cpu.running_popped.store(false, Ordering::Relaxed);
    taken
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

/// Ends the running callback now (`ACK`, or in queue mode its end on the state word), from inside it;
/// the handler then pops with `NONE`.
pub fn ack_running() -> device::Reply {
    let cpu = percpu::this();
    let id = cpu.running.load(Ordering::Relaxed);
    let reply = if cpu.running_popped.load(Ordering::Relaxed) {
        device::ack_command(id)
    } else {
        device::ack(id)
    };
    if reply.status == status::OK {
        cpu.running.store(NONE, Ordering::Relaxed);
    }
    reply
}

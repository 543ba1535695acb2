//! Client of quietvm's timer device (docs/timer-abi.md): fill this vCPU's device page, one 32-bit `out`
//! of the command number to the command port, read the results back from the page.
//!
//! A vCPU in queue mode (`queues`, docs/timer-abi.md "Queue mode") does the timer operations below
//! (`now`, `arm`, `cancel`, `cancel_sync`, `pop`, `ack`) in shared memory instead, with the same
//! answers and without exits; `raw` and the other commands stay commands.
//!
//! The doorbell handler saves and restores the device page around its own commands (`doorbell`), like
//! a signal handler saving errno, so code it interrupts may be anywhere in a command sequence: callers
//! need not mask the doorbell around commands. (Queue-mode operations mask it themselves.)

use super::{boot, lapic, percpu, queues, soft_timers};
use crate::arch;
use core::ptr::{addr_of, addr_of_mut};
use quietvm_abi::timer as abi;

// The commands, statuses and flags, and what a command answers: shared with the software device.
pub use super::timer_abi::{command, status, Expired, Reply, MOVABLE, NONE, PINNED};

/// The `control` word of the device page (docs/api.md, vCPU hotplug).
pub mod control {
    pub use quietvm_abi::timer::{
        CONTROL_NONE as NONE, CONTROL_OFFLINE_REQUESTED as OFFLINE_REQUESTED,
    };
    // CONTROL_ONLINE ("back online") needs no action: the vCPU simply continues after its OFFLINE_ACK.
}

/// Offset of `control`: outside [`Page`] on purpose, so the doorbell handler's save/restore of the page
/// never writes back a stale value over one quietvm wrote meanwhile.
const CONTROL_OFFSET: u64 = abi::OFF_CONTROL;

/// The first 64 bytes of a device page (the ABI's command block), and the window block after the
/// `control` word.
pub use abi::{Page, PageWindow};

/// What the doorbell handler saves and puts back: the command block and the window block (the
/// `slack` of an interrupted `ARM` must survive a callback's own `ARM`), never `control`.
#[derive(Clone, Copy)]
pub struct SavedPage {
    page: Page,
    window: PageWindow,
}

fn window() -> *mut PageWindow {
    (page() as u64 + abi::OFF_WINDOW) as *mut PageWindow
}

fn page() -> *mut Page {
    let info = boot::info();
    (info.device_pages + abi::DEVICE_PAGE_SIZE * u64::from(percpu::index())) as *mut Page
}

/// Issues `cmd` with the given inputs. Each command is one exit to quietvm; under `policy=kvm-lapic`
/// the software device (`soft_timers`) carries it out instead and writes its results to the same page,
/// so that the rest of the runtime (the doorbell handler's page save, `expired`) is the same.
pub fn raw(cmd: u32, id: u32, flags: u32, deadline: u64) -> Reply {
    raw_with_slack(cmd, id, flags, deadline, 0)
}

/// [`raw`] with the window block's `slack` (read by `ARM` only; 0 for every other command).
fn raw_with_slack(cmd: u32, id: u32, flags: u32, deadline: u64, slack: u64) -> Reply {
    let page = page();
    // SAFETY: this vCPU's own device page (mapped, user-accessible); volatile because quietvm writes
    // it during the `out`, which the compiler cannot see (the asm has no `nomem`). The window block
    // lies in the same page.
    unsafe {
        addr_of_mut!((*page).id).write_volatile(id);
        addr_of_mut!((*page).flags).write_volatile(flags);
        addr_of_mut!((*page).deadline).write_volatile(deadline);
        addr_of_mut!((*window()).slack).write_volatile(slack);
        if lapic::active() {
            let (reply, expired) = soft_timers::command(percpu::index(), cmd, id, flags, deadline);
            addr_of_mut!((*page).status).write_volatile(reply.status);
            addr_of_mut!((*page).value).write_volatile(reply.value);
            addr_of_mut!((*page).now).write_volatile(reply.now);
            if let Some(e) = expired {
                addr_of_mut!((*page).exp_id).write_volatile(e.id);
                addr_of_mut!((*page).exp_owner).write_volatile(e.owner);
                addr_of_mut!((*page).exp_deadline).write_volatile(e.deadline);
                addr_of_mut!((*page).exp_fired_at).write_volatile(e.fired_at);
                addr_of_mut!((*window()).exp_slack).write_volatile(e.slack);
            }
        } else {
            arch::outl(boot::info().timer_port, cmd);
        }
        Reply {
            status: addr_of!((*page).status).read_volatile(),
            value: addr_of!((*page).value).read_volatile(),
            now: addr_of!((*page).now).read_volatile(),
        }
    }
}

/// The `exp_*` fields of the last `POP`.
fn expired() -> Expired {
    let page = page();
    // SAFETY: as in `raw`.
    unsafe {
        Expired {
            id: addr_of!((*page).exp_id).read_volatile(),
            owner: addr_of!((*page).exp_owner).read_volatile(),
            deadline: addr_of!((*page).exp_deadline).read_volatile(),
            fired_at: addr_of!((*page).exp_fired_at).read_volatile(),
            slack: addr_of!((*window()).exp_slack).read_volatile(),
        }
    }
}

/// The guest clock, in ns since the VM started.
pub fn now() -> u64 {
    if queues::on() {
        return queues::now();
    }
    raw(command::NOW, NONE, 0, 0).value
}

pub fn arm(id: u32, flags: u32, deadline: u64) -> Reply {
    arm_with_slack(id, flags, deadline, 0)
}

/// `ARM` with a window: the timer may fire anywhere in `[deadline, deadline + slack]`.
pub fn arm_with_slack(id: u32, flags: u32, deadline: u64, slack: u64) -> Reply {
    if queues::on() {
        return queues::arm(id, flags, deadline, slack, false);
    }
    raw_with_slack(command::ARM, id, flags, deadline, slack)
}

/// `ARM` for code that halts right after, or pays what it owes (`queues::pay_owed`) before it runs on
/// (`time::wait_until`): in queue mode the `SYNC` it may need is left to the `HLT` exit.
pub fn arm_before_halt(id: u32, flags: u32, deadline: u64) -> Reply {
    if queues::on() {
        return queues::arm(id, flags, deadline, 0, true);
    }
    raw(command::ARM, id, flags, deadline)
}

pub fn cancel(id: u32) -> Reply {
    if queues::on() {
        return queues::cancel(id);
    }
    raw(command::CANCEL, id, 0, 0)
}

/// One `CANCEL_SYNC` (callers repeat it while it answers `RUNNING`).
pub fn cancel_sync(id: u32) -> Reply {
    if queues::on() {
        return queues::cancel_sync(id);
    }
    raw(command::CANCEL_SYNC, id, 0, 0)
}

/// `POP`: ends callback `prev` (or `NONE`) and takes the next expired timer, if any.
pub fn pop(prev: u32) -> (Reply, Option<Expired>) {
    if queues::on() {
        return queues::pop(prev);
    }
    pop_command(prev)
}

/// The `POP` command, also in queue mode (the doorbell handler's safety net).
pub fn pop_command(prev: u32) -> (Reply, Option<Expired>) {
    let reply = raw(command::POP, prev, 0, 0);
    let expired = (reply.status == status::OK).then(expired);
    (reply, expired)
}

pub fn ack(id: u32) -> Reply {
    if queues::on() {
        return queues::ack(id);
    }
    ack_command(id)
}

/// The `ACK` command, also in queue mode (for a callback a `POP` command handed over).
pub fn ack_command(id: u32) -> Reply {
    raw(command::ACK, id, 0, 0)
}

/// What quietvm last wrote to this vCPU's `control` word (always `NONE` under kvm-lapic).
pub fn control() -> u32 {
    if lapic::active() {
        return control::NONE;
    }
    let info = boot::info();
    let at =
        info.device_pages + abi::DEVICE_PAGE_SIZE * u64::from(percpu::index()) + CONTROL_OFFSET;
    // SAFETY: inside this vCPU's own device page (mapped, user-accessible); volatile because quietvm
    // writes it behind the compiler's back.
    unsafe { (at as *const u32).read_volatile() }
}

/// `OFFLINE_ACK`: this vCPU leaves; the call returns once it is back online.
pub fn offline_ack() -> Reply {
    raw(command::OFFLINE_ACK, NONE, 0, 0)
}

/// A 32-bit `in` of the command port: the status of this vCPU's last command (under
/// `policy=kvm-lapic`, the status the software device left in the page).
pub fn last_status() -> u32 {
    if lapic::active() {
        // SAFETY: as in `raw`.
        return unsafe { addr_of!((*page()).status).read_volatile() };
    }
    arch::inl(boot::info().timer_port)
}

/// Snapshot of the page, for the doorbell handler to put back.
pub fn save_page() -> SavedPage {
    // SAFETY: as in `raw_with_slack`.
    unsafe {
        SavedPage {
            page: page().read_volatile(),
            window: window().read_volatile(),
        }
    }
}

pub fn restore_page(saved: SavedPage) {
    // SAFETY: as in `raw_with_slack`.
    unsafe {
        page().write_volatile(saved.page);
        window().write_volatile(saved.window);
    }
}

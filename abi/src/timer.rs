//! The paravirtual timer device (docs/timer-abi.md): one device page per vCPU, commands written to
//! [`crate::ports::TIMER_PORT`], results in the page, the doorbell vector.

use core::mem::offset_of;

/// The vector quietvm injects when a vCPU has expired timers waiting (docs/timer-abi.md, "The
/// doorbell"); also the boot info's `doorbell_vector`.
pub const DOORBELL_VECTOR: u8 = 0x20;

/// The size of one vCPU's device page: vCPU `i`'s is at `device_pages + DEVICE_PAGE_SIZE * i`.
pub const DEVICE_PAGE_SIZE: u64 = crate::boot::PAGE_SIZE;

// Commands: the value of the 32-bit `out` (docs/timer-abi.md, "Commands").
/// `value` = `now`.
pub const CMD_NOW: u32 = 1;
/// Arms timer `id` with `flags` at `deadline` (and `slack`, [`PageWindow`]) on this vCPU.
pub const CMD_ARM: u32 = 2;
/// Cancels timer `id`.
pub const CMD_CANCEL: u32 = 3;
/// Cancels timer `id` and waits for its running callback (`RUNNING`, `DEADLOCK`).
pub const CMD_CANCEL_SYNC: u32 = 4;
/// Ends the running callback `id` and hands over the next expired timer (`exp_*`), or `EMPTY`.
pub const CMD_POP: u32 = 5;
/// Ends the running callback `id` without taking another.
pub const CMD_ACK: u32 = 6;
/// The guest agrees to a pending offline request (docs/api.md, vCPU hotplug).
pub const CMD_OFFLINE_ACK: u32 = 7;
/// Turns on queue mode for this vCPU ([`crate::queue`]): `OK`, or `INVALID` if this VM cannot offer it.
pub const CMD_ENABLE_QUEUES: u32 = 8;
/// Queue mode: quietvm reads this vCPU's submission ring now and releases expiries held for callbacks
/// that ended; `value` = the entries read.
pub const CMD_SYNC: u32 = 9;

// Statuses (docs/timer-abi.md, "Statuses").
/// Done.
pub const OK: u32 = 0;
/// `POP`: no expired timer is waiting for this vCPU.
pub const EMPTY: u32 = 1;
/// `ARM`: the deadline is not after `now`; nothing changed.
pub const PAST: u32 = 2;
/// `CANCEL_SYNC`: cancelled, but its callback still runs on another vCPU.
pub const RUNNING: u32 = 3;
/// `CANCEL_SYNC` from the timer's own callback; the timer is cancelled.
pub const DEADLOCK: u32 = 4;
/// `POP`/`ACK` named a timer whose callback this vCPU is not running (or `OFFLINE_ACK` in a callback).
pub const BAD_ACK: u32 = 5;
/// Unknown timer id, or flags not exactly one of PINNED / MOVABLE (or `OFFLINE_ACK` without a request).
pub const INVALID: u32 = 6;
/// Not a command number.
pub const UNKNOWN_COMMAND: u32 = 7;
/// The command port was written with a size other than 32 bits.
pub const BAD_ACCESS: u32 = 8;

/// `flags`: the timer always fires on its owner.
pub const FLAG_PINNED: u32 = 1;
/// `flags`: the timer may fire on another vCPU, by the VM's policy.
pub const FLAG_MOVABLE: u32 = 2;
/// "No timer": the `id` of a `POP` or `ACK` when no callback runs.
pub const NO_TIMER: u32 = 0xffff_ffff;

/// The first 64 bytes of a device page: a command's inputs and results (docs/timer-abi.md, "The device
/// page"). The page's `control` word ([`OFF_CONTROL`]) follows it, outside this struct on purpose: a
/// guest that saves and restores the command block never writes back a stale `control`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Page {
    /// In: the timer id, or [`NO_TIMER`].
    pub id: u32,
    /// In: [`FLAG_PINNED`] or [`FLAG_MOVABLE`].
    pub flags: u32,
    /// In: absolute guest ns.
    pub deadline: u64,
    /// Out: the status.
    pub status: u32,
    pub reserved: u32,
    /// Out: the command's result.
    pub value: u64,
    /// Out: the guest clock when the command ran.
    pub now: u64,
    /// Out (`POP`): the timer handed over.
    pub exp_id: u32,
    /// Out (`POP`): the vCPU that armed it.
    pub exp_owner: u32,
    /// Out (`POP`): the deadline it was armed for.
    pub exp_deadline: u64,
    /// Out (`POP`): the guest clock when it was handed over.
    pub exp_fired_at: u64,
}

// Byte offsets in a device page.
pub const OFF_ID: u64 = offset_of!(Page, id) as u64;
pub const OFF_FLAGS: u64 = offset_of!(Page, flags) as u64;
pub const OFF_DEADLINE: u64 = offset_of!(Page, deadline) as u64;
pub const OFF_STATUS: u64 = offset_of!(Page, status) as u64;
pub const OFF_VALUE: u64 = offset_of!(Page, value) as u64;
pub const OFF_NOW: u64 = offset_of!(Page, now) as u64;
pub const OFF_EXP_ID: u64 = offset_of!(Page, exp_id) as u64;
pub const OFF_EXP_OWNER: u64 = offset_of!(Page, exp_owner) as u64;
pub const OFF_EXP_DEADLINE: u64 = offset_of!(Page, exp_deadline) as u64;
pub const OFF_EXP_FIRED_AT: u64 = offset_of!(Page, exp_fired_at) as u64;
/// The `control` word (u32), written by quietvm only, right after [`Page`].
pub const OFF_CONTROL: u64 = core::mem::size_of::<Page>() as u64;

/// The timer window block (docs/timer-abi.md, "Timer windows"), 8-aligned after the `control` word
/// (at [`OFF_WINDOW`]): added in ABI version 1 without a bump, since a guest that never writes it
/// leaves `slack` 0 (quietvm zeroes guest memory), which is the behaviour from before. A guest that
/// saves and restores the command block around its own commands saves this block too.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct PageWindow {
    /// In (`ARM`): the slack in ns: the timer may fire anywhere in `[deadline, deadline + slack]`.
    /// 0 = no slack. quietvm clamps it to [`MAX_SLACK_NS`].
    pub slack: u64,
    /// Out (`POP`): the slack quietvm applied to the handed-over arming (the guest's, raised to the VM's
    /// minimum for a MOVABLE one, clamped to [`MAX_SLACK_NS`]).
    pub exp_slack: u64,
}

/// Where [`PageWindow`] starts: the first 8-aligned offset after the `control` word.
pub const OFF_WINDOW: u64 = (OFF_CONTROL + 4).next_multiple_of(8);
pub const OFF_SLACK: u64 = OFF_WINDOW + offset_of!(PageWindow, slack) as u64;
pub const OFF_EXP_SLACK: u64 = OFF_WINDOW + offset_of!(PageWindow, exp_slack) as u64;

/// The most slack quietvm applies to one arming (1 s): a larger `slack`, or a larger VM minimum, is
/// clamped to it, so that `deadline + slack` cannot overflow and no timer can be put off for long.
pub const MAX_SLACK_NS: u64 = 1_000_000_000;

/// Not a wire value: how far past the end of its window (`deadline + slack`) a firing may be before
/// quietvm's statistics (`late_beyond_window`) and the built-in guest count it as late beyond its
/// window: 1 ms, the p99 of delivery on this project's nested development host (a wakeup, a doorbell
/// injection and a `POP`, several exits of 12-45 us each: `quietvm run configs/quickstart.toml`
/// measured lateness p50 172 us, p99 965 us with slack 0), so that the figure flags windows not
/// honoured rather than every ordinary delivery. Lateness itself is reported in full.
pub const WINDOW_TOLERANCE_NS: u64 = 1_000_000;

// `control` values (docs/api.md, vCPU hotplug); quietvm rings the doorbell when it changes the word.
/// Nothing requested.
pub const CONTROL_NONE: u32 = 0;
/// quietvm asks the guest to take this vCPU offline (`OFFLINE_ACK`).
pub const CONTROL_OFFLINE_REQUESTED: u32 = 1;
/// The vCPU is back online.
pub const CONTROL_ONLINE: u32 = 2;

// `control`, the window block and the rest of the page fit in it.
const _: () = assert!(OFF_CONTROL + 4 <= OFF_WINDOW);
const _: () = assert!(OFF_WINDOW + core::mem::size_of::<PageWindow>() as u64 <= DEVICE_PAGE_SIZE);

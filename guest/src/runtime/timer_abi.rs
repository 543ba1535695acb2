//! The timer device's vocabulary (docs/timer-abi.md) as the runtime uses it: the command numbers,
//! statuses and flags, and what a command answers. Shared by the device client (`device`, which
//! re-exports all of it) and the software device of `policy=kvm-lapic` (`soft_timers`).

use quietvm_abi::timer as abi;

/// "No timer" (the `id` of a `POP` when no callback runs).
pub use abi::NO_TIMER as NONE;
pub use abi::{FLAG_MOVABLE as MOVABLE, FLAG_PINNED as PINNED};

/// The command numbers (quietvm-abi's `CMD_*`).
pub mod command {
    /// The guest agrees to an offline request; returns when the vCPU is back online.
    pub use quietvm_abi::timer::CMD_OFFLINE_ACK as OFFLINE_ACK;
    pub use quietvm_abi::timer::{
        CMD_ACK as ACK, CMD_ARM as ARM, CMD_CANCEL as CANCEL, CMD_CANCEL_SYNC as CANCEL_SYNC,
        CMD_NOW as NOW, CMD_POP as POP,
    };
    /// Queue mode (`runtime::queues`): turn it on for this vCPU; make quietvm read the submission ring.
    pub use quietvm_abi::timer::{CMD_ENABLE_QUEUES as ENABLE_QUEUES, CMD_SYNC as SYNC};
}

/// What a command answers in `status` (quietvm-abi's), and each one's name for messages.
pub mod status {
    pub use quietvm_abi::timer::{
        BAD_ACCESS, BAD_ACK, DEADLOCK, EMPTY, INVALID, OK, PAST, RUNNING, UNKNOWN_COMMAND,
    };

    pub fn name(status: u32) -> &'static str {
        match status {
            OK => "OK",
            EMPTY => "EMPTY",
            PAST => "PAST",
            RUNNING => "RUNNING",
            DEADLOCK => "DEADLOCK",
            BAD_ACK => "BAD_ACK",
            INVALID => "INVALID",
            UNKNOWN_COMMAND => "UNKNOWN_COMMAND",
            BAD_ACCESS => "BAD_ACCESS",
            _ => "(unknown status)",
        }
    }
}

/// What every command answers.
#[derive(Clone, Copy, Debug)]
pub struct Reply {
    pub status: u32,
    pub value: u64,
    pub now: u64,
}

/// A timer handed over by `POP`: its callback now runs on this vCPU.
#[derive(Clone, Copy, Debug)]
pub struct Expired {
    pub id: u32,
    /// The vCPU on whose queue it was armed.
    pub owner: u32,
    pub deadline: u64,
    pub fired_at: u64,
    /// The slack quietvm applied (`exp_slack`); 0 under kvm-lapic, which has none.
    pub slack: u64,
}

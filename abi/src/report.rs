//! The timer report (docs/boot.md, "The timer report"): under `--policy kvm-lapic`, where quietvm
//! cannot count the guest's timers, the guest writes its figures here and a 32-bit `out` of the
//! report's page number (its address `>> PAGE_SHIFT`) to [`crate::ports::REPORT_PORT`].

use core::mem::offset_of;

/// `magic`: the bytes `QVMRPT01`, little endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"QVMRPT01");
/// `version`.
pub const VERSION: u32 = 1;
/// The report is 4 KiB-aligned; the report port takes its address shifted right by this.
pub const PAGE_SHIFT: u32 = 12;
/// More lateness samples per vCPU than this make quietvm ignore the whole report.
pub const MAX_SAMPLES_PER_VCPU: u64 = 1 << 24;

/// The report's header; [`VcpuEntry`]s follow it, one per vCPU.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: u64,
    /// [`VERSION`].
    pub version: u32,
    /// Must equal the VM's vCPU count.
    pub vcpus: u32,
    /// Successful arms.
    pub armed: u64,
    /// Timers handed to a callback.
    pub fired: u64,
    /// Cancels that stopped a pending arming.
    pub cancelled: u64,
    /// Fired before their deadline.
    pub early: u64,
    /// Deadline passed, neither fired nor cancelled, when the report was written.
    pub missed: u64,
    /// Fired on another vCPU than the one that armed them.
    pub remote_expiries: u64,
    /// Expiries held back while the timer's previous callback ran.
    pub serialized: u64,
    pub reserved: [u64; 7],
}

/// vCPU `i`'s entry, at `VCPUS + VCPU_ENTRY_SIZE * i`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VcpuEntry {
    /// Timers fired on this vCPU.
    pub fired: u64,
    /// Of those, armed on another vCPU.
    pub remote_fired: u64,
    /// The guest address of its lateness samples: u32 ns each, (handed to the callback) minus
    /// (deadline), saturated at `0xffff_ffff`.
    pub samples_addr: u64,
    /// Their count.
    pub samples_len: u64,
}

/// Byte offsets in the report.
pub mod offset {
    use super::*;

    pub const MAGIC: u64 = offset_of!(Header, magic) as u64;
    pub const VERSION: u64 = offset_of!(Header, version) as u64;
    pub const VCPUS: u64 = offset_of!(Header, vcpus) as u64;
    pub const ARMED: u64 = offset_of!(Header, armed) as u64;
    pub const FIRED: u64 = offset_of!(Header, fired) as u64;
    pub const CANCELLED: u64 = offset_of!(Header, cancelled) as u64;
    pub const EARLY: u64 = offset_of!(Header, early) as u64;
    pub const MISSED: u64 = offset_of!(Header, missed) as u64;
    pub const REMOTE_EXPIRIES: u64 = offset_of!(Header, remote_expiries) as u64;
    pub const SERIALIZED: u64 = offset_of!(Header, serialized) as u64;
    /// The first [`VcpuEntry`].
    pub const VCPU_ENTRIES: u64 = core::mem::size_of::<Header>() as u64;

    /// Offsets in a [`VcpuEntry`].
    pub const ENTRY_FIRED: u64 = offset_of!(VcpuEntry, fired) as u64;
    pub const ENTRY_REMOTE_FIRED: u64 = offset_of!(VcpuEntry, remote_fired) as u64;
    pub const ENTRY_SAMPLES_ADDR: u64 = offset_of!(VcpuEntry, samples_addr) as u64;
    pub const ENTRY_SAMPLES_LEN: u64 = offset_of!(VcpuEntry, samples_len) as u64;
}

/// The size of one [`VcpuEntry`].
pub const VCPU_ENTRY_SIZE: u64 = core::mem::size_of::<VcpuEntry>() as u64;

//! The boot info quietvm leaves at 0x2000 (docs/boot.md) and the `key=value` launch arguments.

use core::mem::offset_of;
use core::sync::atomic::{AtomicPtr, Ordering};

/// Where the boot info lives; the ring-0 fatal printer reads the ports from here.
pub const BOOT_INFO_ADDR: usize = 0x2000;
pub const MAGIC: u64 = 0x3154_4f4f_424d_5651; // "QVMBOOT1"
pub const VERSION: u32 = 1;

#[repr(C)]
pub struct BootInfo {
    pub magic: u64,
    pub version: u32,
    pub vcpus: u32,
    pub mem_size: u64,
    pub device_pages: u64,
    pub percpu_base: u64,
    pub percpu_size: u64,
    pub free_base: u64,
    pub serial_port: u16,
    pub exit_port: u16,
    pub timer_port: u16,
    pub doorbell_vector: u8,
    pub reserved: u8,
    pub max_timers: u32,
    pub args_len: u32,
    pub args: [u8; 512],
    /// The guest TSC's frequency (0 if quietvm could not tell).
    pub tsc_khz: u32,
    /// Where the guest's timer report goes under `policy=kvm-lapic` (runtime::soft_timers).
    pub report_port: u16,
    pub reserved2: u16,
    /// A file quietvm placed in guest memory for the workload (the config's `payload`, e.g. the
    /// `replay` workload's trace); 0 and 0 if none.
    pub payload_base: u64,
    pub payload_len: u64,
}

/// Offsets used by the assembly (checked against the struct below).
pub mod offset {
    pub const PERCPU_SIZE: usize = 0x28;
    pub const SERIAL_PORT: usize = 0x38;
    pub const EXIT_PORT: usize = 0x3a;
}

const _: () = {
    assert!(offset_of!(BootInfo, vcpus) == 0x0c);
    assert!(offset_of!(BootInfo, percpu_size) == offset::PERCPU_SIZE);
    assert!(offset_of!(BootInfo, serial_port) == offset::SERIAL_PORT);
    assert!(offset_of!(BootInfo, exit_port) == offset::EXIT_PORT);
    assert!(offset_of!(BootInfo, timer_port) == 0x3c);
    assert!(offset_of!(BootInfo, doorbell_vector) == 0x3e);
    assert!(offset_of!(BootInfo, max_timers) == 0x40);
    assert!(offset_of!(BootInfo, args_len) == 0x44);
    assert!(offset_of!(BootInfo, args) == 0x48);
    assert!(offset_of!(BootInfo, tsc_khz) == 0x248);
    assert!(offset_of!(BootInfo, report_port) == 0x24c);
    assert!(offset_of!(BootInfo, payload_base) == 0x250);
    assert!(offset_of!(BootInfo, payload_len) == 0x258);
};

static BOOT: AtomicPtr<BootInfo> = AtomicPtr::new(BOOT_INFO_ADDR as *mut BootInfo);

/// Records the boot info address each vCPU was given (all give the same one).
pub fn set(info: *const BootInfo) {
    BOOT.store(info as *mut BootInfo, Ordering::Relaxed);
}

pub fn info() -> &'static BootInfo {
    // SAFETY: quietvm placed the boot info there before start and never changes it; the page is
    // mapped and user-accessible (docs/boot.md).
    unsafe { &*BOOT.load(Ordering::Relaxed) }
}

/// The payload quietvm placed in guest memory, if any.
pub fn payload() -> Option<&'static [u8]> {
    let info = info();
    let (base, len) = (info.payload_base, info.payload_len);
    if base == 0 || len == 0 || base.checked_add(len)? > info.mem_size {
        return None;
    }
    // SAFETY: quietvm wrote `len` bytes at `base`, inside guest memory (checked above), before start,
    // below `free_base` so that nothing else is placed there; it is identity-mapped and never changed.
    Some(unsafe { core::slice::from_raw_parts(base as usize as *const u8, len as usize) })
}

/// The launch arguments, as given (ASCII).
pub fn args() -> &'static str {
    let info = info();
    let len = (info.args_len as usize).min(info.args.len() - 1);
    let bytes = &info.args[..len];
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(len);
    core::str::from_utf8(&bytes[..len]).unwrap_or("")
}

/// The value of `key=value` in the arguments (the last one if repeated).
pub fn arg(key: &str) -> Option<&'static str> {
    let mut found = None;
    for word in args().split(' ') {
        if let Some((k, v)) = word.split_once('=') {
            if k == key {
                found = Some(v);
            }
        }
    }
    found
}

/// A numeric argument (decimal, or hex with `0x`); a malformed one ends the VM with a usage error.
pub fn arg_u64(key: &str, default: u64) -> u64 {
    match arg(key) {
        None => default,
        Some(text) => parse_u64(text).unwrap_or_else(|| {
            crate::runtime::vm::usage_error(format_args!(
                "guest: argument {}={} is not a number",
                key, text
            ))
        }),
    }
}

fn parse_u64(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

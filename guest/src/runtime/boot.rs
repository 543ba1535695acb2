//! The boot info quietvm leaves at `quietvm_abi::boot::BOOT_INFO` (docs/boot.md) and the `key=value`
//! launch arguments.

use core::sync::atomic::{AtomicPtr, Ordering};

// The layout, magic and version are the guest ABI's (quietvm-abi).
pub use quietvm_abi::boot::{BootInfo, MAGIC, VERSION};

/// Where the boot info lives; the ring-0 fatal printer reads the ports from here.
pub const BOOT_INFO_ADDR: usize = quietvm_abi::boot::BOOT_INFO as usize;

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

/// A numeric argument (decimal, or hex with `0x`), `default` if absent; `Err` with the text if it is
/// malformed (`workloads::arg_u64` ends the VM with a usage error then).
pub fn arg_u64(key: &str, default: u64) -> Result<u64, &'static str> {
    match arg(key) {
        None => Ok(default),
        Some(text) => parse_u64(text).ok_or(text),
    }
}

fn parse_u64(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

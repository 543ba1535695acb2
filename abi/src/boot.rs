//! The boot protocol (docs/boot.md): the memory map below the image, the boot info, the entry state.

use core::mem::offset_of;

/// The size of a page, of a timer-device page ([`crate::timer::DEVICE_PAGE_SIZE`]) and the alignment
/// of `device_pages` (docs/boot.md, "Memory map").
pub const PAGE_SIZE: u64 = 4096;

/// quietvm's boot GDT: null, 64-bit code ([`CODE_SELECTOR`]), data ([`DATA_SELECTOR`]) (docs/boot.md,
/// "Memory map").
pub const BOOT_GDT: u64 = 0x1000;
/// The boot info ([`BootInfo`]); every vCPU gets this address in `rsi` at entry.
pub const BOOT_INFO: u64 = 0x2000;
/// The PML4 of the identity map: `CR3` at entry.
pub const PML4: u64 = 0x1_0000;
/// The page-directory-pointer table, after the PML4.
pub const PDPT: u64 = 0x1_1000;
/// The first page directory; one per GiB of guest memory follows.
pub const FIRST_PD: u64 = 0x1_2000;
/// The lowest address an image's `PT_LOAD` segment may use (1 MiB).
pub const IMAGE_BASE: u64 = 0x10_0000;
/// The size of each vCPU's per-vCPU area (`percpu_base + PERCPU_SIZE * index`), and the boot info's
/// `percpu_size`: 128 KiB.
pub const PERCPU_SIZE: u64 = 128 * 1024;

/// `CS` at entry: the boot GDT's 64-bit code segment (docs/boot.md, "Entry state").
pub const CODE_SELECTOR: u16 = 0x08;
/// `DS`, `ES`, `SS`, `FS` and `GS` at entry: the boot GDT's data segment.
pub const DATA_SELECTOR: u16 = 0x10;

/// The boot info's `magic`: the bytes `QVMBOOT1`, little endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"QVMBOOT1");
/// The boot info's `version`: the ABI's version.
pub const VERSION: u32 = crate::ABI_VERSION;
/// The size of the boot info's `args` field: NUL-terminated, so at most `ARGS_SIZE - 1` characters.
pub const ARGS_SIZE: usize = 512;

/// The boot info quietvm writes at [`BOOT_INFO`] before any vCPU runs (docs/boot.md, "Boot info").
/// Fields the table there marks reserved are 0.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BootInfo {
    /// [`MAGIC`].
    pub magic: u64,
    /// [`VERSION`].
    pub version: u32,
    /// The number of vCPUs.
    pub vcpus: u32,
    /// Bytes of guest memory.
    pub mem_size: u64,
    /// The first timer-device page: vCPU `i`'s is at `device_pages + DEVICE_PAGE_SIZE * i`.
    pub device_pages: u64,
    /// The first per-vCPU area: vCPU `i`'s is at `percpu_base + percpu_size * i`.
    pub percpu_base: u64,
    /// [`PERCPU_SIZE`].
    pub percpu_size: u64,
    /// Free, zeroed memory from here to `mem_size`.
    pub free_base: u64,
    /// [`crate::ports::SERIAL_PORT`].
    pub serial_port: u16,
    /// [`crate::ports::EXIT_PORT`].
    pub exit_port: u16,
    /// [`crate::ports::TIMER_PORT`].
    pub timer_port: u16,
    /// [`crate::timer::DOORBELL_VECTOR`].
    pub doorbell_vector: u8,
    pub reserved: u8,
    /// Timer ids are `0 .. max_timers`, shared by all vCPUs.
    pub max_timers: u32,
    /// The length of `args` without its NUL.
    pub args_len: u32,
    /// NUL-terminated ASCII, space-separated `key=value` words.
    pub args: [u8; ARGS_SIZE],
    /// The guest TSC's frequency in kHz (0 if KVM cannot tell).
    pub tsc_khz: u32,
    /// [`crate::ports::REPORT_PORT`].
    pub report_port: u16,
    pub reserved2: u16,
    /// Where quietvm placed the config's `payload` file (just below `free_base`), 0 if none.
    pub payload_base: u64,
    /// Its length in bytes, 0 if none.
    pub payload_len: u64,
    /// The timer device's per-timer state words ([`crate::queue::State`], `max_timers` × u64, shared
    /// by all vCPUs), for queue mode; 0 if the VM has no timer device. Added without a version bump:
    /// an image that never enables queue mode never reads it.
    pub timer_states: u64,
}

/// Byte offsets of the [`BootInfo`] fields, for code that writes or reads them one by one (the VMM,
/// the guest's assembly).
pub mod offset {
    use super::*;

    pub const MAGIC: u64 = offset_of!(BootInfo, magic) as u64;
    pub const VERSION: u64 = offset_of!(BootInfo, version) as u64;
    pub const VCPUS: u64 = offset_of!(BootInfo, vcpus) as u64;
    pub const MEM_SIZE: u64 = offset_of!(BootInfo, mem_size) as u64;
    pub const DEVICE_PAGES: u64 = offset_of!(BootInfo, device_pages) as u64;
    pub const PERCPU_BASE: u64 = offset_of!(BootInfo, percpu_base) as u64;
    pub const PERCPU_SIZE: u64 = offset_of!(BootInfo, percpu_size) as u64;
    pub const FREE_BASE: u64 = offset_of!(BootInfo, free_base) as u64;
    pub const SERIAL_PORT: u64 = offset_of!(BootInfo, serial_port) as u64;
    pub const EXIT_PORT: u64 = offset_of!(BootInfo, exit_port) as u64;
    pub const TIMER_PORT: u64 = offset_of!(BootInfo, timer_port) as u64;
    pub const DOORBELL_VECTOR: u64 = offset_of!(BootInfo, doorbell_vector) as u64;
    pub const MAX_TIMERS: u64 = offset_of!(BootInfo, max_timers) as u64;
    pub const ARGS_LEN: u64 = offset_of!(BootInfo, args_len) as u64;
    pub const ARGS: u64 = offset_of!(BootInfo, args) as u64;
    pub const TSC_KHZ: u64 = offset_of!(BootInfo, tsc_khz) as u64;
    pub const REPORT_PORT: u64 = offset_of!(BootInfo, report_port) as u64;
    pub const PAYLOAD_BASE: u64 = offset_of!(BootInfo, payload_base) as u64;
    pub const PAYLOAD_LEN: u64 = offset_of!(BootInfo, payload_len) as u64;
    pub const TIMER_STATES: u64 = offset_of!(BootInfo, timer_states) as u64;
}

/// The boot info's size: it ends with `timer_states`.
pub const BOOT_INFO_SIZE: u64 = core::mem::size_of::<BootInfo>() as u64;

// The boot info fits in its page, below the page tables.
const _: () = assert!(BOOT_INFO_SIZE <= PAGE_SIZE);
const _: () = assert!(BOOT_INFO + PAGE_SIZE <= PML4);

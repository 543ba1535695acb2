//! The PVH entry (`pvh.s`): how a foreign VMM such as QEMU starts this image (docs/qemu.md). The
//! assembly copies the VMM's command line and memory map here and enters `_start` on vCPU 0; this
//! module hands them to the runtime and starts the other vCPUs (INIT, SIPI to the real-mode
//! trampoline).

use core::arch::global_asm;

/// The Xen ELF note type of the 32-bit PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// The command line copy: at most `CMDLINE_SIZE - 1` bytes, NUL-terminated.
pub const CMDLINE_SIZE: usize = quietvm_abi::boot::ARGS_SIZE;
/// Memory map entries copied (more are ignored).
pub const MEMMAP_MAX: usize = 32;
/// The debug-exit port of QEMU's `isa-debug-exit` device, as docs/qemu.md configures it.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Where the other vCPUs start: below 1 MiB, page-aligned, in no area docs/boot.md uses; the SIPI's
/// vector is its page number.
pub const TRAMPOLINE: usize = 0x8000;
const _: () = assert!(TRAMPOLINE < 0x10_0000 && TRAMPOLINE.is_multiple_of(4096));
const _: () = assert!(
    TRAMPOLINE >= (quietvm_abi::boot::BOOT_INFO + 4096) as usize
        && TRAMPOLINE + 4096 <= quietvm_abi::boot::PML4 as usize
);

/// hvm_memmap_table_entry type of RAM.
pub const MEMMAP_RAM: u32 = 1;

/// CR0 of docs/boot.md's entry state: PE, MP, ET, NE, WP, PG.
const CR0: u32 = 0x8001_0033;
/// CR4: PAE, OSFXSR, OSXMMEXCPT (SSE at ring 3).
const CR4: u32 = 0x620;
const MSR_EFER: u32 = 0xc000_0080;
const EFER_LME: u32 = 1 << 8;

global_asm!(
    include_str!("pvh.s"),
    XEN_ELFNOTE_PHYS32_ENTRY = const XEN_ELFNOTE_PHYS32_ENTRY,
    CMDLINE_SIZE = const CMDLINE_SIZE,
    MEMMAP_MAX = const MEMMAP_MAX,
    PML4 = const quietvm_abi::boot::PML4,
    PDPT = const quietvm_abi::boot::PDPT,
    FIRST_PD = const quietvm_abi::boot::FIRST_PD,
    BOOT_INFO = const quietvm_abi::boot::BOOT_INFO,
    BI_PERCPU_BASE = const quietvm_abi::boot::offset::PERCPU_BASE,
    BI_PERCPU_SIZE = const quietvm_abi::boot::offset::PERCPU_SIZE,
    BI_SERIAL_PORT = const quietvm_abi::boot::offset::SERIAL_PORT,
    BI_EXIT_PORT = const quietvm_abi::boot::offset::EXIT_PORT,
    PERCPU_SIZE = const quietvm_abi::boot::PERCPU_SIZE,
    SERIAL_PORT = const quietvm_abi::ports::SERIAL_PORT,
    DEBUG_EXIT_PORT = const DEBUG_EXIT_PORT,
    TRAMPOLINE = const TRAMPOLINE,
    CR0 = const CR0,
    CR4 = const CR4,
    MSR_EFER = const MSR_EFER,
    EFER_LME = const EFER_LME,
);

/// One entry of the VMM's memory map (hvm_memmap_table_entry).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

extern "C" {
    static quietvm_pvh_booted: u32;
    static quietvm_pvh_memmap_entries: u32;
    static quietvm_pvh_cmdline: [u8; CMDLINE_SIZE];
    static quietvm_pvh_memmap: [MemmapEntry; MEMMAP_MAX];
    static quietvm_pvh_module: [u64; 2];
    static quietvm_ap_trampoline: u8;
    static quietvm_ap_trampoline_end: u8;
}

/// Whether this vCPU 0 came in through the PVH entry (0 in the image: quietvm's entry leaves it).
pub fn booted() -> bool {
    // SAFETY: a u32 in .bss, written only by the 32-bit entry before any Rust code ran.
    unsafe { core::ptr::read_volatile(&raw const quietvm_pvh_booted) != 0 }
}

/// The VMM's command line as the entry copied it (up to its first NUL).
pub fn cmdline() -> &'static [u8] {
    // SAFETY: written once by the 32-bit entry, read-only since; its last byte is always 0.
    let all: &[u8; CMDLINE_SIZE] = unsafe { &quietvm_pvh_cmdline };
    let len = all.iter().position(|&b| b == 0).unwrap_or(CMDLINE_SIZE - 1);
    &all[..len]
}

/// The VMM's memory map as the entry copied it (empty if the start info had none).
pub fn memmap() -> &'static [MemmapEntry] {
    // SAFETY: written once by the 32-bit entry, read-only since; the count was clamped there.
    unsafe {
        let n = (core::ptr::read_volatile(&raw const quietvm_pvh_memmap_entries) as usize)
            .min(MEMMAP_MAX);
        &quietvm_pvh_memmap[..n]
    }
}

/// The first module the VMM passed (`-initrd`): its guest-physical address and size, if any.
pub fn module() -> Option<(u64, u64)> {
    // SAFETY: written once by the 32-bit entry, read-only since.
    let [base, len] = unsafe { core::ptr::read_volatile(&raw const quietvm_pvh_module) };
    (base != 0 && len != 0).then_some((base, len))
}

/// The real-mode trampoline's code, for copying to [`TRAMPOLINE`].
pub fn trampoline() -> &'static [u8] {
    // SAFETY: two labels around the trampoline in .rodata (pvh.s), end after start.
    unsafe {
        let start = &raw const quietvm_ap_trampoline;
        let end = &raw const quietvm_ap_trampoline_end;
        core::slice::from_raw_parts(start, end.offset_from(start) as usize)
    }
}

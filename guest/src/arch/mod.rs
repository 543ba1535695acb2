//! Everything x86-specific: the ring-0 stubs (`ring0.s`), the ring-3 upcall trampoline (`upcall.s`),
//! the IDT (written from ring 3, [`idt`]) and wrappers for the few instructions the runtime needs.
//!
//! Ring 0 is assembly only: on nested KVM it is emulated and cannot run SSE, which rustc's prebuilt
//! `core` uses. See docs/guest.md for the ring-0/ring-3 split and the upcall.
//!
//! This is the lowest layer: it knows the ABI (quietvm-abi) and the CPU, not the runtime. What it needs
//! from above is named here and provided by the layer above: the ring-3 entry point `guest_main` and
//! the doorbell handler `quietvm_doorbell` (extern symbols), the per-vCPU data's two interrupt flags
//! (at [`layout::IRQ_MASKED`] and [`layout::IRQ_PENDING`]), and the LAPIC timer vector (an argument of
//! [`idt::init`]).

pub mod idt;
pub mod pvh;

use core::arch::{asm, global_asm};

/// The per-vCPU area (`percpu_base + percpu_size * index`, zeroed at boot): offsets of what lives in it.
pub mod layout {
    /// 256 interrupt gates of 16 bytes.
    pub const IDT: usize = 0x0000;
    /// null, kernel code, kernel data, user data, user code, TSS (two entries).
    pub const GDT: usize = 0x1000;
    /// u64: the vCPU index, for the ring-0 fatal-exception printer.
    pub const CPU_INDEX: usize = 0x1040;
    /// The 64-bit TSS (0x68 bytes) and its I/O permission bitmap (8 KiB + 1), up to 0x30e9.
    pub const TSS: usize = 0x1080;
    /// The ring-3 runtime's per-vCPU data, one page. It starts with the software interrupt mask and
    /// pending flag (u32 each, at the offsets below), which the ring-0 stubs read and write.
    pub const PERCPU_DATA: usize = 0x4000;
    /// In the per-vCPU data: the doorbell is masked (nonzero).
    pub const IRQ_MASKED: usize = 0;
    /// In the per-vCPU data: a doorbell came while masked (set to 1 by the ring-0 stubs).
    pub const IRQ_PENDING: usize = 4;
    /// In the per-vCPU data, at its page's end: u64, the halts the #GP stub executed (`hlt` that went
    /// to the VMM or the kernel), which the guest reports under a foreign VMM (runtime::pvh).
    pub const HALTS: usize = 0xff8;
    /// One page of ring-0 stack; its top is TSS.RSP0.
    pub const R0_STACK: usize = 0x5000;
    pub const R0_STACK_TOP: usize = 0x6000;
    // The ring-3 stack runs from the end of the area down to 0x6000.
    /// The smallest per-vCPU area the guest can run in (the ABI gives 128 KiB).
    pub const MIN_AREA: usize = 0x10000;
}

/// Selectors of the per-vCPU GDT built by `ring0.s`.
pub mod selector {
    pub const KERNEL_CS: u16 = 0x08;
    /// Kernel data: `SS` keeps its boot value, which must be this.
    pub const KERNEL_DS: u16 = 0x10;
    pub const USER_DS: u16 = 0x18 | 3;
    pub const USER_CS: u16 = 0x20 | 3;
    pub const TSS: u16 = 0x28;

    // ring0.s keeps the boot CS and SS (docs/boot.md): its GDT has the kernel segments there too.
    const _: () = assert!(KERNEL_CS == quietvm_abi::boot::CODE_SELECTOR);
    const _: () = assert!(KERNEL_DS == quietvm_abi::boot::DATA_SELECTOR);
}

/// Model-specific registers the guest writes (`wrmsr`): the x2APIC's and the TSC deadline.
pub mod msr {
    pub const APIC_BASE: u32 = 0x1b;
    pub const TSC_DEADLINE: u32 = 0x6e0;
    pub const X2APIC_EOI: u32 = 0x80b;
    pub const X2APIC_SVR: u32 = 0x80f;
    pub const X2APIC_ICR: u32 = 0x830;
    pub const X2APIC_LVT_TIMER: u32 = 0x832;
}

/// The exit code the ring-0 fatal-exception stub writes to the exit port (docs/guest.md).
pub const EXIT_EXCEPTION: u32 = 90;

/// The TSS: 0x68 bytes, then the I/O permission bitmap (8 KiB: all 65536 ports) and its 0xff end byte.
const IOPB_OFFSET: usize = 0x68;
const TSS_LIMIT: u64 = (IOPB_OFFSET + 8192) as u64;
/// Low quadword of the TSS descriptor without its base: limit, type 9 (available 64-bit TSS), present.
const TSS_DESC_LOW: u64 = TSS_LIMIT | (0x89 << 40);
/// Ring 3 runs with IF=1 and IOPL 0 (port I/O goes through the TSS's I/O bitmap).
const RFLAGS_USER: u64 = (1 << 9) | 2;

/// `rax` value that makes a ring-3 `ud2` end in a triple fault (`triple_fault`).
const TRIPLE_FAULT_MAGIC: u64 = 0x5452_4950_4c45_4621;

// Provided by the layers above (see the module docs); called from the assembly, and the doorbell
// handler also from `run_doorbell_handler`.
extern "C" {
    /// The ring-3 entry, `guest_main(cpu index, boot info address) -> !`, entered by `iretq`.
    fn guest_main(cpu: u64, info: *const quietvm_abi::boot::BootInfo) -> !;
    /// The doorbell handler the upcall trampoline calls (with the doorbell unmasked when it rang), and
    /// [`run_doorbell_handler`] (for one that rang masked).
    fn quietvm_doorbell();
}

global_asm!(
    include_str!("ring0.s"),
    BI_PERCPU_SIZE = const quietvm_abi::boot::offset::PERCPU_SIZE,
    BI_SERIAL_PORT = const quietvm_abi::boot::offset::SERIAL_PORT,
    BI_EXIT_PORT = const quietvm_abi::boot::offset::EXIT_PORT,
    BOOT_INFO = const quietvm_abi::boot::BOOT_INFO,
    IDT = const layout::IDT,
    IDT_LIMIT = const 256 * 16 - 1,
    GDT = const layout::GDT,
    GDT_LIMIT = const 7 * 8 - 1,
    TSS = const layout::TSS,
    CPU_INDEX = const layout::CPU_INDEX,
    R0_STACK = const layout::R0_STACK,
    R0_STACK_TOP = const layout::R0_STACK_TOP,
    TSS_SEL = const selector::TSS,
    TSS_DESC_LOW = const TSS_DESC_LOW,
    IOPB_OFFSET = const IOPB_OFFSET,
    IOPB_END = const IOPB_OFFSET + 8192,
    USER_DS = const selector::USER_DS,
    USER_CS = const selector::USER_CS,
    RFLAGS_USER = const RFLAGS_USER,
    PERCPU_DATA = const layout::PERCPU_DATA,
    IRQ_MASKED = const layout::IRQ_MASKED,
    IRQ_PENDING = const layout::IRQ_PENDING,
    HALTS = const layout::HALTS,
    TRIPLE_FAULT_MAGIC = const TRIPLE_FAULT_MAGIC,
    EXIT_EXCEPTION = const EXIT_EXCEPTION,
    MSR_X2APIC_EOI = const msr::X2APIC_EOI,
    guest_main = sym guest_main,
);

global_asm!(include_str!("upcall.s"), doorbell = sym quietvm_doorbell);

/// Unmasks the doorbell (the software mask at [`layout::IRQ_MASKED`]) and halts until it rings, atomically: at ring 3 `hlt` traps
/// to the #GP stub, which does both with interrupts off (ring0.s). Returns after the doorbell's handler
/// has run (or at once if a doorbell was pending), with the doorbell unmasked.
#[inline(always)]
pub fn unmask_and_halt() {
    // SAFETY: the #GP stub steps over the hlt and returns here with every register preserved (the upcall
    // saves what the doorbell handler clobbers); memory may change meanwhile, hence no `nomem`.
    unsafe { asm!("hlt", options(nostack)) };
}

/// Runs the doorbell handler that the layer above provides (`quietvm_doorbell`), as the upcall
/// trampoline does: for a doorbell that rang while masked, when ring 3 unmasks (`runtime::irq`).
#[inline(always)]
pub fn run_doorbell_handler() {
    // SAFETY: an ordinary ring-3 function without arguments or preconditions (the runtime's doorbell
    // handler), the same one the upcall trampoline calls.
    unsafe { quietvm_doorbell() }
}

#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O at ring 3, allowed by the TSS I/O bitmap; a port of quietvm's devices (or ignored).
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) };
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nostack, preserves_flags)) };
    value
}

/// A 32-bit `out`. Not `nomem`: quietvm's timer device reads and writes the device page during it.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    };
}

/// A 16-bit `out` (only to check that the timer device refuses it).
#[inline(always)]
pub fn outw(port: u16, value: u16) {
    // SAFETY: as `outb`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nostack, preserves_flags)) };
}

#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack, preserves_flags))
    };
    value
}

/// Writes `value` to model-specific register `msr`. At ring 3 `wrmsr` raises #GP, and the ring-0 stub
/// executes it for us and steps over it (ring0.s): one emulated trap on hosts that emulate ring 0.
#[inline(always)]
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the #GP stub executes the wrmsr with these registers and returns after it, preserving
    // every register and the flags; the MSRs written are the local APIC's (`msr`), whose interrupts
    // go through the doorbell machinery like quietvm's, hence no `nomem`.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags))
    };
}

/// The time-stamp counter (ring 3 may read it: CR4.TSD is clear).
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the TSC.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

#[inline(always)]
pub fn stack_pointer() -> usize {
    let rsp: usize;
    // SAFETY: reads rsp.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    rsp
}

/// Ends the VM in a triple fault: `ud2` with the magic the fatal-exception stub recognises.
pub fn triple_fault() -> ! {
    // SAFETY: does not return; the stub never comes back.
    unsafe { asm!("ud2", in("rax") TRIPLE_FAULT_MAGIC, options(noreturn, nostack)) }
}

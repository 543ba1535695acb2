//! The vCPU's own local APIC, in x2APIC mode, for `policy=kvm-lapic`: quietvm then gives the VM KVM's
//! in-kernel irqchip and no timer device, and the guest multiplexes its software timers
//! (`soft_timers`) onto the LAPIC's TSC-deadline timer, as a Linux guest does.
//!
//! The clock is the TSC (natively readable at ring 3) scaled by the boot info's `tsc_khz`. Every MSR
//! write goes through the ring-0 #GP stub (`arch::wrmsr`), an emulated trap on the project's hosts, so
//! callers write only what changed.

use super::boot;
use crate::arch::{self, msr};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The LAPIC timer's vector, also sent as an IPI when another vCPU must look at its timers. Its stub
/// EOIs and then runs the doorbell upcall (arch/ring0.s).
pub const TIMER_VECTOR: u8 = 0xec;
/// The spurious-interrupt vector (its gate only returns; spurious interrupts take no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xff;

const APIC_BASE_DEFAULT: u64 = 0xfee0_0000;
const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const SVR_ENABLE: u64 = 1 << 8;
const LVT_TSC_DEADLINE: u64 = 0b10 << 17;
/// ICR: fixed delivery, physical destination, level "assert".
const ICR_ASSERT: u64 = 1 << 14;

static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The TSC at guest time 0 (vCPU 0's, at its `init`; 0 until then).
static TSC_BASE: AtomicU64 = AtomicU64::new(0);

/// Whether the launch arguments ask for this backend (quietvm always passes `policy=`), or the VM came
/// in through the PVH entry (a foreign VMM: its in-kernel LAPIC is all there is).
pub fn wanted() -> bool {
    boot::arg("policy") == Some("kvm-lapic") || crate::arch::pvh::booted()
}

/// Whether this backend is in use (set by `init` on every vCPU before its workload starts).
#[inline]
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// Puts this vCPU's LAPIC in x2APIC mode with its TSC-deadline timer on `TIMER_VECTOR`, disarmed, and
/// starts the guest clock (vCPU 0; the others wait for it, so that no vCPU reads the clock before).
/// Needs the IDT (arch::idt) and a nonzero `tsc_khz`.
pub fn init(cpu: u32) {
    ACTIVE.store(true, Ordering::Relaxed);
    if cpu == 0 {
        TSC_BASE.store(arch::rdtsc().max(1), Ordering::Release);
    }
    while TSC_BASE.load(Ordering::Acquire) == 0 {
        arch::pause();
    }
    let bsp = if cpu == 0 { APIC_BASE_BSP } else { 0 };
    arch::wrmsr(
        msr::APIC_BASE,
        APIC_BASE_DEFAULT | APIC_BASE_ENABLE | APIC_BASE_X2APIC | bsp,
    );
    arch::wrmsr(msr::X2APIC_SVR, SVR_ENABLE | u64::from(SPURIOUS_VECTOR));
    arch::wrmsr(
        msr::X2APIC_LVT_TIMER,
        LVT_TSC_DEADLINE | u64::from(TIMER_VECTOR),
    );
}

fn tsc_khz() -> u128 {
    u128::from(boot::info().tsc_khz)
}

/// The guest clock in ns since vCPU 0 started it: the TSC, which KVM keeps in step across vCPUs (where
/// it starts depends on the host: near 0 on hardware KVM, the host's own TSC on nested PVM).
#[inline]
pub fn now() -> u64 {
    let ticks = arch::rdtsc().saturating_sub(TSC_BASE.load(Ordering::Relaxed));
    (u128::from(ticks) * 1_000_000 / tsc_khz()) as u64
}

/// The first TSC value at which `now()` reads at least `ns`: `now()` rounds down, so a deadline
/// rounded up never fires before its time.
pub fn tsc_at(ns: u64) -> u64 {
    let ticks = (u128::from(ns) * tsc_khz()).div_ceil(1_000_000) as u64;
    TSC_BASE.load(Ordering::Relaxed).saturating_add(ticks)
}

/// Programs this vCPU's TSC-deadline timer to fire at guest time `ns`, or disarms it (`None`). A
/// deadline already past fires at once.
pub fn set_deadline(ns: Option<u64>) {
    arch::wrmsr(msr::TSC_DEADLINE, ns.map_or(0, |ns| tsc_at(ns).max(1)));
}

/// Interrupts vCPU `cpu` with `TIMER_VECTOR` (its x2APIC id is its index).
pub fn send_ipi(cpu: u32) {
    arch::wrmsr(
        msr::X2APIC_ICR,
        (u64::from(cpu) << 32) | ICR_ASSERT | u64::from(TIMER_VECTOR),
    );
}

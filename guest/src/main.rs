//! quietvm's built-in test guest: a freestanding x86-64 ELF (docs/boot.md) that runs one of the timer
//! workloads in `workloads/` and ends the VM with exit code 0 if all of its checks passed.
//!
//! - `arch/`: ring-0 assembly (entry, GDT/TSS, #GP halt path, doorbell upcall, fatal exceptions) and
//!   the ring-3 upcall trampoline. Everything else runs at ring 3 (docs/guest.md says why).
//! - `runtime/`: boot info, console, timer device client, doorbell handler, locks, memory, time.
//! - `checks.rs`: the per-arming verification all timer workloads share.
//! - `workloads/`: one file per workload.

#![no_std]
#![no_main]
// Every unsafe block says why it is sound (as the VMM's `[lints.clippy]` asks there).
#![deny(clippy::undocumented_unsafe_blocks)]

#[macro_use]
mod runtime;
mod arch;
mod checks;
mod workloads;

use runtime::boot::{self, BootInfo};
use runtime::device::Expired;
use runtime::vm;

/// The workloads' timer callback, which the runtime's doorbell handler calls.
static ON_TIMER: fn(&Expired) = workloads::on_timer;

/// Entered at ring 3 from `_start` (arch/ring0.s) on every vCPU: the symbol arch/ needs.
#[no_mangle]
extern "C" fn guest_main(cpu: u64, info: *const BootInfo) -> ! {
    // Under a foreign VMM (the PVH entry) vCPU 0 builds the boot info first; the other vCPUs start
    // only after that (runtime::pvh).
    let pvh_error = if cpu == 0 && runtime::pvh::active() {
        // SAFETY: the boot info page (rsi, docs/boot.md) is vCPU 0's alone until it starts the others.
        runtime::pvh::fill_boot_info(unsafe { &mut *info.cast_mut() }).err()
    } else {
        None
    };
    // SAFETY: quietvm passes the boot info address in rsi (docs/boot.md); it stays valid and unchanged.
    let info = unsafe { &*info };
    let area = (info.percpu_base + info.percpu_size * cpu) as usize;
    // First, so that any fault from here on is reported rather than a triple fault.
    arch::idt::init(area, info.doorbell_vector, runtime::lapic::TIMER_VECTOR);
    boot::set(info);
    if let Some(why) = pvh_error {
        println!("guest: cannot boot from the PVH start info: {why}");
        vm::exit(vm::EXIT_BAD_BOOT);
    }
    if info.magic != boot::MAGIC
        || info.version != boot::VERSION
        || info.percpu_size < arch::layout::MIN_AREA as u64
        || info.doorbell_vector < 32
        || info.max_timers <= info.vcpus
        || (runtime::lapic::wanted() && info.tsc_khz == 0)
    {
        if cpu == 0 {
            // Only vCPU 0 reports (and exits), so that the message is whole.
            println!(
                "guest: unusable boot info (magic {:#x}, version {}, percpu_size {:#x}, doorbell vector {}, max_timers {}, vcpus {}, tsc_khz {})",
                info.magic, info.version, info.percpu_size, info.doorbell_vector, info.max_timers, info.vcpus, info.tsc_khz
            );
            vm::exit(vm::EXIT_BAD_BOOT);
        }
        vm::halt_forever();
    }
    runtime::percpu::init(cpu as u32);
    runtime::doorbell::set_timer_callback(&ON_TIMER);
    if runtime::lapic::wanted() {
        runtime::lapic::init(cpu as u32);
        runtime::soft_timers::init(cpu as u32);
        if runtime::pvh::active() {
            runtime::pvh::rendezvous(cpu as u32, info.vcpus);
        }
    }
    // Queue mode of the timer device (runtime::queues), unless `queues=0`: after the IDT, before the
    // first timer operation. Under kvm-lapic (and QEMU/PVH) there is no device.
    if !runtime::lapic::active() && vm::arg_u64("queues", 1) != 0 {
        runtime::queues::enable(cpu as u32);
    }
    workloads::run(cpu as u32)
}

#[panic_handler]
fn panic(panic: &core::panic::PanicInfo) -> ! {
    println!(
        "guest: panic on vCPU {}: {}",
        runtime::percpu::index(),
        panic
    );
    vm::exit(vm::EXIT_PANIC)
}

//! Running under a foreign VMM that started the image through its PVH entry (arch::pvh, docs/qemu.md).
//! quietvm's boot info does not exist there: vCPU 0 builds it from the VMM's command line and memory
//! map, starts the other vCPUs with INIT and SIPI, and begins the run once all of them sleep in a
//! rendezvous (the start line). At the end it hands the VMM's launcher its figures on the console (the
//! timer report's page, each vCPU's halts since the start line). After each line it waits for the
//! launcher to read the host's counters (one byte on the UART, or a second); it ends through QEMU's
//! `isa-debug-exit`.

use super::boot::{BootInfo, MAGIC, VERSION};
use crate::arch::{self, layout, msr, pvh};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use quietvm_abi::boot::{ARGS_SIZE, PAGE_SIZE, PERCPU_SIZE};
use quietvm_abi::{ports, timer};

/// Timer ids under a foreign VMM: quietvm's default (`max_timers` in docs/boot.md's configs).
const MAX_TIMERS: u32 = 4096;
/// The line the launcher waits for (docs/qemu.md):
/// `quietvm-pvh-end code=C report=0xP started=0|1 halts=a,b,..`.
pub const END_MARKER: &str = "quietvm-pvh-end";
/// The line vCPU 0 prints before it starts the others: the launcher reads the host's counters then
/// (what QEMU's threads did before the guest ran is not the guest's) and answers with one byte.
pub const START_MARKER: &str = "quietvm-pvh-start";
/// How long the guest waits for the launcher's byte before it goes on anyway (a VM run by hand).
const ACK_WAIT_MS: u64 = 2000;
/// The same without a clock: polls of the UART (each an exit to the VMM).
const ACK_POLLS_WITHOUT_CLOCK: u32 = 20_000;

/// x2APIC ICR: INIT, level assert, to all but self.
const ICR_INIT_ALL_BUT_SELF: u64 = (0b11 << 18) | (1 << 14) | (0b101 << 8);
/// x2APIC ICR: start-up, to all but self (the vector is the trampoline's page number).
const ICR_SIPI_ALL_BUT_SELF: u64 = (0b11 << 18) | (1 << 14) | (0b110 << 8);

/// vCPUs the rendezvous handles: every vCPU the trampoline can number.
const MAX_CPUS: usize = 256;
/// Other vCPUs that reached the rendezvous.
static CHECKED_IN: AtomicU32 = AtomicU32::new(0);
/// Per vCPU: the halt count at which it sleeps in the rendezvous (its count on arrival, plus one).
static RENDEZVOUS_HALTS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per vCPU: its halts when the guest's run began (the start line), subtracted at the end.
static HALTS_AT_START: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// The run has begun: the vCPUs leave the rendezvous.
static GO: AtomicBool = AtomicBool::new(false);
/// The launcher answered the start line in time (its counters are from the run's start).
static START_ANSWERED: AtomicBool = AtomicBool::new(false);
/// How long vCPU 0 lets the others settle into their sleep (the kernel's halt polling lasts up to
/// some hundreds of microseconds) before the launcher reads the counters.
const SETTLE_NS: u64 = 2_000_000;
/// x2APIC ICR: fixed delivery to all but self, level assert (the vector is added).
const ICR_FIXED_ALL_BUT_SELF: u64 = (0b11 << 18) | (1 << 14);

/// Whether this VM came in through the PVH entry.
pub fn active() -> bool {
    arch::pvh::booted()
}

/// Why the boot info could not be built (exit code 93, `vm::EXIT_BAD_BOOT`).
pub type BootError = &'static str;

/// The value of `key=` in a command line of space-separated words (the last one wins, as `boot::arg`).
pub fn word<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split(' ')
        .filter_map(|w| w.split_once('='))
        .rfind(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// The end of the RAM the memory map gives below 4 GiB, where the guest's memory is contiguous from 0
/// (0 if none).
pub fn memory_top(map: &[pvh::MemmapEntry]) -> u64 {
    map.iter()
        .filter(|e| e.kind == pvh::MEMMAP_RAM)
        .map(|e| e.addr.saturating_add(e.size))
        .filter(|&end| end <= 1 << 32)
        .max()
        .unwrap_or(0)
}

/// Writes docs/boot.md's boot info at `info` from the PVH command line and memory map (vCPU 0, at ring
/// 3, before anything reads it). The layout is quietvm's: per-vCPU areas right after the image (the
/// entry put vCPU 0's stack there), then the device pages, then free memory.
pub fn fill_boot_info(info: &mut BootInfo) -> Result<(), BootError> {
    let line = core::str::from_utf8(pvh::cmdline()).map_err(|_| "command line is not ASCII")?;
    let number = |key: &str| -> Result<Option<u64>, BootError> {
        word(line, key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| "a number in the command line is malformed")
            })
            .transpose()
    };
    let vcpus = number("vcpus")?.unwrap_or(1);
    let tsc_khz = number("tsc_khz")?.unwrap_or(0);
    if vcpus == 0 || vcpus > 255 {
        return Err("vcpus= must be 1..255 (the trampoline numbers vCPUs by their 8-bit APIC id)");
    }
    // QEMU 7.2's microvm firmware (qboot) hands over no memory map (start info version 0): the
    // launcher then says how much memory it gave (`mem_mib=`).
    let mem_size = match (memory_top(pvh::memmap()), number("mem_mib")?) {
        (0, Some(mib)) => mib.checked_mul(1 << 20).ok_or("mem_mib= is too large")?,
        (top, _) => top,
    };
    let percpu_base = info.percpu_base; // the entry's, where vCPU 0's stack already is
    let device_pages = percpu_base + PERCPU_SIZE * vcpus;
    let mut free_base = device_pages + PAGE_SIZE * vcpus;
    // The payload (`-initrd`, the replay workload's), which the VMM loaded near the top of RAM, is
    // copied to where quietvm puts it: just below free memory (docs/boot.md).
    let (payload_base, payload_len) = match pvh::module() {
        None => (0, 0),
        Some((base, len)) => {
            let to = free_base;
            let end = to.checked_add(len).ok_or("the module's size overflows")?;
            if base < end || base.checked_add(len).is_none_or(|e| e > mem_size) {
                return Err("the module (-initrd) is not in RAM above the guest's own memory");
            }
            // SAFETY: both ranges are guest RAM, identity-mapped and user-accessible by the entry's
            // page tables, and disjoint (checked above); nothing else uses either yet.
            unsafe {
                core::ptr::copy_nonoverlapping(base as *const u8, to as *mut u8, len as usize)
            };
            free_base = end.next_multiple_of(PAGE_SIZE);
            (to, len)
        }
    };
    if mem_size < free_base + (1 << 20) {
        return Err("too little RAM below 4 GiB (no memory map, and no or a small mem_mib=)");
    }
    let mut args = [0u8; ARGS_SIZE];
    let n = line.len().min(ARGS_SIZE - 1);
    args[..n].copy_from_slice(&line.as_bytes()[..n]);
    *info = BootInfo {
        magic: MAGIC,
        version: VERSION,
        vcpus: vcpus as u32,
        mem_size,
        device_pages,
        percpu_base,
        percpu_size: PERCPU_SIZE,
        free_base,
        serial_port: ports::SERIAL_PORT,
        exit_port: pvh::DEBUG_EXIT_PORT,
        timer_port: ports::TIMER_PORT,
        doorbell_vector: timer::DOORBELL_VECTOR,
        reserved: 0,
        max_timers: MAX_TIMERS,
        args_len: n as u32,
        args,
        tsc_khz: u32::try_from(tsc_khz).map_err(|_| "tsc_khz= is too large")?,
        report_port: ports::REPORT_PORT,
        reserved2: 0,
        payload_base,
        payload_len,
        // No quietvm timer device under a PVH loader: no queue mode.
        timer_states: 0,
    };
    Ok(())
}

/// Starts every other vCPU (vCPU 0, after its LAPIC is in x2APIC mode): copies the trampoline below
/// 1 MiB and sends INIT and one SIPI to all but itself. KVM starts a vCPU on the first SIPI after INIT.
fn start_other_vcpus(vcpus: u32) {
    if vcpus <= 1 {
        return;
    }
    let code = pvh::trampoline();
    // SAFETY: the trampoline page is guest RAM no one else uses (arch::pvh::TRAMPOLINE), mapped and
    // user-accessible by the entry's page tables; `code` is a few dozen bytes.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), pvh::TRAMPOLINE as *mut u8, code.len())
    };
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    arch::wrmsr(msr::X2APIC_ICR, ICR_INIT_ALL_BUT_SELF);
    arch::wrmsr(
        msr::X2APIC_ICR,
        ICR_SIPI_ALL_BUT_SELF | (pvh::TRAMPOLINE as u64 >> 12),
    );
}

/// Every vCPU, with its LAPIC backend set up, before its workload: the guest's run begins with all of
/// them up and asleep, so that what the host counts from the start line on is the run alone. vCPU 0
/// starts the others, waits until each sleeps in its halt here, prints the start line (the launcher
/// reads the host's counters, then answers), notes every vCPU's halts so far, and wakes them (one IPI
/// to all but itself).
pub fn rendezvous(cpu: u32, vcpus: u32) {
    let n = (vcpus as usize).min(MAX_CPUS);
    if cpu != 0 {
        RENDEZVOUS_HALTS[cpu as usize].store(halts(cpu) + 1, Ordering::Release);
        CHECKED_IN.fetch_add(1, Ordering::Release);
        super::time::wait_until(None, || GO.load(Ordering::Acquire));
        return;
    }
    start_other_vcpus(vcpus);
    let asleep = |c: usize| {
        let want = RENDEZVOUS_HALTS[c].load(Ordering::Acquire);
        want != 0 && halts(c as u32) >= want
    };
    while CHECKED_IN.load(Ordering::Acquire) + 1 < vcpus || !(1..n).all(asleep) {
        arch::pause();
    }
    let settled = super::lapic::now() + SETTLE_NS;
    while super::lapic::now() < settled {
        arch::pause();
    }
    println!("{START_MARKER}");
    START_ANSWERED.store(wait_for_launcher(), Ordering::Relaxed);
    for (c, at_start) in HALTS_AT_START.iter().enumerate().take(n) {
        at_start.store(halts(c as u32), Ordering::Relaxed);
    }
    GO.store(true, Ordering::Release);
    if vcpus > 1 {
        arch::wrmsr(
            msr::X2APIC_ICR,
            ICR_FIXED_ALL_BUT_SELF | u64::from(super::lapic::TIMER_VECTOR),
        );
    }
}

/// Halts of vCPU `cpu` so far (counted by the ring-0 #GP stub, arch::layout::HALTS), from its start.
fn halts(cpu: u32) -> u64 {
    let at = super::percpu::area_base(cpu) + layout::PERCPU_DATA + layout::HALTS;
    // SAFETY: a u64 in vCPU `cpu`'s per-CPU page that only its ring-0 stub writes; a racy read of an
    // aligned u64 is one load.
    unsafe { core::ptr::read_volatile(at as *const u64) }
}

/// Tells the launcher the VM is ending and how (the end line), gives it up to a second to read the
/// host's counters (it answers with one byte on the UART), then ends QEMU with `code`.
pub fn end(code: u32, report_page: Option<u32>) -> ! {
    let info = super::boot::info();
    print!(
        "{END_MARKER} code={code} report={:#x} started={} halts=",
        report_page.unwrap_or(0),
        u8::from(START_ANSWERED.load(Ordering::Relaxed))
    );
    for cpu in 0..info.vcpus {
        let at_start = HALTS_AT_START
            .get(cpu as usize)
            .map_or(0, |h| h.load(Ordering::Relaxed));
        print!(
            "{}{}",
            if cpu == 0 { "" } else { "," },
            halts(cpu).saturating_sub(at_start)
        );
    }
    println!();
    let _ = wait_for_launcher();
    arch::outl(info.exit_port, code);
    super::hotplug::halt_forever()
}

/// Waits for one byte on the UART (the launcher read the host's counters), for `ACK_WAIT_MS` at most;
/// whether it came.
fn wait_for_launcher() -> bool {
    let info = super::boot::info();
    // The line status register's "data ready". The clock needs the LAPIC backend's set-up; a VM that
    // ends before it (a bad command line) waits a bounded number of polls instead.
    let lsr = info.serial_port + 5;
    let clock = super::lapic::active();
    let give_up = if clock {
        super::lapic::now().saturating_add(ACK_WAIT_MS * 1_000_000)
    } else {
        0
    };
    let mut polls = 0u32;
    let mut answered = true;
    while arch::inb(lsr) & 1 == 0 {
        polls += 1;
        if (clock && super::lapic::now() >= give_up) || (!clock && polls >= ACK_POLLS_WITHOUT_CLOCK)
        {
            answered = false;
            break;
        }
        arch::pause();
    }
    // Take the byte, so that the next wait does not see it.
    let _ = arch::inb(info.serial_port);
    answered
}

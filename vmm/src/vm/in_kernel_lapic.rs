//! The `kvm-lapic` baseline: the same guest workloads with KVM's in-kernel irqchip, as Firecracker or
//! Cloud Hypervisor run them. The guest multiplexes its software timers onto its own LAPIC TSC-deadline
//! timer, and `HLT` sleeps in the kernel, so quietvm sees neither halts nor timer commands: each vCPU
//! thread only runs `KVM_RUN` and handles port I/O (console, exit, the guest's timer report).
//!
//! Statistics: a vCPU thread's host wakeups are the kernel's count of its sleeps (voluntary context
//! switches), all with cause `kernel_halt`; its halts come from KVM's own `halt_exits` counter; the timer
//! figures are the guest's, handed over through the report port at its end (docs/boot.md).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use quietvm_abi::report::{self, offset as at};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::Layout;
use super::{
    begin_vcpu_run, build_machine, crash_outcome, end_vcpu_run, enter_vcpu_thread, exit_stat_name,
    record_kvm_exits, run_vcpu_threads, vm_stats, GuestImage, Outcome, VmShared, VmmError,
};
use crate::accounting::{LatenessRecorder, WakeupCause};
use crate::config::VmConfig;
use crate::devices::{REPORT_PORT, TIMER_PORT};
use crate::stats::{TimerStats, VcpuStats, VmStats};
use crate::sys::kvm::kick::drain_kicks;
use crate::sys::kvm::vcpu::{Exit, Vcpu};
use crate::sys::os::gettid;

/// What a kvm-lapic VM's threads share besides the console and the kicks.
pub(super) struct LapicVm {
    memory: GuestMemoryMmap,
    /// Page number of the guest's timer report, as the guest last wrote it to the report port (0: none).
    report_page: AtomicU32,
}

type Shared = VmShared<LapicVm>;

impl super::control::ModeParts for LapicVm {
    /// The guest keeps its own timer figures and reports them only at its end.
    fn live_timers(&self, _now: u64) -> TimerStats {
        TimerStats::default()
    }

    /// Likewise per vCPU: the counts arrive with the report.
    fn vcpu_timer_counts(&self, _vcpus: &mut [VcpuStats]) {}

    fn hotplug(&self) -> Option<&dyn super::control::HotplugDevice> {
        None
    }
}

/// Runs the VM with the in-kernel irqchip to its end and returns its statistics.
pub(super) fn run_vm(
    cfg: &VmConfig,
    opts: &super::RunOptions,
    image: &GuestImage,
    layout: &Layout,
) -> Result<VmStats, VmmError> {
    let machine = build_machine(cfg, image, layout, true)?;
    let lapic = LapicVm {
        memory: machine.kvm.memory().clone(),
        report_page: AtomicU32::new(0),
    };
    if cfg.vcpus_online() != cfg.vcpus {
        return Err(VmmError::Setup(
            "--vcpus-online: vCPU hotplug needs quietvm's timer device, not kvm-lapic".into(),
        ));
    }
    let kicks = Arc::new(super::kicks::VcpuKicks::new(cfg.vcpus));
    let shared = Arc::new(VmShared::new(
        lapic,
        kicks,
        cfg.vcpus,
        cfg.vcpus,
        super::GuestClock::monotonic(),
        0,
    )?);
    let mut ended = run_vcpu_threads(&shared, machine.vcpus, cfg, opts, run_vcpu)?;

    let page = shared.device.report_page.load(Ordering::Acquire);
    let timers = match GuestReport::read(&shared.device.memory, page, cfg.vcpus) {
        Ok(report) => {
            for v in &mut ended.vcpus {
                let (fired, remote) = report.per_vcpu[v.index as usize];
                v.timers_fired = fired;
                v.remote_expiries = remote;
            }
            report.timers
        }
        Err(why) => {
            // A guest that crashed or was stopped never reports; only a clean end without one is odd.
            if ended.outcome == Outcome::GuestExit(0) {
                log::warn!("no timer figures from the guest: {why}");
            } else {
                log::debug!("no timer figures from the guest: {why}");
            }
            TimerStats::default()
        }
    };
    Ok(vm_stats(cfg, ended, timers))
}

/// The life of one vCPU thread under kvm-lapic: `KVM_RUN` until the VM ends.
fn run_vcpu(shared: Arc<Shared>, index: u32, mut vcpu: Vcpu) -> VcpuStats {
    let mut stats = VcpuStats::new(index);
    stats.tid = gettid();
    if let Err(e) = enter_vcpu_thread(&shared, index, &vcpu) {
        shared.end(Outcome::VmmError(format!("vCPU {index}: {e}")));
        shared.kicks.register(index, None);
        return stats;
    }
    let kernel_at_start = begin_vcpu_run(&shared, index);
    if let Err(outcome) = run_loop(&shared, index, &mut vcpu, &mut stats) {
        shared.end(outcome);
    }
    // Where each vCPU stopped: what a guest that hung (`--timeout-ms`) was doing.
    log::debug!("vCPU {index} at the end: {}", vcpu.describe_state());
    let kernel = end_vcpu_run(&shared, &mut stats, &kernel_at_start);
    // quietvm never sees these halts: every sleep of the thread is the kernel's, nearly all of them in
    // the guest's HLT (the rest, such as the final stop, are a few at most).
    stats.host_wakeups = kernel.voluntary_switches;
    stats.wakeup_causes.insert(
        WakeupCause::KernelHalt.name().to_owned(),
        kernel.voluntary_switches,
    );
    record_kvm_exits(&vcpu, &mut stats);
    stats.halts = stats.kvm_exits.get("halt_exits").copied().unwrap_or(0);
    shared.publish(&stats);
    stats
}

fn run_loop(
    shared: &Shared,
    index: u32,
    vcpu: &mut Vcpu,
    stats: &mut VcpuStats,
) -> Result<(), Outcome> {
    loop {
        if shared.stopping() {
            return Ok(());
        }
        // Kick reasons only matter to the userspace policies; a stop is seen above.
        shared.kicks.take(index);
        let exit = vcpu
            .run(|port, _size| {
                shared.common_in(port).unwrap_or_else(|| {
                    log::debug!("vCPU {index}: in from port {port:#x}");
                    u32::MAX
                })
            })
            .map_err(|e| Outcome::VmmError(format!("vCPU {index}: {e}")))?;
        log::trace!("vCPU {index}: exit {exit:?}");
        stats.count_exit(exit_stat_name(&exit));
        match exit {
            Exit::IoOut {
                port: TIMER_PORT, ..
            }
            | Exit::IoIn {
                port: TIMER_PORT, ..
            } => return Err(no_timer_device(index)),
            Exit::IoOut { port, size, value } => {
                if shared.common_out(port, size, value) {
                    continue;
                }
                if port == REPORT_PORT && size == 4 {
                    shared.device.report_page.store(value, Ordering::Release);
                } else {
                    log::debug!("vCPU {index}: out {value:#x} to port {port:#x}");
                }
            }
            Exit::IoIn { .. } => {}
            // KVM handles HLT itself with an irqchip; should one come out anyway, resuming the guest is
            // what the kernel would do once it woke.
            Exit::Hlt | Exit::InterruptWindow => {}
            Exit::Interrupted => drain_kicks(),
            crash => {
                return Err(crash_outcome(index, &crash, vcpu).unwrap_or_else(|| {
                    Outcome::GuestCrash(format!("vCPU {index}: unexpected exit {crash:?}"))
                }))
            }
        }
    }
}

/// The timer device's port belongs to the guest's own page protocol in this mode (the guest keeps its
/// software timers in the device pages), so quietvm cannot answer there: an access is a guest error.
fn no_timer_device(index: u32) -> Outcome {
    Outcome::GuestCrash(format!(
        "vCPU {index}: the guest used the timer device port {TIMER_PORT:#x}, which --policy kvm-lapic does not have"
    ))
}

/// Reads the guest's timer report from a file that held a VM's guest memory from address 0 (QEMU's
/// file memory backend, docs/qemu.md; open for reading and writing, as vm-memory maps it shared), after
/// the VM ended: the timer figures and, per vCPU, (timers fired there, of those armed on another
/// vCPU). Checked as strictly as quietvm's own.
pub fn read_report_file(
    file: std::fs::File,
    mem_size: u64,
    page: u32,
    vcpus: u32,
) -> Result<(TimerStats, Vec<(u64, u64)>), String> {
    let len = file
        .metadata()
        .map_err(|e| format!("the guest memory file: {e}"))?
        .len();
    if len < mem_size {
        return Err(format!(
            "the guest memory file holds {len} bytes, not the guest's {mem_size}"
        ));
    }
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        mem_size as usize,
        Some(vm_memory::FileOffset::new(file, 0)),
    )])
    .map_err(|e| format!("cannot map the guest memory file: {e}"))?;
    let report = GuestReport::read(&mem, page, vcpus)?;
    Ok((report.timers, report.per_vcpu))
}

/// The guest's timer report (docs/boot.md, "The timer report").
struct GuestReport {
    timers: TimerStats,
    /// Per vCPU: (timers fired there, of those armed on another vCPU).
    per_vcpu: Vec<(u64, u64)>,
}

// The report's layout is the guest ABI's (quietvm-abi).
use report::{
    MAGIC as REPORT_MAGIC, MAX_SAMPLES_PER_VCPU, VCPU_ENTRY_SIZE as REPORT_VCPU_SIZE,
    VERSION as REPORT_VERSION,
};
const REPORT_VCPUS_AT: u64 = at::VCPU_ENTRIES;
/// Samples read from guest memory at a time: the report is read in constant memory, whatever count
/// the guest claims.
const SAMPLES_PER_READ: usize = 1024;

impl GuestReport {
    /// Reads and checks the report in page `page` of guest memory. The guest is not trusted: every
    /// address and count is checked against guest memory and sane bounds.
    fn read(mem: &GuestMemoryMmap, page: u32, vcpus: u32) -> Result<Self, String> {
        if page == 0 {
            return Err("the guest wrote no report".into());
        }
        let base = u64::from(page) << report::PAGE_SHIFT;
        let u64_at = |at: u64| -> Result<u64, String> {
            mem.read_obj::<u64>(GuestAddress(at))
                .map_err(|e| format!("report at {at:#x}: {e}"))
        };
        let u32_at = |at: u64| -> Result<u32, String> {
            mem.read_obj::<u32>(GuestAddress(at))
                .map_err(|e| format!("report at {at:#x}: {e}"))
        };
        if u64_at(base + at::MAGIC)? != REPORT_MAGIC
            || u32_at(base + at::VERSION)? != REPORT_VERSION
        {
            return Err(format!("no version-1 report at {base:#x}"));
        }
        if u32_at(base + at::VCPUS)? != vcpus {
            return Err(format!("the report at {base:#x} is not for {vcpus} vCPUs"));
        }
        let mut per_vcpu = Vec::with_capacity(vcpus as usize);
        let mut lateness = LatenessRecorder::new();
        // No slack under kvm-lapic (the guest's LAPIC has none): a window is its deadline, and a
        // sample past the tolerance is late beyond it (counted over the samples the guest kept).
        let mut late_beyond_window = 0u64;
        let mut chunk = [0u8; 4 * SAMPLES_PER_READ];
        for i in 0..u64::from(vcpus) {
            let entry = base + REPORT_VCPUS_AT + REPORT_VCPU_SIZE * i;
            per_vcpu.push((
                u64_at(entry + at::ENTRY_FIRED)?,
                u64_at(entry + at::ENTRY_REMOTE_FIRED)?,
            ));
            let addr = u64_at(entry + at::ENTRY_SAMPLES_ADDR)?;
            let count = u64_at(entry + at::ENTRY_SAMPLES_LEN)?;
            if count > MAX_SAMPLES_PER_VCPU {
                return Err(format!("vCPU {i} reports {count} lateness samples"));
            }
            let mut done = 0u64;
            while done < count {
                let n = (count - done).min(SAMPLES_PER_READ as u64) as usize;
                let bytes = &mut chunk[..4 * n];
                let from = addr
                    .checked_add(4 * done)
                    .ok_or_else(|| format!("vCPU {i}'s lateness samples at {addr:#x} overflow"))?;
                mem.read_slice(bytes, GuestAddress(from))
                    .map_err(|e| format!("vCPU {i}'s lateness samples at {addr:#x}: {e}"))?;
                for b in bytes.chunks_exact(4) {
                    let late = u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    lateness.record(late);
                    if late > quietvm_abi::timer::WINDOW_TOLERANCE_NS {
                        late_beyond_window += 1;
                    }
                }
                done += n as u64;
            }
        }
        let timers = TimerStats {
            armed: u64_at(base + at::ARMED)?,
            fired: u64_at(base + at::FIRED)?,
            cancelled: u64_at(base + at::CANCELLED)?,
            early: u64_at(base + at::EARLY)?,
            late_beyond_window,
            missed: u64_at(base + at::MISSED)?,
            remote_expiries: u64_at(base + at::REMOTE_EXPIRIES)?,
            serialized: u64_at(base + at::SERIALIZED)?,
            lateness_ns: lateness.summary(),
            ..TimerStats::default()
        };
        Ok(GuestReport { timers, per_vcpu })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn a_report_is_read_with_its_samples() {
        let mem = memory();
        let base = 0x3000u64;
        mem.write_obj(REPORT_MAGIC, GuestAddress(base)).unwrap();
        mem.write_obj(REPORT_VERSION, GuestAddress(base + 8))
            .unwrap();
        mem.write_obj(2u32, GuestAddress(base + 0x0c)).unwrap();
        for (i, v) in [5u64, 3, 1, 0, 0, 0, 0].iter().enumerate() {
            mem.write_obj(*v, GuestAddress(base + 0x10 + 8 * i as u64))
                .unwrap();
        }
        let samples = 0x8000u64;
        for (i, s) in [10u32, 30, 20].iter().enumerate() {
            mem.write_obj(*s, GuestAddress(samples + 4 * i as u64))
                .unwrap();
        }
        // vCPU 0 fired 2 (samples 10, 30), vCPU 1 fired 1 (sample 20).
        let entries = [(2u64, 0u64, samples, 2u64), (1, 0, samples + 8, 1)];
        for (i, e) in entries.iter().enumerate() {
            let at = base + REPORT_VCPUS_AT + REPORT_VCPU_SIZE * i as u64;
            for (j, v) in [e.0, e.1, e.2, e.3].iter().enumerate() {
                mem.write_obj(*v, GuestAddress(at + 8 * j as u64)).unwrap();
            }
        }
        let r = GuestReport::read(&mem, (base >> 12) as u32, 2).unwrap();
        assert_eq!(
            (r.timers.armed, r.timers.fired, r.timers.cancelled),
            (5, 3, 1)
        );
        assert_eq!(r.per_vcpu, vec![(2, 0), (1, 0)]);
        assert_eq!(r.timers.lateness_ns.max, 30);
        assert_eq!(r.timers.lateness_ns.p50, 20);
    }

    #[test]
    fn a_broken_report_is_refused() {
        let mem = memory();
        assert!(GuestReport::read(&mem, 0, 1).is_err());
        assert!(GuestReport::read(&mem, 3, 1).is_err()); // no magic
        mem.write_obj(REPORT_MAGIC, GuestAddress(0x3000)).unwrap();
        mem.write_obj(REPORT_VERSION, GuestAddress(0x3008)).unwrap();
        mem.write_obj(1u32, GuestAddress(0x300c)).unwrap();
        // Samples outside guest memory.
        mem.write_obj(1u64 << 40, GuestAddress(0x3000 + REPORT_VCPUS_AT + 16))
            .unwrap();
        mem.write_obj(4u64, GuestAddress(0x3000 + REPORT_VCPUS_AT + 24))
            .unwrap();
        assert!(GuestReport::read(&mem, 3, 1).is_err());
        assert!(GuestReport::read(&mem, 3, 2).is_err()); // wrong vCPU count
        assert!(GuestReport::read(&mem, u32::MAX, 1).is_err()); // beyond memory
    }
}

//! The VM: build it from a [`VmConfig`], run one thread per vCPU, wait for its end, report statistics.

mod control;
pub mod event_loop;
mod guest_image;
mod in_kernel_lapic;
mod kicks;
pub mod layout;
mod vcpu_thread;

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use linux_loader::loader::{elf::Elf, KernelLoader};
use thiserror::Error;
use tmigr::clock::Clock;
use tmigr::service::{ServiceConfig, TimerService};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::accounting::KickReasons;
use crate::config::{ConfigError, VmConfig, VmPolicy};
use crate::devices::serial::SerialConsole;
use crate::devices::timer::timer_log::TimerLog;
use crate::devices::timer::{TimerDevice, VcpuKicker};
use crate::devices::{EXIT_PORT, IDLE_PORT, REPORT_PORT, SERIAL_PORTS, TIMER_PORT};
use crate::exit_code;
use crate::stats::{PerFiredTimer, ThreadCounters, TimerStats, VcpuStats, VmStats};
use crate::sync::NoSleepMutex;
use crate::sys::kvm::kick::{block_kick_in_this_thread, install_kick_handler, ThreadKicker};
use crate::sys::kvm::vcpu::{BootState, Exit, Vcpu};
use crate::sys::kvm::vm::KvmVm;
use crate::sys::kvm::KvmError;
use crate::sys::os::{monotonic_ns, set_minimal_timer_slack};
use control::{ModeParts, VmHandle};
use event_loop::{EventLoop, LoopOptions};
pub use guest_image::{builtin_guest_elf, GuestImage, ImageError};
pub use in_kernel_lapic::read_report_file;
use kicks::VcpuKicks;
use layout::Layout;
use vcpu_thread::VcpuThread;

/// Why a VM could not be run. Each is one line for the user; all map to exit code 101.
#[derive(Debug, Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("guest memory of {have} MiB is too small: the image and {vcpus} per-vCPU areas need {need} MiB")]
    MemoryTooSmall { have: u64, need: u64, vcpus: u32 },
    #[error("--vcpus {0} is more than KVM allows here ({1})")]
    TooManyVcpus(u32, usize),
    #[error("cannot load the guest image: {0}")]
    Load(String),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    EventLoop(#[from] event_loop::LoopError),
    /// `--timer-log` could not be opened or written (the log is complete, or the run fails).
    #[error("{0}")]
    TimerLog(String),
}

/// How the outcome text of a VM ended on request (API `shutdown`, a signal) begins: the VM's exit
/// code is 0, but its guest did not finish (`quietvm fleet` counts such a VM as failed).
pub const SHUT_DOWN_PREFIX: &str = "shut down by ";

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote this value to the exit port.
    GuestExit(u32),
    /// The guest crashed (triple fault, emulation failure, unmapped access, unhandled exit).
    GuestCrash(String),
    /// `--timeout-ms` passed.
    Timeout(u64),
    /// quietvm failed while running the VM.
    VmmError(String),
    /// Ended in order on request: the API's `shutdown`, SIGTERM or SIGINT (the guest did not finish).
    Shutdown(String),
}

impl Outcome {
    /// quietvm's process exit code for this outcome (docs/boot.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::GuestExit(v) => (*v).min(99) as i32,
            Outcome::GuestCrash(_) | Outcome::Timeout(_) => exit_code::GUEST_CRASH,
            Outcome::VmmError(_) => exit_code::VMM_ERROR,
            Outcome::Shutdown(_) => 0,
        }
    }

    /// One line for the user.
    pub fn describe(&self) -> String {
        match self {
            Outcome::GuestExit(0) => "guest exited with code 0 (all checks passed)".into(),
            Outcome::GuestExit(v) => format!("guest exited with code {v} (its checks failed)"),
            Outcome::GuestCrash(why) => format!("guest crashed: {why}"),
            Outcome::Timeout(ms) => format!("guest did not end within --timeout-ms {ms}"),
            Outcome::VmmError(why) => format!("quietvm error: {why}"),
            Outcome::Shutdown(by) => format!("{SHUT_DOWN_PREFIX}{by} before the guest finished"),
        }
    }
}

/// The clock in guest nanoseconds since the VM was created: the guest's TSC, scaled, when KVM says
/// how the guest TSC relates to the host's (then it is the clock queue-mode guests read themselves,
/// docs/timer-abi.md, "The clock"); else host `CLOCK_MONOTONIC`.
#[derive(Debug, Clone, Copy)]
pub struct GuestClock {
    /// `CLOCK_MONOTONIC` at guest time 0.
    start_mono: u64,
    tsc: Option<TscClock>,
}

#[derive(Debug, Clone, Copy)]
struct TscClock {
    /// Guest TSC = host TSC + `offset` (wrapping), the same on every vCPU.
    offset: u64,
    params: quietvm_abi::queue::ClockParams,
}

/// A host timer for a TSC deadline is set this much later than the deadline, so that the thread does not
/// wake before it on the device clock while `CLOCK_MONOTONIC` (which NTP slews, by up to 500 ppm) runs
/// apart from the TSC: 1/4096 of the wait (244 ppm), at most 50 us, plus 2 us. A longer sleep may wake
/// a little early; the halt loop then finds nothing due and sleeps again (one extra wakeup), which
/// costs less than waking every long sleep late.
const TSC_SLEEP_MARGIN_SHIFT: u32 = 12;
const TSC_SLEEP_MARGIN_MAX_NS: u64 = 50_000;
const TSC_SLEEP_MARGIN_NS: u64 = 2_000;

impl GuestClock {
    /// `CLOCK_MONOTONIC` from now.
    fn monotonic() -> Self {
        GuestClock {
            start_mono: monotonic_ns(),
            tsc: None,
        }
    }

    /// The guest TSC from now, if the host's own clock runs on a stable TSC (its clocksource is
    /// `tsc`: otherwise KVM may move a vCPU's TSC offset when its thread changes CPU), every vCPU
    /// reports the same TSC offset and KVM knows the TSC's frequency; else `CLOCK_MONOTONIC` (and no
    /// queue mode).
    fn for_vcpus(vcpus: &[Vcpu], tsc_khz: u32) -> Self {
        match crate::sys::os::host_clocksource() {
            Some(c) if c == "tsc" => {}
            other => {
                log::info!(
                    "host clocksource {}: the TSC may not be stable, no timer queue mode",
                    other.as_deref().unwrap_or("unknown")
                );
                return GuestClock::monotonic();
            }
        }
        let offsets: Result<Vec<u64>, _> = vcpus.iter().map(Vcpu::tsc_offset).collect();
        let offset = match offsets {
            Ok(o) if tsc_khz > 0 && !o.is_empty() && o.iter().all(|&x| x == o[0]) => o[0],
            Ok(_) => {
                log::info!("the vCPUs' TSCs differ or their rate is unknown: no timer queue mode");
                return GuestClock::monotonic();
            }
            Err(e) => {
                log::info!("{e}: no timer queue mode");
                return GuestClock::monotonic();
            }
        };
        let start_mono = monotonic_ns();
        let base = crate::sys::os::rdtsc().wrapping_add(offset);
        GuestClock {
            start_mono,
            tsc: Some(TscClock {
                offset,
                params: quietvm_abi::queue::ClockParams {
                    version: 2,
                    reserved: 0,
                    tsc_base: base,
                    ns_per_tick_q32: quietvm_abi::queue::ns_per_tick_q32(tsc_khz),
                },
            }),
        }
    }

    /// The parameters a queue-mode guest reads this clock with; `None` if it is not the TSC.
    pub(crate) fn queue_params(&self) -> Option<quietvm_abi::queue::ClockParams> {
        self.tsc.map(|t| t.params)
    }

    /// The `CLOCK_MONOTONIC` time by which guest time `at` has surely passed, for a host timer.
    pub(crate) fn host_deadline(&self, at: u64) -> u64 {
        match self.tsc {
            None => self.start_mono.saturating_add(at),
            Some(_) => {
                let wait = at.saturating_sub(self.now_ns());
                monotonic_ns().saturating_add(wait).saturating_add(
                    (wait >> TSC_SLEEP_MARGIN_SHIFT).min(TSC_SLEEP_MARGIN_MAX_NS)
                        + TSC_SLEEP_MARGIN_NS,
                )
            }
        }
    }
}

impl Clock for GuestClock {
    fn now_ns(&self) -> u64 {
        match self.tsc {
            Some(t) => quietvm_abi::queue::clock_ns(
                crate::sys::os::rdtsc().wrapping_add(t.offset),
                t.params.tsc_base,
                t.params.ns_per_tick_q32,
            ),
            None => monotonic_ns().saturating_sub(self.start_mono),
        }
    }
}

/// What every vCPU thread shares, in every mode. `D` is the mode's own part: the timer device for the
/// userspace policies, the guest's timer report under `kvm-lapic`.
pub(crate) struct VmShared<D> {
    pub(crate) device: D,
    pub(crate) serial: SerialConsole,
    pub(crate) kicks: Arc<VcpuKicks>,
    /// `CLOCK_MONOTONIC` at guest time 0.
    /// The guest clock (also the timer device's).
    pub(crate) clock: GuestClock,
    /// `halt-poll-ns` (0 under `kvm-lapic`, where KVM halts).
    pub(crate) halt_poll_ns: u64,
    /// vCPU threads that have reached the start line (see [`begin_vcpu_run`]).
    arrived: AtomicU32,
    stop: AtomicBool,
    outcome: Mutex<Option<(Outcome, u64)>>,
    /// Written when the VM ends, to wake the event loop.
    pub(crate) end_event: EventFd,
    /// Each vCPU's figures as its thread last published them, for the live `stats` request.
    pub(crate) live: Vec<NoSleepMutex<VcpuLive>>,
    /// Each vCPU's pause and hotplug state.
    pub(crate) control: Vec<VcpuControl>,
    /// The API paused the VM: every vCPU thread parks.
    pub(crate) paused: AtomicBool,
    /// vCPU threads that have taken their final kernel sample (see [`end_vcpu_run`]).
    finished: AtomicU32,
}

/// A vCPU's figures, live.
#[derive(Default)]
pub(crate) struct VcpuLive {
    pub(crate) stats: VcpuStats,
    /// The thread's kernel counters when it started running its vCPU (`None` before).
    pub(crate) kernel_at_start: Option<ThreadCounters>,
}

/// Where a vCPU's thread is, as Firecracker's `VcpuRunState`: set by the thread itself, read by the
/// control API and the event loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuRunState {
    /// In the guest, or handling one of its exits.
    Running = 0,
    /// In its halt: asleep in quietvm until something is due for it.
    Halted = 1,
    /// Parked while the VM is paused.
    Paused = 2,
    /// Parked before its first instruction (`--vcpus-online`), until `vcpu-online`.
    Parked = 3,
    /// Taken offline at its guest's `OFFLINE_ACK`, parked until `vcpu-online`.
    Offline = 4,
    /// Between two of the states above, changing the timer service on its way: a vCPU started with
    /// `--vcpus-online` before it parks, or one leaving its park for `vcpu-online`. Neither online
    /// nor parked, so neither a pause nor a hotplug request counts it as done.
    Changing = 5,
}

impl VcpuRunState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => VcpuRunState::Halted,
            2 => VcpuRunState::Paused,
            3 => VcpuRunState::Parked,
            4 => VcpuRunState::Offline,
            5 => VcpuRunState::Changing,
            _ => VcpuRunState::Running,
        }
    }
}

/// A vCPU's run state and what the API wants of it, shared between its thread and the API.
pub(crate) struct VcpuControl {
    state: AtomicU8,
    /// What the API wants: false from an offline request on, true again from `vcpu-online`.
    pub(crate) wanted_online: AtomicBool,
}

impl VcpuControl {
    /// A vCPU that starts running (`online`), or that starts parked until `vcpu-online`.
    fn new(online: bool) -> Self {
        let state = if online {
            VcpuRunState::Running
        } else {
            VcpuRunState::Changing
        };
        VcpuControl {
            state: AtomicU8::new(state as u8),
            wanted_online: AtomicBool::new(online),
        }
    }

    pub(crate) fn state(&self) -> VcpuRunState {
        VcpuRunState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Only the vCPU's own thread sets its state.
    pub(crate) fn set_state(&self, state: VcpuRunState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// The vCPU runs guest code (it is not offline, parked, or on its way between the two).
    pub(crate) fn is_online(&self) -> bool {
        matches!(
            self.state(),
            VcpuRunState::Running | VcpuRunState::Halted | VcpuRunState::Paused
        )
    }

    /// The thread is out of the guest and parked (paused, offline, or not started yet).
    pub(crate) fn is_parked(&self) -> bool {
        matches!(
            self.state(),
            VcpuRunState::Paused | VcpuRunState::Parked | VcpuRunState::Offline
        )
    }
}

impl<D> VmShared<D> {
    fn new(
        device: D,
        kicks: Arc<VcpuKicks>,
        vcpus: u32,
        vcpus_online: u32,
        clock: GuestClock,
        halt_poll_ns: u64,
    ) -> Result<Self, VmmError> {
        Ok(VmShared {
            device,
            serial: SerialConsole::to_stdout().map_err(VmmError::Thread)?,
            kicks,
            clock,
            halt_poll_ns,
            arrived: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            end_event: EventFd::new(EFD_NONBLOCK).map_err(VmmError::Thread)?,
            live: (0..vcpus)
                .map(|i| {
                    NoSleepMutex::new(VcpuLive {
                        stats: VcpuStats::new(i),
                        kernel_at_start: None,
                    })
                })
                .collect(),
            control: (0..vcpus)
                .map(|i| VcpuControl::new(i < vcpus_online))
                .collect(),
            paused: AtomicBool::new(false),
            finished: AtomicU32::new(0),
        })
    }

    /// Publishes vCPU `index`'s figures for the live `stats` request.
    pub(crate) fn publish(&self, stats: &VcpuStats) {
        self.live[stats.index as usize]
            .lock()
            .stats
            .copy_counts_from(stats);
    }

    /// Every vCPU's figures now, with the kernel's counters read now for threads still running.
    pub(crate) fn live_vcpu_stats(&self) -> Vec<VcpuStats> {
        self.live
            .iter()
            .map(|slot| {
                // Copy under the lock, read /proc outside it: the vCPU's thread takes this lock to
                // publish, and a /proc read is far slower than the copy.
                let (mut s, start) = {
                    let live = slot.lock();
                    (live.stats.clone(), live.kernel_at_start)
                };
                if let Some(start) = start {
                    if let Some(now) = ThreadCounters::read(std::process::id(), s.tid) {
                        let d = now.since(&start);
                        s.kernel_voluntary_switches = d.voluntary_switches;
                        s.kernel_cpu_ns = d.cpu_ns;
                        s.kernel_timeslices = d.timeslices;
                    }
                }
                s
            })
            .collect()
    }

    /// Records where vCPU `index`'s thread started counting.
    pub(crate) fn start_counting(&self, index: u32, at: ThreadCounters) {
        self.live[index as usize].lock().kernel_at_start = Some(at);
    }

    pub(crate) fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// The VM ended because `--timeout-ms` passed (its guest hung).
    pub(crate) fn timed_out(&self) -> bool {
        matches!(
            *self.outcome.lock().unwrap_or_else(|e| e.into_inner()),
            Some((Outcome::Timeout(_), _))
        )
    }

    /// Guest time now (the clock of [`GuestClock`]).
    pub(crate) fn now(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Ends the VM (the first outcome wins) and kicks every vCPU so its thread returns.
    pub(crate) fn end(&self, outcome: Outcome) {
        let now = self.now();
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some((outcome, now));
        }
        self.stop.store(true, Ordering::Release);
        drop(slot);
        let _ = self.end_event.write(1);
        self.kicks.kick_all(KickReasons::STOP);
    }

    /// Answers a guest `in` from a port every mode has (the serial console); `None` for other ports.
    pub(crate) fn common_in(&self, port: u16) -> Option<u32> {
        SERIAL_PORTS
            .contains(&port)
            .then(|| u32::from(self.serial.read((port - SERIAL_PORTS.start) as u8)))
    }

    /// Carries out a guest `out` of `size` bytes to a port every mode has (serial console, debug
    /// exit); `false` for other ports. Only a 32-bit `out` ends the VM (docs/boot.md); an 8- or
    /// 16-bit one to the exit port is a hostile access, ignored like one to an unknown port.
    pub(crate) fn common_out(&self, port: u16, size: u8, value: u32) -> bool {
        match port {
            p if SERIAL_PORTS.contains(&p) => self
                .serial
                .write((p - SERIAL_PORTS.start) as u8, value as u8),
            EXIT_PORT if size == 4 => self.end(Outcome::GuestExit(value)),
            EXIT_PORT => log::debug!("{size}-byte out {value:#x} to the exit port ignored (only a 32-bit out ends the VM)"),
            _ => return false,
        }
        true
    }
}

impl VmShared<TimerDevice<GuestClock>> {
    /// Answers a guest `in`.
    pub(crate) fn io_in(&self, cpu: u32, port: u16, size: u8) -> u32 {
        if let Some(v) = self.common_in(port) {
            return v;
        }
        match port {
            TIMER_PORT if size == 4 => self.device.last_status(cpu),
            _ => {
                log::debug!("vCPU {cpu}: in from unknown port {port:#x}");
                u32::MAX
            }
        }
    }
}

/// Set-up every vCPU thread does first, on itself: the kick signal is blocked except inside `KVM_RUN`
/// (kvm::kick), sleeps end at their deadline, and other threads can kick it from now on.
pub(crate) fn enter_vcpu_thread<D>(
    shared: &VmShared<D>,
    index: u32,
    vcpu: &Vcpu,
) -> Result<(), KvmError> {
    block_kick_in_this_thread()?;
    vcpu.unblock_kick_in_guest()?;
    set_minimal_timer_slack();
    shared.kicks.register(index, Some(ThreadKicker::current()));
    // The thread's /proc files are opened before its seccomp filter, which has no openat.
    OwnProcFiles::open_for_this_thread();
    crate::sys::seccomp::install(crate::sys::seccomp::ThreadClass::Vcpu).map_err(|e| {
        KvmError::Os {
            what: "seccomp",
            source: std::io::Error::other(e),
        }
    })?;
    crate::sys::seccomp::debug_forbidden_call(crate::sys::seccomp::ThreadClass::Vcpu);
    Ok(())
}

/// A vCPU thread's own `/proc/self/task/TID/{status,schedstat}`, opened once (before its seccomp
/// filter) and read again with `pread` for its kernel counters.
struct OwnProcFiles {
    status: std::fs::File,
    schedstat: std::fs::File,
}

thread_local! {
    static OWN_PROC_FILES: std::cell::RefCell<Option<OwnProcFiles>> =
        const { std::cell::RefCell::new(None) };
}

impl OwnProcFiles {
    fn open_for_this_thread() {
        let dir = format!(
            "/proc/{}/task/{}",
            std::process::id(),
            crate::sys::os::gettid()
        );
        let files = std::fs::File::open(format!("{dir}/status")).and_then(|status| {
            Ok(OwnProcFiles {
                status,
                schedstat: std::fs::File::open(format!("{dir}/schedstat"))?,
            })
        });
        match files {
            Ok(f) => OWN_PROC_FILES.with(|slot| *slot.borrow_mut() = Some(f)),
            Err(e) => log::warn!("cannot open {dir}: {e}"),
        }
    }

    /// The calling thread's counters, from its open files. A thread that could not open them (its
    /// warning said why: at the descriptor limit, say) reads /proc by path, unless its seccomp filter
    /// forbids opening files: then its counters stay 0 rather than the filter ending the VM.
    fn counters() -> ThreadCounters {
        use std::os::unix::fs::FileExt;
        let read = |f: &std::fs::File| {
            let mut buf = vec![0u8; 4096];
            let n = f.read_at(&mut buf, 0).ok()?;
            buf.truncate(n);
            String::from_utf8(buf).ok()
        };
        OWN_PROC_FILES
            .with(|slot| {
                let files = slot.borrow();
                let f = files.as_ref()?;
                ThreadCounters::parse(&read(&f.status)?, &read(&f.schedstat)?)
            })
            .unwrap_or_else(|| {
                if crate::sys::seccomp::enabled() {
                    ThreadCounters::default()
                } else {
                    ThreadCounters::of_this_thread()
                }
            })
    }
}

/// Waits until every vCPU thread exists (or the VM is ending) before the first entry into the guest
/// (spawning a thread maps its stack under `mmap_lock`, which would stall, and may put to sleep, vCPUs
/// faulting in guest memory meanwhile), then starts counting the thread's kernel figures from here.
pub(crate) fn begin_vcpu_run<D>(shared: &VmShared<D>, index: u32) -> ThreadCounters {
    // Counted by the threads themselves, not by their spawner: a thread's own start-up (its signal
    // stack, its allocator arena) maps memory too, after `spawn` has returned.
    shared.arrived.fetch_add(1, Ordering::AcqRel);
    while (shared.arrived.load(Ordering::Acquire) as usize) < shared.live.len()
        && !shared.stopping()
    {
        std::thread::yield_now();
    }
    let at_start = OwnProcFiles::counters();
    shared.start_counting(index, at_start);
    at_start
}

/// The end of a vCPU thread's run: no more kicks to it, and its kernel figures since
/// [`begin_vcpu_run`] go into its statistics (also returned).
pub(crate) fn end_vcpu_run<D>(
    shared: &VmShared<D>,
    stats: &mut VcpuStats,
    at_start: &ThreadCounters,
) -> ThreadCounters {
    shared.kicks.register(stats.index, None);
    let kernel = OwnProcFiles::counters().since(at_start);
    stats.kernel_voluntary_switches = kernel.voluntary_switches;
    stats.kernel_cpu_ns = kernel.cpu_ns;
    stats.kernel_timeslices = kernel.timeslices;
    // A thread that ends unmaps memory (its kvm_run, its signal stack, its stack), taking mmap_lock for
    // writing; a vCPU thread still before its final sample that faults guest memory meanwhile would
    // sleep on it, and the kernel would count a sleep that was no halt. So no thread leaves before all
    // have taken their sample (bounded, in case one never gets here).
    shared.finished.fetch_add(1, Ordering::AcqRel);
    let give_up = Instant::now() + Duration::from_secs(2);
    while (shared.finished.load(Ordering::Acquire) as usize) < shared.live.len()
        && Instant::now() < give_up
    {
        std::thread::yield_now();
    }
    kernel
}

/// Reads KVM's own exit counts of a vCPU whose run ended into its statistics (see
/// [`VcpuStats::kvm_exits`]); leaves them empty, with a debug line, where the kernel has no binary
/// statistics.
pub(crate) fn record_kvm_exits(vcpu: &Vcpu, stats: &mut VcpuStats) {
    use crate::stats::{KVM_ALL_EXITS, KVM_USERSPACE_EXITS};
    let names: Vec<&str> = KVM_USERSPACE_EXITS
        .iter()
        .map(|&(name, _)| name)
        .chain([KVM_ALL_EXITS])
        .collect();
    match vcpu.kernel_stats(&names) {
        Ok(values) => {
            stats.kvm_exits = names
                .iter()
                .zip(values)
                .filter_map(|(name, v)| Some(((*name).to_owned(), v?)))
                .collect();
        }
        Err(e) => log::debug!("vCPU {}: no KVM exit statistics: {e}", stats.index),
    }
}

/// The outcome of an exit that means the guest crashed, the same in every mode; `None` for the exits a
/// mode handles itself.
pub(crate) fn crash_outcome(index: u32, exit: &Exit, vcpu: &Vcpu) -> Option<Outcome> {
    let why = match exit {
        Exit::Mmio { addr, write } => format!(
            "vCPU {index}: guest {} unmapped address {addr:#x}",
            if *write { "wrote" } else { "read" }
        ),
        Exit::Shutdown => format!("vCPU {index}: triple fault ({})", vcpu.describe_state()),
        Exit::InternalError { suberror } => format!(
            "vCPU {index}: KVM internal error (suberror {suberror}; emulation failure?) ({})",
            vcpu.describe_state()
        ),
        Exit::FailEntry { reason } => {
            format!("vCPU {index}: VM entry failed (reason {reason:#x})")
        }
        Exit::Other(what) => format!("vCPU {index}: unhandled exit {what}"),
        Exit::IoOut { .. }
        | Exit::IoIn { .. }
        | Exit::Hlt
        | Exit::Interrupted
        | Exit::InterruptWindow => return None,
    };
    Some(Outcome::GuestCrash(why))
}

/// The statistics name of an exit (docs/stats.md, `exits`).
pub(crate) fn exit_stat_name(exit: &Exit) -> &'static str {
    match exit {
        // Only a 32-bit out is the exit port's: others are ignored, as at an unknown port.
        Exit::IoOut {
            port: EXIT_PORT | IDLE_PORT,
            size,
            ..
        } if *size != 4 => "io_unknown",
        Exit::IoOut { port, .. } | Exit::IoIn { port, .. } => match *port {
            p if SERIAL_PORTS.contains(&p) => "io_serial",
            EXIT_PORT => "io_exit",
            TIMER_PORT => "io_timer",
            // A halt (docs/timer-abi.md, "Halting in one exit"), not a timer operation.
            IDLE_PORT => "io_idle",
            REPORT_PORT => "io_report",
            _ => "io_unknown",
        },
        other => other.kind(),
    }
}

/// A VM ready to run: guest memory loaded, boot structures written, every vCPU in its boot state.
struct Machine {
    kvm: KvmVm,
    vcpus: Vec<Vcpu>,
    /// The guest TSC's frequency (0: unknown).
    tsc_khz: u32,
}

/// Creates the VM (with KVM's in-kernel irqchip if `irqchip`), loads the image, creates the vCPUs in
/// the boot state of docs/boot.md and writes the boot structures. The same for every mode.
fn build_machine(
    cfg: &VmConfig,
    image: &GuestImage,
    layout: &Layout,
    irqchip: bool,
) -> Result<Machine, VmmError> {
    let mem_size = cfg.memory_mib << 20;
    let kvm = if irqchip {
        KvmVm::create_with_irqchip(mem_size)?
    } else {
        KvmVm::create(mem_size)?
    };
    if cfg.vcpus as usize > kvm.max_vcpus() {
        return Err(VmmError::TooManyVcpus(cfg.vcpus, kvm.max_vcpus()));
    }
    let loaded = Elf::load(
        kvm.memory(),
        None,
        &mut Cursor::new(&image.bytes[..]),
        Some(GuestAddress(layout::IMAGE_BASE)),
    )
    .map_err(|e| VmmError::Load(e.to_string()))?;

    let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
    for i in 0..cfg.vcpus {
        let vcpu = kvm.create_vcpu(u64::from(i))?;
        vcpu.set_boot_state(
            kvm.cpuid(),
            &BootState {
                entry: loaded.kernel_load.0,
                stack_top: layout.stack_top(i),
                index: u64::from(i),
                boot_info: layout::BOOT_INFO,
                gdt_base: layout::BOOT_GDT,
                page_table_root: layout::PML4,
            },
        )?;
        if irqchip {
            vcpu.set_runnable()?;
        }
        vcpus.push(vcpu);
    }
    // Only a guest that programs a TSC-based timer needs it (the kvm-lapic guest refuses 0).
    let tsc_khz = vcpus[0].tsc_khz().unwrap_or_else(|e| {
        log::warn!("{e}: boot info gets tsc_khz 0");
        0
    });
    layout
        .write_boot_structures(
            kvm.memory(),
            cfg.max_timers,
            &cfg.guest_args(),
            tsc_khz,
            !irqchip,
        )
        .map_err(|e| VmmError::Load(e.to_string()))?;
    if let Some(path) = &cfg.payload {
        let bytes = crate::limits::read_input(path, crate::limits::InputKind::Payload)
            .map_err(VmmError::Setup)?;
        layout
            .write_payload(kvm.memory(), &bytes)
            .map_err(|e| VmmError::Load(format!("payload {}: {e}", path.display())))?;
    }
    install_kick_handler()?;
    Ok(Machine {
        kvm,
        vcpus,
        tsc_khz,
    })
}

/// How a VM ended, once all of its vCPU threads are back.
struct Ended {
    vcpus: Vec<VcpuStats>,
    wall_ns: u64,
    outcome: Outcome,
    /// Guest time of the end.
    ended_at: u64,
    /// Console bytes that could not be written (docs/stats.md).
    console_dropped_bytes: u64,
}

/// How quietvm runs a VM beyond its config: the control API and the metrics file (docs/api.md).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub api_sock: Option<PathBuf>,
    pub metrics: Option<PathBuf>,
    /// How often `--metrics` gets a line.
    pub metrics_period: Duration,
    /// When quietvm started: `--timeout-ms` counts from here, start-up included (`None`: from the
    /// call to [`run_vm`]).
    pub started: Option<Instant>,
    /// `--timer-log`: one JSON line per arming when it ends (docs/timer-abi.md, "The timer log").
    pub timer_log: Option<PathBuf>,
}

/// The start-up watchdog's line: dropped (which stops the watchdog) once the event loop, whose timer
/// takes over `--timeout-ms`, exists.
static STARTUP_WATCHDOG: Mutex<Option<std::sync::mpsc::Sender<()>>> = Mutex::new(None);

/// Ends the process with exit code 100 if the VM's event loop is not running by `deadline`: start-up
/// (reading files, creating the VM, binding the API socket) is bounded by `--timeout-ms` too.
fn start_watchdog(deadline: Instant, timeout_ms: u64) {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(left) {
                crate::sys::os::write_stderr_within(
                    format!("quietvm: the VM did not start within --timeout-ms {timeout_ms}\n")
                        .as_bytes(),
                    Instant::now() + crate::limits::EXIT_FLUSH,
                );
                std::process::exit(exit_code::GUEST_CRASH);
            }
        });
    if spawned.is_ok() {
        *STARTUP_WATCHDOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    }
}

/// Start-up is over: the event loop's timer keeps `--timeout-ms` from here.
fn stop_watchdog() {
    STARTUP_WATCHDOG
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
}

/// What is left of `--timeout-ms` (at least 1 ms, so that it still fires), `None` without one.
fn timeout_left(cfg: &VmConfig, opts: &RunOptions) -> Option<Duration> {
    (cfg.timeout_ms > 0).then(|| {
        let total = Duration::from_millis(cfg.timeout_ms);
        let spent = opts.started.map(|t| t.elapsed()).unwrap_or_default();
        total.saturating_sub(spent).max(Duration::from_millis(1))
    })
}

/// Runs `body(shared, index, vcpu)` on one thread per vCPU, serves the VMM's event loop until the VM
/// ends (its end, signals, `--timeout-ms`, `--metrics`, the API), and joins the threads.
fn run_vcpu_threads<D: ModeParts>(
    shared: &Arc<VmShared<D>>,
    vcpus: Vec<Vcpu>,
    cfg: &VmConfig,
    opts: &RunOptions,
    body: fn(Arc<VmShared<D>>, u32, Vcpu) -> VcpuStats,
) -> Result<Ended, VmmError> {
    // Set up (and refuse bad options) before any vCPU runs.
    let handle = Arc::new(VmHandle::new(Arc::clone(shared), cfg.clone()));
    let mut event_loop = EventLoop::new(
        handle,
        &LoopOptions {
            api_sock: opts.api_sock.clone(),
            metrics: opts.metrics.clone().map(|p| (p, opts.metrics_period)),
            timeout: timeout_left(cfg, opts),
        },
    )?;
    stop_watchdog();
    let started = Instant::now();
    let mut threads = Vec::with_capacity(vcpus.len());
    for (i, vcpu) in vcpus.into_iter().enumerate() {
        let for_thread = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .stack_size(256 << 10)
            .spawn(move || body(for_thread, i as u32, vcpu));
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                shared.end(Outcome::VmmError(format!(
                    "cannot start vCPU thread {i}: {e}"
                )));
                for t in threads {
                    let _ = t.join();
                }
                return Err(VmmError::Thread(e));
            }
        }
    }

    // The VMM thread's filter, now that every vCPU thread exists (they installed their own).
    if let Err(e) = crate::sys::seccomp::install(crate::sys::seccomp::ThreadClass::Vmm) {
        shared.end(Outcome::VmmError(e));
    }
    event_loop.run();
    let mut vcpu_stats: Vec<VcpuStats> = Vec::with_capacity(threads.len());
    for (i, t) in threads.into_iter().enumerate() {
        match t.join() {
            Ok(s) => vcpu_stats.push(s),
            Err(_) => {
                shared.end(Outcome::VmmError(format!("vCPU thread {i} panicked")));
                vcpu_stats.push(VcpuStats::new(i as u32));
            }
        }
    }
    let wall_ns = started.elapsed().as_nanos() as u64;
    let console_dropped_bytes = shared.serial.finish();
    let (outcome, ended_at) = shared
        .outcome
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or((
            Outcome::VmmError("the VM ended without an outcome".into()),
            0,
        ));
    Ok(Ended {
        vcpus: vcpu_stats,
        wall_ns,
        outcome,
        ended_at,
        console_dropped_bytes,
    })
}

/// The statistics of a run, from its end and its timer figures.
fn vm_stats(cfg: &VmConfig, ended: Ended, timers: TimerStats) -> VmStats {
    let (user, system) = crate::sys::os::process_cpu_ns();
    let stats = VmStats {
        policy: cfg.policy.to_string(),
        workload: cfg.workload_label(),
        exit_code: ended.outcome.exit_code(),
        outcome: ended.outcome.describe(),
        wall_ns: ended.wall_ns,
        process_user_ns: user,
        process_system_ns: system,
        per_fired_timer: PerFiredTimer::of(&ended.vcpus, user + system, timers.fired),
        vcpus: ended.vcpus,
        timers,
        console_dropped_bytes: ended.console_dropped_bytes,
        peer: None,
    };
    // Every exit quietvm counts, KVM counts too: a difference is a bug in quietvm's accounting.
    for m in stats.kvm_exit_mismatches() {
        log::warn!("exit count not confirmed by KVM: {m}");
    }
    stats
}

impl ModeParts for TimerDevice<GuestClock> {
    fn live_timers(&self, now: u64) -> TimerStats {
        self.timer_stats(now)
    }

    fn vcpu_timer_counts(&self, vcpus: &mut [VcpuStats]) {
        self.each_vcpu_timer_counts(|cpu, fired, remote| {
            if let Some(v) = vcpus.get_mut(cpu as usize).filter(|v| v.index == cpu) {
                (v.timers_fired, v.remote_expiries) = (fired, remote);
            }
        });
    }

    fn hotplug(&self) -> Option<&dyn control::HotplugDevice> {
        Some(self)
    }

    fn describe_vcpu(&self, cpu: u32) -> Option<String> {
        Some(TimerDevice::describe_vcpu(self, cpu))
    }
}

impl control::HotplugDevice for TimerDevice<GuestClock> {
    fn request_offline(&self, cpu: u32) {
        TimerDevice::request_offline(self, cpu)
    }

    fn withdraw_offline(&self, cpu: u32) -> bool {
        TimerDevice::withdraw_offline(self, cpu)
    }

    fn prepare_online(&self, cpu: u32) {
        TimerDevice::prepare_online(self, cpu)
    }
}

/// Runs one VM to its end and returns its statistics. `Err` means the VM could not be run at all.
pub fn run_vm(cfg: &VmConfig, opts: &RunOptions) -> Result<VmStats, VmmError> {
    cfg.validate()?;
    crate::sys::seccomp::enable(cfg.seccomp);
    crate::sys::seccomp::read_debug_env();
    if cfg.timeout_ms > 0 {
        let started = opts.started.unwrap_or_else(Instant::now);
        start_watchdog(
            started + Duration::from_millis(cfg.timeout_ms),
            cfg.timeout_ms,
        );
    }
    let image = match &cfg.guest {
        Some(path) => GuestImage::from_file(path)?,
        None => GuestImage::builtin()?,
    };
    let mem_size = cfg.memory_mib << 20;
    let layout = Layout::plan(image.end, cfg.vcpus, mem_size, cfg.max_timers).map_err(|need| {
        VmmError::MemoryTooSmall {
            have: cfg.memory_mib,
            need: need.div_ceil(1 << 20),
            vcpus: cfg.vcpus,
        }
    })?;
    if image.end > mem_size {
        return Err(VmmError::MemoryTooSmall {
            have: cfg.memory_mib,
            need: image.end.div_ceil(1 << 20),
            vcpus: cfg.vcpus,
        });
    }

    let policy = match cfg.policy {
        VmPolicy::Userspace(p) => p,
        VmPolicy::KvmLapic => {
            if let Some(path) = &opts.timer_log {
                return Err(VmmError::TimerLog(format!(
                    "--timer-log {}: needs a userspace timer policy (local, push or pull); under \
                     kvm-lapic the guest keeps its timers itself",
                    path.display()
                )));
            }
            if cfg.timer_slack_ns > 0 {
                log::warn!("timer-slack-ns has no effect under kvm-lapic (the LAPIC has no slack)");
            }
            return in_kernel_lapic::run_vm(cfg, opts, &image, &layout);
        }
        VmPolicy::Qemu => {
            return Err(VmmError::Setup(
                "policy qemu runs the guest under QEMU, not in quietvm's VMM (quietvm run --policy qemu)"
                    .into(),
            ))
        }
    };
    // Opened before any vCPU runs, so a path that cannot be written fails the run at once.
    let timer_log = match &opts.timer_log {
        Some(path) => Some(TimerLog::create(path).map_err(VmmError::TimerLog)?),
        None => None,
    };
    let machine = build_machine(cfg, &image, &layout, false)?;
    let clock = GuestClock::for_vcpus(&machine.vcpus, machine.tsc_khz);
    let service = TimerService::new(
        ServiceConfig {
            policy,
            max_timers: cfg.max_timers,
            group_size: cfg.hierarchy_group_size as usize,
            nodes: (!cfg.vcpu_nodes.is_empty()).then(|| cfg.vcpu_nodes.clone()),
            max_cpus: Some(cfg.vcpus),
            isolated: cfg.isolated_vcpus.clone(),
        },
        clock,
        cfg.vcpus,
    );
    let kicks = Arc::new(VcpuKicks::new(cfg.vcpus));
    let mut device = TimerDevice::new(
        service,
        machine.kvm.memory().clone(),
        layout.device_pages,
        layout.timer_states,
        cfg.vcpus,
        Arc::clone(&kicks) as Arc<dyn VcpuKicker>,
    );
    device.set_min_slack(cfg.timer_slack_ns);
    if let Some(params) = clock.queue_params() {
        device.offer_queues(params);
    }
    if let Some(l) = &timer_log {
        device.set_log(Arc::clone(l));
    }
    let shared = Arc::new(VmShared::new(
        device,
        kicks,
        cfg.vcpus,
        cfg.vcpus_online(),
        clock,
        cfg.halt_poll_ns,
    )?);
    if let Some(l) = &timer_log {
        // A write that fails ends the VM at once, with that error as its outcome.
        let weak = Arc::downgrade(&shared);
        l.on_error(Box::new(move |msg| {
            if let Some(s) = weak.upgrade() {
                s.end(Outcome::VmmError(msg));
            }
        }));
    }
    let ran = run_vcpu_threads(&shared, machine.vcpus, cfg, opts, VcpuThread::run);
    shared.device.read_rings_at_end();
    if let Some(l) = &timer_log {
        // Every vCPU thread is back: nothing arms or ends any more.
        shared.device.log_pending_at_end();
        l.finish().map_err(VmmError::TimerLog)?;
    }
    let mut ended = ran?;

    ModeParts::vcpu_timer_counts(&shared.device, &mut ended.vcpus);
    let mut timers = shared.device.timer_stats(ended.ended_at);
    timers.hierarchy_check = shared.device.check_hierarchy();
    if timers.hierarchy_check != "ok" {
        log::error!("timer hierarchy: {}", timers.hierarchy_check);
    }
    Ok(vm_stats(cfg, ended, timers))
}

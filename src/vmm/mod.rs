//! The VM: build it from a [`VmConfig`], run one thread per vCPU, wait for its end, report statistics.

mod guest_image;
mod kicks;
pub mod layout;
mod vcpu_thread;

use std::io::Cursor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use linux_loader::loader::{elf::Elf, KernelLoader};
use thiserror::Error;
use tmigr::clock::Clock;
use tmigr::service::{ServiceConfig, TimerService};
use vm_memory::GuestAddress;

use crate::config::{ConfigError, VmConfig};
use crate::devices::serial::SerialConsole;
use crate::devices::timer::TimerDevice;
use crate::devices::{SERIAL_PORTS, TIMER_PORT};
use crate::kvm::kick::install_kick_handler;
use crate::kvm::sys::monotonic_ns;
use crate::kvm::vcpu::BootState;
use crate::kvm::vm::KvmVm;
use crate::kvm::KvmError;
use crate::stats::{Lateness, TimerStats, VcpuStats, VmStats};
pub use guest_image::{GuestImage, ImageError};
use kicks::{VcpuKicks, KICK_STOP};
use layout::Layout;
use vcpu_thread::VcpuThread;

/// quietvm's exit code when the guest crashed or timed out.
pub const EXIT_GUEST_CRASH: i32 = 100;
/// quietvm's exit code when it could not run the VM at all.
pub const EXIT_VMM_ERROR: i32 = 101;

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
}

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
}

impl Outcome {
    /// quietvm's process exit code for this outcome (docs/boot.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::GuestExit(v) => (*v).min(99) as i32,
            Outcome::GuestCrash(_) | Outcome::Timeout(_) => EXIT_GUEST_CRASH,
            Outcome::VmmError(_) => EXIT_VMM_ERROR,
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
        }
    }
}

/// A clock in guest nanoseconds: host `CLOCK_MONOTONIC` since the VM was created.
#[derive(Debug, Clone, Copy)]
pub struct GuestClock {
    start_mono: u64,
}

impl Clock for GuestClock {
    fn now_ns(&self) -> u64 {
        monotonic_ns().saturating_sub(self.start_mono)
    }
}

/// What every vCPU thread shares.
pub(crate) struct VmShared {
    pub(crate) device: TimerDevice<GuestClock>,
    pub(crate) serial: SerialConsole<std::io::Stdout>,
    pub(crate) kicks: VcpuKicks,
    /// `CLOCK_MONOTONIC` at guest time 0.
    pub(crate) clock_start_mono: u64,
    stop: AtomicBool,
    outcome: Mutex<Option<(Outcome, u64)>>,
    ended: Condvar,
}

impl VmShared {
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Ends the VM (the first outcome wins) and kicks every vCPU so its thread returns.
    pub(crate) fn end(&self, outcome: Outcome) {
        let now = self.device.service().clock().now_ns();
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some((outcome, now));
        }
        self.stop.store(true, Ordering::Release);
        self.ended.notify_all();
        drop(slot);
        self.kicks.kick_all(KICK_STOP);
    }

    /// Answers a guest `in`.
    pub(crate) fn io_in(&self, cpu: u32, port: u16, size: u8) -> u32 {
        match port {
            p if SERIAL_PORTS.contains(&p) => {
                u32::from(self.serial.read((p - SERIAL_PORTS.start) as u8))
            }
            TIMER_PORT if size == 4 => self.device.last_status(cpu),
            _ => {
                log::debug!("vCPU {cpu}: in from unknown port {port:#x}");
                u32::MAX
            }
        }
    }
}

/// Runs one VM to its end and returns its statistics. `Err` means the VM could not be run at all.
pub fn run_vm(cfg: &VmConfig) -> Result<VmStats, VmmError> {
    cfg.validate()?;
    let image = match &cfg.guest {
        Some(path) => GuestImage::from_file(path)?,
        None => GuestImage::builtin()?,
    };
    let mem_size = cfg.memory_mib << 20;
    let layout =
        Layout::plan(image.end, cfg.vcpus, mem_size).map_err(|need| VmmError::MemoryTooSmall {
            have: cfg.memory_mib,
            need: need.div_ceil(1 << 20),
            vcpus: cfg.vcpus,
        })?;
    if image.end > mem_size {
        return Err(VmmError::MemoryTooSmall {
            have: cfg.memory_mib,
            need: image.end.div_ceil(1 << 20),
            vcpus: cfg.vcpus,
        });
    }

    let kvm = KvmVm::create(mem_size)?;
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
    layout
        .write_boot_structures(kvm.memory(), cfg.max_timers, &cfg.guest_args())
        .map_err(|e| VmmError::Load(e.to_string()))?;
    install_kick_handler()?;

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
        vcpus.push(vcpu);
    }

    let clock = GuestClock {
        start_mono: monotonic_ns(),
    };
    let service = TimerService::new(
        ServiceConfig {
            policy: cfg.policy,
            max_timers: cfg.max_timers,
            group_size: 8,
            nodes: None,
        },
        clock,
        cfg.vcpus,
    );
    let shared = Arc::new(VmShared {
        device: TimerDevice::new(
            service,
            kvm.memory().clone(),
            layout.device_pages,
            cfg.vcpus,
            cfg.max_timers,
        ),
        serial: SerialConsole::new(std::io::stdout()),
        kicks: VcpuKicks::new(cfg.vcpus),
        clock_start_mono: clock.start_mono,
        stop: AtomicBool::new(false),
        outcome: Mutex::new(None),
        ended: Condvar::new(),
    });

    let started = Instant::now();
    let mut threads = Vec::with_capacity(vcpus.len());
    for (i, vcpu) in vcpus.into_iter().enumerate() {
        let for_thread = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .stack_size(256 << 10)
            .spawn(move || VcpuThread::run(for_thread, i as u32, vcpu));
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

    wait_for_end(&shared, cfg.timeout_ms);
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
    shared.serial.flush();
    let (outcome, ended_at) = shared
        .outcome
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or((
            Outcome::VmmError("the VM ended without an outcome".into()),
            0,
        ));

    let mut counters = shared.device.counters(ended_at);
    for v in &mut vcpu_stats {
        v.timers_fired = counters.fired_per_vcpu[v.index as usize];
        v.remote_expiries = counters.remote_per_vcpu[v.index as usize];
    }
    let (user, system) = crate::kvm::sys::process_cpu_ns();
    Ok(VmStats {
        policy: cfg.policy.to_string(),
        workload: cfg.workload.clone(),
        exit_code: outcome.exit_code(),
        outcome: outcome.describe(),
        wall_ns,
        process_user_ns: user,
        process_system_ns: system,
        vcpus: vcpu_stats,
        timers: TimerStats {
            armed: counters.armed,
            fired: counters.fired,
            cancelled: counters.cancelled,
            early: counters.early,
            missed: counters.missed,
            remote_expiries: counters.remote_expiries,
            serialized: counters.serialized,
            lateness_ns: Lateness::from_samples(&mut counters.lateness),
        },
    })
}

fn wait_for_end(shared: &VmShared, timeout_ms: u64) {
    let deadline = (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms));
    let mut slot = shared.outcome.lock().unwrap_or_else(|e| e.into_inner());
    while slot.is_none() {
        match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    drop(slot);
                    shared.end(Outcome::Timeout(timeout_ms));
                    return;
                }
                slot = shared
                    .ended
                    .wait_timeout(slot, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            None => slot = shared.ended.wait(slot).unwrap_or_else(|e| e.into_inner()),
        }
    }
}

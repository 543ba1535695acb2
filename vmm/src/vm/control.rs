//! The running VM as the control API and the event loop see it ([`VmHandle`]): live statistics,
//! pause and resume, vCPU hotplug, and orderly shutdown. Every request is carried out by the vCPU
//! threads themselves (the handle only sets state and kicks them), and each one either completes or
//! changes nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use super::event_loop::LoopTarget;
use super::{Outcome, VmShared};
use crate::accounting::KickReasons;
use crate::api::{Answer, ControlError, VmControl, Waiting};
use crate::config::VmConfig;
use crate::stats::{TimerStats, VcpuStats, VmStats};

/// How long a pause or a hotplug request waits for the vCPU threads (and the guest) to act.
const ACT_WITHIN: Duration = Duration::from_secs(2);

/// What a mode's shared part adds to the control plane.
pub(crate) trait ModeParts: Send + Sync + 'static {
    /// The timer figures so far, with `missed` counted at `now`.
    fn live_timers(&self, now: u64) -> TimerStats;
    /// Fills in each vCPU's timer counts (callbacks handed to it, remote expiries) so far.
    fn vcpu_timer_counts(&self, vcpus: &mut [VcpuStats]);
    /// The hotplug side of the timer device; `None` where the mode has no device (kvm-lapic).
    fn hotplug(&self) -> Option<&dyn HotplugDevice>;
    /// vCPU `cpu`'s timer-device state in one line, for the report of a VM that did not end in time;
    /// `None` where the mode has no device (kvm-lapic).
    fn describe_vcpu(&self, _cpu: u32) -> Option<String> {
        None
    }
}

/// The timer device's part in vCPU hotplug.
pub(crate) trait HotplugDevice {
    /// Writes "offline requested" to the guest's `control` word and rings its doorbell.
    fn request_offline(&self, cpu: u32);
    /// Withdraws an unacknowledged request; `false` if the guest acknowledged meanwhile.
    fn withdraw_offline(&self, cpu: u32) -> bool;
    /// Sets up the hierarchy's groups for a vCPU about to come online, on the caller's thread (the
    /// kernel's hotplug "prepare" step), before the vCPU's own thread runs again.
    fn prepare_online(&self, cpu: u32);
}

/// A running VM, for the API and the event loop.
pub(crate) struct VmHandle<D> {
    shared: Arc<VmShared<D>>,
    cfg: VmConfig,
}

impl<D: ModeParts> VmHandle<D> {
    pub(crate) fn new(shared: Arc<VmShared<D>>, cfg: VmConfig) -> Self {
        VmHandle { shared, cfg }
    }

    fn snapshot(&self) -> VmStats {
        let now = self.shared.now();
        let (user, system) = crate::sys::os::process_cpu_ns();
        let mut stats = VmStats {
            policy: self.cfg.policy.to_string(),
            workload: self.cfg.workload_label(),
            exit_code: 0,
            outcome: if self.shared.paused() {
                "paused"
            } else {
                "running"
            }
            .into(),
            wall_ns: now,
            process_user_ns: user,
            process_system_ns: system,
            vcpus: {
                let mut v = self.shared.live_vcpu_stats();
                self.shared.device.vcpu_timer_counts(&mut v);
                v
            },
            timers: self.shared.device.live_timers(now),
            console_dropped_bytes: self.shared.serial.dropped_bytes(),
            per_fired_timer: None,
            peer: None,
        };
        stats.per_fired_timer =
            crate::stats::PerFiredTimer::of(&stats.vcpus, user + system, stats.timers.fired);
        stats
    }

    fn vcpu_index(&self, vcpu: u32) -> Result<usize, ControlError> {
        if vcpu >= self.cfg.vcpus {
            return Err(ControlError::NoSuchVcpu {
                vcpu,
                count: self.cfg.vcpus,
            });
        }
        Ok(vcpu as usize)
    }

    fn online_count(&self) -> usize {
        self.shared.control.iter().filter(|c| c.is_online()).count()
    }
}

/// At most this many vCPUs' states are logged when `--timeout-ms` ends a VM (one line each).
const TIMEOUT_REPORT_VCPUS: usize = 256;

/// An answer that comes once `check` gives one (see [`Waiting`]).
fn later(check: impl FnMut() -> Option<Result<Value, ControlError>> + Send + 'static) -> Answer {
    Answer::Later(Waiting {
        check: Box::new(check),
    })
}

impl<D: ModeParts> VmControl for VmHandle<D> {
    fn stats(&self) -> Value {
        serde_json::to_value(self.snapshot()).unwrap_or(Value::Null)
    }

    fn pause(&self) -> Answer {
        if self.shared.paused.swap(true, Ordering::AcqRel) {
            return ControlError::AlreadyPaused.into();
        }
        self.shared.kicks.kick_all(KickReasons::CONTROL);
        let shared = Arc::clone(&self.shared);
        let deadline = Instant::now() + ACT_WITHIN;
        later(move || {
            if shared.control.iter().all(|v| v.is_parked()) {
                return Some(Ok(json!({ "paused": true })));
            }
            if shared.stopping() {
                return Some(Err(ControlError::Ending));
            }
            if Instant::now() < deadline {
                return None;
            }
            // Never half-done: undo.
            shared.paused.store(false, Ordering::Release);
            shared.kicks.kick_all(KickReasons::CONTROL);
            Some(Err(ControlError::PauseTimedOut))
        })
    }

    fn resume(&self) -> Answer {
        if !self.shared.paused.swap(false, Ordering::AcqRel) {
            return ControlError::NotPaused.into();
        }
        self.shared.kicks.kick_all(KickReasons::CONTROL);
        Ok(json!({ "paused": false })).into()
    }

    fn vcpu_offline(&self, vcpu: u32) -> Answer {
        let i = match self.vcpu_index(vcpu) {
            Ok(i) => i,
            Err(e) => return Err(e).into(),
        };
        let Some(device) = self.shared.device.hotplug() else {
            return ControlError::NoHotplug(self.cfg.policy.to_string()).into();
        };
        let c = &self.shared.control[i];
        if vcpu == 0 {
            return ControlError::Vcpu0Stays.into();
        }
        if self.shared.paused() {
            return ControlError::Paused.into();
        }
        if !c.is_online() {
            return ControlError::AlreadyOffline(vcpu).into();
        }
        if !c.wanted_online.load(Ordering::Acquire) {
            return ControlError::GoingOffline(vcpu).into();
        }
        if self.online_count() <= 1 {
            return ControlError::LastOnline.into();
        }
        c.wanted_online.store(false, Ordering::Release);
        device.request_offline(vcpu);
        self.shared.kicks.kick(vcpu, KickReasons::DELIVERY);
        let shared = Arc::clone(&self.shared);
        let mut deadline = Instant::now() + ACT_WITHIN;
        let mut acknowledged = false;
        later(move || {
            let c = &shared.control[i];
            if !c.is_online() {
                return Some(Ok(json!({ "vcpu": vcpu, "online": false })));
            }
            if shared.stopping() {
                return Some(Err(ControlError::Ending));
            }
            if Instant::now() < deadline {
                return None;
            }
            if acknowledged {
                return Some(Err(ControlError::DidNotLeave(vcpu)));
            }
            let withdrawn = shared
                .device
                .hotplug()
                .is_some_and(|d| d.withdraw_offline(vcpu));
            if withdrawn {
                c.wanted_online.store(true, Ordering::Release);
                return Some(Err(ControlError::NotAcknowledged(vcpu)));
            }
            // Acknowledged just now: it is on its way out.
            acknowledged = true;
            deadline = Instant::now() + ACT_WITHIN;
            None
        })
    }

    fn vcpu_online(&self, vcpu: u32) -> Answer {
        let i = match self.vcpu_index(vcpu) {
            Ok(i) => i,
            Err(e) => return Err(e).into(),
        };
        if self.shared.device.hotplug().is_none() {
            return ControlError::NoHotplug(self.cfg.policy.to_string()).into();
        }
        if self.shared.paused() {
            return ControlError::Paused.into();
        }
        let c = &self.shared.control[i];
        if c.is_online() {
            return ControlError::AlreadyOnline(vcpu).into();
        }
        if c.wanted_online.load(Ordering::Acquire) {
            return ControlError::ComingOnline(vcpu).into();
        }
        if let Some(device) = self.shared.device.hotplug() {
            device.prepare_online(vcpu);
        }
        c.wanted_online.store(true, Ordering::Release);
        self.shared.kicks.kick(vcpu, KickReasons::CONTROL);
        let shared = Arc::clone(&self.shared);
        let deadline = Instant::now() + ACT_WITHIN;
        later(move || {
            if shared.control[i].is_online() {
                return Some(Ok(json!({ "vcpu": vcpu, "online": true })));
            }
            if shared.stopping() {
                return Some(Err(ControlError::Ending));
            }
            (Instant::now() >= deadline).then_some(Err(ControlError::NotBack(vcpu)))
        })
    }

    fn shutdown(&self) -> Answer {
        self.shared
            .end(Outcome::Shutdown("the API's shutdown request".into()));
        Ok(json!({ "shutting_down": true })).into()
    }
}

impl<D: ModeParts> LoopTarget for VmHandle<D> {
    fn end_event(&self) -> &EventFd {
        &self.shared.end_event
    }

    fn ended(&self) -> bool {
        self.shared.stopping()
    }

    fn end_by_signal(&self, signal: i32) {
        let name = match signal {
            libc::SIGTERM => "SIGTERM".to_owned(),
            libc::SIGINT => "SIGINT".to_owned(),
            libc::SIGHUP => "SIGHUP".to_owned(),
            s => format!("signal {s}"),
        };
        self.shared.end(Outcome::Shutdown(name));
    }

    fn end_by_timeout(&self) {
        // Where each vCPU was when the time ran out, before the stop moves them: the guest hung, and
        // this is what tells a lost wakeup in quietvm from a guest that waits for itself.
        let vcpus = self.shared.control.len();
        log::warn!(
            "--timeout-ms {} passed at guest time {} ns; each vCPU's state:",
            self.cfg.timeout_ms,
            self.shared.now()
        );
        for (i, c) in self
            .shared
            .control
            .iter()
            .enumerate()
            .take(TIMEOUT_REPORT_VCPUS)
        {
            let device = self.shared.device.describe_vcpu(i as u32);
            log::warn!(
                "timeout: vCPU {i}: {:?} {}",
                c.state(),
                device.as_deref().unwrap_or("")
            );
        }
        if vcpus > TIMEOUT_REPORT_VCPUS {
            log::warn!(
                "timeout: {} more vCPUs not shown",
                vcpus - TIMEOUT_REPORT_VCPUS
            );
        }
        self.shared.end(Outcome::Timeout(self.cfg.timeout_ms));
    }

    fn metrics_line(&self) -> String {
        let s = self.snapshot();
        let sum = |f: &dyn Fn(&crate::stats::VcpuStats) -> u64| s.vcpus.iter().map(f).sum::<u64>();
        json!({
            "t_ns": s.wall_ns,
            "halts": sum(&|v| v.halts),
            "host_wakeups": sum(&|v| v.host_wakeups),
            "kernel_voluntary_switches": sum(&|v| v.kernel_voluntary_switches),
            "exits": sum(&|v| v.exits.values().sum()),
            "timers_armed": s.timers.armed,
            "timers_fired": s.timers.fired,
            "remote_expiries": s.timers.remote_expiries,
            "online_vcpus": self.online_count(),
            "paused": self.shared.paused(),
        })
        .to_string()
    }
}

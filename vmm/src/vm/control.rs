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
use super::kicks::{KICK_CONTROL, KICK_DELIVERY};
use super::{Outcome, VmShared};
use crate::api::VmControl;
use crate::config::VmConfig;
use crate::stats::{TimerStats, VmStats};

/// How long a pause or a hotplug request waits for the vCPU threads (and the guest) to act.
const ACT_WITHIN: Duration = Duration::from_secs(2);

/// What a mode's shared part adds to the control plane.
pub(crate) trait ModeParts: Send + Sync + 'static {
    /// The timer figures so far, with `missed` counted at `now`.
    fn live_timers(&self, now: u64) -> TimerStats;
    /// The hotplug side of the timer device; `None` where the mode has no device (kvm-lapic).
    fn hotplug(&self) -> Option<&dyn HotplugDevice>;
}

/// The timer device's part in vCPU hotplug.
pub(crate) trait HotplugDevice {
    /// Writes "offline requested" to the guest's `control` word and rings its doorbell.
    fn request_offline(&self, cpu: u32);
    /// Withdraws an unacknowledged request; `false` if the guest acknowledged meanwhile.
    fn withdraw_offline(&self, cpu: u32) -> bool;
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
        VmStats {
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
            vcpus: self.shared.live_vcpu_stats(),
            timers: self.shared.device.live_timers(now),
            console_dropped_bytes: self.shared.serial.dropped_bytes(),
        }
    }

    /// Polls `done` until it holds or [`ACT_WITHIN`] passes (the VMM thread may sleep; vCPUs never do).
    fn wait_for(&self, done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + ACT_WITHIN;
        while !done() {
            if Instant::now() >= deadline || self.shared.stopping() {
                return done();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    fn vcpu_index(&self, vcpu: u32) -> Result<usize, String> {
        if vcpu >= self.cfg.vcpus {
            return Err(format!(
                "no vCPU {vcpu}: the VM has {} (0..{})",
                self.cfg.vcpus,
                self.cfg.vcpus - 1
            ));
        }
        Ok(vcpu as usize)
    }

    fn online_count(&self) -> usize {
        self.shared
            .control
            .iter()
            .filter(|c| c.online.load(Ordering::Acquire))
            .count()
    }
}

impl<D: ModeParts> VmControl for VmHandle<D> {
    fn stats(&self) -> Value {
        serde_json::to_value(self.snapshot()).unwrap_or(Value::Null)
    }

    fn pause(&self) -> Result<Value, String> {
        if self.shared.paused.swap(true, Ordering::AcqRel) {
            return Err("the VM is already paused".into());
        }
        self.shared.kicks.kick_all(KICK_CONTROL);
        let c = &self.shared.control;
        if !self.wait_for(|| c.iter().all(|v| v.parked.load(Ordering::Acquire))) {
            // Never half-done: undo.
            self.shared.paused.store(false, Ordering::Release);
            self.shared.kicks.kick_all(KICK_CONTROL);
            return Err("not every vCPU stopped within 2 s; the VM keeps running".into());
        }
        Ok(json!({ "paused": true }))
    }

    fn resume(&self) -> Result<Value, String> {
        if !self.shared.paused.swap(false, Ordering::AcqRel) {
            return Err("the VM is not paused".into());
        }
        self.shared.kicks.kick_all(KICK_CONTROL);
        Ok(json!({ "paused": false }))
    }

    fn vcpu_offline(&self, vcpu: u32) -> Result<Value, String> {
        let i = self.vcpu_index(vcpu)?;
        let Some(device) = self.shared.device.hotplug() else {
            return Err(format!(
                "vCPU hotplug needs quietvm's timer device; this VM runs {}",
                self.cfg.policy
            ));
        };
        let c = &self.shared.control[i];
        if vcpu == 0 {
            return Err("vCPU 0 cannot go offline".into());
        }
        if self.shared.paused() {
            return Err("the VM is paused: resume it first".into());
        }
        if !c.online.load(Ordering::Acquire) {
            return Err(format!("vCPU {vcpu} is already offline"));
        }
        if self.online_count() <= 1 {
            return Err("the last online vCPU cannot go offline".into());
        }
        c.wanted_online.store(false, Ordering::Release);
        device.request_offline(vcpu);
        self.shared.kicks.kick(vcpu, KICK_DELIVERY);
        if self.wait_for(|| !c.online.load(Ordering::Acquire)) {
            return Ok(json!({ "vcpu": vcpu, "online": false }));
        }
        if device.withdraw_offline(vcpu) {
            c.wanted_online.store(true, Ordering::Release);
            return Err(format!(
                "the guest did not acknowledge taking vCPU {vcpu} offline within 2 s (it acknowledges at its next halt); the request is withdrawn"
            ));
        }
        // Acknowledged just now: it is on its way out.
        if self.wait_for(|| !c.online.load(Ordering::Acquire)) {
            Ok(json!({ "vcpu": vcpu, "online": false }))
        } else {
            Err(format!(
                "vCPU {vcpu} acknowledged but did not leave within 2 s"
            ))
        }
    }

    fn vcpu_online(&self, vcpu: u32) -> Result<Value, String> {
        let i = self.vcpu_index(vcpu)?;
        if self.shared.device.hotplug().is_none() {
            return Err(format!(
                "vCPU hotplug needs quietvm's timer device; this VM runs {}",
                self.cfg.policy
            ));
        }
        if self.shared.paused() {
            return Err("the VM is paused: resume it first".into());
        }
        let c = &self.shared.control[i];
        if c.online.load(Ordering::Acquire) {
            return Err(format!("vCPU {vcpu} is already online"));
        }
        c.wanted_online.store(true, Ordering::Release);
        self.shared.kicks.kick(vcpu, KICK_CONTROL);
        if self.wait_for(|| c.online.load(Ordering::Acquire)) {
            Ok(json!({ "vcpu": vcpu, "online": true }))
        } else {
            Err(format!("vCPU {vcpu} did not come back within 2 s"))
        }
    }

    fn shutdown(&self) -> Result<Value, String> {
        self.shared
            .end(Outcome::Shutdown("the API's shutdown request".into()));
        Ok(json!({ "shutting_down": true }))
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

//! Shared helpers for the integration tests: run the real `quietvm` binary on real KVM.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

/// The result of one `quietvm` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// The `--stats-json` output, when the run wrote it.
    pub stats: Option<Value>,
}

impl Run {
    /// Panics with the whole output unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "expected exit code {code}, got {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    pub fn stats(&self) -> &Value {
        self.stats
            .as_ref()
            .unwrap_or_else(|| panic!("no stats written\n--- stderr\n{}", self.stderr))
    }

    /// `stats.vcpus[i]`.
    pub fn vcpu(&self, i: usize) -> &Value {
        &self.stats()["vcpus"][i]
    }

    /// `stats.vcpus`.
    #[allow(dead_code)] // not every test binary uses it
    pub fn vcpus(&self) -> &Vec<Value> {
        self.stats()["vcpus"].as_array().expect("vcpus array")
    }
}

/// A guest that keeps its timers itself (`kvm-lapic`, `qemu`) handed back its report: timers fired,
/// and the per-vCPU counts add up to the total.
#[allow(dead_code)] // not every test binary uses it
pub fn assert_guest_report_adds_up(r: &Run, workload: &str) {
    let t = &r.stats()["timers"];
    assert!(
        u64_of(&t["fired"]) > 0,
        "{workload}: no timer fired\n{}",
        r.stderr
    );
    let per_vcpu: u64 = r.vcpus().iter().map(|v| u64_of(&v["timers_fired"])).sum();
    assert_eq!(per_vcpu, u64_of(&t["fired"]), "{workload}: per-vCPU fired");
}

pub fn quietvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quietvm"))
}

fn temp_json() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "quietvm-test-{}-{}.json",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// VMs of one test binary run one at a time: the host has two cores, and tests that count wakeups or
/// compare policies must not starve each other's vCPU threads.
static ONE_VM_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `quietvm run ARGS --stats-json <tmp>` with a generous timeout so a hung guest fails the test.
pub fn run(args: &[&str]) -> Run {
    let _turn = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let json = temp_json();
    let out = quietvm()
        .arg("run")
        .args(args)
        .args(["--timeout-ms", "120000", "--stats-json"])
        .arg(&json)
        .output()
        .expect("spawn quietvm");
    let stats = std::fs::read_to_string(&json)
        .ok()
        .map(|s| serde_json::from_str(&s).expect("stats JSON parses"));
    let _ = std::fs::remove_file(&json);
    finish(out, stats)
}

/// Runs `quietvm ARGS` as given (no stats file).
pub fn raw(args: &[&str]) -> Run {
    raw_with_env(args, &[])
}

/// Runs `quietvm ARGS` with extra environment variables (no stats file).
pub fn raw_with_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = quietvm();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    finish(cmd.output().expect("spawn quietvm"), None)
}

fn finish(out: Output, stats: Option<Value>) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stats,
    }
}

/// The built-in workloads that arm timers and end by themselves with their checks (docs/guest.md):
/// every policy must pass them. Not `hotplug` (it needs the timer device's hotplug), `never-ack`,
/// `triple-fault` (they end badly on purpose) or `replay` (it needs a payload).
#[allow(dead_code)] // not every test binary uses it
pub const TIMER_WORKLOADS: [&str; 8] = [
    "timers",
    "idle-movable",
    "all-idle",
    "mixed",
    "rearm-heavy",
    "ping-pong",
    "cancel-race",
    "abi-check",
];

pub fn u64_of(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Checks quietvm's own wakeup count of every vCPU against the kernel's voluntary context switches.
/// `slack` absolute switches are allowed on top of 5 % (thread start-up and the final stop can add one
/// or two switches the thread did not spend halted).
pub fn assert_wakeups_match_kernel(run: &Run, slack: u64) {
    assert_exits_match_kvm(run);
    for v in run.stats()["vcpus"].as_array().expect("vcpus array") {
        let ours = u64_of(&v["host_wakeups"]);
        let kernel = u64_of(&v["kernel_voluntary_switches"]);
        let allowed = slack + ours.max(kernel) / 20;
        assert!(
            ours.abs_diff(kernel) <= allowed,
            "vCPU {}: quietvm counted {ours} host wakeups, the kernel {kernel} voluntary switches (allowed difference {allowed})\n{}",
            v["index"],
            run.stderr
        );
    }
}

/// Checks quietvm's exit counts of every vCPU against KVM's own (`kvm_exits`, from the binary
/// statistics): `HLT` exits exactly (when quietvm handles them), kicks exactly, and no more exits
/// than KVM took; and that quietvm itself found nothing to warn about.
pub fn assert_exits_match_kvm(run: &Run) {
    let stats = run.stats();
    let halts_in_kernel = stats["policy"] == "kvm-lapic";
    for v in stats["vcpus"].as_array().expect("vcpus array") {
        let kvm = &v["kvm_exits"];
        assert!(kvm["exits"].is_u64(), "no KVM exit statistics: {v}");
        let own = |k: &str| v["exits"][k].as_u64().unwrap_or(0);
        if !halts_in_kernel {
            assert_eq!(
                u64_of(&kvm["halt_exits"]),
                own("hlt"),
                "vCPU {}",
                v["index"]
            );
        }
        assert_eq!(
            u64_of(&kvm["signal_exits"]),
            own("kick"),
            "vCPU {}",
            v["index"]
        );
        let besides_kicks: u64 = v["exits"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.as_str() != "kick")
            .map(|(_, n)| u64_of(n))
            .sum();
        assert!(
            u64_of(&kvm["exits"]) >= besides_kicks,
            "vCPU {}: {v}",
            v["index"]
        );
    }
    assert!(
        !run.stderr.contains("not confirmed by KVM"),
        "{}",
        run.stderr
    );
}

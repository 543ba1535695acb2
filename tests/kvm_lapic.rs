//! The `kvm-lapic` baseline (issue "Measuring host wakeup savings"): the built-in workloads with KVM's
//! in-kernel irqchip, where the guest multiplexes its timers onto its own LAPIC TSC-deadline timer and
//! halts in the kernel, on real KVM.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{assert_guest_report_adds_up, quietvm, run, u64_of, Run, TIMER_WORKLOADS};

/// Every workload with timers, plus `hello` (no timers at all).
fn workloads() -> impl Iterator<Item = &'static str> {
    std::iter::once("hello").chain(TIMER_WORKLOADS)
}

/// Keeps this file's one run outside `common::run` (it needs its own `--timeout-ms`) away from the run
/// that counts wakeups.
static COUNTING: Mutex<()> = Mutex::new(());

fn lapic(workload: &str, vcpus: u32, duration_ms: u32) -> Run {
    let r = run(&[
        "--workload",
        workload,
        "--vcpus",
        &vcpus.to_string(),
        "--duration-ms",
        &duration_ms.to_string(),
        "--policy",
        "kvm-lapic",
    ]);
    r.expect_code(0);
    assert!(
        r.stdout.contains(&format!("{workload}: ok")),
        "{workload} on {vcpus} vCPUs:\n{}",
        r.stdout
    );
    let s = r.stats();
    assert_eq!(s["policy"], "kvm-lapic");
    assert_eq!(u64_of(&s["timers"]["early"]), 0, "{workload}: early timers");
    // The guest counts `missed` when vCPU 0 reports, just before the end: another vCPU's sleep timer
    // due at that moment may still be on its way on a loaded host (one per vCPU at most). A lost
    // workload timer fails the guest's own checks instead (every arming fires or is cancelled).
    assert!(
        u64_of(&s["timers"]["missed"]) <= u64::from(vcpus),
        "{workload}: missed timers\n{}\n{}",
        r.stdout,
        r.stderr
    );
    r
}

fn all_workloads_pass_on(vcpu_count: u32) {
    for w in workloads() {
        let r = lapic(w, vcpu_count, 300);
        if w != "hello" {
            // The guest's own figures reached quietvm.
            assert_guest_report_adds_up(&r, w);
        }
    }
}

#[test]
fn every_workload_passes_on_one_vcpu() {
    all_workloads_pass_on(1);
}

#[test]
fn every_workload_passes_on_two_vcpus() {
    all_workloads_pass_on(2);
}

#[test]
fn every_workload_passes_on_eight_vcpus() {
    all_workloads_pass_on(8);
}

#[test]
fn the_guest_reports_its_timers_and_the_kernel_its_halts() {
    let r = lapic("timers", 2, 400);
    let t = &r.stats()["timers"];
    let (armed, fired, cancelled) = (
        u64_of(&t["armed"]),
        u64_of(&t["fired"]),
        u64_of(&t["cancelled"]),
    );
    assert!(armed >= fired + cancelled && fired > 20, "{t}");
    // Every timer fires on the vCPU that armed it.
    assert_eq!(u64_of(&t["remote_expiries"]), 0);
    let late = &t["lateness_ns"];
    let (p50, p99, max) = (
        u64_of(&late["p50"]),
        u64_of(&late["p99"]),
        u64_of(&late["max"]),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{late}");
    for v in r.vcpus() {
        // quietvm does not see the halts: the kernel's counts stand in for its own.
        let switches = u64_of(&v["kernel_voluntary_switches"]);
        assert_eq!(u64_of(&v["host_wakeups"]), switches);
        assert_eq!(u64_of(&v["wakeup_causes"]["kernel_halt"]), switches);
        assert!(u64_of(&v["halts"]) > 0, "KVM's halt_exits: {v}");
        assert_eq!(v["exits"].get("hlt"), None, "HLT stays in the kernel: {v}");
    }
}

#[test]
fn idle_movable_wakes_each_halted_vcpu_about_once_per_timer() {
    let _alone = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    let r = run(&[
        "configs/idle-movable-8.toml",
        "--policy",
        "kvm-lapic",
        "--duration-ms",
        "600",
    ]);
    r.expect_code(0);
    assert!(r.stdout.contains("idle-movable: ok"), "{}", r.stdout);
    for v in &r.vcpus()[1..] {
        let fired = u64_of(&v["timers_fired"]);
        let woke = u64_of(&v["kernel_voluntary_switches"]);
        assert!(fired > 20, "vCPU {} fired only {fired}", v["index"]);
        // One host wakeup per expiry: fewer where two timers fell due together or the kernel's halt
        // polling caught the next one, a few more for the thread's start and the VM's end.
        assert!(
            woke <= fired + 3 && woke * 10 >= fired * 6,
            "vCPU {}: {woke} wakeups for {fired} timers\n{}",
            v["index"],
            r.stderr
        );
    }
}

#[test]
fn crashes_and_timeouts_end_the_vm_as_in_the_other_modes() {
    let r = run(&[
        "--workload",
        "triple-fault",
        "--vcpus",
        "2",
        "--policy",
        "kvm-lapic",
    ]);
    r.expect_code(100);
    assert!(r.stderr.contains("triple fault"), "{}", r.stderr);

    // vCPU 0 spins in a callback that never ends, vCPU 1 halts between timers: both must be stopped.
    let _alone = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let out = quietvm()
        .args([
            "run",
            "--workload",
            "never-ack",
            "--vcpus",
            "2",
            "--policy",
            "kvm-lapic",
        ])
        .args(["--duration-ms", "60000", "--timeout-ms", "500", "--quiet"])
        .output()
        .expect("spawn quietvm");
    assert_eq!(out.status.code(), Some(100));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("did not end within --timeout-ms 500"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(20), "{stderr}");
}

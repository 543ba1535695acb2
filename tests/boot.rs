//! Boots the built-in guest on real KVM: `hello` on 1, 2 and 8 vCPUs, the `timers` workload with its
//! in-guest checks, the ABI checks, and the wakeup counters against the kernel's.

mod common;

use common::{assert_wakeups_match_kernel, run, u64_of};

fn hello(vcpus: u32) {
    let n = vcpus.to_string();
    let r = run(&["--workload", "hello", "--vcpus", &n, "--policy", "local"]);
    r.expect_code(0);
    for i in 0..vcpus {
        let line = format!("hello from vCPU {i} of {vcpus}");
        assert!(
            r.stdout.contains(&line),
            "missing `{line}` in:\n{}",
            r.stdout
        );
    }
    assert_eq!(r.stats()["vcpus"].as_array().unwrap().len(), vcpus as usize);
}

#[test]
fn hello_on_1_vcpu() {
    hello(1);
}

#[test]
fn hello_on_2_vcpus() {
    hello(2);
}

#[test]
fn hello_on_8_vcpus() {
    hello(8);
}

#[test]
fn timers_workload_passes_its_checks_with_no_early_or_missed_timers() {
    let r = run(&["configs/quickstart.toml", "--duration-ms", "300"]);
    r.expect_code(0);
    assert!(r.stdout.contains("timers: ok"), "{}", r.stdout);
    let t = &r.stats()["timers"];
    assert!(u64_of(&t["fired"]) > 0);
    assert_eq!(u64_of(&t["early"]), 0);
    assert_eq!(u64_of(&t["missed"]), 0);
    // Pinned timers fire on their owner.
    assert_eq!(u64_of(&t["remote_expiries"]), 0);
    for i in 0..4 {
        assert!(u64_of(&r.vcpu(i)["halts"]) > 0, "vCPU {i} never halted");
    }
}

#[test]
fn abi_check_gets_the_documented_answers() {
    let r = run(&["--workload", "abi-check", "--vcpus", "2"]);
    r.expect_code(0);
}

#[test]
fn host_wakeups_agree_with_the_kernels_voluntary_switches() {
    let r = run(&[
        "--workload",
        "timers",
        "--vcpus",
        "4",
        "--duration-ms",
        "400",
        "--policy",
        "local",
    ]);
    r.expect_code(0);
    let total: u64 = r.stats()["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u64_of(&v["host_wakeups"]))
        .sum();
    assert!(
        total >= 20,
        "too few wakeups ({total}) for the check to mean anything"
    );
    assert_wakeups_match_kernel(&r, 3);
}

#[test]
fn a_triple_fault_is_reported_as_a_guest_crash() {
    let r = run(&["--workload", "triple-fault", "--vcpus", "1"]);
    r.expect_code(100);
    assert!(r.stderr.contains("triple fault"), "{}", r.stderr);
}

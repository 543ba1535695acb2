//! Movable timers under the three placement policies, on real KVM (issue: local, push and pull).
//! Tests assert behaviour and counts; timings are for `quietvm compare` and the benchmarks.

mod common;

use common::{assert_wakeups_match_kernel, run, u64_of, Run, TIMER_WORKLOADS};
use serde_json::Value;

fn cause(v: &Value, name: &str) -> u64 {
    u64_of(&v["wakeup_causes"][name])
}

fn idle_movable(policy: &str) -> Run {
    let r = run(&[
        "configs/idle-movable-8.toml",
        "--policy",
        policy,
        "--duration-ms",
        "600",
    ]);
    r.expect_code(0);
    assert!(r.stdout.contains("idle-movable: ok"), "{}", r.stdout);
    let t = &r.stats()["timers"];
    assert_eq!(u64_of(&t["early"]), 0, "early timers under {policy}");
    assert_eq!(u64_of(&t["missed"]), 0, "missed timers under {policy}");
    r
}

#[test]
fn pull_never_wakes_a_halted_vcpu_for_a_movable_timer_while_vcpu0_runs() {
    let r = idle_movable("pull");
    assert!(u64_of(&r.stats()["timers"]["fired"]) > 100);
    for v in &r.vcpus()[1..] {
        assert_eq!(
            cause(v, "own_movable_timer"),
            0,
            "vCPU {} woke for its movable timer",
            v["index"]
        );
        assert_eq!(
            cause(v, "remote_movable_timer"),
            0,
            "vCPU {} woke as migrator",
            v["index"]
        );
        // Whatever wakeups remain have another recorded cause (the VM's end, a kick).
        let other: u64 = [
            "control",
            "interrupt",
            "migrator_kick",
            "own_pinned_timer",
            "spurious",
        ]
        .iter()
        .map(|c| cause(v, c))
        .sum();
        assert_eq!(u64_of(&v["host_wakeups"]), other);
    }
    assert_wakeups_match_kernel(&r, 3);
}

#[test]
fn local_wakes_each_halted_vcpu_about_once_per_timer_and_does_the_same_work_as_pull() {
    let local = idle_movable("local");
    let (mut all_woke, mut all_fired) = (0, 0);
    for v in &local.vcpus()[1..] {
        let fired = u64_of(&v["timers_fired"]);
        let woke = cause(v, "own_movable_timer");
        assert!(fired > 20, "vCPU {} fired only {fired}", v["index"]);
        // One wakeup per expiry, fewer only where two of its timers fell due together or while it
        // was still awake with a callback (a callback costs several exits). The vCPU with the
        // shortest periods measured 0.57-0.67 wakeups per timer on a loaded host, and 0.42-0.50 on a
        // quiet one once the guest's callbacks also checked each timer's window (1 Dec 2026): a
        // bound of 1/3 per vCPU and 1/2 over all of them, still orders of magnitude above pull's.
        assert!(
            woke <= fired && woke * 3 >= fired,
            "vCPU {}: {woke} wakeups for {fired} timers",
            v["index"]
        );
        all_woke += woke;
        all_fired += fired;
    }
    assert!(
        all_woke * 2 >= all_fired,
        "halted vCPUs: {all_woke} wakeups for {all_fired} timers"
    );
    assert_wakeups_match_kernel(&local, 3);
    let pull = idle_movable("pull");
    let (a, b) = (
        u64_of(&local.stats()["timers"]["fired"]) as f64,
        u64_of(&pull.stats()["timers"]["fired"]) as f64,
    );
    // Under local each timer waits for its owner's wakeup; on a slow host a late wakeup finds the next
    // period already due and the timer skips it (the guest counts the skips), so local fires a little
    // less: 9-12% less over 600 ms measured here, both before and after the timer device took over the
    // halt protocol (0.7% on a quiet host over 2 s, docs/results.md). Beyond 20% the two would not be
    // doing the same work.
    assert!(
        (a - b).abs() / a.max(b) < 0.20,
        "local fired {a}, pull fired {b}: the timer work should agree"
    );
}

#[test]
fn all_idle_under_pull_wakes_one_vcpu_per_expiry_not_one_per_owner() {
    let pull = run(&[
        "--workload",
        "all-idle",
        "--vcpus",
        "8",
        "--policy",
        "pull",
        "--duration-ms",
        "600",
    ]);
    pull.expect_code(0);
    let local = run(&[
        "--workload",
        "all-idle",
        "--vcpus",
        "8",
        "--policy",
        "local",
        "--duration-ms",
        "600",
    ]);
    local.expect_code(0);
    let movable_wakeups = |r: &Run| -> u64 {
        r.vcpus()
            .iter()
            .map(|v| cause(v, "own_movable_timer") + cause(v, "remote_movable_timer"))
            .sum()
    };
    let fired = u64_of(&pull.stats()["timers"]["fired"]);
    let (p, l) = (movable_wakeups(&pull), movable_wakeups(&local));
    // Each wakeup expires every timer due by then, so there are never more wakeups than expiries,
    // and fewer than local's one per owner per expiry once timers gather on the waking vCPU: one
    // wakeup serves every timer that comes due while it runs (about 0.55 of local's here, in queue
    // mode; with commands the waking vCPU was busy enough to hardly sleep at all).
    assert!(p <= fired, "pull: {p} wakeups for {fired} expiries");
    assert!(
        p * 10 < l * 7,
        "pull woke {p} times for movable timers, local {l}"
    );
    assert_wakeups_match_kernel(&pull, 3);
}

#[test]
fn push_places_timers_armed_from_idle_vcpus_on_the_busy_one() {
    let r = idle_movable("push");
    let busy = &r.vcpus()[0];
    assert!(u64_of(&busy["remote_expiries"]) > 0);
    let idle_wakeups: u64 = r.vcpus()[1..]
        .iter()
        .map(|v| cause(v, "own_movable_timer"))
        .sum();
    let fired = u64_of(&r.stats()["timers"]["fired"]);
    assert!(
        idle_wakeups * 10 < fired,
        "push: {idle_wakeups} idle wakeups for {fired} timers"
    );
}

/// Every workload passes its own in-guest checks under every policy. `extra` sizes the load to the
/// host (two cores, ~45 us per exit here): the periodic checks are timing checks a starved host fails.
fn all_workloads(vcpus: &str, duration: &str, extra: &[&str]) {
    for policy in ["local", "push", "pull"] {
        for w in TIMER_WORKLOADS {
            let mut args = vec![
                "--workload",
                w,
                "--vcpus",
                vcpus,
                "--policy",
                policy,
                "--duration-ms",
                duration,
            ];
            args.extend_from_slice(extra);
            let r = run(&args);
            assert_eq!(
                r.code, 0,
                "{w} under {policy} on {vcpus} vCPUs failed\n--- stdout\n{}\n--- stderr\n{}",
                r.stdout, r.stderr
            );
            let t = &r.stats()["timers"];
            assert_eq!(u64_of(&t["early"]), 0, "{w}/{policy}: early timers");
            // With 64 vCPUs, 32 of them busy, on 2 host cores, a starved vCPU's last timer can still be
            // on its way when vCPU 0 ends the VM: `missed` is then honest but not a lost timer. The
            // guest's own checks (every arming fires exactly once unless cancelled) cover losses there.
            if vcpus != "64" {
                assert_eq!(u64_of(&t["missed"]), 0, "{w}/{policy}: missed timers");
            }
        }
    }
}

#[test]
fn every_workload_passes_under_every_policy_on_2_vcpus() {
    all_workloads("2", "200", &[]);
}

#[test]
fn every_workload_passes_under_every_policy_on_8_vcpus() {
    all_workloads("8", "200", &[]);
}

#[test]
fn every_workload_passes_under_every_policy_on_64_vcpus() {
    all_workloads(
        "64",
        "300",
        &[
            "--arg",
            "timers=1",
            "--arg",
            "period_min_us=20000",
            "--arg",
            "period_max_us=60000",
        ],
    );
}

#[test]
fn a_guest_that_never_acknowledges_a_callback_stalls_only_that_timer() {
    for policy in ["local", "pull"] {
        let r = run(&[
            "--workload",
            "never-ack",
            "--vcpus",
            "4",
            "--policy",
            policy,
            "--duration-ms",
            "300",
        ]);
        r.expect_code(0);
        assert!(r.stdout.contains("never-ack: ok"), "{}", r.stdout);
    }
}

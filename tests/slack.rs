//! Timer windows on real KVM (issue 12): the guest's `slack_pct`, the VM's `timer-slack-ns`, and
//! `--timer-log`. Tests assert behaviour and counts, never timings.

mod common;

use std::collections::BTreeMap;

use common::{assert_wakeups_match_kernel, raw, run, u64_of, Run, TIMER_WORKLOADS};
use serde_json::Value;

/// `quietvm run ARGS`, expected to pass its guest checks with nothing fired early.
fn passes(workload: &str, args: &[&str]) -> Run {
    let r = run(args);
    r.expect_code(0);
    assert!(
        r.stdout.contains(&format!("{workload}: ok")),
        "{workload} {args:?}\n{}",
        r.stdout
    );
    let t = &r.stats()["timers"];
    assert_eq!(u64_of(&t["early"]), 0, "{workload} {args:?}: early timers");
    assert!(
        t["late_beyond_window"].is_u64(),
        "late_beyond_window is reported"
    );
    r
}

/// A compact replay payload from a committed trace (`quietvm replay --guest-out`).
fn replay_payload(dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join("idle.qvrp");
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/idle.trace");
    let r = raw(&[
        "replay",
        data.to_str().unwrap(),
        "--policy",
        "pull",
        "--guest-out",
        out.to_str().unwrap(),
    ]);
    r.expect_code(0);
    out
}

#[test]
fn every_timer_workload_passes_its_checks_with_slack_under_every_policy() {
    let dir = tempfile::tempdir().unwrap();
    let payload = replay_payload(dir.path());
    let replay_cfg = dir.path().join("replay.toml");
    std::fs::write(
        &replay_cfg,
        format!("vcpus = 2\nworkload = \"replay\"\npayload = {payload:?}\n"),
    )
    .unwrap();
    let workloads = TIMER_WORKLOADS
        .iter()
        .chain(&["never-ack", "hotplug", "replay"]);
    for policy in ["local", "push", "pull"] {
        for &w in workloads.clone() {
            let mut args: Vec<&str> = Vec::new();
            if w == "replay" {
                args.push(replay_cfg.to_str().unwrap());
            } else {
                args.extend(["--workload", w, "--vcpus", "4"]);
            }
            args.extend([
                "--policy",
                policy,
                "--duration-ms",
                "300",
                "--arg",
                "slack_pct=10",
            ]);
            let r = passes(w, &args);
            if w != "abi-check" {
                // The workload's Book armed every timer with the slack (its summary says so).
                assert!(
                    r.stdout.contains("slack_pct=10 "),
                    "{w} under {policy}\n{}",
                    r.stdout
                );
            }
        }
    }
}

#[test]
fn under_kvm_lapic_the_guest_asks_for_slack_and_gets_none() {
    // The software device reports exp_slack 0; the guest's Book fails otherwise.
    for w in ["mixed", "timers", "abi-check"] {
        passes(
            w,
            &[
                "--workload",
                w,
                "--vcpus",
                "2",
                "--policy",
                "kvm-lapic",
                "--duration-ms",
                "300",
                "--arg",
                "slack_pct=10",
            ],
        );
    }
}

#[test]
fn pinned_timers_keep_the_guests_slack_and_movable_ones_get_the_vm_minimum() {
    // `mixed` arms pinned and movable timers; the guest fails unless a pinned arming's exp_slack is
    // exactly what it asked for and a movable one's at least that.
    for policy in ["local", "pull"] {
        let r = passes(
            "mixed",
            &[
                "--workload",
                "mixed",
                "--vcpus",
                "4",
                "--policy",
                policy,
                "--duration-ms",
                "300",
                "--arg",
                "slack_pct=10",
                "--timer-slack-ns",
                "2000000",
            ],
        );
        assert_wakeups_match_kernel(&r, 3);
    }
    // A minimum past the clamp is refused as a config error.
    let r = raw(&[
        "run",
        "--workload",
        "hello",
        "--timer-slack-ns",
        "1000000001",
    ]);
    r.expect_code(101);
    assert!(r.stderr.contains("timer-slack-ns"), "{}", r.stderr);
    // compare takes the flag into the config it checks and runs.
    let r = raw(&[
        "compare",
        "configs/quickstart.toml",
        "--policies",
        "local",
        "--repeat",
        "1",
        "--timer-slack-ns",
        "1000000001",
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("timer-slack-ns"), "{}", r.stderr);
    // So is a percentage that is not one.
    let r = run(&["--workload", "all-idle", "--arg", "slack_pct=101"]);
    assert_ne!(r.code, 0);
    assert!(r.stdout.contains("slack_pct=101"), "{}", r.stdout);
}

/// The lines of a timer log, each checked for exactly the format's fields.
fn read_log(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let fields = [
        "owner",
        "id",
        "flags",
        "armed_at_ns",
        "deadline_ns",
        "slack_ns",
        "outcome",
        "at_ns",
        "fired_on",
        "held",
    ];
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            let mut want = fields.to_vec();
            want.sort_unstable();
            let mut got = keys.clone();
            got.sort_unstable();
            assert_eq!(got, want, "{l}");
            v
        })
        .collect()
}

#[test]
fn the_timer_log_ends_every_arming_exactly_once_and_agrees_with_the_stats() {
    let dir = tempfile::tempdir().unwrap();
    let min_slack = 300_000u64;
    for (workload, policy) in [
        ("rearm-heavy", "pull"),
        ("mixed", "push"),
        ("all-idle", "local"),
    ] {
        let path = dir.path().join(format!("{workload}-{policy}.jsonl"));
        let r = passes(
            workload,
            &[
                "--workload",
                workload,
                "--vcpus",
                "4",
                "--policy",
                policy,
                "--duration-ms",
                "300",
                "--arg",
                "slack_pct=25",
                "--timer-slack-ns",
                &min_slack.to_string(),
                "--timer-log",
                path.to_str().unwrap(),
            ],
        );
        let lines = read_log(&path);
        let t = &r.stats()["timers"];
        assert_eq!(
            lines.len() as u64,
            u64_of(&t["armed"]),
            "one line per arming"
        );
        let mut by_outcome: BTreeMap<String, u64> = BTreeMap::new();
        let mut by_id: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
        for v in &lines {
            let outcome = v["outcome"].as_str().unwrap().to_owned();
            *by_outcome.entry(outcome.clone()).or_default() += 1;
            let (armed_at, deadline, slack) = (
                u64_of(&v["armed_at_ns"]),
                u64_of(&v["deadline_ns"]),
                u64_of(&v["slack_ns"]),
            );
            assert!(armed_at < deadline, "{v}");
            assert!(slack <= 1_000_000_000, "{v}");
            match v["flags"].as_str().unwrap() {
                "movable" => assert!(slack >= min_slack, "VM minimum not applied: {v}"),
                "pinned" => {}
                f => panic!("flags {f}"),
            }
            assert!(u64_of(&v["owner"]) < 4);
            match outcome.as_str() {
                "fired" => {
                    assert!(deadline <= u64_of(&v["at_ns"]), "fired early: {v}");
                    assert!(u64_of(&v["fired_on"]) < 4);
                }
                "cancelled" | "replaced" => {
                    assert!(armed_at <= u64_of(&v["at_ns"]), "{v}");
                    assert!(v["fired_on"].is_null(), "{v}");
                }
                "pending" => assert!(v["at_ns"].is_null() && v["fired_on"].is_null()),
                o => panic!("outcome {o}"),
            }
            by_id.entry(u64_of(&v["id"])).or_default().push(v);
        }
        assert_eq!(
            by_outcome.get("fired").copied().unwrap_or(0),
            u64_of(&t["fired"]),
            "{workload}: fired in the log vs the stats"
        );
        assert_eq!(
            by_outcome.get("cancelled").copied().unwrap_or(0),
            u64_of(&t["cancelled"]),
            "{workload}: cancelled in the log vs the stats"
        );
        assert!(by_outcome["fired"] > 0);
        // The armings of one id follow each other: each one starts no earlier than the previous one
        // ended, only the last may be pending, and a replaced one ends where the next begins.
        for (id, mut armings) in by_id {
            armings.sort_by_key(|v| u64_of(&v["armed_at_ns"]));
            for pair in armings.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                assert_ne!(
                    a["outcome"], "pending",
                    "timer {id}: pending, then armed again"
                );
                let end = u64_of(&a["at_ns"]);
                let next = u64_of(&b["armed_at_ns"]);
                if a["outcome"] == "replaced" {
                    assert_eq!(end, next, "timer {id}: {a} replaced by {b}");
                } else {
                    assert!(end <= next, "timer {id}: {a} overlaps {b}");
                }
            }
        }
        if workload == "rearm-heavy" {
            assert!(by_outcome.get("cancelled").copied().unwrap_or(0) > 0);
            assert!(by_outcome.get("replaced").copied().unwrap_or(0) > 0);
        }
    }
}

#[test]
fn a_timer_log_that_cannot_be_written_fails_the_run_with_one_line() {
    let r = raw(&[
        "run",
        "--workload",
        "hello",
        "--timer-log",
        "/nonexistent/dir/x",
    ]);
    r.expect_code(101);
    let err = r.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--timer-log /nonexistent/dir/x"), "{err}");
    // A log quietvm cannot keep (kvm-lapic has no timer device) is refused, not left empty.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.jsonl");
    let r = raw(&[
        "run",
        "--workload",
        "hello",
        "--policy",
        "kvm-lapic",
        "--timer-log",
        path.to_str().unwrap(),
    ]);
    r.expect_code(101);
    assert!(r.stderr.contains("--timer-log"), "{}", r.stderr);
    // A device that fails every write (ENOSPC): the run fails.
    let r = raw(&[
        "run",
        "--workload",
        "all-idle",
        "--vcpus",
        "2",
        "--duration-ms",
        "300",
        "--timer-log",
        "/dev/full",
    ]);
    r.expect_code(101);
    assert!(
        r.stderr.contains("--timer-log /dev/full: cannot write"),
        "{}",
        r.stderr
    );
}

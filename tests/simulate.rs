//! `quietvm simulate` end to end (no KVM): the command line as clap parses it, the run, the JSON.
//!
//! Most drive `quietvm_measure::simulate::main` with clap-parsed arguments (no process per case); the last
//! one runs the `quietvm simulate` binary itself, as the done condition states it.

use std::process::ExitCode;

use clap::Parser;
use quietvm_measure::simulate::{self, SimulateArgs};
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SimulateArgs,
}

fn args(words: &[&str]) -> SimulateArgs {
    let mut argv = vec!["quietvm-simulate", "--quiet"];
    argv.extend_from_slice(words);
    Cli::try_parse_from(argv).expect("arguments parse").args
}

/// Runs `quietvm simulate WORDS --json FILE`; returns the exit code and the JSON.
fn run(words: &[&str]) -> (ExitCode, Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim.json");
    let mut w = words.to_vec();
    let p = path.to_str().unwrap();
    w.extend_from_slice(&["--json", p]);
    let code = simulate::main(args(&w));
    let json = std::fs::read_to_string(&path).unwrap_or_default();
    (code, serde_json::from_str(&json).unwrap_or(Value::Null))
}

fn policy<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["policy"] == name)
        .unwrap_or_else(|| panic!("no {name} in {v}"))
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn assert_no_timer_errors(p: &Value) {
    let t = &p["timers"];
    for k in ["early", "missed", "bogus", "api_mismatches"] {
        assert_eq!(n(&t[k]), 0, "{k} under {}: {t}", p["policy"]);
    }
    assert_eq!(p["invariants"], "ok", "{p}");
}

#[test]
fn one_busy_at_4096_vcpus_pull_wakes_no_idle_vcpu_for_movable_timers_and_local_wakes_many() {
    let (code, v) = run(&[
        "--vcpus",
        "4096",
        "--workload",
        "one-busy",
        "--policy",
        "all",
        "--duration-s",
        "0.3",
    ]);
    assert_eq!(code, ExitCode::SUCCESS);
    let pull = policy(&v, "pull");
    let local = policy(&v, "local");
    assert_no_timer_errors(pull);
    assert_no_timer_errors(local);
    assert_eq!(n(&pull["movable_wakeups"]), 0, "{pull}");
    assert_eq!(n(&pull["wakeups"]), 0, "{pull}");
    // 8190 timers of 1-10 ms for 0.3 s: every expiry wakes its halted owner under local.
    assert!(n(&pull["timers"]["fired"]) > 400_000, "{pull}");
    assert!(n(&local["movable_wakeups"]) > 400_000, "{local}");
    let ratio = v["ratios_vs_local"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["policy"] == "pull")
        .unwrap();
    assert_eq!(ratio["movable_wakeups"].as_f64(), Some(0.0));
}

#[test]
fn all_idle_under_pull_wakes_one_vcpu_per_distinct_expiry() {
    // No wake latency and no exit cost: every timer fires at its deadline, so expiry instants are
    // distinct deadlines, and pull wakes exactly one vCPU for each.
    let (code, v) = run(&[
        "--vcpus",
        "512",
        "--workload",
        "all-idle",
        "--policy",
        "pull",
        "--duration-s",
        "0.2",
        "--wake-latency-us",
        "0",
        "--exit-cost-us",
        "0",
    ]);
    assert_eq!(code, ExitCode::SUCCESS);
    let pull = policy(&v, "pull");
    assert_no_timer_errors(pull);
    assert_eq!(n(&pull["timers"]["lateness_ns"]["max"]), 0, "{pull}");
    assert_eq!(pull["wakeups"], pull["movable_wakeups"], "{pull}");
    assert_eq!(pull["wakeups"], pull["timers"]["expiry_instants"], "{pull}");
    assert!(n(&pull["wakeups"]) > 1_000, "{pull}");
}

#[test]
fn the_same_seed_gives_the_same_json() {
    let words = [
        "--vcpus",
        "256",
        "--workload",
        "mostly-busy",
        "--duration-s",
        "0.2",
        "--seed",
        "42",
    ];
    let (a_code, a) = run(&words);
    let (b_code, b) = run(&words);
    assert_eq!(a_code, ExitCode::SUCCESS);
    assert_eq!(b_code, ExitCode::SUCCESS);
    assert_eq!(a, b);
    let mut other = words.to_vec();
    let last = other.len() - 1;
    other[last] = "43";
    let (_, c) = run(&other);
    assert_ne!(a, c);
}

#[test]
fn every_workload_runs_clean_under_every_policy() {
    for w in [
        "one-busy",
        "all-idle",
        "mostly-busy",
        "rearm-heavy",
        "ping-pong",
    ] {
        let (code, v) = run(&["--vcpus", "100", "--workload", w, "--duration-s", "0.2"]);
        assert_eq!(code, ExitCode::SUCCESS, "{w}");
        for p in ["local", "push", "pull"] {
            assert_no_timer_errors(policy(&v, p));
        }
    }
}

#[test]
fn bad_input_is_refused_without_a_panic() {
    for words in [
        &["--vcpus", "0"][..],
        &["--vcpus", "16385"],
        &["--workload", "nope"],
        &["--policy", "nope"],
        &["--duration-s", "0"],
        &["--duration-s", "-3"],
        &["--duration-s", "inf"],
        &["--timers", "0"],
        &["--workload", "rearm-heavy", "--timers", "4"],
        &["--workload", "ping-pong", "--timers", "2"],
        &["--exit-cost-us", "-1"],
    ] {
        assert_eq!(
            simulate::main(args(words)),
            ExitCode::from(2),
            "{words:?} was accepted"
        );
    }
}

#[test]
fn the_binary_simulates_4096_vcpus_one_busy_under_pull_with_no_idle_wakeups() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quietvm"))
        .args([
            "simulate",
            "--vcpus",
            "4096",
            "--policy",
            "pull",
            "--workload",
            "one-busy",
        ])
        .args(["--duration-s", "2", "--quiet", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let p = policy(&v, "pull");
    assert_no_timer_errors(p);
    assert_eq!(n(&p["wakeups"]), 0, "{p}");
    assert_eq!(n(&p["movable_wakeups"]), 0, "{p}");
}

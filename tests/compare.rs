//! `quietvm compare` on real KVM: the kernel cross-check passes and pull saves wakeups against local.
//! Timings are reported by the command, never asserted here.

mod common;

use common::{quietvm, u64_of};

#[test]
fn compare_cross_checks_every_vcpu_against_the_kernel_and_pull_beats_local() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("c.json");
    let svg = dir.path().join("c.svg");
    let out = quietvm()
        .args([
            "compare",
            "configs/idle-movable-8.toml",
            "--policies",
            "local,pull",
            "--repeat",
            "2",
        ])
        .args(["--duration-ms", "500", "--json"])
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "compare failed\n{stdout}\n{stderr}");
    assert!(stdout.contains("pull saves"), "{stdout}");

    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(c["runs"].as_array().unwrap().len(), 4);
    assert_eq!(u64_of(&c["cross_check"]["checked"]), 4 * 8);
    assert!(
        c["cross_check"]["flagged"].as_array().unwrap().is_empty(),
        "{stdout}"
    );
    // Round by round, and for every halted vCPU, quietvm's count agrees with the kernel's.
    for run in c["runs"].as_array().unwrap() {
        for v in run["stats"]["vcpus"].as_array().unwrap() {
            let (ours, kernel) = (
                u64_of(&v["host_wakeups"]),
                u64_of(&v["kernel_voluntary_switches"]),
            );
            assert!(ours.abs_diff(kernel) <= 2 || ours.abs_diff(kernel) * 20 <= ours.max(kernel));
        }
    }
    let summary = c["summary"].as_array().unwrap();
    let wakeups = |p: &str| {
        summary.iter().find(|s| s["policy"] == p).unwrap()["host_wakeups"]["max"]
            .as_f64()
            .unwrap()
    };
    assert!(
        wakeups("pull") < wakeups("local"),
        "pull {} local {}",
        wakeups("pull"),
        wakeups("local")
    );
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("pull"));
}

#[test]
fn compare_measures_a_running_vmm_from_outside() {
    let mut vm = std::process::Command::new(env!("CARGO_BIN_EXE_quietvm"))
        .args([
            "run",
            "configs/idle-movable-8.toml",
            "--policy",
            "local",
            "--duration-ms",
            "3000",
            "--quiet",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = quietvm()
        .args([
            "compare",
            "--external",
            &vm.id().to_string(),
            "--seconds",
            "0.5",
        ])
        .output()
        .unwrap();
    let _ = vm.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Seven halted vCPUs with periodic timers under local: their threads wake many times per second.
    let woken: Vec<u64> = stdout
        .lines()
        .filter(|l| l.contains(" vcpu"))
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect();
    assert_eq!(woken.len(), 8, "{stdout}");
    assert!(woken.iter().filter(|&&w| w > 20).count() >= 6, "{stdout}");
}

#[test]
fn compare_refuses_bad_input_with_one_line() {
    let out = quietvm()
        .args(["compare", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(101));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config"));
    let out = quietvm()
        .args(["compare", "configs/quickstart.toml", "--policies", "fast"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = quietvm()
        .args(["compare", "--external", "999999999"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(101));
}

/// Whether this quietvm's `run` writes `--timer-log` (the windows compare's optimum is computed
/// from; it comes with the guest ABI's slack).
fn run_has_timer_log() -> bool {
    let out = quietvm().args(["run", "--help"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains("--timer-log")
}

/// The fewest points stabbing every `[start, end]`, computed here independently of quietvm's own
/// code: the greedy by window end.
fn stabs(mut w: Vec<(u64, u64)>) -> u64 {
    w.sort_by_key(|&(s, e)| (e, s));
    let mut last = None;
    let mut n = 0;
    for (s, e) in w {
        if last.is_some_and(|p| p >= s) {
            continue;
        }
        last = Some(e);
        n += 1;
    }
    n
}

/// Recomputes a kept `--timer-log`'s optimum from the file: movable windows VM-wide, pinned ones
/// per owner. Returns (optimum, fired, fired early).
fn recompute(log: &std::path::Path) -> (u64, u64, u64) {
    let text = std::fs::read_to_string(log).unwrap();
    let mut movable = Vec::new();
    let mut pinned: std::collections::BTreeMap<u64, Vec<(u64, u64)>> = Default::default();
    let (mut fired, mut early) = (0, 0);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        if e["outcome"] != "fired" {
            continue;
        }
        fired += 1;
        let (d, s) = (u64_of(&e["deadline_ns"]), u64_of(&e["slack_ns"]));
        early += (u64_of(&e["at_ns"]) < d) as u64;
        if e["flags"] == "pinned" {
            pinned
                .entry(u64_of(&e["owner"]))
                .or_default()
                .push((d, d + s));
        } else {
            movable.push((d, d + s));
        }
    }
    let total = stabs(movable) + pinned.into_values().map(stabs).sum::<u64>();
    (total, fired, early)
}

/// compare's optimum, recomputed from each run's own timer log, and each policy's ratio from its
/// host wakeups less the VM-end ones. Needs `quietvm run --timer-log`: until this quietvm has it,
/// compare must say so and report no optimum (the test checks that instead).
#[test]
fn compare_reports_the_optimum_each_runs_timer_log_gives() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("c.json");
    let logs = dir.path().join("logs");
    let out = quietvm()
        .args([
            "compare",
            "configs/all-idle-8.toml",
            "--policies",
            "local,pull",
        ])
        .args(["--repeat", "2", "--duration-ms", "500", "--json"])
        .arg(&json)
        .arg("--keep-timer-logs")
        .arg(&logs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "compare failed\n{stdout}\n{stderr}");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    if !run_has_timer_log() {
        assert!(c["optimum"].is_null(), "{c}");
        assert!(!stdout.contains("\noptimum "), "{stdout}");
        eprintln!("quietvm run has no --timer-log yet: only the no-optimum path was tested");
        return;
    }
    assert!(stdout.contains("\noptimum "), "{stdout}");
    for run in c["runs"].as_array().unwrap() {
        let (policy, round) = (run["policy"].as_str().unwrap(), u64_of(&run["round"]));
        let log = logs.join(format!("{policy}-{round}.jsonl"));
        let (optimum, fired, early) = recompute(&log);
        let t = &run["timer_log"];
        assert_eq!(u64_of(&t["optimum"]["total"]), optimum, "{policy} {round}");
        assert_eq!(u64_of(&t["fired"]), fired, "{policy} {round}");
        assert_eq!(early, 0, "{policy} {round}: timers fired early");
        assert!(optimum > 0 && optimum <= fired);
        // The VM-end wakeups are those with the cause `control`, at most one per vCPU.
        let vcpus = run["stats"]["vcpus"].as_array().unwrap();
        let end: u64 = vcpus
            .iter()
            .map(|v| u64_of(&v["wakeup_causes"]["control"]))
            .sum();
        assert!(end <= vcpus.len() as u64);
    }
    for s in c["summary"].as_array().unwrap() {
        let ratio = s["wakeups_per_optimum"]["median"].as_f64().unwrap();
        let less_end = s["host_wakeups_less_end"]["median"].as_f64().unwrap();
        let optimum = s["optimum"]["median"].as_f64().unwrap();
        assert!(less_end <= s["host_wakeups"]["median"].as_f64().unwrap());
        assert!(ratio > 0.0 && optimum > 0.0, "{s}");
        assert_eq!(u64_of(&s["log_fired_early"]), 0, "{s}");
    }
}

//! `quietvm replay` and `quietvm trace-host` end to end, through the binary: the traces captured on
//! a real machine (tests/data/README.md) under every policy, the kernel's figures, bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quietvm"))
}

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// The committed traces.
fn traces() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data())
        .expect("tests/data exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "trace"))
        .collect();
    v.sort();
    assert!(v.len() >= 2, "tests/data holds the captured traces: {v:?}");
    v
}

/// Runs `quietvm replay TRACE ARGS --json FILE`: the output and the JSON (Null if none).
fn replay(trace: &Path, args: &[&str]) -> (Output, Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = bin()
        .arg("replay")
        .arg(trace)
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("runs");
    let v = std::fs::read_to_string(&json)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null);
    (out, v)
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// Lines of `trace` holding `event:`.
fn count_events(trace: &Path, event: &str) -> u64 {
    let text = std::fs::read_to_string(trace).unwrap();
    let pat = format!(" {event}:");
    text.lines().filter(|l| l.contains(&pat)).count() as u64
}

#[test]
fn every_trace_replays_under_every_policy_with_no_check_failing() {
    for t in traces() {
        let (out, v) = replay(&t, &["--policy", "all"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {}\n{stdout}",
            t.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            n(&v["hz"]["hz"]),
            250,
            "{}: HZ of this machine",
            t.display()
        );
        assert!(n(&v["armings"]["armings"]) > 0, "{}", t.display());
        let pols = v["policies"].as_array().unwrap();
        let names: Vec<&str> = pols.iter().map(|p| p["policy"].as_str().unwrap()).collect();
        assert_eq!(names, ["local", "push", "pull"]);
        for p in pols {
            let c = &p["checks"];
            for k in [
                "early",
                "missed",
                "pinned_off_cpu",
                "bogus",
                "api_mismatches",
            ] {
                assert_eq!(
                    n(&c[k]),
                    0,
                    "{} {}: {k}\n{stdout}",
                    t.display(),
                    p["policy"]
                );
            }
            assert_eq!(c["invariants"], "ok", "{} {}", t.display(), p["policy"]);
            assert!(n(&p["expired"]) > 0, "{} {}", t.display(), p["policy"]);
        }
        // Local never expires a timer away from its wheel; only pull has remote expiries.
        assert_eq!(n(&pols[0]["remote_expiries"]), 0);
        assert_eq!(n(&pols[1]["remote_expiries"]), 0);
        // Pull never wakes an idle CPU for its own movable timer more often than local does.
        assert!(
            n(&pols[2]["timer_wakeups_own_movable"]) <= n(&pols[0]["timer_wakeups_own_movable"]),
            "{}\n{stdout}",
            t.display()
        );
        // The table has the kernel's column.
        assert!(stdout.contains("kernel"), "{stdout}");
    }
}

#[test]
fn the_kernels_own_figures_are_parsed() {
    let (mut wakeups, mut remote) = (0, 0);
    for t in traces() {
        let (out, v) = replay(&t, &["--policy", "pull"]);
        assert!(out.status.success(), "{}", t.display());
        let k = &v["kernel"];
        assert_eq!(
            n(&k["expiries"]),
            count_events(&t, "timer_expire_entry"),
            "{}",
            t.display()
        );
        assert_eq!(
            n(&k["tmigr_handle_remote_cpu"]),
            count_events(&t, "tmigr_handle_remote_cpu"),
            "{}",
            t.display()
        );
        assert_eq!(
            n(&k["tmigr_handle_remote"]),
            count_events(&t, "tmigr_handle_remote"),
            "{}",
            t.display()
        );
        assert!(n(&k["expiries"]) > 0, "{}", t.display());
        // Where the trace shows CPUs going idle, the kernel's idle exits and hierarchy are counted.
        if count_events(&t, "cpu_idle") > 20 {
            assert!(n(&k["idle_exits"]) > 0, "{}", t.display());
            assert!(n(&k["tmigr_cpu_idle"]) > 0, "{}", t.display());
        }
        wakeups += n(&k["timer_wakeups"]);
        remote += n(&k["remote_expiries"]);
    }
    // The quiet machine's trace has both: CPUs woken for timers, and timers pulled by a migrator.
    assert!(wakeups > 0 && remote > 0, "{wakeups} {remote}");
}

#[test]
fn a_malformed_line_is_a_one_line_error_with_its_number() {
    let t = &traces()[0];
    let text = std::fs::read_to_string(t).unwrap();
    let mut lines: Vec<&str> = text.lines().take(40).collect();
    lines.push("          <idle>-0       [001] d..1.   garbage here");
    let bad_line = lines.len();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.trace");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let (out, v) = replay(&bad, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(v, Value::Null);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(&format!("line {bad_line}:")), "{err}");
    assert!(err.contains("garbage here"), "{err}");
    assert!(err.contains("bad.trace"), "{err}");

    // A known event with a field that does not parse.
    lines.pop();
    lines.push("  a-1 [000] d..1. 99999.000001: timer_cancel: timer=not-a-pointer");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let (out, _) = replay(&bad, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("line {bad_line}:")), "{err}");
    assert!(err.contains("is not a hex pointer"), "{err}");
}

#[test]
fn unknown_events_are_skipped_and_counted() {
    let t = &traces()[0];
    let text = std::fs::read_to_string(t).unwrap();
    let mut lines: Vec<&str> = text.lines().take(60).collect();
    lines
        .push("     sshd-77   [000] d..2.  99999.000001: sched_switch: prev_comm=sshd prev_pid=77");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("u.trace");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    let (out, v) = replay(&p, &["--hz", "250"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(n(&v["unknown_events"]), 1);
    assert_eq!(n(&v["events"]["sched_switch"]), 1);
    assert_eq!(v["hz"]["source"], "--hz");
}

#[test]
fn bad_arguments_and_missing_files() {
    let t = &traces()[0];
    let (out, _) = replay(t, &["--policy", "fifo"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--policy"));
    let (out, _) = replay(Path::new("/nonexistent/x.trace"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.trace");
    std::fs::write(&empty, "# tracer: nop\n").unwrap();
    let (out, _) = replay(&empty, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no events"));
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

#[test]
fn trace_host_captures_and_leaves_tracefs_as_it_was() {
    let root = Path::new("/sys/kernel/tracing");
    if !is_root() || !root.join("instances").is_dir() {
        eprintln!("skipped: needs root and tracefs instances");
        return;
    }
    let instances = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(root.join("instances"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let top_before = std::fs::read_to_string(root.join("tracing_on")).unwrap();
    let inst_before = instances();
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("host.trace");
    let out = bin()
        .args(["trace-host", "--seconds", "0.5", "--out"])
        .arg(&out_path)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&out_path).unwrap();
    assert!(
        text.starts_with("# tracer"),
        "{}",
        &text[..text.len().min(200)]
    );
    // Its instance is gone and the top-level switch untouched.
    let new: Vec<String> = instances()
        .into_iter()
        .filter(|i| !inst_before.contains(i))
        .collect();
    assert!(new.is_empty(), "{new:?}");
    assert_eq!(
        std::fs::read_to_string(root.join("tracing_on")).unwrap(),
        top_before
    );
    // What it captured replays (a half-second capture may hold no timer: then HZ is given).
    if text.contains("timer_start:") {
        let (o, _) = replay(&out_path, &["--hz", "250"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn trace_host_rejects_bad_arguments() {
    let out = bin()
        .args([
            "trace-host",
            "--seconds",
            "0",
            "--out",
            "/tmp/never-written.trace",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--seconds"));
}

/// The guest's `replay` workload re-enacts a committed trace on real KVM under each policy, with
/// every per-arming check of the guest passing.
#[test]
fn the_guest_replays_a_trace_on_kvm_under_every_policy_and_under_compare() {
    let dir = tempfile::tempdir().unwrap();
    let compact = dir.path().join("idle.qvrp");
    let (out, _) = replay(
        &data().join("idle.trace"),
        &["--policy", "pull", "--guest-out", compact.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&compact).unwrap();
    assert_eq!(&bytes[..4], b"QVRP");
    assert_eq!((bytes.len() - 32) % 16, 0);
    let config = dir.path().join("replay.toml");
    std::fs::write(
        &config,
        format!(
            "vcpus = 2\nworkload = \"replay\"\nduration-ms = 1500\ntimeout-ms = 60000\npayload = {:?}\n",
            compact.to_str().unwrap()
        ),
    )
    .unwrap();
    for policy in ["local", "push", "pull"] {
        let out = bin()
            .arg("run")
            .arg(&config)
            .args(["--policy", policy, "--quiet"])
            .output()
            .expect("runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{policy}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("replay: ok trace_cpus=2"),
            "{policy}: {stdout}"
        );
    }
    // `quietvm compare` takes it like any workload, the kernel cross-check included.
    let out = bin()
        .arg("compare")
        .arg(&config)
        .args([
            "--policies",
            "local,pull",
            "--repeat",
            "1",
            "--duration-ms",
            "800",
        ])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "compare: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("workload replay") && stdout.contains("pull saves"),
        "{stdout}"
    );
    // Without a payload the workload says what is missing.
    let out = bin()
        .args(["run", "--workload", "replay", "--vcpus", "2", "--quiet"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no payload"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `--windows both` on every committed trace: each policy without and with the wheel's windows
/// (`[expires, bucket_expiry]`). Nothing fires early; with windows pull makes no more wakeups of its
/// own; no column makes fewer than the optimum of what it fired. Counts only.
#[test]
fn the_wheels_windows_beside_the_kernel_on_the_committed_traces() {
    for trace in traces() {
        let (out, v) = replay(&trace, &["--windows", "both"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}: {stdout}", trace.display());
        assert!(stdout.contains("pull+wheel"), "{stdout}");
        assert!(
            stdout.contains("optimum: fewest idle-CPU wakeups"),
            "{stdout}"
        );
        let cols = v["policies"].as_array().unwrap();
        assert_eq!(
            cols.len(),
            6,
            "three policies, each without and with windows"
        );
        let col = |policy: &str, windows: &str| {
            cols.iter()
                .find(|c| c["policy"] == policy && c["windows"] == windows)
                .unwrap_or_else(|| panic!("{policy} {windows} in {}", trace.display()))
        };
        for c in cols {
            assert_eq!(n(&c["checks"]["early"]), 0, "{c}");
            assert_eq!(n(&c["checks"]["missed"]), 0, "{c}");
            assert!(
                n(&c["optimum"]["total"]) <= n(&c["timer_wakeups_policy_made"]),
                "{}: {c}",
                trace.display()
            );
        }
        let made = |p: &str, w: &str| n(&col(p, w)["timer_wakeups_policy_made"]);
        assert!(
            made("pull", "wheel") <= made("pull", "none"),
            "{}",
            trace.display()
        );
    }
}

/// Without `--windows`, the replay is what it was: no slack, every column `none`.
#[test]
fn the_default_replay_has_no_windows() {
    let trace = &traces()[0];
    let (out, v) = replay(trace, &[]);
    assert!(out.status.success());
    for c in v["policies"].as_array().unwrap() {
        assert_eq!(c["windows"], "none");
    }
    let (out, _) = replay(trace, &["--windows", "sideways"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad --windows is a usage error"
    );
}

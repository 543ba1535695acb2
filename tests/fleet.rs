//! `quietvm fleet` on real KVM: every VM runs in its own process, the aggregate is the sum of the
//! per-VM statistics, and a failing VM is reported without stopping the others. Timings and memory
//! figures are reported by the command, never asserted here beyond being present.

mod common;

use std::path::Path;
use std::process::Output;

use common::{quietvm, u64_of};
use serde_json::Value;

/// Fleets of this binary run one at a time (two host cores).
static ONE_FLEET_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fleet(args: &[&str], json: &Path) -> (Output, Option<Value>) {
    let _turn = ONE_FLEET_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let out = quietvm()
        .arg("fleet")
        .args(args)
        .args(["--timeout-ms", "120000", "--json"])
        .arg(json)
        .output()
        .expect("spawn quietvm fleet");
    let report = std::fs::read_to_string(json)
        .ok()
        .map(|t| serde_json::from_str(&t).expect("fleet JSON parses"));
    (out, report)
}

fn text(out: &Output) -> String {
    format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sum_vcpus(vm: &Value, key: &str) -> u64 {
    vm["stats"]["vcpus"]
        .as_array()
        .expect("vcpus array")
        .iter()
        .map(|v| u64_of(&v[key]))
        .sum()
}

#[test]
fn every_vm_runs_and_the_aggregate_is_the_sum_of_the_per_vm_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("fleet.json");
    let (out, report) = fleet(
        &[
            "configs/idle-movable-4.toml",
            "--vms",
            "4",
            "--duration-ms",
            "300",
            "--sample-ms",
            "50",
        ],
        &json,
    );
    assert!(out.status.success(), "fleet failed\n{}", text(&out));
    let r = report.expect("JSON written");
    let vms = r["per_vm"].as_array().unwrap();
    assert_eq!(vms.len(), 4);
    let a = &r["aggregate"];
    assert_eq!(
        (u64_of(&a["vms"]), u64_of(&a["ok"]), u64_of(&a["failed"])),
        (4, 4, 0)
    );
    assert_eq!(u64_of(&a["vcpus"]), 16);

    let mut pids = std::collections::BTreeSet::new();
    let (mut wakeups, mut kernel, mut user, mut system) = (0, 0, 0, 0);
    let mut rate = 0.0;
    for vm in vms {
        assert_eq!(vm["ok"], true, "{vm}");
        assert_eq!(vm["exit_code"], 0);
        assert_eq!(vm["stats"]["workload"], "idle-movable");
        assert!(pids.insert(u64_of(&vm["pid"])), "one process per VM");
        assert!(u64_of(&vm["max_rss_kib"]) > 0);
        assert!(u64_of(&vm["startup_ns"]) > 0 && u64_of(&vm["stdout_bytes"]) > 0);
        assert_eq!(u64_of(&vm["host_wakeups"]), sum_vcpus(vm, "host_wakeups"));
        wakeups += sum_vcpus(vm, "host_wakeups");
        kernel += sum_vcpus(vm, "kernel_voluntary_switches");
        user += u64_of(&vm["stats"]["process_user_ns"]);
        system += u64_of(&vm["stats"]["process_system_ns"]);
        rate += vm["host_wakeups_per_s"].as_f64().unwrap();
    }
    assert_eq!(u64_of(&a["host_wakeups"]), wakeups);
    assert_eq!(u64_of(&a["kernel_voluntary_switches"]), kernel);
    assert_eq!(u64_of(&a["cpu_user_ns"]), user);
    assert_eq!(u64_of(&a["cpu_system_ns"]), system);
    assert!((a["host_wakeups_per_s"].as_f64().unwrap() - rate).abs() <= 1e-6 * rate.max(1.0));
    assert_eq!(u64_of(&a["startup_ns"]["count"]), 4);
    // Sampled every 50 ms over a 300 ms run: the guest mapping was found in at least one VM.
    assert!(
        vms.iter().any(|vm| vm["memory"]["guest_rss_kib"]
            .as_u64()
            .is_some_and(|k| k > 0)),
        "{}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("4 ok, 0 failed"), "{stdout}");
}

#[test]
fn a_failing_vm_is_reported_without_stopping_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&good, "vcpus = 2\nworkload = \"hello\"\n").unwrap();
    std::fs::write(&bad, "vcpus = 2\nworkload = \"no-such-workload\"\n").unwrap();
    let json = dir.path().join("fleet.json");
    let (out, report) = fleet(
        &[good.to_str().unwrap(), bad.to_str().unwrap(), "--vms", "4"],
        &json,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let r = report.expect("JSON written even when VMs failed");
    let vms = r["per_vm"].as_array().unwrap();
    for (i, vm) in vms.iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(vm["ok"], true, "{vm}");
            assert!(vm["stats"].is_object());
        } else {
            assert_eq!(vm["ok"], false, "{vm}");
            assert_eq!(vm["exit_code"], 101);
            assert!(vm["stats"].is_null());
            assert!(
                vm["error"].as_str().unwrap().contains("unknown workload"),
                "{vm}"
            );
        }
    }
    let a = &r["aggregate"];
    assert_eq!(
        (u64_of(&a["ok"]), u64_of(&a["failed"]), u64_of(&a["vcpus"])),
        (2, 2, 4)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("failed VMs:") && stdout.contains("unknown workload"),
        "{stdout}"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn bad_fleet_input_gets_one_line_and_no_vm() {
    let out = quietvm()
        .args(["fleet", "configs/quickstart.toml", "--vms", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(101));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--vms must be between"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let out = quietvm()
        .args(["fleet", "configs/quickstart.toml", "--vms", "2"])
        .args(["--interval-ms", "99999999999"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(101));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--interval-ms must be at most"));
    let out = quietvm().args(["fleet", "--vms", "2"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = quietvm()
        .args([
            "fleet",
            "configs/quickstart.toml",
            "--vms",
            "2",
            "--policy",
            "fast",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

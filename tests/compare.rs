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

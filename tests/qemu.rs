//! The `qemu` peer (issue 14, docs/qemu.md): the built-in guest booted by real QEMU on real KVM through
//! its PVH entry, measured by `quietvm run --policy qemu` and `compare`, and the one-line errors for a
//! missing or broken QEMU. Needs `qemu-system-x86_64` on PATH (`.ci/run` installs it).

mod common;

use common::{assert_guest_report_adds_up, quietvm, raw, run, u64_of, Run, TIMER_WORKLOADS};
use serde_json::Value;

/// Every workload that makes sense without quietvm's timer device (not hotplug, which needs it; not
/// replay, which needs a payload, nor the crash and hang workloads: each is tested below).
fn workloads() -> impl Iterator<Item = &'static str> {
    std::iter::once("hello").chain(TIMER_WORKLOADS)
}

fn qemu(workload: &str, vcpu_count: u32, duration_ms: u32) -> Run {
    let r = run(&[
        "--workload",
        workload,
        "--vcpus",
        &vcpu_count.to_string(),
        "--duration-ms",
        &duration_ms.to_string(),
        "--policy",
        "qemu",
    ]);
    r.expect_code(0);
    assert!(
        r.stdout.contains(&format!("{workload}: ok")),
        "{workload} on {vcpu_count} vCPUs:\n{}",
        r.stdout
    );
    let s = r.stats();
    assert_eq!(s["policy"], "qemu");
    assert_eq!(u64_of(&s["timers"]["early"]), 0, "{workload}: early timers");
    // As under kvm-lapic: a vCPU's sleep timer due just as vCPU 0 reports may still be on its way.
    assert!(
        u64_of(&s["timers"]["missed"]) <= u64::from(vcpu_count),
        "{workload}: missed timers\n{}",
        r.stdout
    );
    // Every vCPU thread of QEMU was found and read over the guest's run.
    let peer = &s["peer"];
    assert_eq!(peer["counters_read"], "guest_start_to_end", "{peer}");
    assert_eq!(r.vcpus().len(), vcpu_count as usize);
    for (i, v) in r.vcpus().iter().enumerate() {
        assert_eq!(u64_of(&v["index"]), i as u64);
        assert!(u64_of(&v["tid"]) > 0, "{v}");
        assert_eq!(
            u64_of(&v["host_wakeups"]),
            u64_of(&v["kernel_voluntary_switches"])
        );
    }
    assert!(u64_of(&peer["max_rss_kib"]) > 0, "{peer}");
    // The guest memory file and the guest ELF are gone.
    for word in peer["command"].as_array().unwrap() {
        let word = word.as_str().unwrap();
        if let Some(path) = word.split(',').find_map(|p| p.strip_prefix("mem-path=")) {
            assert!(!std::path::Path::new(path).exists(), "{path} left behind");
        }
        if word.ends_with(".elf") {
            assert!(!std::path::Path::new(word).exists(), "{word} left behind");
        }
    }
    r
}

fn all_workloads_pass_on(vcpu_count: u32) {
    for w in workloads() {
        let r = qemu(w, vcpu_count, 300);
        if w != "hello" {
            // The guest's report came back through QEMU's memory file.
            assert_guest_report_adds_up(&r, w);
        }
    }
}

#[test]
fn every_workload_passes_under_qemu_on_one_vcpu() {
    all_workloads_pass_on(1);
}

#[test]
fn every_workload_passes_under_qemu_on_two_vcpus() {
    all_workloads_pass_on(2);
}

/// The replay workload: its payload goes to QEMU as `-initrd`, a PVH module the guest copies to where
/// quietvm would have placed it; the same trace replays under quietvm's `kvm-lapic` for the figures to
/// agree.
#[test]
fn replay_runs_under_qemu_with_its_payload_as_a_pvh_module() {
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("idle.qvrp");
    let trace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/idle.trace");
    raw(&[
        "replay",
        trace.to_str().unwrap(),
        "--policy",
        "pull",
        "--guest-out",
        payload.to_str().unwrap(),
    ])
    .expect_code(0);
    let config = dir.path().join("replay.toml");
    std::fs::write(
        &config,
        format!("vcpus = 2\nworkload = \"replay\"\npayload = {payload:?}\n"),
    )
    .unwrap();
    let mut fired = Vec::new();
    for policy in ["qemu", "kvm-lapic"] {
        let r = run(&[config.to_str().unwrap(), "--policy", policy]);
        r.expect_code(0);
        assert!(r.stdout.contains("replay: ok"), "{policy}: {}", r.stdout);
        let t = &r.stats()["timers"];
        assert_eq!(u64_of(&t["early"]), 0, "{policy}");
        fired.push(u64_of(&t["fired"]));
    }
    assert!(fired[0] > 0, "nothing replayed under qemu");
    // The same trace: the same armings fire (a few may differ at the run's end).
    assert!(
        fired[0].abs_diff(fired[1]) * 10 <= fired[1],
        "qemu fired {}, kvm-lapic {}",
        fired[0],
        fired[1]
    );
}

#[test]
fn eight_vcpus_start_through_init_and_sipi() {
    for w in ["hello", "all-idle"] {
        qemu(w, 8, 300);
    }
}

#[test]
fn the_command_line_is_in_the_stats_and_is_the_documented_one() {
    let r = qemu("hello", 2, 100);
    let command: Vec<&str> = r.stats()["peer"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert!(command[0].ends_with("qemu-system-x86_64"), "{command:?}");
    let joined = command.join(" ");
    for part in [
        "-machine microvm,pit=off,pic=off,rtc=off",
        "-accel kvm",
        "-cpu host",
        "-smp 2,",
        "-device isa-debug-exit,iobase=0xf4,iosize=0x04",
        ",debug-threads=on",
        "-no-reboot",
        "policy=qemu",
        "vcpus=2",
        "tsc_khz=",
    ] {
        assert!(joined.contains(part), "{part} missing from {joined}");
    }
}

#[test]
fn halted_vcpus_wake_about_once_per_timer_and_match_the_guest_s_halts() {
    let r = run(&[
        "configs/idle-movable-4.toml",
        "--policy",
        "qemu",
        "--duration-ms",
        "600",
    ]);
    r.expect_code(0);
    assert!(r.stdout.contains("idle-movable: ok"), "{}", r.stdout);
    for v in &r.vcpus()[1..] {
        let fired = u64_of(&v["timers_fired"]);
        let woke = u64_of(&v["kernel_voluntary_switches"]);
        let halts = u64_of(&v["halts"]);
        assert!(fired > 20, "vCPU {} fired only {fired}", v["index"]);
        // One host wakeup per expiry, as with quietvm's kvm-lapic (fewer where two timers fell due
        // together or halt polling caught the next one, one more for the start-up IPI).
        assert!(
            woke <= fired + 3 && woke * 10 >= fired * 6,
            "vCPU {}: {woke} wakeups for {fired} timers",
            v["index"]
        );
        // compare's cross-check rule: each halt that slept is one voluntary switch.
        assert!(
            halts.abs_diff(woke) <= 2 + halts.max(woke) / 20,
            "vCPU {}: {halts} guest halts, {woke} kernel switches",
            v["index"]
        );
    }
}

#[test]
fn compare_runs_the_qemu_row_and_cross_checks_every_vcpu_thread() {
    let json = std::env::temp_dir().join(format!("quietvm-test-qemu-{}.json", std::process::id()));
    let r = raw(&[
        "compare",
        "configs/idle-movable-4.toml",
        "--policies",
        "qemu,kvm-lapic,pull",
        "--repeat",
        "1",
        "--duration-ms",
        "500",
        "--json",
        json.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&json).unwrap_or_default();
    let _ = std::fs::remove_file(&json);
    r.expect_code(0);
    assert!(r.stdout.contains("\nqemu "), "{}", r.stdout);
    assert!(r.stdout.contains("pull saves"), "{}", r.stdout);
    let cmp: Value = serde_json::from_str(&text).expect("compare JSON");
    // qemu's 4 vCPU threads and pull's 4 (kvm-lapic's are the kernel's count alone).
    assert_eq!(
        u64_of(&cmp["cross_check"]["checked"]),
        8,
        "{}",
        cmp["cross_check"]
    );
    assert_eq!(cmp["cross_check"]["flagged"].as_array().unwrap().len(), 0);
    let qemu_run = cmp["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["policy"] == "qemu")
        .expect("a qemu run");
    assert_eq!(qemu_run["stats"]["exit_code"], 0);
    assert!(
        qemu_run["stats"]["peer"]["command"]
            .as_array()
            .unwrap()
            .len()
            > 10
    );
    let summary = cmp["summary"].as_array().unwrap();
    let of = |p: &str| summary.iter().find(|s| s["policy"] == p).unwrap();
    assert_eq!(u64_of(&of("qemu")["timers_missed"]), 0);
    assert_eq!(u64_of(&of("qemu")["timers_early"]), 0);
    assert!(of("qemu")["timers_fired"]["median"].as_f64().unwrap() > 100.0);
    assert!(of("pull")["savings_vs_qemu"]["median"].as_f64().is_some());
}

#[test]
fn a_guest_crash_under_qemu_is_a_crash() {
    let r = run(&[
        "--workload",
        "triple-fault",
        "--vcpus",
        "2",
        "--policy",
        "qemu",
    ]);
    r.expect_code(100);
    assert!(r.stderr.contains("guest crash"), "{}", r.stderr);
}

#[test]
fn timeout_ms_kills_a_hung_guest_under_qemu() {
    // vCPU 0 spins in a callback that never ends: only --timeout-ms ends the VM.
    let out = quietvm()
        .args([
            "run",
            "--workload",
            "never-ack",
            "--vcpus",
            "2",
            "--policy",
            "qemu",
        ])
        .args(["--duration-ms", "600000", "--timeout-ms", "5000", "--quiet"])
        .output()
        .expect("spawn quietvm");
    assert_eq!(out.status.code(), Some(100));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("timeout"), "{stderr}");
}

/// The last line of stderr, which must be the only one.
fn one_error_line(r: &Run) -> &str {
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    lines[0]
}

#[test]
fn a_missing_qemu_is_one_line_that_says_how_to_install_it() {
    let r = raw(&[
        "run",
        "--policy",
        "qemu",
        "--workload",
        "hello",
        "--qemu",
        "/nonexistent/qemu-system-x86_64",
    ]);
    r.expect_code(101);
    let line = one_error_line(&r);
    assert!(line.contains("apt-get install qemu-system-x86"), "{line}");

    let r = raw(&[
        "compare",
        "configs/idle-movable-4.toml",
        "--policies",
        "qemu,pull",
        "--qemu",
        "/nonexistent",
    ]);
    r.expect_code(101);
    assert!(one_error_line(&r).contains("apt-get install qemu-system-x86"));

    // Not on PATH either.
    let out = quietvm()
        .args(["run", "--policy", "qemu", "--workload", "hello"])
        .env("PATH", "/nonexistent")
        .output()
        .expect("spawn quietvm");
    assert_eq!(out.status.code(), Some(101));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("qemu-system-x86_64 on PATH"), "{stderr}");
}

#[test]
fn a_broken_qemu_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("qemu-system-x86_64");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'qemu: broken on purpose' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let r = raw(&[
        "run",
        "--policy",
        "qemu",
        "--workload",
        "hello",
        "--qemu",
        fake.to_str().unwrap(),
    ]);
    r.expect_code(101);
    let line = one_error_line(&r);
    assert!(line.contains("exit status 1"), "{line}");
    assert!(line.contains("broken on purpose"), "{line}");
}

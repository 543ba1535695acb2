//! The control API and vCPU hotplug on real KVM (docs/api.md): a VM runs with --api-sock while the test
//! talks to it through `quietvm ctl` and the socket itself.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{quietvm, u64_of};
use serde_json::Value;

/// A VM started with an API socket, a stats file and a temp dir that cleans up after it.
struct LiveVm {
    child: Child,
    sock: PathBuf,
    stats: PathBuf,
    _dir: tempfile::TempDir,
}

impl LiveVm {
    fn start(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let stats = dir.path().join("stats.json");
        let child = Command::new(env!("CARGO_BIN_EXE_quietvm"))
            .arg("run")
            .args(args)
            .arg("--api-sock")
            .arg(&sock)
            .arg("--stats-json")
            .arg(&stats)
            .args(["--quiet", "--timeout-ms", "120000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "the API socket never appeared");
            std::thread::sleep(Duration::from_millis(5));
        }
        LiveVm {
            child,
            sock,
            stats,
            _dir: dir,
        }
    }

    /// Sends one raw line and returns the parsed response.
    fn send(&self, line: &str) -> Value {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"))
    }

    /// `quietvm ctl SOCK WORDS...`, checked to succeed.
    fn ctl(&self, words: &[&str]) -> Value {
        let out = quietvm()
            .arg("ctl")
            .arg(&self.sock)
            .args(words)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "ctl {words:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str::<Value>(&text).unwrap()["result"].clone()
    }

    fn timers_fired(&self) -> u64 {
        u64_of(&self.ctl(&["stats"])["timers"]["fired"])
    }

    /// Waits for the VM to end; returns its exit code, stdout and final stats.
    fn finish(self) -> (i32, String, Value) {
        let out = self.child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stats = std::fs::read_to_string(&self.stats)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_else(|| {
                panic!(
                    "no stats\n{stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        (out.status.code().unwrap_or(-1), stdout, stats)
    }
}

fn gone(path: &Path) -> bool {
    !path.exists()
}

#[test]
fn the_documented_session_offline_stats_online_shutdown() {
    let vm = LiveVm::start(&["configs/idle-movable-8.toml", "--duration-ms", "20000"]);
    assert_eq!(vm.ctl(&["vcpu-offline", "3"])["online"], false);
    let stats = vm.ctl(&["stats"]);
    assert_eq!(stats["vcpus"].as_array().unwrap().len(), 8);
    assert_eq!(stats["outcome"], "running");
    assert_eq!(vm.ctl(&["vcpu-online", "3"])["online"], true);
    vm.ctl(&["shutdown"]);
    let sock = vm.sock.clone();
    let (code, _, stats) = vm.finish();
    assert_eq!(code, 0);
    assert!(
        stats["outcome"].as_str().unwrap().contains("shut down"),
        "{}",
        stats["outcome"]
    );
    assert!(gone(&sock), "the socket file is removed at exit");
}

#[test]
fn random_hotplug_under_the_hotplug_workload_keeps_every_timer_exact() {
    let vm = LiveVm::start(&[
        "--workload",
        "hotplug",
        "--vcpus",
        "6",
        "--policy",
        "pull",
        "--duration-ms",
        "4000",
    ]);
    // A fixed pseudo-random sequence (bounded count), so a failure can be replayed.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut offline: Vec<u32> = Vec::new();
    let mut changes = 0;
    for _ in 0..12 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let vcpu = 1 + (x % 5) as u32;
        let word = if offline.contains(&vcpu) {
            "vcpu-online"
        } else {
            "vcpu-offline"
        };
        let r = vm.send(&format!(r#"{{"op":"{word}","vcpu":{vcpu}}}"#));
        if r["ok"] == true {
            changes += 1;
            if word == "vcpu-online" {
                offline.retain(|&v| v != vcpu);
            } else {
                offline.push(vcpu);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        changes >= 8,
        "only {changes} of 12 hotplug requests were carried out"
    );
    for v in offline {
        vm.ctl(&["vcpu-online", &v.to_string()]);
    }
    let (code, stdout, stats) = vm.finish();
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("hotplug: ok"), "{stdout}");
    let t = &stats["timers"];
    assert_eq!(u64_of(&t["early"]), 0);
    let per_vcpu: u64 = stats["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u64_of(&v["timers_fired"]))
        .sum();
    assert_eq!(
        per_vcpu,
        u64_of(&t["fired"]),
        "the per-vCPU counts add up to the VM's"
    );
}

#[test]
fn vcpus_started_parked_join_when_brought_online() {
    let vm = LiveVm::start(&[
        "--workload",
        "hotplug",
        "--vcpus",
        "4",
        "--vcpus-online",
        "2",
        "--duration-ms",
        "2000",
    ]);
    std::thread::sleep(Duration::from_millis(200));
    let halts = |s: &Value, i: usize| u64_of(&s["vcpus"][i]["halts"]);
    let before = vm.ctl(&["stats"]);
    assert_eq!(
        halts(&before, 3),
        0,
        "vCPU 3 ran before it was brought online"
    );
    vm.ctl(&["vcpu-online", "2"]);
    vm.ctl(&["vcpu-online", "3"]);
    let (code, stdout, stats) = vm.finish();
    assert_eq!(code, 0, "{stdout}");
    assert!(
        halts(&stats, 3) > 0,
        "vCPU 3 never ran after it was brought online"
    );
}

#[test]
fn offlining_every_other_vcpu_still_fires_the_movable_timers_they_queued() {
    // all-idle: every vCPU's movable timers are queued in the hierarchy while it halts. Taking vCPUs
    // 1 and 2 away (vCPU 2 may well be the last active one) must hand their timers on: the guest's
    // own count check fails if any timer stops firing.
    let vm = LiveVm::start(&[
        "--workload",
        "all-idle",
        "--vcpus",
        "3",
        "--policy",
        "pull",
        "--duration-ms",
        "1500",
    ]);
    vm.ctl(&["vcpu-offline", "2"]);
    vm.ctl(&["vcpu-offline", "1"]);
    let r = vm.send(r#"{"op":"vcpu-offline","vcpu":0}"#);
    assert_eq!(r["ok"], false, "vCPU 0 must stay");
    let (code, stdout, stats) = vm.finish();
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(u64_of(&stats["timers"]["missed"]), 0);
}

#[test]
fn pause_stops_every_timer_and_resume_fires_the_overdue_ones_at_once() {
    let vm = LiveVm::start(&["configs/idle-movable-8.toml", "--duration-ms", "20000"]);
    std::thread::sleep(Duration::from_millis(200));
    vm.ctl(&["pause"]);
    let paused_at = vm.timers_fired();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.timers_fired(), paused_at, "a timer fired while paused");
    let r = vm.send(r#"{"op":"vcpu-offline","vcpu":2}"#);
    assert_eq!(r["ok"], false, "hotplug while paused must be refused");
    vm.ctl(&["resume"]);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        vm.timers_fired() > paused_at,
        "overdue timers did not fire after resume"
    );
    vm.ctl(&["shutdown"]);
    let (code, _, stats) = vm.finish();
    assert_eq!(code, 0);
    // The timers overdue at the resume fired late by about the pause.
    assert!(u64_of(&stats["timers"]["lateness_ns"]["max"]) >= 250_000_000);
}

#[test]
fn sigterm_during_a_busy_run_ends_it_in_order_with_stats() {
    let vm = LiveVm::start(&["configs/idle-movable-8.toml", "--duration-ms", "20000"]);
    std::thread::sleep(Duration::from_millis(300));
    let status = Command::new("kill")
        .args(["-TERM", &vm.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let (code, _, stats) = vm.finish();
    assert_eq!(code, 0);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        stats["outcome"].as_str().unwrap().contains("SIGTERM"),
        "{}",
        stats["outcome"]
    );
    assert_eq!(stats["vcpus"].as_array().unwrap().len(), 8);
}

#[test]
fn malformed_requests_get_errors_and_change_nothing() {
    let vm = LiveVm::start(&["configs/idle-movable-8.toml", "--duration-ms", "20000"]);
    for bad in [
        "{not json",
        r#"{"op":"reboot"}"#,
        r#"{"op":"vcpu-offline","vcpu":99}"#,
        r#"{"op":"vcpu-offline","vcpu":"3"}"#,
        r#"{"op":"pause","now":true}"#,
        r#"{"op":"vcpu-online","vcpu":1}"#,
        r#"{"op":"set-policy","policy":"local"}"#,
        r#"{"op":"resume"}"#,
    ] {
        let r = vm.send(bad);
        assert_eq!(r["ok"], false, "{bad} was accepted: {r}");
        assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let stats = vm.ctl(&["stats"]);
    assert_eq!(stats["outcome"], "running");
    vm.ctl(&["vcpu-offline", "1"]);
    vm.ctl(&["vcpu-online", "1"]);
    vm.ctl(&["shutdown"]);
    let (code, _, _) = vm.finish();
    assert_eq!(code, 0);
}

#[test]
fn a_bad_api_socket_path_is_one_clear_error() {
    let out = quietvm()
        .args([
            "run",
            "--workload",
            "hello",
            "--api-sock",
            "/nonexistent/dir/s.sock",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(101));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--api-sock"));
}

//! Queue mode of the timer device on real KVM (docs/timer-abi.md, "Queue mode"): the built-in guest
//! enables it by default, `--arg queues=0` keeps it to the commands of the first ABI (what an image
//! built before queue mode does). Tests assert behaviour and counts, never timings.

mod common;

use common::{assert_wakeups_match_kernel, run, u64_of, Run, TIMER_WORKLOADS};

fn passes(workload: &str, args: &[&str]) -> Run {
    let r = run(args);
    r.expect_code(0);
    assert!(
        r.stdout.contains(&format!("{workload}: ok")),
        "{workload} {args:?}\n{}\n{}",
        r.stdout,
        r.stderr
    );
    let t = &r.stats()["timers"];
    assert_eq!(u64_of(&t["early"]), 0, "{workload} {args:?}: early timers");
    assert_eq!(
        u64_of(&t["missed"]),
        0,
        "{workload} {args:?}: missed timers"
    );
    assert_eq!(
        u64_of(&t["queue_errors"]),
        0,
        "{workload} {args:?}: the built-in guest wrote nonsense"
    );
    r
}

/// Timer-device exits (commands and `SYNC`s) per fired timer.
fn timer_exits_per_fired(r: &Run) -> f64 {
    let exits: u64 = r
        .vcpus()
        .iter()
        .map(|v| v["exits"]["io_timer"].as_u64().unwrap_or(0))
        .sum();
    exits as f64 / u64_of(&r.stats()["timers"]["fired"]).max(1) as f64
}

#[test]
fn all_idle_vcpus_arm_and_take_their_timers_without_timer_device_exits() {
    for policy in ["local", "pull"] {
        let base = [
            "--workload",
            "all-idle",
            "--vcpus",
            "4",
            "--policy",
            policy,
            "--duration-ms",
            "600",
        ];
        let queued = passes("all-idle", &base);
        let mut legacy_args = base.to_vec();
        legacy_args.extend_from_slice(&["--arg", "queues=0"]);
        let legacy = passes("all-idle", &legacy_args);

        let t = &queued.stats()["timers"];
        assert!(u64_of(&t["fired"]) > 100, "{policy}: {t}");
        assert!(
            u64_of(&t["queue_entries"]) >= u64_of(&t["fired"]) / 2,
            "{policy}: the re-arms went through the rings: {t}"
        );
        // Every callback re-arms its timer, so commands would be at least two per timer (POP and
        // ARM); queue mode needs a SYNC only for an arming due before the vCPU's next exit.
        let q = timer_exits_per_fired(&queued);
        let l = timer_exits_per_fired(&legacy);
        assert!(
            q < 0.5,
            "{policy}: {q:.2} timer exits per fired timer in queue mode"
        );
        assert!(
            l >= 2.0,
            "{policy}: {l:.2} timer exits per fired timer with commands"
        );
        let lt = &legacy.stats()["timers"];
        assert_eq!(u64_of(&lt["queue_entries"]), 0, "{policy}: {lt}");
        assert_eq!(u64_of(&lt["queue_syncs"]), 0, "{policy}: {lt}");
        // quietvm's counts still agree with the kernel's and KVM's own.
        assert_wakeups_match_kernel(&queued, 3);
        assert_wakeups_match_kernel(&legacy, 3);
    }
}

/// What an image built before queue mode does: only the commands of the first ABI, on every
/// workload and policy. Its counts add up exactly as before.
#[test]
fn an_image_that_only_uses_commands_passes_every_workload_under_every_policy() {
    for policy in ["local", "push", "pull"] {
        for &w in TIMER_WORKLOADS.iter().chain(&["never-ack", "hotplug"]) {
            let r = passes(
                w,
                &[
                    "--workload",
                    w,
                    "--vcpus",
                    "2",
                    "--policy",
                    policy,
                    "--duration-ms",
                    "300",
                    "--arg",
                    "queues=0",
                ],
            );
            let t = &r.stats()["timers"];
            assert_eq!(u64_of(&t["queue_entries"]), 0, "{w}/{policy}: {t}");
            assert_eq!(u64_of(&t["queue_syncs"]), 0, "{w}/{policy}: {t}");
        }
    }
}

/// Every arming in queue mode ends exactly once in the timer log, also when vCPUs race on one
/// timer (`cancel-race`: one vCPU's cancel can be read before another's arm of the same timer;
/// `rearm-heavy`: many re-arms of one timer from several vCPUs).
#[test]
fn the_timer_log_ends_every_queued_arming_once() {
    let dir = tempfile::tempdir().unwrap();
    for w in ["cancel-race", "rearm-heavy", "all-idle", "timers"] {
        let log = dir.path().join(format!("{w}.jsonl"));
        let r = passes(
            w,
            &[
                "--workload",
                w,
                "--vcpus",
                "4",
                "--policy",
                "pull",
                "--duration-ms",
                "400",
                "--timer-log",
                log.to_str().unwrap(),
            ],
        );
        let t = &r.stats()["timers"];
        assert!(u64_of(&t["queue_entries"]) > 0, "{w}: queue mode was on");
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let count = |o: &str| lines.iter().filter(|l| l["outcome"] == o).count() as u64;
        assert_eq!(
            lines.len() as u64,
            u64_of(&t["armed"]),
            "{w}: one line per arming"
        );
        assert_eq!(count("fired"), u64_of(&t["fired"]), "{w}");
        assert_eq!(count("cancelled"), u64_of(&t["cancelled"]), "{w}");
    }
}

/// `--halt-poll-ns`: halts whose next timer is that close wait awake. The guest's checks still pass and
/// quietvm's wakeup count still agrees with the kernel's (a poll is not a sleep).
#[test]
fn halt_polling_keeps_the_checks_and_the_kernel_counts() {
    for policy in ["local", "pull"] {
        let r = passes(
            "all-idle",
            &[
                "--workload",
                "all-idle",
                "--vcpus",
                "4",
                "--policy",
                policy,
                "--duration-ms",
                "500",
                "--halt-poll-ns",
                "150000",
            ],
        );
        assert_wakeups_match_kernel(&r, 3);
    }
    let bad = common::raw(&["run", "--workload", "hello", "--halt-poll-ns", "2000000"]);
    bad.expect_code(101);
    assert!(bad.stderr.contains("halt-poll-ns"), "{}", bad.stderr);
}

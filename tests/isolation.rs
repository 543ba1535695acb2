//! Isolated vCPUs and NUMA nodes on real KVM (issue: "isolated vCPUs out of the hierarchy").
//! An isolated vCPU never expires another vCPU's timer, under every policy; with several nodes, no
//! migrator takes another node's timers below the hierarchy's cross-node level.

mod common;

use common::{run, u64_of};

#[test]
fn an_isolated_vcpu_expires_no_other_vcpus_timer_under_every_policy() {
    for policy in ["local", "push", "pull"] {
        let r = run(&[
            "configs/idle-movable-8.toml",
            "--policy",
            policy,
            "--duration-ms",
            "600",
            "--isolated-vcpus",
            "0",
        ]);
        r.expect_code(0);
        assert!(r.stdout.contains("idle-movable: ok"), "{}", r.stdout);
        let t = &r.stats()["timers"];
        assert_eq!(u64_of(&t["early"]), 0, "{policy}: early");
        assert_eq!(u64_of(&t["missed"]), 0, "{policy}: missed");
        assert_eq!(t["hierarchy_check"], "ok", "{policy}");
        assert!(u64_of(&t["fired"]) > 1000, "{policy}: the timers ran");
        assert_eq!(
            u64_of(&r.vcpu(0)["remote_expiries"]),
            0,
            "{policy}: isolated vCPU 0 expired another vCPU's timer"
        );
    }
}

#[test]
fn isolated_vcpus_hand_nothing_to_each_other_when_all_idle() {
    // Two isolated vCPUs among four idle ones: each expires only its own timers.
    let r = run(&[
        "configs/all-idle-4.toml",
        "--duration-ms",
        "600",
        "--isolated-vcpus",
        "1,3",
    ]);
    r.expect_code(0);
    let t = &r.stats()["timers"];
    assert_eq!((u64_of(&t["early"]), u64_of(&t["missed"])), (0, 0));
    for i in [1, 3] {
        assert_eq!(u64_of(&r.vcpu(i)["remote_expiries"]), 0, "vCPU {i}");
    }
}

#[test]
fn numa_nodes_keep_migrators_to_their_node_below_the_crossnode_level() {
    // vCPU i on node i % 2, groups of 2, all 8 onlined in order at boot: the shape that built a
    // level-1 group of both nodes before the fix ("timers/migration: Fix imbalanced NUMA trees").
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("numa.toml");
    std::fs::write(
        &cfg,
        "vcpus = 8\nworkload = \"idle-movable\"\nduration-ms = 800\ntimeout-ms = 120000\n\
         vcpu-nodes = [0, 1, 0, 1, 0, 1, 0, 1]\nhierarchy-group-size = 2\n",
    )
    .unwrap();
    let r = run(&[cfg.to_str().unwrap(), "--policy", "pull"]);
    r.expect_code(0);
    let t = &r.stats()["timers"];
    assert_eq!(t["hierarchy_check"], "ok");
    // Each idle vCPU's timers are expired remotely once, then re-armed by their callbacks on the
    // migrator (the workload's rule): 14 remote expiries, half of them node 1's.
    assert!(u64_of(&t["remote_expiries"]) > 0, "migrators worked");
    assert_eq!(u64_of(&t["cross_node_below_crossnode"]), 0);
    assert_eq!((u64_of(&t["early"]), u64_of(&t["missed"])), (0, 0));
}

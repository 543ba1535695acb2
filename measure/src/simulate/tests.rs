//! The engine against the properties the model promises.

use tmigr::service::Policy;

use super::workloads::WorkloadKind;
use super::*;

fn cfg(vcpus: u32, w: WorkloadKind, ms: u64) -> SimConfig {
    let mut c = SimConfig::new(vcpus, w);
    c.duration_ns = ms * 1_000_000;
    c
}

fn run(c: &SimConfig, p: Policy) -> PolicyReport {
    run_policy(c, p).expect("simulation runs").report
}

fn assert_correct(r: &PolicyReport) {
    assert!(r.failures().is_empty(), "{:?}\n{r:#?}", r.failures());
    assert!(r.timers.fired > 0, "{r:#?}");
}

#[test]
fn every_workload_and_policy_is_correct_with_invariants_checked_at_every_event() {
    for w in WorkloadKind::ALL {
        for vcpus in [1, 3, 17, 70] {
            let mut c = cfg(vcpus, w, 200);
            c.check_every = 1;
            for p in [Policy::Local, Policy::Push, Policy::Pull] {
                let r = run(&c, p);
                assert_correct(&r);
            }
        }
    }
}

#[test]
fn one_busy_under_pull_never_wakes_an_idle_vcpu_for_a_movable_timer() {
    let c = cfg(64, WorkloadKind::OneBusy, 300);
    let pull = run(&c, Policy::Pull);
    assert_correct(&pull);
    assert_eq!(pull.movable_wakeups, 0, "{pull:#?}");
    assert_eq!(pull.wakeups, 0, "{pull:#?}");
    let local = run(&c, Policy::Local);
    assert_correct(&local);
    // 126 timers of 1-10 ms for 300 ms: thousands of expiries, each a wakeup under local.
    assert!(local.movable_wakeups > 1_000, "{local:#?}");
    assert_eq!(local.timers.remote_expiries, 0);
}

#[test]
fn all_idle_under_pull_wakes_one_vcpu_per_distinct_expiry() {
    // With no wake latency and no exit cost every expiry happens at its deadline, so each distinct
    // deadline is one expiry instant: pull wakes exactly one vCPU for each.
    let mut c = cfg(64, WorkloadKind::AllIdle, 300);
    c.wake_latency_ns = 0;
    c.exit_cost_ns = 0;
    let pull = run(&c, Policy::Pull);
    assert_correct(&pull);
    assert_eq!(pull.timers.lateness_ns.max, 0, "{pull:#?}");
    assert_eq!(pull.wakeups, pull.movable_wakeups, "{pull:#?}");
    assert_eq!(pull.wakeups, pull.timers.expiry_instants, "{pull:#?}");
    // The deadlines are all distinct, so local wakes as often (each owner for its own).
    let local = run(&c, Policy::Local);
    assert_correct(&local);
    assert_eq!(local.wakeups, pull.wakeups, "{local:#?}");

    // With the default costs a woken vCPU wakes late and stays up a little, and expires what fell
    // due meanwhile, whoever owns it: still at most one wakeup per expiry instant, each for a
    // timer, and far fewer than local's.
    let c = cfg(64, WorkloadKind::AllIdle, 300);
    let pull = run(&c, Policy::Pull);
    assert_correct(&pull);
    assert_eq!(pull.wakeups, pull.movable_wakeups, "{pull:#?}");
    assert!(pull.wakeups <= pull.timers.expiry_instants, "{pull:#?}");
    let local = run(&c, Policy::Local);
    assert!(local.wakeups > 2 * pull.wakeups, "{local:#?}");
}

#[test]
fn same_seed_gives_the_same_report_and_another_seed_does_not() {
    let c = cfg(32, WorkloadKind::RearmHeavy, 150);
    let policies = [Policy::Local, Policy::Push, Policy::Pull];
    let a = serde_json::to_string(&simulate(&c, &policies).unwrap().0).unwrap();
    let b = serde_json::to_string(&simulate(&c, &policies).unwrap().0).unwrap();
    assert_eq!(a, b);
    let mut c2 = c.clone();
    c2.seed = 2;
    let d = serde_json::to_string(&simulate(&c2, &policies).unwrap().0).unwrap();
    assert_ne!(a, d);
}

#[test]
fn rearm_heavy_cancels_or_replaces_most_armings() {
    let c = cfg(16, WorkloadKind::RearmHeavy, 300);
    for p in [Policy::Local, Policy::Pull] {
        let r = run(&c, p);
        assert_correct(&r);
        let t = &r.timers;
        assert!(t.replaced + t.cancelled > t.fired, "{r:#?}");
    }
}

#[test]
fn ping_pong_wakes_the_owner_after_every_remote_expiry() {
    let c = cfg(16, WorkloadKind::PingPong, 300);
    let pull = run(&c, Policy::Pull);
    assert_correct(&pull);
    let remote = pull.timers.remote_expiries;
    assert!(remote > 1_000, "{pull:#?}");
    // Each remote expiry of an idle owner's timer hands it work and wakes it (the woken owner may
    // expire others' timers on the way, which then counts as a remote-timer wakeup), give or take
    // the wakeups still on their way at the end.
    assert!(pull.wakeups.abs_diff(remote) <= 16, "{pull:#?}");
    // So pull saves nothing here: about as many wakeups as local.
    let local = run(&c, Policy::Local);
    assert_correct(&local);
    assert!(pull.wakeups * 10 >= local.wakeups * 9, "{local:#?}");
}

#[test]
fn bad_configurations_are_refused_with_one_line() {
    let ok = cfg(8, WorkloadKind::OneBusy, 10);
    assert!(ok.validate().is_ok());
    let mut bad = ok.clone();
    bad.vcpus = 0;
    assert!(bad.validate().unwrap_err().to_string().contains("--vcpus"));
    bad.vcpus = MAX_VCPUS + 1;
    assert!(run_policy(&bad, Policy::Pull).is_err());
    let mut bad = ok.clone();
    bad.duration_ns = 0;
    assert!(bad.validate().is_err());
    let mut bad = cfg(8, WorkloadKind::RearmHeavy, 10);
    bad.timers_per_vcpu = 4;
    assert!(bad.validate().unwrap_err().to_string().contains("--timers"));
    for e in [ok.validate().err()].into_iter().flatten() {
        assert!(!e.to_string().contains('\n'));
    }
}

/// The all-idle sparse case of issue 12: 8 vCPUs, periods 10-100 ms.
fn sparse(slack_pct: u32) -> SimConfig {
    let mut c = cfg(8, WorkloadKind::AllIdle, 5_000);
    c.periods_ns = (10_000_000, 100_000_000);
    c.slack_pct = slack_pct;
    c
}

#[test]
fn with_slack_pull_wakes_less_and_nothing_fires_early() {
    let exact = run(&sparse(0), Policy::Pull);
    let slack = run(&sparse(25), Policy::Pull);
    assert_correct(&exact);
    assert_correct(&slack);
    assert_eq!(slack.timers.early, 0);
    assert!(
        slack.wakeups <= exact.wakeups,
        "slack {} exact {}",
        slack.wakeups,
        exact.wakeups
    );
    // Slack 0: every window is a point, so the optimum is the number of distinct deadlines, and
    // windows only ever shrink it.
    assert!(slack.optimum.total <= exact.optimum.total);
    assert_eq!(exact.optimum.armings, exact.timers.fired);
    assert_eq!(slack.optimum.pinned, 0, "all-idle arms movable timers only");
}

#[test]
fn with_free_wakeups_no_policy_beats_the_optimum_and_pull_reaches_it() {
    // With no wake latency and no exit cost every timer fires inside its window at a wakeup, so
    // the wake instants stab every window: no policy can wake less than the optimum. Pull wakes
    // at the earliest window end and expires everything due, the greedy itself.
    for slack_pct in [0, 10, 25, 100] {
        let mut c = sparse(slack_pct);
        c.wake_latency_ns = 0;
        c.exit_cost_ns = 0;
        for p in [Policy::Local, Policy::Push, Policy::Pull] {
            let r = run(&c, p);
            assert_correct(&r);
            assert_eq!(r.timers.after_window, 0, "{p} {slack_pct}%: {r:#?}");
            assert!(
                r.optimum.total <= r.wakeups,
                "{p} {slack_pct}%: optimum {} wakeups {}",
                r.optimum.total,
                r.wakeups
            );
            if p == Policy::Pull {
                assert_eq!(r.wakeups, r.optimum.total, "{slack_pct}%: {r:#?}");
            }
        }
    }
}

#[test]
fn slack_is_a_share_of_the_period_and_bad_values_are_refused() {
    let mut c = sparse(101);
    assert!(matches!(c.validate(), Err(SimError::SlackPct(101))));
    c.slack_pct = 100;
    assert!(c.validate().is_ok());
    c.periods_ns = (5, 5);
    assert!(matches!(c.validate(), Err(SimError::Periods)));
    c.periods_ns = (0, 5);
    assert!(matches!(c.validate(), Err(SimError::Periods)));
}

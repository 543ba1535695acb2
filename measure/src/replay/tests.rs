//! Unit tests of the replay: parsing, the timeline, the engine on hand-made traces.

use tmigr::service::{Policy, TimerKind};

use super::engine::{busy_spans, replay, replay_with, Costs, PolicyFigures, Windows};
use super::guest;
use super::parse::{parse_line, parse_trace, Ev, Line, TimerFlags};
use super::timeline::{build, OpKind, Timeline, TICK_SLACK_NS};

const COSTS: Costs = Costs {
    wake_latency_ns: 50_000,
    exit_cost_ns: 5_000,
};

/// Jiffies at time 0 of the hand-made traces (as on a 64-bit kernel shortly after boot).
const J0: u64 = 4_295_000_000;
/// 250 Hz.
const TICK_NS: u64 = 4_000_000;

fn ts(ns: u64) -> String {
    format!(
        "{}.{:06}",
        100 + ns / 1_000_000_000,
        (ns % 1_000_000_000) / 1_000
    )
}

fn jiffy(ns: u64) -> u64 {
    J0 + ns / TICK_NS
}

/// `timer_start` at `ns` on `cpu` for a timer due `ticks` jiffies later.
fn start(ns: u64, cpu: u32, timer: u64, ticks: u64, flags: &str) -> String {
    let now = jiffy(ns);
    format!(
        "     task-1     [{cpu:03}] d..1. {}: timer_start: timer={timer:016x} function=f \
         expires={} [timeout={ticks}] bucket_expiry={} cpu={cpu} idx=1 flags={flags}",
        ts(ns),
        now + ticks,
        now + ticks + 1
    )
}

fn cancel(ns: u64, cpu: u32, timer: u64) -> String {
    format!(
        "     task-1     [{cpu:03}] d..1. {}: timer_cancel: timer={timer:016x}",
        ts(ns)
    )
}

fn expire(ns: u64, cpu: u32, timer: u64) -> String {
    format!(
        "     task-1     [{cpu:03}] ..s.. {}: timer_expire_entry: timer={timer:016x} function=f \
         now={} baseclk={}",
        ts(ns),
        jiffy(ns),
        jiffy(ns)
    )
}

fn idle(ns: u64, cpu: u32, enter: bool) -> String {
    let state = if enter { 1 } else { 4_294_967_295u64 };
    format!(
        "     <idle>-0     [{cpu:03}] d..1. {}: cpu_idle: state={state} cpu_id={cpu}",
        ts(ns)
    )
}

fn timeline(lines: &[String]) -> Timeline {
    let text = format!(
        "# tracer: nop\n#\n# entries-in-buffer/entries-written: 1/1   #P:2\n{}\n",
        lines.join("\n")
    );
    let parsed = parse_trace(&text).expect("parses");
    build(&parsed, Some(250)).expect("builds")
}

fn run(tl: &Timeline, p: Policy) -> PolicyFigures {
    let f = replay(tl, p, COSTS).expect("replays");
    assert!(f.checks.failures().is_empty(), "{p}: {:?}", f.checks);
    f
}

const MS: u64 = 1_000_000;

#[test]
fn parses_ftrace_lines() {
    let l =
        "           rustc-14951   [001] dNs1.  2105.173925: timer_start: timer=000000006557ece3 \
             function=tcp_orphan_update expires=4295418546 [timeout=25] bucket_expiry=4295418547 \
             cpu=1 idx=51 flags=D|P";
    let Line::Record(r) = parse_line(l, 7).unwrap() else {
        panic!("not a record")
    };
    assert_eq!(r.cpu, 1);
    assert_eq!(r.line, 7);
    assert_eq!(r.ts_ns, 2_105_173_925_000);
    assert_eq!(
        r.ev,
        Ev::TimerStart {
            timer: 0x6557ece3,
            expires: 4295418546,
            bucket_expiry: 4295418547,
            now: 4295418521,
            base_cpu: 1,
            flags: TimerFlags {
                pinned: true,
                deferrable: true,
                irqsafe: false
            },
        }
    );
    // Empty flags, a task name with spaces and brackets-free digits in it.
    let l =
        "      opt cgu.10-15317   [000] d..1.  2105.177957: timer_start: timer=000000003bb74504 \
             function=process_timeout expires=4295418523 [timeout=1] bucket_expiry=4295418524 \
             cpu=0 idx=28 flags=";
    let Line::Record(r) = parse_line(l, 1).unwrap() else {
        panic!("not a record")
    };
    assert!(matches!(r.ev, Ev::TimerStart { flags, .. } if flags == TimerFlags::default()));
    let l = "          <idle>-0       [001] d..1.   100.5: cpu_idle: state=4294967295 cpu_id=1";
    let Line::Record(r) = parse_line(l, 1).unwrap() else {
        panic!("not a record")
    };
    assert_eq!(r.ts_ns, 100_500_000_000);
    assert_eq!(
        r.ev,
        Ev::CpuIdle {
            state: 4294967295,
            cpu: 1
        }
    );
    let l = "  x-1 [000] ..s.. 1.000001: tmigr_handle_remote_cpu: cpu=1 parent=00000000deadbeef \
             wakeup=9223372036854775807";
    assert!(matches!(
        parse_line(l, 1).unwrap(),
        Line::Record(r) if r.ev == Ev::TmigrHandleRemoteCpu { cpu: 1 }
    ));
    let l = "  x-1 [000] ..s.. 1.000001: sched_switch: prev_comm=a prev_pid=1";
    assert!(matches!(
        parse_line(l, 1).unwrap(),
        Line::Record(r) if r.ev == Ev::Unknown("sched_switch".into())
    ));
    let l = "           vcpu5-32398   [001] d..2.  1683.246584: <user stack trace>";
    assert!(matches!(
        parse_line(l, 1).unwrap(),
        Line::Record(r) if r.ev == Ev::Unknown("<user stack trace>".into())
    ));
    assert_eq!(
        parse_line(" =>  <00007f580ecdec82>", 1).unwrap(),
        Line::Skip
    );
    assert_eq!(
        parse_line("CPU:1 [LOST 42 EVENTS]", 1).unwrap(),
        Line::Lost(42)
    );
    assert_eq!(
        parse_line("# entries-in-buffer/entries-written: 426/426   #P:2", 1).unwrap(),
        Line::Cpus(2)
    );
}

#[test]
fn parses_trace_cmd_report_lines() {
    assert_eq!(parse_line("cpus=4", 1).unwrap(), Line::Cpus(4));
    assert_eq!(parse_line("version = 6", 2).unwrap(), Line::Skip);
    assert_eq!(parse_line("CPU 3 is empty", 3).unwrap(), Line::Skip);
    // No latency columns, padded event name, nanosecond timestamps.
    let l = "          <idle>-0     [002]  5321.123456789: cpu_idle:             state=2 cpu_id=2";
    let Line::Record(r) = parse_line(l, 4).unwrap() else {
        panic!("not a record")
    };
    assert_eq!(r.ts_ns, 5_321_123_456_789);
    assert_eq!(r.ev, Ev::CpuIdle { state: 2, cpu: 2 });
    let l = "     kworker/1:2-88    [001]  5321.2: timer_cancel:         timer=0xffff8881003c2a48";
    let Line::Record(r) = parse_line(l, 5).unwrap() else {
        panic!("not a record")
    };
    assert_eq!(
        r.ev,
        Ev::TimerCancel {
            timer: 0xffff8881003c2a48
        }
    );
}

#[test]
fn malformed_lines_name_their_number() {
    let text = format!(
        "# tracer: nop\n{}\nthis is not a trace line\n",
        idle(0, 0, true)
    );
    let e = parse_trace(&text).unwrap_err();
    assert_eq!(e.line, 3);
    let msg = e.to_string();
    assert!(msg.starts_with("line 3: "), "{msg}");
    assert!(msg.contains("this is not a trace line"), "{msg}");
    assert!(!msg.contains('\n'));

    let e = parse_line("  a-1 [000] d..1. 1.0: timer_start: timer=01 expires=5", 9).unwrap_err();
    assert_eq!(e.line, 9);
    assert!(
        e.to_string().contains("timer_start without timeout="),
        "{e}"
    );
    let e = parse_line("  a-1 [000] d..1. 1.0: cpu_idle: state=x cpu_id=0", 2).unwrap_err();
    assert!(e.to_string().contains("state=\"x\" is not a number"), "{e}");
    let e = parse_line("  a-1 [000] d..1. noon: cpu_idle: state=1 cpu_id=0", 2).unwrap_err();
    assert!(e.to_string().contains("no timestamp"), "{e}");
}

#[test]
fn infers_hz_and_maps_jiffies() {
    // Samples at 250 Hz, some taken late in their jiffy (stale readers do not move the grid).
    let mut lines = Vec::new();
    for i in 0..200u64 {
        let ns = i * 3_333_333 + 20_000;
        lines.push(start(ns, (i % 2) as u32, 0x100 + i, 10, ""));
    }
    let text = lines.join("\n");
    let parsed = parse_trace(&text).unwrap();
    let tl = build(&parsed, None).unwrap();
    let hz = tl.hz.clone().unwrap();
    assert_eq!(hz.hz, 250);
    assert_eq!(hz.source, "inferred");
    assert!((hz.estimate.unwrap() - 250.0).abs() < 5.0, "{hz:?}");
    // The first arming (the trace's time 0, 20 us into jiffy J0) is due at the start of J0 + 11
    // less the slack; every sample here is taken 20 us or more into its jiffy, so the grid is put
    // that much late (the bound is tight when some event follows a tick closely, as the timer
    // softirq's do).
    let OpKind::Arm { deadline, .. } = tl.ops[0].kind else {
        panic!("{:?}", tl.ops[0])
    };
    let want = 11 * TICK_NS - TICK_SLACK_NS;
    assert!(deadline.abs_diff(want) <= 2_000, "{deadline} vs {want}");
    // --hz wins.
    let tl = build(&parsed, Some(1000)).unwrap();
    assert_eq!(tl.hz.unwrap().hz, 1000);
    // Nothing to infer from.
    let parsed = parse_trace(&start(0, 0, 1, 5, "")).unwrap();
    let e = build(&parsed, None).unwrap_err();
    assert!(e.contains("pass --hz"), "{e}");
}

#[test]
fn classifies_cancels() {
    let tl = timeline(&[
        start(0, 0, 0xa, 2, ""),
        // Detach before its callback.
        cancel(12 * MS, 0, 0xa),
        expire(12 * MS + 2_000, 0, 0xa),
        start(12 * MS + 4_000, 0, 0xa, 2, ""),
        // mod_timer on the pending timer: detach then start.
        cancel(13 * MS, 0, 0xa),
        start(13 * MS + 1_000, 0, 0xa, 5, ""),
        // A real cancel.
        cancel(14 * MS, 0, 0xa),
        // A cancel of a timer the trace never armed.
        cancel(15 * MS, 1, 0xb),
    ]);
    assert_eq!(tl.armings.armings, 3);
    assert_eq!(tl.armings.detaches, 2);
    assert_eq!(tl.armings.cancels, 1);
    assert_eq!(tl.armings.cancels_unknown, 1);
    assert_eq!(tl.kernel.expiries, 1);
    let cancels: Vec<_> = tl
        .ops
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Cancel { .. }))
        .map(|o| o.t)
        .collect();
    assert_eq!(cancels, vec![14 * MS]);
}

#[test]
fn an_event_in_idle_ends_the_idle_span() {
    let tl = timeline(&[
        idle(0, 1, false), // CPU 1 was idle when the trace began
        start(MS, 0, 0xa, 2, ""),
        idle(2 * MS, 0, true),
        start(3 * MS, 0, 0xb, 2, ""), // an interrupt in idle
        idle(3 * MS + 10_000, 0, false),
        idle(5 * MS, 0, true),
    ]);
    assert_eq!(tl.initially_idle, vec![false, true]);
    let kinds: Vec<_> = tl.ops.iter().map(|o| (o.t, o.cpu, o.kind)).collect();
    assert!(matches!(
        kinds[0],
        (0, 1, OpKind::IdleExit { early: false })
    ));
    assert!(matches!(kinds[2], (_, 0, OpKind::IdleEnter)));
    assert!(matches!(kinds[3], (t, 0, OpKind::IdleExit { early: true }) if t == 3 * MS));
    assert!(matches!(kinds[4], (_, 0, OpKind::Arm { .. })));
    assert!(matches!(kinds[5], (_, 0, OpKind::IdleExitLate)));
    assert!(matches!(kinds[6], (_, 0, OpKind::IdleEnter)));
    assert_eq!(tl.kernel.idle_exits, 2);
}

/// CPU 0 runs all the time; CPU 1 arms timers, then sleeps through the rest of the trace.
fn one_busy(flags: &str) -> Timeline {
    timeline(&[
        start(0, 0, 0xf00, 100, ""),
        start(100_000, 1, 0xa, 5, flags),
        idle(200_000, 1, true),
        start(1_000_000, 0, 0xf01, 200, ""),
        cancel(80 * MS, 0, 0xf01),
        idle(100 * MS, 1, false),
        start(100 * MS + 1_000, 0, 0xf02, 200, ""),
    ])
}

#[test]
fn pull_expires_an_idle_cpus_movable_timer_remotely() {
    let tl = one_busy("");
    let local = run(&tl, Policy::Local);
    assert_eq!(local.timer_wakeups, 1);
    assert_eq!(local.timer_wakeups_own_movable, 1);
    assert_eq!(local.timer_wakeups_policy_made, 1);
    assert_eq!(local.remote_expiries, 0);
    let pull = run(&tl, Policy::Pull);
    assert_eq!(pull.timer_wakeups, 0, "{pull:?}");
    assert_eq!(pull.remote_expiries, 1);
    assert_eq!(pull.expired_off_arming_cpu, 1);
    assert_eq!(pull.remote_cpu_handled, 1);
    // Pull expires it when due (the migrator runs), not at CPU 1's wakeup 80 ms later.
    assert!(pull.lateness_ns.max < 1_000_000, "{pull:?}");
    assert_eq!(pull.expired, 1);
    assert_eq!(pull.cancelled, 1);
}

#[test]
fn a_pinned_timer_wakes_its_cpu_under_every_policy() {
    let tl = one_busy("P");
    for p in [Policy::Local, Policy::Push, Policy::Pull] {
        let f = run(&tl, p);
        assert_eq!(f.timer_wakeups, 1, "{p}");
        assert_eq!(f.timer_wakeups_own_pinned, 1, "{p}");
        assert_eq!(f.remote_expiries, 0, "{p}");
        assert_eq!(f.expired_off_arming_cpu, 0, "{p}");
    }
}

#[test]
fn a_deferrable_timer_waits_for_its_cpu() {
    let tl = one_busy("D");
    for p in [Policy::Local, Policy::Push, Policy::Pull] {
        let f = run(&tl, p);
        assert_eq!(f.timer_wakeups, 0, "{p}");
        assert_eq!(f.deferrable_expired, 1, "{p}");
        // Fired at the trace's idle exit at 100 ms, not at its deadline (24 ms).
        assert!(f.deferrable_lateness_ns.max > 70 * MS, "{p}: {f:?}");
    }
    // Never woken at all: still waiting at the end, not missed.
    let tl = timeline(&[
        start(0, 0, 0xf00, 100, ""),
        start(100_000, 1, 0xa, 5, "D"),
        idle(200_000, 1, true),
        start(90 * MS, 0, 0xf01, 1, ""),
    ]);
    let f = run(&tl, Policy::Pull);
    assert_eq!(f.deferrable_pending_at_end, 1);
    assert_eq!(f.checks.missed, 0);
}

#[test]
fn a_trace_exit_that_finds_a_timer_due_is_a_timer_wakeup() {
    // Both CPUs idle; CPU 1's timer is due at 24 ms, and the trace wakes CPU 1 at 24.01 ms (the
    // kernel woke it for the timer): under local the trace's exit comes before the policy's own
    // wakeup (50 us of wake latency) and finds the timer due.
    let tl = timeline(&[
        start(0, 1, 0xa, 5, ""),
        idle(100_000, 0, true),
        idle(200_000, 1, true),
        idle(24 * MS - TICK_SLACK_NS + 10_000, 1, false),
        idle(30 * MS, 1, true),
        idle(40 * MS, 0, false),
    ]);
    let local = run(&tl, Policy::Local);
    assert_eq!(local.timer_wakeups, 1);
    assert_eq!(local.timer_wakeups_policy_made, 0);
    // Under pull CPU 1 idled the hierarchy last and wakes for it as well.
    let pull = run(&tl, Policy::Pull);
    assert_eq!(pull.timer_wakeups, 1);
    assert_eq!(pull.timer_wakeups_own_movable, 1);
}

#[test]
fn kernel_figures() {
    let tl = timeline(&[
        start(0, 1, 0xa, 5, ""),
        idle(100_000, 1, true),
        // The kernel's migrator on CPU 0 expires CPU 1's timer.
        "  x-1 [000] ..s.. 100.024000: tmigr_handle_remote_cpu: cpu=1 parent=00000000deadbeef \
         wakeup=1"
            .to_string(),
        cancel(24 * MS + 100, 0, 0xa),
        expire(24 * MS + 200, 0, 0xa),
        // CPU 1 wakes for a pinned timer armed before the trace.
        idle(30 * MS, 1, false),
        expire(30 * MS + 20_000, 1, 0xb),
        // and again for a timer of its own.
        start(31 * MS, 1, 0xc, 2, "P"),
        idle(32 * MS, 1, true),
        cancel(40 * MS - TICK_SLACK_NS + 30_000, 1, 0xc),
        expire(40 * MS - TICK_SLACK_NS + 31_000, 1, 0xc),
        idle(40 * MS, 1, false),
    ]);
    let k = &tl.kernel;
    assert_eq!(k.tmigr_handle_remote_cpu, 1);
    assert_eq!(k.expiries, 3);
    assert_eq!(k.expiries_armed_before_trace, 1);
    assert_eq!(k.remote_expiries, 1);
    assert_eq!(k.expired_off_arming_cpu, 1);
    assert_eq!(k.idle_exits, 2);
    assert_eq!(k.timer_wakeups, 1);
    assert_eq!(k.timer_wakeups_own_pinned, 1);
    for p in [Policy::Local, Policy::Push, Policy::Pull] {
        let f = run(&tl, p);
        assert_eq!(f.expired, 2, "{p}");
        // The pinned timer expires on CPU 1 in every policy.
        assert!(f.timer_wakeups_own_pinned >= 1, "{p}: {f:?}");
    }
}

#[test]
fn timer_kinds_are_taken_from_the_flags() {
    let tl = timeline(&[
        start(0, 0, 0xa, 5, "P"),
        start(0, 0, 0xb, 5, "D"),
        start(0, 1, 0xc, 5, "I"),
    ]);
    let kinds: Vec<_> = tl
        .ops
        .iter()
        .filter_map(|o| match o.kind {
            OpKind::Arm {
                kind, deferrable, ..
            } => Some((kind, deferrable)),
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            (TimerKind::Pinned, false),
            (TimerKind::Movable, true),
            (TimerKind::Movable, false)
        ]
    );
}

#[test]
fn an_exit_before_the_deadline_is_not_a_kernel_timer_wakeup() {
    // CPU 1 is woken 1 ms before its timer is due (a task woke), and the timer expires at the next
    // tick while it runs: not a wakeup for the timer.
    let tl = timeline(&[
        start(0, 1, 0xa, 5, ""),
        idle(100_000, 1, true),
        idle(23 * MS, 1, false),
        cancel(24 * MS + 20_000, 1, 0xa),
        expire(24 * MS + 21_000, 1, 0xa),
        idle(25 * MS, 1, true),
    ]);
    assert_eq!(tl.kernel.idle_exits, 1);
    assert_eq!(tl.kernel.timer_wakeups, 0);
    assert_eq!(tl.kernel.expiries, 1);
}

#[test]
fn the_guest_form_holds_every_operation() {
    let tl = timeline(&[
        idle(0, 1, false),
        start(1_500, 0, 0xa, 5, "P"),
        start(2_000, 0, 0xb, 5, "D"),
        cancel(3_000, 0, 0xb),
        idle(4_000, 0, true),
    ]);
    let b = guest::encode(&tl).unwrap();
    assert_eq!(&b[..4], b"QVRP");
    assert_eq!(u16::from_le_bytes([b[4], b[5]]), 1);
    assert_eq!(u16::from_le_bytes([b[6], b[7]]), 2);
    let ops = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    assert_eq!(b.len(), guest::HEADER_LEN + ops * guest::OP_LEN);
    let rec: Vec<(u32, u16, u8, u8)> = b[guest::HEADER_LEN..]
        .chunks_exact(guest::OP_LEN)
        .map(|o| {
            (
                u32::from_le_bytes(o[0..4].try_into().unwrap()),
                u16::from_le_bytes([o[4], o[5]]),
                o[6],
                o[7],
            )
        })
        .collect();
    assert_eq!(
        rec,
        vec![
            (0, 1, guest::IDLE_ENTER, 0),
            (0, 1, guest::IDLE_EXIT, 0),
            (1, 0, guest::ARM, guest::FLAG_PINNED),
            (2, 0, guest::ARM, guest::FLAG_DEFERRABLE),
            (3, 0, guest::CANCEL, 0),
            (4, 0, guest::IDLE_ENTER, 0),
        ]
    );
    // The pinned timer's deadline, relative to its arming (the only jiffy sample places the grid:
    // jiffy J0 starts at its arming): 6 jiffies less the slack.
    let o = &b[guest::HEADER_LEN + 2 * guest::OP_LEN..];
    let after = u32::from_le_bytes(o[12..16].try_into().unwrap());
    assert_eq!(u64::from(after), (24 * MS - TICK_SLACK_NS) / 1_000);
}

#[test]
fn finding_7_a_huge_cpu_count_in_the_header_is_refused_at_once() {
    for header in [
        "# entries-in-buffer/entries-written: 1/1   #P:4294967295",
        "cpus=4294967295",
        "# entries-in-buffer/entries-written: 1/1   #P:4097",
    ] {
        let text = format!("# tracer: nop\n{header}\n{}\n", start(0, 0, 0xa, 5, ""));
        let parsed = parse_trace(&text).expect("parses");
        let e = build(&parsed, Some(250)).unwrap_err();
        assert!(e.contains("CPUs"), "{header}: {e}");
    }
}

#[test]
fn finding_7_a_dense_trace_reports_no_false_misses() {
    // 20,000 arms 2 us apart on one busy CPU, each of its own timer, due one tick later.
    let mut lines = Vec::new();
    for i in 0..20_000u64 {
        lines.push(start(1_000 + 2_000 * i, 0, 0x10_0000 + i, 1, ""));
    }
    let tl = timeline(&lines);
    for p in [Policy::Local, Policy::Push, Policy::Pull] {
        let f = run(&tl, p);
        assert_eq!(f.checks.missed, 0, "{p}: {:?}", f.checks);
    }
}

/// `timer_start` at `ns` on `cpu`: due `ticks` jiffies later, in a bucket `bucket` jiffies later.
fn start_in_bucket(ns: u64, cpu: u32, timer: u64, ticks: u64, bucket: u64) -> String {
    let now = jiffy(ns);
    format!(
        "     task-1     [{cpu:03}] d..1. {}: timer_start: timer={timer:016x} function=f \
         expires={} [timeout={ticks}] bucket_expiry={} cpu={cpu} idx=1 flags=",
        ts(ns),
        now + ticks,
        now + bucket
    )
}

/// Both CPUs idle from the start; two movable timers whose wheel windows overlap
/// (`[10, 16]` and `[12, 14]` jiffies) but whose buckets differ.
fn overlapping_buckets() -> Timeline {
    timeline(&[
        start_in_bucket(0, 0, 0xa, 10, 16),
        start_in_bucket(1_000, 1, 0xb, 12, 14),
        idle(2_000, 0, true),
        idle(3_000, 1, true),
        idle(200 * MS, 0, false),
    ])
}

#[test]
fn wheel_windows_let_one_wakeup_serve_overlapping_buckets() {
    let tl = overlapping_buckets();
    let run_w = |p, w| {
        let f = replay_with(&tl, p, COSTS, w).expect("replays");
        assert!(f.checks.failures().is_empty(), "{p} {w:?}: {:?}", f.checks);
        assert_eq!(f.expired, 2);
        assert_eq!(f.windows, w);
        f
    };
    let pull = run_w(Policy::Pull, Windows::None);
    let pull_w = run_w(Policy::Pull, Windows::Wheel);
    // Without windows the deadlines are the buckets, 14 and 16: two wakeups, and the optimum is 2.
    assert_eq!(pull.timer_wakeups_policy_made, 2, "{pull:?}");
    assert_eq!((pull.optimum.total, pull.optimum.movable), (2, 2));
    // With them, one wakeup at the earliest window end (14) expires both.
    assert_eq!(pull_w.timer_wakeups_policy_made, 1, "{pull_w:?}");
    assert_eq!(pull_w.optimum.total, 1);
    assert_eq!(pull_w.policy_made_per_optimum, Some(1.0));
    // Local wakes each CPU for its own timer either way.
    let local_w = run_w(Policy::Local, Windows::Wheel);
    assert_eq!(local_w.timer_wakeups_policy_made, 2);
    assert!(local_w.optimum.total <= local_w.timer_wakeups_policy_made);
    // The default replay is the no-window one.
    assert_eq!(replay(&tl, Policy::Pull, COSTS).unwrap(), pull);
}

#[test]
fn busy_spans_are_the_time_outside_idle_spans() {
    let tl = overlapping_buckets();
    let b = busy_spans(&tl);
    assert_eq!(b.per_cpu.len(), 2);
    // CPU 0: runs until it idles at 2 us (its first idle event is an entry), again from 200 ms.
    assert_eq!(b.per_cpu[0], vec![(0, 2_000), (200 * MS, 200 * MS)]);
    assert_eq!(b.per_cpu[1], vec![(0, 3_000)]);
    // A timer of CPU 1 due while CPU 0 runs needs no wakeup: one_busy's CPU 0 runs throughout.
    let tl = one_busy("");
    let pull = run(&tl, Policy::Pull);
    assert_eq!(pull.optimum.total, 0, "{pull:?}");
    assert_eq!(pull.optimum.served_while_running, pull.expired);
}

//! Property tests: random operation sequences against the reference model.

use proptest::prelude::*;

use crate::model::{ops_from_bytes, Op, Sim, SimConfig};
use crate::types::{Policy, TimerKind};

fn run_bytes(bytes: &[u8], max_cpus: u32) -> Result<(), TestCaseError> {
    let (cfg, ops) = ops_from_bytes(bytes, max_cpus);
    Sim::run(&cfg, &ops).map_err(|e| TestCaseError::fail(format!("{cfg:?}\n{e}")))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Small machines (1..=12 vCPUs), long histories: the races of few cpus.
    #[test]
    fn service_matches_model_small(bytes in proptest::collection::vec(any::<u8>(), 6..600)) {
        run_bytes(&bytes, 12)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Up to 300 vCPUs (several levels, node grouping), shorter histories.
    #[test]
    fn service_matches_model_large(bytes in proptest::collection::vec(any::<u8>(), 6..300)) {
        run_bytes(&bytes, 300)?;
    }
}

/// Structured strategy, Pull only, biased to halts/advances so whole-idle
/// and root hand-overs happen often.
fn op_strategy(n: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..n, 0..32u32, 1..20_000u64, any::<bool>(), prop_oneof![Just(0u64), 0..20_000u64]).prop_map(|(cpu, id, delta, p, slack)| Op::Arm {
            slack,
            cpu, id, delta, kind: if p { TimerKind::Pinned } else { TimerKind::Movable }
        }),
        1 => (0..32u32).prop_map(|id| Op::Cancel { id }),
        3 => (0..n).prop_map(|cpu| Op::Halt { cpu }),
        1 => (0..n).prop_map(|cpu| Op::Run { cpu }),
        2 => (1..5_000u64).prop_map(|dt| Op::Advance { dt }),
        1 => (0..n).prop_map(|cpu| Op::Expire { cpu }),
        1 => (0..n).prop_map(|cpu| Op::Online { cpu }),
        1 => (0..n).prop_map(|cpu| Op::Offline { cpu }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn pull_hierarchy_matches_model(
        (n, gs, ops) in (1..40u32, 2..9usize).prop_flat_map(|(n, gs)| {
            (Just(n), Just(gs), proptest::collection::vec(op_strategy(n), 1..200))
        })
    ) {
        let cfg = SimConfig {
            policy: Policy::Pull,
            possible: n,
            initially_online: (n / 2).max(1),
            group_size: gs,
            nodes: None,
            max_timers: 32,
            isolated: vec![],
        };
        Sim::run(&cfg, &ops).map_err(|e| TestCaseError::fail(format!("{cfg:?}\n{e}")))?;
    }
}

/// The fuzz target's decoder on fixed byte strings, so CI exercises it.
#[test]
fn fixed_byte_strings_decode_and_pass() {
    let cases: &[&[u8]] = &[
        b"",
        b"\x00\x03\x00\x03\x00\x00",
        b"\x00\x07\x00\x01\x00\x00\x00\x01\x05\x00\x03\x00\x00\x00\x06\x00\x40\x00\x0b\x00\x00\x00",
        b"quietvm pull model: idle vcpus stay asleep while a migrator pulls their timers",
        b"\x01\x10\x00\x10\x06\x03\x00\x00\x01\x00\x80\x02\x01\x00\x03\x01\x00\x00\x06\x00\xff\x00",
        b"\x02\x05\x00\x05\x00\x00\x0a\x01\x01\x00\x00\x01\x02\x00\x06\x00\x10\x00\x0b\x00\x00\x00",
        &[
            0x00, 0x2b, 0x01, 0xff, 0x01, 0x05, 0x08, 0x11, 0x22, 0x33, 0x09, 0x01, 0, 0, 0x03,
            0x02, 0, 0, 0x06, 0, 0x80, 0,
        ],
    ];
    for (i, bytes) in cases.iter().enumerate() {
        let (cfg, ops) = ops_from_bytes(bytes, 300);
        assert_eq!(ops.last(), Some(&Op::Settle));
        if let Err(e) = Sim::run(&cfg, &ops) {
            panic!("case {i} {cfg:?}: {e}");
        }
    }
    // Deterministic pseudo-random strings, all three policies.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut total = crate::model::SimReport::default();
    for i in 0..60 {
        let bytes: Vec<u8> = (0..400)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (cfg, ops) = ops_from_bytes(&bytes, 64);
        match Sim::run(&cfg, &ops) {
            Err(e) => panic!("xorshift case {i} {cfg:?}: {e}"),
            Ok(r) => {
                total.applied += r.applied;
                total.expired += r.expired;
                total.remote += r.remote;
                total.wakeups += r.wakeups;
            }
        }
    }
    // The decoder must produce histories that do something.
    eprintln!("{total:?}");
    assert!(
        total.expired > 100 && total.remote > 10 && total.wakeups > 10,
        "{total:?}"
    );
}

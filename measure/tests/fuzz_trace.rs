//! Fuzzing the trace parser on stable Rust: proptest feeds `quietvm replay`'s parser and timeline
//! builder random text and mutated real trace lines; each answers (an error is fine) without
//! panicking, and a timeline it builds stays within the limits (docs/limits.md).
//!
//! The budget is proptest's default (256 cases per property). A longer run:
//!
//!     PROPTEST_CASES=1000000 cargo test --release -p quietvm-measure --test fuzz_trace

use proptest::prelude::*;
use quietvm_measure::replay::parse::parse_trace;
use quietvm_measure::replay::timeline::{build, MAX_CPUS};

/// Real lines of the shapes the parser knows, to mutate.
const SEEDS: &[&str] = &[
    "# tracer: nop",
    "# entries-in-buffer/entries-written: 426/426   #P:2",
    "cpus=2",
    "version = 6",
    "CPU 1 is empty",
    "          <idle>-0     [001] d..1. 100.000100: cpu_idle: state=1 cpu_id=1",
    "          <idle>-0     [001] d..1. 100.000300: cpu_idle: state=4294967295 cpu_id=1",
    "     task-1     [000] d..1. 100.000200: timer_start: timer=00000000deadbeef function=f expires=4295000010 [timeout=10] bucket_expiry=4295000011 cpu=0 idx=1 flags=",
    "     task-1     [000] d..1. 100.000400: timer_cancel: timer=00000000deadbeef",
    "     task-1     [000] ..s.. 100.040000: timer_expire_entry: timer=00000000deadbeef function=f now=4295000010 baseclk=4295000010",
    "     task-1     [000] ..s.. 100.040001: timer_expire_exit: timer=00000000deadbeef",
    "CPU:1 [LOST 12 EVENTS]",
    "     task-1     [000] d..1. 100.000500: tmigr_cpu_idle: cpu=0 parent=0000000000000000 nextevt=1000 wakeup=2000",
];

fn mutated_line() -> impl Strategy<Value = String> {
    (
        0..SEEDS.len(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<char>(), 0u8..3), 0..4),
    )
        .prop_map(|(i, edits)| {
            let mut chars: Vec<char> = SEEDS[i].chars().collect();
            for (at, c, kind) in edits {
                if chars.is_empty() {
                    chars.push(c);
                    continue;
                }
                let at = at.index(chars.len());
                match kind {
                    0 => chars[at] = c,
                    1 => chars.insert(at, c),
                    _ => {
                        chars.remove(at);
                    }
                }
            }
            chars.into_iter().collect()
        })
}

fn check(text: &str) -> Result<(), TestCaseError> {
    if let Ok(parsed) = parse_trace(text) {
        if let Ok(tl) = build(&parsed, None) {
            prop_assert!(tl.cpus <= MAX_CPUS);
        }
        let _ = build(&parsed, Some(250));
    }
    Ok(())
}

proptest! {
    #[test]
    fn random_text_never_panics(text in "\\PC{0,400}") {
        check(&text)?;
    }

    #[test]
    fn mutated_trace_lines_never_panic(lines in proptest::collection::vec(mutated_line(), 0..40)) {
        check(&lines.join("\n"))?;
    }

    #[test]
    fn huge_numbers_in_headers_and_fields_never_panic(n in any::<u64>(), cpu in any::<u32>()) {
        let text = format!(
            "# entries-in-buffer/entries-written: 1/1   #P:{cpu}\ncpus={n}\n          <idle>-0     [{cpu:03}] d..1. {n}.000100: cpu_idle: state={n} cpu_id={cpu}\n     task-1     [000] d..1. 100.000200: timer_start: timer={n:016x} function=f expires={n} [timeout={n}] bucket_expiry={n} cpu={cpu} idx=1 flags="
        );
        check(&text)?;
    }
}

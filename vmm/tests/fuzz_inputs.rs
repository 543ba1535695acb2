//! Fuzzing on stable Rust: proptest drives the parsers of hostile input (API request lines, TOML
//! configs) and the timer device's command decoder with random input, and checks that each answers
//! (an error is fine) without panicking, and keeps its invariants.
//!
//! The budget is proptest's default number of cases per property (256), a few seconds in the normal
//! test run. A longer run (docs/limits.md, "Fuzzing"):
//!
//!     PROPTEST_CASES=1000000 cargo test --release -p quietvm-vmm --test fuzz_inputs

use proptest::prelude::*;
use quietvm_vmm::api::{parse_request, start_line, Answer, VmControl};
use quietvm_vmm::config::VmConfig;
use serde_json::Value;

struct Nothing;

impl VmControl for Nothing {
    fn stats(&self) -> Value {
        Value::Null
    }
    fn pause(&self) -> Answer {
        Ok(Value::Null).into()
    }
    fn resume(&self) -> Answer {
        Ok(Value::Null).into()
    }
    fn vcpu_offline(&self, _: u32) -> Answer {
        Ok(Value::Null).into()
    }
    fn vcpu_online(&self, _: u32) -> Answer {
        Ok(Value::Null).into()
    }
    fn shutdown(&self) -> Answer {
        Ok(Value::Null).into()
    }
}

/// JSON-ish text: request-shaped objects with random keys and values, duplicates included.
fn request_like() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("op".to_string()),
        Just("vcpu".to_string()),
        Just("policy".to_string()),
        "[a-z\\-]{0,8}",
    ];
    let value = prop_oneof![
        Just("\"stats\"".to_string()),
        Just("\"vcpu-offline\"".to_string()),
        Just("\"vcpu-online\"".to_string()),
        Just("\"set-policy\"".to_string()),
        Just("\"shutdown\"".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        "\"[^\"\\\\]{0,12}\"",
        Just("null".to_string()),
        Just("[1,{\"a\":[]}]".to_string()),
        Just("{\"op\":\"stats\",\"op\":1}".to_string()),
    ];
    proptest::collection::vec((key, value), 0..6).prop_map(|kv| {
        let body: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    })
}

proptest! {
    #[test]
    fn api_lines_of_random_bytes_never_panic(line in "\\PC{0,200}") {
        let _ = parse_request(&line);
        let _ = start_line(&Nothing, &line);
    }

    #[test]
    fn api_request_shaped_lines_never_panic_and_duplicates_are_refused(line in request_like()) {
        let parsed = parse_request(&line);
        let _ = start_line(&Nothing, &line);
        // A line with a key twice is never accepted.
        let keys: Vec<&str> = line.match_indices("\":").map(|(i, _)| {
            let start = line[..i].rfind('"').unwrap_or(0);
            &line[start..i]
        }).collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != keys.len() && !line.contains("[1,{") && !line.contains("\"op\":1}") {
            prop_assert!(parsed.is_err(), "{line} was accepted");
        }
    }

    #[test]
    fn configs_of_random_text_never_panic(text in "\\PC{0,300}") {
        if let Ok(cfg) = VmConfig::from_toml(&text) {
            let _ = cfg.validate();
            let _ = cfg.guest_args();
        }
    }

    #[test]
    fn config_shaped_toml_never_panics(
        lines in proptest::collection::vec(
            (
                prop_oneof![
                    Just("vcpus"), Just("vcpus-online"), Just("memory-mib"), Just("workload"),
                    Just("duration-ms"), Just("policy"), Just("seed"), Just("guest"), Just("args"),
                    Just("max-timers"), Just("timeout-ms"), Just("payload"), Just("seccomp"),
                    Just("bogus"),
                ],
                prop_oneof![
                    any::<i64>().prop_map(|n| n.to_string()),
                    any::<u64>().prop_map(|n| n.to_string()),
                    "\"[a-z =/\\.]{0,12}\"",
                    Just("true".to_string()),
                    Just("[\"a=b\", \"c\"]".to_string()),
                    Just("{ x = 1 }".to_string()),
                ],
            ),
            0..8,
        )
    ) {
        let text: String = lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        if let Ok(cfg) = VmConfig::from_toml(&text) {
            let _ = cfg.validate();
            let _ = cfg.guest_args();
            let _ = cfg.workload_label();
        }
    }
}

mod timer_device {
    //! The timer device's command decoder (`TimerDevice::command`), driven with random commands and
    //! random fields in the device pages, on a fake clock and anonymous guest memory.

    use super::*;
    use std::sync::Arc;

    use quietvm_vmm::accounting::KickReasons;
    use quietvm_vmm::devices::timer::{
        abi, CommandEffect, HaltPlan, TimerDevice, VcpuKicker, VcpuPort,
    };
    use tmigr::clock::{Clock, FakeClock};
    use tmigr::service::{Policy, ServiceConfig, TimerService};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const PAGES: u64 = 0x1000;
    const VCPUS: u32 = 3;
    const TIMERS: u32 = 6;

    #[derive(Debug, Clone)]
    enum Op {
        /// Writes id, flags and deadline (relative to now, may be in the past) to a vCPU's page and
        /// sends a command of the given size.
        Command {
            cpu: u32,
            size: u8,
            cmd: u32,
            id: u32,
            flags: u32,
            ahead: i64,
        },
        Advance(u64),
        Expire(u32),
        Halt(u32),
        Run(u32),
        RequestOffline(u32),
        Withdraw(u32),
        DoorbellInjected(u32),
        /// Queue mode: a guest-like submission entry (any op, id, flags and generation) published
        /// by bumping the ring's head.
        Submit {
            cpu: u32,
            op: u32,
            id: u32,
            flags: u32,
            gen: u32,
            ahead: i64,
        },
        /// Queue mode: any value written anywhere in the queue block and the rings of a page.
        Scribble {
            cpu: u32,
            off: u64,
            value: u64,
        },
        /// Queue mode: any value in a timer's state word.
        ScribbleWord {
            id: u32,
            value: u64,
        },
    }

    const STATES: u64 = 0x8_0000;

    /// What a hostile queue-mode guest does, besides everything `op` does (commands 8 and 9
    /// included).
    fn hostile_op() -> impl Strategy<Value = Op> {
        use quietvm_abi::queue as q;
        let cpu = 0..VCPUS;
        prop_oneof![
            6 => op(),
            3 => (cpu.clone(), prop_oneof![3 => 1u32..3, 1 => any::<u32>()], 0..TIMERS + 1,
                  prop_oneof![3 => 1u32..3, 1 => any::<u32>()], 0u32..8, -1_000_000i64..5_000_000)
                .prop_map(|(cpu, op, id, flags, gen, ahead)| Op::Submit { cpu, op, id, flags, gen, ahead }),
            1 => (cpu, q::OFF_QUEUES..0xe00u64, any::<u64>())
                .prop_map(|(cpu, off, value)| Op::Scribble { cpu, off: off & !7, value }),
            1 => (0..TIMERS, any::<u64>()).prop_map(|(id, value)| Op::ScribbleWord { id, value }),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        let cpu = 0..VCPUS;
        prop_oneof![
            6 => (cpu.clone(), prop_oneof![4 => Just(4u8), 1 => Just(1u8), 1 => Just(2u8)], 0u32..10,
                  prop_oneof![4 => 0..TIMERS + 1, 1 => any::<u32>()],
                  prop_oneof![4 => 1u32..3, 1 => any::<u32>()], -1_000_000i64..5_000_000)
                .prop_map(|(cpu, size, cmd, id, flags, ahead)| Op::Command { cpu, size, cmd, id, flags, ahead }),
            2 => (0u64..3_000_000).prop_map(Op::Advance),
            2 => cpu.clone().prop_map(Op::Expire),
            1 => cpu.clone().prop_map(Op::Halt),
            1 => cpu.clone().prop_map(Op::Run),
            1 => cpu.clone().prop_map(Op::RequestOffline),
            1 => cpu.clone().prop_map(Op::Withdraw),
            1 => cpu.prop_map(Op::DoorbellInjected),
        ]
    }

    /// Kicks go nowhere: the harness plays every vCPU thread itself.
    struct NoKicks;

    impl VcpuKicker for NoKicks {
        fn kick(&self, _: u32, _: KickReasons) {}
    }

    proptest! {
        #[test]
        fn random_commands_never_panic_and_keep_the_counts_consistent(
            policy in prop_oneof![Just(Policy::Local), Just(Policy::Push), Just(Policy::Pull)],
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            run(policy, ops, false)?;
        }

        /// docs/timer-abi.md, "A hostile guest in queue mode": rings, entries and state words full
        /// of anything never panic quietvm, never fire a timer early or more often than armed, and
        /// leave the hierarchy sound. (`cancelled` is the guest's own word in queue mode: a guest
        /// that lies about it only skews its own figure.)
        #[test]
        fn hostile_queues_never_panic_and_never_fire_early(
            policy in prop_oneof![Just(Policy::Local), Just(Policy::Push), Just(Policy::Pull)],
            ops in proptest::collection::vec(hostile_op(), 1..300),
        ) {
            run(policy, ops, true)?;
        }
    }

    fn run(policy: Policy, ops: Vec<Op>, queues: bool) -> Result<(), TestCaseError> {
        {
            let clock = Arc::new(FakeClock::new(1_000_000));
            let service = TimerService::new(
                ServiceConfig {
                    policy,
                    max_timers: TIMERS,
                    max_cpus: Some(VCPUS),
                    ..ServiceConfig::default()
                },
                Arc::clone(&clock),
                VCPUS,
            );
            let memory: GuestMemoryMmap =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            let mut device = TimerDevice::new(
                service,
                memory.clone(),
                PAGES,
                STATES,
                VCPUS,
                Arc::new(NoKicks),
            );
            if queues {
                device.offer_queues(quietvm_abi::queue::ClockParams::default());
            }
            let mut ports: Vec<VcpuPort> = (0..VCPUS).map(|c| device.attach(c)).collect();
            // A halted vCPU runs no guest code until it wakes (the VMM's contract).
            let mut halted = [false; VCPUS as usize];
            for op in ops {
                let now = clock.now_ns();
                match op {
                    Op::Command {
                        cpu,
                        size,
                        cmd,
                        id,
                        flags,
                        ahead,
                    } => {
                        if halted[cpu as usize] {
                            continue;
                        }
                        let page = PAGES + abi::DEVICE_PAGE_SIZE * u64::from(cpu);
                        let deadline = (now as i64 + ahead).max(0) as u64;
                        memory
                            .write_obj(id, GuestAddress(page + abi::OFF_ID))
                            .unwrap();
                        memory
                            .write_obj(flags, GuestAddress(page + abi::OFF_FLAGS))
                            .unwrap();
                        memory
                            .write_obj(deadline, GuestAddress(page + abi::OFF_DEADLINE))
                            .unwrap();
                        let port = &mut ports[cpu as usize];
                        if device.command(port, size, cmd) == CommandEffect::GoOffline {
                            device.go_offline(port);
                            device.come_online(port);
                        }
                        let _ = device.last_status(cpu);
                    }
                    Op::Advance(ns) => {
                        clock.advance(ns);
                    }
                    Op::Expire(cpu) | Op::DoorbellInjected(cpu) => {
                        if !halted[cpu as usize] {
                            let can_take = matches!(op, Op::DoorbellInjected(_));
                            let _ = device.before_entry(&mut ports[cpu as usize], can_take);
                        }
                    }
                    Op::Halt(cpu) => {
                        if !halted[cpu as usize] {
                            halted[cpu as usize] =
                                device.halt(&mut ports[cpu as usize]) != HaltPlan::Resume;
                        }
                    }
                    Op::Run(cpu) => {
                        if halted[cpu as usize] {
                            device.wake(&mut ports[cpu as usize], true, KickReasons::NONE);
                            halted[cpu as usize] = false;
                        }
                    }
                    Op::Submit {
                        cpu,
                        op,
                        id,
                        flags,
                        gen,
                        ahead,
                    } => {
                        use quietvm_abi::queue as q;
                        if halted[cpu as usize] {
                            continue;
                        }
                        let page = PAGES + abi::DEVICE_PAGE_SIZE * u64::from(cpu);
                        let head: u32 = memory
                            .read_obj(GuestAddress(page + q::OFF_Q_SUB_HEAD))
                            .unwrap();
                        let slot = page + q::sub_slot(head);
                        // A guest that plays fair also swaps the word; this one sometimes does.
                        let word: u64 = memory
                            .read_obj(GuestAddress(STATES + 8 * u64::from(id % TIMERS)))
                            .unwrap();
                        let state = quietvm_abi::queue::State(word);
                        let next = if op == q::OP_ARM {
                            state.armed()
                        } else {
                            state.cancelled()
                        };
                        if gen % 2 == 0 && id < TIMERS {
                            memory
                                .write_obj(next.0, GuestAddress(STATES + 8 * u64::from(id)))
                                .unwrap();
                        }
                        let deadline = (now as i64 + ahead).max(0) as u64;
                        memory.write_obj(op, GuestAddress(slot)).unwrap();
                        memory.write_obj(id, GuestAddress(slot + 4)).unwrap();
                        memory
                            .write_obj(next.gen().wrapping_add(gen / 2), GuestAddress(slot + 8))
                            .unwrap();
                        memory.write_obj(flags, GuestAddress(slot + 12)).unwrap();
                        memory.write_obj(deadline, GuestAddress(slot + 16)).unwrap();
                        memory.write_obj(now, GuestAddress(slot + 32)).unwrap();
                        memory
                            .write_obj(head.wrapping_add(1), GuestAddress(page + q::OFF_Q_SUB_HEAD))
                            .unwrap();
                    }
                    Op::Scribble { cpu, off, value } => {
                        let page = PAGES + abi::DEVICE_PAGE_SIZE * u64::from(cpu);
                        memory.write_obj(value, GuestAddress(page + off)).unwrap();
                    }
                    Op::ScribbleWord { id, value } => {
                        memory
                            .write_obj(value, GuestAddress(STATES + 8 * u64::from(id)))
                            .unwrap();
                    }
                    Op::RequestOffline(cpu) => device.request_offline(cpu),
                    Op::Withdraw(cpu) => {
                        let _ = device.withdraw_offline(cpu);
                    }
                }
                let c = device.timer_stats(clock.now_ns());
                prop_assert_eq!(c.early, 0, "a timer fired early");
                prop_assert!(c.fired <= c.armed, "fired {} > armed {}", c.fired, c.armed);
                if !queues {
                    prop_assert!(c.cancelled <= c.armed);
                }
            }
            prop_assert_eq!(device.check_hierarchy(), "ok");
        }
        Ok(())
    }
}

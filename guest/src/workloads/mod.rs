//! The workloads, chosen with `workload=NAME` (default `hello`). Each one ends the VM with exit code 0
//! if all of its checks passed, else 1, after a one-line summary `NAME: ok ...` or `NAME: FAIL ...`.
//! docs/guest.md describes each one, its arguments and its checks.

mod abi_check;
mod all_idle;
mod busy;
mod cancel_race;
mod hello;
mod hotplug;
mod idle_movable;
mod mixed;
mod never_ack;
mod periodic;
mod ping_pong;
mod rearm_heavy;
mod replay;
mod timers;
mod triple_fault;

use crate::checks;
use crate::runtime::device::Expired;
use crate::runtime::time::{self, MS};
use crate::runtime::{boot, vm};
use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

/// What every workload gets.
pub struct Env {
    pub cpu: u32,
    pub vcpus: u32,
    /// `duration_ms`, in ns (default 1000 ms).
    pub duration: u64,
    /// `seed` (default 1).
    pub seed: u64,
    /// The guest clock when this vCPU started the workload.
    pub start: u64,
}

impl Env {
    pub fn name(&self) -> &'static str {
        active().name
    }

    /// Timer ids `0 .. count` for the workload; ends the VM with a usage error if the device has fewer.
    pub fn ids(&self, count: u32) -> core::ops::Range<u32> {
        if count > time::workload_timers() {
            vm::usage_error(format_args!(
                "{}: needs {} timer ids, the device has {} (max_timers less one per vCPU)",
                self.name(),
                count,
                time::workload_timers()
            ));
        }
        0..count
    }

    /// `per_cpu` ids for each vCPU out of `0 .. per_cpu * vcpus`: vCPU `cpu`'s share.
    pub fn ids_of(&self, per_cpu: u32, cpu: u32) -> core::ops::Range<u32> {
        self.ids(per_cpu * self.vcpus);
        cpu * per_cpu..(cpu + 1) * per_cpu
    }
}

pub use crate::runtime::vm::arg_u64;

struct Workload {
    name: &'static str,
    run: fn(&Env) -> !,
    /// Callback for the workload's timers (runs in the doorbell handler, masked).
    on_timer: fn(&Expired),
}

static WORKLOADS: [Workload; 13] = [
    Workload {
        name: "hello",
        run: hello::run,
        on_timer: unexpected,
    },
    Workload {
        name: "timers",
        run: timers::run,
        on_timer: timers::on_timer,
    },
    Workload {
        name: "idle-movable",
        run: idle_movable::run,
        on_timer: periodic::on_timer,
    },
    Workload {
        name: "all-idle",
        run: all_idle::run,
        on_timer: periodic::on_timer,
    },
    Workload {
        name: "mixed",
        run: mixed::run,
        on_timer: periodic::on_timer,
    },
    Workload {
        name: "rearm-heavy",
        run: rearm_heavy::run,
        on_timer: rearm_heavy::on_timer,
    },
    Workload {
        name: "ping-pong",
        run: ping_pong::run,
        on_timer: ping_pong::on_timer,
    },
    Workload {
        name: "cancel-race",
        run: cancel_race::run,
        on_timer: cancel_race::on_timer,
    },
    Workload {
        name: "abi-check",
        run: abi_check::run,
        on_timer: abi_check::on_timer,
    },
    Workload {
        name: "triple-fault",
        run: triple_fault::run,
        on_timer: unexpected,
    },
    Workload {
        name: "never-ack",
        run: never_ack::run,
        on_timer: never_ack::on_timer,
    },
    Workload {
        name: "hotplug",
        run: hotplug::run,
        on_timer: periodic::on_timer,
    },
    Workload {
        name: "replay",
        run: replay::run,
        on_timer: replay::on_timer,
    },
];

/// Index of the running workload in WORKLOADS (every vCPU stores the same).
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

fn active() -> &'static Workload {
    &WORKLOADS[ACTIVE.load(Ordering::Relaxed)]
}

/// Picks the workload from the arguments and runs it on this vCPU.
pub fn run(cpu: u32) -> ! {
    let info = boot::info();
    let name = boot::arg("workload").unwrap_or("hello");
    let Some(index) = WORKLOADS.iter().position(|w| w.name == name) else {
        struct Names;
        impl fmt::Display for Names {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                WORKLOADS.iter().try_for_each(|w| write!(f, " {}", w.name))
            }
        }
        vm::usage_error(format_args!(
            "guest: unknown workload '{}'; known:{}",
            name, Names
        ))
    };
    ACTIVE.store(index, Ordering::Relaxed);
    checks::set_workload_name(&WORKLOADS[index].name);
    let env = Env {
        cpu,
        vcpus: info.vcpus,
        duration: arg_u64("duration_ms", 1000).saturating_mul(MS),
        seed: arg_u64("seed", 1),
        start: 0,
    };
    let env = Env {
        start: time::now(),
        ..env
    };
    (WORKLOADS[index].run)(&env)
}

/// Runs the workload's callback for an expired timer.
pub fn on_timer(expired: &Expired) {
    (active().on_timer)(expired)
}

fn unexpected(expired: &Expired) {
    checks::fail!(
        "unexpected timer {} fired (owner {})",
        expired.id,
        expired.owner
    );
}

/// Prints the summary line and ends the VM: `NAME: ok DETAILS`, or `NAME: FAIL <first error> (N errors)
/// DETAILS` with exit code 1 if any check failed.
pub fn finish(env: &Env, details: fmt::Arguments) -> ! {
    let errors = checks::errors();
    if errors == 0 {
        println!("{}: ok {}", env.name(), details);
        vm::exit(vm::EXIT_OK)
    }
    checks::with_first_error(|first| {
        println!(
            "{}: FAIL {} ({} failed checks) {}",
            env.name(),
            first,
            errors,
            details
        )
    });
    vm::exit(vm::EXIT_FAIL)
}

//! `hello`: every vCPU says hello and halts for good; the last one to arrive ends the VM.
//! Checks that all vCPUs start, reach ring 3, print, and survive the halt path.

use super::Env;
use crate::runtime::vm;
use core::sync::atomic::{AtomicU32, Ordering};

static ARRIVED: AtomicU32 = AtomicU32::new(0);

pub fn run(env: &Env) -> ! {
    println!("hello from vCPU {} of {}", env.cpu, env.vcpus);
    if ARRIVED.fetch_add(1, Ordering::AcqRel) + 1 == env.vcpus {
        super::finish(env, format_args!("{} vCPUs", env.vcpus));
    }
    vm::halt_forever()
}

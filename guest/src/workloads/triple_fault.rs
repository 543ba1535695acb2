//! `triple-fault`: vCPU 0 triple-faults on purpose (the others halt), to test quietvm's crash handling:
//! quietvm must end with exit code 100. Exit code 0 is impossible here.

use super::Env;
use crate::arch;
use crate::runtime::vm;

pub fn run(env: &Env) -> ! {
    if env.cpu == 0 {
        println!("triple-fault: faulting on purpose");
        arch::triple_fault();
    }
    vm::halt_forever()
}

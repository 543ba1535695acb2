//! Decodes bytes into a configuration and an operation sequence
//! (`tmigr::model::ops_from_bytes`, the decoder the unit tests also run on
//! fixed byte strings) and drives the timer service against the reference
//! model; any check failure panics.
//!
//! Run: `cd fuzz && cargo +nightly fuzz run ops_vs_model`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tmigr::model::{ops_from_bytes, Sim};

fuzz_target!(|data: &[u8]| {
    let (cfg, ops) = ops_from_bytes(data, 64);
    if let Err(e) = Sim::run(&cfg, &ops) {
        panic!("{cfg:?}\n{e}");
    }
});

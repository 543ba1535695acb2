//! `replay`: re-enacts a real Linux machine's timers, recorded with `quietvm trace-host` and converted
//! with `quietvm replay TRACE --guest-out FILE` into a compact form that quietvm places in guest memory
//! (the config's `payload`; the format is in the host's `src/replay/guest.rs`). vCPU `c` plays trace
//! CPU `c`: it runs (spins) where the trace's CPU ran and halts where it was idle, and arms and cancels
//! the trace's timers at the trace's times (relative to a start shared by all vCPUs), pinned or movable
//! as the trace says. So the timer pattern of a real machine drives real KVM under every policy.
//!
//! Left out: deferrable timers (the device has no such kind; counted as `deferrable_skipped`), and the
//! trace beyond `duration_ms`. The VM needs at least as many vCPUs as the trace has CPUs (the extra
//! ones only halt) and `max_timers` above the trace's timers plus one per vCPU.
//!
//! Checks (checks.rs): every arming fires at most once, never early, pinned ones on their owner;
//! cancelled ones never fire; at the end vCPU 0 cancels what is still pending and checks that every
//! arming was resolved exactly one way.

use super::Env;
use crate::checks;
use crate::runtime::device::{Expired, MOVABLE, PINNED};
use crate::runtime::time::{self, US};
use crate::runtime::{boot, vm};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const HEADER_LEN: usize = 32;
const OP_LEN: usize = 16;
const IDLE_ENTER: u8 = 1;
const IDLE_EXIT: u8 = 2;
const ARM: u8 = 3;
const CANCEL: u8 = 4;
const FLAG_PINNED: u8 = 1;
const FLAG_DEFERRABLE: u8 = 2;

/// The shared start (guest ns), published by vCPU 0 once the book exists.
static START: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicU32 = AtomicU32::new(0);
static DEFERRABLE_SKIPPED: AtomicU64 = AtomicU64::new(0);
static OPS_DONE: AtomicU64 = AtomicU64::new(0);

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

struct Trace {
    cpus: u32,
    timers: u32,
    ops: &'static [u8],
    duration: u64,
}

/// The payload, checked; a missing or malformed one is a usage error.
fn trace() -> Trace {
    let Some(p) = boot::payload() else {
        vm::usage_error(format_args!(
            "replay: no payload: set `payload` in the VM config to a file written by \
             `quietvm replay TRACE --guest-out FILE`"
        ))
    };
    if p.len() < HEADER_LEN || &p[0..4] != b"QVRP" || u16_at(p, 4) != 1 {
        vm::usage_error(format_args!(
            "replay: the payload is not a version-1 replay (QVRP)"
        ));
    }
    let ops = u32_at(p, 12) as usize;
    if p.len() != HEADER_LEN + ops * OP_LEN {
        vm::usage_error(format_args!(
            "replay: the payload holds {} bytes, its header says {} operations",
            p.len(),
            ops
        ));
    }
    Trace {
        cpus: u32::from(u16_at(p, 6)),
        timers: u32_at(p, 8),
        ops: &p[HEADER_LEN..],
        duration: u64_at(p, 16).saturating_mul(US),
    }
}

/// Runs (busy) or halts, as the trace's CPU did, until `at`.
fn until(idle: bool, at: u64) {
    if idle {
        time::sleep_until(at);
    } else {
        time::spin_until(at);
    }
}

pub fn run(env: &Env) -> ! {
    let t = trace();
    if env.vcpus < t.cpus {
        vm::usage_error(format_args!(
            "replay: the trace has {} CPUs, the VM only {} vCPUs",
            t.cpus, env.vcpus
        ));
    }
    let ids = env.ids(t.timers);
    if env.cpu == 0 {
        checks::create_book();
        START.store(time::now() + time::MS, Ordering::Release);
    }
    let start = loop {
        let s = START.load(Ordering::Acquire);
        if s != 0 {
            break s;
        }
        crate::arch::pause();
    };
    let book = checks::book();
    let end = start + t.duration.min(env.duration);
    // vCPUs beyond the trace's CPUs only halt.
    let mut idle = env.cpu >= t.cpus;
    let mut done = 0u64;
    for op in t.ops.chunks_exact(OP_LEN) {
        if u32::from(u16_at(op, 4)) != env.cpu {
            continue;
        }
        let at = start + u64::from(u32_at(op, 0)) * US;
        if at >= end {
            break;
        }
        until(idle, at);
        let (kind, flags, id) = (op[6], op[7], u32_at(op, 8));
        if (kind == ARM || kind == CANCEL) && !ids.contains(&id) {
            checks::fail!("replay: timer id {} beyond the header's {}", id, t.timers);
            continue;
        }
        match kind {
            IDLE_ENTER => idle = true,
            IDLE_EXIT => idle = false,
            ARM if flags & FLAG_DEFERRABLE != 0 => {
                DEFERRABLE_SKIPPED.fetch_add(1, Ordering::Relaxed);
            }
            ARM => {
                let kind = if flags & FLAG_PINNED != 0 {
                    PINNED
                } else {
                    MOVABLE
                };
                let timeout = u64::from(u32_at(op, 12)) * US;
                book.arm(id, kind, at + timeout, timeout);
            }
            CANCEL => {
                book.cancel(id);
            }
            k => checks::fail!("replay: unknown operation kind {}", k),
        }
        done += 1;
    }
    until(idle, end);
    OPS_DONE.fetch_add(done, Ordering::Relaxed);
    DONE.fetch_add(1, Ordering::AcqRel);
    if env.cpu != 0 {
        vm::halt_forever();
    }
    while DONE.load(Ordering::Acquire) < env.vcpus {
        crate::arch::pause();
    }
    // Stop what is still pending (armed for after the end), then check every arming.
    for id in ids.clone() {
        book.cancel_sync(id);
    }
    book.check_quiescent(ids);
    super::finish(
        env,
        format_args!(
            "trace_cpus={} timers={} ops={} deferrable_skipped={} {}",
            t.cpus,
            t.timers,
            OPS_DONE.load(Ordering::Relaxed),
            DEFERRABLE_SKIPPED.load(Ordering::Relaxed),
            book.summary()
        ),
    )
}

pub fn on_timer(expired: &Expired) {
    let _callback = checks::book().enter(expired);
}

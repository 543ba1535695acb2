//! The compact form of a replay for the built-in guest's `replay` workload (`quietvm replay TRACE
//! --guest-out FILE`), which re-enacts the trace's timers on the VM's vCPUs: quietvm places the file in
//! guest memory (the config's `payload`, docs/boot.md) and the guest reads it there.
//!
//! Little endian. A 32-byte header, then one 16-byte record per operation, in time order:
//!
//! | offset | type | header field |
//! | --- | --- | --- |
//! | 0x00 | `[u8; 4]` | magic `QVRP` |
//! | 0x04 | u16 | version 1 |
//! | 0x06 | u16 | CPUs of the trace (the VM needs at least as many vCPUs) |
//! | 0x08 | u32 | timer ids used: `0 .. timers` |
//! | 0x0c | u32 | operations |
//! | 0x10 | u64 | the trace's length, microseconds |
//! | 0x18 | u64 | reserved, 0 |
//!
//! | offset | type | operation field |
//! | --- | --- | --- |
//! | 0 | u32 | time, microseconds since the trace's first event |
//! | 4 | u16 | the CPU that does it |
//! | 6 | u8 | kind: 1 idle enter, 2 idle exit, 3 arm, 4 cancel |
//! | 7 | u8 | arm flags: 1 pinned, 2 deferrable |
//! | 8 | u32 | timer id (arm, cancel) |
//! | 12 | u32 | arm: deadline minus time, microseconds (rounded up, at least 1) |
//!
//! CPUs idle when the trace began get an idle enter at time 0. An arm is done by the CPU whose wheel the timer was queued on (the device arms on the calling
//! vCPU). The late `cpu_idle` exit after an interrupt in idle is left out.

use super::timeline::{OpKind, Timeline};

pub const MAGIC: [u8; 4] = *b"QVRP";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 32;
pub const OP_LEN: usize = 16;
pub const IDLE_ENTER: u8 = 1;
pub const IDLE_EXIT: u8 = 2;
pub const ARM: u8 = 3;
pub const CANCEL: u8 = 4;
pub const FLAG_PINNED: u8 = 1;
pub const FLAG_DEFERRABLE: u8 = 2;

fn us_floor(ns: u64) -> u64 {
    ns / 1_000
}

/// Encodes `tl` for the guest.
pub fn encode(tl: &Timeline) -> Result<Vec<u8>, String> {
    if tl.cpus > u32::from(u16::MAX) {
        return Err(format!("{} CPUs do not fit the guest form", tl.cpus));
    }
    if us_floor(tl.end) > u64::from(u32::MAX) {
        return Err("the trace is too long for the guest form (at most 4294 s)".to_string());
    }
    let mut ops = Vec::with_capacity(tl.ops.len() * OP_LEN);
    let mut n = 0u32;
    // CPUs idle when the trace began go idle at time 0.
    for (cpu, _) in tl.initially_idle.iter().enumerate().filter(|(_, &i)| i) {
        ops.extend_from_slice(&0u32.to_le_bytes());
        ops.extend_from_slice(&(cpu as u16).to_le_bytes());
        ops.extend_from_slice(&[IDLE_ENTER, 0]);
        ops.extend_from_slice(&[0; 8]);
        n += 1;
    }
    for op in &tl.ops {
        let t = us_floor(op.t) as u32;
        let (cpu, kind, flags, id, after) = match op.kind {
            OpKind::IdleEnter => (op.cpu, IDLE_ENTER, 0, 0, 0),
            OpKind::IdleExit { .. } => (op.cpu, IDLE_EXIT, 0, 0, 0),
            OpKind::IdleExitLate => continue,
            OpKind::Arm {
                id,
                base,
                deadline,
                kind,
                deferrable,
                ..
            } => {
                let after = deadline.saturating_sub(op.t).div_ceil(1_000).max(1);
                let mut flags = 0;
                if kind == tmigr::service::TimerKind::Pinned {
                    flags |= FLAG_PINNED;
                }
                if deferrable {
                    flags |= FLAG_DEFERRABLE;
                }
                (base, ARM, flags, id, after.min(u64::from(u32::MAX)) as u32)
            }
            OpKind::Cancel { id } => (op.cpu, CANCEL, 0, id, 0),
        };
        ops.extend_from_slice(&t.to_le_bytes());
        ops.extend_from_slice(&(cpu as u16).to_le_bytes());
        ops.push(kind);
        ops.push(flags);
        ops.extend_from_slice(&id.to_le_bytes());
        ops.extend_from_slice(&after.to_le_bytes());
        n += 1;
    }
    let mut out = Vec::with_capacity(HEADER_LEN + ops.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tl.cpus as u16).to_le_bytes());
    out.extend_from_slice(&tl.timers.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&us_floor(tl.end).to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&ops);
    Ok(out)
}

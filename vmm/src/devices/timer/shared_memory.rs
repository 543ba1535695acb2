//! What the timer device reads and writes in guest memory: each vCPU's device page (the command
//! block, `control`, the window block, the queue block and its two rings) and the per-timer state
//! words (docs/timer-abi.md, "Queue mode"). Everything here is hostile input: reads copy a value out
//! once and the caller validates it; nothing is ever borrowed from guest memory beyond one atomic.

use std::mem::offset_of;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use quietvm_abi::queue::{self as q, DeliveryEntry, State, SubEntry};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory};

use quietvm_abi::timer as abi;

const ENTRY_BYTES: usize = 48;
const _: () = assert!(std::mem::size_of::<SubEntry>() == ENTRY_BYTES);
const _: () = assert!(std::mem::size_of::<DeliveryEntry>() == ENTRY_BYTES);

fn u32_at(b: &[u8; ENTRY_BYTES], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; ENTRY_BYTES], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// A submission entry from its wire bytes (docs/timer-abi.md: `op`, `id`, `gen`, `flags`,
/// `deadline`, `slack`, `at`).
fn decode_sub_entry(b: &[u8; ENTRY_BYTES]) -> SubEntry {
    SubEntry {
        op: u32_at(b, 0),
        id: u32_at(b, 4),
        gen: u32_at(b, 8),
        flags: u32_at(b, 12),
        deadline: u64_at(b, 16),
        slack: u64_at(b, 24),
        at: u64_at(b, 32),
        reserved: 0,
    }
}

/// A delivery entry's wire bytes.
fn encode_delivery_entry(e: &DeliveryEntry) -> [u8; ENTRY_BYTES] {
    let mut b = [0u8; ENTRY_BYTES];
    b[0..4].copy_from_slice(&e.id.to_le_bytes());
    b[4..8].copy_from_slice(&e.owner.to_le_bytes());
    b[8..12].copy_from_slice(&e.gen.to_le_bytes());
    b[16..24].copy_from_slice(&e.deadline.to_le_bytes());
    b[24..32].copy_from_slice(&e.slack.to_le_bytes());
    b[32..40].copy_from_slice(&e.fired_at.to_le_bytes());
    b
}

/// The device's window on guest memory.
#[derive(Clone)]
pub(super) struct SharedMemory {
    memory: GuestMemoryMmap,
    device_pages: u64,
    timer_states: u64,
    max_timers: u32,
}

impl SharedMemory {
    /// `device_pages` and `timer_states` were placed inside guest memory by the layout (vm::layout).
    pub(super) fn new(
        memory: GuestMemoryMmap,
        device_pages: u64,
        timer_states: u64,
        max_timers: u32,
    ) -> Self {
        SharedMemory {
            memory,
            device_pages,
            timer_states,
            max_timers,
        }
    }

    fn page(&self, cpu: u32) -> u64 {
        self.device_pages + abi::DEVICE_PAGE_SIZE * u64::from(cpu)
    }

    pub(super) fn read_u32(&self, cpu: u32, off: u64) -> u32 {
        self.memory
            .read_obj(GuestAddress(self.page(cpu) + off))
            .unwrap_or(0)
    }

    pub(super) fn read_u64(&self, cpu: u32, off: u64) -> u64 {
        self.memory
            .read_obj(GuestAddress(self.page(cpu) + off))
            .unwrap_or(0)
    }

    pub(super) fn write<T: vm_memory::ByteValued>(&self, cpu: u32, off: u64, v: T) {
        // The pages lie inside guest memory by construction (vm::layout); a failure cannot happen.
        let _ = self.memory.write_obj(v, GuestAddress(self.page(cpu) + off));
    }

    /// Runs `f` on the naturally aligned atomic at guest address `addr`; `None` if there is none.
    fn with_atomic<T: vm_memory::AtomicInteger, R>(
        &self,
        addr: u64,
        f: impl FnOnce(&T) -> R,
    ) -> Option<R> {
        let slice = self
            .memory
            .get_slice(GuestAddress(addr), std::mem::size_of::<T>())
            .ok()?;
        let atomic = slice.get_atomic_ref::<T>(0).ok()?;
        Some(f(atomic))
    }

    fn load_u32(&self, cpu: u32, off: u64) -> u32 {
        self.with_atomic(self.page(cpu) + off, |a: &AtomicU32| {
            a.load(Ordering::SeqCst)
        })
        .unwrap_or(0)
    }

    fn store_u32(&self, cpu: u32, off: u64, v: u32) {
        self.with_atomic(self.page(cpu) + off, |a: &AtomicU32| {
            a.store(v, Ordering::SeqCst)
        });
    }

    /// Runs `f` on the state word of timer `id`; `None` for an id out of range (callers validate).
    pub(super) fn with_word<R>(&self, id: u32, f: impl FnOnce(&AtomicU64) -> R) -> Option<R> {
        if id >= self.max_timers {
            return None;
        }
        self.with_atomic(self.timer_states + 8 * u64::from(id), f)
    }

    /// Timer `id`'s state word now (an unreadable word reads as 0: idle).
    pub(super) fn state(&self, id: u32) -> State {
        State(
            self.with_word(id, |w| w.load(Ordering::SeqCst))
                .unwrap_or(0),
        )
    }

    // ---- Queue mode ------------------------------------------------------------------------------

    /// Turns on the queue block of `cpu`'s page: indices from 0, no horizon yet, the clock.
    pub(super) fn enable_queues(&self, cpu: u32, clock: q::ClockParams) {
        self.write(cpu, q::OFF_Q_SUB_TAIL, 0u32);
        self.write(cpu, q::OFF_Q_DLV_HEAD, 0u32);
        self.write(cpu, q::OFF_Q_HORIZON, 0u64);
        let params = q::OFF_Q_CLOCK;
        self.write(
            cpu,
            params + offset_of!(q::ClockParams, tsc_base) as u64,
            clock.tsc_base,
        );
        self.write(
            cpu,
            params + offset_of!(q::ClockParams, ns_per_tick_q32) as u64,
            clock.ns_per_tick_q32,
        );
        fence(Ordering::Release);
        self.write(cpu, params, clock.version);
        fence(Ordering::Release);
        self.write(cpu, q::OFF_Q_ENABLED, 1u32);
    }

    /// The guest's producer index of `cpu`'s submission ring.
    pub(super) fn sub_head(&self, cpu: u32) -> u32 {
        self.load_u32(cpu, q::OFF_Q_SUB_HEAD)
    }

    /// Submission entry `index` of `cpu`'s ring, copied out (after the head was read).
    pub(super) fn sub_entry(&self, cpu: u32, index: u32) -> SubEntry {
        fence(Ordering::Acquire);
        let mut bytes = [0u8; ENTRY_BYTES];
        match self.memory.read_slice(
            &mut bytes,
            GuestAddress(self.page(cpu) + q::sub_slot(index)),
        ) {
            Ok(()) => decode_sub_entry(&bytes),
            Err(_) => SubEntry::default(),
        }
    }

    pub(super) fn set_sub_tail(&self, cpu: u32, tail: u32) {
        self.store_u32(cpu, q::OFF_Q_SUB_TAIL, tail);
    }

    /// Publishes `horizon`, then (a full fence: the handshake of docs/timer-abi.md) reads the
    /// submission ring's head again.
    pub(super) fn publish_horizon(&self, cpu: u32, horizon: u64) -> u32 {
        self.with_atomic(self.page(cpu) + q::OFF_Q_HORIZON, |a: &AtomicU64| {
            a.store(horizon, Ordering::SeqCst)
        });
        fence(Ordering::SeqCst);
        self.sub_head(cpu)
    }

    /// The guest's consumer index of `cpu`'s delivery ring.
    pub(super) fn dlv_tail(&self, cpu: u32) -> u32 {
        self.load_u32(cpu, q::OFF_Q_DLV_TAIL)
    }

    /// Writes delivery entry `index` of `cpu`'s ring (not yet published).
    pub(super) fn put_delivery(&self, cpu: u32, index: u32, entry: DeliveryEntry) {
        let _ = self.memory.write_slice(
            &encode_delivery_entry(&entry),
            GuestAddress(self.page(cpu) + q::delivery_slot(index)),
        );
    }

    /// Publishes the entries written so far: the delivery ring's new head.
    pub(super) fn set_dlv_head(&self, cpu: u32, head: u32) {
        fence(Ordering::Release);
        self.store_u32(cpu, q::OFF_Q_DLV_HEAD, head);
    }
}

//! A bump allocator over the free memory quietvm hands the guest (`free_base .. mem_size`, zeroed, and
//! mapped lazily so untouched pages cost nothing). Nothing is ever freed.

use super::boot;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Types whose all-zero bit pattern is a valid value (the arena hands out zeroed memory).
///
/// # Safety
/// Implement only for types for which all-zero bytes are a valid, meaningful value.
pub unsafe trait Zeroable {}

// SAFETY: zero is a valid value of each.
unsafe impl Zeroable for AtomicBool {}
// SAFETY: as above.
unsafe impl Zeroable for AtomicU32 {}
// SAFETY: as above.
unsafe impl Zeroable for AtomicU64 {}
// SAFETY: as above.
unsafe impl Zeroable for u64 {}
// SAFETY: as above.
unsafe impl Zeroable for u32 {}

/// Next free address; 0 until the first allocation picks up `free_base`.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Reserves `size` bytes aligned to `align` (a power of two), for good.
fn reserve(size: usize, align: usize) -> usize {
    let info = boot::info();
    let align = align.max(64); // a cache line: no false sharing between allocations
    let _ = NEXT.compare_exchange(
        0,
        info.free_base as usize,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let mut start = 0;
    NEXT.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |next| {
        start = (next + align - 1) & !(align - 1);
        Some(start + size)
    })
    .expect("the closure always returns Some");
    assert!(
        start + size <= info.mem_size as usize,
        "arena: out of guest memory ({} bytes wanted)",
        size
    );
    start
}

/// `count` zeroed values of `T`, for the rest of the VM's life.
pub fn alloc<T: Zeroable>(count: usize) -> &'static [T] {
    let size = core::mem::size_of::<T>()
        .checked_mul(count)
        .expect("arena: size overflow");
    let start = reserve(size, core::mem::align_of::<T>());
    // SAFETY: [start, start + size) is zeroed guest memory handed to no one else (the bump pointer moved
    // past it), aligned for T; all-zero is a valid T.
    unsafe { core::slice::from_raw_parts(start as *const T, count) }
}

/// `count` zeroed values of `T` that one owner mutates (behind a lock of its own), for the rest of the
/// VM's life.
pub fn alloc_mut<T: Zeroable>(count: usize) -> &'static mut [T] {
    let size = core::mem::size_of::<T>()
        .checked_mul(count)
        .expect("arena: size overflow");
    let start = reserve(size, core::mem::align_of::<T>());
    // SAFETY: as in `alloc`; and nobody else has a reference to this fresh range, so it may be `mut`.
    unsafe { core::slice::from_raw_parts_mut(start as *mut T, count) }
}

/// As `alloc`, starting on a 4 KiB page boundary (for structures quietvm finds by page number).
pub fn alloc_page_aligned<T: Zeroable>(count: usize) -> &'static [T] {
    let size = core::mem::size_of::<T>()
        .checked_mul(count)
        .expect("arena: size overflow");
    let start = reserve(size, 4096.max(core::mem::align_of::<T>()));
    // SAFETY: as in `alloc`.
    unsafe { core::slice::from_raw_parts(start as *const T, count) }
}

/// Free memory not handed out yet, in bytes.
pub fn remaining() -> usize {
    let info = boot::info();
    let next = match NEXT.load(Ordering::Relaxed) {
        0 => info.free_base as usize,
        n => n,
    };
    (info.mem_size as usize).saturating_sub(next)
}

/// Moves `value` into the arena.
pub fn leak<T>(value: T) -> &'static T {
    let start = reserve(core::mem::size_of::<T>(), core::mem::align_of::<T>()) as *mut T;
    // SAFETY: fresh memory, aligned for T, handed to no one else.
    unsafe {
        start.write(value);
        &*start
    }
}

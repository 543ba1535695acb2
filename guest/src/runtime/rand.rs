//! A small PRNG (SplitMix64), seeded from the `seed` argument so that runs are repeatable.

pub struct Rng(u64);

impl Rng {
    /// A generator for `stream` (e.g. the vCPU index) of `seed`.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = Rng(seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        rng.next_u64();
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (hi > lo).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// A generator whose state lives in shared memory (for callbacks, which keep no state between runs).
/// One user at a time: e.g. one slot per vCPU, used only by that vCPU's callbacks.
pub fn with_state<R>(state: &core::sync::atomic::AtomicU64, f: impl FnOnce(&mut Rng) -> R) -> R {
    use core::sync::atomic::Ordering;
    let mut rng = Rng(state.load(Ordering::Relaxed));
    let result = f(&mut rng);
    state.store(rng.0, Ordering::Relaxed);
    result
}

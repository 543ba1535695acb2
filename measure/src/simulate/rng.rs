//! A tiny deterministic PRNG (splitmix64): the simulator needs reproducible draws, not a crate.
//!
//! Draws are keyed by what they are for (a timer and its arming count, a vCPU and its burst count)
//! rather than taken from one global stream, so every policy sees the same guest behaviour: timer 7's
//! third period is the same number under `local`, `push` and `pull`, even though the three runs
//! expire timers in different orders.

/// splitmix64's output function: a bijective mix of 64 bits.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A splitmix64 stream.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// The stream for draw number `n` of subject `subject` (a timer, a vCPU) in the run seeded `seed`.
    pub fn keyed(seed: u64, subject: u64, n: u64) -> Self {
        Rng(mix64(
            seed ^ mix64(subject.wrapping_add(0x9e37_79b9_7f4a_7c15)) ^ mix64(!n),
        ))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// Uniform in `lo..=hi` (`lo <= hi`). The modulo bias is below 2^-40 for the ranges used here.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        debug_assert!(lo <= hi);
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// A uniform index in `0..n` (`n > 0`).
    pub fn index(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = {
            let mut r = Rng::keyed(1, 7, 3);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let mut r = Rng::keyed(1, 7, 3);
        assert_eq!(a, (0..4).map(|_| r.next_u64()).collect::<Vec<_>>());
        assert_ne!(Rng::keyed(1, 7, 4).next_u64(), a[0]);
        assert_ne!(Rng::keyed(2, 7, 3).next_u64(), a[0]);
        assert_ne!(Rng::keyed(1, 8, 3).next_u64(), a[0]);
    }

    #[test]
    fn range_stays_inside_its_bounds() {
        let mut r = Rng::keyed(9, 0, 0);
        for _ in 0..10_000 {
            let v = r.range(1_000, 10_000);
            assert!((1_000..=10_000).contains(&v));
        }
        assert_eq!(r.range(5, 5), 5);
    }
}

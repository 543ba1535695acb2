//! Real work for busy vCPUs, with a result to check: counting primes with a sieve (ring 3, native,
//! SSE and all; doorbell upcalls interrupt it at any instruction).

/// Primes below 100 000, and below 20 000.
pub const PRIMES_100K: u32 = 9592;
pub const PRIMES_20K: u32 = 2262;

/// The number of primes below `n` (n <= 100 000; the bitmap lives on the stack).
pub fn count_primes(n: usize) -> u32 {
    const WORDS: usize = 100_000 / 64 + 1;
    assert!(n <= 100_000);
    let mut composite = [0u64; WORDS];
    let mut count = 0;
    for i in 2..n {
        if composite[i / 64] & (1 << (i % 64)) == 0 {
            count += 1;
            let mut j = i * i;
            while j < n {
                composite[j / 64] |= 1 << (j % 64);
                j += i;
            }
        }
    }
    count
}

/// One unit of checked work (about a millisecond natively); false if the result was wrong.
pub fn work_unit() -> bool {
    count_primes(core::hint::black_box(100_000)) == PRIMES_100K
}

/// A short unit (about a fifth of `work_unit`).
pub fn short_unit() -> bool {
    count_primes(core::hint::black_box(20_000)) == PRIMES_20K
}

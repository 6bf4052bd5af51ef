//! Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11; the generator of
//! cuRAND and PyTorch's CUDA backend). A draw is a pure function of (key, counter), so the
//! same element gets the same number on any thread, device or after a resume.
//!
//! Keys are built from (seed, purpose); counters from (step, site, element index). Nothing
//! in the crate uses a global or stateful RNG.

/// What a stream of random numbers is for; mixed into the key so streams never overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Purpose {
    /// Initial parameter values.
    Init = 0x1A17,
    /// The initial random word -> cell allocation.
    Allocation = 0xA110,
    /// Dropout masks.
    Dropout = 0xD209,
    /// Synthetic corpora (benchmarks, tests).
    Corpus = 0xC02B,
    /// Anything else a caller derives (sampling, shuffles).
    Other = 0x07E2,
}

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds: 128-bit counter -> 128 random bits.
#[inline(always)]
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for _ in 0..10 {
        let p0 = (M0 as u64) * (c0 as u64);
        let p1 = (M1 as u64) * (c2 as u64);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        let n0 = hi1 ^ c1 ^ k0;
        let n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
        k0 = k0.wrapping_add(W0);
        k1 = k1.wrapping_add(W1);
    }
    [c0, c1, c2, c3]
}

/// A (seed, purpose) key with a 64-bit stream id and a 64-bit position inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Philox {
    key: [u32; 2],
}

impl Philox {
    pub fn new(seed: u64, purpose: Purpose) -> Self {
        let lo = seed as u32;
        let hi = (seed >> 32) as u32 ^ (purpose as u32).wrapping_mul(0x9E37_79B9);
        Self { key: [lo, hi] }
    }

    /// The 64-bit key (what a device kernel needs to draw the same numbers).
    pub fn key(&self) -> [u32; 2] {
        self.key
    }

    /// Four 32-bit draws at `position` (in blocks of four) of `stream`.
    #[inline(always)]
    pub fn block(&self, stream: u64, position: u64) -> [u32; 4] {
        philox4x32(
            [
                position as u32,
                (position >> 32) as u32,
                stream as u32,
                (stream >> 32) as u32,
            ],
            self.key,
        )
    }

    /// The `index`-th 32-bit draw of `stream`.
    #[inline(always)]
    pub fn u32_at(&self, stream: u64, index: u64) -> u32 {
        self.block(stream, index >> 2)[(index & 3) as usize]
    }

    /// A sequential reader over one stream.
    pub fn stream(&self, stream: u64) -> PhiloxStream {
        PhiloxStream {
            philox: *self,
            stream,
            next: 0,
            buf: [0; 4],
            used: 4,
        }
    }
}

/// Uniform float in [0, 1) from 24 random bits (exactly representable in f32).
#[inline(always)]
pub fn unit_f32(x: u32) -> f32 {
    (x >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Uniform float in [0, 1) from 53 random bits.
#[inline(always)]
pub fn unit_f64(hi: u32, lo: u32) -> f64 {
    let bits = ((hi as u64) << 21) ^ (lo as u64 >> 11);
    (bits & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
}

/// Sequential draws from one Philox stream (for set-up work such as initialisation).
#[derive(Clone, Debug)]
pub struct PhiloxStream {
    philox: Philox,
    stream: u64,
    next: u64,
    buf: [u32; 4],
    used: usize,
}

impl PhiloxStream {
    pub fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            self.buf = self.philox.block(self.stream, self.next);
            self.next += 1;
            self.used = 0;
        }
        self.used += 1;
        self.buf[self.used - 1]
    }

    pub fn next_u64(&mut self) -> u64 {
        ((self.next_u32() as u64) << 32) | self.next_u32() as u64
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        let hi = self.next_u32();
        let lo = self.next_u32();
        unit_f64(hi, lo)
    }

    /// Uniform integer in [0, n) without modulo bias (Lemire's method), n > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        loop {
            let x = self.next_u64();
            let m = (x as u128) * (n as u128);
            let lo = m as u64;
            if lo >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer tests from the Random123 distribution (kat_vectors, philox4x32_10).
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let g = Philox::new(42, Purpose::Dropout);
        let a: Vec<u32> = (0..10).map(|i| g.u32_at(3, i)).collect();
        let mut s = g.stream(3);
        let b: Vec<u32> = (0..10).map(|_| s.next_u32()).collect();
        assert_eq!(a, b);
        let other = Philox::new(42, Purpose::Init);
        assert_ne!(a[0], other.u32_at(3, 0));
        let mean: f64 = (0..100_000)
            .map(|i| unit_f32(g.u32_at(0, i)) as f64)
            .sum::<f64>()
            / 1e5;
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
    }

    #[test]
    fn below_is_in_range_and_shuffle_is_a_permutation() {
        let mut s = Philox::new(1, Purpose::Other).stream(0);
        for n in [1u64, 2, 3, 7, 1000, u64::MAX] {
            for _ in 0..100 {
                assert!(s.below(n) < n);
            }
        }
        let mut v: Vec<usize> = (0..1000).collect();
        s.shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(v, sorted);
    }
}

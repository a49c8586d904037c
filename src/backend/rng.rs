//! The counter-based random numbers shared by every backend: a value depends only on
//! (seed, stream, counter), so the CPU and the GPU draw identical samples and dropout masks, any
//! element can be drawn independently, and no generator state needs saving beyond the seed.
//! `kernels/common.cuh` implements the same functions; keep the two in step.

/// SplitMix64's finaliser: a bijective 64-bit mix with full avalanche.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform draw in [0, 1) with 24 bits, exactly representable in f32.
pub fn uniform(seed: u64, stream: u64, counter: u64) -> f32 {
    let h = mix64(seed ^ mix64(stream.wrapping_add(0x9e37_79b9_7f4a_7c15) ^ mix64(counter)));
    (h >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// The key of one dropout mask. Each element's draw is then a single SplitMix64 step from it, a
/// third of `uniform`'s mixing: dropout kernels draw one number per element of large activations,
/// and the mixing, not memory, bounded their speed.
pub fn dropout_key(seed: u64, stream: u64) -> u64 {
    mix64(seed ^ mix64(stream.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// Whether dropout with probability `p` keeps element `index` of the mask keyed `key`.
pub fn dropout_keep(p: f32, key: u64, index: u64) -> bool {
    let h = mix64(key.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    (h >> 40) as f32 * (1.0 / 16_777_216.0) >= p
}

/// What dropout with probability `p` multiplies element `index` of the mask keyed `key` by: 0 or
/// 1/(1 − p), and 1 when `p` is 0 (`dropout_factor` in kernels/common.cuh).
pub fn dropout_factor(p: f32, key: u64, index: u64) -> f32 {
    if p <= 0.0 {
        1.0
    } else if dropout_keep(p, key, index) {
        1.0 / (1.0 - p)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_range_and_roughly_flat() {
        let n = 100_000;
        let mut buckets = [0usize; 10];
        for i in 0..n {
            let u = uniform(7, 3, i);
            assert!((0.0..1.0).contains(&u));
            buckets[(u * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((b as f64 - 10_000.0).abs() < 500.0, "bucket count {b}");
        }
    }

    #[test]
    fn streams_and_seeds_differ() {
        assert_ne!(uniform(1, 0, 0), uniform(2, 0, 0));
        assert_ne!(uniform(1, 0, 0), uniform(1, 1, 0));
        assert_ne!(uniform(1, 0, 0), uniform(1, 0, 1));
    }

    #[test]
    fn dropout_keep_rate_matches_p() {
        let kept = (0..200_000).filter(|&i| dropout_keep(0.05, dropout_key(11, 5), i)).count();
        let rate = kept as f64 / 200_000.0;
        assert!((rate - 0.95).abs() < 0.003, "keep rate {rate}");
    }

    /// Masks of neighbouring elements, streams and seeds are unrelated: each pair of them agrees
    /// as often as independent draws would (p² + (1 − p)² of the time).
    #[test]
    fn dropout_masks_are_independent() {
        let (p, n) = (0.5, 100_000u64);
        let mask = |seed, stream, shift: u64| -> Vec<bool> {
            (0..n).map(|i| dropout_keep(p, dropout_key(seed, stream), i + shift)).collect()
        };
        let base = mask(3, 7, 0);
        for other in [mask(3, 7, 1), mask(3, 8, 0), mask(4, 7, 0)] {
            let agree = base.iter().zip(&other).filter(|(a, b)| a == b).count() as f64 / n as f64;
            assert!((agree - 0.5).abs() < 0.01, "masks agree on {agree} of elements");
        }
    }
}

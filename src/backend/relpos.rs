//! T5's relative-position bucketing, shared by every backend's attention (REFERENCE.md gives the
//! formula; the arithmetic is f32 as in transformers, so boundary distances land in the same bucket).

/// The bucket of `rel = key_pos − query_pos`.
pub fn relative_bucket(rel: i64, bidirectional: bool, num_buckets: usize, max_distance: usize) -> usize {
    let mut nb = num_buckets as i64;
    let mut bucket = 0i64;
    let dist = if bidirectional {
        nb /= 2;
        if rel > 0 {
            bucket += nb;
        }
        rel.abs()
    } else {
        -rel.min(0)
    };
    let max_exact = nb / 2;
    if dist < max_exact {
        bucket += dist;
    } else {
        let scaled = (dist as f32 / max_exact as f32).ln() / (max_distance as f32 / max_exact as f32).ln()
            * (nb - max_exact) as f32;
        bucket += (max_exact + scaled as i64).min(nb - 1);
    }
    bucket as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bidirectional_buckets_split_by_direction() {
        // 32 buckets, max distance 128: 16 per direction, 8 exact.
        assert_eq!(relative_bucket(0, true, 32, 128), 0);
        assert_eq!(relative_bucket(-1, true, 32, 128), 1);
        assert_eq!(relative_bucket(1, true, 32, 128), 17);
        assert_eq!(relative_bucket(-7, true, 32, 128), 7);
        assert_eq!(relative_bucket(7, true, 32, 128), 23);
        // log region: 8 + floor(ln(d/8)/ln(16)·8)
        assert_eq!(relative_bucket(-8, true, 32, 128), 8);
        assert_eq!(relative_bucket(-16, true, 32, 128), 10);
        assert_eq!(relative_bucket(-127, true, 32, 128), 15);
        // past max_distance every distance shares the last bucket of its direction
        assert_eq!(relative_bucket(-128, true, 32, 128), 15);
        assert_eq!(relative_bucket(-5000, true, 32, 128), 15);
        assert_eq!(relative_bucket(5000, true, 32, 128), 31);
    }

    #[test]
    fn causal_buckets_ignore_the_future() {
        assert_eq!(relative_bucket(0, false, 32, 128), 0);
        assert_eq!(relative_bucket(3, false, 32, 128), 0);
        assert_eq!(relative_bucket(-15, false, 32, 128), 15);
        // 32 buckets, 16 exact: 16 + floor(ln(d/16)/ln(8)·16)
        assert_eq!(relative_bucket(-16, false, 32, 128), 16);
        assert_eq!(relative_bucket(-32, false, 32, 128), 21);
        assert_eq!(relative_bucket(-127, false, 32, 128), 31);
        assert_eq!(relative_bucket(-1000, false, 32, 128), 31);
    }

    #[test]
    fn buckets_are_monotone_in_distance() {
        for bidir in [true, false] {
            let mut last = 0;
            for d in 0..400 {
                let b = relative_bucket(-d, bidir, 32, 128);
                assert!(b >= last);
                last = b;
            }
        }
    }
}

//! Helpers shared by the integration tests: fixture paths, expected tensors, comparisons.
#![allow(dead_code)]

use detox::checkpoint::Checkpoint;
use std::path::PathBuf;

/// The repository: DETOX_ROOT when the tests run from a copy elsewhere (the GPU machine).
pub fn root() -> PathBuf {
    std::env::var_os("DETOX_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// ../shared, or DETOX_SHARED where it lives elsewhere.
pub fn shared(rel: &str) -> PathBuf {
    std::env::var_os("DETOX_SHARED").map(PathBuf::from).unwrap_or_else(|| root().join("../shared")).join(rel)
}

/// Tensors of a fixture's expected.safetensors, as f32 with their shapes.
pub struct Expected(Checkpoint);

impl Expected {
    pub fn open(path: PathBuf) -> Self {
        Expected(Checkpoint::open_file(&path).expect("fixture opens"))
    }

    pub fn get(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let t = self.0.get(name).unwrap_or_else(|e| panic!("{e}"));
        (t.to_f32(), t.shape.to_vec())
    }

    pub fn ids(&self, name: &str) -> (Vec<u32>, Vec<usize>) {
        let (v, s) = self.get(name);
        (v.into_iter().map(|x| x as u32).collect(), s)
    }
}

/// max |a − b| over max |b|: the error relative to the reference's scale.
pub fn rel_max_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff.is_finite(), "non-finite values");
    diff / scale
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_l2_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    let e = (num / den.max(1e-30)).sqrt() as f32;
    assert!(e.is_finite(), "non-finite values");
    e
}

/// The GPU if there is one; otherwise None after saying, past the test harness's capture, that the
/// calling test skipped (a skip must never pass silently as a success).
pub fn cuda(test: &str) -> Option<detox::backend::cuda::Cuda> {
    match detox::backend::cuda::Cuda::new(0) {
        Ok(c) => Some(c),
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no usable GPU ({e:#})");
            None
        }
    }
}

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

/// Random inputs for comparing a backend with the CPU reference, drawn once and uploaded to both.
pub struct Rand(rand_chacha::ChaCha8Rng);

impl Rand {
    pub fn new(seed: u64) -> Self {
        use rand::SeedableRng;
        Self(rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }

    /// Values in (−scale, scale), rounded to fp16 so that a GPU weight or half copy holds them
    /// exactly.
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        use rand::RngExt;
        (0..n).map(|_| half::f16::from_f32(self.0.random_range(-scale..scale)).to_f32()).collect()
    }

    pub fn ids(&mut self, n: usize, below: u32) -> Vec<u32> {
        use rand::RngExt;
        (0..n).map(|_| self.0.random_range(0..below)).collect()
    }
}

/// `v` as a backend's weight (f32 on the way in; the backend stores it as it stores checkpoints).
pub fn weight<B: detox::backend::Backend>(be: &B, v: &[f32], shape: &[usize]) -> B::Weight {
    use detox::checkpoint::{DType, HostTensor};
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    be.upload_weight(&HostTensor { name: "w", dtype: DType::F32, shape, bytes: &bytes }).unwrap()
}

/// Asserts a relative L2 error of at most `tol`, and finite values.
pub fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let err = rel_l2_err(got, want);
    assert!(err <= tol, "{what}: relative L2 error {err} > {tol}");
}

/// Half-precision outputs and products of half inputs round at 2⁻¹¹; f32 outputs agree to
/// rounding.
pub const HALF: f32 = 2e-3;
pub const F32: f32 = 1e-5;

/// One registered test of a suite: its name (the op and shape for a table's case), its body over
/// a backend, and, for a case that needs more than a backend, why it cannot run here.
pub struct Case<B> {
    pub name: String,
    pub body: Box<dyn Fn(&B) + Send + Sync>,
    pub skip: Option<fn() -> Option<String>>,
}

impl<B> Case<B> {
    pub fn new(name: impl Into<String>, body: impl Fn(&B) + Send + Sync + 'static) -> Self {
        Case { name: name.into(), body: Box::new(body), skip: None }
    }
}

/// Runs every case on `be`, each past the others' failures, then fails naming each failed case.
pub fn run_cases<B>(be: &B, cases: Vec<Case<B>>) {
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (c.body)(be))).err()?;
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            Some(format!("{}: {}", c.name, msg.unwrap_or_default()))
        })
        .collect();
    assert!(failed.is_empty(), "{} of {} cases failed:\n{}", failed.len(), cases.len(), failed.join("\n"));
}

/// Registers a suite's test bodies once, for every test binary that includes the suite:
///
/// ```ignore
/// crate::common::suite!("ops": each norms, table attention, cpu model_card, gpu full_size skip why_not);
/// ```
///
/// declares `pub fn cases<B>(make: fn() -> B) -> Vec<Case<B>>`, the list tests/gpu.rs runs on
/// CUDA, and a `#[test]` CPU twin of each body that runs on the CPU (only where the including
/// binary uses the standard harness: tests/gpu.rs has none). Kinds:
/// - `each f`: `f(&B)`, on every backend;
/// - `table f`: `f::<B>()` gives a table of cases (op × shape × variant), each named for its
///   shape; the CPU twin runs them all and names each one that failed;
/// - `cpu f`: `f(&Cpu)` on the CPU only; `gpu f`: `f(&B)` in tests/gpu.rs only (its CPU run,
///   if any, is elsewhere);
/// - `workers f`: `f(make)`, each worker making its own backend; `cuda f`: `f(&Cuda)`.
///
/// `skip why` after an entry: `why()` says why the case cannot run here (missing inputs).
/// A body that is not registered is dead code, which clippy's `-D warnings` refuses, so a body
/// cannot be written and forgotten.
#[allow(unused_macros)]
macro_rules! suite {
    (@cases $s:literal each $f:ident $make:ident) => {
        vec![$crate::common::Case::new(concat!($s, "::", stringify!($f)), $f::<B>)]
    };
    (@cases $s:literal gpu $f:ident $make:ident) => {
        vec![$crate::common::Case::new(concat!($s, "::", stringify!($f)), $f::<B>)]
    };
    (@cases $s:literal table $f:ident $make:ident) => {
        $f::<B>()
            .into_iter()
            .map(|mut c| {
                c.name = format!("{}::{}", $s, c.name);
                c
            })
            .collect()
    };
    (@cases $s:literal cpu $f:ident $make:ident) => {{
        let _ = $f::<detox::backend::cpu::Cpu>;
        Vec::new()
    }};
    (@cases $s:literal workers $f:ident $make:ident) => {
        vec![$crate::common::Case::new(concat!($s, "::", stringify!($f)), move |_: &B| $f::<B>($make))]
    };
    (@cases $s:literal cuda $f:ident $make:ident) => {
        vec![$crate::common::Case::new(concat!($s, "::", stringify!($f)), |be: &B| {
            $f((be as &dyn std::any::Any).downcast_ref::<detox::backend::cuda::Cuda>().expect("a CUDA backend"))
        })]
    };
    (@twin each $f:ident) => {
        #[test]
        fn $f() {
            super::$f(&detox::backend::cpu::Cpu);
        }
    };
    (@twin cpu $f:ident) => {
        $crate::common::suite!(@twin each $f);
    };
    (@twin table $f:ident) => {
        #[test]
        fn $f() {
            $crate::common::run_cases(&detox::backend::cpu::Cpu, super::$f::<detox::backend::cpu::Cpu>());
        }
    };
    (@twin $other:ident $f:ident) => {};
    ($suite:literal: $($kind:ident $f:ident $(skip $skip:path)?),* $(,)?) => {
        /// Every case of this suite on a backend `B` (`make` makes another, for the workers).
        #[allow(dead_code)]
        pub fn cases<B: detox::backend::Backend + 'static>(make: fn() -> B) -> Vec<$crate::common::Case<B>> {
            let _ = make;
            let mut all: Vec<$crate::common::Case<B>> = Vec::new();
            $(
                #[allow(unused_mut)]
                let mut these: Vec<$crate::common::Case<B>> = $crate::common::suite!(@cases $suite $kind $f make);
                $(for c in &mut these {
                    c.skip = Some($skip);
                })?
                all.extend(these);
            )*
            all
        }

        #[cfg(test)]
        mod cpu {
            $($crate::common::suite!(@twin $kind $f);)*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use suite;

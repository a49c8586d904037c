//! Single operations of the CPU reference against values transformers computed
//! (tests/fixtures/ops.safetensors): gelu_new, T5LayerNorm, relative-position buckets.

mod common;
// The backend suite, CPU against CPU here (CUDA against CPU in tests/gpu.rs): every case runs.
#[path = "suites/ops.rs"]
mod ops;

use common::{Expected, fixture, rel_max_err};
use detox::backend::cpu::{Cpu, gelu_new};
use detox::backend::prelude::*;
use detox::backend::relpos::relative_bucket;
use detox::backend::{Dropout, Shaped};
use detox::checkpoint::{DType, HostTensor};

fn ops() -> Expected {
    Expected::open(fixture("ops.safetensors"))
}

#[test]
fn gelu_new_matches_transformers() {
    let e = ops();
    let x = e.get("gelu_x").0;
    let got: Vec<f32> = x.iter().map(|&v| gelu_new(v)).collect();
    let err = rel_max_err(&got, &e.get("gelu_y").0);
    assert!(err < 1e-6, "gelu_new error {err}");
}

#[test]
fn rms_norm_matches_t5_layer_norm() {
    let e = ops();
    let (x, shape) = e.get("rms_x");
    let (w, _) = e.get("rms_w");
    let be = Cpu;
    let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let wt = be.upload_weight(&HostTensor { name: "w", dtype: DType::F32, shape: &[w.len()], bytes: &bytes }).unwrap();
    let y = be.rms_norm(&be.upload(&x, &shape).unwrap(), &wt, 1e-6).unwrap();
    let err = rel_max_err(&y.data, &e.get("rms_y").0);
    assert!(err < 1e-6, "rms_norm error {err}");
}

#[test]
fn relative_buckets_match_transformers() {
    let e = ops();
    let rel = e.get("rel").0;
    for bidir in [true, false] {
        for (nb, md) in [(32, 128), (16, 24), (8, 20)] {
            let key = format!("bucket_{}_{nb}_{md}", if bidir { "bi" } else { "causal" });
            let want = e.get(&key).0;
            for (r, w) in rel.iter().zip(&want) {
                assert_eq!(relative_bucket(*r as i64, bidir, nb, md), *w as usize, "{key} at rel {r}");
            }
        }
    }
}

#[test]
fn lora_dropout_is_inverted_and_deterministic() {
    let be = Cpu;
    let n = 50_000;
    let x = be.upload(&vec![1.0; n], &[n / 10, 10]).unwrap();
    let d = Dropout { p: 0.05, seed: 3, stream: 9 };
    let y = detox::backend::cpu::apply_dropout(&x.data, &d);
    let kept = y.iter().filter(|v| **v != 0.0).count() as f64 / n as f64;
    assert!((kept - 0.95).abs() < 0.005, "keep rate {kept}");
    assert!(y.iter().all(|v| *v == 0.0 || (*v - 1.0 / 0.95).abs() < 1e-6));
    assert_eq!(y, detox::backend::cpu::apply_dropout(&x.data, &d));
    assert_eq!(x.shape(), &[n / 10, 10]);
}

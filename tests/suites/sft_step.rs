//! One full-parameter fine-tuning step against PyTorch (tests/fixtures/sft, from
//! tools/make_sft_fixture.py): the label-smoothed loss and the plain cross-entropy (of the training
//! step and of the held-out evaluation), the gradient of every weight by Hugging Face
//! name, the gradient norm, and every weight after clipping and one AdamW step; for an untied
//! FLAN-style head and a tied, rescaled one. And, on CUDA against the CPU, the same step with T5's
//! own dropout on: both backends draw the same masks, so loss and gradients agree. And three
//! Adafactor steps against transformers', on each backend.

use crate::common::{Expected, fixture, rel_l2_err};
use detox::backend::Backend;
use detox::checkpoint::Checkpoint;
use detox::sft::data::SftBatch;
use detox::sft::step::{Hyper, OptimizerKind, SftGrads, SftOptimizer, eval_loss, sft_gradients, sft_update};
use detox::t5::T5;
use detox::t5::params::named_tensors;
use detox::text::Batch;
use serde_json::Value;

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

pub fn sft_step_matches_pytorch<B: Backend>(be: &B) {
    let cpu = be.ordinal().is_none();
    // CPU f32 against PyTorch f32: rounding only. CUDA: half-precision products.
    let (tol_loss, tol_grad, tol_delta) = if cpu { (1e-5, 1e-4, 1e-3) } else { (1e-3, 3e-2, 0.1) };
    for name in ["flan", "tied"] {
        let dir = fixture(&format!("sft/{name}"));
        let j: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("step.json")).unwrap()).unwrap();
        let num = |k: &str| j[k].as_f64().unwrap();
        let (mut model, batch) = fixture_step(be, name, None);
        let mut opt =
            SftOptimizer::full(be, &model, &Checkpoint::open_dir(&dir.join("model")).unwrap(), OptimizerKind::AdamW)
                .unwrap();
        let h = Hyper {
            lr: num("lr"),
            beta1: num("beta1"),
            beta2: num("beta2"),
            eps: num("eps"),
            weight_decay: num("weight_decay"),
            adafactor: None,
            max_grad_norm: num("max_grad_norm"),
            label_smoothing: num("label_smoothing") as f32,
            loss_scale: if cpu { 1.0 } else { 1024.0 },
            dropout_seed: 0,
        };
        let (losses, mut grads) = sft_gradients(be, &model, true, &batch, batch.tokens(), &h).unwrap();
        let (want_loss, want_ce) = (num("loss"), num("ce"));
        let loss = losses.loss;
        assert!(((loss - want_loss) / want_loss).abs() < tol_loss, "{name}: loss {loss} vs PyTorch {want_loss}");
        let ce = losses.ce;
        assert!(((ce - want_ce) / want_ce).abs() < tol_loss, "{name}: plain CE {ce} vs PyTorch {want_ce}");
        let (sum, sum_ce, tokens) = eval_loss(be, &model, &batch, h.label_smoothing).unwrap();
        let (eval, eval_ce) = (sum / tokens as f64, sum_ce / tokens as f64);
        assert!(((eval - want_loss) / want_loss).abs() < tol_loss, "{name}: eval loss {eval} vs PyTorch {want_loss}");
        assert!(((eval_ce - want_ce) / want_ce).abs() < tol_loss, "{name}: eval CE {eval_ce} vs PyTorch {want_ce}");

        let SftGrads::Full(g) = &mut grads else { panic!("full-parameter gradients expected") };
        let refs: Vec<&B::Tensor> = g.tensors_mut().into_iter().map(|t| &*t).collect();
        let got = named_tensors(be, &model, &refs).unwrap();
        let want = Expected::open(dir.join("grads.safetensors"));
        assert_eq!(got.len(), Checkpoint::open_file(&dir.join("grads.safetensors")).unwrap().names().len());
        let scale = h.loss_scale;
        for (n, t) in &got {
            let (w, shape) = want.get(n);
            assert_eq!(t.shape, shape, "{name}: {n} shape");
            let g: Vec<f32> = f32s(&t.bytes).iter().map(|v| v / scale).collect();
            let err = rel_l2_err(&g, &w);
            assert!(err <= tol_grad, "{name}: gradient of {n}: relative L2 error {err}");
        }

        let before = Expected::open(dir.join("model/model.safetensors"));
        let (norm, skipped) = sft_update(be, &mut model, &mut opt, &mut grads, &h).unwrap();
        assert!(!skipped, "{name}: the step was skipped");
        let want_norm = num("grad_norm");
        assert!(
            ((norm - want_norm) / want_norm).abs() < tol_loss.max(1e-5) * 10.0,
            "{name}: norm {norm} vs {want_norm}"
        );
        let detox::sft::step::Trainables::Full { masters, .. } = &opt.trainables else { panic!("full") };
        let after = named_tensors(be, &model, &masters.iter().collect::<Vec<_>>()).unwrap();
        let want_after = Expected::open(dir.join("after.safetensors"));
        for (n, t) in &after {
            let stored = if n == "shared.weight" { n.as_str() } else { n };
            let (p0, _) = before.get(stored);
            let (p1, _) = want_after.get(n);
            let got_delta: Vec<f32> = f32s(&t.bytes).iter().zip(&p0).map(|(a, b)| a - b).collect();
            let want_delta: Vec<f32> = p1.iter().zip(&p0).map(|(a, b)| a - b).collect();
            let err = rel_l2_err(&got_delta, &want_delta);
            assert!(err <= tol_delta, "{name}: update of {n}: relative L2 error {err}");
        }
    }
}

/// Fixture `sft/{name}`'s model and batch, with T5's dropout at `dropout_rate` when given (the
/// fixture's own config says 0).
fn fixture_step<B: Backend>(be: &B, name: &str, dropout_rate: Option<f32>) -> (T5<B>, SftBatch) {
    let dir = fixture(&format!("sft/{name}"));
    let x = Expected::open(dir.join("batch.safetensors"));
    let (ids, is) = x.ids("input_ids");
    let (lengths, _) = x.ids("lengths");
    let (decoder_input, ds) = x.ids("decoder_input_ids");
    let (labels, _) = x.ids("labels");
    let (mask, _) = x.get("mask");
    let batch = SftBatch {
        source: Batch { ids, lengths, rows: is[0], width: is[1] },
        decoder_input,
        labels,
        mask,
        width: ds[1],
    };
    let mut model = T5::load(be, &dir.join("model")).unwrap();
    if let Some(rate) = dropout_rate {
        model.config.dropout_rate = rate;
    }
    (model, batch)
}

/// The loss and every named gradient (unscaled) of one full-parameter step's backward.
fn dropout_step<B: Backend>(be: &B, dropout_rate: f32, loss_scale: f32) -> (f64, Vec<(String, Vec<f32>)>) {
    let (model, batch) = fixture_step(be, "flan", Some(dropout_rate));
    let h = Hyper {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        adafactor: None,
        max_grad_norm: 0.0,
        label_smoothing: 0.1,
        loss_scale,
        dropout_seed: 2026,
    };
    let (loss, mut grads) = sft_gradients(be, &model, true, &batch, batch.tokens(), &h).unwrap();
    let SftGrads::Full(g) = &mut grads else { panic!("full-parameter gradients expected") };
    let refs: Vec<&B::Tensor> = g.tensors_mut().into_iter().map(|t| &*t).collect();
    let named = named_tensors(be, &model, &refs).unwrap();
    (loss.loss, named.into_iter().map(|(n, t)| (n, f32s(&t.bytes).iter().map(|v| v / loss_scale).collect())).collect())
}

/// One SFT step with T5's dropout (rate 0.1 at every site) on `be` against the CPU: the same masks,
/// so the same loss and gradients within the half-precision tolerances of the step above.
pub fn sft_step_with_dropout_matches_cpu<B: Backend>(be: &B) {
    let (want_loss, want) = dropout_step(&detox::backend::cpu::Cpu, 0.1, 1.0);
    let (plain_loss, _) = dropout_step(&detox::backend::cpu::Cpu, 0.0, 1.0);
    assert!((want_loss - plain_loss).abs() > 1e-4, "dropout left the loss at {plain_loss}");
    let (loss, got) = dropout_step(be, 0.1, if be.ordinal().is_none() { 1.0 } else { 1024.0 });
    assert!(((loss - want_loss) / want_loss).abs() < 1e-3, "loss {loss} vs the CPU's {want_loss}");
    assert_eq!(got.len(), want.len());
    for ((n, g), (wn, w)) in got.iter().zip(&want) {
        assert_eq!(n, wn);
        let err = rel_l2_err(g, w);
        assert!(err <= 3e-2, "gradient of {n}: relative L2 error {err} against the CPU");
    }
}

/// Three Adafactor steps against transformers' (tests/fixtures/adafactor, from
/// tools/make_adafactor_fixture.py) in each case: `a`, `b` and `c` as their own weights, and `a`
/// and `b` stacked into one weight of two parts, which must update as the two apart.
pub fn adafactor_matches_transformers<B: Backend>(be: &B) {
    use detox::backend::AdafactorOptions;
    use detox::sft::adafactor::{AdafactorState, adafactor_slots};
    use detox::t5::trainable::Trainable;
    let tol = if be.ordinal().is_none() { 1e-5 } else { 1e-4 };
    let dir = fixture("adafactor");
    let j: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let steps = j["steps"].as_u64().unwrap();
    for (case, c) in j["cases"].as_object().unwrap() {
        let x = Expected::open(dir.join(format!("{case}.safetensors")));
        let o = AdafactorOptions {
            eps1: c["eps"][0].as_f64().unwrap(),
            eps2: c["eps"][1].as_f64().unwrap(),
            clip_threshold: c["clip_threshold"].as_f64().unwrap(),
            decay_rate: c["decay_rate"].as_f64().unwrap(),
            beta1: c["beta1"].as_f64(),
            scale_parameter: c["scale_parameter"].as_bool().unwrap(),
            relative_step: c["relative_step"].as_bool().unwrap(),
            warmup_init: c["warmup_init"].as_bool().unwrap(),
        };
        let (lr, wd) = (c["lr"].as_f64().unwrap_or(0.0), c["weight_decay"].as_f64().unwrap());
        // A weight stacks these fixture tensors' rows; its values of kind `t` at step `s`.
        let values = |names: &[&str], t: &str, s: u64| -> Vec<f32> {
            names.iter().flat_map(|n| x.get(&format!("{n}.{t}.{s}")).0).collect()
        };
        let shape = |n: &str| x.get(&format!("{n}.param.0")).1;
        let weight = |names: &[&'static str]| {
            let first = shape(names[0]);
            let parts: Vec<usize> = names.iter().map(|n| shape(n)[0]).collect();
            let mut sh = first.clone();
            sh[0] = parts.iter().sum();
            (names.to_vec(), sh, parts)
        };
        let apart = vec![weight(&["a"]), weight(&["b"]), weight(&["c"])];
        let together = vec![weight(&["a", "b"]), weight(&["c"])];
        for (layout, what) in [(apart, "apart"), (together, "stacked")] {
            let mut params: Vec<B::Tensor> =
                layout.iter().map(|(n, sh, _)| be.upload(&values(n, "param", 0), sh).unwrap()).collect();
            let mut states: Vec<AdafactorState<B>> = layout
                .iter()
                .map(|(_, sh, parts)| AdafactorState::zeros(be, sh, parts, o.beta1.is_some()).unwrap())
                .collect();
            for s in 1..=steps {
                let grads: Vec<B::Tensor> =
                    layout.iter().map(|(n, sh, _)| be.upload(&values(n, "grad", s), sh).unwrap()).collect();
                let trainables =
                    params.iter_mut().map(|p| Trainable { name: String::new(), param: p, copy: None }).collect();
                let mut slots = adafactor_slots(trainables, grads.iter().collect(), &mut states, |_| wd).unwrap();
                be.adafactor(&mut slots, &o.step(lr, s, 1.0)).unwrap();
                for (i, (n, sh, _)) in layout.iter().enumerate() {
                    let before = values(n, "param", s - 1);
                    let got: Vec<f32> =
                        be.download(&params[i]).unwrap().iter().zip(&before).map(|(a, b)| a - b).collect();
                    let want: Vec<f32> = values(n, "param", s).iter().zip(&before).map(|(a, b)| a - b).collect();
                    let err = rel_l2_err(&got, &want);
                    assert!(
                        err <= tol,
                        "adafactor {case} {what}: weight {i} step {s}: update's relative L2 error {err}"
                    );
                    // The next step starts from transformers' values, so errors do not compound.
                    params[i] = be.upload(&values(n, "param", s), sh).unwrap();
                }
            }
        }
    }
}

// Registration only: tests/gpu.rs runs every entry on CUDA; tests/sft_parity.rs runs the `each`
// entry on the CPU, beside its own CPU twins of the other two.
crate::common::suite!(
    "sft_step": gpu sft_step_matches_pytorch,
    gpu sft_step_with_dropout_matches_cpu,
    each adafactor_matches_transformers
);

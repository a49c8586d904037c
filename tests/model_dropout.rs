//! T5's own dropout in training passes (`Fwd::model_dropout`) on the CPU: the whole training
//! backward against central finite differences of `forward_train` with dropout on and the masks
//! fixed by the seed (so the function is smooth), for every weight and for the adapters; with the
//! rate 0 or the switch off, results identical to a pass without dropout; the masks' statistics
//! (keep rate 1 − p, kept values scaled by 1/(1 − p)) at the fused sites; and every site drawing
//! its own mask.

mod common;

use common::fixture;
use detox::backend::cpu::{Cpu, CpuTensor};
use detox::backend::prelude::*;
use detox::backend::{AttnInputs, AttnSpec, Dropout, Position};
use detox::t5::T5;
use detox::t5::model::{DropSite, Fwd, StackKind};
use detox::t5::params::FullGrads;
use detox::t5::train::LoraGrads;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A padded batch of two prompts (7 and 4 real tokens) and two 5-token decoder inputs.
struct Inputs {
    ids: CpuTensor<u32>,
    lengths: CpuTensor<u32>,
    dec: CpuTensor<u32>,
}

fn inputs(rng: &mut ChaCha8Rng, vocab: u32) -> Inputs {
    let (l, t) = (7, 5);
    let mut ids: Vec<u32> = (0..2 * l).map(|_| rng.random_range(2..vocab)).collect();
    ids[l + 4..].iter_mut().for_each(|x| *x = 0);
    let dec: Vec<u32> = (0..2 * t).map(|i| if i % t == 0 { 0 } else { rng.random_range(2..vocab) }).collect();
    Inputs {
        ids: Cpu.upload_ids(&ids, &[2, l]).unwrap(),
        lengths: Cpu.upload_ids(&[l as u32, 4], &[2]).unwrap(),
        dec: Cpu.upload_ids(&dec, &[2, t]).unwrap(),
    }
}

/// The SFT fixture's tiny FLAN-style model (2 + 3 layers, 3 heads, padded prompts) with T5's
/// dropout at `rate`.
fn tiny(rate: f32) -> T5<Cpu> {
    let mut model = T5::load(&Cpu, &fixture("sft/flan/model")).unwrap();
    model.config.dropout_rate = rate;
    model
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Checks `grads` (one per parameter group, in `params`' order) against central differences of
/// `objective` along random directions, with steps `eps` and `2 eps`: each group alone, then all
/// at once, so that a wrong gradient anywhere shows. Derivatives below `floor` are judged against
/// it: the f32 evaluations' noise.
fn check_groups<M>(
    what: &str,
    (eps, floor): (f32, f64),
    model: &mut M,
    params: impl Fn(&mut M) -> Vec<&mut Vec<f32>>,
    objective: impl Fn(&M) -> f64,
    grads: &[Vec<f32>],
    rng: &mut ChaCha8Rng,
) {
    let groups = grads.len();
    assert_eq!(params(model).len(), groups, "{what}: one gradient per parameter group");
    for group in (0..groups).chain([usize::MAX]) {
        let dirs: Vec<Vec<f32>> = params(model)
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let on = group == usize::MAX || group == i;
                (0..p.len()).map(|_| if on { rng.random_range(-1.0..1.0) } else { 0.0 }).collect()
            })
            .collect();
        let analytic: f64 = dirs.iter().zip(grads).map(|(u, g)| dot(u, g)).sum();
        let mut derivative = |eps: f32| -> f64 {
            let mut shifted = |sign: f32| -> f64 {
                for (p, u) in params(model).into_iter().zip(&dirs) {
                    p.iter_mut().zip(u).for_each(|(x, d)| *x += sign * eps * d);
                }
                let v = objective(model);
                for (p, u) in params(model).into_iter().zip(&dirs) {
                    p.iter_mut().zip(u).for_each(|(x, d)| *x -= sign * eps * d);
                }
                v
            };
            (shifted(1.0) - shifted(-1.0)) / (2.0 * eps as f64)
        };
        // Richardson's extrapolation of two central differences cancels their ε² error.
        let numeric = (4.0 * derivative(eps) - derivative(2.0 * eps)) / 3.0;
        let err = (numeric - analytic).abs() / numeric.abs().max(analytic.abs()).max(floor);
        assert!(err < 5e-3, "{what}, group {group}: analytic {analytic} vs finite differences {numeric} ({err})");
    }
}

/// ⟨r, final decoder states⟩ of one training pass: every dropout site lies between the inputs
/// and these states (the decoder's final norm's dropout included).
fn objective(model: &T5<Cpu>, x: &Inputs, f: Fwd, r: &[f32]) -> f64 {
    let (hidden, _) = model.forward_train(&Cpu, &x.ids, &x.lengths, &x.dec, f).unwrap();
    dot(&hidden.data, r)
}

#[test]
fn full_backward_with_model_dropout_matches_finite_differences() {
    let mut model = tiny(0.2);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x = inputs(&mut rng, model.config.vocab_size as u32);
    let f = Fwd { lora: false, dropout_seed: None, model_dropout: Some(1234) };
    let (hidden, tape) = model.forward_train(&Cpu, &x.ids, &x.lengths, &x.dec, f).unwrap();
    let r: Vec<f32> = (0..hidden.data.len()).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut grads = FullGrads::zeros(&Cpu, &model).unwrap();
    let d_hidden = Cpu.upload(&r, &hidden.shape).unwrap();
    model.backward_full(&Cpu, &tape, (&x.ids, &x.lengths, &x.dec), &d_hidden, &mut grads).unwrap();
    let grads: Vec<Vec<f32>> = grads.tensors_mut().into_iter().map(|g| g.data.clone()).collect();
    check_groups(
        "every weight, model dropout 0.2",
        // Smaller steps drown in the f32 states' rounding, larger ones in the curvature.
        (2e-3, 1.0),
        &mut model,
        |m| m.params_mut().into_iter().map(|p| &mut p.weight.data).collect(),
        |m| objective(m, &x, f, &r),
        &grads,
        &mut rng,
    );
}

#[test]
fn adapter_backward_with_model_and_adapter_dropout_matches_finite_differences() {
    let dir = fixture("t5/flan_small");
    let mut model = T5::load(&Cpu, &dir).unwrap();
    model.load_adapter(&Cpu, &dir.join("adapter")).unwrap();
    model.config.dropout_rate = 0.3;
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let x = inputs(&mut rng, 300);
    let f = Fwd { lora: true, dropout_seed: Some(31), model_dropout: Some(77) };
    let (hidden, tape) = model.forward_train(&Cpu, &x.ids, &x.lengths, &x.dec, f).unwrap();
    let r: Vec<f32> = (0..hidden.data.len()).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut grads = LoraGrads::zeros(&Cpu, &model).unwrap();
    model.backward(&Cpu, &tape, &x.lengths, &Cpu.upload(&r, &hidden.shape).unwrap(), &mut grads).unwrap();
    let grads: Vec<Vec<f32>> = grads.tensors().map(|g| g.data.clone()).collect();
    check_groups(
        "adapters, model dropout 0.3 and adapter dropout",
        // The adapters' derivatives carry up to ~0.1 of f32 noise at any step: a wrong mask at
        // one site moved them by 7 to 10% (by hundreds where they are large).
        (5e-4, 25.0),
        &mut model,
        |m| m.lora_trainables().into_iter().map(|t| &mut t.param.data).collect(),
        |m| objective(m, &x, f, &r),
        &grads,
        &mut rng,
    );
}

/// Rate 0 with the switch on, and the switch off at rate 0.1, both give exactly the pass without
/// T5's dropout (what the parity tests check), states and gradients alike; the switch on at 0.1
/// changes them, with masks that follow the seed.
#[test]
fn rate_zero_or_switch_off_is_the_pass_without_dropout() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x = inputs(&mut rng, 300);
    let run = |rate: f32, model_dropout: Option<u64>| -> (Vec<f32>, Vec<Vec<f32>>) {
        let model = tiny(rate);
        let f = Fwd { lora: false, dropout_seed: None, model_dropout };
        let (hidden, tape) = model.forward_train(&Cpu, &x.ids, &x.lengths, &x.dec, f).unwrap();
        let d = Cpu.upload(&vec![1.0; hidden.data.len()], &hidden.shape).unwrap();
        let mut g = FullGrads::zeros(&Cpu, &model).unwrap();
        model.backward_full(&Cpu, &tape, (&x.ids, &x.lengths, &x.dec), &d, &mut g).unwrap();
        (hidden.data, g.tensors_mut().into_iter().map(|t| t.data.clone()).collect())
    };
    let plain = run(0.0, None);
    assert_eq!(run(0.0, Some(9)), plain, "rate 0 with the switch on");
    assert_eq!(run(0.1, None), plain, "the switch off at rate 0.1");
    let on = run(0.1, Some(9));
    assert_ne!(on.0, plain.0, "dropout 0.1 leaves the states unchanged");
    assert_eq!(run(0.1, Some(9)), on, "the same seed draws the same masks");
    assert_ne!(run(0.1, Some(10)).0, on.0, "another seed draws the same masks");

    // Without dropout the training pass is the inference pass.
    let model = tiny(0.1);
    let (_, inference) = model.forward(&Cpu, &x.ids, &x.lengths, &x.dec, Fwd::eval(false)).unwrap();
    assert_eq!(inference.data, plain.0, "forward_train without dropout against forward");
    let err = model.forward(&Cpu, &x.ids, &x.lengths, &x.dec, Fwd { model_dropout: Some(1), ..Fwd::eval(false) });
    assert!(err.is_err(), "inference passes refuse T5's dropout");
}

/// Of `n` outputs that are either 0 or `scale ×` their value without dropout, the kept share is
/// 1 − p within four standard deviations, and no other value occurs.
fn assert_inverted_dropout(what: &str, dropped: &[f32], plain: &[f32], p: f32) {
    let scale = 1.0 / (1.0 - p);
    let mut kept = 0usize;
    for (i, (d, v)) in dropped.iter().zip(plain).enumerate() {
        if *d == 0.0 {
            continue;
        }
        kept += 1;
        let want = v * scale;
        assert!((d - want).abs() <= 1e-5 * want.abs().max(1e-3), "{what}: element {i} is {d}, not 0 or {want}");
    }
    let n = plain.iter().filter(|v| **v != 0.0).count() as f64;
    let rate = kept as f64 / n;
    let sd = (p as f64 * (1.0 - p as f64) / n).sqrt();
    assert!((rate - (1.0 - p as f64)).abs() < 4.0 * sd, "{what}: keep rate {rate} for p {p} over {n} values");
}

#[test]
fn fused_sites_keep_one_minus_p_scaled_by_its_inverse() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for p in [0.1f32, 0.5] {
        let d = Dropout { p, seed: 3, stream: 11 };
        // The gated-gelu's hidden.
        let (rows, f) = (64, 500);
        let gu: Vec<f32> = (0..rows * 2 * f).map(|_| rng.random_range(-3.0..3.0)).collect();
        let gu = Cpu.upload(&gu, &[rows, 2 * f]).unwrap();
        let plain = Cpu.gated_gelu(&gu, None).unwrap().data;
        assert_inverted_dropout("gated_gelu", &Cpu.gated_gelu(&gu, Some(d)).unwrap().data, &plain, p);
        // A sublayer's output into the residual stream.
        let y: Vec<f32> = (0..rows * f).map(|_| rng.random_range(0.5..2.0)).collect();
        let mut acc = Cpu.zeros(&[rows, f]).unwrap();
        Cpu.dropout_add(&mut acc, &Cpu.upload(&y, &[rows, f]).unwrap(), &d).unwrap();
        assert_inverted_dropout("dropout_add", &acc.data, &y, p);
        // The attention probabilities themselves: with v the identity (one key per feature), the
        // output row is the query's probability row after dropout.
        let (b, h, lq, lk) = (4, 3, 50, 16);
        let inner = h * lk;
        let q: Vec<f32> = (0..b * lq * inner).map(|_| rng.random_range(-1.0..1.0)).collect();
        let k: Vec<f32> = (0..b * lk * inner).map(|_| rng.random_range(-1.0..1.0)).collect();
        let v: Vec<f32> =
            (0..b * lk * inner).map(|e| if (e % inner) % lk == (e / inner) % lk { 1.0 } else { 0.0 }).collect();
        let spec = |dropout| AttnSpec::<Cpu> {
            heads: h,
            d_kv: lk,
            scale: 1.0,
            kv_len: lk,
            key_lengths: None,
            causal: false,
            q_offset: Position::At(0),
            bias: None,
            dropout,
        };
        let (qt, kt, vt) = (
            Cpu.upload(&q, &[b, lq, inner]).unwrap(),
            Cpu.upload(&k, &[b, lk, inner]).unwrap(),
            Cpu.upload(&v, &[b, lk, inner]).unwrap(),
        );
        let x = AttnInputs::Apart { q: &qt, k: &kt, v: &vt };
        let probs = Cpu.attention(x, &spec(None)).unwrap().data;
        let sums: Vec<f32> = probs.chunks(lk).map(|row| row.iter().sum()).collect();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "identity values give the probabilities");
        assert_inverted_dropout("attention", &Cpu.attention(x, &spec(Some(d))).unwrap().data, &probs, p);
    }
}

/// Every site of every layer of both stacks has its own stream, so no two sites share a mask.
#[test]
fn every_site_draws_its_own_mask() {
    use DropSite::*;
    let mut streams = std::collections::HashSet::new();
    let sites = [Embedding, SelfProbs, SelfOut, CrossProbs, CrossOut, FfHidden, FfOut, FinalNorm];
    for stack in [StackKind::Encoder, StackKind::Decoder] {
        for layer in 0..64 {
            for site in sites {
                assert!(streams.insert(site.stream(stack, layer)), "{site:?} of layer {layer} shares a stream");
            }
        }
    }
    let model = tiny(0.1);
    let f = Fwd { model_dropout: Some(5), ..Fwd::eval(false) };
    let a = model.model_drop(f, StackKind::Encoder, 1, SelfOut).unwrap();
    assert_eq!(a, Dropout { p: 0.1, seed: 5, stream: SelfOut.stream(StackKind::Encoder, 1) });
    assert_eq!(model.model_drop(Fwd::train(5), StackKind::Encoder, 1, SelfOut), None, "PPO's pass keeps it off");
}

//! Every backward operation of the CPU reference against central finite differences of its
//! forward: for a random direction u and output weights r, ⟨backward(r), u⟩ must equal
//! (⟨r, f(x + εu)⟩ − ⟨r, f(x − εu)⟩) / 2ε. Adam against the independent reference in tests/oracles.

mod oracles;

// The backend suite, CPU against CPU here (CUDA against CPU in tests/gpu.rs): every case runs.
#[path = "suites/backward_ops.rs"]
mod backward_ops;
mod common;

use detox::backend::cpu::{Cpu, CpuTensor, log_softmax_row};
use detox::backend::prelude::*;
use detox::backend::{AdamSlot, AdamStep, AttnInputs, AttnSpec, Dropout, LoraGrad, LoraRef, Position, RelBias};
use detox::checkpoint::{DType, HostTensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Rand(ChaCha8Rng);

impl Rand {
    fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.0.random_range(-scale..scale)).collect()
    }
}

fn t(v: &[f32], shape: &[usize]) -> CpuTensor<f32> {
    Cpu.upload(v, shape).unwrap()
}

fn weight(v: &[f32], shape: &[usize]) -> CpuTensor<f32> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    Cpu.upload_weight(&HostTensor { name: "w", dtype: DType::F32, shape, bytes: &bytes }).unwrap()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Compares the analytic directional derivative `⟨grad, u⟩` with central differences of
/// `⟨r, f(x)⟩` along u.
fn check(name: &str, x: &[f32], grad: &[f32], r: &[f32], f: impl Fn(&[f32]) -> Vec<f32>, seed: u64) {
    let mut rnd = Rand::new(seed);
    let u = rnd.vec(x.len(), 1.0);
    let eps = 1e-2f32;
    let shifted = |s: f32| -> f64 {
        let xs: Vec<f32> = x.iter().zip(&u).map(|(a, b)| a + s * b).collect();
        dot(r, &f(&xs))
    };
    let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
    let analytic = dot(grad, &u);
    let err = (numeric - analytic).abs() / numeric.abs().max(analytic.abs()).max(1e-6);
    assert!(err < 2e-3, "{name}: analytic {analytic} vs finite differences {numeric} (relative error {err})");
}

#[test]
fn rms_norm_backward_matches_finite_differences() {
    let mut r = Rand::new(1);
    let (rows, d) = (4, 24);
    let x = r.vec(rows * d, 2.0);
    let w = weight(&r.vec(d, 1.5), &[d]);
    let dy = r.vec(rows * d, 1.0);
    let mut dx = t(&vec![0.0; rows * d], &[rows, d]);
    Cpu.rms_norm_backward(&t(&x, &[rows, d]), &w, 1e-6, &t(&dy, &[rows, d]), &mut dx).unwrap();
    check("rms_norm", &x, &dx.data, &dy, |x| Cpu.rms_norm(&t(x, &[rows, d]), &w, 1e-6).unwrap().data, 2);
}

#[test]
fn gated_gelu_backward_matches_finite_differences() {
    let mut r = Rand::new(3);
    let (rows, f) = (5, 16);
    let gu = r.vec(rows * 2 * f, 3.0);
    let dy = r.vec(rows * f, 1.0);
    for dropout in [None, Some(Dropout { p: 0.4, seed: 2, stream: 6 })] {
        let g = Cpu.gated_gelu_backward(&t(&gu, &[rows, 2 * f]), &t(&dy, &[rows, f]), dropout).unwrap();
        let forward = |x: &[f32]| Cpu.gated_gelu(&t(x, &[rows, 2 * f]), dropout).unwrap().data;
        check(&format!("gated_gelu dropout {dropout:?}"), &gu, &g.data, &dy, forward, 4);
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut r = Rand::new(5);
    let (b, l, h, dk) = (2, 7, 3, 8);
    let inner = h * dk;
    let table = weight(&r.vec(8 * h, 1.0), &[8, h]);
    let lengths = Cpu.upload_ids(&[7, 4], &[2]).unwrap();
    let drop = Some(Dropout { p: 0.3, seed: 5, stream: 77 });
    for (causal, bias, lens, scale, dropout) in [
        (false, Some(true), true, 1.0, None),
        (true, Some(false), false, 1.0, None),
        (false, None, true, 0.35, None),
        (false, Some(true), true, 1.0, drop),
        (true, Some(false), false, 1.0, drop),
        (false, None, true, 0.35, drop),
    ] {
        let spec = AttnSpec::<Cpu> {
            heads: h,
            d_kv: dk,
            scale,
            kv_len: l,
            key_lengths: if lens { Some(&lengths) } else { None },
            causal,
            q_offset: Position::At(0),
            bias: bias.map(|bidirectional| RelBias { table: &table, bidirectional, num_buckets: 8, max_distance: 12 }),
            dropout,
        };
        let shape = [b, l, inner];
        let (q, k, v) = (r.vec(b * l * inner, 1.0), r.vec(b * l * inner, 1.0), r.vec(b * l * inner, 1.0));
        let dout = r.vec(b * l * inner, 1.0);
        let qkv = Cpu.concat_last(&[&t(&q, &shape), &t(&k, &shape), &t(&v, &shape)]).unwrap();
        let fwd = Cpu.attention_train(AttnInputs::Qkv(&qkv), &spec).unwrap();
        let grads = Cpu.attention_backward(AttnInputs::Qkv(&qkv), &fwd, &t(&dout, &shape), &spec, None);
        let dqkv = grads.unwrap().qkv().unwrap();
        let [dq, dkk, dv]: [_; 3] = Cpu.split_last(&dqkv, &[inner; 3]).unwrap().try_into().ok().unwrap();
        let run = |q: &[f32], k: &[f32], v: &[f32]| {
            let (q, k, v) = (t(q, &shape), t(k, &shape), t(v, &shape));
            Cpu.attention(AttnInputs::Apart { q: &q, k: &k, v: &v }, &spec).unwrap().data
        };
        let what = format!("attention causal {causal} bias {bias:?} dropout {dropout:?}");
        check(&format!("{what} dq"), &q, &dq.data, &dout, |x| run(x, &k, &v), 6);
        check(&format!("{what} dk"), &k, &dkk.data, &dout, |x| run(&q, x, &v), 7);
        check(&format!("{what} dv"), &v, &dv.data, &dout, |x| run(&q, &k, x), 8);
    }
}

#[test]
fn linear_backward_matches_finite_differences() {
    let mut r = Rand::new(9);
    let (m, k, n, rank) = (6, 12, 20, 3);
    let x = r.vec(m * k, 1.0);
    let w = weight(&r.vec(n * k, 0.5), &[n, k]);
    let (a1, b1) = (r.vec(rank * k, 0.5), r.vec(8 * rank, 0.5));
    let (a2, b2) = (r.vec(rank * k, 0.5), r.vec(8 * rank, 0.5));
    let dy = r.vec(m * n, 1.0);
    for dropout in [None, Some(Dropout { p: 0.3, seed: 11, stream: 2 })] {
        let forward = |x: &[f32], a1: &[f32], b1: &[f32], a2: &[f32], b2: &[f32]| {
            let (ta1, tb1, ta2, tb2) = (t(a1, &[rank, k]), t(b1, &[8, rank]), t(a2, &[rank, k]), t(b2, &[8, rank]));
            let lora = [
                LoraRef { a: &ta1, b: &tb1, shadow: None, scale: 1.5, col: 0, dropout },
                LoraRef { a: &ta2, b: &tb2, shadow: None, scale: 1.5, col: 12, dropout },
            ];
            Cpu.linear_to(&t(x, &[m, k]), &w, &lora, detox::backend::Prec::F32).unwrap().data
        };
        let (ta1, tb1, ta2, tb2) = (t(&a1, &[rank, k]), t(&b1, &[8, rank]), t(&a2, &[rank, k]), t(&b2, &[8, rank]));
        let lora = [
            LoraRef { a: &ta1, b: &tb1, shadow: None, scale: 1.5, col: 0, dropout },
            LoraRef { a: &ta2, b: &tb2, shadow: None, scale: 1.5, col: 12, dropout },
        ];
        let mut dx = t(&vec![0.0; m * k], &[m, k]);
        let (mut ga1, mut gb1) = (t(&vec![0.0; rank * k], &[rank, k]), t(&vec![0.0; 8 * rank], &[8, rank]));
        let (mut ga2, mut gb2) = (t(&vec![0.0; rank * k], &[rank, k]), t(&vec![0.0; 8 * rank], &[8, rank]));
        let mut grads = [LoraGrad { a: &mut ga1, b: &mut gb1 }, LoraGrad { a: &mut ga2, b: &mut gb2 }];
        Cpu.linear_backward(&t(&x, &[m, k]), &w, &lora, &t(&dy, &[m, n]), Some(&mut dx), None, &mut grads).unwrap();
        let what = format!("linear dropout {dropout:?}");
        check(&format!("{what} dx"), &x, &dx.data, &dy, |v| forward(v, &a1, &b1, &a2, &b2), 12);
        check(&format!("{what} dA1"), &a1, &ga1.data, &dy, |v| forward(&x, v, &b1, &a2, &b2), 13);
        check(&format!("{what} dB1"), &b1, &gb1.data, &dy, |v| forward(&x, &a1, v, &a2, &b2), 14);
        check(&format!("{what} dA2"), &a2, &ga2.data, &dy, |v| forward(&x, &a1, &b1, v, &b2), 15);
        check(&format!("{what} dB2"), &b2, &gb2.data, &dy, |v| forward(&x, &a1, &b1, &a2, v), 16);
    }
}

#[test]
fn affine_backward_matches_finite_differences() {
    let mut r = Rand::new(17);
    let (m, k, n) = (5, 10, 2);
    let (x, w, bias) = (r.vec(m * k, 1.0), r.vec(n * k, 1.0), r.vec(n, 1.0));
    let dy = r.vec(m * n, 1.0);
    let mut dx = t(&vec![0.0; m * k], &[m, k]);
    let mut dw = t(&vec![0.0; n * k], &[n, k]);
    let mut db = t(&vec![0.0; n], &[n]);
    Cpu.affine_backward(&t(&x, &[m, k]), &t(&w, &[n, k]), &t(&dy, &[m, n]), Some(&mut dx), &mut dw, Some(&mut db))
        .unwrap();
    let f =
        |x: &[f32], w: &[f32], b: &[f32]| Cpu.affine(&t(x, &[m, k]), &t(w, &[n, k]), Some(&t(b, &[n]))).unwrap().data;
    check("affine dx", &x, &dx.data, &dy, |v| f(v, &w, &bias), 18);
    check("affine dw", &w, &dw.data, &dy, |v| f(&x, v, &bias), 19);
    check("affine db", &bias, &db.data, &dy, |v| f(&x, &w, v), 20);
}

#[test]
fn token_logprobs_backward_matches_finite_differences() {
    let mut r = Rand::new(21);
    let (n, v) = (4, 30);
    let logits = r.vec(n * v, 4.0);
    let tokens = Cpu.upload_ids(&[3, 0, 29, 17], &[n]).unwrap();
    let dlogp = r.vec(n, 1.0);
    let g = Cpu.token_logprobs_backward(&t(&logits, &[n, v]), &tokens, &t(&dlogp, &[n])).unwrap();
    check(
        "token log-probs",
        &logits,
        &g.data,
        &dlogp,
        |x| Cpu.token_logprobs(&t(x, &[n, v]), &tokens).unwrap().0.data,
        22,
    );
    // Entropy against its definition on a uniform row.
    let (_, ent) = Cpu.token_logprobs(&t(&vec![0.5; v], &[1, v]), &Cpu.upload_ids(&[0], &[1]).unwrap()).unwrap();
    assert!((ent.data[0] - (v as f32).ln()).abs() < 1e-5);
}

#[test]
fn dropout_is_its_own_backward_and_concat_inverts_split() {
    let mut r = Rand::new(23);
    let x = r.vec(60, 1.0);
    let d = Dropout { p: 0.25, seed: 4, stream: 9 };
    let y = Cpu.dropout(&t(&x, &[6, 10]), &d).unwrap();
    check(
        "dropout",
        &x,
        &Cpu.dropout(&t(&vec![1.0; 60], &[6, 10]), &d).unwrap().data,
        &vec![1.0; 60],
        |v| Cpu.dropout(&t(v, &[6, 10]), &d).unwrap().data,
        24,
    );
    assert!(y.data.iter().zip(&x).all(|(a, b)| *a == 0.0 || (a - b / 0.75).abs() < 1e-6));
    let parts = Cpu.split_last(&t(&x, &[6, 10]), &[3, 7]).unwrap();
    assert_eq!(Cpu.concat_last(&[&parts[0], &parts[1]]).unwrap().data, x);
}

#[test]
fn adam_matches_the_ppo_reference() {
    let mut r = Rand::new(25);
    let n = 40;
    let p0 = r.vec(n, 1.0);
    let (mut p, mut m, mut v) = (t(&p0, &[n]), t(&vec![0.0; n], &[n]), t(&vec![0.0; n], &[n]));
    let reference = oracles::Adam::new(1e-2);
    let mut state = oracles::AdamState::new(n);
    let mut pr = p0.clone();
    for step in 1..=3 {
        let g = r.vec(n, 1.0);
        let g = t(&g, &[n]);
        let slot = AdamSlot { p: &mut p, g: &g, m: &mut m, v: &mut v, weight_decay: 0.0, copy: None };
        let h = AdamStep { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, step, grad_scale: 1.0 };
        Cpu.adam(&mut [slot], &h).unwrap();
        reference.step(&mut pr, &g.data, &mut state).unwrap();
    }
    assert_eq!(p.data, pr, "the backend's Adam and the PPO reference agree bit for bit");
}

#[test]
fn weight_gradients_match_finite_differences() {
    let mut r = Rand::new(31);
    let (m, k, n) = (6, 10, 7);
    let x = r.vec(m * k, 1.0);
    let w = r.vec(n * k, 1.0);
    let dy = r.vec(m * n, 1.0);
    let mut dw = t(&vec![0.0; n * k], &[n, k]);
    Cpu.linear_backward(&t(&x, &[m, k]), &weight(&w, &[n, k]), &[], &t(&dy, &[m, n]), None, Some(&mut dw), &mut [])
        .unwrap();
    let lin = |w: &[f32]| Cpu.linear(&t(&x, &[m, k]), &weight(w, &[n, k]), &[]).unwrap().data;
    check("linear weight", &w, &dw.data, &dy, lin, 32);

    let (rows, d) = (5, 12);
    let x = r.vec(rows * d, 2.0);
    let g = r.vec(d, 1.5);
    let dy = r.vec(rows * d, 1.0);
    let mut dg = t(&vec![0.0; d], &[d]);
    Cpu.rms_norm_weight_grad(&t(&x, &[rows, d]), 1e-6, &t(&dy, &[rows, d]), &mut dg).unwrap();
    check(
        "rms_norm weight",
        &g,
        &dg.data,
        &dy,
        |g| Cpu.rms_norm(&t(&x, &[rows, d]), &weight(g, &[d]), 1e-6).unwrap().data,
        33,
    );

    let (vocab, d) = (9, 4);
    let table = r.vec(vocab * d, 1.0);
    let ids = Cpu.upload_ids(&[3, 0, 3, 8, 1], &[5]).unwrap();
    let dy = r.vec(5 * d, 1.0);
    let mut dt = t(&vec![0.0; vocab * d], &[vocab, d]);
    Cpu.embedding_backward(&ids, &t(&dy, &[5, d]), &mut dt).unwrap();
    check("embedding", &table, &dt.data, &dy, |tb| Cpu.embedding(&weight(tb, &[vocab, d]), &ids).unwrap().data, 34);
}

#[test]
fn attention_bias_gradient_matches_finite_differences() {
    let mut r = Rand::new(35);
    let (b, l, h, dk, buckets) = (2, 9, 3, 4, 8);
    let inner = h * dk;
    let shape = [b, l, inner];
    let (q, k, v) = (r.vec(b * l * inner, 1.0), r.vec(b * l * inner, 1.0), r.vec(b * l * inner, 1.0));
    let dout = r.vec(b * l * inner, 1.0);
    let table = r.vec(buckets * h, 1.0);
    let lengths = Cpu.upload_ids(&[9, 5], &[2]).unwrap();
    let drop = Some(Dropout { p: 0.25, seed: 8, stream: 3 });
    for (causal, bidirectional, lens, dropout) in
        [(false, true, true, None), (true, false, false, None), (false, true, true, drop), (true, false, false, drop)]
    {
        let run = |tb: &[f32]| {
            let w = weight(tb, &[buckets, h]);
            let spec = AttnSpec::<Cpu> {
                heads: h,
                d_kv: dk,
                scale: 1.0,
                kv_len: l,
                key_lengths: if lens { Some(&lengths) } else { None },
                causal,
                q_offset: Position::At(0),
                bias: Some(RelBias { table: &w, bidirectional, num_buckets: buckets, max_distance: 7 }),
                dropout,
            };
            let (q, k, v) = (t(&q, &shape), t(&k, &shape), t(&v, &shape));
            Cpu.attention(AttnInputs::Apart { q: &q, k: &k, v: &v }, &spec).unwrap().data
        };
        let w = weight(&table, &[buckets, h]);
        let spec = AttnSpec::<Cpu> {
            heads: h,
            d_kv: dk,
            scale: 1.0,
            kv_len: l,
            key_lengths: if lens { Some(&lengths) } else { None },
            causal,
            q_offset: Position::At(0),
            bias: Some(RelBias { table: &w, bidirectional, num_buckets: buckets, max_distance: 7 }),
            dropout,
        };
        let mut dt = t(&vec![0.0; buckets * h], &[buckets, h]);
        let qkv = Cpu.concat_last(&[&t(&q, &shape), &t(&k, &shape), &t(&v, &shape)]).unwrap();
        let fwd = Cpu.attention_train(AttnInputs::Qkv(&qkv), &spec).unwrap();
        Cpu.attention_backward(AttnInputs::Qkv(&qkv), &fwd, &t(&dout, &shape), &spec, Some(&mut dt)).unwrap();
        check(&format!("attention bias causal {causal} dropout {dropout:?}"), &table, &dt.data, &dout, run, 36);
    }
}

#[test]
fn adamw_decays_before_the_update() {
    let (mut p, mut m, mut v) = (t(&[1.0, -2.0], &[2]), t(&[0.0, 0.0], &[2]), t(&[0.0, 0.0], &[2]));
    let h = AdamStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 1, grad_scale: 1.0 };
    let g = t(&[0.0, 0.0], &[2]);
    Cpu.adam(&mut [AdamSlot { p: &mut p, g: &g, m: &mut m, v: &mut v, weight_decay: 0.5, copy: None }], &h).unwrap();
    // torch.optim.AdamW with a zero gradient: only the decay moves p.
    assert_eq!(p.data, vec![0.95, -1.9]);
}

#[test]
fn cross_entropy_matches_finite_differences_and_its_definition() {
    let mut r = Rand::new(60);
    let (n, v) = (4, 30);
    let logits = r.vec(n * v, 4.0);
    let targets = Cpu.upload_ids(&[3, 0, 29, 17], &[n]).unwrap();
    let weights = [0.7f32, 1.0, 0.0, 2.0];
    let wt = t(&weights, &[n]);
    for smoothing in [0.0f32, 0.1] {
        let (loss, g) = Cpu.cross_entropy(&t(&logits, &[n, v]), &targets, &wt, smoothing).unwrap();
        check(
            &format!("cross-entropy, smoothing {smoothing}"),
            &logits,
            &g.data,
            &weights,
            |x| Cpu.cross_entropy(&t(x, &[n, v]), &targets, &wt, smoothing).unwrap().0.data,
            61,
        );
        // torch's definition: (1 − ε)·NLL + ε · (mean over the vocabulary of −log p).
        for (row, (&tok, &got)) in targets.data.iter().zip(&loss.data).enumerate() {
            let mut lp = logits[row * v..(row + 1) * v].to_vec();
            log_softmax_row(&mut lp);
            let want = -(1.0 - smoothing) * lp[tok as usize] - smoothing * lp.iter().sum::<f32>() / v as f32;
            assert!((got - want).abs() < 1e-5, "row {row}: loss {got} vs {want}");
        }
    }
}

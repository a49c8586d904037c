//! The training operations (backward forms, dropout, token log-probabilities, Adam, Adafactor, Σx²) of a
//! backend against the CPU reference on fresh random inputs, every branch of the CUDA forms: LoRA
//! branches at column offsets with and without dropout and half shadows, attention with and without
//! bias, padding and causality on the tensor-core and the plain head sizes, f32 and half inputs.
//! Inputs are rounded to fp16 first so that both backends read the same values; errors are
//! relative L2.

use crate::common::{Case, F32, HALF, Rand, close, weight};
use detox::backend::AdafactorOptions;
use detox::backend::cpu::Cpu;
use detox::backend::prelude::*;
use detox::backend::{
    AdamSlot, AdamStep, AttnGrads, AttnInputs, AttnSpec, Dropout, LoraGrad, LoraRef, Position, RelBias, Shaped,
};
use half::f16;

/// `t` as the half activation a GPU forward pass would hand over (the backend's half copy), when
/// the backend keeps one; the values are the same, since inputs are fp16-exact.
fn half_copy<B: Backend>(be: &B, t: &B::Tensor) -> Option<B::Tensor> {
    be.matmul_copy(t).unwrap()
}

fn dropout_case<B: Backend>(be: &B, r: &mut Rand, shape: &[usize], d: &Dropout, what: &str) {
    let n = shape.iter().product();
    let x = r.vec(n, 2.0);
    let want = Cpu.dropout(&Cpu.upload(&x, shape).unwrap(), d).unwrap().data;
    let xg = be.upload(&x, shape).unwrap();
    // One f32 multiply by the same scale: the f32 form equals the CPU bit for bit.
    assert_eq!(be.download(&be.dropout(&xg, d).unwrap()).unwrap(), want, "{what}");
    if let Some(xh) = half_copy(be, &xg) {
        let got = be.download(&be.dropout(&xh, d).unwrap()).unwrap();
        let same_mask = got.iter().zip(&want).all(|(g, w)| (*g == 0.0) == (*w == 0.0));
        assert!(same_mask, "{what}, half: the mask differs from the CPU's");
        close(&got, &want, HALF, &format!("{what}, half"));
    }
}

/// Dropout, one case per shape and rate: one value, sizes past a block, p 0 and 0.5, and a few
/// rows at flan-t5-base's d_model.
pub fn dropout_matches_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    let rows: [(Vec<usize>, f32, u64, u64); 5] = [
        (vec![1], 0.1, 1, 0),
        (vec![4099], 0.1, 7, 3),
        (vec![40, 501], 0.5, 8, 11),
        (vec![300], 0.0, 2, 2),
        (vec![3, 768], 0.1, 5, 6),
    ];
    rows.into_iter()
        .enumerate()
        .map(|(i, (shape, p, seed, stream))| {
            let name = format!("dropout [shape={shape:?} p={p}]");
            let what = name.clone();
            Case::new(name, move |be: &B| {
                dropout_case(be, &mut Rand::new(101 + 100 * i as u64), &shape, &Dropout { p, seed, stream }, &what)
            })
        })
        .collect()
}

/// A stacked projection of three `n / 3`-wide modules, adapters (ranks `ranks`) on the first and
/// the last; the middle module's columns of dy reach no branch. `branches` of them take part.
fn linear_backward_case<B: Backend>(
    be: &B,
    r: &mut Rand,
    (m, k, n, ranks): (usize, usize, usize, [usize; 2]),
    branches: usize,
    what: &str,
) {
    let module = n / 3;
    let x = r.vec(m * k, 1.0);
    let w = r.vec(n * k, 0.2);
    let dy = r.vec(m * n, 1.0);
    let (xc, xg) = (Cpu.upload(&x, &[m, k]).unwrap(), be.upload(&x, &[m, k]).unwrap());
    let xh = half_copy(be, &xg);
    let (wc, wg) = (weight(&Cpu, &w, &[n, k]), weight(be, &w, &[n, k]));
    let (dyc, dyg) = (Cpu.upload(&dy, &[m, n]).unwrap(), be.upload(&dy, &[m, n]).unwrap());
    let cols = [0, 2 * module];
    let scales = [1.5, 0.5];
    let adapters: Vec<_> = ranks
        .iter()
        .map(|&rank| {
            let a = r.vec(rank * k, 0.2);
            let b = r.vec(module * rank, 0.2);
            (
                Cpu.upload(&a, &[rank, k]).unwrap(),
                Cpu.upload(&b, &[module, rank]).unwrap(),
                be.upload(&a, &[rank, k]).unwrap(),
                be.upload(&b, &[module, rank]).unwrap(),
            )
        })
        .collect();
    let shadows: Vec<_> =
        adapters.iter().map(|(_, _, a, b)| (be.matmul_copy(a).unwrap(), be.matmul_copy(b).unwrap())).collect();
    for half_x in [false, true] {
        let xin = match (half_x, &xh) {
            (false, _) => &xg,
            (true, Some(h)) => h,
            (true, None) => continue,
        };
        {
            for dropout in [None, Some(Dropout { p: 0.1, seed: 9, stream: 4 })] {
                for use_shadow in [false, true] {
                    for with_dx in [false, true] {
                        let what = format!("{what}: half x {half_x}, {dropout:?}, shadow {use_shadow}, dx {with_dx}");
                        let lc: Vec<LoraRef<Cpu>> = (0..branches)
                            .map(|i| LoraRef {
                                a: &adapters[i].0,
                                b: &adapters[i].1,
                                shadow: None,
                                scale: scales[i],
                                col: cols[i],
                                dropout,
                            })
                            .collect();
                        let lg: Vec<LoraRef<B>> = (0..branches)
                            .map(|i| LoraRef {
                                a: &adapters[i].2,
                                b: &adapters[i].3,
                                shadow: match &shadows[i] {
                                    (Some(sa), Some(sb)) if use_shadow => Some((sa, sb)),
                                    _ => None,
                                },
                                scale: scales[i],
                                col: cols[i],
                                dropout,
                            })
                            .collect();
                        // Gradients accumulate: start them from random values.
                        let init: Vec<(Vec<f32>, Vec<f32>)> =
                            (0..branches).map(|i| (r.vec(ranks[i] * k, 0.1), r.vec(module * ranks[i], 0.1))).collect();
                        let mut gc: Vec<_> = init
                            .iter()
                            .zip(ranks)
                            .map(|((a, b), rank)| {
                                (Cpu.upload(a, &[rank, k]).unwrap(), Cpu.upload(b, &[module, rank]).unwrap())
                            })
                            .collect();
                        let mut gg: Vec<_> = init
                            .iter()
                            .zip(ranks)
                            .map(|((a, b), rank)| {
                                (be.upload(a, &[rank, k]).unwrap(), be.upload(b, &[module, rank]).unwrap())
                            })
                            .collect();
                        let dx0 = r.vec(m * k, 1.0);
                        let mut dxc = Cpu.upload(&dx0, &[m, k]).unwrap();
                        let mut dxg = be.upload(&dx0, &[m, k]).unwrap();
                        {
                            let mut grads_c: Vec<LoraGrad<Cpu>> =
                                gc.iter_mut().map(|(a, b)| LoraGrad { a, b }).collect();
                            let mut grads_g: Vec<LoraGrad<B>> = gg.iter_mut().map(|(a, b)| LoraGrad { a, b }).collect();
                            Cpu.linear_backward(&xc, &wc, &lc, &dyc, with_dx.then_some(&mut dxc), None, &mut grads_c)
                                .unwrap();
                            be.linear_backward(xin, &wg, &lg, &dyg, with_dx.then_some(&mut dxg), None, &mut grads_g)
                                .unwrap();
                        }
                        let dx_got = be.download(&dxg).unwrap();
                        if with_dx {
                            close(&dx_got, &dxc.data, HALF, &format!("{what}: dx"));
                        } else {
                            assert_eq!(dx_got, dx0, "{what}: dx changed without being asked for");
                        }
                        for (i, ((ac, bc), (ag, bg))) in gc.iter().zip(&gg).enumerate() {
                            close(&be.download(ag).unwrap(), &ac.data, HALF, &format!("{what}: A{i} gradient"));
                            close(&be.download(bg).unwrap(), &bc.data, HALF, &format!("{what}: B{i} gradient"));
                        }
                    }
                }
            }
        }
    }
}

/// linear_backward, one case per shape × number of LoRA branches: the original 32-wide modules,
/// an odd size, one row at flan-t5-base's stacked q/k/v widths, a few rows of its feed-forward
/// output projection.
pub fn linear_backward_matches_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    let shapes = [(37, 96, 96, [8, 4]), (5, 50, 75, [3, 2]), (1, 768, 2304, [8, 8]), (3, 2048, 768, [4, 8])];
    let mut cases = Vec::new();
    for (i, shape) in shapes.into_iter().enumerate() {
        let (m, k, n, ranks) = shape;
        for branches in 0..=2 {
            let name = format!("linear_backward [rows={m} in={k} out={n} lora={branches}×r{ranks:?}]");
            let what = name.clone();
            let seed = 102 + 100 * (3 * i + branches) as u64;
            cases.push(Case::new(name, move |be: &B| {
                linear_backward_case(be, &mut Rand::new(seed), shape, branches, &what)
            }));
        }
    }
    cases
}

fn affine_backward_case<B: Backend>(be: &B, r: &mut Rand, m: usize, k: usize, n: usize, what: &str) {
    let x = r.vec(m * k, 1.0);
    let w = r.vec(n * k, 0.5);
    let dy = r.vec(m * n, 1.0);
    let (xc, xg) = (Cpu.upload(&x, &[m, k]).unwrap(), be.upload(&x, &[m, k]).unwrap());
    let xh = half_copy(be, &xg);
    let (wc, wg) = (Cpu.upload(&w, &[n, k]).unwrap(), be.upload(&w, &[n, k]).unwrap());
    let (dyc, dyg) = (Cpu.upload(&dy, &[m, n]).unwrap(), be.upload(&dy, &[m, n]).unwrap());
    for half_x in [false, true] {
        let xin = match (half_x, &xh) {
            (false, _) => &xg,
            (true, Some(h)) => h,
            (true, None) => continue,
        };
        for (with_dx, with_db) in [(false, false), (true, false), (false, true), (true, true)] {
            let what = format!("{what}: half x {half_x}, dx {with_dx}, db {with_db}");
            let (dx0, dw0, db0) = (r.vec(m * k, 1.0), r.vec(n * k, 1.0), r.vec(n, 1.0));
            let (mut dxc, mut dxg) = (Cpu.upload(&dx0, &[m, k]).unwrap(), be.upload(&dx0, &[m, k]).unwrap());
            let (mut dwc, mut dwg) = (Cpu.upload(&dw0, &[n, k]).unwrap(), be.upload(&dw0, &[n, k]).unwrap());
            let (mut dbc, mut dbg) = (Cpu.upload(&db0, &[n]).unwrap(), be.upload(&db0, &[n]).unwrap());
            Cpu.affine_backward(&xc, &wc, &dyc, with_dx.then_some(&mut dxc), &mut dwc, with_db.then_some(&mut dbc))
                .unwrap();
            be.affine_backward(xin, &wg, &dyg, with_dx.then_some(&mut dxg), &mut dwg, with_db.then_some(&mut dbg))
                .unwrap();
            close(&be.download(&dxg).unwrap(), &dxc.data, HALF, &format!("{what}: dx"));
            close(&be.download(&dwg).unwrap(), &dwc.data, HALF, &format!("{what}: dw"));
            // The bias gradient sums f32 dy in f32.
            close(&be.download(&dbg).unwrap(), &dbc.data, F32, &format!("{what}: db"));
        }
    }
}

/// affine_backward, one case per shape: the value head (one output) and a few outputs, at small
/// and flan-t5-base widths, one row.
pub fn affine_backward_matches_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    // The value head (one output) and a few outputs.
    [(45, 64, 1), (19, 96, 3), (1, 768, 1), (6, 768, 2)]
        .into_iter()
        .enumerate()
        .map(|(i, (m, k, n))| {
            let name = format!("affine_backward [rows={m} in={k} out={n}]");
            let what = name.clone();
            Case::new(name, move |be: &B| {
                affine_backward_case(be, &mut Rand::new(103 + 100 * i as u64), m, k, n, &what)
            })
        })
        .collect()
}

fn rms_norm_backward_case<B: Backend>(be: &B, r: &mut Rand, rows: usize, d: usize, what: &str) {
    let x = r.vec(rows * d, 3.0);
    let w = r.vec(d, 2.0);
    let dy = r.vec(rows * d, 1.0);
    let dx0 = r.vec(rows * d, 1.0);
    let (xc, xg) = (Cpu.upload(&x, &[rows, d]).unwrap(), be.upload(&x, &[rows, d]).unwrap());
    let xh = half_copy(be, &xg);
    let (wc, wg) = (weight(&Cpu, &w, &[d]), weight(be, &w, &[d]));
    let (dyc, dyg) = (Cpu.upload(&dy, &[rows, d]).unwrap(), be.upload(&dy, &[rows, d]).unwrap());
    let mut dxc = Cpu.upload(&dx0, &[rows, d]).unwrap();
    Cpu.rms_norm_backward(&xc, &wc, 1e-6, &dyc, &mut dxc).unwrap();
    for xin in std::iter::once(&xg).chain(xh.as_ref()) {
        let mut dxg = be.upload(&dx0, &[rows, d]).unwrap();
        be.rms_norm_backward(xin, &wg, 1e-6, &dyg, &mut dxg).unwrap();
        // A half x holds the same values, and the kernel computes in f32 either way.
        close(&be.download(&dxg).unwrap(), &dxc.data, F32, what);
    }
}

/// rms_norm_backward, one case per shape: odd widths, one row, flan-t5-base's d_model.
pub fn rms_norm_backward_matches_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    [(5, 48), (33, 512), (3, 768), (1, 768), (7, 1001)]
        .into_iter()
        .enumerate()
        .map(|(i, (rows, d))| {
            let name = format!("rms_norm_backward [rows={rows} d={d}]");
            let what = name.clone();
            Case::new(name, move |be: &B| {
                rms_norm_backward_case(be, &mut Rand::new(104 + 100 * i as u64), rows, d, &what)
            })
        })
        .collect()
}

fn gated_gelu_backward_case<B: Backend>(
    be: &B,
    r: &mut Rand,
    (rows, f): (usize, usize),
    dropout: Option<Dropout>,
    what: &str,
) {
    let gu = r.vec(rows * 2 * f, 3.0);
    let dy = r.vec(rows * f, 1.0);
    let (gc, gg) = (Cpu.upload(&gu, &[rows, 2 * f]).unwrap(), be.upload(&gu, &[rows, 2 * f]).unwrap());
    let gh = half_copy(be, &gg);
    let (dyc, dyg) = (Cpu.upload(&dy, &[rows, f]).unwrap(), be.upload(&dy, &[rows, f]).unwrap());
    let want = Cpu.gated_gelu_backward(&gc, &dyc, dropout).unwrap();
    for gin in std::iter::once(&gg).chain(gh.as_ref()) {
        let got = be.gated_gelu_backward(gin, &dyg, dropout).unwrap();
        close(&be.download(&got).unwrap(), &want.data, HALF, what);
    }
}

/// gated_gelu_backward, one case per shape and dropout: an odd width, one and a few rows at
/// flan-t5-base's d_ff, with T5's FFN dropout of its hidden drawn again.
pub fn gated_gelu_backward_matches_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    let drop = Some(Dropout { p: 0.1, seed: 12, stream: 1 << 40 | 3 << 8 | 5 });
    [((23, 48), None), ((4, 2048), None), ((1, 2048), None), ((5, 1001), None), ((23, 48), drop), ((4, 2048), drop)]
        .into_iter()
        .enumerate()
        .map(|(i, ((rows, f), dropout))| {
            let p = dropout.map_or(0.0, |d| d.p);
            let name = format!("gated_gelu_backward [rows={rows} d_ff={f} dropout={p}]");
            let what = name.clone();
            Case::new(name, move |be: &B| {
                gated_gelu_backward_case(be, &mut Rand::new(105 + 100 * i as u64), (rows, f), dropout, &what)
            })
        })
        .collect()
}

/// T5's dropout sites outside attention: the gated-gelu's fused dropout of its output (f32 and half
/// inputs), and `dropout_add` of a sublayer's f32 output into the residual stream. The mask must be
/// the CPU's element for element.
fn dropout_site_case<B: Backend>(be: &B, r: &mut Rand, (rows, f): (usize, usize), d: Dropout, what: &str) {
    let gu = r.vec(rows * 2 * f, 3.0);
    let gg = be.upload(&gu, &[rows, 2 * f]).unwrap();
    let want = Cpu.gated_gelu(&Cpu.upload(&gu, &[rows, 2 * f]).unwrap(), Some(d)).unwrap().data;
    for gin in std::iter::once(&gg).chain(half_copy(be, &gg).as_ref()) {
        let got = be.download(&be.gated_gelu(gin, Some(d)).unwrap()).unwrap();
        assert!(got.iter().zip(&want).all(|(g, w)| (*g == 0.0) == (*w == 0.0)), "{what}: gated_gelu mask");
        close(&got, &want, HALF, &format!("{what}: gated_gelu"));
    }
    let (acc, x) = (r.vec(rows * f, 1.0), r.vec(rows * f, 2.0));
    let mut want = Cpu.upload(&acc, &[rows, f]).unwrap();
    Cpu.dropout_add(&mut want, &Cpu.upload(&x, &[rows, f]).unwrap(), &d).unwrap();
    let mut got = be.upload(&acc, &[rows, f]).unwrap();
    be.dropout_add(&mut got, &be.upload(&x, &[rows, f]).unwrap(), &d).unwrap();
    close(&be.download(&got).unwrap(), &want.data, F32, &format!("{what}: dropout_add"));
}

/// The dropout sites' ops, one case per shape: a few rows, an odd width, flan-t5-base's d_ff.
pub fn dropout_sites_match_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    [((7, 48), 0.1), ((3, 1001), 0.5), ((4, 2048), 0.1)]
        .into_iter()
        .enumerate()
        .map(|(i, ((rows, f), p))| {
            let name = format!("dropout sites [rows={rows} width={f} p={p}]");
            let what = name.clone();
            let d = Dropout { p, seed: 40 + i as u64, stream: 7 };
            Case::new(name, move |be: &B| dropout_site_case(be, &mut Rand::new(140 + i as u64), (rows, f), d, &what))
        })
        .collect()
}

/// One attention configuration for the backward on both backends.
#[derive(Clone)]
struct AttnCase {
    b: usize,
    lq: usize,
    cap: usize,
    kv_len: usize,
    h: usize,
    dk: usize,
    causal: bool,
    q_offset: usize,
    /// Take the offset from a device counter (keys `0..q_offset + lq` then take part).
    counter: bool,
    lengths: Option<Vec<u32>>,
    /// Some(bidirectional) for a position bias.
    bias: Option<bool>,
    scale: f32,
    /// Hand q, k and v over as half copies, as the forward's projections make them.
    half_inputs: bool,
    /// Dropout on the probabilities with this rate (then the forward is compared too).
    dropout: Option<f32>,
}

fn attention_backward_case<B: Backend>(be: &B, r: &mut Rand, c: &AttnCase, what: &str) {
    let inner = c.h * c.dk;
    let qs = [c.b, c.lq, inner];
    let ks = [c.b, c.cap, inner];
    let q = r.vec(c.b * c.lq * inner, 1.0);
    let k = r.vec(c.b * c.cap * inner, 1.0);
    let v = r.vec(c.b * c.cap * inner, 1.0);
    let dout = r.vec(c.b * c.lq * inner, 1.0);
    let table = r.vec(32 * c.h, 2.0);
    let (tc, tg) = (weight(&Cpu, &table, &[32, c.h]), weight(be, &table, &[32, c.h]));
    let (cc, cg) =
        (Cpu.upload_ids(&[c.q_offset as u32], &[1]).unwrap(), be.upload_ids(&[c.q_offset as u32], &[1]).unwrap());
    let (off_c, off_g) = if c.counter {
        (Position::Counter(&cc), Position::Counter(&cg))
    } else {
        (Position::At(c.q_offset), Position::At(c.q_offset))
    };
    let lens_c = c.lengths.as_ref().map(|l| Cpu.upload_ids(l, &[c.b]).unwrap());
    let lens_g = c.lengths.as_ref().map(|l| be.upload_ids(l, &[c.b]).unwrap());
    let bias_c = c.bias.map(|bidirectional| RelBias { table: &tc, bidirectional, num_buckets: 32, max_distance: 128 });
    let bias_g = c.bias.map(|bidirectional| RelBias { table: &tg, bidirectional, num_buckets: 32, max_distance: 128 });
    let drop = c.dropout.map(|p| Dropout { p, seed: 21, stream: 1 << 8 | 2 });
    let spec_c = AttnSpec::<Cpu> {
        heads: c.h,
        d_kv: c.dk,
        scale: c.scale,
        kv_len: c.kv_len,
        key_lengths: lens_c.as_ref(),
        causal: c.causal,
        q_offset: off_c,
        bias: bias_c,
        dropout: drop,
    };
    let spec_g = AttnSpec::<B> {
        heads: c.h,
        d_kv: c.dk,
        scale: c.scale,
        kv_len: c.kv_len,
        key_lengths: lens_g.as_ref(),
        causal: c.causal,
        q_offset: off_g,
        bias: bias_g,
        dropout: drop,
    };
    // Gradients add into the bias table: both start from the same values.
    let start = r.vec(32 * c.h, 1.0);
    let mut table_c = c.bias.map(|_| Cpu.upload(&start, &[32, c.h]).unwrap());
    let mut table_g = c.bias.map(|_| be.upload(&start, &[32, c.h]).unwrap());
    let (qc, kc, vc) = (Cpu.upload(&q, &qs).unwrap(), Cpu.upload(&k, &ks).unwrap(), Cpu.upload(&v, &ks).unwrap());
    let kvc = Cpu.concat_last(&[&kc, &vc]).unwrap();
    let fwd_c = Cpu.attention_train(AttnInputs::Apart { q: &qc, k: &kc, v: &vc }, &spec_c).unwrap();
    let dout_c = Cpu.upload(&dout, &qs).unwrap();
    let (dq_c, dkv_c) = Cpu
        .attention_backward(AttnInputs::QAndKv { q: &qc, kv: &kvc }, &fwd_c, &dout_c, &spec_c, table_c.as_mut())
        .unwrap()
        .q_kv()
        .unwrap();
    let [dk_c, dv_c]: [_; 2] = Cpu.split_last(&dkv_c, &[inner, inner]).unwrap().try_into().ok().unwrap();
    // Self-attention's shapes take the stacked q/k/v layout, the others q apart from the stacked
    // k/v: the layouts of the projections that make them, read and written with their strides.
    let (qg, kg, vg) = (be.upload(&q, &qs).unwrap(), be.upload(&k, &ks).unwrap(), be.upload(&v, &ks).unwrap());
    let (qg, kvg) = match c.lq == c.cap {
        true => (None, be.concat_last(&[&qg, &kg, &vg]).unwrap()),
        false => (Some(qg), be.concat_last(&[&kg, &vg]).unwrap()),
    };
    let half = |t: &B::Tensor| if c.half_inputs { half_copy(be, t) } else { None };
    let (qh, kvh) = (qg.as_ref().and_then(half), half(&kvg));
    let kv = kvh.as_ref().unwrap_or(&kvg);
    let x = match qg.as_ref() {
        Some(q) => AttnInputs::QAndKv { q: qh.as_ref().unwrap_or(q), kv },
        None => AttnInputs::Qkv(kv),
    };
    // The training forward: its output, and each row's log-sum-exp (+∞ on both sides for a row
    // without keys), which the backward reads.
    let fwd_g = be.attention_train(x, &spec_g).unwrap();
    close(&be.download(&fwd_g.out).unwrap(), &fwd_c.out.data, 3e-3, &format!("{what}: forward"));
    let lse_g = be.download(&fwd_g.lse).unwrap();
    assert_eq!(lse_g.len(), fwd_c.lse.data.len(), "{what}: lse size");
    let keyless: Vec<usize> = (0..lse_g.len()).filter(|&i| fwd_c.lse.data[i].is_infinite()).collect();
    assert!(keyless.iter().all(|&i| lse_g[i] == f32::INFINITY), "{what}: lse of rows without keys");
    let finite = |x: &[f32]| -> Vec<f32> { x.iter().copied().filter(|v| v.is_finite()).collect() };
    close(&finite(&lse_g), &finite(&fwd_c.lse.data), F32 * 10.0, &format!("{what}: lse"));
    let grads = be.attention_backward(x, &fwd_g, &be.upload(&dout, &qs).unwrap(), &spec_g, table_g.as_mut()).unwrap();
    let (dq_g, dk_g, dv_g) = match grads {
        AttnGrads::Qkv(t) => {
            assert_eq!(t.shape(), [c.b, c.lq, 3 * inner], "{what}: dqkv shape");
            let [q, k, v]: [_; 3] = be.split_last(&t, &[inner; 3]).unwrap().try_into().ok().unwrap();
            (q, k, v)
        }
        AttnGrads::QAndKv { q, kv } => {
            assert_eq!(kv.shape(), [c.b, c.cap, 2 * inner], "{what}: dkv shape");
            let [k, v]: [_; 2] = be.split_last(&kv, &[inner; 2]).unwrap().try_into().ok().unwrap();
            (q, k, v)
        }
    };
    assert_eq!(dq_g.shape(), qs, "{what}: dq shape");
    assert_eq!(dk_g.shape(), ks, "{what}: dk shape");
    assert_eq!(dv_g.shape(), ks, "{what}: dv shape");
    close(&be.download(&dq_g).unwrap(), &dq_c.data, HALF, &format!("{what}: dq"));
    close(&be.download(&dk_g).unwrap(), &dk_c.data, HALF, &format!("{what}: dk"));
    close(&be.download(&dv_g).unwrap(), &dv_c.data, HALF, &format!("{what}: dv"));
    if let (Some(want), Some(got)) = (&table_c, &table_g) {
        close(&be.download(got).unwrap(), &want.data, HALF, &format!("{what}: bias table gradient"));
    }
}

/// The attention-backward table: (what, shape and variant) cases, each on its own inputs.
fn attention_backward_table() -> Vec<(&'static str, AttnCase)> {
    let base = AttnCase {
        b: 2,
        lq: 70,
        cap: 70,
        kv_len: 70,
        h: 2,
        dk: 64,
        causal: false,
        q_offset: 0,
        counter: false,
        lengths: None,
        bias: None,
        scale: 1.0,
        half_inputs: false,
        dropout: None,
    };
    vec![
        // encoder: bidirectional bias, padded keys (one row with a single key), several query and
        // key tiles
        (
            "encoder, d_kv 64",
            AttnCase {
                b: 3,
                lq: 150,
                cap: 150,
                kv_len: 150,
                h: 4,
                lengths: Some(vec![150, 77, 1]),
                bias: Some(true),
                ..base.clone()
            },
        ),
        // teacher-forced decoder: causal with the unidirectional bias, half inputs
        ("decoder, d_kv 64", AttnCase { causal: true, bias: Some(false), half_inputs: true, ..base.clone() }),
        // cross-attention: no bias, padded encoder keys, one row with none at all
        (
            "cross, d_kv 64",
            AttnCase { b: 3, lq: 40, cap: 130, kv_len: 130, lengths: Some(vec![130, 60, 0]), ..base.clone() },
        ),
        (
            "encoder, d_kv 20",
            AttnCase {
                lq: 70,
                h: 3,
                dk: 20,
                lengths: Some(vec![70, 33]),
                bias: Some(true),
                half_inputs: true,
                ..base.clone()
            },
        ),
        (
            "decoder, d_kv 20",
            AttnCase { lq: 45, cap: 45, kv_len: 45, dk: 20, causal: true, bias: Some(false), ..base.clone() },
        ),
        (
            "cross, d_kv 20, scaled",
            AttnCase {
                lq: 9,
                cap: 80,
                kv_len: 80,
                h: 3,
                dk: 20,
                lengths: Some(vec![80, 17]),
                scale: 0.2236,
                ..base.clone()
            },
        ),
        // the fixtures' head size, on the tensor cores
        (
            "decoder, d_kv 16",
            AttnCase { lq: 33, cap: 33, kv_len: 33, h: 3, dk: 16, causal: true, bias: Some(false), ..base.clone() },
        ),
        // continued after a prefix with spare cache capacity: keys past kv_len get zero gradients
        (
            "causal continuation, d_kv 32",
            AttnCase {
                lq: 80,
                cap: 110,
                kv_len: 100,
                h: 3,
                dk: 32,
                causal: true,
                q_offset: 20,
                bias: Some(false),
                scale: 0.5,
                ..base.clone()
            },
        ),
        // the same with the offset in a device counter (keys 0..q_offset + lq)
        (
            "causal continuation, counter",
            AttnCase {
                lq: 30,
                cap: 64,
                kv_len: 64,
                causal: true,
                q_offset: 20,
                counter: true,
                bias: Some(false),
                ..base.clone()
            },
        ),
        // plain forms of other row sizes
        ("d_kv 48", AttnCase { lq: 66, cap: 66, kv_len: 66, dk: 48, lengths: Some(vec![66, 40]), ..base.clone() }),
        (
            "d_kv 128",
            AttnCase { b: 1, lq: 40, cap: 40, kv_len: 40, dk: 128, causal: true, bias: Some(false), ..base.clone() },
        ),
        // relative positions past max_distance 128, where the bias gradient's end sums and whole
        // tiles past the clamp come in, on the tensor cores and the plain form
        (
            "encoder past the clamp, d_kv 64",
            AttnCase {
                lq: 300,
                cap: 300,
                kv_len: 300,
                lengths: Some(vec![300, 190]),
                bias: Some(true),
                ..base.clone()
            },
        ),
        (
            "decoder past the clamp, d_kv 64",
            AttnCase { b: 1, lq: 280, cap: 280, kv_len: 280, causal: true, bias: Some(false), ..base.clone() },
        ),
        (
            "encoder past the clamp, d_kv 20",
            AttnCase { b: 1, lq: 200, cap: 200, kv_len: 200, dk: 20, bias: Some(true), ..base.clone() },
        ),
        // d_kv 64 (the fast kernels) at lengths that are no multiple of a tile
        (
            "cross, d_kv 64, odd lengths",
            AttnCase { lq: 17, cap: 31, kv_len: 31, h: 4, lengths: Some(vec![31, 5]), ..base.clone() },
        ),
    ]
}

/// `[B=2 Lq=5 Lk=7/8 H=4 dk=64 causal bias …]`: a case's shape and variant, for its name.
fn attn_label(c: &AttnCase) -> String {
    let mut s = format!("[B={} Lq={} Lk={}/{} H={} dk={}", c.b, c.lq, c.kv_len, c.cap, c.h, c.dk);
    if c.causal {
        s += " causal";
    }
    if c.q_offset > 0 || c.counter {
        s += &format!(" offset={}{}", c.q_offset, if c.counter { " (counter)" } else { "" });
    }
    match c.bias {
        Some(true) => s += " bidirectional-bias",
        Some(false) => s += " causal-bias",
        None => {}
    }
    if let Some(l) = &c.lengths {
        s += &format!(" key-lengths={l:?}");
    }
    if c.scale != 1.0 {
        s += &format!(" scale={}", c.scale);
    }
    if c.half_inputs {
        s += " half-inputs";
    }
    if let Some(p) = c.dropout {
        s += &format!(" dropout={p}");
    }
    s + "]"
}

/// Attention backward, one case per row of the table.
pub fn attention_backward_matches_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    attention_backward_table()
        .into_iter()
        .enumerate()
        .map(|(i, (what, c))| {
            let name = format!("attention_backward {what} {}", attn_label(&c));
            let what = name.clone();
            Case::new(name, move |be: &B| attention_backward_case(be, &mut Rand::new(106 + i as u64), &c, &what))
        })
        .collect()
}

/// Attention with dropout on its probabilities, forward, backward and the bias table's gradient,
/// one case per row: T5's training shapes on the tensor-core and the plain forms, and a few queries
/// (which take the many-query forward, not the decoding one).
pub fn attention_dropout_matches_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    let drop = |(what, c): (&'static str, AttnCase)| (what, AttnCase { dropout: Some(0.1), ..c });
    let table = attention_backward_table();
    let base = table[1].1.clone();
    let mut rows: Vec<(&'static str, AttnCase)> =
        table.into_iter().filter(|(_, c)| !c.counter && c.kv_len == c.cap && c.q_offset == 0).map(drop).collect();
    rows.push((
        "decoder, 3 queries, d_kv 64",
        AttnCase { lq: 3, cap: 3, kv_len: 3, dropout: Some(0.5), ..base.clone() },
    ));
    rows.push((
        "cross, 2 queries, d_kv 16",
        AttnCase { lq: 2, cap: 9, kv_len: 9, dk: 16, causal: false, bias: None, dropout: Some(0.3), ..base },
    ));
    rows.into_iter()
        .enumerate()
        .map(|(i, (what, c))| {
            let name = format!("attention_dropout {what} {}", attn_label(&c));
            let what = name.clone();
            Case::new(name, move |be: &B| attention_backward_case(be, &mut Rand::new(150 + i as u64), &c, &what))
        })
        .collect()
}

pub fn concat_last_matches_cpu<B: Backend>(be: &B) {
    let mut r = Rand::new(107);
    for shape in [vec![13], vec![2, 5]] {
        let widths = [10, 32, 7];
        let pieces: Vec<(Vec<f32>, Vec<usize>)> = widths
            .iter()
            .map(|&w| {
                let mut s = shape.clone();
                s.push(w);
                (r.vec(s.iter().product(), 1.0), s)
            })
            .collect();
        let pc: Vec<_> = pieces.iter().map(|(v, s)| Cpu.upload(v, s).unwrap()).collect();
        let pg: Vec<_> = pieces.iter().map(|(v, s)| be.upload(v, s).unwrap()).collect();
        let want = Cpu.concat_last(&pc.iter().collect::<Vec<_>>()).unwrap();
        let got = be.concat_last(&pg.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(got.shape(), want.shape.as_slice(), "concat_last shape");
        assert_eq!(be.download(&got).unwrap(), want.data, "concat_last of f32 pieces");
        // The middle piece in half (the values are fp16-exact, so the copy is exact too).
        if let Some(mid) = half_copy(be, &pg[1]) {
            let got = be.concat_last(&[&pg[0], &mid, &pg[2]]).unwrap();
            assert_eq!(be.download(&got).unwrap(), want.data, "concat_last of mixed pieces");
        }
    }
}

fn token_logprobs_case<B: Backend>(be: &B, r: &mut Rand, rows: usize, v: usize, what: &str) {
    let mut logits = r.vec(rows * v, 6.0);
    let mut tokens = r.ids(rows, v as u32);
    // A peaked row, its token the likely one (entropy near 0), and the first and last ids.
    logits[5] = 40.0;
    tokens[0] = 5;
    tokens[1] = 0;
    if rows > 2 {
        tokens[2] = v as u32 - 1;
    }
    let (lc, lg) = (Cpu.upload(&logits, &[rows, v]).unwrap(), be.upload(&logits, &[rows, v]).unwrap());
    let (tc, tg) = (Cpu.upload_ids(&tokens, &[rows]).unwrap(), be.upload_ids(&tokens, &[rows]).unwrap());
    let (lp_c, ent_c) = Cpu.token_logprobs(&lc, &tc).unwrap();
    let (lp_g, ent_g) = be.token_logprobs(&lg, &tg).unwrap();
    // The CPU sums the row sequentially in f32: about 4e-6 from the exact entropy at this size.
    close(&be.download(&lp_g).unwrap(), &lp_c.data, F32, &format!("{what}: token log-probs"));
    close(&be.download(&ent_g).unwrap(), &ent_c.data, F32, &format!("{what}: entropy"));
    let dlogp = r.vec(rows, 1.0);
    let (dc, dg) = (Cpu.upload(&dlogp, &[rows]).unwrap(), be.upload(&dlogp, &[rows]).unwrap());
    let want = Cpu.token_logprobs_backward(&lc, &tc, &dc).unwrap();
    let got = be.token_logprobs_backward(&lg, &tg, &dg).unwrap();
    close(&be.download(&got).unwrap(), &want.data, F32, &format!("{what}: token log-prob backward"));
}

/// token_logprobs (log-probs, entropy, backward), one case per shape.
pub fn token_logprobs_matches_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    // The vocabulary in 16-byte pieces, and an odd size that is not.
    [(33, 32128), (7, 1001), (2, 32128)]
        .into_iter()
        .enumerate()
        .map(|(i, (rows, v))| {
            let name = format!("token_logprobs [rows={rows} vocab={v}]");
            let what = name.clone();
            Case::new(name, move |be: &B| token_logprobs_case(be, &mut Rand::new(108 + 100 * i as u64), rows, v, &what))
        })
        .collect()
}

fn adam_case<B: Backend>(be: &B, r: &mut Rand, shapes: &[Vec<usize>], decays: &[f64], what: &str) {
    let p0: Vec<Vec<f32>> = shapes.iter().map(|s| r.vec(s.iter().product(), 1.0)).collect();
    let mut pc: Vec<_> = shapes.iter().zip(&p0).map(|(s, p)| Cpu.upload(p, s).unwrap()).collect();
    let mut pg: Vec<_> = shapes.iter().zip(&p0).map(|(s, p)| be.upload(p, s).unwrap()).collect();
    let zeros = |b: &B| -> Vec<B::Tensor> { shapes.iter().map(|s| b.zeros(s).unwrap()).collect() };
    let (mut mc, mut vc): (Vec<_>, Vec<_>) =
        shapes.iter().map(|s| (Cpu.zeros(s).unwrap(), Cpu.zeros(s).unwrap())).unzip();
    let (mut mg, mut vg) = (zeros(be), zeros(be));
    let mut copies: Vec<Option<B::Tensor>> = pg.iter().map(|p| be.matmul_copy(p).unwrap()).collect();
    for (step, lr) in (1..=4).zip([1e-3, 3e-2, 1e-2, 5e-3]) {
        let gs: Vec<Vec<f32>> = shapes.iter().map(|s| r.vec(s.iter().product(), 0.01 * step as f32)).collect();
        let gc: Vec<_> = shapes.iter().zip(&gs).map(|(s, g)| Cpu.upload(g, s).unwrap()).collect();
        let gg: Vec<_> = shapes.iter().zip(&gs).map(|(s, g)| be.upload(g, s).unwrap()).collect();
        let h = AdamStep { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, step, grad_scale: 0.37 };
        let mut slots: Vec<AdamSlot<'_, Cpu>> = pc
            .iter_mut()
            .zip(&gc)
            .zip(mc.iter_mut().zip(vc.iter_mut()))
            .zip(decays.iter().copied())
            .map(|(((p, g), (m, v)), weight_decay)| AdamSlot { p, g, m, v, weight_decay, copy: None })
            .collect();
        Cpu.adam(&mut slots, &h).unwrap();
        let mut slots: Vec<AdamSlot<'_, B>> = pg
            .iter_mut()
            .zip(&gg)
            .zip(mg.iter_mut().zip(vg.iter_mut()))
            .zip(decays.iter().copied().zip(copies.iter_mut()))
            .map(|(((p, g), (m, v)), (weight_decay, copy))| AdamSlot { p, g, m, v, weight_decay, copy: copy.as_mut() })
            .collect();
        be.adam(&mut slots, &h).unwrap();
        for i in 0..shapes.len() {
            let what = format!("{what} step {step}, tensor {i}");
            close(&be.download(&pg[i]).unwrap(), &pc[i].data, F32, &format!("{what}: p"));
            close(&be.download(&mg[i]).unwrap(), &mc[i].data, F32, &format!("{what}: m"));
            close(&be.download(&vg[i]).unwrap(), &vc[i].data, F32, &format!("{what}: v"));
            if let Some(c) = &copies[i] {
                let want: Vec<f32> = pc[i].data.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
                assert_eq!(be.download(c).unwrap(), want, "{what}: the half copy");
            }
        }
    }
}

/// Adam, one case per set of tensors updated together: several (sizes below, at and across a
/// block's 1,024 values), each with its own weight decay and a half copy where the backend keeps
/// one, gradients scaled first; a single value; flan-t5-base's feed-forward weight.
pub fn adam_matches_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    let rows: [(Vec<Vec<usize>>, Vec<f64>); 3] = [
        (vec![vec![1003], vec![7, 13], vec![1024], vec![3, 1500]], vec![0.01, 0.0, 0.1, 0.0]),
        (vec![vec![1]], vec![0.01]),
        (vec![vec![2048, 768]], vec![0.01]),
    ];
    rows.into_iter()
        .enumerate()
        .map(|(i, (shapes, decays))| {
            let name = format!("adam [shapes={shapes:?} decays={decays:?}]");
            let what = name.clone();
            Case::new(name, move |be: &B| adam_case(be, &mut Rand::new(109 + 100 * i as u64), &shapes, &decays, &what))
        })
        .collect()
}

/// An Adafactor weight: its shape and the rows of each part.
type Weight = (Vec<usize>, Vec<usize>);

/// Adafactor weights `(shape, parts)` updated together for three steps on both backends: every
/// statistic, the parameters and the half copy.
fn adafactor_case<B: Backend>(
    be: &B,
    r: &mut Rand,
    weights: &[(Vec<usize>, Vec<usize>)],
    o: AdafactorOptions,
    what: &str,
) {
    use detox::sft::adafactor::{AdafactorState, adafactor_slots};
    use detox::t5::trainable::Trainable;
    let p0: Vec<Vec<f32>> = weights.iter().map(|(s, _)| r.vec(s.iter().product(), 1.0)).collect();
    let mut pc: Vec<_> = weights.iter().zip(&p0).map(|((s, _), p)| Cpu.upload(p, s).unwrap()).collect();
    let mut pg: Vec<_> = weights.iter().zip(&p0).map(|((s, _), p)| be.upload(p, s).unwrap()).collect();
    let first = o.beta1.is_some();
    let mut sc: Vec<_> = weights.iter().map(|(s, k)| AdafactorState::zeros(&Cpu, s, k, first).unwrap()).collect();
    let mut sg: Vec<_> = weights.iter().map(|(s, k)| AdafactorState::zeros(be, s, k, first).unwrap()).collect();
    let mut copies: Vec<Option<B::Tensor>> = pg.iter().map(|p| be.matmul_copy(p).unwrap()).collect();
    for step in 1..=3u64 {
        let gs: Vec<Vec<f32>> = weights.iter().map(|(s, _)| r.vec(s.iter().product(), 0.01 * step as f32)).collect();
        let gc: Vec<_> = weights.iter().zip(&gs).map(|((s, _), g)| Cpu.upload(g, s).unwrap()).collect();
        let gg: Vec<_> = weights.iter().zip(&gs).map(|((s, _), g)| be.upload(g, s).unwrap()).collect();
        let h = o.step(1e-2, step, 0.37);
        let decay = |i: usize| if i.is_multiple_of(2) { 0.1 } else { 0.0 };
        let tc = pc.iter_mut().map(|p| Trainable { name: String::new(), param: p, copy: None }).collect();
        Cpu.adafactor(&mut adafactor_slots(tc, gc.iter().collect(), &mut sc, decay).unwrap(), &h).unwrap();
        let tg = pg
            .iter_mut()
            .zip(copies.iter_mut())
            .map(|(p, c)| Trainable { name: String::new(), param: p, copy: c.as_mut() })
            .collect();
        be.adafactor(&mut adafactor_slots(tg, gg.iter().collect(), &mut sg, decay).unwrap(), &h).unwrap();
        for i in 0..weights.len() {
            let what = format!("{what} step {step}, weight {i}");
            close(&be.download(&pg[i]).unwrap(), &pc[i].data, F32, &format!("{what}: p"));
            for (k, (g, c)) in sg[i].tensors().into_iter().zip(sc[i].tensors()).enumerate() {
                if !c.data.is_empty() {
                    close(&be.download(g).unwrap(), &c.data, F32, &format!("{what}: statistic {k}"));
                }
            }
            if let Some(c) = &copies[i] {
                let want: Vec<f32> = be.download(&pg[i]).unwrap().iter().map(|&x| f16::from_f32(x).to_f32()).collect();
                assert_eq!(be.download(c).unwrap(), want, "{what}: the half copy");
            }
        }
    }
}

/// Adafactor, one case per set of weights and options: a stacked weight of three parts (q, k, v),
/// 1-D weights below and across a block, columns past a block and rows past a column chunk;
/// relative step with parameter scale, and an external rate with a first moment; flan-t5-base's
/// feed-forward weight of two parts.
pub fn adafactor_matches_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    let relative = AdafactorOptions {
        eps1: 1e-30,
        eps2: 1e-3,
        clip_threshold: 1.0,
        decay_rate: -0.8,
        beta1: None,
        scale_parameter: true,
        relative_step: true,
        warmup_init: false,
    };
    let external = AdafactorOptions {
        beta1: Some(0.9),
        scale_parameter: false,
        relative_step: false,
        clip_threshold: 0.5,
        ..relative
    };
    let rows: [(Vec<Weight>, AdafactorOptions, &str); 3] = [
        (
            vec![
                (vec![96, 40], vec![32, 32, 32]),
                (vec![7], vec![7]),
                (vec![3000], vec![3000]),
                (vec![130, 300], vec![130]),
            ],
            relative,
            "relative",
        ),
        (vec![(vec![5, 3], vec![5]), (vec![1], vec![1]), (vec![70, 257], vec![20, 50])], external, "external+beta1"),
        (vec![(vec![4096, 768], vec![2048, 2048])], relative, "relative"),
    ];
    rows.into_iter()
        .enumerate()
        .map(|(i, (weights, o, mode))| {
            let shapes: Vec<_> = weights.iter().map(|(s, p)| format!("{s:?}/{p:?}")).collect();
            let name = format!("adafactor [weights={} {mode}]", shapes.join(","));
            let what = name.clone();
            Case::new(name, move |be: &B| adafactor_case(be, &mut Rand::new(110 + 100 * i as u64), &weights, o, &what))
        })
        .collect()
}

/// Full-parameter training's products: `linear_backward` with the weight's gradient beside the
/// input's, both accumulating into random starting values.
fn weight_grad_case<B: Backend>(be: &B, r: &mut Rand, m: usize, k: usize, n: usize, what: &str) {
    let (x, dy, w) = (r.vec(m * k, 1.0), r.vec(m * n, 1.0), r.vec(n * k, 1.0));
    let (dw0, dx0) = (r.vec(n * k, 1.0), r.vec(m * k, 1.0));
    let (mut dw_c, mut dx_c) = (Cpu.upload(&dw0, &[n, k]).unwrap(), Cpu.upload(&dx0, &[m, k]).unwrap());
    let (xc, dyc) = (Cpu.upload(&x, &[m, k]).unwrap(), Cpu.upload(&dy, &[m, n]).unwrap());
    Cpu.linear_backward(&xc, &weight(&Cpu, &w, &[n, k]), &[], &dyc, Some(&mut dx_c), Some(&mut dw_c), &mut []).unwrap();
    let (xg, wg, dyg) = (be.upload(&x, &[m, k]).unwrap(), weight(be, &w, &[n, k]), be.upload(&dy, &[m, n]).unwrap());
    let xh = half_copy(be, &xg);
    for xin in std::iter::once(&xg).chain(xh.as_ref()) {
        let (mut dw_g, mut dx_g) = (be.upload(&dw0, &[n, k]).unwrap(), be.upload(&dx0, &[m, k]).unwrap());
        be.linear_backward(xin, &wg, &[], &dyg, Some(&mut dx_g), Some(&mut dw_g), &mut []).unwrap();
        close(&be.download(&dw_g).unwrap(), &dw_c.data, HALF, &format!("{what}: dw"));
        close(&be.download(&dx_g).unwrap(), &dx_c.data, HALF, &format!("{what}: dx"));
    }
}

/// linear_backward's weight gradient, one case per shape: odd sizes, one row, flan-t5-base's
/// feed-forward widths.
pub fn weight_grad_matches_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    [(37, 96, 64), (300, 48, 200), (1, 5, 3), (3, 768, 2048), (4, 2048, 768)]
        .into_iter()
        .enumerate()
        .map(|(i, (m, k, n))| {
            let name = format!("linear_backward dw [rows={m} in={k} out={n}]");
            let what = name.clone();
            Case::new(name, move |be: &B| weight_grad_case(be, &mut Rand::new(111 + 100 * i as u64), m, k, n, &what))
        })
        .collect()
}

fn rms_norm_weight_grad_case<B: Backend>(be: &B, r: &mut Rand, rows: usize, d: usize, what: &str) {
    let (x, dy, dw0) = (r.vec(rows * d, 3.0), r.vec(rows * d, 1.0), r.vec(d, 1.0));
    let mut want = Cpu.upload(&dw0, &[d]).unwrap();
    let (xc, dyc) = (Cpu.upload(&x, &[rows, d]).unwrap(), Cpu.upload(&dy, &[rows, d]).unwrap());
    Cpu.rms_norm_weight_grad(&xc, 1e-6, &dyc, &mut want).unwrap();
    let xg = be.upload(&x, &[rows, d]).unwrap();
    let xh = half_copy(be, &xg);
    for xin in std::iter::once(&xg).chain(xh.as_ref()) {
        let mut got = be.upload(&dw0, &[d]).unwrap();
        be.rms_norm_weight_grad(xin, 1e-6, &be.upload(&dy, &[rows, d]).unwrap(), &mut got).unwrap();
        close(&be.download(&got).unwrap(), &want.data, F32, what);
    }
}

/// rms_norm_weight_grad, one case per shape.
pub fn rms_norm_weight_grad_matches_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    // Row counts below, at and past one chunk of rows per block.
    [(5, 48), (64, 512), (333, 768), (1, 768), (7, 1001)]
        .into_iter()
        .enumerate()
        .map(|(i, (rows, d))| {
            let name = format!("rms_norm_weight_grad [rows={rows} d={d}]");
            let what = name.clone();
            Case::new(name, move |be: &B| {
                rms_norm_weight_grad_case(be, &mut Rand::new(112 + 100 * i as u64), rows, d, &what)
            })
        })
        .collect()
}

fn embedding_backward_case<B: Backend>(be: &B, r: &mut Rand, vocab: usize, d: usize, n: usize, what: &str) {
    let ids = r.ids(n, vocab as u32);
    let (dy, t0) = (r.vec(n * d, 1.0), r.vec(vocab * d, 1.0));
    let mut want = Cpu.upload(&t0, &[vocab, d]).unwrap();
    let ic = Cpu.upload_ids(&ids, &[n]).unwrap();
    Cpu.embedding_backward(&ic, &Cpu.upload(&dy, &[n, d]).unwrap(), &mut want).unwrap();
    let mut got = be.upload(&t0, &[vocab, d]).unwrap();
    be.embedding_backward(&be.upload_ids(&ids, &[n]).unwrap(), &be.upload(&dy, &[n, d]).unwrap(), &mut got).unwrap();
    close(&be.download(&got).unwrap(), &want.data, F32, what);
}

/// embedding_backward, one case per shape: many repeats of few ids, so that rows collide; one
/// token; flan-t5-base's d_model over its vocabulary at a few tokens.
pub fn embedding_backward_matches_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    [(50, 96, 700), (7, 33, 1), (32128, 768, 5)]
        .into_iter()
        .enumerate()
        .map(|(i, (vocab, d, n))| {
            let name = format!("embedding_backward [vocab={vocab} d={d} tokens={n}]");
            let what = name.clone();
            Case::new(name, move |be: &B| {
                embedding_backward_case(be, &mut Rand::new(113 + 100 * i as u64), vocab, d, n, &what)
            })
        })
        .collect()
}

fn cross_entropy_case<B: Backend>(be: &B, r: &mut Rand, rows: usize, v: usize, smoothing: f32, what: &str) {
    let logits = r.vec(rows * v, 6.0);
    let mut targets = r.ids(rows, v as u32);
    targets[0] = 0;
    targets[1] = v as u32 - 1;
    let mut weights = r.vec(rows, 1.0);
    if rows > 2 {
        weights[2] = 0.0;
    }
    let (lc, lg) = (Cpu.upload(&logits, &[rows, v]).unwrap(), be.upload(&logits, &[rows, v]).unwrap());
    let (tc, tg) = (Cpu.upload_ids(&targets, &[rows]).unwrap(), be.upload_ids(&targets, &[rows]).unwrap());
    let (wc, wg) = (Cpu.upload(&weights, &[rows]).unwrap(), be.upload(&weights, &[rows]).unwrap());
    let (loss_c, grad_c) = Cpu.cross_entropy(&lc, &tc, &wc, smoothing).unwrap();
    let (loss_g, grad_g) = be.cross_entropy(&lg, &tg, &wg, smoothing).unwrap();
    close(&be.download(&loss_g).unwrap(), &loss_c.data, F32, &format!("{what}: loss"));
    close(&be.download(&grad_g).unwrap(), &grad_c.data, F32, &format!("{what}: gradient"));
}

/// cross_entropy (loss and gradient), one case per shape.
pub fn cross_entropy_matches_cpu<B: Backend + 'static>() -> Vec<Case<B>> {
    [(33, 32128, 0.1), (7, 1001, 0.0), (2, 32128, 0.1)]
        .into_iter()
        .enumerate()
        .map(|(i, (rows, v, smoothing))| {
            let name = format!("cross_entropy [rows={rows} vocab={v} smoothing={smoothing}]");
            let what = name.clone();
            Case::new(name, move |be: &B| {
                cross_entropy_case(be, &mut Rand::new(114 + 100 * i as u64), rows, v, smoothing, &what)
            })
        })
        .collect()
}

pub fn set_weight_matches_cpu<B: Backend>(be: &B) {
    let mut r = Rand::new(115);
    let shape = [13, 29];
    let (w0, values) = (r.vec(13 * 29, 1.0), r.vec(13 * 29, 4.0));
    let mut w = weight(be, &w0, &shape);
    be.set_weight(&mut w, &be.upload(&values, &shape).unwrap()).unwrap();
    // Read back through a product with the identity: the values are fp16-exact, so the half copy
    // holds them unchanged.
    let eye: Vec<f32> = (0..29 * 29).map(|i| if i / 29 == i % 29 { 1.0 } else { 0.0 }).collect();
    let got = be.download(&be.linear(&be.upload(&eye, &[29, 29]).unwrap(), &w, &[]).unwrap()).unwrap();
    let want: Vec<f32> = (0..29 * 13).map(|i| values[(i % 13) * 29 + i / 13]).collect();
    close(&got, &want, F32, "set_weight");
}

pub fn sum_squares_matches_cpu<B: Backend>(be: &B) {
    let mut r = Rand::new(110);
    let sizes = [0, 1, 1000, 300_001];
    let xs: Vec<Vec<f32>> = sizes.iter().map(|&n| r.vec(n, 3.0)).collect();
    let on_cpu: Vec<_> = xs.iter().map(|x| Cpu.upload(x, &[x.len()]).unwrap()).collect();
    let on_be: Vec<_> = xs.iter().map(|x| be.upload(x, &[x.len()]).unwrap()).collect();
    for (i, n) in sizes.iter().enumerate() {
        let want = Cpu.sum_squares(&[&on_cpu[i]]).unwrap();
        assert_eq!(want, xs[i].iter().map(|&v| v as f64 * v as f64).sum::<f64>());
        let xh = half_copy(be, &on_be[i]);
        for xin in std::iter::once(&on_be[i]).chain(xh.as_ref()) {
            let got = be.sum_squares(&[xin]).unwrap();
            // Both sum exact f64 squares; only the order differs.
            assert!((got - want).abs() <= 1e-12 * want, "sum_squares of {n}: {got} vs {want}");
        }
    }
    // Several tensors at once, empty ones among them: the sum of their sums.
    let want: f64 = on_cpu.iter().map(|x| Cpu.sum_squares(&[x]).unwrap()).sum();
    let got = be.sum_squares(&on_be.iter().rev().collect::<Vec<_>>()).unwrap();
    assert!((got - want).abs() <= 1e-12 * want, "sum_squares of several: {got} vs {want}");
    assert_eq!(be.sum_squares(&[]).unwrap(), 0.0);
}

/// Zeroing a table of tensors in one pass: every value of every tensor, f32 and half, whatever its
/// size, and nothing else (the tensors beside them keep their values).
pub fn zero_grads_matches_cpu<B: Backend>(be: &B) {
    let mut r = Rand::new(111);
    let sizes = [0, 1, 2047, 2048, 2049, 300_001];
    let xs: Vec<Vec<f32>> = sizes.iter().map(|&n| r.vec(n, 3.0)).collect();
    let mut on_cpu: Vec<_> = xs.iter().map(|x| Cpu.upload(x, &[x.len()]).unwrap()).collect();
    let mut on_be: Vec<_> = xs.iter().map(|x| be.upload(x, &[x.len()]).unwrap()).collect();
    let mut halves: Vec<_> = on_be.iter().filter_map(|x| half_copy(be, x)).collect();
    let kept = be.upload(&xs[3], &[xs[3].len()]).unwrap();
    Cpu.zero_grads(&mut on_cpu.iter_mut().collect::<Vec<_>>()).unwrap();
    be.zero_grads(&mut on_be.iter_mut().chain(halves.iter_mut()).collect::<Vec<_>>()).unwrap();
    for (i, (c, g)) in on_cpu.iter().zip(&on_be).enumerate() {
        assert!(c.data.iter().all(|&v| v == 0.0), "the CPU zeroed tensor {i}");
        assert_eq!(be.download(g).unwrap(), c.data, "zero_grads of {} values", sizes[i]);
    }
    for h in &halves {
        assert!(be.download(h).unwrap().iter().all(|&v| v == 0.0), "zero_grads of {} half values", h.numel());
    }
    assert_eq!(be.download(&kept).unwrap(), xs[3], "a tensor outside the table keeps its values");
    be.zero_grads(&mut []).unwrap();
}

crate::common::suite!("backward":
    table dropout_matches_cpu,
    table linear_backward_matches_cpu,
    table affine_backward_matches_cpu,
    table rms_norm_backward_matches_cpu,
    table gated_gelu_backward_matches_cpu,
    table attention_backward_matches_cpu,
    table attention_dropout_matches_cpu,
    table dropout_sites_match_cpu,
    each concat_last_matches_cpu,
    table token_logprobs_matches_cpu,
    table adam_matches_cpu,
    table adafactor_matches_cpu,
    each sum_squares_matches_cpu,
    each zero_grads_matches_cpu,
    table weight_grad_matches_cpu,
    table rms_norm_weight_grad_matches_cpu,
    table embedding_backward_matches_cpu,
    table cross_entropy_matches_cpu,
    each set_weight_matches_cpu,
);

//! Every backend operation against the CPU reference on random inputs (llama.cpp's
//! test-backend-ops, here for the CUDA backend): fresh inputs each check, weights rounded to fp16
//! first so both backends see the same values, errors as relative L2.

use crate::common::{Case, F32, HALF, Rand, close, weight};
use detox::backend::cpu::Cpu;
use detox::backend::prelude::*;
use detox::backend::{Activation, AttnInputs, AttnSpec, Dropout, LoraRef, Position, Prec, RelBias, SampleSpec, Shaped};
use detox::backend::{BeamSpec, BeamState, EarlyStopping, ProcessSpec};

fn embedding_case<B: Backend>(be: &B, r: &mut Rand, vocab: usize, d: usize, (b, l): (usize, usize), what: &str) {
    let table = r.vec(vocab * d, 1.0);
    let ids = r.ids(b * l, vocab as u32);
    let (wc, wg) = (weight(&Cpu, &table, &[vocab, d]), weight(be, &table, &[vocab, d]));
    let (ic, ig) = (Cpu.upload_ids(&ids, &[b, l]).unwrap(), be.upload_ids(&ids, &[b, l]).unwrap());
    let want = Cpu.embedding(&wc, &ic).unwrap();
    let got = be.embedding(&wg, &ig).unwrap();
    assert_eq!(got.shape(), &[b, l, d], "{what}: shape");
    close(&be.download(&got).unwrap(), &want.data, F32, &format!("{what}: embedding"));
    let rows = [4u32, 0, 20, 20, 9].map(|i| i % (b * l) as u32);
    let g = be.gather_rows(&got, &be.upload_ids(&rows, &[5]).unwrap()).unwrap();
    let c = Cpu.gather_rows(&want, &Cpu.upload_ids(&rows, &[5]).unwrap()).unwrap();
    close(&be.download(&g).unwrap(), &c.data, F32, &format!("{what}: gather_rows"));
}

/// embedding and gather_rows, one case per shape: the original small table, one token, and
/// flan-t5-base's vocabulary and d_model at a few tokens.
pub fn embedding_and_gather<B: Backend + 'static>() -> Vec<Case<B>> {
    [(50, 24, (7, 3)), (9, 17, (1, 1)), (32128, 768, (2, 3))]
        .into_iter()
        .enumerate()
        .map(|(i, (vocab, d, ids))| {
            let name = format!("embedding [vocab={vocab} d={d} ids={}×{}]", ids.0, ids.1);
            let what = name.clone();
            Case::new(name, move |be: &B| embedding_case(be, &mut Rand::new(1 + 100 * i as u64), vocab, d, ids, &what))
        })
        .collect()
}

/// One linear configuration: a stacked projection of three `out / 3`-wide modules, with rank
/// `rank` adapters on the first and the last when `lora`.
#[derive(Clone, Copy)]
struct LinearCase {
    rows: usize,
    k: usize,
    n: usize,
    rank: usize,
    lora: bool,
    prec: Prec,
}

/// `[rows=37 in=96 out=96 lora=2×r8 out=f32]`: a linear case's shape and variant, for its name.
fn linear_label(c: &LinearCase) -> String {
    let lora = if c.lora { format!("2×r{}", c.rank) } else { "none".to_string() };
    let prec = match c.prec {
        Prec::F32 => "f32",
        Prec::Half => "half",
    };
    format!("[rows={} in={} out={} lora={lora} out={prec}]", c.rows, c.k, c.n)
}

fn linear_case<B: Backend>(be: &B, r: &mut Rand, c: &LinearCase, what: &str) {
    let (m, k, n, rank, prec) = (c.rows, c.k, c.n, c.rank, c.prec);
    let module = n / 3;
    let x = r.vec(m * k, 1.0);
    let w = r.vec(n * k, 0.2);
    let (xc, xg) = (Cpu.upload(&x, &[m, k]).unwrap(), be.upload(&x, &[m, k]).unwrap());
    let (wc, wg) = (weight(&Cpu, &w, &[n, k]), weight(be, &w, &[n, k]));
    let mut adapters = Vec::new();
    for _ in 0..2 {
        let a = r.vec(rank * k, 0.2);
        let b = r.vec(module * rank, 0.2);
        adapters.push((
            Cpu.upload(&a, &[rank, k]).unwrap(),
            Cpu.upload(&b, &[module, rank]).unwrap(),
            be.upload(&a, &[rank, k]).unwrap(),
            be.upload(&b, &[module, rank]).unwrap(),
        ));
    }
    let shadows: Vec<_> =
        adapters.iter().map(|(_, _, a, b)| (be.matmul_copy(a).unwrap(), be.matmul_copy(b).unwrap())).collect();
    if !c.lora {
        let want = Cpu.linear_to(&xc, &wc, &[], prec).unwrap();
        let got = be.linear_to(&xg, &wg, &[], prec).unwrap();
        close(&be.download(&got).unwrap(), &want.data, HALF, what);
    } else {
        for dropout in [None, Some(Dropout { p: 0.1, seed: 9, stream: 4 })] {
            for use_shadow in [false, true] {
                let cols = [0, 2 * module];
                let lc: Vec<LoraRef<Cpu>> = adapters
                    .iter()
                    .zip(cols)
                    .map(|((a, b, _, _), col)| LoraRef { a, b, shadow: None, scale: 1.5, col, dropout })
                    .collect();
                let lg: Vec<LoraRef<B>> = adapters
                    .iter()
                    .zip(&shadows)
                    .zip(cols)
                    .map(|(((_, _, a, b), (sa, sb)), col)| LoraRef {
                        a,
                        b,
                        shadow: match (sa, sb) {
                            (Some(sa), Some(sb)) if use_shadow => Some((sa, sb)),
                            _ => None,
                        },
                        scale: 1.5,
                        col,
                        dropout,
                    })
                    .collect();
                let want = Cpu.linear_to(&xc, &wc, &lc, prec).unwrap();
                let got = be.linear_to(&xg, &wg, &lg, prec).unwrap();
                let what = format!("{what} {dropout:?} shadow {use_shadow}");
                close(&be.download(&got).unwrap(), &want.data, HALF, &what);
                // The middle module has no adapter: its columns equal the plain product's.
                let plain = Cpu.linear_to(&xc, &wc, &[], prec).unwrap();
                let mid: Vec<(f32, f32)> = (0..m)
                    .flat_map(|row| (module..2 * module).map(move |c| row * n + c))
                    .map(|i| (want.data[i], plain.data[i]))
                    .collect();
                assert!(mid.iter().all(|(a, b)| a == b), "{what}: an adapter leaked into another module's columns");
            }
        }
    }
    // Accumulating into an f32 residual, with the adapters when the case has them.
    let acc0 = r.vec(m * n, 1.0);
    let (mut acc_c, mut acc_g) = (Cpu.upload(&acc0, &[m, n]).unwrap(), be.upload(&acc0, &[m, n]).unwrap());
    let (a, b, ag, bg) = &adapters[0];
    let lc = [LoraRef { a, b, shadow: None, scale: 0.5, col: module, dropout: None }];
    let lg = [LoraRef { a: ag, b: bg, shadow: None, scale: 0.5, col: module, dropout: None }];
    let (lc, lg): (&[LoraRef<Cpu>], &[LoraRef<B>]) = if c.lora { (&lc, &lg) } else { (&[], &[]) };
    Cpu.linear_add(&xc, &wc, lc, &mut acc_c).unwrap();
    be.linear_add(&xg, &wg, lg, &mut acc_g).unwrap();
    close(&be.download(&acc_g).unwrap(), &acc_c.data, HALF, &format!("{what}: linear_add"));
}

/// Linear (and linear_add), one case per shape × LoRA or not × output precision: the 32-wide
/// modules of the original case, an odd size, one row at flan-t5-base's stacked q/k/v widths,
/// and a few rows of its feed-forward output projection.
pub fn linear<B: Backend + 'static>() -> Vec<Case<B>> {
    let shapes = [(37, 96, 96, 8), (5, 50, 75, 3), (1, 768, 2304, 8), (3, 2048, 768, 4)];
    let mut cases = Vec::new();
    for (rows, k, n, rank) in shapes {
        for lora in [false, true] {
            for prec in [Prec::F32, Prec::Half] {
                cases.push(LinearCase { rows, k, n, rank, lora, prec });
            }
        }
    }
    cases
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let name = format!("linear {}", linear_label(&c));
            let what = name.clone();
            Case::new(name, move |be: &B| linear_case(be, &mut Rand::new(200 + i as u64), &c, &what))
        })
        .collect()
}

fn gated_gelu_case<B: Backend>(be: &B, r: &mut Rand, rows: usize, f: usize, what: &str) {
    let gu = r.vec(rows * 2 * f, 3.0);
    let (gc, gg) = (Cpu.upload(&gu, &[rows, 2 * f]).unwrap(), be.upload(&gu, &[rows, 2 * f]).unwrap());
    let want = Cpu.gated_gelu(&gc, None).unwrap();
    close(&be.download(&be.gated_gelu(&gg, None).unwrap()).unwrap(), &want.data, HALF, what);
}

fn split_last_case<B: Backend>(be: &B, r: &mut Rand, rows: usize, f: usize, prec: Prec, what: &str) {
    let w: Vec<f32> = r.vec(2 * f * 16, 0.3);
    let x = r.vec(rows * 16, 1.0);
    let y = be.linear_to(&be.upload(&x, &[rows, 16]).unwrap(), &weight(be, &w, &[2 * f, 16]), &[], prec).unwrap();
    let whole = be.download(&y).unwrap();
    // Widths of whole 16-byte units take the vectorised path; 10 does not.
    for widths in [[10, f, f - 10], [16, 32, 2 * f - 48]] {
        let pieces = be.split_last(&y, &widths).unwrap();
        let mut col = 0;
        for p in &pieces {
            let width = p.shape()[1];
            let got = be.download(p).unwrap();
            for row in 0..rows {
                assert_eq!(
                    &got[row * width..(row + 1) * width],
                    &whole[row * 2 * f + col..row * 2 * f + col + width],
                    "{what} widths {widths:?}: row {row} of the piece at column {col}"
                );
            }
            col += width;
        }
    }
}

/// gated_gelu and split_last, one case per shape (× output precision for split_last): the
/// original 48-wide case, an odd width, one row and a few rows at flan-t5-base's d_ff.
pub fn split_and_gated_gelu<B: Backend + 'static>() -> Vec<Case<B>> {
    let shapes = [(23, 48), (5, 1001), (1, 2048), (4, 2048)];
    let mut cases = Vec::new();
    for (i, (rows, f)) in shapes.into_iter().enumerate() {
        let name = format!("gated_gelu [rows={rows} d_ff={f}]");
        let what = name.clone();
        cases.push(Case::new(name, move |be: &B| gated_gelu_case(be, &mut Rand::new(8 + i as u64), rows, f, &what)));
        for (j, (prec, p)) in [(Prec::F32, "f32"), (Prec::Half, "half")].into_iter().enumerate() {
            let name = format!("split_last [rows={rows} width={} out={p}]", 2 * f);
            let what = name.clone();
            let seed = 300 + 2 * i as u64 + j as u64;
            cases.push(Case::new(name, move |be: &B| split_last_case(be, &mut Rand::new(seed), rows, f, prec, &what)));
        }
    }
    cases
}

pub fn affine_and_elementwise<B: Backend>(be: &B) {
    let mut r = Rand::new(3);
    let (m, k, n) = (19, 64, 3);
    let x = r.vec(m * k, 1.0);
    let w = r.vec(n * k, 0.5);
    let bias = r.vec(n, 0.5);
    let (xc, xg) = (Cpu.upload(&x, &[m, k]).unwrap(), be.upload(&x, &[m, k]).unwrap());
    let (wc, wg) = (Cpu.upload(&w, &[n, k]).unwrap(), be.upload(&w, &[n, k]).unwrap());
    let (bc, bg) = (Cpu.upload(&bias, &[n]).unwrap(), be.upload(&bias, &[n]).unwrap());
    let want = Cpu.affine(&xc, &wc, Some(&bc)).unwrap();
    close(&be.download(&be.affine(&xg, &wg, Some(&bg)).unwrap()).unwrap(), &want.data, 1e-4, "affine");
    let want = Cpu.affine(&xc, &wc, None).unwrap();
    close(&be.download(&be.affine(&xg, &wg, None).unwrap()).unwrap(), &want.data, 1e-4, "affine without bias");

    let y = r.vec(m * k, 1.0);
    let (yc, yg) = (Cpu.upload(&y, &[m, k]).unwrap(), be.upload(&y, &[m, k]).unwrap());
    let (mut ac, mut ag) = (Cpu.upload(&x, &[m, k]).unwrap(), be.upload(&x, &[m, k]).unwrap());
    Cpu.add_assign(&mut ac, &yc).unwrap();
    be.add_assign(&mut ag, &yg).unwrap();
    Cpu.scale_assign(&mut ac, -0.75).unwrap();
    be.scale_assign(&mut ag, -0.75).unwrap();
    let bw = r.vec(k, 1.0);
    Cpu.bias_add(&mut ac, &weight(&Cpu, &bw, &[k])).unwrap();
    be.bias_add(&mut ag, &weight(be, &bw, &[k])).unwrap();
    close(&be.download(&ag).unwrap(), &ac.data, F32, "add, scale, bias");
    for act in [Activation::GeluErf, Activation::GeluNew, Activation::Tanh] {
        let want = Cpu.activation(&xc, act).unwrap();
        close(&be.download(&be.activation(&xg, act).unwrap()).unwrap(), &want.data, 1e-5, &format!("{act:?}"));
    }
}

/// rms_norm and layer_norm, one case per op × shape: the original shapes, an odd width, and one
/// row at flan-t5-base's d_model.
pub fn norms<B: Backend + 'static>() -> Vec<Case<B>> {
    let shapes = [(5, 48), (33, 512), (2, 2048), (7, 1001), (1, 768)];
    let mut cases = Vec::new();
    for (i, (rows, d)) in shapes.into_iter().enumerate() {
        let seed = 4 + i as u64;
        let name = format!("rms_norm [rows={rows} d={d}]");
        let what = name.clone();
        cases.push(Case::new(name, move |be: &B| {
            let mut r = Rand::new(seed);
            let x: Vec<f32> = r.vec(rows * d, 40.0);
            let w = r.vec(d, 2.0);
            let (xc, xg) = (Cpu.upload(&x, &[rows, d]).unwrap(), be.upload(&x, &[rows, d]).unwrap());
            let (wc, wg) = (weight(&Cpu, &w, &[d]), weight(be, &w, &[d]));
            let want = Cpu.rms_norm(&xc, &wc, 1e-6).unwrap();
            close(&be.download(&be.rms_norm(&xg, &wg, 1e-6).unwrap()).unwrap(), &want.data, HALF, &what);
        }));
        let name = format!("layer_norm [rows={rows} d={d}]");
        let what = name.clone();
        cases.push(Case::new(name, move |be: &B| {
            let mut r = Rand::new(100 + seed);
            let x: Vec<f32> = r.vec(rows * d, 40.0);
            let w = r.vec(d, 2.0);
            let b = r.vec(d, 1.0);
            let (xc, xg) = (Cpu.upload(&x, &[rows, d]).unwrap(), be.upload(&x, &[rows, d]).unwrap());
            let (wc, wg) = (weight(&Cpu, &w, &[d]), weight(be, &w, &[d]));
            let (bc, bg) = (weight(&Cpu, &b, &[d]), weight(be, &b, &[d]));
            let want = Cpu.layer_norm(&xc, &wc, &bc, 1e-12).unwrap();
            close(&be.download(&be.layer_norm(&xg, &wg, &bg, 1e-12).unwrap()).unwrap(), &want.data, 1e-5, &what);
        }));
    }
    cases
}

/// One attention configuration on both backends.
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
    /// Take the offset from a device counter, as a replayed decoding step does.
    counter: bool,
    lengths: Option<Vec<u32>>,
    bias: Option<bool>,
    scale: f32,
}

fn attention_case<B: Backend>(be: &B, r: &mut Rand, c: &AttnCase, what: &str) {
    let inner = c.h * c.dk;
    let q = r.vec(c.b * c.lq * inner, 1.0);
    let k = r.vec(c.b * c.cap * inner, 1.0);
    let v = r.vec(c.b * c.cap * inner, 1.0);
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
    let spec_c = AttnSpec::<Cpu> {
        heads: c.h,
        d_kv: c.dk,
        scale: c.scale,
        kv_len: c.kv_len,
        key_lengths: lens_c.as_ref(),
        causal: c.causal,
        q_offset: off_c,
        bias: c.bias.map(|bidirectional| RelBias { table: &tc, bidirectional, num_buckets: 32, max_distance: 128 }),
        dropout: None,
    };
    let spec_g = AttnSpec::<B> {
        heads: c.h,
        d_kv: c.dk,
        scale: c.scale,
        kv_len: c.kv_len,
        key_lengths: lens_g.as_ref(),
        causal: c.causal,
        q_offset: off_g,
        bias: c.bias.map(|bidirectional| RelBias { table: &tg, bidirectional, num_buckets: 32, max_distance: 128 }),
        dropout: None,
    };
    let qs = [c.b, c.lq, inner];
    let ks = [c.b, c.cap, inner];
    let (qc, kc, vc) = (Cpu.upload(&q, &qs).unwrap(), Cpu.upload(&k, &ks).unwrap(), Cpu.upload(&v, &ks).unwrap());
    let want = Cpu.attention(AttnInputs::Apart { q: &qc, k: &kc, v: &vc }, &spec_c).unwrap();
    // The backend reads q, k and v apart and in the stackings of the projections that make them.
    let (qg, kg, vg) = (be.upload(&q, &qs).unwrap(), be.upload(&k, &ks).unwrap(), be.upload(&v, &ks).unwrap());
    let kv = be.concat_last(&[&kg, &vg]).unwrap();
    let qkv = (c.lq == c.cap).then(|| be.concat_last(&[&qg, &kg, &vg]).unwrap());
    let mut stackings = vec![
        ("apart", AttnInputs::Apart { q: &qg, k: &kg, v: &vg }),
        ("q, k|v", AttnInputs::QAndKv { q: &qg, kv: &kv }),
    ];
    stackings.extend(qkv.as_ref().map(|t| ("q|k|v", AttnInputs::Qkv(t))));
    for (stacking, x) in stackings {
        let got = be.attention(x, &spec_g).unwrap();
        close(&be.download(&got).unwrap(), &want.data, 3e-3, &format!("{what} ({stacking})"));
    }
}

/// The attention table: (what, shape and variant) cases, each checked on its own inputs.
fn attention_table() -> Vec<(&'static str, AttnCase)> {
    vec![
        // encoder: bidirectional bias, padded keys, more queries than one tile
        (
            "encoder",
            AttnCase {
                b: 3,
                lq: 150,
                cap: 150,
                kv_len: 150,
                h: 4,
                dk: 64,
                causal: false,
                q_offset: 0,
                counter: false,
                lengths: Some(vec![150, 77, 1]),
                bias: Some(true),
                scale: 1.0,
            },
        ),
        // teacher-forced decoder: causal bias
        (
            "decoder prefill",
            AttnCase {
                b: 2,
                lq: 70,
                cap: 70,
                kv_len: 70,
                h: 2,
                dk: 64,
                causal: true,
                q_offset: 0,
                counter: false,
                lengths: None,
                bias: Some(false),
                scale: 1.0,
            },
        ),
        // one decoding step against a cache with spare capacity
        (
            "decode step",
            AttnCase {
                b: 5,
                lq: 1,
                cap: 64,
                kv_len: 40,
                h: 12,
                dk: 64,
                causal: true,
                q_offset: 39,
                counter: false,
                lengths: None,
                bias: Some(false),
                scale: 1.0,
            },
        ),
        // the same step with its position in a device counter
        (
            "decode step, counter",
            AttnCase {
                b: 5,
                lq: 1,
                cap: 64,
                kv_len: 64,
                h: 12,
                dk: 64,
                causal: true,
                q_offset: 39,
                counter: true,
                lengths: None,
                bias: Some(false),
                scale: 1.0,
            },
        ),
        // cross-attention: no bias, padded encoder keys, many keys
        (
            "cross",
            AttnCase {
                b: 4,
                lq: 1,
                cap: 300,
                kv_len: 300,
                h: 6,
                dk: 64,
                causal: false,
                q_offset: 0,
                counter: false,
                lengths: Some(vec![300, 200, 3, 150]),
                bias: None,
                scale: 1.0,
            },
        ),
        // teacher-forced decoding continued after a prefix, head size 32 (the tensor-core kernel)
        (
            "causal continuation, d_kv 32",
            AttnCase {
                b: 2,
                lq: 80,
                cap: 100,
                kv_len: 100,
                h: 3,
                dk: 32,
                causal: true,
                q_offset: 20,
                counter: false,
                lengths: None,
                bias: Some(false),
                scale: 0.5,
            },
        ),
        // an odd head size and BERT's scaling
        (
            "odd d_kv, scaled",
            AttnCase {
                b: 2,
                lq: 9,
                cap: 9,
                kv_len: 9,
                h: 3,
                dk: 20,
                causal: false,
                q_offset: 0,
                counter: false,
                lengths: Some(vec![9, 4]),
                bias: None,
                scale: 0.2236,
            },
        ),
        (
            "d_kv 128",
            AttnCase {
                b: 1,
                lq: 66,
                cap: 66,
                kv_len: 66,
                h: 2,
                dk: 128,
                causal: true,
                q_offset: 0,
                counter: false,
                lengths: None,
                bias: Some(false),
                scale: 1.0,
            },
        ),
        // d_kv 64 (the fast kernels) at lengths that are no multiple of a tile, fewer queries than keys
        (
            "encoder, odd lengths",
            AttnCase {
                b: 2,
                lq: 33,
                cap: 47,
                kv_len: 47,
                h: 4,
                dk: 64,
                causal: false,
                q_offset: 0,
                counter: false,
                lengths: Some(vec![47, 13]),
                bias: Some(true),
                scale: 1.0,
            },
        ),
        // teacher-forced cross-attention: several queries, an odd number of padded encoder keys
        (
            "cross, teacher-forced",
            AttnCase {
                b: 2,
                lq: 7,
                cap: 129,
                kv_len: 129,
                h: 4,
                dk: 64,
                causal: false,
                q_offset: 0,
                counter: false,
                lengths: Some(vec![129, 65]),
                bias: None,
                scale: 1.0,
            },
        ),
        // the first decoding step: a single key
        (
            "decode step, first position",
            AttnCase {
                b: 3,
                lq: 1,
                cap: 16,
                kv_len: 1,
                h: 4,
                dk: 64,
                causal: true,
                q_offset: 0,
                counter: false,
                lengths: None,
                bias: Some(false),
                scale: 1.0,
            },
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
    s + "]"
}

/// Attention forward, one case per row of the table.
pub fn attention<B: Backend + 'static>() -> Vec<Case<B>> {
    attention_table()
        .into_iter()
        .enumerate()
        .map(|(i, (what, c))| {
            let name = format!("attention {what} {}", attn_label(&c));
            let what = name.clone();
            Case::new(name, move |be: &B| attention_case(be, &mut Rand::new(5 + i as u64), &c, &what))
        })
        .collect()
}

pub fn kv_writes_and_copies<B: Backend>(be: &B) {
    let mut r = Rand::new(6);
    let (b, cap, d, n) = (3, 10, 16, 4);
    let src = r.vec(b * n * d, 1.0);
    for prec in [Prec::F32, Prec::Half] {
        let (mut dc, mut dg) = (Cpu.zeros_as(&[b, cap, d], prec).unwrap(), be.zeros_as(&[b, cap, d], prec).unwrap());
        Cpu.write_rows(&mut dc, &Cpu.upload(&src, &[b, n, d]).unwrap(), Position::At(5)).unwrap();
        be.write_rows(&mut dg, &be.upload(&src, &[b, n, d]).unwrap(), Position::At(5)).unwrap();
        let mut counter = be.upload_ids(&[1], &[1]).unwrap();
        be.advance(&mut counter, 1).unwrap();
        let mut cc = Cpu.upload_ids(&[2], &[1]).unwrap();
        Cpu.write_rows(&mut dc, &Cpu.upload(&src[..b * d], &[b, 1, d]).unwrap(), Position::Counter(&cc)).unwrap();
        be.write_rows(&mut dg, &be.upload(&src[..b * d], &[b, 1, d]).unwrap(), Position::Counter(&counter)).unwrap();
        close(&be.download(&dg).unwrap(), &dc.data, HALF, &format!("write_rows into {prec:?}"));
        let ids: Vec<u32> = (0..b as u32 * 2).collect();
        let (mut ic, mut ig) = (
            Cpu.upload_ids(&vec![0; b * cap], &[b, cap]).unwrap(),
            be.upload_ids(&vec![0; b * cap], &[b, cap]).unwrap(),
        );
        Cpu.advance(&mut cc, 3).unwrap();
        be.advance(&mut counter, 3).unwrap();
        Cpu.write_ids(&mut ic, &Cpu.upload_ids(&ids, &[b, 2]).unwrap(), Position::Counter(&cc)).unwrap();
        be.write_ids(&mut ig, &be.upload_ids(&ids, &[b, 2]).unwrap(), Position::Counter(&counter)).unwrap();
        assert_eq!(be.download_ids(&ig).unwrap(), ic.data, "write_ids at a counter");
        assert_eq!(ic.data[5..7], [0, 1], "the counter moved to 5");
    }
    let (mut dc, mut dg) = (Cpu.zeros(&[50]).unwrap(), be.zeros(&[50]).unwrap());
    let s = r.vec(7, 1.0);
    Cpu.copy_into(&mut dc, 31, &Cpu.upload(&s, &[7]).unwrap()).unwrap();
    be.copy_into(&mut dg, 31, &be.upload(&s, &[7]).unwrap()).unwrap();
    close(&be.download(&dg).unwrap(), &dc.data, F32, "copy_into");
}

pub fn token_choice<B: Backend>(be: &B) {
    let mut r = Rand::new(7);
    let (rows, v) = (64, 32128);
    let logits = r.vec(rows * v, 6.0);
    let (lc, lg) = (Cpu.upload(&logits, &[rows, v]).unwrap(), be.upload(&logits, &[rows, v]).unwrap());
    let streams: Vec<u32> = (100..100 + rows as u32).collect();
    let (sc, sg) = (Cpu.upload_ids(&streams, &[rows]).unwrap(), be.upload_ids(&streams, &[rows]).unwrap());
    let specs = [
        SampleSpec { greedy: true, temperature: 1.0, top_k: 0, top_p: 1.0, seed: 1, eos: 1, pad: 0, min_new_tokens: 0 },
        SampleSpec {
            greedy: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 2,
            eos: 1,
            pad: 0,
            min_new_tokens: 0,
        },
        SampleSpec {
            greedy: false,
            temperature: 0.7,
            top_k: 50,
            top_p: 1.0,
            seed: 3,
            eos: 1,
            pad: 0,
            min_new_tokens: 5,
        },
        SampleSpec {
            greedy: false,
            temperature: 1.3,
            top_k: 0,
            top_p: 0.9,
            seed: 4,
            eos: 1,
            pad: 0,
            min_new_tokens: 0,
        },
        SampleSpec {
            greedy: false,
            temperature: 1.0,
            top_k: 200,
            top_p: 0.5,
            seed: 5,
            eos: 1,
            pad: 0,
            min_new_tokens: 0,
        },
    ];
    for spec in &specs {
        for step in [0, 7] {
            let finished: Vec<u32> = (0..rows as u32).map(|i| (i % 9 == 4) as u32).collect();
            let (mut fc, mut fg) =
                (Cpu.upload_ids(&finished, &[rows]).unwrap(), be.upload_ids(&finished, &[rows]).unwrap());
            let (mut tc, mut tg) = (
                Cpu.upload_ids(&vec![9; rows], &[rows, 1]).unwrap(),
                be.upload_ids(&vec![9; rows], &[rows, 1]).unwrap(),
            );
            let (mut pc, mut pg) = (Cpu.zeros(&[rows]).unwrap(), be.zeros(&[rows]).unwrap());
            let counter = be.upload_ids(&[step as u32], &[1]).unwrap();
            Cpu.select_tokens(&lc, None, spec, Position::At(step), &sc, &mut fc, &mut tc, &mut pc).unwrap();
            be.select_tokens(&lg, None, spec, Position::Counter(&counter), &sg, &mut fg, &mut tg, &mut pg).unwrap();
            let (tw, tgot) = (tc.data.clone(), be.download_ids(&tg).unwrap());
            // The draw inverts a CDF summed in another order on each backend: a token at a
            // boundary may flip, but almost all must agree, and greedy exactly.
            let same = tw.iter().zip(&tgot).filter(|(a, b)| a == b).count();
            let need = if spec.greedy { rows } else { rows - 1 };
            if same < need {
                // Say which side is off: is the GPU's token even in the CPU's candidate set?
                for (i, (a, b)) in tw.iter().zip(&tgot).enumerate().filter(|(_, (a, b))| a != b) {
                    let raw = &logits[i * v..(i + 1) * v];
                    let greedy = SampleSpec { greedy: true, ..*spec };
                    eprintln!(
                        "row {i}: cpu {a} gpu {b}; logit cpu-token {} gpu-token {} argmax {}",
                        raw[*a as usize],
                        raw[*b as usize],
                        detox::backend::cpu::choose_token(raw, &greedy, 0, step as u64)
                    );
                }
            }
            assert!(same >= need, "{spec:?} step {step}: {same}/{rows} tokens agree");
            let lp = be.download(&pg).unwrap();
            for (i, (&t, &l)) in tgot.iter().zip(&lp).enumerate() {
                if tw[i] == t {
                    assert!((l - pc.data[i]).abs() < 1e-4, "log-prob of row {i}");
                }
                if finished[i] != 0 {
                    assert_eq!((t, l), (0, 0.0), "finished rows get pad");
                }
                if step < spec.min_new_tokens {
                    assert_ne!(t, 1, "EOS is suppressed before min_new_tokens");
                }
            }
            assert_eq!(be.download_ids(&fg).unwrap(), fc.data, "finished flags");
        }
    }
}

/// Scores that may hold −∞ (banned tokens): the same bans, and the rest within `tol`.
fn same_scores(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g.is_infinite() && g == w) || (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}: element {i} is {g}, the CPU's {w}"
        );
    }
}

/// Hugging Face's processors, beam search's step over several steps and the KV caches' gather by
/// beam, against the CPU. Each step feeds both backends the CPU's processed scores, so that the
/// choices must agree exactly; the logits favour a few tokens and EOS, so that beams repeat
/// tokens (penalties, bans) and finish.
pub fn beam_search_steps<B: Backend>(be: &B) {
    let mut r = Rand::new(31);
    let (items, k, v, t) = (5, 4, 2000, 7);
    let n = items * k;
    for (early, length_penalty, penalty, ngram) in
        [(EarlyStopping::False, 1.0, 1.3, 2), (EarlyStopping::True, 0.6, 1.0, 0), (EarlyStopping::Never, 2.0, 0.8, 3)]
    {
        let what = format!("{early:?} length_penalty {length_penalty} repetition {penalty} ngram {ngram}");
        let spec = BeamSpec { num_beams: k, length_penalty, early_stopping: early, max_new_tokens: t, eos: 1, pad: 0 };
        let process = ProcessSpec {
            log_softmax: true,
            repetition_penalty: penalty,
            no_repeat_ngram_size: ngram,
            min_new_tokens: 2,
            eos: 1,
            decoder_start: 0,
        };
        let mut sc = BeamState::new(&Cpu, items, &spec, 0).unwrap();
        let mut sg = BeamState::new(be, items, &spec, 0).unwrap();
        let mut counter = be.upload_ids(&[0], &[1]).unwrap();
        for step in 0..t {
            let mut logits = r.vec(n * v, 2.0);
            for (row, l) in logits.chunks_mut(v).enumerate() {
                for (tok, x) in l.iter_mut().take(6).enumerate() {
                    *x += 6.0 - tok as f32 * 0.5;
                }
                l[1] += (row % 3) as f32 * 1.5 - 2.0;
            }
            let (lc, lg) = (Cpu.upload(&logits, &[n, v]).unwrap(), be.upload(&logits, &[n, v]).unwrap());
            let at = Position::Counter(&counter);
            let pc = Cpu.process_logits(&lc, &sc.seqs, &process, Position::At(step)).unwrap();
            let pg = be.process_logits(&lg, &sg.seqs, &process, at).unwrap();
            same_scores(&be.download(&pg).unwrap(), &pc.data, 1e-5, &format!("{what}: process_logits step {step}"));
            let pg = be.upload(&pc.data, &[n, v]).unwrap();
            Cpu.beam_step(&lc, &pc, &spec, Position::At(step), &mut sc).unwrap();
            be.beam_step(&lg, &pg, &spec, at, &mut sg).unwrap();
            let ids = [
                ("seqs", &sc.seqs, &sg.seqs),
                ("fin_seqs", &sc.fin_seqs, &sg.fin_seqs),
                ("fin_lens", &sc.fin_lens, &sg.fin_lens),
                ("done", &sc.done, &sg.done),
                ("src", &sc.src, &sg.src),
                ("next", &sc.next, &sg.next),
            ];
            for (name, c, g) in ids {
                assert_eq!(be.download_ids(g).unwrap(), c.data, "{what}: beam_step's {name} at step {step}");
            }
            let floats = [
                ("scores", &sc.scores, &sg.scores, 0.0),
                ("fin_scores", &sc.fin_scores, &sg.fin_scores, 0.0),
                ("logprobs", &sc.logprobs, &sg.logprobs, 1e-5),
                ("fin_logprobs", &sc.fin_logprobs, &sg.fin_logprobs, 1e-5),
            ];
            for (name, c, g, tol) in floats {
                same_scores(
                    &be.download(g).unwrap(),
                    &c.data,
                    tol,
                    &format!("{what}: beam_step's {name} at step {step}"),
                );
            }
            be.advance(&mut counter, 1).unwrap();
        }
        assert!(sc.fin_lens.data.iter().any(|&l| l > 0 && (l as usize) < t), "{what}: no beam finished early");
        assert!(sc.fin_lens.data.iter().any(|&l| l as usize == t), "{what}: no beam ran to the end");
    }
    // The caches' gather: half (in 16-byte units and in single elements) and f32.
    for (d, prec) in [(24, Prec::Half), (5, Prec::Half), (5, Prec::F32), (24, Prec::F32)] {
        let (cap, upto) = (7, 4);
        let vals = r.vec(n * cap * d, 1.0);
        let (mut xc, mut xg) = (Cpu.zeros_as(&[n, cap, d], prec).unwrap(), be.zeros_as(&[n, cap, d], prec).unwrap());
        Cpu.write_rows(&mut xc, &Cpu.upload(&vals, &[n, cap, d]).unwrap(), Position::At(0)).unwrap();
        be.write_rows(&mut xg, &be.upload(&vals, &[n, cap, d]).unwrap(), Position::At(0)).unwrap();
        let src: Vec<u32> = (0..n as u32).map(|i| i / k as u32 * k as u32 + r.ids(1, k as u32)[0]).collect();
        let (ic, ig) = (Cpu.upload_ids(&src, &[n]).unwrap(), be.upload_ids(&src, &[n]).unwrap());
        let counter = be.upload_ids(&[upto as u32], &[1]).unwrap();
        Cpu.gather_beams(&mut xc, &ic, Position::At(upto)).unwrap();
        be.gather_beams(&mut xg, &ig, Position::Counter(&counter)).unwrap();
        assert_eq!(be.download(&xg).unwrap(), xc.data, "gather_beams d {d} {prec:?}");
        let moved = (0..n).find(|&i| src[i] as usize != i).expect("some beam moves");
        let s = src[moved] as usize;
        assert_eq!(xc.data[moved * cap * d..(moved * cap + upto) * d], vals[s * cap * d..(s * cap + upto) * d]);
        assert_eq!(
            xc.data[(moved * cap + upto) * d..(moved + 1) * cap * d],
            vals[(moved * cap + upto) * d..(moved + 1) * cap * d]
        );
    }
}

crate::common::suite!("ops":
    table embedding_and_gather,
    table linear,
    each affine_and_elementwise,
    table split_and_gated_gelu,
    table norms,
    table attention,
    each kv_writes_and_copies,
    each token_choice,
    each beam_search_steps,
);

//! `cargo bench --bench kernels [-- FILTER…]`: every operation of the CUDA backend timed alone, at the
//! shapes flan-t5-base really runs in BASELINE.md's workloads W64 and W256, each beside its roofline
//! floor; and the two ceilings that floor is drawn from (a device copy, a large fp16 product),
//! measured in the same run. This file owns only the harness: it reaches the engine through the
//! crate's public API. Without a usable GPU it says so in one line and exits 0.
//!
//! Method (METHOD.md of the device machine): random data, never zeros; an eager warm-up first, so
//! module loads, cuBLAS's algorithm choice and attention's bucket tables stay out of the figures;
//! then each case is recorded as one CUDA graph of many calls (the decoding step runs as a graph in
//! the engine too, so the gaps between graph nodes are counted as the model pays them) and the
//! graph's replays are timed between two device syncs; the median of several replays is reported
//! (`gather_rows`, which waits for the host, is timed call by call instead). Inputs rotate over
//! enough buffer sets that the 60 MB L2 cannot serve them.
//!
//! Counting: bytes are the fewest an op must move (each input read once, each output written once,
//! in the precision the engine stores it); FLOPs count 2 per multiply-add of the matrix work only.
//! The floor is max(bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s), BASELINE.md's measured ceilings, and
//! "% ceil" is floor / median: the fraction of the relevant ceiling achieved.
//!
//! On the GPU machine, which has no Rust: build here with `cargo bench --no-run` (nvcc present, so
//! the kernels are embedded), carry the `target/release/deps/kernels-*` binary it names, and run it
//! there with the same optional filters: `./kernels attention lora`.

use anyhow::{Result, ensure};
use detox::backend::cuda::{Buf, Cuda};
use detox::backend::prelude::*;
use detox::backend::{Activation, AttnInputs, AttnSpec, LoraRef, Position, Prec, RelBias, SampleSpec};
use detox::checkpoint::{DType, HostTensor};
use half::f16;
use std::process::ExitCode;
use std::time::Instant;

type Tensor = <Cuda as Device>::Tensor;
type Weight = <Cuda as Device>::Weight;
type Graph = <Cuda as Device>::Graph;
/// One call of the op under test, on buffer set `i`.
type Run<'b> = Box<dyn FnMut(usize) -> Result<()> + 'b>;

/// The ceilings measured on the H200 (BASELINE.md, DESIGN.md's performance method).
const PEAK_BYTES: f64 = 4.3e12;
const PEAK_FLOPS: f64 = 790e12;
/// Inputs rotate over at least three L2s' worth of buffers (60 MB on the H200).
const ROTATE_BYTES: f64 = 3.0 * 60e6;
/// Tiny decode-step inputs would need thousands of sets; past this many the op is launch-bound
/// whatever the cache does.
const MAX_SETS: usize = 512;
/// Each timed replay runs at least this long, so a sync's few microseconds are noise.
const TARGET_S: f64 = 4e-3;
const MAX_REPS: usize = 4096;
const SAMPLES: usize = 11;

// flan-t5-base.
const D: usize = 768;
const HEADS: usize = 12;
const DK: usize = 64;
const FF: usize = 2048;
const VOCAB: usize = 32128;
const BUCKETS: usize = 32;
const MAX_DISTANCE: usize = 128;
const EPS: f32 = 1e-6;
const LORA_R: usize = 32;
// The workloads: prompts of 256 tokens, 64 generated.
const SRC: usize = 256;
const GEN: usize = 64;
// The reward classifier, BERT-base shaped, on responses padded to 128 tokens.
const CLS_D: usize = 768;
const CLS_FF: usize = 3072;
const CLS_LEN: usize = 128;

struct Workload {
    name: &'static str,
    batch: usize,
    /// PPO minibatch: its teacher-forced forward has minibatch × GEN decoder tokens.
    minibatch: usize,
}

const WORKLOADS: [Workload; 2] =
    [Workload { name: "W64", batch: 64, minibatch: 16 }, Workload { name: "W256", batch: 256, minibatch: 32 }];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Attn {
    /// Encoder self-attention: SRC queries against SRC keys, relative bias, right padding.
    Encoder,
    /// A decoding step's cross-attention: 1 query against the SRC-key encoder cache, padding.
    Cross,
    /// A decoding step's self-attention at the last position of a GEN-key causal cache, its
    /// position taken from a device counter as in the recorded step.
    SelfCausal,
}

#[derive(Clone, Copy)]
enum Choice {
    Greedy,
    /// The seed's PPO rollout: temperature 1, no top-k, no top-p.
    Sample,
    /// Top-k 50 and top-p 0.9, which add the radix searches over the vocabulary.
    SampleTopKP,
}

/// Where a product's result goes.
#[derive(Clone, Copy)]
enum Out {
    /// `linear_to`: a new tensor in this precision.
    To(Prec),
    /// `linear_add`: added into an f32 tensor (the residual stream).
    Add,
}

/// One case's operation and shape; the other dimensions are flan-t5-base's. `Linear` is
/// `[m, k] · [n, k]ᵀ` with a rank-LORA_R adapter of D outputs at each of `lora`'s columns.
#[derive(Clone, Copy)]
enum Op {
    Copy { n: usize },
    Linear { m: usize, k: usize, n: usize, out: Out, lora: &'static [usize] },
    SplitLast { rows: usize, pieces: usize },
    MatmulCopy,
    RmsNorm { rows: usize },
    AddAssign { rows: usize },
    GatedGelu { rows: usize, input: Prec },
    Embedding { b: usize, l: usize },
    Attention { b: usize, kind: Attn },
    AttentionBackward { b: usize, table_grad: bool },
    WriteRows { b: usize },
    WriteIds { b: usize },
    Advance,
    SelectTokens { rows: usize, choice: Choice },
    ScaleAssign { rows: usize },
    Affine { rows: usize },
    LayerNorm { rows: usize },
    BiasAdd { rows: usize },
    Gelu { rows: usize },
    GatherRows { b: usize },
}

struct Case {
    name: String,
    op: Op,
    /// Always run, whatever the filter: the figures to read every other row against.
    ceiling: bool,
}

fn prec_name(p: Prec) -> &'static str {
    match p {
        Prec::F32 => "f32",
        Prec::Half => "f16",
    }
}

fn prec_bytes(p: Prec) -> usize {
    match p {
        Prec::F32 => 4,
        Prec::Half => 2,
    }
}

fn cases() -> Vec<Case> {
    let mut c = Vec::new();
    let mut push = |name: String, op: Op, ceiling: bool| c.push(Case { name, op, ceiling });
    push("ceiling copy".into(), Op::Copy { n: 1 << 28 }, true);
    for out in [Prec::F32, Prec::Half] {
        let op = Op::Linear { m: 8192, k: 8192, n: 8192, out: Out::To(out), lora: &[] };
        push(format!("ceiling gemm →{}", prec_name(out)), op, true);
    }
    // The products as the model runs them: q, k and v stacked into one, cross-attention's k and v
    // likewise, wi_0 and wi_1 likewise; o and wo add into the residual stream.
    for w in &WORKLOADS {
        let (enc, dec, tf) = (w.batch * SRC, w.batch, w.minibatch * GEN);
        let products = [
            ("enc.qkv", enc, D, 3 * D),
            ("enc.cross_kv", enc, D, 2 * D),
            ("enc.wi", enc, D, 2 * FF),
            ("dec.qkv", dec, D, 3 * D),
            ("dec.cross_q", dec, D, D),
            ("dec.wi", dec, D, 2 * FF),
            ("dec.lm_head", dec, D, VOCAB),
            ("tf.lm_head", tf, D, VOCAB),
        ];
        for (part, m, k, n) in products {
            for out in [Prec::F32, Prec::Half] {
                let op = Op::Linear { m, k, n, out: Out::To(out), lora: &[] };
                push(format!("linear {part} {} →{}", w.name, prec_name(out)), op, false);
            }
        }
        for (part, m, k) in [("enc.o", enc, D), ("enc.wo", enc, FF), ("dec.o", dec, D), ("dec.wo", dec, FF)] {
            let op = Op::Linear { m, k, n: D, out: Out::Add, lora: &[] };
            push(format!("linear_add {part} {}", w.name), op, false);
        }
    }
    // Adapters: on one 768 → 768 product, and on q and v of the stacked product as the policy has
    // them; outputs in half, as the model keeps q, k and v.
    const Q: &[usize] = &[0];
    const QV: &[usize] = &[0, 2 * D];
    for (part, m, n, cols) in [("enc.q", 64 * SRC, D, Q), ("enc.qkv", 64 * SRC, 3 * D, QV), ("dec.qkv", 64, 3 * D, QV)]
    {
        for (state, lora) in [("off", &[][..]), ("on", cols)] {
            let op = Op::Linear { m, k: D, n, out: Out::To(Prec::Half), lora };
            push(format!("lora {part} W64 {state}"), op, false);
        }
    }
    push("matmul_copy lora.a".into(), Op::MatmulCopy, false);
    for w in &WORKLOADS {
        let (b, n) = (w.batch, w.name);
        push(format!("rms_norm enc {n}"), Op::RmsNorm { rows: b * SRC }, false);
        push(format!("rms_norm dec {n}"), Op::RmsNorm { rows: b }, false);
        push(format!("split_last enc.qkv {n}"), Op::SplitLast { rows: b * SRC, pieces: 3 }, false);
        push(format!("split_last enc.cross_kv {n}"), Op::SplitLast { rows: b * SRC, pieces: 2 }, false);
        push(format!("split_last dec.qkv {n}"), Op::SplitLast { rows: b, pieces: 3 }, false);
        push(format!("gated_gelu enc {n} f32"), Op::GatedGelu { rows: b * SRC, input: Prec::F32 }, false);
        push(format!("gated_gelu enc {n} f16"), Op::GatedGelu { rows: b * SRC, input: Prec::Half }, false);
        push(format!("gated_gelu dec {n} f32"), Op::GatedGelu { rows: b, input: Prec::F32 }, false);
        push(format!("embedding enc {n}"), Op::Embedding { b, l: SRC }, false);
        push(format!("embedding dec {n}"), Op::Embedding { b, l: 1 }, false);
    }
    for w in &WORKLOADS {
        let (b, n) = (w.batch, w.name);
        push(format!("attention enc {n}"), Op::Attention { b, kind: Attn::Encoder }, false);
        push(format!("attention dec.cross {n}"), Op::Attention { b, kind: Attn::Cross }, false);
        push(format!("attention dec.self {n}"), Op::Attention { b, kind: Attn::SelfCausal }, false);
        for (what, table_grad) in [("", false), (" +table", true)] {
            let op = Op::AttentionBackward { b: w.minibatch, table_grad };
            push(format!("attention_backward enc {n}{what}"), op, false);
        }
        push(format!("write_rows dec.self {n}"), Op::WriteRows { b }, false);
        push(format!("write_ids dec {n}"), Op::WriteIds { b }, false);
    }
    push("advance dec".into(), Op::Advance, false);
    for w in &WORKLOADS {
        let (b, n) = (w.batch, w.name);
        for (what, choice) in
            [("greedy", Choice::Greedy), ("sample", Choice::Sample), ("sample k50 p0.9", Choice::SampleTopKP)]
        {
            push(format!("select_tokens {what} {n}"), Op::SelectTokens { rows: b, choice }, false);
        }
        push(format!("scale_assign dec.logits {n}"), Op::ScaleAssign { rows: b }, false);
        push(format!("affine value_head {n}"), Op::Affine { rows: b }, false);
    }
    for w in &WORKLOADS {
        let (b, n) = (w.batch, w.name);
        push(format!("layer_norm cls {n}"), Op::LayerNorm { rows: b * CLS_LEN }, false);
        push(format!("add_assign cls {n}"), Op::AddAssign { rows: b * CLS_LEN }, false);
        push(format!("bias_add cls {n}"), Op::BiasAdd { rows: b * CLS_LEN }, false);
        push(format!("activation gelu cls {n}"), Op::Gelu { rows: b * CLS_LEN }, false);
        push(format!("gather_rows cls {n} (eager)"), Op::GatherRows { b }, false);
    }
    c
}

fn describe(op: &Op) -> String {
    match *op {
        Op::Copy { n } => format!("{} MiB f32", (n * 4) >> 20),
        Op::Linear { m, k, n, out, lora } => {
            let adapters = if lora.is_empty() { String::new() } else { format!(" +{}×r{LORA_R}", lora.len()) };
            let into = if matches!(out, Out::Add) { " +=" } else { "" };
            format!("{m}×{k} · {n}×{k}ᵀ{into}{adapters}")
        }
        Op::SplitLast { rows, pieces } => format!("{rows}×{} f16 → {pieces}×{D}", pieces * D),
        Op::MatmulCopy => format!("{LORA_R}×{D} f32→f16"),
        Op::RmsNorm { rows } => format!("{rows}×{D} f32→f16"),
        Op::AddAssign { rows } => format!("{rows}×{CLS_D} f32 += f32"),
        Op::GatedGelu { rows, input } => format!("{rows}×{} {}→f16 {rows}×{FF}", 2 * FF, prec_name(input)),
        Op::Embedding { b, l } => format!("{b}×{l} ids of {VOCAB}×{D}"),
        Op::Attention { b, kind: Attn::Encoder } => format!("{b}×{SRC}q·{SRC}k {HEADS}×{DK} bias pad"),
        Op::Attention { b, kind: Attn::Cross } => format!("{b}×1q·{SRC}k {HEADS}×{DK} pad"),
        Op::Attention { b, kind: Attn::SelfCausal } => format!("{b}×1q·{GEN}k {HEADS}×{DK} bias causal"),
        Op::AttentionBackward { b, table_grad } => {
            format!("{b}×{SRC}q·{SRC}k {HEADS}×{DK} bias pad{}", if table_grad { " → d_table" } else { "" })
        }
        Op::WriteRows { b } => format!("{b}×1×{D} → {b}×{GEN}×{D} f16"),
        Op::WriteIds { b } => format!("{b}×1 → {b}×{}", GEN + 1),
        Op::Advance => "1 counter".into(),
        Op::SelectTokens { rows, .. } | Op::ScaleAssign { rows } => {
            format!("{rows}×{VOCAB} f32")
        }
        Op::Affine { rows } => format!("{rows}×{D} f16 · 1×{D}ᵀ f32"),
        Op::LayerNorm { rows } => format!("{rows}×{CLS_D} f32"),
        Op::BiasAdd { rows } => format!("{rows}×{CLS_D} f32 += f16"),
        Op::Gelu { rows } => format!("{rows}×{CLS_FF} f32"),
        Op::GatherRows { b } => format!("{b} rows of {}×{CLS_D}", b * CLS_LEN),
    }
}

/// SplitMix64: a few lines, reproducible, and fast enough to fill hundreds of MB.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [−scale, scale).
    fn uniform(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
    }

    /// Uniform in lo..=hi.
    fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// How many buffer sets of `bytes` each keep the L2 from serving repeated calls.
fn sets_for(bytes: usize) -> usize {
    ((ROTATE_BYTES / bytes.max(1) as f64).ceil() as usize).clamp(1, MAX_SETS)
}

/// Values beyond one host chunk repeat it, copied on the device: making a GiB stays fast, and a
/// period of 16 MB changes nothing a kernel's speed depends on.
const CHUNK: usize = 1 << 22;

fn f32_tensor(be: &Cuda, shape: &[usize], scale: f32, g: &mut Gen) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let host: Vec<f32> = (0..n.min(CHUNK)).map(|_| g.uniform(scale)).collect();
    if n <= CHUNK {
        return be.upload(&host, shape);
    }
    let chunk = be.upload(&host, &[CHUNK])?;
    let mut t = be.zeros(shape)?;
    let mut at = 0;
    while at + CHUNK <= n {
        be.copy_into(&mut t, at, &chunk)?;
        at += CHUNK;
    }
    if at < n {
        be.copy_into(&mut t, at, &be.upload(&host[..n - at], &[n - at])?)?;
    }
    Ok(t)
}

/// `n` f32 tensors of the same random values, at different addresses.
fn f32_sets(be: &Cuda, shape: &[usize], n: usize, scale: f32, g: &mut Gen) -> Result<Vec<Tensor>> {
    let first = f32_tensor(be, shape, scale, g)?;
    let mut sets = Vec::with_capacity(n);
    for _ in 1..n {
        let mut t = be.zeros(shape)?;
        be.copy_into(&mut t, 0, &first)?;
        sets.push(t);
    }
    sets.push(first);
    Ok(sets)
}

/// `n` half tensors of random values of order 1. The API uploads only f32, so they come out of a
/// thin product into half, which cuBLAS does at any shape (a norm kernel might be specialised to
/// d_model).
fn half_sets(be: &Cuda, shape: &[usize], n: usize, g: &mut Gen) -> Result<Vec<Tensor>> {
    const THIN: usize = 64;
    let (last, lead) = shape.split_last().expect("a shape has a last dimension");
    let x = f32_tensor(be, &[lead, &[THIN]].concat(), 1.0, g)?;
    let w = weight_sets(be, &[*last, THIN], 1, 0.25, g)?.remove(0);
    let sets: Vec<Tensor> = (0..n).map(|_| be.linear_to(&x, &w, &[], Prec::Half)).collect::<Result<_>>()?;
    ensure!(
        sets.iter().all(|t| matches!(t.buf, Buf::F16(_))),
        "linear_to(.., Prec::Half) no longer returns half on CUDA: the bench needs another way to make its half inputs"
    );
    Ok(sets)
}

/// `n` uploads of one random fp16 weight.
fn weight_sets(be: &Cuda, shape: &[usize], n: usize, scale: f32, g: &mut Gen) -> Result<Vec<Weight>> {
    let numel: usize = shape.iter().product();
    let mut bytes = Vec::with_capacity(numel * 2);
    for _ in 0..numel {
        bytes.extend_from_slice(&f16::from_f32(g.uniform(scale)).to_le_bytes());
    }
    let host = HostTensor { name: "bench", dtype: DType::F16, shape, bytes: &bytes };
    (0..n).map(|_| be.upload_weight(&host)).collect()
}

/// A prepared case: its buffers live in `run`.
struct Bench<'b> {
    bytes: f64,
    flops: f64,
    sets: usize,
    /// Timed call by call instead of as a graph: for ops that wait for the host.
    eager: bool,
    run: Run<'b>,
}

impl<'b> Bench<'b> {
    fn graph(bytes: usize, flops: f64, sets: usize, run: Run<'b>) -> Self {
        Self { bytes: bytes as f64, flops, sets, eager: false, run }
    }
}

/// Uploads one case's inputs and returns the call to time with its byte and FLOP counts.
fn prepare<'b>(be: &'b Cuda, op: &Op, g: &mut Gen) -> Result<Bench<'b>> {
    Ok(match *op {
        Op::Copy { n } => {
            let src = f32_tensor(be, &[n], 1.0, g)?;
            let mut dst = be.zeros(&[n])?;
            Bench::graph(8 * n, 0.0, 1, Box::new(move |_| be.copy_into(&mut dst, 0, &src)))
        }
        Op::Linear { m, k, n, out, lora } => {
            let (ysize, add) = match out {
                Out::To(p) => (prec_bytes(p), false),
                Out::Add => (4, true),
            };
            // x and w read, y written (and read first when adding into it).
            let set = m * k * 2 + n * k * 2 + m * n * ysize * if add { 2 } else { 1 };
            let sets = sets_for(set);
            let xs = half_sets(be, &[m, k], sets, g)?;
            let ws = weight_sets(be, &[n, k], sets, 0.05, g)?;
            let mut accs = if add { f32_sets(be, &[m, n], sets, 1.0, g)? } else { Vec::new() };
            let (mut adapter_bytes, mut adapter_flops) = (0, 0);
            let mut adapters = Vec::new();
            for &col in lora {
                let a = f32_tensor(be, &[LORA_R, k], 0.1, g)?;
                let b = f32_tensor(be, &[D, LORA_R], 0.1, g)?;
                // The copies the products read, made once per optimiser update as the model does.
                let shadow = match (be.matmul_copy(&a)?, be.matmul_copy(&b)?) {
                    (Some(a), Some(b)) => Some((a, b)),
                    _ => None,
                };
                adapter_bytes += LORA_R * (k + D) * if shadow.is_some() { 2 } else { 4 };
                adapter_flops += 2 * m * LORA_R * (k + D);
                adapters.push((a, b, shadow, col));
            }
            Bench::graph(
                set + adapter_bytes,
                (2 * m * n * k + adapter_flops) as f64,
                sets,
                Box::new(move |i| {
                    let loras: Vec<LoraRef<'_, Cuda>> = adapters
                        .iter()
                        .map(|(a, b, shadow, col)| LoraRef {
                            a,
                            b,
                            shadow: shadow.as_ref().map(|(a, b)| (a, b)),
                            scale: 1.0,
                            col: *col,
                            dropout: None,
                        })
                        .collect();
                    match out {
                        Out::To(p) => be.linear_to(&xs[i], &ws[i], &loras, p).map(drop),
                        Out::Add => be.linear_add(&xs[i], &ws[i], &loras, &mut accs[i]),
                    }
                }),
            )
        }
        Op::SplitLast { rows, pieces } => {
            let sets = sets_for(rows * pieces * D * 2);
            let xs = half_sets(be, &[rows, pieces * D], sets, g)?;
            let widths = vec![D; pieces];
            Bench::graph(
                2 * rows * pieces * D * 2,
                0.0,
                sets,
                Box::new(move |i| be.split_last(&xs[i], &widths).map(drop)),
            )
        }
        Op::MatmulCopy => {
            let sets = sets_for(LORA_R * D * 4);
            let xs = f32_sets(be, &[LORA_R, D], sets, 0.1, g)?;
            Bench::graph(LORA_R * D * 6, 0.0, sets, Box::new(move |i| be.matmul_copy(&xs[i]).map(drop)))
        }
        Op::RmsNorm { rows } => {
            let sets = sets_for(rows * D * 4);
            let xs = f32_sets(be, &[rows, D], sets, 1.0, g)?;
            let w = weight_sets(be, &[D], 1, 1.0, g)?.remove(0);
            Bench::graph(rows * D * 6 + D * 2, 0.0, sets, Box::new(move |i| be.rms_norm(&xs[i], &w, EPS).map(drop)))
        }
        Op::AddAssign { rows } => {
            let sets = sets_for(rows * CLS_D * 8);
            let mut xs = f32_sets(be, &[rows, CLS_D], sets, 1.0, g)?;
            let ys = f32_sets(be, &[rows, CLS_D], sets, 1.0, g)?;
            Bench::graph(rows * CLS_D * 12, 0.0, sets, Box::new(move |i| be.add_assign(&mut xs[i], &ys[i])))
        }
        Op::GatedGelu { rows, input } => {
            // gate and up side by side, as the stacked wi product leaves them.
            let sets = sets_for(rows * 2 * FF * prec_bytes(input));
            let gate_ups = match input {
                Prec::F32 => f32_sets(be, &[rows, 2 * FF], sets, 2.0, g)?,
                Prec::Half => half_sets(be, &[rows, 2 * FF], sets, g)?,
            };
            let bytes = rows * 2 * FF * prec_bytes(input) + rows * FF * 2;
            Bench::graph(bytes, 0.0, sets, Box::new(move |i| be.gated_gelu(&gate_ups[i], None).map(drop)))
        }
        Op::Embedding { b, l } => {
            // The table is what a cache could keep: rotate it.
            let sets = sets_for(VOCAB * D * 2);
            let tables = weight_sets(be, &[VOCAB, D], sets, 1.0, g)?;
            let token_ids: Vec<u32> = (0..b * l).map(|_| g.between(0, VOCAB - 1) as u32).collect();
            let token_ids = be.upload_ids(&token_ids, &[b, l])?;
            let n = b * l;
            Bench::graph(
                n * 4 + n * D * 6,
                0.0,
                sets,
                Box::new(move |i| be.embedding(&tables[i], &token_ids).map(drop)),
            )
        }
        Op::Attention { b, kind } => attention(be, b, kind, g)?,
        Op::AttentionBackward { b, table_grad } => attention_backward(be, b, table_grad, g)?,
        Op::WriteRows { b } => {
            // The cache is the buffer a cache line could be kept for: rotate it.
            let sets = sets_for(b * GEN * D * 2);
            let mut caches: Vec<Tensor> =
                (0..sets).map(|_| be.zeros_as(&[b, GEN, D], Prec::Half)).collect::<Result<_>>()?;
            let rows = half_sets(be, &[b, 1, D], sets, g)?;
            let pos = be.upload_ids(&[GEN as u32 / 2], &[1])?;
            Bench::graph(
                b * D * 4,
                0.0,
                sets,
                Box::new(move |i| be.write_rows(&mut caches[i], &rows[i], Position::Counter(&pos))),
            )
        }
        Op::WriteIds { b } => {
            let mut dst = be.upload_ids(&vec![0; b * (GEN + 1)], &[b, GEN + 1])?;
            let src: Vec<u32> = (0..b).map(|_| g.between(0, VOCAB - 1) as u32).collect();
            let src = be.upload_ids(&src, &[b, 1])?;
            let pos = be.upload_ids(&[GEN as u32 / 2], &[1])?;
            Bench::graph(b * 8, 0.0, 1, Box::new(move |_| be.write_ids(&mut dst, &src, Position::Counter(&pos))))
        }
        Op::Advance => {
            let mut counter = be.upload_ids(&[0], &[1])?;
            Bench::graph(8, 0.0, 1, Box::new(move |_| be.advance(&mut counter, 1)))
        }
        Op::SelectTokens { rows, choice } => {
            let sets = sets_for(rows * VOCAB * 4);
            let logits = f32_sets(be, &[rows, VOCAB], sets, 8.0, g)?;
            let streams = be.upload_ids(&(0..rows as u32).collect::<Vec<_>>(), &[rows])?;
            let mut finished = be.upload_ids(&vec![0; rows], &[rows])?;
            let mut tokens = be.upload_ids(&vec![0; rows], &[rows, 1])?;
            let mut logprobs = be.zeros(&[rows])?;
            let (greedy, top_k, top_p) = match choice {
                Choice::Greedy => (true, 0, 1.0),
                Choice::Sample => (false, 0, 1.0),
                Choice::SampleTopKP => (false, 50, 0.9),
            };
            // EOS stays forbidden (min_new_tokens is never reached), so no row finishes and every
            // call does a whole row's work.
            let spec = SampleSpec {
                greedy,
                temperature: 1.0,
                top_k,
                top_p,
                seed: 7,
                eos: 1,
                pad: 0,
                min_new_tokens: usize::MAX,
            };
            // Logits read once; streams and flags read, tokens and log-probs written.
            Bench::graph(
                rows * VOCAB * 4 + rows * 16,
                0.0,
                sets,
                Box::new(move |i| {
                    let at = Position::At(0);
                    be.select_tokens(&logits[i], None, &spec, at, &streams, &mut finished, &mut tokens, &mut logprobs)
                }),
            )
        }
        Op::ScaleAssign { rows } => {
            let sets = sets_for(rows * VOCAB * 4);
            let mut logits = f32_sets(be, &[rows, VOCAB], sets, 8.0, g)?;
            // −1 keeps the values bounded over thousands of calls.
            Bench::graph(rows * VOCAB * 8, 0.0, sets, Box::new(move |i| be.scale_assign(&mut logits[i], -1.0)))
        }
        Op::Affine { rows } => {
            // The value head reads the decoder's final states, which rms_norm leaves in half.
            let sets = sets_for(rows * D * 2);
            let xs = half_sets(be, &[rows, 1, D], sets, g)?;
            let w = f32_tensor(be, &[1, D], 0.1, g)?;
            let bias = f32_tensor(be, &[1], 0.1, g)?;
            let bytes = rows * D * 2 + D * 4 + 4 + rows * 4;
            Bench::graph(
                bytes,
                (2 * rows * D) as f64,
                sets,
                Box::new(move |i| be.affine(&xs[i], &w, Some(&bias)).map(drop)),
            )
        }
        Op::LayerNorm { rows } => {
            let sets = sets_for(rows * CLS_D * 4);
            let xs = f32_sets(be, &[rows, CLS_D], sets, 1.0, g)?;
            let mut wb = weight_sets(be, &[CLS_D], 2, 1.0, g)?;
            let (w, bias) = (wb.remove(0), wb.remove(0));
            Bench::graph(
                rows * CLS_D * 8 + CLS_D * 4,
                0.0,
                sets,
                Box::new(move |i| be.layer_norm(&xs[i], &w, &bias, 1e-12).map(drop)),
            )
        }
        Op::BiasAdd { rows } => {
            let sets = sets_for(rows * CLS_D * 4);
            let mut xs = f32_sets(be, &[rows, CLS_D], sets, 1.0, g)?;
            let bias = weight_sets(be, &[CLS_D], 1, 0.01, g)?.remove(0);
            Bench::graph(rows * CLS_D * 8 + CLS_D * 2, 0.0, sets, Box::new(move |i| be.bias_add(&mut xs[i], &bias)))
        }
        Op::Gelu { rows } => {
            let sets = sets_for(rows * CLS_FF * 4);
            let xs = f32_sets(be, &[rows, CLS_FF], sets, 2.0, g)?;
            Bench::graph(
                rows * CLS_FF * 8,
                0.0,
                sets,
                Box::new(move |i| be.activation(&xs[i], Activation::GeluErf).map(drop)),
            )
        }
        Op::GatherRows { b } => {
            // The classifier's pooling: each row's first token. The op checks the indices on the
            // host, which a graph cannot record, so it is timed call by call.
            let x = f32_tensor(be, &[b * CLS_LEN, CLS_D], 1.0, g)?;
            let first: Vec<u32> = (0..b).map(|i| (i * CLS_LEN) as u32).collect();
            let rows = be.upload_ids(&first, &[b])?;
            Bench {
                bytes: (b * 4 + 2 * b * CLS_D * 4) as f64,
                flops: 0.0,
                sets: 1,
                eager: true,
                run: Box::new(move |_| be.gather_rows(&x, &rows).map(drop)),
            }
        }
    })
}

fn attention<'b>(be: &'b Cuda, b: usize, kind: Attn, g: &mut Gen) -> Result<Bench<'b>> {
    let (lq, lk) = match kind {
        Attn::Encoder => (SRC, SRC),
        Attn::Cross => (1, SRC),
        Attn::SelfCausal => (1, GEN),
    };
    // Prompts of SRC/2..=SRC real tokens; the decoder's own cache is full at its last step.
    let lengths: Vec<usize> = match kind {
        Attn::Encoder | Attn::Cross => (0..b).map(|_| g.between(SRC / 2, SRC)).collect(),
        Attn::SelfCausal => vec![GEN; b],
    };
    let sets = sets_for(b * (lq + 2 * lk) * D * 2);
    // q, k and v as the model hands them over: the encoder's from one q|k|v product,
    // cross-attention's k|v from one product, the decoder's cache apart.
    let width = match kind {
        Attn::Encoder => 3 * D,
        Attn::Cross => 2 * D,
        Attn::SelfCausal => D,
    };
    let stacked = half_sets(be, &[b, lk, width], sets, g)?;
    let qs = if kind == Attn::Encoder { Vec::new() } else { half_sets(be, &[b, lq, D], sets, g)? };
    let vs = if kind == Attn::SelfCausal { half_sets(be, &[b, lk, D], sets, g)? } else { Vec::new() };
    let key_lengths = be.upload_ids(&lengths.iter().map(|&l| l as u32).collect::<Vec<_>>(), &[b])?;
    let counter = be.upload_ids(&[GEN as u32 - 1], &[1])?;
    let table = weight_sets(be, &[BUCKETS, HEADS], 1, 2.0, g)?.remove(0);
    let real_keys: usize = lengths.iter().sum();
    // q read and the context written in half; only the real keys' K and V must be read.
    let bytes = 2 * b * lq * D * 2 + 2 * real_keys * D * 2;
    let flops = (4 * lq * real_keys * D) as f64;
    let run = move |i: usize| {
        let bias =
            |bidirectional| RelBias { table: &table, bidirectional, num_buckets: BUCKETS, max_distance: MAX_DISTANCE };
        let (kv_len, key_lengths, causal, q_offset, bias) = match kind {
            Attn::Encoder => (SRC, Some(&key_lengths), false, Position::At(0), Some(bias(true))),
            Attn::Cross => (SRC, Some(&key_lengths), false, Position::At(0), None),
            Attn::SelfCausal => (GEN, None, true, Position::Counter(&counter), Some(bias(false))),
        };
        let spec =
            AttnSpec { heads: HEADS, d_kv: DK, scale: 1.0, kv_len, key_lengths, causal, q_offset, bias, dropout: None };
        let x = match kind {
            Attn::Encoder => AttnInputs::Qkv(&stacked[i]),
            Attn::Cross => AttnInputs::QAndKv { q: &qs[i], kv: &stacked[i] },
            Attn::SelfCausal => AttnInputs::Apart { q: &qs[i], k: &stacked[i], v: &vs[i] },
        };
        be.attention(x, &spec).map(drop)
    };
    Ok(Bench::graph(bytes, flops, sets, Box::new(run)))
}

/// The encoder self-attention of SRC-token prompts with right padding and the bidirectional bias.
fn encoder_spec<'a>(table: &'a Weight, key_lengths: &'a <Cuda as Device>::Ids) -> AttnSpec<'a, Cuda> {
    AttnSpec {
        heads: HEADS,
        d_kv: DK,
        scale: 1.0,
        kv_len: SRC,
        key_lengths: Some(key_lengths),
        causal: false,
        q_offset: Position::At(0),
        bias: Some(RelBias { table, bidirectional: true, num_buckets: BUCKETS, max_distance: MAX_DISTANCE }),
        dropout: None,
    }
}

/// The encoder self-attention's backward over a training minibatch, with or without the bias
/// table's gradient (full-parameter SFT trains the table; PPO's adapters leave it frozen).
fn attention_backward<'b>(be: &'b Cuda, b: usize, table_grad: bool, g: &mut Gen) -> Result<Bench<'b>> {
    let lengths: Vec<usize> = (0..b).map(|_| g.between(SRC / 2, SRC)).collect();
    let sets = sets_for(b * SRC * D * (5 * 2 + 3 * 2));
    let qkvs = half_sets(be, &[b, SRC, 3 * D], sets, g)?;
    let gs = half_sets(be, &[b, SRC, D], sets, g)?;
    let key_lengths = be.upload_ids(&lengths.iter().map(|&l| l as u32).collect::<Vec<_>>(), &[b])?;
    let table = weight_sets(be, &[BUCKETS, HEADS], 1, 2.0, g)?.remove(0);
    let mut d_table = be.zeros(&[BUCKETS, HEADS])?;
    let real_keys: usize = lengths.iter().sum();
    // q, dout and the forward's output read in half, the real keys' K and V in half; the stacked
    // dq | dk | dv written in half.
    let bytes = 3 * b * SRC * D * 2 + 2 * real_keys * D * 2 + 3 * b * SRC * D * 2;
    // FlashAttention-2's five products (S, dP, dV, dQ, dK) over the real keys.
    let flops = (10 * SRC * real_keys * D) as f64;
    // What each set's training forward kept, made outside the timed calls.
    let spec = encoder_spec(&table, &key_lengths);
    let fwds = (0..sets).map(|i| be.attention_train(AttnInputs::Qkv(&qkvs[i]), &spec)).collect::<Result<Vec<_>>>()?;
    let run = move |i: usize| {
        let d_table = table_grad.then_some(&mut d_table);
        let spec = encoder_spec(&table, &key_lengths);
        be.attention_backward(AttnInputs::Qkv(&qkvs[i]), &fwds[i], &gs[i], &spec, d_table).map(drop)
    };
    Ok(Bench::graph(bytes, flops, sets, Box::new(run)))
}

/// Seconds for `reps` calls rotating over `sets`, recorded into and replayed from `graph` when one
/// is given (the pass that records also runs the recording, so it is never one of the timed ones).
fn pass(be: &Cuda, run: &mut Run<'_>, sets: usize, reps: usize, graph: Option<&mut Option<Graph>>) -> Result<f64> {
    be.sync()?;
    let t0 = Instant::now();
    let mut body = || -> Result<()> {
        for r in 0..reps {
            run(r % sets)?;
        }
        Ok(())
    };
    match graph {
        Some(g) => be.run_step(g, &mut body)?,
        None => body()?,
    }
    be.sync()?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Whole rotations of `sets`, about `TARGET_S` of work at `per_call` seconds a call.
fn reps_for(per_call: f64, sets: usize) -> usize {
    let reps = (TARGET_S / per_call.max(1e-9)).ceil().clamp(1.0, MAX_REPS as f64) as usize;
    reps.div_ceil(sets) * sets
}

struct Timing {
    median: f64,
    min: f64,
}

fn measure(be: &Cuda, bench: &mut Bench<'_>) -> Result<Timing> {
    let (sets, eager) = (bench.sets, bench.eager);
    // Eager warm-up: module loads, cuBLAS's choice of algorithm and the bucket tables attention
    // uploads on first use must not happen inside a recording.
    pass(be, &mut bench.run, sets, 2, None)?;
    // A first estimate, eager, which launch overheads inflate for small ops: the loop below grows
    // the repetitions until a replay lasts about TARGET_S.
    let k = sets.clamp(2, 8);
    let mut reps = reps_for(pass(be, &mut bench.run, sets, k, None)? / k as f64, sets);
    let mut graph: Option<Graph> = None;
    loop {
        if !eager {
            pass(be, &mut bench.run, sets, reps, Some(&mut graph))?;
        }
        let t = pass(be, &mut bench.run, sets, reps, (!eager).then_some(&mut graph))?;
        if t >= TARGET_S / 2.0 || reps >= MAX_REPS {
            break;
        }
        let grown = ((reps as f64 * TARGET_S / t).ceil() as usize).max(2 * reps).min(MAX_REPS);
        reps = grown.div_ceil(sets) * sets;
        graph = None;
    }
    let mut per_call = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        per_call.push(pass(be, &mut bench.run, sets, reps, (!eager).then_some(&mut graph))? / reps as f64);
    }
    per_call.sort_by(f64::total_cmp);
    Ok(Timing { median: per_call[SAMPLES / 2], min: per_call[0] })
}

/// Column widths of the table: the longest name and shape among the cases that run.
struct Widths {
    name: usize,
    shape: usize,
}

fn header(w: &Widths) -> String {
    format!(
        "{:<nw$} {:<sw$} {:>10} {:>9} {:>9} {:>6} {:>7} {:>7} bound",
        "case",
        "shape",
        "median µs",
        "min µs",
        "floor µs",
        "TB/s",
        "TFLOP/s",
        "% ceil",
        nw = w.name,
        sw = w.shape
    )
}

fn row(w: &Widths, case: &Case, bench: &Bench<'_>, t: &Timing) -> String {
    let (mem, math) = (bench.bytes / PEAK_BYTES, bench.flops / PEAK_FLOPS);
    let floor = mem.max(math);
    let tflops = if bench.flops > 0.0 { format!("{:.1}", bench.flops / t.median / 1e12) } else { "-".into() };
    format!(
        "{:<nw$} {:<sw$} {:>10.2} {:>9.2} {:>9.2} {:>6.2} {:>7} {:>6.1}% {}",
        case.name,
        describe(&case.op),
        t.median * 1e6,
        t.min * 1e6,
        floor * 1e6,
        bench.bytes / t.median / 1e12,
        tflops,
        100.0 * floor / t.median,
        if math > mem { "math" } else { "mem" },
        nw = w.name,
        sw = w.shape
    )
}

fn main() -> ExitCode {
    // Arguments that are not flags filter the cases by name; cargo adds `--bench`.
    let filters: Vec<String> =
        std::env::args().skip(1).filter(|a| !a.starts_with('-')).map(|a| a.to_lowercase()).collect();
    let all = cases();
    let matches = |c: &Case| filters.is_empty() || filters.iter().any(|f| c.name.to_lowercase().contains(f));
    if !all.iter().any(matches) {
        let names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
        println!("kernels bench: no case matches {filters:?}; the cases are: {}", names.join(", "));
        return ExitCode::SUCCESS;
    }
    let selected: Vec<&Case> = all.iter().filter(|c| c.ceiling || matches(c)).collect();
    let be = match Cuda::new(0) {
        Ok(be) => be,
        Err(e) => {
            println!("kernels bench skipped: no usable GPU ({e:#})");
            return ExitCode::SUCCESS;
        }
    };
    println!(
        "detox kernels on {}: each case recorded as a CUDA graph of many calls, median of {SAMPLES} replays of \
         ≥ {:.0} ms; inputs rotated over ≥ {:.0} MB; random data",
        be.name(),
        TARGET_S / 2.0 * 1e3,
        ROTATE_BYTES / 1e6
    );
    println!(
        "floor = max(bytes / {:.1} TB/s, FLOPs / {:.0} TFLOP/s) (BASELINE.md); % ceil = floor / median",
        PEAK_BYTES / 1e12,
        PEAK_FLOPS / 1e12
    );
    let widths = Widths {
        name: selected.iter().map(|c| c.name.chars().count()).max().unwrap_or(0),
        shape: selected.iter().map(|c| describe(&c.op).chars().count()).max().unwrap_or(0),
    };
    println!("{}", header(&widths));
    let started = Instant::now();
    let mut g = Gen(0x5eed);
    let mut failed = 0;
    let mut ceilings = Vec::new();
    for case in &selected {
        let result = prepare(&be, &case.op, &mut g).and_then(|mut bench| {
            let t = measure(&be, &mut bench)?;
            Ok((row(&widths, case, &bench, &t), bench.bytes / t.median, bench.flops / t.median))
        });
        match result {
            Ok((line, bytes_per_s, flops_per_s)) => {
                println!("{line}");
                if case.ceiling {
                    let name = case.name.trim_start_matches("ceiling ");
                    ceilings.push(if flops_per_s > 0.0 {
                        format!("{name} {:.0} TFLOP/s", flops_per_s / 1e12)
                    } else {
                        format!("{name} {:.2} TB/s", bytes_per_s / 1e12)
                    });
                }
            }
            Err(e) => {
                failed += 1;
                println!("{:<nw$} FAILED: {e:#}", case.name, nw = widths.name);
            }
        }
    }
    println!(
        "ceilings measured in this run: {} (the floors above use BASELINE.md's {:.1} TB/s and {:.0} TFLOP/s)",
        ceilings.join(", "),
        PEAK_BYTES / 1e12,
        PEAK_FLOPS / 1e12
    );
    println!("{} cases in {:.1} s, {failed} failed", selected.len(), started.elapsed().as_secs_f64());
    if failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

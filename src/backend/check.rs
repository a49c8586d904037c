//! The argument and shape rules of the operations, written once for every backend: each family
//! trait's public method runs its rule here before the backend's `*_impl`, so a backend only
//! checks what is its own (precisions, device limits). Every message names the op and the shapes.

use super::{
    AdafactorSlot, AdafactorStep, AdamSlot, AttnInputs, AttnSpec, BeamSpec, BeamState, Device, Dropout, LoraGrad,
    LoraRef, Position, ProcessSpec, Shaped,
};
use anyhow::{Result, bail, ensure};

fn rows_cols(s: &[usize]) -> (usize, usize) {
    let cols = *s.last().unwrap_or(&1);
    (s.iter().product::<usize>().checked_div(cols).unwrap_or(0), cols)
}

/// `x [m, k] · w [n, k]ᵀ` with LoRA branches over the output columns: returns (m, k, n).
pub fn linear<B: Device>(op: &str, x: &[usize], w: &[usize], lora: &[LoraRef<'_, B>]) -> Result<(usize, usize, usize)> {
    let (m, k) = rows_cols(x);
    let (n, wk) = rows_cols(w);
    ensure!(k == wk, "{op}: input {x:?} has {k} features, weight {w:?} expects {wk}");
    for l in lora {
        let (a, b) = (l.a.shape(), l.b.shape());
        let (r, out) = (a[0], b[0]);
        ensure!(
            a == [r, k] && b == [out, r] && l.col + out <= n,
            "{op}: LoRA shapes {a:?} / {b:?} at column {} do not fit {n} outputs of {k} features",
            l.col
        );
    }
    Ok((m, k, n))
}

pub fn linear_add<B: Device>(x: &[usize], w: &[usize], lora: &[LoraRef<'_, B>], acc: &[usize]) -> Result<()> {
    let (m, _, n) = linear("linear_add", x, w, lora)?;
    ensure!(rows_cols(acc) == (m, n), "linear_add: output {acc:?} does not fit {m}×{n}");
    Ok(())
}

pub fn linear_backward<B: Device>(
    x: &[usize],
    w: &[usize],
    lora: &[LoraRef<'_, B>],
    dy: &[usize],
    dx: Option<&[usize]>,
    dw: Option<&[usize]>,
    grads: &[LoraGrad<'_, B>],
) -> Result<()> {
    let (m, k, n) = linear("linear_backward", x, w, lora)?;
    ensure!(rows_cols(dy) == (m, n), "linear_backward: dy {dy:?} for x {x:?} and w {w:?}");
    if let Some(dx) = dx {
        ensure!(rows_cols(dx) == (m, k), "linear_backward: dx {dx:?} for input {x:?}");
    }
    if let Some(dw) = dw {
        ensure!(dw == [n, k], "linear_backward: dw {dw:?} for a weight of {w:?}");
    }
    ensure!(grads.len() == lora.len(), "linear_backward: {} gradients for {} branches", grads.len(), lora.len());
    for (l, g) in lora.iter().zip(grads) {
        ensure!(
            g.a.shape() == l.a.shape() && g.b.shape() == l.b.shape(),
            "linear_backward: gradients {:?} / {:?} for LoRA {:?} / {:?}",
            g.a.shape(),
            g.b.shape(),
            l.a.shape(),
            l.b.shape()
        );
    }
    Ok(())
}

/// `x [m, k] · w [n, k]ᵀ + bias [n]`: returns (m, k, n).
pub fn affine(x: &[usize], w: &[usize], bias: Option<&[usize]>) -> Result<(usize, usize, usize)> {
    let (m, k) = rows_cols(x);
    let (n, wk) = rows_cols(w);
    ensure!(k == wk, "affine: input {x:?} has {k} features, weight {w:?} expects {wk}");
    if let Some(b) = bias {
        ensure!(b.iter().product::<usize>() == n, "affine: bias {b:?} for {n} outputs");
    }
    Ok((m, k, n))
}

pub fn affine_backward(
    x: &[usize],
    w: &[usize],
    dy: &[usize],
    dx: Option<&[usize]>,
    dw: &[usize],
    db: Option<&[usize]>,
) -> Result<()> {
    let (m, k, n) = affine(x, w, db)?;
    ensure!(rows_cols(dy) == (m, n) && dw == w, "affine_backward: x {x:?}, w {w:?}, dy {dy:?}, dw {dw:?}");
    if let Some(dx) = dx {
        ensure!(rows_cols(dx) == (m, k), "affine_backward: dx {dx:?} for input {x:?}");
    }
    Ok(())
}

pub fn set_weight(w: &[usize], values: &[usize]) -> Result<()> {
    ensure!(w == values, "set_weight: {values:?} for a weight of {w:?}");
    Ok(())
}

/// A per-feature parameter (bias, norm weight) of `x`'s last dimension.
pub fn per_feature(op: &str, x: &[usize], p: &[usize]) -> Result<()> {
    let d = rows_cols(x).1;
    ensure!(p.iter().product::<usize>() == d, "{op}: parameter {p:?} for {d} features of {x:?}");
    Ok(())
}

pub fn same(op: &str, a: &[usize], b: &[usize]) -> Result<()> {
    ensure!(a == b, "{op}: shapes {a:?} and {b:?} differ");
    Ok(())
}

/// A dropout probability in [0, 1): 1 would scale the kept (no) elements by infinity.
pub fn dropout(op: &str, d: Option<Dropout>) -> Result<()> {
    if let Some(d) = d {
        ensure!((0.0..1.0).contains(&d.p), "{op}: dropout probability {} is outside [0, 1)", d.p);
    }
    Ok(())
}

pub fn gated_gelu(gate_up: &[usize]) -> Result<()> {
    let d2 = rows_cols(gate_up).1;
    ensure!(d2.is_multiple_of(2), "gated_gelu: last dimension of {gate_up:?} is not gate and up halves");
    Ok(())
}

pub fn gated_gelu_backward(gate_up: &[usize], dy: &[usize]) -> Result<()> {
    let (rows, d2) = rows_cols(gate_up);
    ensure!(d2.is_multiple_of(2) && rows_cols(dy) == (rows, d2 / 2), "gated_gelu_backward: dy {dy:?} for {gate_up:?}");
    Ok(())
}

pub fn rms_norm_backward(x: &[usize], w: &[usize], dy: &[usize], dx: &[usize]) -> Result<()> {
    per_feature("rms_norm_backward", x, w)?;
    ensure!(dy == x && dx == x, "rms_norm_backward: x {x:?}, dy {dy:?}, dx {dx:?}");
    Ok(())
}

pub fn rms_norm_weight_grad(x: &[usize], dy: &[usize], dw: &[usize]) -> Result<()> {
    per_feature("rms_norm_weight_grad", x, dw)?;
    ensure!(dy == x, "rms_norm_weight_grad: dy {dy:?} for x {x:?}");
    Ok(())
}

/// q `[B, Lq, H·dk]` against k and v `[B, cap, H·dk]` (and `dout` like q, for the backward forms);
/// with a host position, `kv_len` keys of the cache.
pub fn attention<B: Device>(
    op: &str,
    q: &[usize],
    k: &[usize],
    v: &[usize],
    dout: Option<&[usize]>,
    spec: &AttnSpec<'_, B>,
) -> Result<()> {
    let inner = spec.heads * spec.d_kv;
    ensure!(q.len() == 3 && q[2] == inner, "{op}: q {q:?} is not [B, Lq, {} heads × {}]", spec.heads, spec.d_kv);
    ensure!(k.len() == 3 && k[0] == q[0] && k[2] == inner && k == v, "{op}: k {k:?} / v {v:?} do not match q {q:?}");
    if let Some(dout) = dout {
        ensure!(dout == q, "{op}: dout {dout:?} for q {q:?}");
    }
    if let Position::At(_) = spec.q_offset {
        ensure!(spec.kv_len <= k[1], "{op}: kv_len {} exceeds the {} rows of k", spec.kv_len, k[1]);
    }
    if let Some(l) = spec.key_lengths {
        ensure!(l.numel() == q[0], "{op}: {} key lengths for batch {}", l.numel(), q[0]);
    }
    dropout(op, spec.dropout)?;
    ensure!(
        spec.dropout.is_none() || matches!(spec.q_offset, Position::At(_)),
        "{op}: dropout on the probabilities needs a host position (a training pass), not a counter"
    );
    Ok(())
}

/// The shapes of q, k and v as `x` stacks them, each `[B, L, inner]`.
pub fn attention_inputs<B: Device>(
    op: &str,
    x: AttnInputs<'_, B::Tensor>,
    spec: &AttnSpec<'_, B>,
) -> Result<[Vec<usize>; 3]> {
    let inner = spec.heads * spec.d_kv;
    let stacked = |t: &B::Tensor, parts: usize, what: &str| -> Result<Vec<usize>> {
        let s = t.shape();
        ensure!(
            s.len() == 3 && s[2] == parts * inner,
            "{op}: {what} {s:?} is not [B, L, {parts} × {} heads × {}]",
            spec.heads,
            spec.d_kv
        );
        Ok(vec![s[0], s[1], inner])
    };
    Ok(match x {
        AttnInputs::Qkv(qkv) => {
            let s = stacked(qkv, 3, "q|k|v")?;
            [s.clone(), s.clone(), s]
        }
        AttnInputs::QAndKv { q, kv } => {
            let s = stacked(kv, 2, "k|v")?;
            [q.shape().to_vec(), s.clone(), s]
        }
        AttnInputs::Apart { q, k, v } => [q.shape().to_vec(), k.shape().to_vec(), v.shape().to_vec()],
    })
}

pub fn attention_backward<B: Device>(
    x: AttnInputs<'_, B::Tensor>,
    [q, k, v]: &[Vec<usize>; 3],
    (out, lse): (&[usize], &[usize]),
    dout: &[usize],
    spec: &AttnSpec<'_, B>,
    d_table: Option<&[usize]>,
) -> Result<()> {
    attention("attention_backward", q, k, v, Some(dout), spec)?;
    ensure!(
        !matches!(x, AttnInputs::Apart { .. }),
        "attention_backward: q, k and v apart have no projection stacking to return their gradients in; \
         pass them as Qkv or QAndKv"
    );
    ensure!(out == q.as_slice(), "attention_backward: the forward's output {out:?} for q {q:?}");
    ensure!(
        lse == [q[0], spec.heads, q[1]],
        "attention_backward: the forward's lse {lse:?} for {} rows × {} heads × {} queries",
        q[0],
        spec.heads,
        q[1]
    );
    if let Some(d_table) = d_table {
        let Some(rb) = &spec.bias else { bail!("attention_backward: a bias table gradient for a call with no bias") };
        ensure!(
            d_table == [rb.num_buckets, spec.heads],
            "attention_backward: d_table {d_table:?} for {} buckets × {} heads",
            rb.num_buckets,
            spec.heads
        );
    }
    Ok(())
}

pub fn split_last(x: &[usize], widths: &[usize]) -> Result<()> {
    let d = rows_cols(x).1;
    ensure!(widths.iter().sum::<usize>() == d, "split_last: widths {widths:?} do not add up to {d} of {x:?}");
    Ok(())
}

pub fn concat_last(pieces: &[&[usize]]) -> Result<()> {
    let Some(first) = pieces.first() else { bail!("concat_last: no pieces") };
    let rows = rows_cols(first).0;
    ensure!(pieces.iter().all(|p| rows_cols(p).0 == rows), "concat_last: pieces {pieces:?} differ in rows");
    Ok(())
}

pub fn copy_into(dst: &[usize], offset: usize, src: &[usize]) -> Result<()> {
    let n: usize = src.iter().product();
    ensure!(offset + n <= dst.iter().product(), "copy_into: {n} values at {offset} overflow {dst:?}");
    Ok(())
}

/// Rows of logits `[n, V]` and one id (and optionally one value) per row.
pub fn per_row(op: &str, logits: &[usize], ids: &[usize], values: Option<&[usize]>) -> Result<()> {
    let n = rows_cols(logits).0;
    ensure!(ids.iter().product::<usize>() == n, "{op}: ids {ids:?} for {n} rows of {logits:?}");
    if let Some(v) = values {
        ensure!(v.iter().product::<usize>() == n, "{op}: values {v:?} for {n} rows of {logits:?}");
    }
    Ok(())
}

pub fn select_tokens(logits: &[usize], processed: Option<&[usize]>, eos: u32, per_row: [&[usize]; 4]) -> Result<()> {
    let (b, v) = rows_cols(logits);
    if let Some(p) = processed {
        ensure!(p == logits, "select_tokens: processed scores {p:?} for logits {logits:?}");
    }
    for s in per_row {
        ensure!(s.iter().product::<usize>() == b, "select_tokens: {s:?} for {b} rows of logits {logits:?}");
    }
    ensure!((eos as usize) < v, "select_tokens: EOS id {eos} is outside the vocabulary of {v}");
    Ok(())
}

pub fn process_logits(logits: &[usize], history: &[usize], spec: &ProcessSpec) -> Result<()> {
    let (n, v) = rows_cols(logits);
    ensure!(
        history.len() == 2 && history[0] == n,
        "process_logits: history {history:?} is not [{n} rows, steps] for logits {logits:?}"
    );
    ensure!(
        (spec.eos as usize) < v && (spec.decoder_start as usize) < v,
        "process_logits: EOS {} or start token {} is outside the vocabulary of {v}",
        spec.eos,
        spec.decoder_start
    );
    ensure!(
        spec.repetition_penalty > 0.0 && spec.repetition_penalty.is_finite(),
        "process_logits: repetition_penalty must be a positive number, not {}",
        spec.repetition_penalty
    );
    Ok(())
}

pub fn beam_step<B: Device>(logits: &[usize], processed: &[usize], spec: &BeamSpec, st: &BeamState<B>) -> Result<()> {
    let (n, v) = rows_cols(logits);
    let (k, t) = (spec.num_beams, spec.max_new_tokens);
    ensure!(processed == logits, "beam_step: processed scores {processed:?} for logits {logits:?}");
    let most = super::cuda::launch::MAX_BEAMS as usize;
    ensure!((2..=most).contains(&k), "beam_step: num_beams {k} is outside 2..={most}");
    ensure!(n % k == 0 && v >= 2 * k, "beam_step: {n} rows of {v} logits for {k} beams");
    ensure!((spec.eos as usize) < v && (spec.pad as usize) < v, "beam_step: EOS or pad outside the vocabulary");
    ensure!(spec.length_penalty.is_finite(), "beam_step: length_penalty must be finite");
    let rows_t = [n, t];
    let per_row: [(&str, &[usize], &[usize]); 10] = [
        ("seqs", st.seqs.shape(), &rows_t),
        ("logprobs", st.logprobs.shape(), &rows_t),
        ("scores", st.scores.shape(), &[n]),
        ("fin_seqs", st.fin_seqs.shape(), &rows_t),
        ("fin_logprobs", st.fin_logprobs.shape(), &rows_t),
        ("fin_scores", st.fin_scores.shape(), &[n]),
        ("fin_lens", st.fin_lens.shape(), &[n]),
        ("done", st.done.shape(), &[n / k]),
        ("src", st.src.shape(), &[n]),
        ("next", st.next.shape(), &[n, 1]),
    ];
    for (name, got, want) in per_row {
        ensure!(got == want, "beam_step: state.{name} is {got:?}, not {want:?}");
    }
    Ok(())
}

pub fn gather_beams<B: Device>(x: &[usize], src: &[usize], upto: Position<'_, B>) -> Result<()> {
    ensure!(x.len() == 3 && src == [x[0]], "gather_beams: sources {src:?} for a cache {x:?}");
    if let Position::At(u) = upto {
        ensure!(u <= x[1], "gather_beams: {u} rows of a cache of {}", x[1]);
    }
    Ok(())
}

/// Every slot's parameter, gradient and moments share one shape.
pub fn adam<B: Device>(slots: &[AdamSlot<'_, B>]) -> Result<()> {
    for (i, s) in slots.iter().enumerate() {
        let g = s.g.shape();
        ensure!(
            s.p.shape() == g && s.m.shape() == g && s.v.shape() == g,
            "adam: tensor {i}'s parameter {:?}, gradient {g:?} and moments {:?} / {:?} do not agree",
            s.p.shape(),
            s.m.shape(),
            s.v.shape()
        );
    }
    Ok(())
}

/// Every slot's parameter and gradient share one shape of rank 1 or 2, its parts cover its rows,
/// and its statistics have the shapes `AdafactorSlot` states; the step's constants are usable.
pub fn adafactor<B: Device>(slots: &[AdafactorSlot<'_, B>], h: &AdafactorStep) -> Result<()> {
    ensure!(h.step >= 1, "adafactor: steps count from 1");
    ensure!(h.options.beta1.is_none_or(|b| (0.0..1.0).contains(&b)), "adafactor: beta1 must be in [0, 1)");
    ensure!(
        h.options.clip_threshold > 0.0 && h.options.eps1 >= 0.0 && h.options.eps2 >= 0.0,
        "adafactor: bad clip_threshold or eps"
    );
    for (i, s) in slots.iter().enumerate() {
        let p = s.p.shape();
        ensure!(s.g.shape() == p, "adafactor: tensor {i}'s parameter {p:?} and gradient {:?} differ", s.g.shape());
        let rows: usize = s.parts.iter().sum();
        ensure!(!s.parts.is_empty() && s.parts.iter().all(|&r| r > 0), "adafactor: tensor {i} has an empty part");
        let (want_row, want_col) = match *p {
            [n] => {
                ensure!(s.parts == [n], "adafactor: 1-D tensor {i} of {n} is one part, not {:?}", s.parts);
                ([n], vec![0])
            }
            [r, c] => {
                ensure!(rows == r, "adafactor: tensor {i}'s parts {:?} do not cover its {r} rows", s.parts);
                ([r], vec![s.parts.len(), c])
            }
            _ => bail!("adafactor: tensor {i} of shape {p:?}: only 1-D and 2-D tensors"),
        };
        ensure!(
            s.row.shape() == want_row && s.col.shape() == want_col.as_slice(),
            "adafactor: tensor {i}'s statistics {:?} / {:?}, expected {want_row:?} / {want_col:?}",
            s.row.shape(),
            s.col.shape()
        );
        ensure!(
            s.m.as_ref().map(|m| m.shape() == p).unwrap_or(true),
            "adafactor: tensor {i}'s first moment does not have its shape"
        );
        ensure!(
            h.options.beta1.is_some() == s.m.is_some(),
            "adafactor: tensor {i}: a first moment exactly when beta1 is set"
        );
        ensure!(
            s.copy.as_ref().map(|c| c.numel() == s.p.numel()).unwrap_or(true),
            "adafactor: tensor {i}'s copy does not have its size"
        );
    }
    Ok(())
}

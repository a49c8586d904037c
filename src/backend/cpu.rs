//! The f32 CPU reference backend: plain loops a reader can check against the formulas, with
//! matrixmultiply for the products and rayon where rows are independent. Every other backend is
//! tested against this one.

use super::relpos::relative_bucket;
use super::rng::{dropout_keep, dropout_key, uniform};
use super::{Activation, AdamSlot, AdamStep, AttnSpec, Backend, LoraGrad, LoraRef, Position, Prec, SampleSpec, Shaped};
use crate::checkpoint::HostTensor;
use anyhow::{Result, bail, ensure};
use rayon::prelude::*;

/// An owned row-major tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor<T> {
    pub data: Vec<T>,
    pub shape: Vec<usize>,
}

impl<T> Shaped for CpuTensor<T> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

impl<T: Clone> CpuTensor<T> {
    pub fn new(data: Vec<T>, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        ensure!(data.len() == n, "tensor of shape {shape:?} needs {n} values, got {}", data.len());
        Ok(Self { data, shape: shape.to_vec() })
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// `c[m, n] = a[m, k] · b[n, k]ᵀ` (+ c when `accumulate`), all row-major.
pub fn matmul_nt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    debug_assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: the slices cover the strided extents asserted above and `c` does not alias a or b.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `c[m, n] = a[m, k] · b[k, n]` (+ c when `accumulate`), all row-major.
pub fn matmul_nn(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: as in `matmul_nt`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `c[m, n] = a[k, m]ᵀ · b[k, n]` (+ c when `accumulate`): the weight-gradient product.
pub fn matmul_tn(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: as in `matmul_nt`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            1,
            m as isize,
            b.as_ptr(),
            n as isize,
            1,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `gelu_new`: the tanh approximation T5 v1.1 uses.
pub fn gelu_new(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
}

/// d gelu_new / dx.
pub fn gelu_new_grad(x: f32) -> f32 {
    const C: f32 = 0.797_884_6;
    let t = (C * (x + 0.044_715 * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044_715 * x * x)
}

/// BERT's exact GELU.
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Applies inverted dropout to a copy of `x` (row-major, `x.len()` elements).
pub fn apply_dropout(x: &[f32], d: &super::Dropout) -> Vec<f32> {
    let scale = 1.0 / (1.0 - d.p);
    let key = dropout_key(d.seed, d.stream);
    x.iter().enumerate().map(|(i, &v)| if dropout_keep(d.p, key, i as u64) { v * scale } else { 0.0 }).collect()
}

fn out_shape(x: &[usize], last: usize) -> Vec<usize> {
    let mut s = x.to_vec();
    if let Some(l) = s.last_mut() {
        *l = last;
    }
    s
}

fn at(p: Position<'_, Cpu>) -> usize {
    match p {
        Position::At(n) => n,
        Position::Counter(c) => c.data[0] as usize,
    }
}

impl Backend for Cpu {
    type Tensor = CpuTensor<f32>;
    type Weight = CpuTensor<f32>;
    type Ids = CpuTensor<u32>;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn ordinal(&self) -> Option<usize> {
        None
    }

    fn default_loss_scale(&self) -> f32 {
        1.0
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor> {
        CpuTensor::new(data.to_vec(), shape)
    }

    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn peak_memory(&self) -> Option<usize> {
        None
    }

    fn reset_peak_memory(&self) {}

    fn reserve(&self, _bytes: usize, _what: &str) -> Result<()> {
        Ok(())
    }

    fn zeros_as(&self, shape: &[usize], _prec: Prec) -> Result<Self::Tensor> {
        CpuTensor::new(vec![0.0; shape.iter().product()], shape)
    }

    fn upload_weight(&self, w: &HostTensor<'_>) -> Result<Self::Weight> {
        CpuTensor::new(w.to_f32(), w.shape)
    }

    fn upload_ids(&self, ids: &[u32], shape: &[usize]) -> Result<Self::Ids> {
        CpuTensor::new(ids.to_vec(), shape)
    }

    fn reshape(&self, t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        CpuTensor::new(t.data, shape)
    }

    fn download_ids(&self, ids: &Self::Ids) -> Result<Vec<u32>> {
        Ok(ids.data.clone())
    }

    fn embedding(&self, table: &Self::Weight, ids: &Self::Ids) -> Result<Self::Tensor> {
        let (rows, d) = table.rows_cols();
        let mut out = Vec::with_capacity(ids.data.len() * d);
        for &id in &ids.data {
            let id = id as usize;
            ensure!(id < rows, "token id {id} is outside the embedding table of {rows} rows");
            out.extend_from_slice(&table.data[id * d..(id + 1) * d]);
        }
        let mut shape = ids.shape.clone();
        shape.push(d);
        CpuTensor::new(out, &shape)
    }

    fn linear_to(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: &[LoraRef<'_, Self>],
        _out: Prec,
    ) -> Result<Self::Tensor> {
        let (m, _) = x.rows_cols();
        let (n, _) = w.rows_cols();
        let mut y = CpuTensor::new(vec![0.0; m * n], &out_shape(&x.shape, n))?;
        self.linear_add(x, w, lora, &mut y)?;
        Ok(y)
    }

    fn linear_add(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: &[LoraRef<'_, Self>],
        acc: &mut Self::Tensor,
    ) -> Result<()> {
        let (m, k) = x.rows_cols();
        let (n, wk) = w.rows_cols();
        ensure!(k == wk, "linear: input has {k} features, weight {:?} expects {wk}", w.shape);
        ensure!(acc.rows_cols() == (m, n), "linear: output {:?} does not fit {m}×{n}", acc.shape);
        matmul_nt(&x.data, &w.data, &mut acc.data, m, k, n, true);
        for l in lora {
            let r = l.a.shape[0];
            let out = l.b.shape[0];
            ensure!(
                l.a.shape == [r, k] && l.b.shape == [out, r] && l.col + out <= n,
                "LoRA shapes {:?} / {:?} at column {} do not fit {n} outputs",
                l.a.shape,
                l.b.shape,
                l.col
            );
            let xd;
            let xin = match &l.dropout {
                Some(d) if d.p > 0.0 => {
                    xd = apply_dropout(&x.data, d);
                    &xd
                }
                _ => &x.data,
            };
            let mut h = vec![0.0; m * r];
            matmul_nt(xin, &l.a.data, &mut h, m, k, r, false);
            h.iter_mut().for_each(|v| *v *= l.scale);
            let mut delta = vec![0.0; m * out];
            matmul_nt(&h, &l.b.data, &mut delta, m, r, out, false);
            for (row, d) in acc.data.chunks_mut(n).zip(delta.chunks(out)) {
                row[l.col..l.col + out].iter_mut().zip(d).for_each(|(y, d)| *y += d);
            }
        }
        Ok(())
    }

    fn merge_lora(&self, w: &Self::Weight, lora: &[LoraRef<'_, Self>]) -> Result<Self::Weight> {
        let (n, k) = w.rows_cols();
        let mut merged = w.clone();
        for l in lora {
            let (r, out) = (l.a.shape[0], l.b.shape[0]);
            ensure!(l.a.shape == [r, k] && l.col + out <= n, "merge_lora: shapes do not fit {:?}", w.shape);
            let mut delta = vec![0.0; out * k];
            matmul_nn(&l.b.data, &l.a.data, &mut delta, out, r, k, false);
            merged.data[l.col * k..(l.col + out) * k].iter_mut().zip(&delta).for_each(|(w, d)| *w += l.scale * d);
        }
        Ok(merged)
    }

    fn matmul_copy(&self, _t: &Self::Tensor) -> Result<Option<Self::Tensor>> {
        Ok(None)
    }

    fn split_last(&self, x: &Self::Tensor, widths: &[usize]) -> Result<Vec<Self::Tensor>> {
        let (rows, d) = x.rows_cols();
        ensure!(widths.iter().sum::<usize>() == d, "split_last: widths {widths:?} do not add up to {d}");
        let mut col = 0;
        widths
            .iter()
            .map(|&w| {
                let data: Vec<f32> =
                    (0..rows).flat_map(|r| x.data[r * d + col..r * d + col + w].iter().copied()).collect();
                col += w;
                CpuTensor::new(data, &out_shape(&x.shape, w))
            })
            .collect()
    }

    fn affine(&self, x: &Self::Tensor, w: &Self::Tensor, bias: Option<&Self::Tensor>) -> Result<Self::Tensor> {
        let (m, k) = x.rows_cols();
        let (n, wk) = w.rows_cols();
        ensure!(k == wk, "affine: input has {k} features, weight {:?} expects {wk}", w.shape);
        let mut y = vec![0.0; m * n];
        matmul_nt(&x.data, &w.data, &mut y, m, k, n, false);
        if let Some(b) = bias {
            ensure!(b.data.len() == n, "affine: bias has {} values for {n} outputs", b.data.len());
            for row in y.chunks_mut(n) {
                row.iter_mut().zip(&b.data).for_each(|(v, b)| *v += b);
            }
        }
        CpuTensor::new(y, &out_shape(&x.shape, n))
    }

    fn bias_add(&self, x: &mut Self::Tensor, bias: &Self::Weight) -> Result<()> {
        let (_, d) = x.rows_cols();
        ensure!(bias.data.len() == d, "bias_add: bias has {} values for {d} features", bias.data.len());
        x.data.chunks_mut(d.max(1)).for_each(|row| row.iter_mut().zip(&bias.data).for_each(|(v, b)| *v += b));
        Ok(())
    }

    fn layer_norm(&self, x: &Self::Tensor, w: &Self::Weight, b: &Self::Weight, eps: f32) -> Result<Self::Tensor> {
        let (_, d) = x.rows_cols();
        ensure!(w.data.len() == d && b.data.len() == d, "layer_norm: parameters do not have {d} values");
        let mut y = x.data.clone();
        y.par_chunks_mut(d.max(1)).for_each(|row| {
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, g), bb) in row.iter_mut().zip(&w.data).zip(&b.data) {
                *v = (*v - mean) * inv * g + bb;
            }
        });
        CpuTensor::new(y, &x.shape)
    }

    fn activation(&self, x: &Self::Tensor, act: Activation) -> Result<Self::Tensor> {
        let f = match act {
            Activation::GeluErf => gelu_erf,
            Activation::GeluNew => gelu_new,
            Activation::Tanh => f32::tanh,
        };
        CpuTensor::new(x.data.iter().map(|&v| f(v)).collect(), &x.shape)
    }

    fn gather_rows(&self, x: &Self::Tensor, rows: &Self::Ids) -> Result<Self::Tensor> {
        let (n, d) = x.rows_cols();
        let mut out = Vec::with_capacity(rows.data.len() * d);
        for &r in &rows.data {
            ensure!((r as usize) < n, "gather_rows: row {r} of {n}");
            out.extend_from_slice(&x.data[r as usize * d..(r as usize + 1) * d]);
        }
        CpuTensor::new(out, &[rows.data.len(), d])
    }

    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Result<Self::Tensor> {
        let (_, d) = x.rows_cols();
        ensure!(w.data.len() == d, "rms_norm: weight has {} values for {d} features", w.data.len());
        let mut y = x.data.clone();
        y.par_chunks_mut(d.max(1)).for_each(|row| {
            let var = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + eps).sqrt();
            row.iter_mut().zip(&w.data).for_each(|(v, g)| *v = *v * inv * g);
        });
        CpuTensor::new(y, &x.shape)
    }

    fn scale_assign(&self, x: &mut Self::Tensor, s: f32) -> Result<()> {
        x.data.iter_mut().for_each(|v| *v *= s);
        Ok(())
    }

    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()> {
        ensure!(x.shape == y.shape, "add: shapes {:?} and {:?} differ", x.shape, y.shape);
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn gated_gelu(&self, gate_up: &Self::Tensor) -> Result<Self::Tensor> {
        let (_, d2) = gate_up.rows_cols();
        ensure!(d2 % 2 == 0, "gated_gelu: last dimension {d2} is not gate and up halves");
        let f = d2 / 2;
        let y = gate_up.data.chunks(d2.max(1)).flat_map(|r| (0..f).map(move |i| gelu_new(r[i]) * r[f + i])).collect();
        CpuTensor::new(y, &out_shape(&gate_up.shape, f))
    }

    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        spec: &AttnSpec<'_, Self>,
    ) -> Result<Self::Tensor> {
        let (h, dk) = (spec.heads, spec.d_kv);
        let inner = h * dk;
        ensure!(q.shape.len() == 3 && q.shape[2] == inner, "attention: q shape {:?}", q.shape);
        let (b, lq) = (q.shape[0], q.shape[1]);
        ensure!(
            k.shape.len() == 3 && k.shape[0] == b && k.shape[2] == inner && k.shape == v.shape,
            "attention: k {:?} / v {:?} do not match q {:?}",
            k.shape,
            v.shape,
            q.shape
        );
        let cap = k.shape[1];
        let q_offset = at(spec.q_offset);
        let lk = match spec.q_offset {
            Position::At(_) => spec.kv_len,
            Position::Counter(_) => q_offset + lq,
        };
        ensure!(lk <= cap, "attention: kv_len {lk} exceeds the {cap} rows of k");
        let key_len: Vec<usize> = match spec.key_lengths {
            Some(l) => l.data.iter().map(|&n| (n as usize).min(lk)).collect(),
            None => vec![lk; b],
        };
        ensure!(key_len.len() == b, "attention: {} key lengths for batch {b}", key_len.len());
        // bias[h][i][j] for the query positions of this call.
        let bias: Option<Vec<f32>> = spec.bias.as_ref().map(|rb| {
            let mut out = vec![0.0; h * lq * lk];
            for i in 0..lq {
                for j in 0..lk {
                    let rel = j as i64 - (q_offset + i) as i64;
                    let bucket = relative_bucket(rel, rb.bidirectional, rb.num_buckets, rb.max_distance);
                    for hh in 0..h {
                        out[(hh * lq + i) * lk + j] = rb.table.data[bucket * h + hh];
                    }
                }
            }
            out
        });
        let mut out = vec![0.0f32; b * lq * inner];
        out.par_chunks_mut(lq * inner).enumerate().for_each(|(bi, ob)| {
            let mut scores = vec![0.0f32; lk];
            for hh in 0..h {
                for i in 0..lq {
                    let qi = &q.data[(bi * lq + i) * inner + hh * dk..][..dk];
                    let visible = if spec.causal { (q_offset + i + 1).min(lk) } else { lk };
                    let mut max = f32::NEG_INFINITY;
                    for (j, s) in scores.iter_mut().enumerate() {
                        if j >= visible || j >= key_len[bi] {
                            *s = f32::NEG_INFINITY;
                            continue;
                        }
                        let kj = &k.data[(bi * cap + j) * inner + hh * dk..][..dk];
                        let mut dot: f32 = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * spec.scale;
                        if let Some(bias) = &bias {
                            dot += bias[(hh * lq + i) * lk + j];
                        }
                        *s = dot;
                        max = max.max(dot);
                    }
                    let o = &mut ob[i * inner + hh * dk..][..dk];
                    o.fill(0.0);
                    if max == f32::NEG_INFINITY {
                        continue;
                    }
                    let mut sum = 0.0;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    for (j, s) in scores.iter().enumerate() {
                        if *s == 0.0 {
                            continue;
                        }
                        let p = s / sum;
                        let vj = &v.data[(bi * cap + j) * inner + hh * dk..][..dk];
                        o.iter_mut().zip(vj).for_each(|(a, b)| *a += p * b);
                    }
                }
            }
        });
        CpuTensor::new(out, &q.shape)
    }

    fn write_rows(&self, dst: &mut Self::Tensor, src: &Self::Tensor, pos: Position<'_, Self>) -> Result<()> {
        write_rows_of(&mut dst.data, &dst.shape, &src.data, &src.shape, at(pos))
    }

    fn write_ids(&self, dst: &mut Self::Ids, src: &Self::Ids, pos: Position<'_, Self>) -> Result<()> {
        let dshape = [dst.shape[0], dst.shape.get(1).copied().unwrap_or(1), 1];
        let sshape = [src.shape[0], src.shape.get(1).copied().unwrap_or(1), 1];
        write_rows_of(&mut dst.data, &dshape, &src.data, &sshape, at(pos))
    }

    fn advance(&self, counter: &mut Self::Ids, n: u32) -> Result<()> {
        counter.data[0] += n;
        Ok(())
    }

    fn copy_into(&self, dst: &mut Self::Tensor, offset: usize, src: &Self::Tensor) -> Result<()> {
        let n = src.data.len();
        ensure!(offset + n <= dst.data.len(), "copy_into: {n} values at {offset} overflow {:?}", dst.shape);
        dst.data[offset..offset + n].copy_from_slice(&src.data);
        Ok(())
    }

    fn log_softmax(&self, logits: &Self::Tensor) -> Result<Self::Tensor> {
        let (_, v) = logits.rows_cols();
        let mut y = logits.data.clone();
        y.par_chunks_mut(v.max(1)).for_each(log_softmax_row);
        CpuTensor::new(y, &logits.shape)
    }

    fn select_tokens(
        &self,
        logits: &Self::Tensor,
        spec: &SampleSpec,
        step: Position<'_, Self>,
        streams: &Self::Ids,
        finished: &mut Self::Ids,
        tokens: &mut Self::Ids,
        logprobs: &mut Self::Tensor,
    ) -> Result<()> {
        let (b, v) = logits.rows_cols();
        ensure!(finished.data.len() == b, "select_tokens: {} flags for {b} rows", finished.data.len());
        ensure!(streams.data.len() == b, "select_tokens: {} streams for {b} rows", streams.data.len());
        ensure!(tokens.data.len() == b && logprobs.data.len() == b, "select_tokens: outputs do not have {b} rows");
        if spec.eos as usize >= v {
            bail!("EOS id {} is outside the vocabulary of {v}", spec.eos);
        }
        let step = at(step);
        for row in 0..b {
            if finished.data[row] != 0 {
                tokens.data[row] = spec.pad;
                logprobs.data[row] = 0.0;
                continue;
            }
            let raw = &logits.data[row * v..(row + 1) * v];
            let tok = choose_token(raw, spec, streams.data[row] as u64, step as u64);
            let mut lp = raw.to_vec();
            log_softmax_row(&mut lp);
            tokens.data[row] = tok as u32;
            logprobs.data[row] = lp[tok];
            if tok as u32 == spec.eos {
                finished.data[row] = 1;
            }
        }
        Ok(())
    }

    fn dropout(&self, x: &Self::Tensor, d: &super::Dropout) -> Result<Self::Tensor> {
        CpuTensor::new(apply_dropout(&x.data, d), &x.shape)
    }

    fn linear_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: &[LoraRef<'_, Self>],
        dy: &Self::Tensor,
        dx: Option<&mut Self::Tensor>,
        grads: &mut [LoraGrad<'_, Self>],
    ) -> Result<()> {
        let (m, k) = x.rows_cols();
        let (n, wk) = w.rows_cols();
        ensure!(
            k == wk && dy.rows_cols() == (m, n),
            "linear_backward: x {:?}, w {:?}, dy {:?}",
            x.shape,
            w.shape,
            dy.shape
        );
        ensure!(grads.len() == lora.len(), "linear_backward: {} gradients for {} branches", grads.len(), lora.len());
        let mut dx_acc = vec![0.0f32; if dx.is_some() { m * k } else { 0 }];
        if dx.is_some() {
            matmul_nn(&dy.data, &w.data, &mut dx_acc, m, n, k, false);
        }
        for (l, g) in lora.iter().zip(grads.iter_mut()) {
            let (r, out) = (l.a.shape[0], l.b.shape[0]);
            let xd = match &l.dropout {
                Some(d) if d.p > 0.0 => apply_dropout(&x.data, d),
                _ => x.data.clone(),
            };
            let mut h = vec![0.0; m * r];
            matmul_nt(&xd, &l.a.data, &mut h, m, k, r, false);
            h.iter_mut().for_each(|v| *v *= l.scale);
            let dyp: Vec<f32> = dy.data.chunks(n).flat_map(|row| row[l.col..l.col + out].iter().copied()).collect();
            matmul_tn(&dyp, &h, &mut g.b.data, out, m, r, true);
            let mut dh = vec![0.0; m * r];
            matmul_nn(&dyp, &l.b.data, &mut dh, m, out, r, false);
            dh.iter_mut().for_each(|v| *v *= l.scale);
            matmul_tn(&dh, &xd, &mut g.a.data, r, m, k, true);
            if dx.is_some() {
                let mut dxl = vec![0.0; m * k];
                matmul_nn(&dh, &l.a.data, &mut dxl, m, r, k, false);
                if let Some(d) = l.dropout.filter(|d| d.p > 0.0) {
                    dxl = apply_dropout(&dxl, &d);
                }
                dx_acc.iter_mut().zip(&dxl).for_each(|(a, b)| *a += b);
            }
        }
        if let Some(dx) = dx {
            ensure!(dx.rows_cols() == (m, k), "linear_backward: dx {:?} for input {:?}", dx.shape, x.shape);
            dx.data.iter_mut().zip(&dx_acc).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn affine_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
        dx: Option<&mut Self::Tensor>,
        dw: &mut Self::Tensor,
        db: Option<&mut Self::Tensor>,
    ) -> Result<()> {
        let (m, k) = x.rows_cols();
        let (n, _) = w.rows_cols();
        ensure!(dy.rows_cols() == (m, n) && dw.shape == w.shape, "affine_backward: shapes do not agree");
        if let Some(dx) = dx {
            matmul_nn(&dy.data, &w.data, &mut dx.data, m, n, k, true);
        }
        matmul_tn(&dy.data, &x.data, &mut dw.data, n, m, k, true);
        if let Some(db) = db {
            for row in dy.data.chunks(n) {
                db.data.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
        Ok(())
    }

    fn rms_norm_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
        dy: &Self::Tensor,
        dx: &mut Self::Tensor,
    ) -> Result<()> {
        let (_, d) = x.rows_cols();
        ensure!(dy.shape == x.shape && dx.shape == x.shape, "rms_norm_backward: shapes do not agree");
        for ((xr, gr), dr) in x.data.chunks(d).zip(dy.data.chunks(d)).zip(dx.data.chunks_mut(d)) {
            let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
            let dot: f32 = xr.iter().zip(gr).zip(&w.data).map(|((x, g), w)| x * g * w).sum();
            let c = r * r * r * dot / d as f32;
            for (((o, x), g), w) in dr.iter_mut().zip(xr).zip(gr).zip(&w.data) {
                *o += r * g * w - c * x;
            }
        }
        Ok(())
    }

    fn gated_gelu_backward(&self, gate_up: &Self::Tensor, dy: &Self::Tensor) -> Result<Self::Tensor> {
        let (rows, d2) = gate_up.rows_cols();
        let f = d2 / 2;
        ensure!(dy.rows_cols() == (rows, f), "gated_gelu_backward: dy {:?} for {:?}", dy.shape, gate_up.shape);
        let mut out = vec![0.0; rows * d2];
        for ((o, gu), g) in out.chunks_mut(d2).zip(gate_up.data.chunks(d2)).zip(dy.data.chunks(f)) {
            for i in 0..f {
                o[i] = g[i] * gu[f + i] * gelu_new_grad(gu[i]);
                o[f + i] = g[i] * gelu_new(gu[i]);
            }
        }
        CpuTensor::new(out, &gate_up.shape)
    }

    fn attention_backward(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        dout: &Self::Tensor,
        spec: &AttnSpec<'_, Self>,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        let (h, dk) = (spec.heads, spec.d_kv);
        let (inner, lq, cap) = (h * dk, q.shape[1], k.shape[1]);
        let mut dq = vec![0.0f32; q.data.len()];
        let mut dkk = vec![0.0f32; k.data.len()];
        let mut dv = vec![0.0f32; v.data.len()];
        attention_rows(q, k, v, dout, spec, |r| {
            let qi = &q.data[(r.b * lq + r.i) * inner + r.head * dk..][..dk];
            for j in 0..r.p.len() {
                let ds = r.ds(j) * spec.scale;
                let base = (r.b * cap + j) * inner + r.head * dk;
                for t in 0..dk {
                    dv[base + t] += r.p[j] * r.dout[t];
                    dq[(r.b * lq + r.i) * inner + r.head * dk + t] += ds * k.data[base + t];
                    dkk[base + t] += ds * qi[t];
                }
            }
        })?;
        Ok((CpuTensor::new(dq, &q.shape)?, CpuTensor::new(dkk, &k.shape)?, CpuTensor::new(dv, &v.shape)?))
    }

    fn concat_last(&self, pieces: &[&Self::Tensor]) -> Result<Self::Tensor> {
        ensure!(!pieces.is_empty(), "concat_last: no pieces");
        let rows = pieces[0].rows_cols().0;
        ensure!(pieces.iter().all(|p| p.rows_cols().0 == rows), "concat_last: pieces differ in rows");
        let width: usize = pieces.iter().map(|p| p.rows_cols().1).sum();
        let mut out = Vec::with_capacity(rows * width);
        for r in 0..rows {
            for p in pieces {
                let w = p.rows_cols().1;
                out.extend_from_slice(&p.data[r * w..(r + 1) * w]);
            }
        }
        CpuTensor::new(out, &out_shape(&pieces[0].shape, width))
    }

    fn token_logprobs(&self, logits: &Self::Tensor, tokens: &Self::Ids) -> Result<(Self::Tensor, Self::Tensor)> {
        let (n, v) = logits.rows_cols();
        ensure!(tokens.data.len() == n, "token_logprobs: {} tokens for {n} rows", tokens.data.len());
        let mut lp = Vec::with_capacity(n);
        let mut ent = Vec::with_capacity(n);
        for (row, &t) in logits.data.chunks(v).zip(&tokens.data) {
            ensure!((t as usize) < v, "token {t} is outside the vocabulary of {v}");
            let mut l = row.to_vec();
            log_softmax_row(&mut l);
            lp.push(l[t as usize]);
            ent.push(-l.iter().map(|x| x.exp() * x).sum::<f32>());
        }
        Ok((CpuTensor::new(lp, &[n])?, CpuTensor::new(ent, &[n])?))
    }

    fn token_logprobs_backward(
        &self,
        logits: &Self::Tensor,
        tokens: &Self::Ids,
        dlogp: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let (n, v) = logits.rows_cols();
        ensure!(tokens.data.len() == n && dlogp.data.len() == n, "token_logprobs_backward: shapes do not agree");
        let mut out = logits.data.clone();
        for ((row, &t), &g) in out.chunks_mut(v).zip(&tokens.data).zip(&dlogp.data) {
            log_softmax_row(row);
            row.iter_mut().for_each(|x| *x = -g * x.exp());
            row[t as usize] += g;
        }
        CpuTensor::new(out, &logits.shape)
    }

    fn adam(&self, slots: &mut [AdamSlot<'_, Self>], h: &AdamStep) -> Result<()> {
        for s in slots.iter_mut() {
            let (p, g, m, v) = (&mut *s.p, s.g, &mut *s.m, &mut *s.v);
            ensure!(p.shape == g.shape && m.shape == g.shape && v.shape == g.shape, "adam: shapes do not agree");
            let f = h.factors(s.weight_decay);
            for i in 0..p.data.len() {
                adam_element(&mut p.data[i], g.data[i] * h.grad_scale, &mut m.data[i], &mut v.data[i], &f);
            }
            if let Some(c) = s.copy.as_mut() {
                c.data.copy_from_slice(&p.data);
            }
        }
        Ok(())
    }

    fn weight_grad(&self, x: &Self::Tensor, dy: &Self::Tensor, dw: &mut Self::Tensor) -> Result<()> {
        let (m, k) = x.rows_cols();
        let (dm, n) = dy.rows_cols();
        ensure!(dm == m && dw.shape == [n, k], "weight_grad: x {:?}, dy {:?}, dw {:?}", x.shape, dy.shape, dw.shape);
        matmul_tn(&dy.data, &x.data, &mut dw.data, n, m, k, true);
        Ok(())
    }

    fn rms_norm_weight_grad(&self, x: &Self::Tensor, eps: f32, dy: &Self::Tensor, dw: &mut Self::Tensor) -> Result<()> {
        let (_, d) = x.rows_cols();
        ensure!(dy.shape == x.shape && dw.data.len() == d, "rms_norm_weight_grad: shapes do not agree");
        for (xr, gr) in x.data.chunks(d).zip(dy.data.chunks(d)) {
            let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
            dw.data.iter_mut().zip(xr).zip(gr).for_each(|((w, x), g)| *w += g * x * r);
        }
        Ok(())
    }

    fn embedding_backward(&self, ids: &Self::Ids, dy: &Self::Tensor, d_table: &mut Self::Tensor) -> Result<()> {
        let (rows, d) = d_table.rows_cols();
        ensure!(
            dy.data.len() == ids.data.len() * d,
            "embedding_backward: dy {:?} for {} ids",
            dy.shape,
            ids.data.len()
        );
        for (&id, g) in ids.data.iter().zip(dy.data.chunks(d)) {
            ensure!((id as usize) < rows, "token id {id} is outside the embedding table of {rows} rows");
            d_table.data[id as usize * d..(id as usize + 1) * d].iter_mut().zip(g).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn attention_bias_grad(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        dout: &Self::Tensor,
        spec: &AttnSpec<'_, Self>,
        d_table: &mut Self::Tensor,
    ) -> Result<()> {
        let rb = spec.bias.as_ref().ok_or_else(|| anyhow::anyhow!("attention_bias_grad: the call has no bias"))?;
        let h = spec.heads;
        ensure!(d_table.shape == [rb.num_buckets, h], "attention_bias_grad: d_table {:?}", d_table.shape);
        let q_offset = at(spec.q_offset);
        attention_rows(q, k, v, dout, spec, |r| {
            for j in 0..r.p.len() {
                let rel = j as i64 - (q_offset + r.i) as i64;
                let bucket = relative_bucket(rel, rb.bidirectional, rb.num_buckets, rb.max_distance);
                d_table.data[bucket * h + r.head] += r.ds(j);
            }
        })
    }

    fn cross_entropy(
        &self,
        logits: &Self::Tensor,
        targets: &Self::Ids,
        weights: &Self::Tensor,
        smoothing: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let (n, v) = logits.rows_cols();
        ensure!(
            targets.data.len() == n && weights.data.len() == n,
            "cross_entropy: {} targets and {} weights for {n} rows",
            targets.data.len(),
            weights.data.len()
        );
        let mut loss = Vec::with_capacity(n);
        let mut grad = logits.data.clone();
        for ((row, &t), &w) in grad.chunks_mut(v).zip(&targets.data).zip(&weights.data) {
            ensure!((t as usize) < v, "target {t} is outside the vocabulary of {v}");
            let mean = row.iter().sum::<f32>() / v as f32;
            let (x_t, max) = (row[t as usize], row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
            loss.push((1.0 - smoothing) * (lse - x_t) + smoothing * (lse - mean));
            let floor = smoothing / v as f32;
            row.iter_mut().for_each(|x| *x = w * ((*x - lse).exp() - floor));
            row[t as usize] -= w * (1.0 - smoothing);
        }
        Ok((CpuTensor::new(loss, &[n])?, CpuTensor::new(grad, &logits.shape)?))
    }

    fn set_weight(&self, w: &mut Self::Weight, values: &Self::Tensor) -> Result<()> {
        ensure!(w.shape == values.shape, "set_weight: {:?} for a weight of {:?}", values.shape, w.shape);
        w.data.copy_from_slice(&values.data);
        Ok(())
    }

    fn sum_squares(&self, xs: &[&Self::Tensor]) -> Result<f64> {
        Ok(xs.iter().flat_map(|x| &x.data).map(|&v| (v as f64) * (v as f64)).sum())
    }

    type Graph = ();

    fn run_step(&self, _graph: &mut Option<()>, step: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        step()
    }
}

/// `dst [b, cap, d]` rows `pos..pos + n` ← `src [b, n, d]`.
fn write_rows_of<T: Copy>(dst: &mut [T], dshape: &[usize], src: &[T], sshape: &[usize], pos: usize) -> Result<()> {
    ensure!(
        dshape.len() == 3 && sshape.len() == 3 && dshape[0] == sshape[0] && dshape[2] == sshape[2],
        "write_rows: {sshape:?} into {dshape:?}"
    );
    let (b, cap, d) = (dshape[0], dshape[1], dshape[2]);
    let n = sshape[1];
    ensure!(pos + n <= cap, "write_rows: rows {pos}..{} past capacity {cap}", pos + n);
    for bi in 0..b {
        dst[(bi * cap + pos) * d..(bi * cap + pos + n) * d].copy_from_slice(&src[bi * n * d..(bi + 1) * n * d]);
    }
    Ok(())
}

/// One query row of an attention backward: the recomputed probabilities over its visible keys,
/// and their scores' gradient without the `scale` factor, ds_j = p_j (dp_j − Σ p·dp).
struct AttnRow<'a> {
    b: usize,
    head: usize,
    i: usize,
    dout: &'a [f32],
    p: &'a [f32],
    dp: &'a [f32],
    avg: f32,
}

impl AttnRow<'_> {
    fn ds(&self, j: usize) -> f32 {
        self.p[j] * (self.dp[j] - self.avg)
    }
}

/// Recomputes the softmax of every query row of an attention call (bias, padding and causality as
/// the forward applies them) and hands each row to `f`: the walk both backward forms share.
fn attention_rows(
    q: &CpuTensor<f32>,
    k: &CpuTensor<f32>,
    v: &CpuTensor<f32>,
    dout: &CpuTensor<f32>,
    spec: &AttnSpec<'_, Cpu>,
    mut f: impl FnMut(AttnRow<'_>),
) -> Result<()> {
    let (h, dk) = (spec.heads, spec.d_kv);
    let inner = h * dk;
    let (b, lq) = (q.shape[0], q.shape[1]);
    let cap = k.shape[1];
    ensure!(dout.shape == q.shape && k.shape == v.shape, "attention backward: shapes do not agree");
    let q_offset = at(spec.q_offset);
    let lk = match spec.q_offset {
        Position::At(_) => spec.kv_len,
        Position::Counter(_) => q_offset + lq,
    };
    let key_len: Vec<usize> = match spec.key_lengths {
        Some(l) => l.data.iter().map(|&n| (n as usize).min(lk)).collect(),
        None => vec![lk; b],
    };
    let mut p = vec![0.0f32; lk];
    for (bi, &len) in key_len.iter().enumerate() {
        for hh in 0..h {
            for i in 0..lq {
                let visible = if spec.causal { (q_offset + i + 1).min(lk) } else { lk }.min(len);
                if visible == 0 {
                    continue;
                }
                let qi = &q.data[(bi * lq + i) * inner + hh * dk..][..dk];
                let di = &dout.data[(bi * lq + i) * inner + hh * dk..][..dk];
                let mut max = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate().take(visible) {
                    let kj = &k.data[(bi * cap + j) * inner + hh * dk..][..dk];
                    let mut s = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * spec.scale;
                    if let Some(rb) = &spec.bias {
                        let rel = j as i64 - (q_offset + i) as i64;
                        let bucket = relative_bucket(rel, rb.bidirectional, rb.num_buckets, rb.max_distance);
                        s += rb.table.data[bucket * h + hh];
                    }
                    *pj = s;
                    max = max.max(s);
                }
                let sum: f32 = p[..visible]
                    .iter_mut()
                    .map(|s| {
                        *s = (*s - max).exp();
                        *s
                    })
                    .sum();
                p[..visible].iter_mut().for_each(|s| *s /= sum);
                // dp_j = dout_i · v_j
                let dp: Vec<f32> = (0..visible)
                    .map(|j| di.iter().zip(&v.data[(bi * cap + j) * inner + hh * dk..][..dk]).map(|(a, b)| a * b).sum())
                    .collect();
                let avg: f32 = p[..visible].iter().zip(&dp).map(|(a, b)| a * b).sum();
                f(AttnRow { b: bi, head: hh, i, dout: di, p: &p[..visible], dp: &dp, avg });
            }
        }
    }
    Ok(())
}

/// One element of torch.optim.Adam's update (no weight decay), in torch's order of operations.
pub fn adam_element(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, f: &super::AdamFactors) {
    *p *= f.decay;
    // torch's lerp(m, g, 1 − β₁) takes this branch for weights below one half.
    *m += f.w1 * (g - *m);
    *v = *v * f.beta2 + f.w2 * g * g;
    let denom = v.sqrt() / f.bc2_sqrt + f.eps;
    *p += f.neg_step * *m / denom;
}

/// In-place log-softmax of one row, in f32 with the max subtracted first.
pub fn log_softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
    let lse = max + sum.ln();
    row.iter_mut().for_each(|x| *x -= lse);
}

/// Picks one token from one row of raw logits. Sampling draws u from the counter RNG keyed by
/// (seed, row, step) and inverts the CDF of the filtered distribution in vocabulary order, which
/// the GPU reproduces with a prefix sum.
pub fn choose_token(raw: &[f32], spec: &SampleSpec, row: u64, step: u64) -> usize {
    let mut z: Vec<f32> = raw.to_vec();
    if (step as usize) < spec.min_new_tokens {
        z[spec.eos as usize] = f32::NEG_INFINITY;
    }
    if spec.greedy {
        return argmax(&z);
    }
    let t = spec.temperature;
    z.iter_mut().for_each(|x| *x /= t);
    if spec.top_k > 0 && spec.top_k < z.len() {
        let mut sorted = z.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[spec.top_k - 1];
        z.iter_mut().filter(|x| **x < kth).for_each(|x| *x = f32::NEG_INFINITY);
    }
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = z.iter().map(|x| (x - max).exp()).collect();
    // Sums in f64: over 32k terms an f32 running sum drifts by a sizeable part of one token's
    // probability, and the GPU, which sums in another order, would then draw other tokens.
    if spec.top_p < 1.0 {
        // Keep the most likely tokens until their mass reaches top_p, as Hugging Face does, and
        // every token tied with the last one kept (a sort would break ties arbitrarily).
        let total: f64 = p.iter().map(|&x| x as f64).sum();
        let mut sorted = p.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let need = spec.top_p as f64 * total;
        let mut cum = 0.0f64;
        let mut threshold = sorted[0];
        for &v in &sorted {
            cum += v as f64;
            threshold = v;
            if cum >= need {
                break;
            }
        }
        p.iter_mut().filter(|x| **x < threshold).for_each(|x| *x = 0.0);
    }
    let total: f64 = p.iter().map(|&x| x as f64).sum();
    let u = uniform(spec.seed, row, step) as f64 * total;
    let mut cum = 0.0f64;
    let mut last_nonzero = 0;
    for (i, &pi) in p.iter().enumerate() {
        if pi > 0.0 {
            cum += pi as f64;
            last_nonzero = i;
            if cum > u {
                return i;
            }
        }
    }
    last_nonzero
}

/// The first index of the largest value (torch.argmax's tie rule).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

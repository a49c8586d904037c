//! The CUDA forms of the training operations: the backward passes of the forward ops, dropout,
//! token log-probabilities with entropy, Adam and Σx². Products run on cuBLAS from half inputs
//! (f32 gradients are cast on the way in) with fp32 accumulation into f32 gradients; the rest are
//! the f32 kernels of kernels/backward.cu.

use super::device::elementwise;
use super::gemm::{Elem, Mat};
use super::{AttnParams, Buf, Cuda, CudaIds, CudaTensor, CudaWeight};
use crate::backend::{AdamFactors, AdamSlot, AdamStep, AttnSpec, Dropout, LoraGrad, LoraRef, Prec, Shaped};

/// Values one block of `adam_multi` updates: 256 threads, 4 each (kernels/backward.cu).
const ADAM_VALUES_PER_BLOCK: u64 = 1024;
/// Values one block of `sum_squares_multi` reads: 256 threads, 8 each.
const SUM_SQUARES_VALUES_PER_BLOCK: u64 = 2048;
use anyhow::{Result, bail, ensure};
use cudarc::driver::{CudaSlice, LaunchConfig};
use half::f16;

/// Threads per row of the log-probability kernels (`LP_THREADS` in kernels/backward.cu).
pub(super) const LP_THREADS: u32 = 512;

/// A one-dimensional grid of `blocks` blocks of `threads` threads.
pub(super) fn blocks(blocks: usize, threads: u32) -> Result<LaunchConfig> {
    ensure!(blocks < 1 << 31, "{blocks} blocks exceed the grid's limit");
    Ok(LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

pub(super) fn half_mat(ptr: u64, ld: usize) -> Mat {
    Mat { ptr, ld, elem: Elem::F16 }
}

pub(super) fn f32_mat(ptr: u64, ld: usize) -> Mat {
    Mat { ptr, ld, elem: Elem::F32 }
}

impl Cuda {
    /// The address of a tensor that gradients accumulate into, which must be f32.
    pub(super) fn grad_ptr(&self, t: &CudaTensor, what: &str) -> Result<u64> {
        match &t.buf {
            Buf::F32(s) => Ok(self.gpu.ptr(s)),
            Buf::F16(_) => bail!("{what}: gradients accumulate in f32 tensors, not half"),
        }
    }

    pub(super) fn dropout_impl(&self, x: &CudaTensor, d: &Dropout) -> Result<CudaTensor> {
        let n = x.numel();
        // A half input stays half: its consumers are matrix products (dropout_f16 is the forward's
        // kernel in elementwise.cu, drawing the same mask).
        let (prec, name) = match x.buf {
            Buf::F32(_) => (Prec::F32, "dropout_f32"),
            Buf::F16(_) => (Prec::Half, "dropout_f16"),
        };
        let y = self.empty(&x.shape, prec)?;
        self.gpu.launch(
            name,
            elementwise(n),
            &[&self.ptr_t(x), &self.ptr_t(&y), &(n as i64), &d.p, &d.seed, &d.stream],
        )?;
        Ok(y)
    }

    /// `dx += dy · w`, then per LoRA branch (h = scale · dropout(x) · Aᵀ, dh = scale · dy[:, cols] · B):
    /// `gB += dy[:, cols]ᵀ · h`, `gA += dhᵀ · dropout(x)` and `dx += dropout(dh · A)`. The branch's
    /// column range of dy is read in place (a pointer offset and dy's row length).
    pub(super) fn linear_backward_impl(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        lora: &[LoraRef<'_, Self>],
        dy: &CudaTensor,
        dx: Option<&mut CudaTensor>,
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
        let dxp = match dx.as_deref() {
            Some(t) => {
                ensure!(t.rows_cols() == (m, k), "linear_backward: dx {:?} for input {:?}", t.shape, x.shape);
                Some(self.grad_ptr(t, "linear_backward dx")?)
            }
            None => None,
        };
        let dyh = self.as_half(dy)?;
        let dyp = self.gpu.ptr(&dyh);
        if let Some(dxp) = dxp {
            self.gemm.nn(half_mat(dyp, n), half_mat(self.gpu.ptr(&w.buf), k), f32_mat(dxp, k), m, n, k, 1.0, 1.0)?;
        }
        if lora.is_empty() {
            return Ok(());
        }
        let xh = self.as_half(x)?;
        for (l, g) in lora.iter().zip(grads.iter()) {
            let (r, out) = (l.a.shape[0], l.b.shape[0]);
            ensure!(
                l.a.shape == [r, k] && l.b.shape == [out, r] && l.col + out <= n,
                "LoRA shapes {:?} / {:?} at column {} do not fit {n} outputs",
                l.a.shape,
                l.b.shape,
                l.col
            );
            ensure!(
                g.a.shape == l.a.shape && g.b.shape == l.b.shape,
                "linear_backward: gradients {:?} / {:?} for LoRA {:?} / {:?}",
                g.a.shape,
                g.b.shape,
                l.a.shape,
                l.b.shape
            );
            let (gap, gbp) = (self.grad_ptr(g.a, "LoRA A gradient")?, self.grad_ptr(g.b, "LoRA B gradient")?);
            let made;
            let (a16, b16) = match l.shadow {
                Some((a, b)) => (a, b),
                None => {
                    made = (self.half_copy(l.a)?, self.half_copy(l.b)?);
                    (&made.0, &made.1)
                }
            };
            let (ap, bp) = (self.ptr_t(a16), self.ptr_t(b16));
            let drop = l.dropout.filter(|d| d.p > 0.0);
            let dropped;
            let xin: &CudaSlice<f16> = match drop {
                Some(d) => {
                    let out = self.gpu.alloc::<f16>(m * k)?;
                    self.gpu.launch(
                        "dropout_f16",
                        elementwise(m * k),
                        &[&self.gpu.ptr(&xh), &self.gpu.ptr(&out), &((m * k) as i64), &d.p, &d.seed, &d.stream],
                    )?;
                    dropped = out;
                    &dropped
                }
                None => xh.as_ref(),
            };
            let xp = self.gpu.ptr(xin);
            let h = self.gpu.alloc::<f16>(m * r)?;
            let hp = self.gpu.ptr(&h);
            self.gemm.nt(xp, ap, hp, r, m, k, r, Elem::F16, Elem::F16, l.scale, 0.0)?;
            let dyc = half_mat(dyp + (l.col * 2) as u64, n);
            self.gemm.tn(dyc, half_mat(hp, r), f32_mat(gbp, r), out, m, r, 1.0, 1.0)?;
            let dh = self.gpu.alloc::<f16>(m * r)?;
            let dhp = self.gpu.ptr(&dh);
            self.gemm.nn(dyc, half_mat(bp, r), half_mat(dhp, r), m, out, r, l.scale, 0.0)?;
            self.gemm.tn(half_mat(dhp, r), half_mat(xp, k), f32_mat(gap, k), r, m, k, 1.0, 1.0)?;
            match (dxp, drop) {
                (None, _) => {}
                (Some(dxp), None) => {
                    self.gemm.nn(half_mat(dhp, r), half_mat(ap, k), f32_mat(dxp, k), m, r, k, 1.0, 1.0)?
                }
                (Some(dxp), Some(d)) => {
                    // The branch's share passes back through its dropout mask before joining dx.
                    let share = self.gpu.alloc::<f32>(m * k)?;
                    let sp = self.gpu.ptr(&share);
                    self.gemm.nn(half_mat(dhp, r), half_mat(ap, k), f32_mat(sp, k), m, r, k, 1.0, 0.0)?;
                    self.gpu.launch(
                        "dropout_add_f32",
                        elementwise(m * k),
                        &[&sp, &dxp, &((m * k) as i64), &d.p, &d.seed, &d.stream],
                    )?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn affine_backward_impl(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        dy: &CudaTensor,
        dx: Option<&mut CudaTensor>,
        dw: &mut CudaTensor,
        db: Option<&mut CudaTensor>,
    ) -> Result<()> {
        let (m, k) = x.rows_cols();
        let (n, wk) = w.rows_cols();
        ensure!(
            k == wk && dy.rows_cols() == (m, n) && dw.shape == w.shape,
            "affine_backward: x {:?}, w {:?}, dy {:?}, dw {:?}",
            x.shape,
            w.shape,
            dy.shape,
            dw.shape
        );
        let dyh = self.as_half(dy)?;
        let dyp = self.gpu.ptr(&dyh);
        if let Some(dx) = dx {
            ensure!(dx.rows_cols() == (m, k), "affine_backward: dx {:?} for input {:?}", dx.shape, x.shape);
            let dxp = self.grad_ptr(dx, "affine_backward dx")?;
            let wh = self.as_half(w)?;
            self.gemm.nn(half_mat(dyp, n), half_mat(self.gpu.ptr(&wh), k), f32_mat(dxp, k), m, n, k, 1.0, 1.0)?;
        }
        let dwp = self.grad_ptr(dw, "affine_backward dw")?;
        let xh = self.as_half(x)?;
        self.gemm.tn(half_mat(dyp, n), half_mat(self.gpu.ptr(&xh), k), f32_mat(dwp, k), n, m, k, 1.0, 1.0)?;
        if let Some(db) = db {
            ensure!(db.numel() == n, "affine_backward: db has {} values for {n} outputs", db.numel());
            let dbp = self.grad_ptr(db, "affine_backward db")?;
            if n > 0 {
                self.gpu.launch(
                    &format!("column_sum_add_{}", Self::suffix(dy)),
                    blocks(n, 256)?,
                    &[&self.ptr_t(dy), &dbp, &(m as i64), &(n as i32)],
                )?;
            }
        }
        Ok(())
    }

    pub(super) fn rms_norm_backward_impl(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        eps: f32,
        dy: &CudaTensor,
        dx: &mut CudaTensor,
    ) -> Result<()> {
        let (rows, d) = x.rows_cols();
        ensure!(
            w.numel() == d && dy.shape == x.shape && dx.shape == x.shape,
            "rms_norm_backward: x {:?}, w {:?}, dy {:?}, dx {:?}",
            x.shape,
            w.shape,
            dy.shape,
            dx.shape
        );
        let dxp = self.grad_ptr(dx, "rms_norm_backward dx")?;
        if rows == 0 {
            return Ok(());
        }
        self.gpu.launch(
            &format!("rms_norm_backward_{}_{}", Self::suffix(x), Self::suffix(dy)),
            blocks(rows, 256)?,
            &[&self.ptr_t(x), &self.gpu.ptr(&w.buf), &self.ptr_t(dy), &dxp, &(d as i32), &eps],
        )
    }

    pub(super) fn gated_gelu_backward_impl(&self, gate_up: &CudaTensor, dy: &CudaTensor) -> Result<CudaTensor> {
        let (rows, d2) = gate_up.rows_cols();
        let f = d2 / 2;
        ensure!(
            d2 % 2 == 0 && dy.rows_cols() == (rows, f),
            "gated_gelu_backward: dy {:?} for {:?}",
            dy.shape,
            gate_up.shape
        );
        let out = self.empty(&gate_up.shape, Prec::F32)?;
        self.gpu.launch(
            &format!("gated_gelu_backward_{}_{}", Self::suffix(gate_up), Self::suffix(dy)),
            elementwise(rows * f),
            &[&self.ptr_t(gate_up), &self.ptr_t(dy), &self.ptr_t(&out), &(rows as i64), &(f as i32)],
        )?;
        Ok(out)
    }

    /// Two launches (kernels/backward.cu says how the work is split): per 64 queries, the softmax
    /// statistics and dq; then per 64 keys, dk and dv. q, k, v and dout are read as half.
    pub(super) fn attention_backward_impl(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        dout: &CudaTensor,
        spec: &AttnSpec<'_, Self>,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor)> {
        let (h, dk) = (spec.heads, spec.d_kv);
        let inner = h * dk;
        ensure!(q.shape.len() == 3 && q.shape[2] == inner, "attention_backward: q shape {:?}", q.shape);
        let (b, lq) = (q.shape[0], q.shape[1]);
        ensure!(
            k.shape.len() == 3 && k.shape[0] == b && k.shape[2] == inner && k.shape == v.shape,
            "attention_backward: k {:?} / v {:?} do not match q {:?}",
            k.shape,
            v.shape,
            q.shape
        );
        ensure!(dout.shape == q.shape, "attention_backward: dout {:?} for q {:?}", dout.shape, q.shape);
        ensure!((1..=128).contains(&dk), "attention_backward: d_kv {dk} is outside 1..=128 on CUDA");
        ensure!(h <= 65535 && b <= 65535, "attention_backward: {h} heads × {b} rows exceed the grid");
        let cap = k.shape[1];
        let (q_offset, counter) = self.position(spec.q_offset);
        let max_keys = if counter != 0 { cap } else { spec.kv_len };
        ensure!(max_keys <= cap, "attention_backward: kv_len {} exceeds the {cap} rows of k", spec.kv_len);
        let dq = self.empty(&q.shape, Prec::F32)?;
        let dkt = self.empty(&k.shape, Prec::F32)?;
        let dvt = self.empty(&v.shape, Prec::F32)?;
        if b == 0 || h == 0 {
            return Ok((dq, dkt, dvt));
        }
        let (qh, kh, vh, gh) = (self.as_half(q)?, self.as_half(k)?, self.as_half(v)?, self.as_half(dout)?);
        let (bias_table, bucket_lut, max_distance) = match &spec.bias {
            Some(rb) => (
                self.gpu.ptr(&rb.table.buf),
                self.bucket_lut(rb.bidirectional, rb.num_buckets, rb.max_distance)?,
                rb.max_distance as i32,
            ),
            None => (0, 0, 0),
        };
        let params = AttnParams {
            key_lengths: spec.key_lengths.map(|l| self.gpu.ptr(&l.buf)).unwrap_or(0),
            counter,
            bias_table,
            bucket_lut,
            b: b as i32,
            lq: lq as i32,
            lk: spec.kv_len as i32,
            cap: cap as i32,
            h: h as i32,
            dk: dk as i32,
            q_offset,
            causal: spec.causal as i32,
            max_distance,
            scale: spec.scale,
        };
        // Per (row, head, query): the log-sum-exp of the scores and D = Σ p·dp.
        let lse = self.gpu.alloc::<f32>(b * h * lq)?;
        let dsum = self.gpu.alloc::<f32>(b * h * lq)?;
        // Head sizes of whole m16n8k16 tiles take the tensor cores; others the f32 form, whose row
        // size is fixed at compile time.
        let (form, threads) = match dk {
            16 | 32 | 64 => (format!("mma_{dk}"), 128),
            1..=32 => ("plain_32".to_string(), 64),
            33..=64 => ("plain_64".to_string(), 64),
            _ => ("plain_128".to_string(), 64),
        };
        let grid = |rows: usize| LaunchConfig {
            grid_dim: (rows.div_ceil(64) as u32, h as u32, b as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (qp, kp, vp, gp) = (self.gpu.ptr(&qh), self.gpu.ptr(&kh), self.gpu.ptr(&vh), self.gpu.ptr(&gh));
        let (lp, dp) = (self.gpu.ptr(&lse), self.gpu.ptr(&dsum));
        if lq > 0 {
            self.gpu.launch(
                &format!("attention_backward_dq_{form}"),
                grid(lq),
                &[&qp, &kp, &vp, &gp, &self.ptr_t(&dq), &lp, &dp, &params],
            )?;
        }
        if cap > 0 {
            self.gpu.launch(
                &format!("attention_backward_dkdv_{form}"),
                grid(cap),
                &[&qp, &kp, &vp, &gp, &self.ptr_t(&dkt), &self.ptr_t(&dvt), &lp, &dp, &params],
            )?;
        }
        Ok((dq, dkt, dvt))
    }

    pub(super) fn concat_last_impl(&self, pieces: &[&CudaTensor]) -> Result<CudaTensor> {
        ensure!(!pieces.is_empty(), "concat_last: no pieces");
        let rows = pieces[0].rows_cols().0;
        ensure!(pieces.iter().all(|p| p.rows_cols().0 == rows), "concat_last: pieces differ in rows");
        let width: usize = pieces.iter().map(|p| p.rows_cols().1).sum();
        let mut shape = pieces[0].shape.clone();
        *shape.last_mut().expect("rank ≥ 1") = width;
        let out = self.empty(&shape, Prec::F32)?;
        let mut col = 0;
        for p in pieces {
            let w = p.rows_cols().1;
            self.gpu.launch(
                &format!("concat_piece_{}", Self::suffix(p)),
                elementwise(rows * w),
                &[&self.ptr_t(p), &self.ptr_t(&out), &(rows as i64), &(w as i32), &(width as i32), &(col as i32)],
            )?;
            col += w;
        }
        Ok(out)
    }

    /// The logits of one row per block; checks shared by the forward and the backward.
    pub(super) fn logit_rows(&self, logits: &CudaTensor, tokens: &CudaIds, what: &str) -> Result<(usize, usize)> {
        let (n, v) = logits.rows_cols();
        ensure!(matches!(logits.buf, Buf::F32(_)), "{what} expects f32 logits");
        ensure!(tokens.numel() == n, "{what}: {} tokens for {n} rows", tokens.numel());
        ensure!(v > 0 || n == 0, "{what}: empty vocabulary");
        ensure!(v < 1 << 31, "{what}: a vocabulary of {v} exceeds the kernels' int indices");
        Ok((n, v))
    }

    pub(super) fn token_logprobs_impl(
        &self,
        logits: &CudaTensor,
        tokens: &CudaIds,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let (n, v) = self.logit_rows(logits, tokens, "token_logprobs")?;
        let lp = self.empty(&[n], Prec::F32)?;
        let ent = self.empty(&[n], Prec::F32)?;
        if n > 0 {
            self.gpu.launch(
                "token_logprobs_f32",
                blocks(n, LP_THREADS)?,
                &[&self.ptr_t(logits), &self.gpu.ptr(&tokens.buf), &self.ptr_t(&lp), &self.ptr_t(&ent), &(v as i32)],
            )?;
        }
        Ok((lp, ent))
    }

    pub(super) fn token_logprobs_backward_impl(
        &self,
        logits: &CudaTensor,
        tokens: &CudaIds,
        dlogp: &CudaTensor,
    ) -> Result<CudaTensor> {
        let (n, v) = self.logit_rows(logits, tokens, "token_logprobs_backward")?;
        ensure!(
            dlogp.numel() == n && matches!(dlogp.buf, Buf::F32(_)),
            "token_logprobs_backward: dlogp must hold {n} f32 values, has shape {:?}",
            dlogp.shape
        );
        let out = self.empty(&logits.shape, Prec::F32)?;
        if n > 0 {
            self.gpu.launch(
                "token_logprobs_backward_f32",
                blocks(n, LP_THREADS)?,
                &[&self.ptr_t(logits), &self.gpu.ptr(&tokens.buf), &self.ptr_t(dlogp), &self.ptr_t(&out), &(v as i32)],
            )?;
        }
        Ok(out)
    }

    /// Every slot in one launch: a table of the tensors (kernels/backward.cu's `AdamTensor`, eight
    /// 64-bit words each) goes up with the launch, and each block finds its tensor in it.
    pub(super) fn adam_impl(&self, slots: &mut [AdamSlot<'_, Cuda>], h: &AdamStep) -> Result<()> {
        let mut table: Vec<u64> = Vec::with_capacity(slots.len() * 8);
        let mut blocks = 0u64;
        for (i, s) in slots.iter_mut().enumerate() {
            let n = s.g.numel();
            let same = s.p.shape == s.g.shape && s.m.shape == s.g.shape && s.v.shape == s.g.shape;
            ensure!(same, "adam: the shapes of tensor {i} do not agree");
            let copy = match s.copy.as_deref() {
                Some(CudaTensor { buf: Buf::F16(c), .. }) if c.len() >= n => self.gpu.ptr(c),
                Some(_) => bail!("adam: tensor {i}'s copy is not a half tensor of its size"),
                None => 0,
            };
            // The f32 factors the CPU reference uses, so both backends round alike.
            let decay: AdamFactors = h.factors(s.weight_decay);
            table.extend([
                self.grad_ptr(s.p, "adam p")?,
                self.grad_ptr(s.g, "adam g")?,
                self.grad_ptr(s.m, "adam m")?,
                self.grad_ptr(s.v, "adam v")?,
                copy,
                n as u64,
                decay.decay.to_bits() as u64,
                blocks,
            ]);
            blocks += (n as u64).div_ceil(ADAM_VALUES_PER_BLOCK);
        }
        if blocks == 0 {
            return Ok(());
        }
        let f = h.factors(0.0);
        let table = self.gpu.upload(&table)?;
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        self.gpu.launch(
            "adam_multi",
            cfg,
            &[
                &self.gpu.ptr(&table),
                &(slots.len() as i32),
                &f.w1,
                &f.beta2,
                &f.w2,
                &f.neg_step,
                &f.bc2_sqrt,
                &f.eps,
                &h.grad_scale,
            ],
        )
    }

    /// Every tensor in one launch (kernels/backward.cu's `SumSquaresTensor`, four 64-bit words
    /// each); each block writes one partial sum, and the host adds them once, in order.
    pub(super) fn sum_squares_impl(&self, xs: &[&CudaTensor]) -> Result<f64> {
        let mut table: Vec<u64> = Vec::with_capacity(xs.len() * 4);
        let mut blocks = 0u64;
        for x in xs.iter().filter(|x| x.numel() > 0) {
            let n = x.numel() as u64;
            table.extend([self.ptr_t(x), n, blocks, matches!(x.buf, Buf::F16(_)) as u64]);
            blocks += n.div_ceil(SUM_SQUARES_VALUES_PER_BLOCK);
        }
        if blocks == 0 {
            return Ok(0.0);
        }
        let partial = self.gpu.alloc::<f64>(blocks as usize)?;
        let table_dev = self.gpu.upload(&table)?;
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let count = (table.len() / 4) as i32;
        self.gpu.launch("sum_squares_multi", cfg, &[&self.gpu.ptr(&table_dev), &count, &self.gpu.ptr(&partial)])?;
        Ok(self.gpu.download(&partial, blocks as usize)?.iter().sum())
    }
}

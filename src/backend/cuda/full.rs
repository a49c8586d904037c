//! The CUDA forms of the operations only full-parameter training needs: weight gradients of the
//! products, norms, embeddings and the relative-position bias, cross-entropy with label smoothing,
//! and writing trained weights back.

use super::backward::{LP_THREADS, blocks, f32_mat, half_mat};
use super::device::elementwise;
use super::{AttnParams, Buf, Cuda, CudaIds, CudaTensor, CudaWeight};
use crate::backend::{AttnSpec, Prec, Shaped};
use anyhow::{Result, ensure};
use cudarc::driver::LaunchConfig;

/// Rows per block of `rms_weight_grad` (`RMS_ROWS` in kernels/backward.cu).
const RMS_ROWS: usize = 64;

/// The shared memory `attention_bias_grad` may ask for without opting in to more.
const SMEM_LIMIT: usize = 48 << 10;

impl Cuda {
    pub(super) fn weight_grad_impl(&self, x: &CudaTensor, dy: &CudaTensor, dw: &mut CudaTensor) -> Result<()> {
        let (m, k) = x.rows_cols();
        let (dm, n) = dy.rows_cols();
        ensure!(dm == m && dw.shape == [n, k], "weight_grad: x {:?}, dy {:?}, dw {:?}", x.shape, dy.shape, dw.shape);
        let dwp = self.grad_ptr(dw, "weight_grad dw")?;
        let (dyh, xh) = (self.as_half(dy)?, self.as_half(x)?);
        self.gemm.tn(
            half_mat(self.gpu.ptr(&dyh), n),
            half_mat(self.gpu.ptr(&xh), k),
            f32_mat(dwp, k),
            n,
            m,
            k,
            1.0,
            1.0,
        )
    }

    /// Two launches: each row's inverse RMS, then column sums over chunks of rows.
    pub(super) fn rms_norm_weight_grad_impl(
        &self,
        x: &CudaTensor,
        eps: f32,
        dy: &CudaTensor,
        dw: &mut CudaTensor,
    ) -> Result<()> {
        let (rows, d) = x.rows_cols();
        ensure!(
            dy.shape == x.shape && dw.numel() == d,
            "rms_norm_weight_grad: x {:?}, dy {:?}, dw {:?}",
            x.shape,
            dy.shape,
            dw.shape
        );
        let dwp = self.grad_ptr(dw, "rms_norm_weight_grad dw")?;
        if rows == 0 || d == 0 {
            return Ok(());
        }
        let inverse = self.gpu.alloc::<f32>(rows)?;
        let ip = self.gpu.ptr(&inverse);
        self.gpu.launch(
            &format!("rms_inverse_{}", Self::suffix(x)),
            blocks(rows, 256)?,
            &[&self.ptr_t(x), &ip, &(d as i32), &eps],
        )?;
        let chunks = rows.div_ceil(RMS_ROWS);
        ensure!(chunks <= 65535, "rms_norm_weight_grad: {rows} rows exceed the grid");
        let cfg = LaunchConfig {
            grid_dim: (d.div_ceil(256) as u32, chunks as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.gpu.launch(
            &format!("rms_weight_grad_{}_{}", Self::suffix(x), Self::suffix(dy)),
            cfg,
            &[&self.ptr_t(x), &self.ptr_t(dy), &ip, &dwp, &(rows as i64), &(d as i32)],
        )
    }

    pub(super) fn embedding_backward_impl(
        &self,
        ids: &CudaIds,
        dy: &CudaTensor,
        d_table: &mut CudaTensor,
    ) -> Result<()> {
        let (rows, d) = d_table.rows_cols();
        let n = ids.numel();
        ensure!(dy.numel() == n * d, "embedding_backward: dy {:?} for {n} ids", dy.shape);
        let tp = self.grad_ptr(d_table, "embedding_backward d_table")?;
        if n == 0 || d == 0 {
            return Ok(());
        }
        self.gpu.launch(
            &format!("embedding_backward_{}", Self::suffix(dy)),
            elementwise(n * d),
            &[&self.gpu.ptr(&ids.buf), &self.ptr_t(dy), &tp, &(n as i64), &(d as i32), &(rows as i32)],
        )
    }

    pub(super) fn attention_bias_grad_impl(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        dout: &CudaTensor,
        spec: &AttnSpec<'_, Self>,
        d_table: &mut CudaTensor,
    ) -> Result<()> {
        let rb = spec.bias.as_ref().ok_or_else(|| anyhow::anyhow!("attention_bias_grad: the call has no bias"))?;
        let (h, dk) = (spec.heads, spec.d_kv);
        ensure!(q.shape.len() == 3 && q.shape[2] == h * dk, "attention_bias_grad: q shape {:?}", q.shape);
        let (b, lq) = (q.shape[0], q.shape[1]);
        ensure!(
            k.shape.len() == 3 && k.shape[0] == b && k.shape == v.shape && dout.shape == q.shape,
            "attention_bias_grad: k {:?}, v {:?}, dout {:?} for q {:?}",
            k.shape,
            v.shape,
            dout.shape,
            q.shape
        );
        ensure!(d_table.shape == [rb.num_buckets, h], "attention_bias_grad: d_table {:?}", d_table.shape);
        ensure!((1..=128).contains(&dk), "attention_bias_grad: d_kv {dk} is outside 1..=128 on CUDA");
        let cap = k.shape[1];
        let smem = (2 * cap + rb.num_buckets) * 4;
        ensure!(
            smem <= SMEM_LIMIT,
            "attention_bias_grad: {cap} keys need {smem} bytes of shared memory, over {SMEM_LIMIT}"
        );
        ensure!(lq < 1 << 31 && h <= 65535 && b <= 65535, "attention_bias_grad: {b}×{h}×{lq} exceeds the grid");
        let tp = self.grad_ptr(d_table, "attention_bias_grad d_table")?;
        if b == 0 || lq == 0 || h == 0 {
            return Ok(());
        }
        let (q_offset, counter) = self.position(spec.q_offset);
        let params = AttnParams {
            key_lengths: spec.key_lengths.map(|l| self.gpu.ptr(&l.buf)).unwrap_or(0),
            counter,
            bias_table: self.gpu.ptr(&rb.table.buf),
            bucket_lut: self.bucket_lut(rb.bidirectional, rb.num_buckets, rb.max_distance)?,
            b: b as i32,
            lq: lq as i32,
            lk: spec.kv_len as i32,
            cap: cap as i32,
            h: h as i32,
            dk: dk as i32,
            q_offset,
            causal: spec.causal as i32,
            max_distance: rb.max_distance as i32,
            scale: spec.scale,
        };
        let (qh, kh, vh, gh) = (self.as_half(q)?, self.as_half(k)?, self.as_half(v)?, self.as_half(dout)?);
        let cfg = LaunchConfig {
            grid_dim: (lq as u32, h as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        self.gpu.launch(
            "attention_bias_grad",
            cfg,
            &[
                &self.gpu.ptr(&qh),
                &self.gpu.ptr(&kh),
                &self.gpu.ptr(&vh),
                &self.gpu.ptr(&gh),
                &tp,
                &(rb.num_buckets as i32),
                &params,
            ],
        )
    }

    pub(super) fn cross_entropy_impl(
        &self,
        logits: &CudaTensor,
        targets: &CudaIds,
        weights: &CudaTensor,
        smoothing: f32,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let (n, v) = self.logit_rows(logits, targets, "cross_entropy")?;
        ensure!(
            weights.numel() == n && matches!(weights.buf, Buf::F32(_)),
            "cross_entropy: weights must hold {n} f32 values, has shape {:?}",
            weights.shape
        );
        let loss = self.empty(&[n], Prec::F32)?;
        let grad = self.empty(&logits.shape, Prec::F32)?;
        if n > 0 {
            self.gpu.launch(
                "cross_entropy_f32",
                blocks(n, LP_THREADS)?,
                &[
                    &self.ptr_t(logits),
                    &self.gpu.ptr(&targets.buf),
                    &self.ptr_t(weights),
                    &self.ptr_t(&loss),
                    &self.ptr_t(&grad),
                    &(v as i32),
                    &smoothing,
                ],
            )?;
        }
        Ok((loss, grad))
    }

    pub(super) fn set_weight_impl(&self, w: &mut CudaWeight, values: &CudaTensor) -> Result<()> {
        ensure!(w.shape == values.shape, "set_weight: {:?} for a weight of {:?}", values.shape, w.shape);
        let n = values.numel();
        match &values.buf {
            Buf::F32(s) => {
                self.gpu.launch("cast_f32_f16", elementwise(n), &[&self.gpu.ptr(s), &self.gpu.ptr(&w.buf), &(n as i64)])
            }
            Buf::F16(s) => self.gpu.stream.memcpy_dtod(s, &mut w.buf).map_err(|e| anyhow::anyhow!("set_weight: {e:?}")),
        }
    }
}

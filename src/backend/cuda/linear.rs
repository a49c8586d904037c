//! The CUDA products: cuBLAS for frozen weights with their LoRA branches (half in, fp32
//! accumulate), kernels/linear.cu for the narrow affine layer and the embedding lookup, and the
//! gradients of all of them.

use super::*;

impl Cuda {
    /// `y (+)= x · wᵀ`, then each LoRA branch `y[:, col..] += scale · dropout(x) · Aᵀ · Bᵀ`, every
    /// product on the tensor cores: a branch is two thin products, the second accumulating into
    /// its columns of y.
    fn product(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        lora: &[LoraRef<'_, Self>],
        y: &mut CudaTensor,
        accumulate: bool,
    ) -> Result<()> {
        let (m, k) = x.rows_cols();
        let n = w.rows_cols().0;
        let xh = self.as_half(x)?;
        let (yout, ysize) = if matches!(y.buf, Buf::F32(_)) { (Elem::F32, 4) } else { (Elem::F16, 2) };
        let beta = if accumulate { 1.0 } else { 0.0 };
        let yp = self.ptr_t(y);
        self.gemm.nt(self.gpu.ptr(&xh), self.gpu.ptr(&w.buf), yp, n, m, k, n, Elem::F16, yout, 1.0, beta)?;
        for l in lora {
            let r = l.a.shape[0];
            let out = l.b.shape[0];
            let made;
            let (a16, b16) = match l.shadow {
                Some((a, b)) => (a, b),
                None => {
                    made = (self.half_copy(l.a)?, self.half_copy(l.b)?);
                    (&made.0, &made.1)
                }
            };
            let dropped;
            let xin = match l.dropout {
                Some(d) if d.p > 0.0 => {
                    let out = self.gpu.alloc::<f16>(m * k)?;
                    self.gpu.launch(
                        "dropout_f16",
                        elementwise(m * k),
                        &[&self.gpu.ptr(&xh), &self.gpu.ptr(&out), &((m * k) as i64), &d.p, &d.seed, &d.stream],
                    )?;
                    dropped = out;
                    &dropped
                }
                _ => xh.as_ref(),
            };
            let h = self.gpu.alloc::<f16>(m * r)?;
            let hp = self.gpu.ptr(&h);
            self.gemm.nt(self.gpu.ptr(xin), self.ptr_t(a16), hp, r, m, k, r, Elem::F16, Elem::F16, l.scale, 0.0)?;
            let ycol = yp + (l.col * ysize) as u64;
            self.gemm.nt(hp, self.ptr_t(b16), ycol, n, m, r, out, Elem::F16, yout, 1.0, 1.0)?;
        }
        Ok(())
    }
    /// One LoRA branch's share of `linear_backward` (h = scale · dropout(x) · Aᵀ,
    /// dh = scale · dy[:, cols] · B): `gB += dy[:, cols]ᵀ · h`, `gA += dhᵀ · dropout(x)` and, when
    /// `dxp` is given, `dx += dropout(dh · A)`. The branch's columns of dy are read in place.
    fn lora_backward(
        &self,
        l: &LoraRef<'_, Self>,
        g: &LoraGrad<'_, Self>,
        xh: &CudaSlice<f16>,
        dyp: u64,
        dxp: Option<u64>,
        (m, k, n): (usize, usize, usize),
    ) -> Result<()> {
        let (r, out) = (l.a.shape[0], l.b.shape[0]);
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
                    &[&self.gpu.ptr(xh), &self.gpu.ptr(&out), &((m * k) as i64), &d.p, &d.seed, &d.stream],
                )?;
                dropped = out;
                &dropped
            }
            None => xh,
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
            (Some(dxp), None) => self.gemm.nn(half_mat(dhp, r), half_mat(ap, k), f32_mat(dxp, k), m, r, k, 1.0, 1.0)?,
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
        Ok(())
    }
}

impl LinearOps for Cuda {
    fn embedding(&self, table: &Self::Weight, ids: &Self::Ids) -> Result<Self::Tensor> {
        let (rows, d) = table.rows_cols();
        let n = ids.numel();
        let mut shape = ids.shape.clone();
        shape.push(d);
        let out = self.empty(&shape, Prec::F32)?;
        self.gpu.launch(
            "embedding",
            elementwise(n * d),
            &[
                &self.gpu.ptr(&table.buf),
                &self.gpu.ptr(&ids.buf),
                &self.ptr_t(&out),
                &(n as i64),
                &(d as i32),
                &(rows as i32),
            ],
        )?;
        Ok(out)
    }

    fn linear_to_impl(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: &[LoraRef<'_, Self>],
        out: Prec,
    ) -> Result<Self::Tensor> {
        let (n, _) = w.rows_cols();
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("rank ≥ 1") = n;
        let mut y = self.empty(&shape, out)?;
        self.product(x, w, lora, &mut y, false)?;
        Ok(y)
    }

    fn linear_add_impl(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: &[LoraRef<'_, Self>],
        acc: &mut Self::Tensor,
    ) -> Result<()> {
        self.product(x, w, lora, acc, true)
    }

    fn merge_lora_impl(&self, w: &Self::Weight, lora: &[LoraRef<'_, Self>]) -> Result<Self::Weight> {
        let (n, k) = w.rows_cols();
        let mut buf = self.gpu.alloc::<f16>(n * k)?;
        self.gpu.stream.memcpy_dtod(&w.buf, &mut buf).map_err(|e| anyhow::anyhow!("merge_lora: {e:?}"))?;
        let merged = CudaWeight { buf, shape: w.shape.clone() };
        for l in lora {
            let (r, out) = (l.a.shape[0], l.b.shape[0]);
            let made;
            let (a16, b16) = match l.shadow {
                Some((a, b)) => (a, b),
                None => {
                    made = (self.half_copy(l.a)?, self.half_copy(l.b)?);
                    (&made.0, &made.1)
                }
            };
            let rows = self.gpu.ptr(&merged.buf) + (l.col * k * 2) as u64;
            self.gemm.nn_half(self.ptr_t(b16), self.ptr_t(a16), rows, out, r, k, l.scale, 1.0)?;
        }
        Ok(merged)
    }

    fn matmul_copy(&self, t: &Self::Tensor) -> Result<Option<Self::Tensor>> {
        self.half_copy(t).map(Some)
    }

    fn affine_impl(&self, x: &Self::Tensor, w: &Self::Tensor, bias: Option<&Self::Tensor>) -> Result<Self::Tensor> {
        let (m, k) = x.rows_cols();
        let n = w.rows_cols().0;
        let (Buf::F32(wb), Some(Buf::F32(_)) | None) = (&w.buf, bias.map(|b| &b.buf)) else {
            bail!("affine expects f32 weights and bias")
        };
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("rank ≥ 1") = n;
        let y = self.empty(&shape, Prec::F32)?;
        let warps = m * n;
        let cfg = LaunchConfig {
            grid_dim: (warps.div_ceil(ELEMENTWISE_THREADS as usize / 32).clamp(1, 65535) as u32, 1, 1),
            block_dim: (ELEMENTWISE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let bp = bias.map(|b| self.ptr_t(b)).unwrap_or(0);
        self.gpu.launch(
            &format!("affine_narrow_{}", Self::suffix(x)),
            cfg,
            &[&self.ptr_t(x), &self.gpu.ptr(wb), &bp, &self.ptr_t(&y), &(m as i32), &(k as i32), &(n as i32)],
        )?;
        Ok(y)
    }

    /// `dx += dy · w` and `dw += dyᵀ · x` from one half copy of dy, then per LoRA branch (h = scale · dropout(x) · Aᵀ, dh = scale · dy[:, cols] · B):
    /// `gB += dy[:, cols]ᵀ · h`, `gA += dhᵀ · dropout(x)` and `dx += dropout(dh · A)`. The branch's
    /// column range of dy is read in place (a pointer offset and dy's row length).
    fn linear_backward_impl(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        lora: &[LoraRef<'_, Self>],
        dy: &CudaTensor,
        dx: Option<&mut CudaTensor>,
        dw: Option<&mut CudaTensor>,
        grads: &mut [LoraGrad<'_, Self>],
    ) -> Result<()> {
        let (m, k) = x.rows_cols();
        let n = w.rows_cols().0;
        let dxp = match dx.as_deref() {
            Some(t) => Some(self.grad_ptr(t, "linear_backward dx")?),
            None => None,
        };
        let dyh = self.as_half(dy)?;
        let dyp = self.gpu.ptr(&dyh);
        if let Some(dxp) = dxp {
            self.gemm.nn(half_mat(dyp, n), half_mat(self.gpu.ptr(&w.buf), k), f32_mat(dxp, k), m, n, k, 1.0, 1.0)?;
        }
        if dw.is_none() && lora.is_empty() {
            return Ok(());
        }
        let xh = self.as_half(x)?;
        if let Some(dw) = dw {
            let dwp = self.grad_ptr(dw, "linear_backward dw")?;
            self.gemm.tn(half_mat(dyp, n), half_mat(self.gpu.ptr(&xh), k), f32_mat(dwp, k), n, m, k, 1.0, 1.0)?;
        }
        for (l, g) in lora.iter().zip(grads.iter()) {
            self.lora_backward(l, g, &xh, dyp, dxp, (m, k, n))?;
        }
        Ok(())
    }

    fn affine_backward_impl(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        dy: &CudaTensor,
        dx: Option<&mut CudaTensor>,
        dw: &mut CudaTensor,
        db: Option<&mut CudaTensor>,
    ) -> Result<()> {
        let (m, k) = x.rows_cols();
        let n = w.rows_cols().0;
        let dyh = self.as_half(dy)?;
        let dyp = self.gpu.ptr(&dyh);
        if let Some(dx) = dx {
            let dxp = self.grad_ptr(dx, "affine_backward dx")?;
            let wh = self.as_half(w)?;
            self.gemm.nn(half_mat(dyp, n), half_mat(self.gpu.ptr(&wh), k), f32_mat(dxp, k), m, n, k, 1.0, 1.0)?;
        }
        let dwp = self.grad_ptr(dw, "affine_backward dw")?;
        let xh = self.as_half(x)?;
        self.gemm.tn(half_mat(dyp, n), half_mat(self.gpu.ptr(&xh), k), f32_mat(dwp, k), n, m, k, 1.0, 1.0)?;
        if let Some(db) = db {
            let dbp = self.grad_ptr(db, "affine_backward db")?;
            if n > 0 {
                self.gpu.launch(
                    &format!("column_sum_add_{}", Self::suffix(dy)),
                    blocks(n, ROW_THREADS)?,
                    &[&self.ptr_t(dy), &dbp, &(m as i64), &(n as i32)],
                )?;
            }
        }
        Ok(())
    }

    fn embedding_backward(&self, ids: &CudaIds, dy: &CudaTensor, d_table: &mut CudaTensor) -> Result<()> {
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

    fn set_weight_impl(&self, w: &mut CudaWeight, values: &CudaTensor) -> Result<()> {
        let n = values.numel();
        match &values.buf {
            Buf::F32(s) => {
                self.gpu.launch("cast_f32_f16", elementwise(n), &[&self.gpu.ptr(s), &self.gpu.ptr(&w.buf), &(n as i64)])
            }
            Buf::F16(s) => self.gpu.stream.memcpy_dtod(s, &mut w.buf).map_err(|e| anyhow::anyhow!("set_weight: {e:?}")),
        }
    }
}

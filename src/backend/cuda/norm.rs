//! The CUDA norms of kernels/norm.cu: RMS norm and LayerNorm, and the RMS norm's gradients.

use super::*;

impl NormOps for Cuda {
    fn layer_norm_impl(&self, x: &Self::Tensor, w: &Self::Weight, b: &Self::Weight, eps: f32) -> Result<Self::Tensor> {
        let (rows, d) = x.rows_cols();
        let y = self.empty(&x.shape, Prec::F32)?;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 };
        self.gpu.launch(
            &format!("layer_norm_{}", Self::suffix(x)),
            cfg,
            &[&self.ptr_t(x), &self.gpu.ptr(&w.buf), &self.gpu.ptr(&b.buf), &self.ptr_t(&y), &(d as i32), &eps],
        )?;
        Ok(y)
    }

    fn rms_norm_impl(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Result<Self::Tensor> {
        let (rows, d) = x.rows_cols();
        let y = self.empty(&x.shape, Prec::Half)?;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 };
        self.gpu.launch(
            &format!("rms_norm_{}", Self::suffix(x)),
            cfg,
            &[&self.ptr_t(x), &self.gpu.ptr(&w.buf), &self.ptr_t(&y), &(d as i32), &eps],
        )?;
        Ok(y)
    }

    fn rms_norm_backward_impl(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        eps: f32,
        dy: &CudaTensor,
        dx: &mut CudaTensor,
    ) -> Result<()> {
        let (rows, d) = x.rows_cols();
        let dxp = self.grad_ptr(dx, "rms_norm_backward dx")?;
        if rows == 0 {
            return Ok(());
        }
        self.gpu.launch(
            &format!("rms_norm_backward_{}_{}", Self::suffix(x), Self::suffix(dy)),
            blocks(rows, ROW_THREADS)?,
            &[&self.ptr_t(x), &self.gpu.ptr(&w.buf), &self.ptr_t(dy), &dxp, &(d as i32), &eps],
        )
    }

    /// Two launches: each row's inverse RMS, then column sums over chunks of rows.
    fn rms_norm_weight_grad_impl(&self, x: &CudaTensor, eps: f32, dy: &CudaTensor, dw: &mut CudaTensor) -> Result<()> {
        let (rows, d) = x.rows_cols();
        let dwp = self.grad_ptr(dw, "rms_norm_weight_grad dw")?;
        if rows == 0 || d == 0 {
            return Ok(());
        }
        let inverse = self.gpu.alloc::<f32>(rows)?;
        let ip = self.gpu.ptr(&inverse);
        self.gpu.launch(
            &format!("rms_inverse_{}", Self::suffix(x)),
            blocks(rows, ROW_THREADS)?,
            &[&self.ptr_t(x), &ip, &(d as i32), &eps],
        )?;
        let chunks = rows.div_ceil(RMS_ROWS as usize);
        ensure!(chunks <= 65535, "rms_norm_weight_grad: {rows} rows exceed the grid");
        let cfg = LaunchConfig {
            grid_dim: (d.div_ceil(ROW_THREADS as usize) as u32, chunks as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.gpu.launch(
            &format!("rms_weight_grad_{}_{}", Self::suffix(x), Self::suffix(dy)),
            cfg,
            &[&self.ptr_t(x), &self.ptr_t(dy), &ip, &dwp, &(rows as i64), &(d as i32)],
        )
    }
}

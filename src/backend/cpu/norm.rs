//! The CPU reference of RMS norm and LayerNorm, and the RMS norm's gradients.

use super::*;

impl NormOps for Cpu {
    fn layer_norm_impl(&self, x: &Self::Tensor, w: &Self::Weight, b: &Self::Weight, eps: f32) -> Result<Self::Tensor> {
        let (_, d) = x.rows_cols();
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

    fn rms_norm_impl(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Result<Self::Tensor> {
        let (_, d) = x.rows_cols();
        let mut y = x.data.clone();
        y.par_chunks_mut(d.max(1)).for_each(|row| {
            let var = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + eps).sqrt();
            row.iter_mut().zip(&w.data).for_each(|(v, g)| *v = *v * inv * g);
        });
        CpuTensor::new(y, &x.shape)
    }

    fn rms_norm_backward_impl(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
        dy: &Self::Tensor,
        dx: &mut Self::Tensor,
    ) -> Result<()> {
        let (_, d) = x.rows_cols();
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

    fn rms_norm_weight_grad_impl(
        &self,
        x: &Self::Tensor,
        eps: f32,
        dy: &Self::Tensor,
        dw: &mut Self::Tensor,
    ) -> Result<()> {
        let (_, d) = x.rows_cols();
        for (xr, gr) in x.data.chunks(d).zip(dy.data.chunks(d)) {
            let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
            dw.data.iter_mut().zip(xr).zip(gr).for_each(|((w, x), g)| *w += g * x * r);
        }
        Ok(())
    }
}

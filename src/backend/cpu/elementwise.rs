//! The CPU reference of element-wise arithmetic, activations (one `gelu_new` for forward and
//! backward), gated-gelu with its fused dropout, and dropout.

use super::*;

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
pub fn apply_dropout(x: &[f32], d: &Dropout) -> Vec<f32> {
    let scale = 1.0 / (1.0 - d.p);
    let key = dropout_key(d.seed, d.stream);
    x.iter().enumerate().map(|(i, &v)| if dropout_keep(d.p, key, i as u64) { v * scale } else { 0.0 }).collect()
}

impl ElementwiseOps for Cpu {
    fn bias_add_impl(&self, x: &mut Self::Tensor, bias: &Self::Weight) -> Result<()> {
        let (_, d) = x.rows_cols();
        x.data.chunks_mut(d.max(1)).for_each(|row| row.iter_mut().zip(&bias.data).for_each(|(v, b)| *v += b));
        Ok(())
    }

    fn activation(&self, x: &Self::Tensor, act: Activation) -> Result<Self::Tensor> {
        let f = match act {
            Activation::GeluErf => gelu_erf,
            Activation::GeluNew => gelu_new,
            Activation::Tanh => f32::tanh,
        };
        CpuTensor::new(x.data.iter().map(|&v| f(v)).collect(), &x.shape)
    }

    fn scale_assign(&self, x: &mut Self::Tensor, s: f32) -> Result<()> {
        x.data.iter_mut().for_each(|v| *v *= s);
        Ok(())
    }

    fn add_assign_impl(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()> {
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn gated_gelu_impl(&self, gate_up: &Self::Tensor, dropout: Option<Dropout>) -> Result<Self::Tensor> {
        let (_, d2) = gate_up.rows_cols();
        let f = d2 / 2;
        let mut y: Vec<f32> =
            gate_up.data.chunks(d2.max(1)).flat_map(|r| (0..f).map(move |i| gelu_new(r[i]) * r[f + i])).collect();
        if let Some(d) = dropout {
            let key = d.key();
            y.iter_mut().enumerate().for_each(|(i, v)| *v *= dropout_factor(d.p, key, i as u64));
        }
        CpuTensor::new(y, &out_shape(&gate_up.shape, f))
    }

    fn dropout(&self, x: &Self::Tensor, d: &Dropout) -> Result<Self::Tensor> {
        CpuTensor::new(apply_dropout(&x.data, d), &x.shape)
    }

    fn dropout_add_impl(&self, acc: &mut Self::Tensor, x: &Self::Tensor, d: &Dropout) -> Result<()> {
        let key = d.key();
        acc.data
            .iter_mut()
            .zip(&x.data)
            .enumerate()
            .for_each(|(i, (a, v))| *a += v * dropout_factor(d.p, key, i as u64));
        Ok(())
    }

    fn gated_gelu_backward_impl(
        &self,
        gate_up: &Self::Tensor,
        dy: &Self::Tensor,
        dropout: Option<Dropout>,
    ) -> Result<Self::Tensor> {
        let (rows, d2) = gate_up.rows_cols();
        let f = d2 / 2;
        let (p, key) = dropout.map_or((0.0, 0), |d| (d.p, d.key()));
        let mut out = vec![0.0; rows * d2];
        for (r, ((o, gu), g)) in out.chunks_mut(d2).zip(gate_up.data.chunks(d2)).zip(dy.data.chunks(f)).enumerate() {
            for i in 0..f {
                let g = g[i] * dropout_factor(p, key, (r * f + i) as u64);
                o[i] = g * gu[f + i] * gelu_new_grad(gu[i]);
                o[f + i] = g * gelu_new(gu[i]);
            }
        }
        CpuTensor::new(out, &gate_up.shape)
    }
}

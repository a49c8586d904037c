//! The CPU reference of Adam (torch's order of operations), Adafactor (transformers' order) and Σx².

use super::*;
use crate::backend::{AdafactorSlot, AdafactorStep};

/// One element of torch.optim.Adam's update (no weight decay), in torch's order of operations.
pub fn adam_element(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, f: &crate::backend::AdamFactors) {
    *p *= f.decay;
    // torch's lerp(m, g, 1 − β₁) takes this branch for weights below one half.
    *m += f.w1 * (g - *m);
    *v = *v * f.beta2 + f.w2 * g * g;
    let denom = v.sqrt() / f.bc2_sqrt + f.eps;
    *p += f.neg_step * *m / denom;
}

/// √(Σx² / n), accumulated in f64.
fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len().max(1) as f64).sqrt() as f32
}

/// One Adafactor tensor (a part of a slot): `p`, `g` (already scaled) and, when `cols` is set, the
/// factored row statistics `row` and column statistics `col` of `[rows, cols]`; otherwise `row`
/// is the unfactored second moment.
struct Part<'a> {
    p: &'a mut [f32],
    g: &'a [f32],
    row: &'a mut [f32],
    col: Option<(&'a mut [f32], usize)>,
    m: Option<&'a mut [f32]>,
}

/// transformers' `Adafactor.step` for one tensor, in its order of operations.
fn adafactor_part(t: Part<'_>, h: &AdafactorStep, weight_decay: f64) {
    let Part { p, g, row, col, m } = t;
    let param_scale = if h.options.scale_parameter { (h.options.eps2 as f32).max(rms(p)) } else { 1.0 };
    let lr = param_scale * h.relative_lr() as f32;
    let b2 = h.beta2t() as f32;
    let w2 = (1.0 - h.beta2t()) as f32;
    let eps1 = h.options.eps1 as f32;
    let mut u = vec![0f32; p.len()];
    match col {
        Some((col, cols)) => {
            let rows = row.len();
            for (r, gr) in g.chunks(cols).enumerate() {
                let mean = gr.iter().map(|&x| (x * x + eps1) as f64).sum::<f64>() / cols as f64;
                row[r] = row[r] * b2 + mean as f32 * w2;
            }
            for c in 0..cols {
                let mean = (0..rows).map(|r| (g[r * cols + c] * g[r * cols + c] + eps1) as f64).sum::<f64>();
                col[c] = col[c] * b2 + (mean / rows as f64) as f32 * w2;
            }
            let row_mean = (row.iter().map(|&x| x as f64).sum::<f64>() / rows as f64) as f32;
            for (r, ur) in u.chunks_mut(cols).enumerate() {
                let rf = 1.0 / (row[r] / row_mean).sqrt();
                for (c, x) in ur.iter_mut().enumerate() {
                    *x = rf * (1.0 / col[c].sqrt()) * g[r * cols + c];
                }
            }
        }
        None => {
            for ((v, x), &gi) in row.iter_mut().zip(u.iter_mut()).zip(g) {
                *v = *v * b2 + (gi * gi + eps1) * w2;
                *x = (1.0 / v.sqrt()) * gi;
            }
        }
    }
    let clip = (rms(&u) / h.options.clip_threshold as f32).max(1.0);
    u.iter_mut().for_each(|x| *x = *x / clip * lr);
    if let (Some(m), Some(beta1)) = (m, h.options.beta1) {
        let (b1, w1) = (beta1 as f32, (1.0 - beta1) as f32);
        for (mi, x) in m.iter_mut().zip(u.iter_mut()) {
            *mi = *mi * b1 + *x * w1;
            *x = *mi;
        }
    }
    let decay = -(weight_decay as f32) * lr;
    for (pi, x) in p.iter_mut().zip(&u) {
        if weight_decay != 0.0 {
            *pi += *pi * decay;
        }
        *pi -= x;
    }
}

impl OptimOps for Cpu {
    fn adafactor_impl(&self, slots: &mut [AdafactorSlot<'_, Self>], h: &AdafactorStep) -> Result<()> {
        for s in slots.iter_mut() {
            let g: Vec<f32> = s.g.data.iter().map(|x| x * h.grad_scale).collect();
            let shape = s.p.shape.clone();
            let cols = if shape.len() == 2 { shape[1] } else { 0 };
            let mut m = s.m.as_deref_mut().map(|m| m.data.as_mut_slice());
            let (mut p, mut gs, mut row, mut col) =
                (s.p.data.as_mut_slice(), g.as_slice(), s.row.data.as_mut_slice(), s.col.data.as_mut_slice());
            for &rows in &s.parts {
                let n = if cols == 0 { rows } else { rows * cols };
                let (p_k, p_rest) = std::mem::take(&mut p).split_at_mut(n);
                let (g_k, g_rest) = gs.split_at(n);
                let (row_k, row_rest) = std::mem::take(&mut row).split_at_mut(rows);
                let (col_k, col_rest) = std::mem::take(&mut col).split_at_mut(cols);
                let m_k = match m.take() {
                    Some(mm) => {
                        let (a, b) = mm.split_at_mut(n);
                        m = Some(b);
                        Some(a)
                    }
                    None => None,
                };
                let col_k = (cols > 0).then_some((col_k, cols));
                adafactor_part(Part { p: p_k, g: g_k, row: row_k, col: col_k, m: m_k }, h, s.weight_decay);
                (p, gs, row, col) = (p_rest, g_rest, row_rest, col_rest);
            }
            if let Some(c) = s.copy.as_mut() {
                c.data.copy_from_slice(&s.p.data);
            }
        }
        Ok(())
    }

    fn adam_impl(&self, slots: &mut [AdamSlot<'_, Self>], h: &AdamStep) -> Result<()> {
        for s in slots.iter_mut() {
            let (p, g, m, v) = (&mut *s.p, s.g, &mut *s.m, &mut *s.v);
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

    fn sum_squares(&self, xs: &[&Self::Tensor]) -> Result<f64> {
        Ok(xs.iter().flat_map(|x| &x.data).map(|&v| (v as f64) * (v as f64)).sum())
    }

    fn zero_grads(&self, xs: &mut [&mut Self::Tensor]) -> Result<()> {
        xs.iter_mut().for_each(|x| x.data.fill(0.0));
        Ok(())
    }
}

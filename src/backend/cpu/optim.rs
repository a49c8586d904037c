//! The CPU reference of Adam (torch's order of operations) and Σx².

use super::*;

/// One element of torch.optim.Adam's update (no weight decay), in torch's order of operations.
pub fn adam_element(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, f: &crate::backend::AdamFactors) {
    *p *= f.decay;
    // torch's lerp(m, g, 1 − β₁) takes this branch for weights below one half.
    *m += f.w1 * (g - *m);
    *v = *v * f.beta2 + f.w2 * g * g;
    let denom = v.sqrt() / f.bc2_sqrt + f.eps;
    *p += f.neg_step * *m / denom;
}

impl OptimOps for Cpu {
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
}

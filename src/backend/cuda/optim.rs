//! The CUDA optimiser of kernels/optim.cu: multi-tensor Adam and Σx², each one launch a step.

use super::*;
use crate::backend::AdamFactors;

/// Values one block of `adam_multi` updates.
const ADAM_VALUES_PER_BLOCK: u64 = (ADAM_THREADS * ADAM_PER_THREAD) as u64;
/// Values one block of `sum_squares_multi` reads.
const SUM_SQUARES_VALUES_PER_BLOCK: u64 = (SUM_SQUARES_THREADS * SUM_SQUARES_PER_THREAD) as u64;

impl OptimOps for Cuda {
    /// Every slot in one launch: a table of the tensors (kernels/optim.cu's `AdamTensor`, eight
    /// 64-bit words each) goes up with the launch, and each block finds its tensor in it.
    fn adam_impl(&self, slots: &mut [AdamSlot<'_, Cuda>], h: &AdamStep) -> Result<()> {
        let mut table: Vec<u64> = Vec::with_capacity(slots.len() * 8);
        let mut blocks = 0u64;
        for (i, s) in slots.iter_mut().enumerate() {
            let n = s.g.numel();
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
        let cfg =
            LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (ADAM_THREADS, 1, 1), shared_mem_bytes: 0 };
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

    /// Every tensor in one launch (kernels/optim.cu's `SumSquaresTensor`, four 64-bit words
    /// each); each block writes one partial sum, and the host adds them once, in order.
    fn sum_squares(&self, xs: &[&CudaTensor]) -> Result<f64> {
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
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (SUM_SQUARES_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let count = (table.len() / 4) as i32;
        self.gpu.launch("sum_squares_multi", cfg, &[&self.gpu.ptr(&table_dev), &count, &self.gpu.ptr(&partial)])?;
        Ok(self.gpu.download(&partial, blocks as usize)?.iter().sum())
    }
}

//! The CUDA optimiser of kernels/optim.cu: multi-tensor Adam, Σx² and zeroing, each one launch a step;
//! multi-tensor Adafactor, one launch for each of its passes, with its reductions on the device.

use super::*;
use crate::backend::{AdafactorSlot, AdafactorStep, AdamFactors};

/// Values one block of `adam_multi` updates.
const ADAM_VALUES_PER_BLOCK: u64 = (ADAM_THREADS * ADAM_PER_THREAD) as u64;
/// Values one block of `sum_squares_multi` or `zero_multi` takes.
const SPAN_VALUES_PER_BLOCK: u64 = (SPAN_THREADS * SPAN_PER_THREAD) as u64;

impl OptimOps for Cuda {
    /// Every part of every slot in each of kernels/optim.cu's Adafactor passes, one launch a pass: a
    /// table of the parts (`AdafactorTensor`, sixteen 64-bit words each, a part's pointers being
    /// offsets into its slot's buffers) goes up with the step, and each block finds its part in it.
    fn adafactor_impl(&self, slots: &mut [AdafactorSlot<'_, Cuda>], h: &AdafactorStep) -> Result<()> {
        const F32: u64 = 4;
        const F16: u64 = 2;
        let threads = ADAFACTOR_THREADS as usize;
        let per_block = ADAFACTOR_PER_BLOCK as usize;
        let mut table: Vec<u64> = Vec::new();
        // Running first blocks of the launches, and the column partials' running offset.
        let (mut stats, mut colp, mut cols_b, mut elem, mut partials) = (0usize, 0usize, 0usize, 0usize, 0usize);
        for (i, s) in slots.iter_mut().enumerate() {
            let shape = s.p.shape().to_vec();
            let cols = if shape.len() == 2 { shape[1] } else { 0 };
            let p = self.grad_ptr(s.p, "adafactor p")?;
            let g = self.grad_ptr(s.g, "adafactor g")?;
            let row = self.grad_ptr(s.row, "adafactor row")?;
            let col = if cols > 0 { self.grad_ptr(s.col, "adafactor col")? } else { 0 };
            let m = match s.m.as_deref() {
                Some(m) => self.grad_ptr(m, "adafactor m")?,
                None => 0,
            };
            let copy = match s.copy.as_deref() {
                Some(CudaTensor { buf: Buf::F16(c), .. }) if c.len() >= s.p.numel() => self.gpu.ptr(c),
                Some(_) => bail!("adafactor: tensor {i}'s copy is not a half tensor of its size"),
                None => 0,
            };
            let (mut at, mut at_row) = (0u64, 0u64);
            for (k, &rows) in s.parts.iter().enumerate() {
                let n = if cols > 0 { rows * cols } else { rows };
                if n == 0 {
                    continue;
                }
                let offset = |base: u64, by: u64, size: u64| if base != 0 { base + by * size } else { 0 };
                let (col_blocks, chunks) = (cols.div_ceil(threads), rows.div_ceil(ADAFACTOR_COL_ROWS as usize));
                table.extend([
                    p + at * F32,
                    g + at * F32,
                    row + at_row * F32,
                    offset(col, (k * cols) as u64, F32),
                    offset(m, at, F32),
                    offset(copy, at, F16),
                    rows as u64,
                    cols as u64,
                    n as u64,
                    (s.weight_decay as f32).to_bits() as u64,
                    stats as u64,
                    colp as u64,
                    cols_b as u64,
                    elem as u64,
                    partials as u64,
                    0,
                ]);
                stats += if cols > 0 { rows } else { n.div_ceil(per_block) };
                if cols > 0 {
                    colp += col_blocks * chunks;
                    cols_b += col_blocks;
                    partials += chunks * cols;
                }
                elem += n.div_ceil(per_block);
                at += n as u64;
                at_row += rows as u64;
            }
        }
        let count = table.len() / 16;
        if count == 0 {
            return Ok(());
        }
        let ts = self.gpu.upload(&table)?;
        let tp = self.gpu.ptr(&ts);
        let count_i = count as i32;
        let grid = |blocks: usize| LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (ADAFACTOR_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (b2, w2) = (h.beta2t() as f32, (1.0 - h.beta2t()) as f32);
        let eps1 = h.options.eps1 as f32;
        let scal = self.gpu.alloc::<f32>(4 * count)?;
        let psq = self.gpu.alloc::<f64>(stats)?;
        let usq = self.gpu.alloc::<f64>(elem)?;
        let (scal_p, psq_p, usq_p) = (self.gpu.ptr(&scal), self.gpu.ptr(&psq), self.gpu.ptr(&usq));
        self.gpu.launch(
            "adafactor_stats_multi",
            grid(stats),
            &[&tp, &count_i, &h.grad_scale, &eps1, &b2, &w2, &psq_p],
        )?;
        if colp > 0 {
            let partial = self.gpu.alloc::<f64>(partials)?;
            let partial_p = self.gpu.ptr(&partial);
            let cfg = grid(colp);
            self.gpu.launch("adafactor_col_partials_multi", cfg, &[&tp, &count_i, &h.grad_scale, &eps1, &partial_p])?;
            self.gpu.launch("adafactor_cols_multi", grid(cols_b), &[&tp, &count_i, &partial_p, &b2, &w2])?;
        }
        let rel = h.relative_lr() as f32;
        let scale_parameter = h.options.scale_parameter as i32;
        let eps2 = h.options.eps2 as f32;
        self.gpu.launch("adafactor_rate_multi", grid(count), &[&tp, &psq_p, &rel, &scale_parameter, &eps2, &scal_p])?;
        self.gpu.launch("adafactor_update_sq_multi", grid(elem), &[&tp, &count_i, &scal_p, &h.grad_scale, &usq_p])?;
        let clip = h.options.clip_threshold as f32;
        self.gpu.launch("adafactor_clip_multi", grid(count), &[&tp, &usq_p, &clip, &scal_p])?;
        let beta1 = h.options.beta1.unwrap_or(0.0);
        let (b1, w1) = (beta1 as f32, (1.0 - beta1) as f32);
        self.gpu.launch("adafactor_apply_multi", grid(elem), &[&tp, &count_i, &scal_p, &h.grad_scale, &b1, &w1])
    }

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
        let Some((table, count, cfg)) = self.spans(xs.iter().copied())? else { return Ok(0.0) };
        let blocks = cfg.grid_dim.0 as usize;
        let partial = self.gpu.alloc::<f64>(blocks)?;
        self.gpu.launch("sum_squares_multi", cfg, &[&self.gpu.ptr(&table), &count, &self.gpu.ptr(&partial)])?;
        Ok(self.gpu.download(&partial, blocks)?.iter().sum())
    }

    fn zero_grads(&self, xs: &mut [&mut CudaTensor]) -> Result<()> {
        if let Some((table, count, cfg)) = self.spans(xs.iter().map(|x| &**x))? {
            self.gpu.launch("zero_multi", cfg, &[&self.gpu.ptr(&table), &count])?;
        }
        Ok(())
    }
}

impl Cuda {
    /// The `TensorSpan` table (kernels/optim.cu) of the non-empty tensors of `xs` on the device,
    /// its length, and the launch that gives each tensor its blocks; None when every one is empty.
    fn spans<'a>(
        &self,
        xs: impl Iterator<Item = &'a CudaTensor>,
    ) -> Result<Option<(CudaSlice<u64>, i32, LaunchConfig)>> {
        let mut table: Vec<u64> = Vec::new();
        let mut blocks = 0u64;
        for x in xs.filter(|x| x.numel() > 0) {
            let n = x.numel() as u64;
            table.extend([self.ptr_t(x), n, blocks, matches!(x.buf, Buf::F16(_)) as u64]);
            blocks += n.div_ceil(SPAN_VALUES_PER_BLOCK);
        }
        if blocks == 0 {
            return Ok(None);
        }
        let cfg =
            LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (SPAN_THREADS, 1, 1), shared_mem_bytes: 0 };
        Ok(Some((self.gpu.upload(&table)?, (table.len() / 4) as i32, cfg)))
    }
}

//! The CUDA optimiser of kernels/optim.cu: multi-tensor Adam and Σx², each one launch a step;
//! Adafactor, a few launches per tensor with its reductions on the device.

use super::*;
use crate::backend::{AdafactorSlot, AdafactorStep, AdamFactors};

/// One Adafactor tensor (a part of a slot) as device addresses: `cols` 0 for an unfactored part.
struct AdafactorPart {
    p: u64,
    g: u64,
    row: u64,
    col: u64,
    m: u64,
    copy: u64,
    rows: usize,
    cols: usize,
    n: usize,
    weight_decay: f32,
}

/// Values one block of `adam_multi` updates.
const ADAM_VALUES_PER_BLOCK: u64 = (ADAM_THREADS * ADAM_PER_THREAD) as u64;
/// Values one block of `sum_squares_multi` reads.
const SUM_SQUARES_VALUES_PER_BLOCK: u64 = (SUM_SQUARES_THREADS * SUM_SQUARES_PER_THREAD) as u64;

impl Cuda {
    /// transformers' `Adafactor.step` for one part: kernels/optim.cu's passes in order, the part's
    /// scalars (rate, row mean, clip divisor) kept on the device.
    fn adafactor_part(&self, t: &AdafactorPart, h: &AdafactorStep) -> Result<()> {
        let threads = ADAFACTOR_THREADS;
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let grid = |blocks: usize| LaunchConfig {
            grid_dim: (blocks.max(1) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (b2, w2) = (h.beta2t() as f32, (1.0 - h.beta2t()) as f32);
        let eps1 = h.options.eps1 as f32;
        let (n, rows, cols) = (t.n as i64, t.rows as i64, t.cols as i64);
        let blocks = t.n.div_ceil(ADAFACTOR_PER_BLOCK as usize);
        let scal = self.gpu.alloc::<f32>(4)?;
        let scal_p = self.gpu.ptr(&scal);
        let (psq, psq_count, row_count) = if t.cols > 0 {
            let psq = self.gpu.alloc::<f64>(t.rows)?;
            self.gpu.launch(
                "adafactor_rows",
                grid(t.rows),
                &[&t.g, &t.p, &t.row, &cols, &h.grad_scale, &eps1, &b2, &w2, &self.gpu.ptr(&psq)],
            )?;
            let chunks = t.rows.div_ceil(ADAFACTOR_COL_ROWS as usize);
            let partial = self.gpu.alloc::<f64>(chunks * t.cols)?;
            let col_blocks = t.cols.div_ceil(threads as usize) as u32;
            let cfg = LaunchConfig {
                grid_dim: (col_blocks, chunks as u32, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let partial_p = self.gpu.ptr(&partial);
            self.gpu.launch("adafactor_col_partials", cfg, &[&t.g, &rows, &cols, &h.grad_scale, &eps1, &partial_p])?;
            self.gpu.launch(
                "adafactor_cols",
                grid(col_blocks as usize),
                &[&partial_p, &(chunks as i64), &rows, &cols, &t.col, &b2, &w2],
            )?;
            (psq, t.rows, rows)
        } else {
            let psq = self.gpu.alloc::<f64>(blocks)?;
            self.gpu.launch(
                "adafactor_vec",
                grid(blocks),
                &[&t.g, &t.p, &t.row, &n, &h.grad_scale, &eps1, &b2, &w2, &self.gpu.ptr(&psq)],
            )?;
            (psq, blocks, 0i64)
        };
        let rel = h.relative_lr() as f32;
        self.gpu.launch(
            "adafactor_rate",
            one,
            &[
                &self.gpu.ptr(&psq),
                &(psq_count as i64),
                &n,
                &t.row,
                &row_count,
                &rel,
                &(h.options.scale_parameter as i32),
                &(h.options.eps2 as f32),
                &scal_p,
            ],
        )?;
        let usq = self.gpu.alloc::<f64>(blocks)?;
        let usq_p = self.gpu.ptr(&usq);
        self.gpu.launch(
            "adafactor_update_sq",
            grid(blocks),
            &[&t.g, &t.row, &t.col, &cols, &n, &scal_p, &h.grad_scale, &usq_p],
        )?;
        self.gpu.launch(
            "adafactor_clip",
            one,
            &[&usq_p, &(blocks as i64), &n, &(h.options.clip_threshold as f32), &scal_p],
        )?;
        let beta1 = h.options.beta1.unwrap_or(0.0);
        self.gpu.launch(
            "adafactor_apply",
            grid(blocks),
            &[
                &t.p,
                &t.g,
                &t.row,
                &t.col,
                &cols,
                &n,
                &t.m,
                &t.copy,
                &scal_p,
                &h.grad_scale,
                &(beta1 as f32),
                &((1.0 - beta1) as f32),
                &t.weight_decay,
            ],
        )
    }
}

impl OptimOps for Cuda {
    /// Each slot part by part (`adafactor_part`); a part's pointers are offsets into its slot's
    /// buffers.
    fn adafactor_impl(&self, slots: &mut [AdafactorSlot<'_, Cuda>], h: &AdafactorStep) -> Result<()> {
        const F32: u64 = 4;
        const F16: u64 = 2;
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
                let part = AdafactorPart {
                    p: p + at * F32,
                    g: g + at * F32,
                    row: row + at_row * F32,
                    col: if cols > 0 { col + (k * cols) as u64 * F32 } else { 0 },
                    m: if m != 0 { m + at * F32 } else { 0 },
                    copy: if copy != 0 { copy + at * F16 } else { 0 },
                    rows,
                    cols,
                    n,
                    weight_decay: s.weight_decay as f32,
                };
                self.adafactor_part(&part, h)?;
                at += n as u64;
                at_row += rows as u64;
            }
        }
        Ok(())
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

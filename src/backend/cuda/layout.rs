//! The CUDA data movement of kernels/layout.cu: splits and concatenations of the last dimension,
//! row gathers, KV-cache appends and counters, and device-to-device copies.

use super::*;

/// Mirrors `SplitParams` in kernels/elementwise.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SplitParams {
    out: [u64; 4],
    width: [i32; 4],
    pieces: i32,
}
// SAFETY: plain old data with the kernel's layout.
unsafe impl DeviceRepr for SplitParams {}

impl LayoutOps for Cuda {
    fn split_last_impl(&self, x: &Self::Tensor, widths: &[usize]) -> Result<Vec<Self::Tensor>> {
        let (rows, d) = x.rows_cols();
        ensure!((1..=4).contains(&widths.len()), "split_last: 1 to 4 pieces, not {}", widths.len());
        let prec = if matches!(x.buf, Buf::F16(_)) { Prec::Half } else { Prec::F32 };
        let pieces: Vec<CudaTensor> = widths
            .iter()
            .map(|&w| {
                let mut shape = x.shape.clone();
                *shape.last_mut().expect("rank ≥ 1") = w;
                self.empty(&shape, prec)
            })
            .collect::<Result<_>>()?;
        let elem = if prec == Prec::Half { 2 } else { 4 };
        let per_unit = 16 / elem;
        let vec = widths.iter().all(|w| w % per_unit == 0);
        let unit = if vec { per_unit } else { 1 };
        let mut params = SplitParams { out: [0; 4], width: [0; 4], pieces: widths.len() as i32 };
        for (i, (p, &w)) in pieces.iter().zip(widths).enumerate() {
            params.out[i] = self.ptr_t(p);
            params.width[i] = (w / unit) as i32;
        }
        let name = if vec { "split_last_vec".to_string() } else { format!("split_last_{}", Self::suffix(x)) };
        self.gpu.launch(
            &name,
            elementwise(rows * d / unit),
            &[&self.ptr_t(x), &params, &(rows as i64), &((d / unit) as i32)],
        )?;
        Ok(pieces)
    }

    fn concat_last_impl(&self, pieces: &[&CudaTensor]) -> Result<CudaTensor> {
        let rows = pieces[0].rows_cols().0;
        let width: usize = pieces.iter().map(|p| p.rows_cols().1).sum();
        let mut shape = pieces[0].shape.clone();
        *shape.last_mut().expect("rank ≥ 1") = width;
        let out = self.empty(&shape, Prec::F32)?;
        let mut col = 0;
        for p in pieces {
            let w = p.rows_cols().1;
            self.gpu.launch(
                &format!("concat_piece_{}", Self::suffix(p)),
                elementwise(rows * w),
                &[&self.ptr_t(p), &self.ptr_t(&out), &(rows as i64), &(w as i32), &(width as i32), &(col as i32)],
            )?;
            col += w;
        }
        Ok(out)
    }

    fn gather_rows(&self, x: &Self::Tensor, rows: &Self::Ids) -> Result<Self::Tensor> {
        let (n, d) = x.rows_cols();
        let m = rows.numel();
        let host = self.download_ids(rows)?;
        ensure!(host.iter().all(|&r| (r as usize) < n), "gather_rows: a row index is outside 0..{n}");
        let prec = if matches!(x.buf, Buf::F16(_)) { Prec::Half } else { Prec::F32 };
        let y = self.empty(&[m, d], prec)?;
        self.gpu.launch(
            &format!("gather_rows_{}", Self::suffix(x)),
            elementwise(m * d),
            &[&self.ptr_t(x), &self.gpu.ptr(&rows.buf), &self.ptr_t(&y), &(m as i64), &(d as i32)],
        )?;
        Ok(y)
    }

    fn write_rows(&self, dst: &mut Self::Tensor, src: &Self::Tensor, pos: Position<'_, Self>) -> Result<()> {
        ensure!(
            dst.shape.len() == 3
                && src.shape.len() == 3
                && dst.shape[0] == src.shape[0]
                && dst.shape[2] == src.shape[2],
            "write_rows: {:?} into {:?}",
            src.shape,
            dst.shape
        );
        let (b, cap, d) = (dst.shape[0], dst.shape[1], dst.shape[2]);
        let n = src.shape[1];
        let (pos, counter) = self.position(pos);
        ensure!(pos as usize + n <= cap, "write_rows: rows {pos}..{} past capacity {cap}", pos as usize + n);
        let name = format!("write_rows_{}_{}", Self::suffix(dst), Self::suffix(src));
        self.gpu.launch(
            &name,
            elementwise(b * n * d),
            &[&self.ptr_t(dst), &self.ptr_t(src), &(b as i32), &(cap as i32), &(n as i32), &(d as i32), &pos, &counter],
        )
    }

    fn write_ids(&self, dst: &mut Self::Ids, src: &Self::Ids, pos: Position<'_, Self>) -> Result<()> {
        let (b, cap) = (dst.shape[0], dst.shape.get(1).copied().unwrap_or(1));
        let n = src.shape.get(1).copied().unwrap_or(1);
        ensure!(src.shape[0] == b, "write_ids: {:?} into {:?}", src.shape, dst.shape);
        let (pos, counter) = self.position(pos);
        ensure!(pos as usize + n <= cap, "write_ids: columns {pos}..{} past capacity {cap}", pos as usize + n);
        self.gpu.launch(
            "write_ids",
            elementwise(b * n),
            &[
                &self.gpu.ptr(&dst.buf),
                &self.gpu.ptr(&src.buf),
                &(b as i32),
                &(cap as i32),
                &(n as i32),
                &pos,
                &counter,
            ],
        )
    }

    fn advance(&self, counter: &mut Self::Ids, n: u32) -> Result<()> {
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        self.gpu.launch("advance", cfg, &[&self.gpu.ptr(&counter.buf), &n])
    }

    fn copy_into_impl(&self, dst: &mut Self::Tensor, offset: usize, src: &Self::Tensor) -> Result<()> {
        let n = src.numel();
        match (&mut dst.buf, &src.buf) {
            (Buf::F32(d), Buf::F32(s)) => {
                let mut view = d.slice_mut(offset..offset + n);
                self.gpu.stream.memcpy_dtod(&s.slice(0..n), &mut view)
            }
            (Buf::F16(d), Buf::F16(s)) => {
                let mut view = d.slice_mut(offset..offset + n);
                self.gpu.stream.memcpy_dtod(&s.slice(0..n), &mut view)
            }
            _ => bail!("copy_into: source and destination differ in precision"),
        }
        .map_err(|e| anyhow::anyhow!("copy_into: {e:?}"))
    }
}

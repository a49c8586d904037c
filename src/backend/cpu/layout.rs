//! The CPU reference of data movement: splits and concatenations of the last dimension, row
//! gathers, KV-cache appends and counters.

use super::*;

/// `dst [b, cap, d]` rows `pos..pos + n` ← `src [b, n, d]`.
fn write_rows_of<T: Copy>(dst: &mut [T], dshape: &[usize], src: &[T], sshape: &[usize], pos: usize) -> Result<()> {
    ensure!(
        dshape.len() == 3 && sshape.len() == 3 && dshape[0] == sshape[0] && dshape[2] == sshape[2],
        "write_rows: {sshape:?} into {dshape:?}"
    );
    let (b, cap, d) = (dshape[0], dshape[1], dshape[2]);
    let n = sshape[1];
    ensure!(pos + n <= cap, "write_rows: rows {pos}..{} past capacity {cap}", pos + n);
    for bi in 0..b {
        dst[(bi * cap + pos) * d..(bi * cap + pos + n) * d].copy_from_slice(&src[bi * n * d..(bi + 1) * n * d]);
    }
    Ok(())
}

impl LayoutOps for Cpu {
    fn split_last_impl(&self, x: &Self::Tensor, widths: &[usize]) -> Result<Vec<Self::Tensor>> {
        let (rows, d) = x.rows_cols();
        let mut col = 0;
        widths
            .iter()
            .map(|&w| {
                let data: Vec<f32> =
                    (0..rows).flat_map(|r| x.data[r * d + col..r * d + col + w].iter().copied()).collect();
                col += w;
                CpuTensor::new(data, &out_shape(&x.shape, w))
            })
            .collect()
    }

    fn gather_rows(&self, x: &Self::Tensor, rows: &Self::Ids) -> Result<Self::Tensor> {
        let (n, d) = x.rows_cols();
        let mut out = Vec::with_capacity(rows.data.len() * d);
        for &r in &rows.data {
            ensure!((r as usize) < n, "gather_rows: row {r} of {n}");
            out.extend_from_slice(&x.data[r as usize * d..(r as usize + 1) * d]);
        }
        CpuTensor::new(out, &[rows.data.len(), d])
    }

    fn write_rows(&self, dst: &mut Self::Tensor, src: &Self::Tensor, pos: Position<'_, Self>) -> Result<()> {
        write_rows_of(&mut dst.data, &dst.shape, &src.data, &src.shape, at(pos))
    }

    fn write_ids(&self, dst: &mut Self::Ids, src: &Self::Ids, pos: Position<'_, Self>) -> Result<()> {
        let dshape = [dst.shape[0], dst.shape.get(1).copied().unwrap_or(1), 1];
        let sshape = [src.shape[0], src.shape.get(1).copied().unwrap_or(1), 1];
        write_rows_of(&mut dst.data, &dshape, &src.data, &sshape, at(pos))
    }

    fn advance(&self, counter: &mut Self::Ids, n: u32) -> Result<()> {
        counter.data[0] += n;
        Ok(())
    }

    fn copy_into_impl(&self, dst: &mut Self::Tensor, offset: usize, src: &Self::Tensor) -> Result<()> {
        let n = src.data.len();
        dst.data[offset..offset + n].copy_from_slice(&src.data);
        Ok(())
    }

    fn concat_last_impl(&self, pieces: &[&Self::Tensor]) -> Result<Self::Tensor> {
        let rows = pieces[0].rows_cols().0;
        let width: usize = pieces.iter().map(|p| p.rows_cols().1).sum();
        let mut out = Vec::with_capacity(rows * width);
        for r in 0..rows {
            for p in pieces {
                let w = p.rows_cols().1;
                out.extend_from_slice(&p.data[r * w..(r + 1) * w]);
            }
        }
        CpuTensor::new(out, &out_shape(&pieces[0].shape, width))
    }
}

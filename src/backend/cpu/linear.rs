//! The CPU reference of the products, LoRA branches, trainable affine layers and embedding lookups,
//! and their gradients; the matrix products themselves are matrixmultiply's.

use super::*;

/// `c[m, n] = a[m, k] · b[n, k]ᵀ` (+ c when `accumulate`), all row-major.
pub fn matmul_nt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    debug_assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: the slices cover the strided extents asserted above and `c` does not alias a or b.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `c[m, n] = a[m, k] · b[k, n]` (+ c when `accumulate`), all row-major.
pub fn matmul_nn(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: as in `matmul_nt`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `c[m, n] = a[k, m]ᵀ · b[k, n]` (+ c when `accumulate`): the weight-gradient product.
pub fn matmul_tn(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: as in `matmul_nt`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            1,
            m as isize,
            b.as_ptr(),
            n as isize,
            1,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

impl LinearOps for Cpu {
    fn embedding(&self, table: &Self::Weight, ids: &Self::Ids) -> Result<Self::Tensor> {
        let (rows, d) = table.rows_cols();
        let mut out = Vec::with_capacity(ids.data.len() * d);
        for &id in &ids.data {
            let id = id as usize;
            ensure!(id < rows, "token id {id} is outside the embedding table of {rows} rows");
            out.extend_from_slice(&table.data[id * d..(id + 1) * d]);
        }
        let mut shape = ids.shape.clone();
        shape.push(d);
        CpuTensor::new(out, &shape)
    }

    fn linear_to_impl(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: &[LoraRef<'_, Self>],
        _out: Prec,
    ) -> Result<Self::Tensor> {
        let (m, _) = x.rows_cols();
        let (n, _) = w.rows_cols();
        let mut y = CpuTensor::new(vec![0.0; m * n], &out_shape(&x.shape, n))?;
        self.linear_add(x, w, lora, &mut y)?;
        Ok(y)
    }

    fn linear_add_impl(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: &[LoraRef<'_, Self>],
        acc: &mut Self::Tensor,
    ) -> Result<()> {
        let (m, k) = x.rows_cols();
        let n = w.rows_cols().0;
        matmul_nt(&x.data, &w.data, &mut acc.data, m, k, n, true);
        for l in lora {
            let r = l.a.shape[0];
            let out = l.b.shape[0];
            let xd;
            let xin = match &l.dropout {
                Some(d) if d.p > 0.0 => {
                    xd = apply_dropout(&x.data, d);
                    &xd
                }
                _ => &x.data,
            };
            let mut h = vec![0.0; m * r];
            matmul_nt(xin, &l.a.data, &mut h, m, k, r, false);
            h.iter_mut().for_each(|v| *v *= l.scale);
            let mut delta = vec![0.0; m * out];
            matmul_nt(&h, &l.b.data, &mut delta, m, r, out, false);
            for (row, d) in acc.data.chunks_mut(n).zip(delta.chunks(out)) {
                row[l.col..l.col + out].iter_mut().zip(d).for_each(|(y, d)| *y += d);
            }
        }
        Ok(())
    }

    fn merge_lora_impl(&self, w: &Self::Weight, lora: &[LoraRef<'_, Self>]) -> Result<Self::Weight> {
        let k = w.rows_cols().1;
        let mut merged = w.clone();
        for l in lora {
            let (r, out) = (l.a.shape[0], l.b.shape[0]);
            let mut delta = vec![0.0; out * k];
            matmul_nn(&l.b.data, &l.a.data, &mut delta, out, r, k, false);
            merged.data[l.col * k..(l.col + out) * k].iter_mut().zip(&delta).for_each(|(w, d)| *w += l.scale * d);
        }
        Ok(merged)
    }

    fn matmul_copy(&self, _t: &Self::Tensor) -> Result<Option<Self::Tensor>> {
        Ok(None)
    }

    fn affine_impl(&self, x: &Self::Tensor, w: &Self::Tensor, bias: Option<&Self::Tensor>) -> Result<Self::Tensor> {
        let (m, k) = x.rows_cols();
        let n = w.rows_cols().0;
        let mut y = vec![0.0; m * n];
        matmul_nt(&x.data, &w.data, &mut y, m, k, n, false);
        if let Some(b) = bias {
            for row in y.chunks_mut(n) {
                row.iter_mut().zip(&b.data).for_each(|(v, b)| *v += b);
            }
        }
        CpuTensor::new(y, &out_shape(&x.shape, n))
    }

    fn linear_backward_impl(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: &[LoraRef<'_, Self>],
        dy: &Self::Tensor,
        dx: Option<&mut Self::Tensor>,
        dw: Option<&mut Self::Tensor>,
        grads: &mut [LoraGrad<'_, Self>],
    ) -> Result<()> {
        let (m, k) = x.rows_cols();
        let n = w.rows_cols().0;
        if let Some(dw) = dw {
            matmul_tn(&dy.data, &x.data, &mut dw.data, n, m, k, true);
        }
        let mut dx_acc = vec![0.0f32; if dx.is_some() { m * k } else { 0 }];
        if dx.is_some() {
            matmul_nn(&dy.data, &w.data, &mut dx_acc, m, n, k, false);
        }
        for (l, g) in lora.iter().zip(grads.iter_mut()) {
            let (r, out) = (l.a.shape[0], l.b.shape[0]);
            let xd = match &l.dropout {
                Some(d) if d.p > 0.0 => apply_dropout(&x.data, d),
                _ => x.data.clone(),
            };
            let mut h = vec![0.0; m * r];
            matmul_nt(&xd, &l.a.data, &mut h, m, k, r, false);
            h.iter_mut().for_each(|v| *v *= l.scale);
            let dyp: Vec<f32> = dy.data.chunks(n).flat_map(|row| row[l.col..l.col + out].iter().copied()).collect();
            matmul_tn(&dyp, &h, &mut g.b.data, out, m, r, true);
            let mut dh = vec![0.0; m * r];
            matmul_nn(&dyp, &l.b.data, &mut dh, m, out, r, false);
            dh.iter_mut().for_each(|v| *v *= l.scale);
            matmul_tn(&dh, &xd, &mut g.a.data, r, m, k, true);
            if dx.is_some() {
                let mut dxl = vec![0.0; m * k];
                matmul_nn(&dh, &l.a.data, &mut dxl, m, r, k, false);
                if let Some(d) = l.dropout.filter(|d| d.p > 0.0) {
                    dxl = apply_dropout(&dxl, &d);
                }
                dx_acc.iter_mut().zip(&dxl).for_each(|(a, b)| *a += b);
            }
        }
        if let Some(dx) = dx {
            dx.data.iter_mut().zip(&dx_acc).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn affine_backward_impl(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
        dx: Option<&mut Self::Tensor>,
        dw: &mut Self::Tensor,
        db: Option<&mut Self::Tensor>,
    ) -> Result<()> {
        let (m, k) = x.rows_cols();
        let (n, _) = w.rows_cols();
        if let Some(dx) = dx {
            matmul_nn(&dy.data, &w.data, &mut dx.data, m, n, k, true);
        }
        matmul_tn(&dy.data, &x.data, &mut dw.data, n, m, k, true);
        if let Some(db) = db {
            for row in dy.data.chunks(n) {
                db.data.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
        Ok(())
    }

    fn embedding_backward(&self, ids: &Self::Ids, dy: &Self::Tensor, d_table: &mut Self::Tensor) -> Result<()> {
        let (rows, d) = d_table.rows_cols();
        ensure!(
            dy.data.len() == ids.data.len() * d,
            "embedding_backward: dy {:?} for {} ids",
            dy.shape,
            ids.data.len()
        );
        for (&id, g) in ids.data.iter().zip(dy.data.chunks(d)) {
            ensure!((id as usize) < rows, "token id {id} is outside the embedding table of {rows} rows");
            d_table.data[id as usize * d..(id as usize + 1) * d].iter_mut().zip(g).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn set_weight_impl(&self, w: &mut Self::Weight, values: &Self::Tensor) -> Result<()> {
        w.data.copy_from_slice(&values.data);
        Ok(())
    }
}

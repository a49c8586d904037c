//! The CUDA element-wise operations of kernels/elementwise.cu: arithmetic, activations,
//! gated-gelu with its fused dropout, and dropout, with their backward forms.

use super::*;

impl ElementwiseOps for Cuda {
    fn scale_assign(&self, x: &mut Self::Tensor, s: f32) -> Result<()> {
        let n = x.numel();
        self.gpu.launch(&format!("scale_{}", Self::suffix(x)), elementwise(n), &[&self.ptr_t(x), &s, &(n as i64)])
    }

    fn add_assign_impl(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()> {
        let n = x.numel();
        let name = format!("add_assign_{}_{}", Self::suffix(x), Self::suffix(y));
        self.gpu.launch(&name, elementwise(n), &[&self.ptr_t(x), &self.ptr_t(y), &(n as i64)])
    }

    fn bias_add_impl(&self, x: &mut Self::Tensor, bias: &Self::Weight) -> Result<()> {
        let (rows, d) = x.rows_cols();
        let name = format!("bias_add_{}_f16", Self::suffix(x));
        self.gpu.launch(
            &name,
            elementwise(rows * d),
            &[&self.ptr_t(x), &self.gpu.ptr(&bias.buf), &(rows as i64), &(d as i32)],
        )
    }

    fn activation(&self, x: &Self::Tensor, act: Activation) -> Result<Self::Tensor> {
        let n = x.numel();
        let y = self.empty(&x.shape, Prec::F32)?;
        let code: i32 = match act {
            Activation::GeluErf => 0,
            Activation::GeluNew => 1,
            Activation::Tanh => 2,
        };
        self.gpu.launch(
            &format!("activation_{}", Self::suffix(x)),
            elementwise(n),
            &[&self.ptr_t(x), &self.ptr_t(&y), &(n as i64), &code],
        )?;
        Ok(y)
    }

    fn gated_gelu_impl(&self, gate_up: &Self::Tensor, dropout: Option<Dropout>) -> Result<Self::Tensor> {
        let (rows, d2) = gate_up.rows_cols();
        let f = d2 / 2;
        let mut shape = gate_up.shape.clone();
        *shape.last_mut().expect("rank ≥ 1") = f;
        let y = self.empty(&shape, Prec::Half)?;
        let (p, key) = dropout.map_or((0.0f32, 0u64), |d| (d.p, d.key()));
        self.gpu.launch(
            &format!("gated_gelu_split_{}", Self::suffix(gate_up)),
            elementwise(rows * f),
            &[&self.ptr_t(gate_up), &self.ptr_t(&y), &(rows as i64), &(f as i32), &p, &key],
        )?;
        Ok(y)
    }

    fn gated_gelu_backward_impl(
        &self,
        gate_up: &CudaTensor,
        dy: &CudaTensor,
        dropout: Option<Dropout>,
    ) -> Result<CudaTensor> {
        let (rows, d2) = gate_up.rows_cols();
        let f = d2 / 2;
        let out = self.empty(&gate_up.shape, Prec::Half)?;
        let (p, key) = dropout.map_or((0.0f32, 0u64), |d| (d.p, d.key()));
        self.gpu.launch(
            &format!("gated_gelu_backward_{}_{}", Self::suffix(gate_up), Self::suffix(dy)),
            elementwise(rows * f),
            &[&self.ptr_t(gate_up), &self.ptr_t(dy), &self.ptr_t(&out), &(rows as i64), &(f as i32), &p, &key],
        )?;
        Ok(out)
    }

    fn dropout_add_impl(&self, acc: &mut CudaTensor, x: &CudaTensor, d: &Dropout) -> Result<()> {
        let n = x.numel();
        let ap = self.grad_ptr(acc, "dropout_add")?;
        self.gpu.launch(
            &format!("dropout_add_{}", Self::suffix(x)),
            elementwise(n),
            &[&self.ptr_t(x), &ap, &(n as i64), &d.p, &d.seed, &d.stream],
        )
    }

    fn dropout(&self, x: &CudaTensor, d: &Dropout) -> Result<CudaTensor> {
        let n = x.numel();
        // A half input stays half: its consumers are matrix products (dropout_f16 is the forward's
        // kernel in elementwise.cu, drawing the same mask).
        let (prec, name) = match x.buf {
            Buf::F32(_) => (Prec::F32, "dropout_f32"),
            Buf::F16(_) => (Prec::Half, "dropout_f16"),
        };
        let y = self.empty(&x.shape, prec)?;
        self.gpu.launch(
            name,
            elementwise(n),
            &[&self.ptr_t(x), &self.ptr_t(&y), &(n as i64), &d.p, &d.seed, &d.stream],
        )?;
        Ok(y)
    }
}

//! The CUDA forms of the operations only full-parameter training needs: weight gradients of the
//! products, norms, embeddings and the relative-position bias, and writing trained weights back.

use super::{Cuda, CudaIds, CudaTensor, CudaWeight};
use crate::backend::AttnSpec;
use anyhow::Result;

fn missing(op: &str) -> anyhow::Error {
    anyhow::anyhow!("{op} has no CUDA implementation yet; run full-parameter training with --device cpu")
}

impl Cuda {
    pub(super) fn weight_grad_impl(&self, _x: &CudaTensor, _dy: &CudaTensor, _dw: &mut CudaTensor) -> Result<()> {
        Err(missing("weight_grad"))
    }

    pub(super) fn rms_norm_weight_grad_impl(
        &self,
        _x: &CudaTensor,
        _eps: f32,
        _dy: &CudaTensor,
        _dw: &mut CudaTensor,
    ) -> Result<()> {
        Err(missing("rms_norm_weight_grad"))
    }

    pub(super) fn embedding_backward_impl(
        &self,
        _ids: &CudaIds,
        _dy: &CudaTensor,
        _d_table: &mut CudaTensor,
    ) -> Result<()> {
        Err(missing("embedding_backward"))
    }

    pub(super) fn attention_bias_grad_impl(
        &self,
        _q: &CudaTensor,
        _k: &CudaTensor,
        _v: &CudaTensor,
        _dout: &CudaTensor,
        _spec: &AttnSpec<'_, Self>,
        _d_table: &mut CudaTensor,
    ) -> Result<()> {
        Err(missing("attention_bias_grad"))
    }

    pub(super) fn set_weight_impl(&self, _w: &mut CudaWeight, _values: &CudaTensor) -> Result<()> {
        Err(missing("set_weight"))
    }
}

//! The f32 CPU reference backend: plain loops a reader can check against the formulas, with
//! matrixmultiply for the products and rayon where rows are independent. Every other backend is
//! tested against this one. This file holds the tensor type and the `Device` impl; each op family
//! is the file of its name, as in cuda/.

mod attention;
mod elementwise;
mod layout;
mod linear;
mod losses;
mod norm;
mod optim;
mod sampling;

use super::relpos::relative_bucket;
use super::rng::{dropout_factor, dropout_keep, dropout_key, uniform};
use super::{
    Activation, AdamSlot, AdamStep, Attended, AttnGrads, AttnInputs, AttnSpec, Dropout, LoraGrad, LoraRef, Position,
    Prec, RelBias, SampleSpec, Shaped,
};
use super::{AttentionOps, Device, ElementwiseOps, LayoutOps, LinearOps, LossOps, NormOps, OptimOps, SamplingOps};
use super::{BeamSpec, BeamState, EarlyStopping, ProcessSpec};
use crate::checkpoint::HostTensor;
use anyhow::{Result, anyhow, bail, ensure};
pub use elementwise::{apply_dropout, gelu_erf, gelu_new, gelu_new_grad};
pub use linear::{matmul_nn, matmul_nt, matmul_tn};
pub use losses::log_softmax_row;
pub use optim::adam_element;
use rayon::prelude::*;
pub use sampling::{argmax, choose_token, process_row};

/// An owned row-major tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor<T> {
    pub data: Vec<T>,
    pub shape: Vec<usize>,
}

impl<T> Shaped for CpuTensor<T> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

impl<T: Clone> CpuTensor<T> {
    pub fn new(data: Vec<T>, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        ensure!(data.len() == n, "tensor of shape {shape:?} needs {n} values, got {}", data.len());
        Ok(Self { data, shape: shape.to_vec() })
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

fn out_shape(x: &[usize], last: usize) -> Vec<usize> {
    let mut s = x.to_vec();
    if let Some(l) = s.last_mut() {
        *l = last;
    }
    s
}

fn at(p: Position<'_, Cpu>) -> usize {
    match p {
        Position::At(n) => n,
        Position::Counter(c) => c.data[0] as usize,
    }
}

impl Device for Cpu {
    type Tensor = CpuTensor<f32>;

    type Weight = CpuTensor<f32>;

    type Ids = CpuTensor<u32>;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn ordinal(&self) -> Option<usize> {
        None
    }

    fn default_loss_scale(&self) -> f32 {
        1.0
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor> {
        CpuTensor::new(data.to_vec(), shape)
    }

    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn peak_memory(&self) -> Option<usize> {
        None
    }

    fn reset_peak_memory(&self) {}

    fn reserve(&self, _bytes: usize, _what: &str) -> Result<()> {
        Ok(())
    }

    fn zeros_as(&self, shape: &[usize], _prec: Prec) -> Result<Self::Tensor> {
        CpuTensor::new(vec![0.0; shape.iter().product()], shape)
    }

    fn upload_weight(&self, w: &HostTensor<'_>) -> Result<Self::Weight> {
        CpuTensor::new(w.to_f32(), w.shape)
    }

    fn upload_ids(&self, ids: &[u32], shape: &[usize]) -> Result<Self::Ids> {
        CpuTensor::new(ids.to_vec(), shape)
    }

    fn reshape(&self, t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        CpuTensor::new(t.data, shape)
    }

    fn download_ids(&self, ids: &Self::Ids) -> Result<Vec<u32>> {
        Ok(ids.data.clone())
    }

    type Graph = ();

    fn run_step(&self, _graph: &mut Option<()>, step: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        step()
    }
}

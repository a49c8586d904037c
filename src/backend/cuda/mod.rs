//! The CUDA backend: every operation of `Backend` as a kernel from kernels/ or a cuBLAS product.
//! Weights live in fp16; activations in f32, or in half where their only consumer is a matrix
//! product or attention (DESIGN.md's precision policy). This file holds the tensor types, the
//! helpers every family uses and the `Device` impl; each op family is the file of its name, beside
//! kernels/<family>.cu.

mod attention;
mod device;
mod elementwise;
mod gemm;
pub mod launch;
mod layout;
mod linear;
mod losses;
mod norm;
mod optim;
mod sampling;

use super::relpos::relative_bucket;
use super::{Activation, Attended, AttnGrads, AttnInputs, AttnSpec, LoraRef, Position, Prec, SampleSpec, Shaped};
use super::{AttentionOps, Device, ElementwiseOps, LayoutOps, LinearOps, LossOps, NormOps, OptimOps, SamplingOps};
use super::{BeamSpec, BeamState, EarlyStopping, ProcessSpec};
use crate::backend::{AdamSlot, AdamStep, Dropout, LoraGrad};
use crate::checkpoint::HostTensor;
use anyhow::{Result, bail, ensure};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};
use device::elementwise;
pub use device::{Gpu, visible_gpus};
use gemm::Mat;
use gemm::{Elem, Gemm};
use half::f16;
use launch::*;
use std::collections::HashMap;
use std::sync::Mutex;

/// Device memory in one of the two activation precisions.
pub enum Buf {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
}

pub struct CudaTensor {
    pub buf: Buf,
    pub shape: Vec<usize>,
}

impl Shaped for CudaTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// A frozen parameter, fp16 on the device.
pub struct CudaWeight {
    pub buf: CudaSlice<f16>,
    pub shape: Vec<usize>,
}

impl Shaped for CudaWeight {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

pub struct CudaIds {
    pub buf: CudaSlice<u32>,
    pub shape: Vec<usize>,
}

impl Shaped for CudaIds {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// A one-dimensional grid of `blocks` blocks of `threads` threads.
pub(super) fn blocks(blocks: usize, threads: u32) -> Result<LaunchConfig> {
    ensure!(blocks < 1 << 31, "{blocks} blocks exceed the grid's limit");
    Ok(LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

pub(super) fn half_mat(ptr: u64, ld: usize) -> Mat {
    Mat { ptr, ld, elem: Elem::F16 }
}

pub(super) fn f32_mat(ptr: u64, ld: usize) -> Mat {
    Mat { ptr, ld, elem: Elem::F32 }
}

pub struct Cuda {
    pub gpu: Gpu,
    gemm: Gemm,
    /// Bucket of every relative position in [−max_distance, max_distance], per (bidirectional,
    /// buckets, max_distance): computed on the host with the CPU's own function, so the two agree
    /// exactly at the f32 boundaries of the log buckets.
    bucket_luts: Mutex<HashMap<(bool, usize, usize), CudaSlice<u32>>>,
}

impl Cuda {
    pub fn new(ordinal: usize) -> Result<Self> {
        let gpu = Gpu::new(ordinal)?;
        let gemm = Gemm::new(&gpu)?;
        Ok(Self { gpu, gemm, bucket_luts: Mutex::new(HashMap::new()) })
    }

    fn ptr_t(&self, t: &CudaTensor) -> u64 {
        match &t.buf {
            Buf::F32(s) => self.gpu.ptr(s),
            Buf::F16(s) => self.gpu.ptr(s),
        }
    }

    fn suffix(t: &CudaTensor) -> &'static str {
        match t.buf {
            Buf::F32(_) => "f32",
            Buf::F16(_) => "f16",
        }
    }

    fn empty(&self, shape: &[usize], prec: Prec) -> Result<CudaTensor> {
        let n: usize = shape.iter().product();
        let buf = match prec {
            Prec::F32 => Buf::F32(self.gpu.alloc(n)?),
            Prec::Half => Buf::F16(self.gpu.alloc(n)?),
        };
        Ok(CudaTensor { buf, shape: shape.to_vec() })
    }

    /// `t` as half, converting when it is f32.
    fn as_half<'a>(&self, t: &'a CudaTensor) -> Result<std::borrow::Cow<'a, CudaSlice<f16>>> {
        match &t.buf {
            Buf::F16(s) => Ok(std::borrow::Cow::Borrowed(s)),
            Buf::F32(s) => {
                let n = t.numel();
                let out = self.gpu.alloc::<f16>(n)?;
                self.gpu.launch(
                    "cast_f32_f16",
                    elementwise(n),
                    &[&self.gpu.ptr(s), &self.gpu.ptr(&out), &(n as i64)],
                )?;
                Ok(std::borrow::Cow::Owned(out))
            }
        }
    }

    /// A position as the kernels take it: a host value, or the address of a device counter.
    fn position(&self, p: Position<'_, Self>) -> (i32, u64) {
        match p {
            Position::At(n) => (n as i32, 0),
            Position::Counter(c) => (0, self.gpu.ptr(&c.buf)),
        }
    }

    /// A half copy of f32 values (LoRA matrices are f32 masters; the products read half).
    fn half_copy(&self, t: &CudaTensor) -> Result<CudaTensor> {
        let Buf::F32(src) = &t.buf else { bail!("expected an f32 tensor") };
        let n = t.numel();
        let out = self.gpu.alloc::<f16>(n)?;
        self.gpu.launch("cast_f32_f16", elementwise(n), &[&self.gpu.ptr(src), &self.gpu.ptr(&out), &(n as i64)])?;
        Ok(CudaTensor { buf: Buf::F16(out), shape: t.shape.clone() })
    }

    /// The address of a tensor that gradients accumulate into, which must be f32.
    pub(super) fn grad_ptr(&self, t: &CudaTensor, what: &str) -> Result<u64> {
        match &t.buf {
            Buf::F32(s) => Ok(self.gpu.ptr(s)),
            Buf::F16(_) => bail!("{what}: gradients accumulate in f32 tensors, not half"),
        }
    }
}

impl Device for Cuda {
    type Tensor = CudaTensor;

    type Weight = CudaWeight;

    type Ids = CudaIds;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.gpu.ordinal, self.gpu.name)
    }

    fn ordinal(&self) -> Option<usize> {
        Some(self.gpu.ordinal)
    }

    fn default_loss_scale(&self) -> f32 {
        1024.0
    }

    fn sync(&self) -> Result<()> {
        self.gpu.sync()
    }

    fn peak_memory(&self) -> Option<usize> {
        self.gpu.peak_memory().ok()
    }

    fn reset_peak_memory(&self) {
        let _ = self.gpu.reset_peak_memory();
    }

    fn profiler_range(&self, open: bool) -> Result<()> {
        self.gpu.sync()?;
        let r = if open { cudarc::driver::profiler_start() } else { cudarc::driver::profiler_stop() };
        r.map_err(|e| anyhow::anyhow!("cuProfiler{}: {e:?}", if open { "Start" } else { "Stop" }))
    }

    fn reserve(&self, bytes: usize, what: &str) -> Result<()> {
        self.gpu.reserve(bytes, what)
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor> {
        ensure!(data.len() == shape.iter().product::<usize>(), "upload: {} values for shape {shape:?}", data.len());
        Ok(CudaTensor { buf: Buf::F32(self.gpu.upload(data)?), shape: shape.to_vec() })
    }

    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>> {
        let n = t.numel();
        match &t.buf {
            Buf::F32(s) => self.gpu.download(s, n),
            Buf::F16(s) => Ok(self.gpu.download(s, n)?.into_iter().map(f16::to_f32).collect()),
        }
    }

    fn zeros_as(&self, shape: &[usize], prec: Prec) -> Result<Self::Tensor> {
        let n: usize = shape.iter().product();
        let buf = match prec {
            Prec::F32 => Buf::F32(self.gpu.alloc_zeros(n)?),
            Prec::Half => Buf::F16(self.gpu.alloc_zeros(n)?),
        };
        Ok(CudaTensor { buf, shape: shape.to_vec() })
    }

    fn upload_weight(&self, w: &HostTensor<'_>) -> Result<Self::Weight> {
        Ok(CudaWeight { buf: self.gpu.upload(&w.to_f16())?, shape: w.shape.to_vec() })
    }

    fn upload_ids(&self, ids: &[u32], shape: &[usize]) -> Result<Self::Ids> {
        ensure!(ids.len() == shape.iter().product::<usize>(), "upload_ids: {} ids for shape {shape:?}", ids.len());
        Ok(CudaIds { buf: self.gpu.upload(ids)?, shape: shape.to_vec() })
    }

    fn reshape(&self, t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        ensure!(
            t.numel() == shape.iter().product::<usize>(),
            "reshape: {:?} has {} elements, {shape:?} needs {}",
            t.shape,
            t.numel(),
            shape.iter().product::<usize>()
        );
        Ok(CudaTensor { buf: t.buf, shape: shape.to_vec() })
    }

    fn download_ids(&self, ids: &Self::Ids) -> Result<Vec<u32>> {
        self.gpu.download(&ids.buf, ids.numel())
    }

    type Graph = cudarc::driver::CudaGraph;

    fn run_step(&self, graph: &mut Option<Self::Graph>, step: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        if graph.is_none() {
            *graph = Some(self.gpu.capture(step)?);
        }
        let g = graph.as_ref().expect("captured above");
        g.launch().map_err(|e| anyhow::anyhow!("replaying the decoding step's CUDA graph: {e:?}"))
    }
}

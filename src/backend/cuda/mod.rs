//! The CUDA backend: every operation of `Backend` as a kernel from kernels/ or a cuBLAS product.
//! Weights live in fp16; activations in f32, or in half where their only consumer is a matrix
//! product or attention (DESIGN.md's precision policy).

mod backward;
mod device;
mod full;
mod gemm;

use super::relpos::relative_bucket;
use super::{Activation, AttnSpec, Backend, LoraRef, Position, Prec, SampleSpec, Shaped};
use crate::checkpoint::HostTensor;
use anyhow::{Result, bail, ensure};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};
use device::elementwise;
pub use device::{Gpu, visible_gpus};
use gemm::{Elem, Gemm};
use half::f16;
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

/// Mirrors `AttnParams` in kernels/attention.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct AttnParams {
    key_lengths: u64,
    counter: u64,
    bias_table: u64,
    bucket_lut: u64,
    b: i32,
    lq: i32,
    lk: i32,
    cap: i32,
    h: i32,
    dk: i32,
    q_offset: i32,
    causal: i32,
    max_distance: i32,
    scale: f32,
}
// SAFETY: plain old data with the kernel's layout.
unsafe impl DeviceRepr for AttnParams {}

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

/// Mirrors `SampleParams` in kernels/sampling.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SampleParams {
    streams: u64,
    finished: u64,
    tokens: u64,
    logprobs: u64,
    step_counter: u64,
    seed: u64,
    v: i32,
    greedy: i32,
    top_k: i32,
    min_new_tokens: i32,
    step: i32,
    temperature: f32,
    top_p: f32,
    eos: u32,
    pad: u32,
    suppress_eos: i32,
}
// SAFETY: plain old data with the kernel's layout.
unsafe impl DeviceRepr for SampleParams {}

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

    /// `y (+)= x · wᵀ`, then each LoRA branch `y[:, col..] += scale · dropout(x) · Aᵀ · Bᵀ`, every
    /// product on the tensor cores: a branch is two thin products, the second accumulating into
    /// its columns of y.
    fn product(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        lora: &[LoraRef<'_, Self>],
        y: &mut CudaTensor,
        accumulate: bool,
    ) -> Result<()> {
        let (m, k) = x.rows_cols();
        let (n, wk) = w.rows_cols();
        ensure!(k == wk, "linear: input has {k} features, weight {:?} expects {wk}", w.shape);
        ensure!(y.rows_cols() == (m, n), "linear: output {:?} does not fit {m}×{n}", y.shape);
        let xh = self.as_half(x)?;
        let (yout, ysize) = if matches!(y.buf, Buf::F32(_)) { (Elem::F32, 4) } else { (Elem::F16, 2) };
        let beta = if accumulate { 1.0 } else { 0.0 };
        let yp = self.ptr_t(y);
        self.gemm.nt(self.gpu.ptr(&xh), self.gpu.ptr(&w.buf), yp, n, m, k, n, Elem::F16, yout, 1.0, beta)?;
        for l in lora {
            let r = l.a.shape[0];
            let out = l.b.shape[0];
            ensure!(
                l.a.shape == [r, k] && l.b.shape == [out, r] && l.col + out <= n,
                "LoRA shapes {:?} / {:?} at column {} do not fit {n} outputs",
                l.a.shape,
                l.b.shape,
                l.col
            );
            let made;
            let (a16, b16) = match l.shadow {
                Some((a, b)) => (a, b),
                None => {
                    made = (self.half_copy(l.a)?, self.half_copy(l.b)?);
                    (&made.0, &made.1)
                }
            };
            let dropped;
            let xin = match l.dropout {
                Some(d) if d.p > 0.0 => {
                    let out = self.gpu.alloc::<f16>(m * k)?;
                    self.gpu.launch(
                        "dropout_f16",
                        elementwise(m * k),
                        &[&self.gpu.ptr(&xh), &self.gpu.ptr(&out), &((m * k) as i64), &d.p, &d.seed, &d.stream],
                    )?;
                    dropped = out;
                    &dropped
                }
                _ => xh.as_ref(),
            };
            let h = self.gpu.alloc::<f16>(m * r)?;
            let hp = self.gpu.ptr(&h);
            self.gemm.nt(self.gpu.ptr(xin), self.ptr_t(a16), hp, r, m, k, r, Elem::F16, Elem::F16, l.scale, 0.0)?;
            let ycol = yp + (l.col * ysize) as u64;
            self.gemm.nt(hp, self.ptr_t(b16), ycol, n, m, r, out, Elem::F16, yout, 1.0, 1.0)?;
        }
        Ok(())
    }

    fn bucket_lut(&self, bidirectional: bool, buckets: usize, max_distance: usize) -> Result<u64> {
        let mut luts = self.bucket_luts.lock().expect("bucket table lock");
        let key = (bidirectional, buckets, max_distance);
        if let std::collections::hash_map::Entry::Vacant(e) = luts.entry(key) {
            let md = max_distance as i64;
            let lut: Vec<u32> =
                (-md..=md).map(|rel| relative_bucket(rel, bidirectional, buckets, max_distance) as u32).collect();
            e.insert(self.gpu.upload(&lut)?);
        }
        Ok(self.gpu.ptr(&luts[&key]))
    }
}

impl Backend for Cuda {
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

    fn embedding(&self, table: &Self::Weight, ids: &Self::Ids) -> Result<Self::Tensor> {
        let (rows, d) = table.rows_cols();
        let n = ids.numel();
        let mut shape = ids.shape.clone();
        shape.push(d);
        let out = self.empty(&shape, Prec::F32)?;
        self.gpu.launch(
            "embedding",
            elementwise(n * d),
            &[
                &self.gpu.ptr(&table.buf),
                &self.gpu.ptr(&ids.buf),
                &self.ptr_t(&out),
                &(n as i64),
                &(d as i32),
                &(rows as i32),
            ],
        )?;
        Ok(out)
    }

    fn linear_to(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: &[LoraRef<'_, Self>],
        out: Prec,
    ) -> Result<Self::Tensor> {
        let (n, _) = w.rows_cols();
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("rank ≥ 1") = n;
        let mut y = self.empty(&shape, out)?;
        self.product(x, w, lora, &mut y, false)?;
        Ok(y)
    }

    fn linear_add(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: &[LoraRef<'_, Self>],
        acc: &mut Self::Tensor,
    ) -> Result<()> {
        self.product(x, w, lora, acc, true)
    }

    fn merge_lora(&self, w: &Self::Weight, lora: &[LoraRef<'_, Self>]) -> Result<Self::Weight> {
        let (n, k) = w.rows_cols();
        let mut buf = self.gpu.alloc::<f16>(n * k)?;
        self.gpu.stream.memcpy_dtod(&w.buf, &mut buf).map_err(|e| anyhow::anyhow!("merge_lora: {e:?}"))?;
        let merged = CudaWeight { buf, shape: w.shape.clone() };
        for l in lora {
            let (r, out) = (l.a.shape[0], l.b.shape[0]);
            ensure!(l.a.shape == [r, k] && l.col + out <= n, "merge_lora: shapes do not fit {:?}", w.shape);
            let made;
            let (a16, b16) = match l.shadow {
                Some((a, b)) => (a, b),
                None => {
                    made = (self.half_copy(l.a)?, self.half_copy(l.b)?);
                    (&made.0, &made.1)
                }
            };
            let rows = self.gpu.ptr(&merged.buf) + (l.col * k * 2) as u64;
            self.gemm.nn_half(self.ptr_t(b16), self.ptr_t(a16), rows, out, r, k, l.scale, 1.0)?;
        }
        Ok(merged)
    }

    fn matmul_copy(&self, t: &Self::Tensor) -> Result<Option<Self::Tensor>> {
        self.half_copy(t).map(Some)
    }

    fn split_last(&self, x: &Self::Tensor, widths: &[usize]) -> Result<Vec<Self::Tensor>> {
        let (rows, d) = x.rows_cols();
        ensure!(widths.iter().sum::<usize>() == d, "split_last: widths {widths:?} do not add up to {d}");
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

    fn affine(&self, x: &Self::Tensor, w: &Self::Tensor, bias: Option<&Self::Tensor>) -> Result<Self::Tensor> {
        let (m, k) = x.rows_cols();
        let (n, wk) = w.rows_cols();
        ensure!(k == wk, "affine: input has {k} features, weight {:?} expects {wk}", w.shape);
        if let Some(b) = bias {
            ensure!(b.numel() == n, "affine: bias has {} values for {n} outputs", b.numel());
        }
        let (Buf::F32(wb), Some(Buf::F32(_)) | None) = (&w.buf, bias.map(|b| &b.buf)) else {
            bail!("affine expects f32 weights and bias")
        };
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("rank ≥ 1") = n;
        let y = self.empty(&shape, Prec::F32)?;
        let warps = m * n;
        let cfg = LaunchConfig {
            grid_dim: (warps.div_ceil(8).clamp(1, 65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let bp = bias.map(|b| self.ptr_t(b)).unwrap_or(0);
        self.gpu.launch(
            &format!("affine_narrow_{}", Self::suffix(x)),
            cfg,
            &[&self.ptr_t(x), &self.gpu.ptr(wb), &bp, &self.ptr_t(&y), &(m as i32), &(k as i32), &(n as i32)],
        )?;
        Ok(y)
    }

    fn scale_assign(&self, x: &mut Self::Tensor, s: f32) -> Result<()> {
        let n = x.numel();
        self.gpu.launch(&format!("scale_{}", Self::suffix(x)), elementwise(n), &[&self.ptr_t(x), &s, &(n as i64)])
    }

    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()> {
        ensure!(x.shape == y.shape, "add: shapes {:?} and {:?} differ", x.shape, y.shape);
        let n = x.numel();
        let name = format!("add_assign_{}_{}", Self::suffix(x), Self::suffix(y));
        self.gpu.launch(&name, elementwise(n), &[&self.ptr_t(x), &self.ptr_t(y), &(n as i64)])
    }

    fn bias_add(&self, x: &mut Self::Tensor, bias: &Self::Weight) -> Result<()> {
        let (rows, d) = x.rows_cols();
        ensure!(bias.numel() == d, "bias_add: bias has {} values for {d} features", bias.numel());
        let name = format!("bias_add_{}_f16", Self::suffix(x));
        self.gpu.launch(
            &name,
            elementwise(rows * d),
            &[&self.ptr_t(x), &self.gpu.ptr(&bias.buf), &(rows as i64), &(d as i32)],
        )
    }

    fn layer_norm(&self, x: &Self::Tensor, w: &Self::Weight, b: &Self::Weight, eps: f32) -> Result<Self::Tensor> {
        let (rows, d) = x.rows_cols();
        ensure!(w.numel() == d && b.numel() == d, "layer_norm: parameters do not have {d} values");
        let y = self.empty(&x.shape, Prec::F32)?;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        self.gpu.launch(
            &format!("layer_norm_{}", Self::suffix(x)),
            cfg,
            &[&self.ptr_t(x), &self.gpu.ptr(&w.buf), &self.gpu.ptr(&b.buf), &self.ptr_t(&y), &(d as i32), &eps],
        )?;
        Ok(y)
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

    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Result<Self::Tensor> {
        let (rows, d) = x.rows_cols();
        ensure!(w.numel() == d, "rms_norm: weight has {} values for {d} features", w.numel());
        let y = self.empty(&x.shape, Prec::Half)?;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        self.gpu.launch(
            &format!("rms_norm_{}", Self::suffix(x)),
            cfg,
            &[&self.ptr_t(x), &self.gpu.ptr(&w.buf), &self.ptr_t(&y), &(d as i32), &eps],
        )?;
        Ok(y)
    }

    fn gated_gelu(&self, gate_up: &Self::Tensor) -> Result<Self::Tensor> {
        let (rows, d2) = gate_up.rows_cols();
        ensure!(d2 % 2 == 0, "gated_gelu: last dimension {d2} is not gate and up halves");
        let f = d2 / 2;
        let mut shape = gate_up.shape.clone();
        *shape.last_mut().expect("rank ≥ 1") = f;
        let y = self.empty(&shape, Prec::Half)?;
        self.gpu.launch(
            &format!("gated_gelu_split_{}", Self::suffix(gate_up)),
            elementwise(rows * f),
            &[&self.ptr_t(gate_up), &self.ptr_t(&y), &(rows as i64), &(f as i32)],
        )?;
        Ok(y)
    }

    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        spec: &AttnSpec<'_, Self>,
    ) -> Result<Self::Tensor> {
        let (h, dk) = (spec.heads, spec.d_kv);
        let inner = h * dk;
        ensure!(q.shape.len() == 3 && q.shape[2] == inner, "attention: q shape {:?}", q.shape);
        let (b, lq) = (q.shape[0], q.shape[1]);
        ensure!(
            k.shape.len() == 3 && k.shape[0] == b && k.shape[2] == inner && k.shape == v.shape,
            "attention: k {:?} / v {:?} do not match q {:?}",
            k.shape,
            v.shape,
            q.shape
        );
        ensure!(dk <= 128, "attention: d_kv {dk} > 128 is not supported on CUDA");
        let (q_offset, counter) = self.position(spec.q_offset);
        // With a counter the key count is only known on the device; the cache's capacity bounds it.
        let max_keys = if counter != 0 { k.shape[1] } else { spec.kv_len };
        ensure!(max_keys <= k.shape[1], "attention: kv_len {} exceeds the {} rows of k", spec.kv_len, k.shape[1]);
        // q, k and v must share a precision: convert the odd one out to half.
        let (qh, kh, vh) = (self.as_half(q)?, self.as_half(k)?, self.as_half(v)?);
        let (bias_table, bucket_lut, max_distance) = match &spec.bias {
            Some(rb) => (
                self.gpu.ptr(&rb.table.buf),
                self.bucket_lut(rb.bidirectional, rb.num_buckets, rb.max_distance)?,
                rb.max_distance as i32,
            ),
            None => (0, 0, 0),
        };
        let params = AttnParams {
            key_lengths: spec.key_lengths.map(|l| self.gpu.ptr(&l.buf)).unwrap_or(0),
            counter,
            bias_table,
            bucket_lut,
            b: b as i32,
            lq: lq as i32,
            lk: spec.kv_len as i32,
            cap: k.shape[1] as i32,
            h: h as i32,
            dk: dk as i32,
            q_offset,
            causal: spec.causal as i32,
            max_distance,
            scale: spec.scale,
        };
        let out = self.empty(&q.shape, Prec::Half)?;
        let (qp, kp, vp, op) = (self.gpu.ptr(&qh), self.gpu.ptr(&kh), self.gpu.ptr(&vh), self.ptr_t(&out));
        if lq <= 4 {
            let vec = dk == 64 || dk == 32;
            let width = if vec { dk / 8 } else { dk };
            let groups = 128 / width;
            let smem = (dk + k.shape[1] + groups * dk) * 4;
            ensure!(smem <= 48 * 1024, "attention: {} keys exceed the decode kernel's shared memory", k.shape[1]);
            let cfg = LaunchConfig {
                grid_dim: (h as u32, b as u32, lq as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let name = if vec { format!("attention_decode_{dk}") } else { "attention_decode_any".to_string() };
            self.gpu.launch(&name, cfg, &[&qp, &kp, &vp, &op, &params])?;
        } else if dk == 64 || dk == 32 {
            let cfg = LaunchConfig {
                grid_dim: (lq.div_ceil(64) as u32, h as u32, b as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            self.gpu.launch(&format!("attention_mma_{dk}"), cfg, &[&qp, &kp, &vp, &op, &params])?;
        } else {
            let dk_tile = if dk <= 32 {
                32
            } else if dk <= 64 {
                64
            } else {
                128
            };
            let cfg = LaunchConfig {
                grid_dim: (lq.div_ceil(64) as u32, h as u32, b as u32),
                block_dim: (64, 1, 1),
                shared_mem_bytes: (2 * 32 * dk * 4) as u32,
            };
            self.gpu.launch(&format!("attention_prefill_f16_{dk_tile}"), cfg, &[&qp, &kp, &vp, &op, &params])?;
        }
        Ok(out)
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

    fn copy_into(&self, dst: &mut Self::Tensor, offset: usize, src: &Self::Tensor) -> Result<()> {
        let n = src.numel();
        ensure!(offset + n <= dst.numel(), "copy_into: {n} values at {offset} overflow {:?}", dst.shape);
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

    fn log_softmax(&self, logits: &Self::Tensor) -> Result<Self::Tensor> {
        let (rows, v) = logits.rows_cols();
        let Buf::F32(_) = &logits.buf else { bail!("log_softmax expects f32 logits") };
        let y = self.empty(&logits.shape, Prec::F32)?;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        self.gpu.launch("log_softmax_f32", cfg, &[&self.ptr_t(logits), &self.ptr_t(&y), &(v as i32)])?;
        Ok(y)
    }

    fn select_tokens(
        &self,
        logits: &Self::Tensor,
        spec: &SampleSpec,
        step: Position<'_, Self>,
        streams: &Self::Ids,
        finished: &mut Self::Ids,
        tokens: &mut Self::Ids,
        logprobs: &mut Self::Tensor,
    ) -> Result<()> {
        let (b, v) = logits.rows_cols();
        ensure!(finished.numel() == b && streams.numel() == b, "select_tokens: flags or streams do not match {b} rows");
        ensure!(tokens.numel() == b && logprobs.numel() == b, "select_tokens: outputs do not have {b} rows");
        ensure!((spec.eos as usize) < v, "EOS id {} is outside the vocabulary of {v}", spec.eos);
        let (Buf::F32(_), Buf::F32(_)) = (&logits.buf, &logprobs.buf) else {
            bail!("select_tokens expects f32 logits and log-probs")
        };
        let (step, step_counter) = self.position(step);
        let params = SampleParams {
            streams: self.gpu.ptr(&streams.buf),
            finished: self.gpu.ptr(&finished.buf),
            tokens: self.gpu.ptr(&tokens.buf),
            logprobs: self.ptr_t(logprobs),
            step_counter,
            seed: spec.seed,
            v: v as i32,
            greedy: spec.greedy as i32,
            top_k: spec.top_k.min(i32::MAX as usize) as i32,
            min_new_tokens: spec.min_new_tokens.min(i32::MAX as usize) as i32,
            step,
            temperature: spec.temperature,
            top_p: spec.top_p,
            eos: spec.eos,
            pad: spec.pad,
            suppress_eos: 0,
        };
        let cfg = LaunchConfig { grid_dim: (b as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        self.gpu.launch("select_tokens", cfg, &[&self.ptr_t(logits), &params])
    }

    fn dropout(&self, x: &Self::Tensor, d: &super::Dropout) -> Result<Self::Tensor> {
        self.dropout_impl(x, d)
    }

    fn linear_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: &[LoraRef<'_, Self>],
        dy: &Self::Tensor,
        dx: Option<&mut Self::Tensor>,
        grads: &mut [super::LoraGrad<'_, Self>],
    ) -> Result<()> {
        self.linear_backward_impl(x, w, lora, dy, dx, grads)
    }

    fn affine_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
        dx: Option<&mut Self::Tensor>,
        dw: &mut Self::Tensor,
        db: Option<&mut Self::Tensor>,
    ) -> Result<()> {
        self.affine_backward_impl(x, w, dy, dx, dw, db)
    }

    fn rms_norm_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
        dy: &Self::Tensor,
        dx: &mut Self::Tensor,
    ) -> Result<()> {
        self.rms_norm_backward_impl(x, w, eps, dy, dx)
    }

    fn gated_gelu_backward(&self, gate_up: &Self::Tensor, dy: &Self::Tensor) -> Result<Self::Tensor> {
        self.gated_gelu_backward_impl(gate_up, dy)
    }

    fn attention_backward(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        dout: &Self::Tensor,
        spec: &AttnSpec<'_, Self>,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        self.attention_backward_impl(q, k, v, dout, spec)
    }

    fn concat_last(&self, pieces: &[&Self::Tensor]) -> Result<Self::Tensor> {
        self.concat_last_impl(pieces)
    }

    fn token_logprobs(&self, logits: &Self::Tensor, tokens: &Self::Ids) -> Result<(Self::Tensor, Self::Tensor)> {
        self.token_logprobs_impl(logits, tokens)
    }

    fn token_logprobs_backward(
        &self,
        logits: &Self::Tensor,
        tokens: &Self::Ids,
        dlogp: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        self.token_logprobs_backward_impl(logits, tokens, dlogp)
    }

    fn adam(&self, slots: &mut [super::AdamSlot<'_, Self>], h: &super::AdamStep) -> Result<()> {
        self.adam_impl(slots, h)
    }

    fn weight_grad(&self, x: &Self::Tensor, dy: &Self::Tensor, dw: &mut Self::Tensor) -> Result<()> {
        self.weight_grad_impl(x, dy, dw)
    }

    fn rms_norm_weight_grad(&self, x: &Self::Tensor, eps: f32, dy: &Self::Tensor, dw: &mut Self::Tensor) -> Result<()> {
        self.rms_norm_weight_grad_impl(x, eps, dy, dw)
    }

    fn embedding_backward(&self, ids: &Self::Ids, dy: &Self::Tensor, d_table: &mut Self::Tensor) -> Result<()> {
        self.embedding_backward_impl(ids, dy, d_table)
    }

    fn attention_bias_grad(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        dout: &Self::Tensor,
        spec: &AttnSpec<'_, Self>,
        d_table: &mut Self::Tensor,
    ) -> Result<()> {
        self.attention_bias_grad_impl(q, k, v, dout, spec, d_table)
    }

    fn cross_entropy(
        &self,
        logits: &Self::Tensor,
        targets: &Self::Ids,
        weights: &Self::Tensor,
        smoothing: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        self.cross_entropy_impl(logits, targets, weights, smoothing)
    }

    fn set_weight(&self, w: &mut Self::Weight, values: &Self::Tensor) -> Result<()> {
        self.set_weight_impl(w, values)
    }

    fn sum_squares(&self, xs: &[&Self::Tensor]) -> Result<f64> {
        self.sum_squares_impl(xs)
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

//! The GPU itself: finding the driver and the device, the context and stream, the embedded PTX
//! modules and their functions, allocation with readable out-of-memory errors, and kernel launches
//! by raw device pointer.

use super::launch::{ELEMENTWISE_MAX_BLOCKS, ELEMENTWISE_THREADS};
use anyhow::{Context, Result, anyhow, bail};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::Arc;

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx_table.rs"));
}

/// A kernel argument: a device pointer, a scalar or a #[repr(C)] parameter block.
pub trait Arg {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}

impl<T: DeviceRepr> Arg for T {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(self);
    }
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
    pub ordinal: usize,
    pub name: String,
}

/// The kernel names a PTX module defines (`.entry NAME(`).
fn entries(ptx: &str) -> impl Iterator<Item = &str> {
    ptx.lines().filter_map(|l| {
        let l = l.trim_start();
        let rest = l.strip_prefix(".visible .entry ").or_else(|| l.strip_prefix(".entry "))?;
        rest.split('(').next().map(str::trim)
    })
}

/// How many GPUs this process sees, or why it sees none.
pub fn visible_gpus() -> Result<usize> {
    // SAFETY: only probes whether the shared library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!(
            "no NVIDIA driver found (libcuda.so could not be loaded): this machine cannot run --device cuda; use --device cpu"
        );
    }
    let count = CudaContext::device_count().map_err(|e| anyhow!("the NVIDIA driver reports an error: {e:?}"))?;
    if count <= 0 {
        bail!("no NVIDIA GPU is visible (the driver reports 0 devices); use --device cpu");
    }
    Ok(count as usize)
}

impl Gpu {
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = visible_gpus()?;
        if ordinal >= count {
            bail!("GPU cuda:{ordinal} does not exist: this machine has {count} GPU(s), cuda:0..cuda:{}", count - 1);
        }
        if ptx::MODULES.is_empty() {
            bail!(
                "this detox binary was built without CUDA kernels (nvcc was not found at build time); \
                 run tools/install_nvcc.sh and rebuild, or use --device cpu"
            );
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("creating a CUDA context on cuda:{ordinal}: {e:?}"))?;
        // One stream, so cudarc's cross-stream event bookkeeping is pure overhead (and would add
        // nodes to captured graphs).
        // SAFETY: all work is issued on `stream`, in order.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| anyhow!("creating a CUDA stream: {e:?}"))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| anyhow!("{e:?}"))?;
        if major < 8 {
            bail!("cuda:{ordinal} has compute capability {major}.{minor}; detox's kernels need 8.0 or newer");
        }
        // sm_90a PTX uses Hopper-only features and runs on exactly 9.0; everything else JIT-compiles
        // the compute_80 PTX.
        let arch = if (major, minor) == (9, 0) { "90a" } else { "80" };
        let mut functions = HashMap::new();
        let mut modules = Vec::new();
        for (module, variants) in ptx::MODULES {
            let (_, src) = variants
                .iter()
                .find(|(a, _)| *a == arch)
                .ok_or_else(|| anyhow!("kernel module {module} has no PTX for compute_{arch}"))?;
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(*src))
                .map_err(|e| anyhow!("loading kernel module {module} (compute_{arch}): {e:?}"))?;
            for name in entries(src) {
                let f = m.load_function(name).map_err(|e| anyhow!("loading kernel {name}: {e:?}"))?;
                functions.insert(name.to_string(), f);
            }
            modules.push(m);
        }
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let gpu = Self { ctx, stream, functions, _modules: modules, ordinal, name };
        // Keep freed memory in the stream-ordered pool instead of returning it to the driver at
        // every synchronisation: the pool then serves as the arena, and steady-state steps
        // allocate nothing from the driver.
        gpu.pool_attribute(
            cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            Some(u64::MAX),
        )?;
        Ok(gpu)
    }

    /// Reads (and with `set`, first writes) an attribute of the device's default memory pool.
    fn pool_attribute(&self, attr: cudarc::driver::sys::CUmemPool_attribute, set: Option<u64>) -> Result<u64> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: plain driver queries on this context's device with valid out-pointers.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device()).result().map_err(|e| anyhow!("{e:?}"))?;
            let mut value: u64 = set.unwrap_or(0);
            if set.is_some() {
                sys::cuMemPoolSetAttribute(pool, attr, &mut value as *mut u64 as *mut _)
                    .result()
                    .map_err(|e| anyhow!("setting {attr:?}: {e:?}"))?;
            }
            sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut _)
                .result()
                .map_err(|e| anyhow!("reading {attr:?}: {e:?}"))?;
            Ok(value)
        }
    }

    /// The most device memory in use through the pool since the last reset.
    pub fn peak_memory(&self) -> Result<usize> {
        let v = self.pool_attribute(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)?;
        Ok(v as usize)
    }

    pub fn reset_peak_memory(&self) -> Result<()> {
        self.pool_attribute(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0))
            .map(|_| ())
    }

    pub fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| anyhow!("kernel {name} is missing from the embedded PTX"))
    }

    /// Launches `name` with `args` on the stream.
    pub fn launch(&self, name: &str, cfg: LaunchConfig, args: &[&dyn Arg]) -> Result<()> {
        let f = self.function(name)?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            a.push(&mut b);
        }
        // SAFETY: every kernel's parameter list is mirrored by its caller in backend/cuda, which
        // passes pointers to live allocations of the sizes the kernel indexes.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| anyhow!("launching {name}: {e:?}"))
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(|e| anyhow!("reading GPU memory: {e:?}"))
    }

    fn oom(&self, bytes: usize, what: &str) -> anyhow::Error {
        let (free, total) = self.memory().unwrap_or((0, 0));
        anyhow!(
            "out of GPU memory on cuda:{} ({}): {what} needs {:.1} MiB but only {:.1} MiB of {:.1} MiB are free",
            self.ordinal,
            self.name,
            bytes as f64 / 1048576.0,
            free as f64 / 1048576.0,
            total as f64 / 1048576.0
        )
    }

    pub fn reserve(&self, bytes: usize, what: &str) -> Result<()> {
        let (free, _) = self.memory()?;
        if bytes > free { Err(self.oom(bytes, what)) } else { Ok(()) }
    }

    /// Uninitialised device memory for `n` elements.
    pub fn alloc<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every caller writes the buffer in full before reading it.
        unsafe { self.stream.alloc::<T>(n.max(1)) }.map_err(|_| self.oom(n * std::mem::size_of::<T>(), "a tensor"))
    }

    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(|_| self.oom(n * std::mem::size_of::<T>(), "a tensor"))
    }

    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            return self.alloc(1);
        }
        self.stream.clone_htod(data).map_err(|_| self.oom(std::mem::size_of_val(data), "an upload"))
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, s: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        if n > 0 {
            self.stream.memcpy_dtoh(&s.slice(0..n), &mut out).map_err(|e| anyhow!("copying from the GPU: {e:?}"))?;
        }
        self.sync()?;
        Ok(out)
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| anyhow!("a GPU kernel failed: {e:?}")).context("synchronizing the GPU")
    }

    /// Records the work `f` issues into a CUDA graph (nothing runs until it is launched).
    pub fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<cudarc::driver::CudaGraph> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| anyhow!("starting a CUDA graph capture: {e:?}"))?;
        let recorded = f();
        // End the capture whatever happened, so the stream is usable again.
        let ended = self.stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        recorded.context("recording the decoding step")?;
        ended
            .map_err(|e| anyhow!("finishing a CUDA graph capture: {e:?}"))?
            .ok_or_else(|| anyhow!("the captured step issued no GPU work"))
    }

    /// The raw device address of a buffer (no cross-stream bookkeeping: one stream).
    pub fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }
}

/// A grid-stride launch over `n` elements.
pub fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(ELEMENTWISE_THREADS as usize).clamp(1, ELEMENTWISE_MAX_BLOCKS);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (ELEMENTWISE_THREADS, 1, 1), shared_mem_bytes: 0 }
}

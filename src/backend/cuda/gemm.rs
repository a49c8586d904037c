//! Matrix products through cuBLASLt: half inputs, fp32 accumulation, f32 or half output. Row-major
//! `y[m, n] = x[m, k] · w[n, k]ᵀ` is cuBLAS's column-major `yᵀ = w · xᵀ`, so no data moves. Each
//! distinct product (its operations, dimensions, strides, types and operands' alignments) gets its
//! descriptors and its algorithm from cuBLASLt's heuristic once, and every later call only
//! launches it: on the H200 machine `cublasGemmEx` spent 15–20 µs of host time per call choosing
//! again, more than most of a training step's products take on the GPU.

use anyhow::{Result, anyhow, bail};
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::sys::CUstream;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::c_void;
use std::sync::Mutex;

pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    stream: CUstream,
    /// A fixed workspace, so cuBLASLt never allocates inside a captured graph.
    _workspace: cudarc::driver::CudaSlice<u8>,
    workspace_ptr: u64,
    plans: Mutex<HashMap<Shape, Plan>>,
}

// SAFETY: the handle and the plans' descriptors are only used under the plans' lock or, for the
// handle, by cuBLASLt calls that it documents as thread safe; all work goes to the one stream.
unsafe impl Send for Gemm {}
// SAFETY: as for Send.
unsafe impl Sync for Gemm {}

/// Which element type a product reads or writes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Elem {
    F32,
    F16,
}

impl Elem {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            Elem::F32 => sys::cudaDataType::CUDA_R_32F,
            Elem::F16 => sys::cudaDataType::CUDA_R_16F,
        }
    }
}

/// A row-major matrix operand: its device address, the elements between the starts of consecutive
/// rows, and its element type.
#[derive(Clone, Copy, Debug)]
pub struct Mat {
    pub ptr: u64,
    pub ld: usize,
    pub elem: Elem,
}

const WORKSPACE: usize = 32 << 20;

/// What a product's plan depends on, in cuBLAS's column-major terms: whether A and B are
/// transposed, (m, n, k), the leading dimensions, the input and output types, and the largest
/// power of two (up to 256 bytes) dividing each operand's address, which limits the kernels that
/// may read it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Shape {
    trans: (bool, bool),
    dims: (usize, usize, usize),
    ld: (usize, usize, usize),
    elems: (Elem, Elem),
    align: (u32, u32, u32),
}

/// One shape's descriptors and the algorithm the heuristic chose for it.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created for this plan alone and is destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// The largest power of two dividing `ptr`, at most 256: the alignment cuBLASLt may assume.
fn alignment(ptr: u64) -> u32 {
    1 << ptr.trailing_zeros().min(8)
}

impl Gemm {
    /// `y[m, n] = alpha · a[m, k] · b[k, n] + beta · y`, all row-major half (cuBLAS's `yᵀ = bᵀ·aᵀ`).
    #[allow(clippy::too_many_arguments)]
    pub fn nn_half(&self, a: u64, b: u64, y: u64, m: usize, k: usize, n: usize, alpha: f32, beta: f32) -> Result<()> {
        let h = |ptr, ld| Mat { ptr, ld, elem: Elem::F16 };
        self.product((false, false), (n, m, k), h(b, n), h(a, k), h(y, n), alpha, beta)
            .map_err(|e| anyhow!("cuBLASLt ({m}×{k}·{k}×{n}): {e}"))
    }

    /// `y[m, n] = alpha · a[m, k] · b[k, n] + beta · y`, row-major operands with their own leading
    /// dimensions (a column range of a wider tensor is a pointer and the wider row length): the
    /// input gradient `dy · w` of a product. cuBLAS computes `yᵀ = bᵀ · aᵀ` on the stored data.
    #[allow(clippy::too_many_arguments)]
    pub fn nn(&self, a: Mat, b: Mat, y: Mat, m: usize, k: usize, n: usize, alpha: f32, beta: f32) -> Result<()> {
        self.product((false, false), (n, m, k), b, a, y, alpha, beta)
            .map_err(|e| anyhow!("cuBLASLt ({m}×{k}·{k}×{n}): {e}"))
    }

    /// `y[m, n] = alpha · a[k, m]ᵀ · b[k, n] + beta · y`, row-major as in `nn`: the weight gradient
    /// `dyᵀ · x`, summed over the k rows. cuBLAS computes `yᵀ = bᵀ · a`.
    #[allow(clippy::too_many_arguments)]
    pub fn tn(&self, a: Mat, b: Mat, y: Mat, m: usize, k: usize, n: usize, alpha: f32, beta: f32) -> Result<()> {
        self.product((false, true), (n, m, k), b, a, y, alpha, beta)
            .map_err(|e| anyhow!("cuBLASLt ({k}×{m}ᵀ·{k}×{n}): {e}"))
    }

    /// One column-major product `c = op(a) · op(b)` of dimensions `(m, n, k)` (cuBLAS's names),
    /// where a row-major matrix is its column-major transpose with the same leading dimension;
    /// `trans` says which of a and b are transposed.
    #[allow(clippy::too_many_arguments)]
    fn product(
        &self,
        trans: (bool, bool),
        (m, n, k): (usize, usize, usize),
        a: Mat,
        b: Mat,
        c: Mat,
        alpha: f32,
        beta: f32,
    ) -> Result<(), String> {
        if a.elem != b.elem {
            return Err(format!("operands of different types ({:?}, {:?})", a.elem, b.elem));
        }
        if m == 0 || n == 0 || (k == 0 && beta == 1.0) {
            return Ok(());
        }
        if k == 0 {
            return Err(format!("a product over k = 0 that scales its output by {beta}"));
        }
        let shape = Shape {
            trans,
            dims: (m, n, k),
            ld: (a.ld.max(1), b.ld.max(1), c.ld.max(1)),
            elems: (a.elem, c.elem),
            align: (alignment(a.ptr), alignment(b.ptr), alignment(c.ptr)),
        };
        let mut plans = self.plans.lock().map_err(|_| "the cuBLASLt plan cache was poisoned".to_string())?;
        let plan = match plans.entry(shape) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(self.plan(&shape).map_err(|e| format!("{e:#}"))?),
        };
        // SAFETY: the callers pass operands that address the extents their leading dimensions and
        // the product's dimensions describe, in the stated element types; c is read (beta) and
        // written in place, as cuBLASLt allows when C and D share a layout.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                a.ptr as *const c_void,
                plan.a,
                b.ptr as *const c_void,
                plan.b,
                c.ptr as *const c_void,
                plan.c,
                c.ptr as *mut c_void,
                plan.c,
                &plan.algo,
                self.workspace_ptr as *mut c_void,
                WORKSPACE,
                self.stream as sys::cudaStream_t,
            )
        }
        .map_err(|e| format!("{e:?}"))
    }

    /// The descriptors of `s` and the algorithm cuBLASLt's heuristic ranks first for them.
    fn plan(&self, s: &Shape) -> Result<Plan> {
        let (m, n, k) = s.dims;
        let layout = |elem: Elem, rows: usize, cols: usize, ld: usize| {
            lt::create_matrix_layout(elem.cuda(), rows as u64, cols as u64, ld as i64)
        };
        let err =
            |what: &'static str| move |e: cudarc::cublaslt::result::CublasError| anyhow!("cuBLASLt {what}: {e:?}");
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
            .map_err(err("matmul descriptor"))?;
        // Every descriptor joins the plan at once, so that an error below still destroys it.
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        let (ta, tb) = s.trans;
        plan.a = if ta { layout(s.elems.0, k, m, s.ld.0) } else { layout(s.elems.0, m, k, s.ld.0) }
            .map_err(err("layout of A"))?;
        plan.b = if tb { layout(s.elems.0, n, k, s.ld.1) } else { layout(s.elems.0, k, n, s.ld.1) }
            .map_err(err("layout of B"))?;
        plan.c = layout(s.elems.1, m, n, s.ld.2).map_err(err("layout of C"))?;
        // cublasOperation_t: 0 = N, 1 = T.
        for (attr, t) in [
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, ta),
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, tb),
        ] {
            let op = t as i32;
            // SAFETY: the attribute is an int32 (cublasOperation_t), passed by address with its size.
            unsafe { lt::set_matmul_desc_attribute(plan.desc, attr, &op as *const i32 as *const c_void, 4) }
                .map_err(err("transpose attribute"))?;
        }
        let pref = lt::create_matmul_pref().map_err(err("preference"))?;
        let chosen = (|| {
            use sys::cublasLtMatmulPreferenceAttributes_t::*;
            let ws = WORKSPACE as u64;
            // SAFETY: each attribute is passed by address with its documented size (u64, u32).
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const c_void,
                    8,
                )?;
                for (attr, bytes) in [
                    (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, s.align.0),
                    (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, s.align.1),
                    (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, s.align.2),
                    (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, s.align.2),
                ] {
                    lt::set_matmul_pref_attribute(pref, attr, &bytes as *const u32 as *const c_void, 4)?;
                }
                lt::get_matmul_algo_heuristic(self.handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref)
            }
        })();
        // SAFETY: the preference was created above and is not used again.
        unsafe { lt::destroy_matmul_pref(pref) }.map_err(err("preference"))?;
        let chosen = chosen.map_err(|e| anyhow!("cuBLASLt found no algorithm for {s:?}: {e:?}"))?;
        if chosen.workspaceSize > WORKSPACE {
            bail!("cuBLASLt chose an algorithm needing {} bytes of workspace for {s:?}", chosen.workspaceSize);
        }
        plan.algo = chosen.algo;
        Ok(plan)
    }

    pub fn new(gpu: &super::device::Gpu) -> Result<Self> {
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { sys::is_culib_present() } {
            return Err(anyhow!(
                "libcublasLt could not be loaded: install CUDA's cuBLAS (13.x) or add it to LD_LIBRARY_PATH"
            ));
        }
        gpu.ctx.bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
        let handle = lt::create_handle().map_err(|e| anyhow!("creating a cuBLASLt handle: {e:?}"))?;
        let workspace = gpu.alloc::<u8>(WORKSPACE)?;
        let workspace_ptr = gpu.ptr(&workspace);
        Ok(Self {
            handle,
            stream: gpu.stream.cu_stream(),
            _workspace: workspace,
            workspace_ptr,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// `y[m, n] = alpha · x[m, k] · w[n, k]ᵀ + beta · y`; x and w in `xin`, y in `yout`; y's rows are
    /// `ldy` elements apart (n for a whole tensor; more for a column range of a wider one).
    #[allow(clippy::too_many_arguments)]
    pub fn nt(
        &self,
        x: u64,
        w: u64,
        y: u64,
        ldy: usize,
        m: usize,
        k: usize,
        n: usize,
        xin: Elem,
        yout: Elem,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let (w, x, y) =
            (Mat { ptr: w, ld: k, elem: xin }, Mat { ptr: x, ld: k, elem: xin }, Mat { ptr: y, ld: ldy, elem: yout });
        self.product((true, false), (n, m, k), w, x, y, alpha, beta)
            .map_err(|e| anyhow!("cuBLASLt ({m}×{k}·{n}×{k}ᵀ): {e}"))
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        // The plans' descriptors go before the handle they were made for.
        if let Ok(plans) = self.plans.get_mut() {
            plans.clear();
        }
        // SAFETY: the handle was created in `new` and is destroyed once, after its last use.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

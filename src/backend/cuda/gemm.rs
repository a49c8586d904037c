//! Matrix products through cuBLAS: half inputs, fp32 accumulation, f32 or half output. Row-major
//! `y[m, n] = x[m, k] · w[n, k]ᵀ` is cuBLAS's column-major `yᵀ = w · xᵀ`, so no data moves.

use anyhow::{Result, anyhow};
use cudarc::cublas::{CudaBlas, result::gemm_ex, sys};
use std::ffi::c_void;

pub struct Gemm {
    blas: CudaBlas,
    /// A fixed workspace, so cuBLAS never allocates inside a captured graph.
    _workspace: cudarc::driver::CudaSlice<u8>,
}

/// Which element type a product reads or writes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
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

impl Gemm {
    /// `y[m, n] = alpha · a[m, k] · b[k, n] + beta · y`, all row-major half (cuBLAS's `yᵀ = bᵀ·aᵀ`).
    #[allow(clippy::too_many_arguments)]
    pub fn nn_half(&self, a: u64, b: u64, y: u64, m: usize, k: usize, n: usize, alpha: f32, beta: f32) -> Result<()> {
        let h = sys::cudaDataType::CUDA_R_16F;
        // SAFETY: a, b and y address m·k, k·n and m·n half elements.
        unsafe {
            gemm_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_N,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                h,
                n as i32,
                a as *const c_void,
                h,
                k as i32,
                &beta as *const f32 as *const c_void,
                y as *mut c_void,
                h,
                n as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| anyhow!("cublasGemmEx ({m}×{k}·{k}×{n}): {e:?}"))
    }

    /// `y[m, n] = alpha · a[m, k] · b[k, n] + beta · y`, row-major operands with their own leading
    /// dimensions (a column range of a wider tensor is a pointer and the wider row length): the
    /// input gradient `dy · w` of a product. cuBLAS computes `yᵀ = bᵀ · aᵀ` on the stored data.
    #[allow(clippy::too_many_arguments)]
    pub fn nn(&self, a: Mat, b: Mat, y: Mat, m: usize, k: usize, n: usize, alpha: f32, beta: f32) -> Result<()> {
        use sys::cublasOperation_t::CUBLAS_OP_N;
        self.row_major(CUBLAS_OP_N, CUBLAS_OP_N, b, a, y, (n, m, k), alpha, beta)
            .map_err(|e| anyhow!("cublasGemmEx ({m}×{k}·{k}×{n}): {e}"))
    }

    /// `y[m, n] = alpha · a[k, m]ᵀ · b[k, n] + beta · y`, row-major as in `nn`: the weight gradient
    /// `dyᵀ · x`, summed over the k rows. cuBLAS computes `yᵀ = bᵀ · a`.
    #[allow(clippy::too_many_arguments)]
    pub fn tn(&self, a: Mat, b: Mat, y: Mat, m: usize, k: usize, n: usize, alpha: f32, beta: f32) -> Result<()> {
        use sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        self.row_major(CUBLAS_OP_N, CUBLAS_OP_T, b, a, y, (n, m, k), alpha, beta)
            .map_err(|e| anyhow!("cublasGemmEx ({k}×{m}ᵀ·{k}×{n}): {e}"))
    }

    /// One column-major cuBLAS product `c = op(a) · op(b)` of dimensions `(m, n, k)` (cuBLAS's
    /// names), where a row-major matrix is its column-major transpose with the same leading
    /// dimension.
    #[allow(clippy::too_many_arguments)]
    fn row_major(
        &self,
        opa: sys::cublasOperation_t,
        opb: sys::cublasOperation_t,
        a: Mat,
        b: Mat,
        c: Mat,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        beta: f32,
    ) -> Result<(), String> {
        if a.elem != b.elem {
            return Err(format!("operands of different types ({:?}, {:?})", a.elem, b.elem));
        }
        if m == 0 || n == 0 || (k == 0 && beta == 1.0) {
            return Ok(());
        }
        // SAFETY: the callers pass operands that address the extents their leading dimensions and
        // the product's dimensions describe, in the stated element types.
        unsafe {
            gemm_ex(
                *self.blas.handle(),
                opa,
                opb,
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                a.ptr as *const c_void,
                a.elem.cuda(),
                a.ld.max(1) as i32,
                b.ptr as *const c_void,
                b.elem.cuda(),
                b.ld.max(1) as i32,
                &beta as *const f32 as *const c_void,
                c.ptr as *mut c_void,
                c.elem.cuda(),
                c.ld.max(1) as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| format!("{e:?}"))
    }

    pub fn new(gpu: &super::device::Gpu) -> Result<Self> {
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { sys::is_culib_present() } {
            return Err(anyhow!(
                "libcublas could not be loaded: install CUDA's cuBLAS (13.x) or add it to LD_LIBRARY_PATH"
            ));
        }
        let blas = CudaBlas::new(gpu.stream.clone()).map_err(|e| anyhow!("creating a cuBLAS handle: {e:?}"))?;
        let workspace = gpu.alloc::<u8>(WORKSPACE)?;
        let ptr = gpu.ptr(&workspace);
        // SAFETY: the workspace outlives the handle (both live in this struct, dropped together).
        let status = unsafe { sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut c_void, WORKSPACE) };
        if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(anyhow!("cublasSetWorkspace failed: {status:?}"));
        }
        Ok(Self { blas, _workspace: workspace })
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
        if m == 0 || n == 0 {
            return Ok(());
        }
        // SAFETY: x, w and y address at least m·k, n·k and m·n elements of the stated types.
        unsafe {
            gemm_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                xin.cuda(),
                k as i32,
                x as *const c_void,
                xin.cuda(),
                k as i32,
                &beta as *const f32 as *const c_void,
                y as *mut c_void,
                yout.cuda(),
                ldy as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| anyhow!("cublasGemmEx ({m}×{k}·{n}×{k}ᵀ): {e:?}"))
    }
}

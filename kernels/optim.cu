// The optimiser's kernels: a multi-tensor Adam update, a multi-tensor Σx² (in f64) for gradient
// norms and a multi-tensor zeroing of the gradients, each one launch for every tensor of a step;
// Adafactor's passes, each one launch for every tensor of a step too.
#include "common.cuh"

// The multi-tensor launches' table search: the last tensor whose first block in this launch (field
// F, non-decreasing over the table) is at most this block. A tensor with no blocks here has the
// next one's first block, so the search passes over it.
template <typename T, long T::*F>
__device__ int tensor_of_block(const T* ts, int count) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (ts[mid].*F <= (long)blockIdx.x) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// One tensor of a multi-tensor Adam update, as src/backend/cuda/optim.rs lays it out: eight
// 64-bit words. `copy` (or null) receives the updated values in half; `first_block` is the first
// block of the launch that works on this tensor.
struct AdamTensor {
    float* p;
    const float* g;
    float* m;
    float* v;
    __half* copy;
    long n;
    float decay;
    unsigned pad;
    long first_block;
};


// torch.optim.Adam's (AdamW's, with `decay` = 1 − lr·weight_decay) element update in the CPU
// reference's order of operations (`adam_element`: the decay first, torch's lerp for the first
// moment), each operation rounded on its own (no fused multiply-add), so both backends produce the
// same bits. The f32 factors are `AdamStep::factors`, derived on the host. Every tensor of a step in
// one launch: block b works on the last tensor whose first block is at most b.
extern "C" __global__ void adam_multi(const AdamTensor* ts, int count, float w1, float beta2, float w2,
                                      float neg_step, float bc2_sqrt, float eps, float grad_scale) {
    const AdamTensor t = ts[tensor_of_block<AdamTensor, &AdamTensor::first_block>(ts, count)];
    long i = ((long)blockIdx.x - t.first_block) * blockDim.x * ADAM_PER_THREAD + threadIdx.x;
    for (int k = 0; k < ADAM_PER_THREAD; ++k, i += blockDim.x) {
        if (i >= t.n) return;
        float gi = __fmul_rn(t.g[i], grad_scale);
        float pi = __fmul_rn(t.p[i], t.decay);
        float mi = __fadd_rn(t.m[i], __fmul_rn(w1, __fsub_rn(gi, t.m[i])));
        float vi = __fadd_rn(__fmul_rn(t.v[i], beta2), __fmul_rn(__fmul_rn(w2, gi), gi));
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        t.m[i] = mi;
        t.v[i] = vi;
        float updated = __fadd_rn(pi, __fdiv_rn(__fmul_rn(neg_step, mi), denom));
        t.p[i] = updated;
        if (t.copy) t.copy[i] = __float2half_rn(updated);
    }
}

// One tensor of a multi-tensor pass over plain values (Σx², zeroing), as src/backend/cuda/optim.rs
// lays it out: four 64-bit words.
struct TensorSpan {
    void* x;
    long n;
    long first_block;
    long half;
};


// Σx² in f64 over every tensor of a step in one launch: block b takes a chunk of the last tensor
// whose first block is at most b and writes one partial sum, which the host adds in a fixed order
// (a deterministic result, unlike atomics).
extern "C" __global__ void sum_squares_multi(const TensorSpan* ts, int count, double* partial) {
    __shared__ double scratch[32];
    const TensorSpan t = ts[tensor_of_block<TensorSpan, &TensorSpan::first_block>(ts, count)];
    long i = ((long)blockIdx.x - t.first_block) * blockDim.x * SPAN_PER_THREAD + threadIdx.x;
    double s = 0.0;
    for (int k = 0; k < SPAN_PER_THREAD && i < t.n; ++k, i += blockDim.x) {
        double v = t.half ? (double)__half2float(static_cast<const __half*>(t.x)[i]) : (double)static_cast<const float*>(t.x)[i];
        s += v * v;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) scratch[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < nw ? scratch[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) partial[blockIdx.x] = s;
    }
}

// Every tensor of a table set to zero in one launch, as `sum_squares_multi` reads them.
extern "C" __global__ void zero_multi(const TensorSpan* ts, int count) {
    const TensorSpan t = ts[tensor_of_block<TensorSpan, &TensorSpan::first_block>(ts, count)];
    long i = ((long)blockIdx.x - t.first_block) * blockDim.x * SPAN_PER_THREAD + threadIdx.x;
    for (int k = 0; k < SPAN_PER_THREAD && i < t.n; ++k, i += blockDim.x) {
        if (t.half) {
            static_cast<__half*>(t.x)[i] = __float2half_rn(0.f);
        } else {
            static_cast<float*>(t.x)[i] = 0.f;
        }
    }
}

// ---- Adafactor (transformers' `Adafactor.step`), every tensor ("part") of a step at once ---------
// src/backend/cuda/optim.rs launches, each over every part: the second-moment statistics (factored
// rows with their column partials and columns, or the unfactored moment) with Σp² partials; the rate
// and the row mean (`adafactor_rate_multi`); Σu² partials of the unclipped update; the clip divisor
// (`adafactor_clip_multi`); the update. Every sum is f64 partials added in a fixed order, so results
// do not depend on scheduling. `scal` holds four device-side scalars per part: [0] the rate, [1] the
// row statistics' mean, [2] the clip divisor.

// One part, as src/backend/cuda/optim.rs lays it out: sixteen 64-bit words. `cols` is 0 for an
// unfactored part (`row` then holds its moment). Each `*_block` is the part's first block in that
// launch (`tensor_of_block`'s field).
struct AdafactorTensor {
    float* p;
    const float* g;
    float* row;
    float* col;
    float* m;
    __half* copy;
    long rows, cols, n;
    float weight_decay;
    unsigned pad;
    long stats_block;  // one block per row (factored) or per ADAFACTOR_PER_BLOCK values
    long colp_block;   // ⌈cols / threads⌉ × ⌈rows / ADAFACTOR_COL_ROWS⌉ blocks (factored)
    long cols_block;   // ⌈cols / threads⌉ blocks (factored)
    long elem_block;   // ⌈n / ADAFACTOR_PER_BLOCK⌉ blocks: Σu² and the update
    long partial_off;  // the column partials' offset in their buffer
    long pad2;
};

// Σ of one f64 per thread over the block (blockDim.x a multiple of 32, at most 1024); thread 0 has it.
__device__ double adafactor_block_sum(double s) {
    __shared__ double scratch[32];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) scratch[warp] = s;
    __syncthreads();
    s = 0.0;
    if (warp == 0) {
        s = lane < nw ? scratch[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    }
    __syncthreads();
    return s;
}

// A factored part's block per row: row[r] ← row[r]·β₂ₜ + mean_c(g² + eps1)·(1 − β₂ₜ), and its Σ_c p².
// An unfactored part's block per ADAFACTOR_PER_BLOCK values: v ← v·β₂ₜ + (g² + eps1)·(1 − β₂ₜ)
// element-wise, and their Σp². Either way psq[block] takes the Σp².
extern "C" __global__ void adafactor_stats_multi(const AdafactorTensor* ts, int count, float grad_scale, float eps1,
                                                 float b2, float w2, double* psq) {
    const AdafactorTensor t = ts[tensor_of_block<AdafactorTensor, &AdafactorTensor::stats_block>(ts, count)];
    long local = (long)blockIdx.x - t.stats_block;
    double ps = 0.0;
    if (t.cols > 0) {
        long r = local;
        double s = 0.0;
        for (long c = threadIdx.x; c < t.cols; c += blockDim.x) {
            float gi = __fmul_rn(t.g[r * t.cols + c], grad_scale);
            s += (double)__fadd_rn(__fmul_rn(gi, gi), eps1);
            double pv = t.p[r * t.cols + c];
            ps += pv * pv;
        }
        s = adafactor_block_sum(s);
        ps = adafactor_block_sum(ps);
        if (threadIdx.x == 0) t.row[r] = __fadd_rn(__fmul_rn(t.row[r], b2), __fmul_rn((float)(s / (double)t.cols), w2));
    } else {
        long base = local * ADAFACTOR_PER_BLOCK;
        for (long i = base + threadIdx.x; i < min(t.n, base + (long)ADAFACTOR_PER_BLOCK); i += blockDim.x) {
            float gi = __fmul_rn(t.g[i], grad_scale);
            t.row[i] = __fadd_rn(__fmul_rn(t.row[i], b2), __fmul_rn(__fadd_rn(__fmul_rn(gi, gi), eps1), w2));
            double pv = t.p[i];
            ps += pv * pv;
        }
        ps = adafactor_block_sum(ps);
    }
    if (threadIdx.x == 0) psq[blockIdx.x] = ps;
}

// A factored part's column sums of g² + eps1 over chunks of ADAFACTOR_COL_ROWS rows: its block
// (x, y) takes columns x·blockDim.x… of rows y·ADAFACTOR_COL_ROWS…, one column a thread.
extern "C" __global__ void adafactor_col_partials_multi(const AdafactorTensor* ts, int count, float grad_scale,
                                                        float eps1, double* partial) {
    const AdafactorTensor t = ts[tensor_of_block<AdafactorTensor, &AdafactorTensor::colp_block>(ts, count)];
    long local = (long)blockIdx.x - t.colp_block, col_blocks = (t.cols + blockDim.x - 1) / blockDim.x;
    long x = local % col_blocks, y = local / col_blocks;
    long c = x * blockDim.x + threadIdx.x;
    if (c >= t.cols) return;
    long r0 = y * ADAFACTOR_COL_ROWS;
    long r1 = min(t.rows, r0 + (long)ADAFACTOR_COL_ROWS);
    double s = 0.0;
    for (long r = r0; r < r1; ++r) {
        float gi = __fmul_rn(t.g[r * t.cols + c], grad_scale);
        s += (double)__fadd_rn(__fmul_rn(gi, gi), eps1);
    }
    partial[t.partial_off + y * t.cols + c] = s;
}

// col[c] ← col[c]·β₂ₜ + mean_r(g² + eps1)·(1 − β₂ₜ), the chunks' partials added in order.
extern "C" __global__ void adafactor_cols_multi(const AdafactorTensor* ts, int count, const double* partial, float b2,
                                                float w2) {
    const AdafactorTensor t = ts[tensor_of_block<AdafactorTensor, &AdafactorTensor::cols_block>(ts, count)];
    long c = ((long)blockIdx.x - t.cols_block) * blockDim.x + threadIdx.x;
    if (c >= t.cols) return;
    long chunks = (t.rows + ADAFACTOR_COL_ROWS - 1) / ADAFACTOR_COL_ROWS;
    double s = 0.0;
    for (long k = 0; k < chunks; ++k) s += partial[t.partial_off + k * t.cols + c];
    t.col[c] = __fadd_rn(__fmul_rn(t.col[c], b2), __fmul_rn((float)(s / (double)t.rows), w2));
}

// One block per part: the rate rel·max(eps2, RMS(p)) (or rel) from its Σp² partials, and the mean
// of its row statistics (factored parts; 1 otherwise).
extern "C" __global__ void adafactor_rate_multi(const AdafactorTensor* ts, const double* psq, float rel,
                                                int scale_parameter, float eps2, float* scal) {
    const AdafactorTensor t = ts[blockIdx.x];
    long partials = t.cols > 0 ? t.rows : (t.n + ADAFACTOR_PER_BLOCK - 1) / ADAFACTOR_PER_BLOCK;
    long rows = t.cols > 0 ? t.rows : 0;
    double s = 0.0, rs = 0.0;
    for (long i = threadIdx.x; i < partials; i += blockDim.x) s += psq[t.stats_block + i];
    for (long i = threadIdx.x; i < rows; i += blockDim.x) rs += (double)t.row[i];
    s = adafactor_block_sum(s);
    rs = adafactor_block_sum(rs);
    if (threadIdx.x == 0) {
        float rms = (float)sqrt(s / (double)t.n);
        float scale = scale_parameter ? fmaxf(eps2, rms) : 1.0f;
        scal[4 * blockIdx.x] = __fmul_rn(scale, rel);
        scal[4 * blockIdx.x + 1] = rows > 0 ? (float)(rs / (double)rows) : 1.0f;
    }
}

// The unclipped update of element i: g·rsqrt(row/mean)·rsqrt(col) (factored, cols > 0) or
// g·rsqrt(v) (unfactored, `row` being v).
__device__ float adafactor_u(const AdafactorTensor& t, const float* scal, long i, float grad_scale) {
    float gi = __fmul_rn(t.g[i], grad_scale);
    if (t.cols > 0) {
        long r = i / t.cols, c = i - r * t.cols;
        float rf = __fdiv_rn(1.0f, __fsqrt_rn(__fdiv_rn(t.row[r], scal[1])));
        float cf = __fdiv_rn(1.0f, __fsqrt_rn(t.col[c]));
        return __fmul_rn(__fmul_rn(rf, cf), gi);
    }
    return __fmul_rn(__fdiv_rn(1.0f, __fsqrt_rn(t.row[i])), gi);
}

// One Σu² per block of the unclipped update.
extern "C" __global__ void adafactor_update_sq_multi(const AdafactorTensor* ts, int count, const float* scal,
                                                     float grad_scale, double* usq) {
    int part = tensor_of_block<AdafactorTensor, &AdafactorTensor::elem_block>(ts, count);
    const AdafactorTensor t = ts[part];
    long base = ((long)blockIdx.x - t.elem_block) * ADAFACTOR_PER_BLOCK;
    double s = 0.0;
    for (long i = base + threadIdx.x; i < min(t.n, base + (long)ADAFACTOR_PER_BLOCK); i += blockDim.x) {
        double u = adafactor_u(t, scal + 4 * part, i, grad_scale);
        s += u * u;
    }
    s = adafactor_block_sum(s);
    if (threadIdx.x == 0) usq[blockIdx.x] = s;
}

// One block per part: the clip divisor max(RMS(u) / clip_threshold, 1).
extern "C" __global__ void adafactor_clip_multi(const AdafactorTensor* ts, const double* usq, float clip_threshold,
                                                float* scal) {
    const AdafactorTensor t = ts[blockIdx.x];
    long partials = (t.n + ADAFACTOR_PER_BLOCK - 1) / ADAFACTOR_PER_BLOCK;
    double s = 0.0;
    for (long i = threadIdx.x; i < partials; i += blockDim.x) s += usq[t.elem_block + i];
    s = adafactor_block_sum(s);
    if (threadIdx.x == 0) scal[4 * blockIdx.x + 2] = fmaxf(__fdiv_rn((float)sqrt(s / (double)t.n), clip_threshold), 1.0f);
}

// The update: u ← u / clip · lr; with a first moment m ← m·β₁ + u·w1 (w1 = 1 − β₁), u ← m; then
// p ← p + p·(−weight_decay·lr) (when weight_decay ≠ 0), p ← p − u, and the half copy.
extern "C" __global__ void adafactor_apply_multi(const AdafactorTensor* ts, int count, const float* scal,
                                                 float grad_scale, float beta1, float w1) {
    int part = tensor_of_block<AdafactorTensor, &AdafactorTensor::elem_block>(ts, count);
    const AdafactorTensor t = ts[part];
    const float* sc = scal + 4 * part;
    long base = ((long)blockIdx.x - t.elem_block) * ADAFACTOR_PER_BLOCK;
    float lr = sc[0], clip = sc[2];
    float decay = __fmul_rn(-t.weight_decay, lr);
    for (long i = base + threadIdx.x; i < min(t.n, base + (long)ADAFACTOR_PER_BLOCK); i += blockDim.x) {
        float u = __fmul_rn(__fdiv_rn(adafactor_u(t, sc, i, grad_scale), clip), lr);
        if (t.m) {
            t.m[i] = __fadd_rn(__fmul_rn(t.m[i], beta1), __fmul_rn(u, w1));
            u = t.m[i];
        }
        float pi = t.p[i];
        if (t.weight_decay != 0.0f) pi = __fadd_rn(pi, __fmul_rn(pi, decay));
        pi = __fsub_rn(pi, u);
        t.p[i] = pi;
        if (t.copy) t.copy[i] = __float2half_rn(pi);
    }
}

// The optimiser's kernels: a multi-tensor Adam update and a multi-tensor Σx² (in f64) for gradient
// norms, each one launch for every tensor of a step; Adafactor's passes, a few launches per tensor.
#include "common.cuh"

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
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (ts[mid].first_block <= (long)blockIdx.x) lo = mid; else hi = mid - 1;
    }
    const AdamTensor t = ts[lo];
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

// One tensor of a multi-tensor Σx², as src/backend/cuda/optim.rs lays it out: four 64-bit words.
struct SumSquaresTensor {
    const void* x;
    long n;
    long first_block;
    long half;
};


// Σx² in f64 over every tensor of a step in one launch: block b takes a chunk of the last tensor
// whose first block is at most b and writes one partial sum, which the host adds in a fixed order
// (a deterministic result, unlike atomics).
extern "C" __global__ void sum_squares_multi(const SumSquaresTensor* ts, int count, double* partial) {
    __shared__ double scratch[32];
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (ts[mid].first_block <= (long)blockIdx.x) lo = mid; else hi = mid - 1;
    }
    const SumSquaresTensor t = ts[lo];
    long i = ((long)blockIdx.x - t.first_block) * blockDim.x * SUM_SQUARES_PER_THREAD + threadIdx.x;
    double s = 0.0;
    for (int k = 0; k < SUM_SQUARES_PER_THREAD && i < t.n; ++k, i += blockDim.x) {
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

// ---- Adafactor (transformers' `Adafactor.step`), one tensor ("part") at a time --------------------
// src/backend/cuda/optim.rs launches, per part: the second-moment statistics (factored rows and
// columns, or the unfactored moment) with Σp² partials; the rate and the row mean (`adafactor_rate`);
// Σu² partials of the unclipped update; the clip divisor (`adafactor_clip`); the update. Every sum
// is f64 partials added in a fixed order, so results do not depend on scheduling. `scal` holds the
// part's device-side scalars: [0] the rate, [1] the row statistics' mean, [2] the clip divisor.

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

// One block per row of a factored part: row[r] ← row[r]·β₂ₜ + mean_c(g² + eps1)·(1 − β₂ₜ), and
// psq[r] = Σ_c p².
extern "C" __global__ void adafactor_rows(const float* g, const float* p, float* row, long cols, float grad_scale,
                                          float eps1, float b2, float w2, double* psq) {
    long r = blockIdx.x;
    double s = 0.0, ps = 0.0;
    for (long c = threadIdx.x; c < cols; c += blockDim.x) {
        float gi = __fmul_rn(g[r * cols + c], grad_scale);
        s += (double)__fadd_rn(__fmul_rn(gi, gi), eps1);
        double pv = p[r * cols + c];
        ps += pv * pv;
    }
    s = adafactor_block_sum(s);
    ps = adafactor_block_sum(ps);
    if (threadIdx.x == 0) {
        row[r] = __fadd_rn(__fmul_rn(row[r], b2), __fmul_rn((float)(s / (double)cols), w2));
        psq[r] = ps;
    }
}

// Column sums of g² + eps1 over chunks of ADAFACTOR_COL_ROWS rows: block (x, y) takes columns
// x·blockDim.x… of rows y·ADAFACTOR_COL_ROWS…, one column a thread (coalesced over columns).
extern "C" __global__ void adafactor_col_partials(const float* g, long rows, long cols, float grad_scale, float eps1,
                                                  double* partial) {
    long c = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    long r0 = (long)blockIdx.y * ADAFACTOR_COL_ROWS;
    long r1 = min(rows, r0 + (long)ADAFACTOR_COL_ROWS);
    double s = 0.0;
    for (long r = r0; r < r1; ++r) {
        float gi = __fmul_rn(g[r * cols + c], grad_scale);
        s += (double)__fadd_rn(__fmul_rn(gi, gi), eps1);
    }
    partial[blockIdx.y * cols + c] = s;
}

// col[c] ← col[c]·β₂ₜ + mean_r(g² + eps1)·(1 − β₂ₜ), the chunks' partials added in order.
extern "C" __global__ void adafactor_cols(const double* partial, long chunks, long rows, long cols, float* col, float b2,
                                          float w2) {
    long c = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    double s = 0.0;
    for (long k = 0; k < chunks; ++k) s += partial[k * cols + c];
    col[c] = __fadd_rn(__fmul_rn(col[c], b2), __fmul_rn((float)(s / (double)rows), w2));
}

// An unfactored part: v ← v·β₂ₜ + (g² + eps1)·(1 − β₂ₜ) element-wise, and one Σp² per block.
extern "C" __global__ void adafactor_vec(const float* g, const float* p, float* v, long n, float grad_scale, float eps1,
                                         float b2, float w2, double* psq) {
    long base = (long)blockIdx.x * ADAFACTOR_PER_BLOCK;
    double ps = 0.0;
    for (long i = base + threadIdx.x; i < min(n, base + (long)ADAFACTOR_PER_BLOCK); i += blockDim.x) {
        float gi = __fmul_rn(g[i], grad_scale);
        v[i] = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fadd_rn(__fmul_rn(gi, gi), eps1), w2));
        double pv = p[i];
        ps += pv * pv;
    }
    ps = adafactor_block_sum(ps);
    if (threadIdx.x == 0) psq[blockIdx.x] = ps;
}

// One block: the rate rel·max(eps2, RMS(p)) (or rel) from the Σp² partials, and the mean of the
// `rows` row statistics (factored parts; 1 otherwise).
extern "C" __global__ void adafactor_rate(const double* psq, long count, long n, const float* row, long rows,
                                          float rel, int scale_parameter, float eps2, float* scal) {
    double s = 0.0, rs = 0.0;
    for (long i = threadIdx.x; i < count; i += blockDim.x) s += psq[i];
    for (long i = threadIdx.x; i < rows; i += blockDim.x) rs += (double)row[i];
    s = adafactor_block_sum(s);
    rs = adafactor_block_sum(rs);
    if (threadIdx.x == 0) {
        float rms = (float)sqrt(s / (double)n);
        float scale = scale_parameter ? fmaxf(eps2, rms) : 1.0f;
        scal[0] = __fmul_rn(scale, rel);
        scal[1] = rows > 0 ? (float)(rs / (double)rows) : 1.0f;
    }
}

// The unclipped update of element i: g·rsqrt(row/mean)·rsqrt(col) (factored, cols > 0) or
// g·rsqrt(v) (unfactored, `row` being v).
__device__ float adafactor_u(const float* g, const float* row, const float* col, long cols, const float* scal, long i,
                             float grad_scale) {
    float gi = __fmul_rn(g[i], grad_scale);
    if (cols > 0) {
        long r = i / cols, c = i - r * cols;
        float rf = __fdiv_rn(1.0f, __fsqrt_rn(__fdiv_rn(row[r], scal[1])));
        float cf = __fdiv_rn(1.0f, __fsqrt_rn(col[c]));
        return __fmul_rn(__fmul_rn(rf, cf), gi);
    }
    return __fmul_rn(__fdiv_rn(1.0f, __fsqrt_rn(row[i])), gi);
}

// One Σu² per block of the unclipped update.
extern "C" __global__ void adafactor_update_sq(const float* g, const float* row, const float* col, long cols, long n,
                                               const float* scal, float grad_scale, double* usq) {
    long base = (long)blockIdx.x * ADAFACTOR_PER_BLOCK;
    double s = 0.0;
    for (long i = base + threadIdx.x; i < min(n, base + (long)ADAFACTOR_PER_BLOCK); i += blockDim.x) {
        double u = adafactor_u(g, row, col, cols, scal, i, grad_scale);
        s += u * u;
    }
    s = adafactor_block_sum(s);
    if (threadIdx.x == 0) usq[blockIdx.x] = s;
}

// One block: the clip divisor max(RMS(u) / clip_threshold, 1).
extern "C" __global__ void adafactor_clip(const double* usq, long count, long n, float clip_threshold, float* scal) {
    double s = 0.0;
    for (long i = threadIdx.x; i < count; i += blockDim.x) s += usq[i];
    s = adafactor_block_sum(s);
    if (threadIdx.x == 0) scal[2] = fmaxf(__fdiv_rn((float)sqrt(s / (double)n), clip_threshold), 1.0f);
}

// The update: u ← u / clip · lr; with a first moment m ← m·β₁ + u·w1 (w1 = 1 − β₁), u ← m; then
// p ← p + p·(−weight_decay·lr) (when weight_decay ≠ 0), p ← p − u, and the half copy.
extern "C" __global__ void adafactor_apply(float* p, const float* g, const float* row, const float* col, long cols, long n,
                                           float* m, __half* copy, const float* scal, float grad_scale, float beta1,
                                           float w1, float weight_decay) {
    long base = (long)blockIdx.x * ADAFACTOR_PER_BLOCK;
    float lr = scal[0], clip = scal[2];
    float decay = __fmul_rn(-weight_decay, lr);
    for (long i = base + threadIdx.x; i < min(n, base + (long)ADAFACTOR_PER_BLOCK); i += blockDim.x) {
        float u = __fmul_rn(__fdiv_rn(adafactor_u(g, row, col, cols, scal, i, grad_scale), clip), lr);
        if (m) {
            m[i] = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(u, w1));
            u = m[i];
        }
        float pi = p[i];
        if (weight_decay != 0.0f) pi = __fadd_rn(pi, __fmul_rn(pi, decay));
        pi = __fsub_rn(pi, u);
        p[i] = pi;
        if (copy) copy[i] = __float2half_rn(pi);
    }
}

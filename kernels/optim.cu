// The optimiser's kernels: a multi-tensor Adam update and a multi-tensor Σx² (in f64) for gradient
// norms, each one launch for every tensor of a step.
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

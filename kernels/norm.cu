// Row normalisations with fp32 statistics and their backward forms: T5's RMS norm (output in half,
// for the matrix products that always follow it) with its input and weight gradients, and BERT's
// LayerNorm (f32 output: it is also the residual stream).
#include "common.cuh"

template <typename TI>
__device__ void rms_norm(const TI* x, const __half* w, __half* y, int d, float eps) {
    __shared__ float scratch[32];
    const TI* xr = x + (long)blockIdx.x * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = to_f(xr[i]);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / d + eps);
    __half* yr = y + (long)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = __float2half_rn(to_f(xr[i]) * inv * __half2float(w[i]));
}
extern "C" __global__ void rms_norm_f32(const float* x, const __half* w, __half* y, int d, float eps) { rms_norm(x, w, y, d, eps); }
extern "C" __global__ void rms_norm_f16(const __half* x, const __half* w, __half* y, int d, float eps) { rms_norm(x, w, y, d, eps); }

template <typename TI>
__device__ void layer_norm(const TI* x, const __half* w, const __half* b, float* y, int d, float eps) {
    __shared__ float scratch[32];
    const TI* xr = x + (long)blockIdx.x * d;
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += to_f(xr[i]);
    float mean = block_sum(s, scratch) / d;
    float v = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float c = to_f(xr[i]) - mean;
        v += c * c;
    }
    float inv = rsqrtf(block_sum(v, scratch) / d + eps);
    float* yr = y + (long)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        yr[i] = (to_f(xr[i]) - mean) * inv * __half2float(w[i]) + __half2float(b[i]);
}
extern "C" __global__ void layer_norm_f32(const float* x, const __half* w, const __half* b, float* y, int d, float eps) { layer_norm(x, w, b, y, d, eps); }
extern "C" __global__ void layer_norm_f16(const __half* x, const __half* w, const __half* b, float* y, int d, float eps) { layer_norm(x, w, b, y, d, eps); }

// dx += ∂/∂x of x · rsqrt(mean(x²) + eps) · w, one block per row: with r = rsqrt(mean(x²) + eps),
// dx = r·dy·w − x · r³ · Σ(x·dy·w) / d.
template <typename TX, typename TG>
__device__ void rms_norm_backward(const TX* x, const __half* w, const TG* dy, float* dx, int d, float eps) {
    __shared__ float scratch[32];
    long row = blockIdx.x;
    const TX* xr = x + row * d;
    const TG* gr = dy + row * d;
    float* dr = dx + row * d;
    float ss = 0.f, dot = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = to_f(xr[i]);
        ss += v * v;
        dot += v * to_f(gr[i]) * __half2float(w[i]);
    }
    ss = block_sum(ss, scratch);
    dot = block_sum(dot, scratch);
    // IEEE sqrt and division, as the CPU reference computes r.
    float r = 1.f / sqrtf(ss / d + eps);
    float c = r * r * r * dot / d;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        dr[i] += r * to_f(gr[i]) * __half2float(w[i]) - c * to_f(xr[i]);
}
#define RMS_BWD(NAME, TX, TG) \
    extern "C" __global__ void NAME(const TX* x, const __half* w, const TG* dy, float* dx, int d, float eps) { \
        rms_norm_backward(x, w, dy, dx, d, eps); \
    }
RMS_BWD(rms_norm_backward_f32_f32, float, float)
RMS_BWD(rms_norm_backward_f32_f16, float, __half)
RMS_BWD(rms_norm_backward_f16_f32, __half, float)
RMS_BWD(rms_norm_backward_f16_f16, __half, __half)

// r[row] = rsqrt(mean(x²) + eps), one block per row, computed as rms_norm_backward computes it.
template <typename T>
__device__ void rms_inverse(const T* x, float* r, int d, float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (long)blockIdx.x * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = to_f(xr[i]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    if (threadIdx.x == 0) r[blockIdx.x] = 1.f / sqrtf(ss / d + eps);
}
extern "C" __global__ void rms_inverse_f32(const float* x, float* r, int d, float eps) { rms_inverse(x, r, d, eps); }
extern "C" __global__ void rms_inverse_f16(const __half* x, float* r, int d, float eps) { rms_inverse(x, r, d, eps); }

// dw[c] += Σ_rows dy·x·r over a chunk of RMS_ROWS rows per block (grid: column blocks × row
// chunks), so that tall inputs spread over the machine; one atomic per column and chunk.
template <typename TX, typename TG>
__device__ void rms_weight_grad(const TX* x, const TG* dy, const float* r, float* dw, long rows, int d) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    long r0 = (long)blockIdx.y * RMS_ROWS, r1 = min(rows, r0 + RMS_ROWS);
    float acc = 0.f;
    for (long row = r0; row < r1; row++) acc += to_f(dy[row * d + c]) * to_f(x[row * d + c]) * r[row];
    atomicAdd(dw + c, acc);
}
#define RMS_WG(NAME, TX, TG) \
    extern "C" __global__ void NAME(const TX* x, const TG* dy, const float* r, float* dw, long rows, int d) { \
        rms_weight_grad(x, dy, r, dw, rows, d); \
    }
RMS_WG(rms_weight_grad_f32_f32, float, float)
RMS_WG(rms_weight_grad_f32_f16, float, __half)
RMS_WG(rms_weight_grad_f16_f32, __half, float)
RMS_WG(rms_weight_grad_f16_f16, __half, __half)

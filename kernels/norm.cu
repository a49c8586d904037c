// Row normalisations with fp32 statistics: T5's RMS norm (output in half, for the matrix products
// that always follow it) and BERT's LayerNorm (f32 output: it is also the residual stream).
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

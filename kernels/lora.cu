// LoRA's low-rank branch beside a base product: h = scale·dropout(x)·Aᵀ, then y += h·Bᵀ, in f32.
// r is small (8–64), so both halves are thin products a row-per-block kernel covers well.
#include "common.cuh"

// Grid (m); shared memory: one row of x, dropout applied, [in] floats.
template <typename T>
__device__ void lora_down(const T* x, const float* a, float* h, int in, int r, float scale, float p, u64 seed, u64 stream) {
    extern __shared__ float xs[];
    long row = blockIdx.x;
    float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
    for (int i = threadIdx.x; i < in; i += blockDim.x) {
        long idx = row * in + i;
        float v = to_f(x[idx]);
        if (p > 0.f) v = dropout_keep(p, seed, stream, (u64)idx) ? v * keep_scale : 0.f;
        xs[i] = v;
    }
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int j = warp; j < r; j += nw) {
        const float* ar = a + (long)j * in;
        float s = 0.f;
        for (int i = lane; i < in; i += 32) s += xs[i] * ar[i];
        s = warp_sum(s);
        if (lane == 0) h[row * r + j] = s * scale;
    }
}
extern "C" __global__ void lora_down_f32(const float* x, const float* a, float* h, int in, int r, float scale, float p, u64 seed, u64 stream) { lora_down(x, a, h, in, r, scale, p, seed, stream); }
extern "C" __global__ void lora_down_f16(const __half* x, const float* a, float* h, int in, int r, float scale, float p, u64 seed, u64 stream) { lora_down(x, a, h, in, r, scale, p, seed, stream); }

// Grid (m, ceil(out / blockDim)): rows on x, whose limit is 2³¹ − 1; shared memory: one row of h.
template <typename TY>
__device__ void lora_up(const float* h, const float* bm, TY* y, int r, int out) {
    extern __shared__ float hs[];
    long row = blockIdx.x;
    for (int k = threadIdx.x; k < r; k += blockDim.x) hs[k] = h[row * r + k];
    __syncthreads();
    int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= out) return;
    const float* br = bm + (long)j * r;
    float s = 0.f;
    for (int k = 0; k < r; k++) s += hs[k] * br[k];
    long o = row * out + j;
    y[o] = from_f<TY>(to_f(y[o]) + s);
}
extern "C" __global__ void lora_up_f32(const float* h, const float* b, float* y, int r, int out) { lora_up(h, b, y, r, out); }
extern "C" __global__ void lora_up_f16(const float* h, const float* b, __half* y, int r, int out) { lora_up(h, b, y, r, out); }

// Element-wise kernels: casts, residual adds, scaling, bias, activations, gated-gelu with its fused
// dropout and its backward (one gelu_new), and dropout of f16 and f32 values with the shared
// counter RNG.
#include "common.cuh"

extern "C" __global__ void cast_f32_f16(const float* x, __half* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = __float2half_rn(x[i]);
}

extern "C" __global__ void cast_f16_f32(const __half* x, float* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = __half2float(x[i]);
}

template <typename TX, typename TY>
__device__ void add_assign(TX* x, const TY* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = from_f<TX>(to_f(x[i]) + to_f(y[i]));
}
extern "C" __global__ void add_assign_f32_f32(float* x, const float* y, long n) { add_assign(x, y, n); }
extern "C" __global__ void add_assign_f32_f16(float* x, const __half* y, long n) { add_assign(x, y, n); }
extern "C" __global__ void add_assign_f16_f32(__half* x, const float* y, long n) { add_assign(x, y, n); }
extern "C" __global__ void add_assign_f16_f16(__half* x, const __half* y, long n) { add_assign(x, y, n); }

template <typename T>
__device__ void scale(T* x, float s, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = from_f<T>(to_f(x[i]) * s);
}
extern "C" __global__ void scale_f32(float* x, float s, long n) { scale(x, s, n); }
extern "C" __global__ void scale_f16(__half* x, float s, long n) { scale(x, s, n); }

template <typename T, typename TB>
__device__ void bias_add(T* x, const TB* b, long rows, int d) {
    long n = rows * d;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = from_f<T>(to_f(x[i]) + to_f(b[i % d]));
}
extern "C" __global__ void bias_add_f32_f16(float* x, const __half* b, long rows, int d) { bias_add(x, b, rows, d); }
extern "C" __global__ void bias_add_f16_f16(__half* x, const __half* b, long rows, int d) { bias_add(x, b, rows, d); }
extern "C" __global__ void bias_add_f32_f32(float* x, const float* b, long rows, int d) { bias_add(x, b, rows, d); }

// T5 v1.1's tanh approximation; the CPU reference writes the constant as 0.797_884_6 (the same
// f32 as √(2/π)).
#define GELU_C 0.7978846f

__device__ __forceinline__ float gelu_new(float x) {
    return 0.5f * x * (1.f + tanhf(GELU_C * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.f + erff(x * 0.7071067811865476f)); }

// act: 0 = GeluErf, 1 = GeluNew, 2 = Tanh (the order of backend::Activation).
template <typename T>
__device__ void activation(const T* x, float* y, long n, int act) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = to_f(x[i]);
        y[i] = act == 0 ? gelu_erf(v) : act == 1 ? gelu_new(v) : tanhf(v);
    }
}
extern "C" __global__ void activation_f32(const float* x, float* y, long n, int act) { activation(x, y, n, act); }
extern "C" __global__ void activation_f16(const __half* x, float* y, long n, int act) { activation(x, y, n, act); }

__device__ __forceinline__ __half dropout_half(__half v, float p, float keep_scale, u64 key, long i) {
    return dropout_keep(p, key, (u64)i) ? __float2half_rn(__half2float(v) * keep_scale) : __float2half_rn(0.f);
}

// Inverted dropout of a half tensor with the shared counter RNG (the mask the CPU draws for the same
// flat element index). Eight elements a thread move as one 16-byte access where both tensors are
// 16-byte aligned: two-byte accesses left the kernel at a third of the memory bandwidth.
extern "C" __global__ void dropout_f16(const __half* x, __half* y, long n, float p, u64 seed, u64 stream) {
    float keep_scale = 1.f / (1.f - p);
    u64 key = dropout_key(seed, stream);
    long stride = (long)gridDim.x * blockDim.x, first = blockIdx.x * (long)blockDim.x + threadIdx.x;
    long vec = (((uintptr_t)x | (uintptr_t)y) % 16 == 0) ? n / 8 : 0;
    for (long u = first; u < vec; u += stride) {
        uint4 raw = reinterpret_cast<const uint4*>(x)[u];
        __half* h = reinterpret_cast<__half*>(&raw);
        for (int j = 0; j < 8; ++j) h[j] = dropout_half(h[j], p, keep_scale, key, u * 8 + j);
        reinterpret_cast<uint4*>(y)[u] = raw;
    }
    for (long i = vec * 8 + first; i < n; i += stride) y[i] = dropout_half(x[i], p, keep_scale, key, i);
}

// Inverted dropout of f32 values with the shared counter RNG: the CPU's `apply_dropout` for the same
// (seed, stream, flat index), bit for bit (one IEEE multiply by the same f32 scale).
extern "C" __global__ void dropout_f32(const float* x, float* y, long n, float p, u64 seed, u64 stream) {
    float keep_scale = 1.f / (1.f - p);
    u64 key = dropout_key(seed, stream);
    GRID_STRIDE(i, n) y[i] = dropout_keep(p, key, (u64)i) ? x[i] * keep_scale : 0.f;
}

// y += dropout(x) into f32 y: a LoRA branch's input gradient passes back through its dropout mask,
// and a T5 sublayer's output joins the residual stream through its own.
template <typename T>
__device__ void dropout_add(const T* x, float* y, long n, float p, u64 seed, u64 stream) {
    float keep_scale = 1.f / (1.f - p);
    u64 key = dropout_key(seed, stream);
    GRID_STRIDE(i, n) if (dropout_keep(p, key, (u64)i)) y[i] += to_f(x[i]) * keep_scale;
}
extern "C" __global__ void dropout_add_f32(const float* x, float* y, long n, float p, u64 seed, u64 stream) {
    dropout_add(x, y, n, p, seed, stream);
}
extern "C" __global__ void dropout_add_f16(const __half* x, float* y, long n, float p, u64 seed, u64 stream) {
    dropout_add(x, y, n, p, seed, stream);
}

// gate_up [rows, 2f] (gate then up, from the stacked wi_0/wi_1 product) → dropout(gelu_new(gate)·up)
// [rows, f], the mask keyed `key` over the output's flat index (drop_p 0: none).
template <typename T>
__device__ void gated_gelu_split(const T* gu, __half* y, long rows, int f, float drop_p, u64 key) {
    long n = rows * f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / f;
        int c = i % f;
        float v = gelu_new(to_f(gu[r * 2 * f + c])) * to_f(gu[r * 2 * f + f + c]);
        y[i] = __float2half_rn(v * dropout_factor(drop_p, key, (u64)i));
    }
}
extern "C" __global__ void gated_gelu_split_f32(const float* gu, __half* y, long rows, int f, float drop_p, u64 key) {
    gated_gelu_split(gu, y, rows, f, drop_p, key);
}
extern "C" __global__ void gated_gelu_split_f16(const __half* gu, __half* y, long rows, int f, float drop_p, u64 key) {
    gated_gelu_split(gu, y, rows, f, drop_p, key);
}

__device__ __forceinline__ float gelu_new_grad(float x) {
    float t = tanhf(GELU_C * (x + 0.044715f * x * x * x));
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * GELU_C * (1.f + 3.f * 0.044715f * x * x);
}

// gate_up [rows, 2f] and dy [rows, f] → d gate_up [rows, 2f] through the forward's dropout mask
// (g = dropout(dy)): d gate = g·up·gelu'(gate), d up = g·gelu(gate).
template <typename TU, typename TG>
__device__ void gated_gelu_backward(const TU* gu, const TG* dy, __half* out, long rows, int f, float drop_p, u64 key) {
    GRID_STRIDE(i, rows * f) {
        long r = i / f;
        int c = i % f;
        long base = r * 2 * f + c;
        float gate = to_f(gu[base]), up = to_f(gu[base + f]), g = to_f(dy[i]) * dropout_factor(drop_p, key, (u64)i);
        out[base] = __float2half_rn(g * up * gelu_new_grad(gate));
        out[base + f] = __float2half_rn(g * gelu_new(gate));
    }
}
#define GG_BWD(NAME, TU, TG) \
    extern "C" __global__ void NAME(const TU* gu, const TG* dy, __half* out, long rows, int f, float drop_p, u64 key) { \
        gated_gelu_backward(gu, dy, out, rows, f, drop_p, key); \
    }
GG_BWD(gated_gelu_backward_f32_f32, float, float)
GG_BWD(gated_gelu_backward_f32_f16, float, __half)
GG_BWD(gated_gelu_backward_f16_f32, __half, float)
GG_BWD(gated_gelu_backward_f16_f16, __half, __half)

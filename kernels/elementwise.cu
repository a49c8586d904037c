// Element-wise and data-movement kernels: casts, residual adds, bias, activations, gated-gelu,
// embedding and row gathers, KV-cache appends.
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

__device__ __forceinline__ float gelu_new(float x) {
    const float c = 0.7978845608028654f;
    return 0.5f * x * (1.f + tanhf(c * (x + 0.044715f * x * x * x)));
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

// Ids are validated on the host before upload and generated ones come from the vocabulary, so an
// out-of-range id is clamped rather than read out of bounds.
extern "C" __global__ void embedding(const __half* table, const uint32_t* ids, float* out, long n_ids, int d, int rows) {
    long n = n_ids * d;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        uint32_t id = min(ids[i / d], (uint32_t)(rows - 1));
        out[i] = __half2float(table[(long)id * d + i % d]);
    }
}

template <typename T>
__device__ void gather_rows(const T* x, const uint32_t* rows, T* y, long m, int d) {
    long n = m * d;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = x[(long)rows[i / d] * d + i % d];
}
extern "C" __global__ void gather_rows_f32(const float* x, const uint32_t* r, float* y, long m, int d) { gather_rows(x, r, y, m, d); }
extern "C" __global__ void gather_rows_f16(const __half* x, const uint32_t* r, __half* y, long m, int d) { gather_rows(x, r, y, m, d); }

// dst [b, cap, d] rows pos..pos+n ← src [b, n, d], the position from `counter` when it is set (a
// step replayed as a graph); the source may be f32 or half.
template <typename TD, typename TS>
__device__ void write_rows(TD* dst, const TS* src, int b, int cap, int n, int d, int pos, const uint32_t* counter) {
    if (counter) pos = (int)*counter;
    long total = (long)b * n * d;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        long bi = i / ((long)n * d), rem = i % ((long)n * d);
        dst[(bi * cap + pos) * d + rem] = from_f<TD>(to_f(src[i]));
    }
}
#define WRITE_ROWS(NAME, TD, TS) \
    extern "C" __global__ void NAME(TD* dst, const TS* s, int b, int cap, int n, int d, int pos, const uint32_t* c) { \
        write_rows(dst, s, b, cap, n, d, pos, c); \
    }
WRITE_ROWS(write_rows_f32_f32, float, float)
WRITE_ROWS(write_rows_f16_f16, __half, __half)
WRITE_ROWS(write_rows_f16_f32, __half, float)
WRITE_ROWS(write_rows_f32_f16, float, __half)

extern "C" __global__ void write_ids(uint32_t* dst, const uint32_t* src, int b, int cap, int n, int pos, const uint32_t* counter) {
    if (counter) pos = (int)*counter;
    long total = (long)b * n;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x)
        dst[(i / n) * cap + pos + i % n] = src[i];
}

extern "C" __global__ void advance(uint32_t* counter, uint32_t n) {
    if (threadIdx.x == 0 && blockIdx.x == 0) *counter += n;
}

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

// y[m, n] = x[m, k] · w[n, k]ᵀ (+ b) for a handful of outputs (the value head), one warp per
// output element: a library product for n = 1 would waste almost all of its tile.
template <typename T>
__device__ void affine_narrow(const T* x, const float* w, const float* b, float* y, int m, int k, int n) {
    long warps = (long)gridDim.x * blockDim.x / 32;
    for (long o = (blockIdx.x * (long)blockDim.x + threadIdx.x) / 32; o < (long)m * n; o += warps) {
        long row = o / n;
        int col = o % n, lane = threadIdx.x % 32;
        float s = 0.f;
        for (int i = lane; i < k; i += 32) s += to_f(x[row * k + i]) * w[(long)col * k + i];
        s = warp_sum(s);
        if (lane == 0) y[o] = s + (b ? b[col] : 0.f);
    }
}
extern "C" __global__ void affine_narrow_f32(const float* x, const float* w, const float* b, float* y, int m, int k, int n) { affine_narrow(x, w, b, y, m, k, n); }
extern "C" __global__ void affine_narrow_f16(const __half* x, const float* w, const float* b, float* y, int m, int k, int n) { affine_narrow(x, w, b, y, m, k, n); }

// Up to four consecutive column ranges of x [rows, d] into separate tensors, one pass: the pieces
// of a stacked projection (q, k, v), without one launch per piece.
struct SplitParams {
    void* out[4];
    int width[4];
    int pieces;
};
template <typename T>
__device__ void split_last(const T* x, SplitParams p, long rows, int d) {
    long n = rows * d;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / d;
        int c = i % d, piece = 0;
        while (piece + 1 < p.pieces && c >= p.width[piece]) c -= p.width[piece++];
        static_cast<T*>(p.out[piece])[r * p.width[piece] + c] = x[i];
    }
}
extern "C" __global__ void split_last_f32(const float* x, SplitParams p, long rows, int d) { split_last(x, p, rows, d); }
extern "C" __global__ void split_last_f16(const __half* x, SplitParams p, long rows, int d) { split_last(x, p, rows, d); }

// The same in 16-byte units, when every width is a multiple of one (the usual case: 64-wide heads).
// `units` are 16-byte units per row and widths are given in units.
extern "C" __global__ void split_last_vec(const uint4* x, SplitParams p, long rows, int units) {
    long n = rows * units;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / units;
        int c = i % units, piece = 0;
        while (piece + 1 < p.pieces && c >= p.width[piece]) c -= p.width[piece++];
        static_cast<uint4*>(p.out[piece])[r * p.width[piece] + c] = x[i];
    }
}

// gate_up [rows, 2f] (gate then up, from the stacked wi_0/wi_1 product) → gelu_new(gate)·up [rows, f].
template <typename T>
__device__ void gated_gelu_split(const T* gu, __half* y, long rows, int f) {
    long n = rows * f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / f;
        int c = i % f;
        y[i] = __float2half_rn(gelu_new(to_f(gu[r * 2 * f + c])) * to_f(gu[r * 2 * f + f + c]));
    }
}
extern "C" __global__ void gated_gelu_split_f32(const float* gu, __half* y, long rows, int f) { gated_gelu_split(gu, y, rows, f); }
extern "C" __global__ void gated_gelu_split_f16(const __half* gu, __half* y, long rows, int f) { gated_gelu_split(gu, y, rows, f); }

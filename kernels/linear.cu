// The products cuBLAS does not serve well and the lookups: a narrow affine layer (the value head)
// and its bias gradient, the embedding lookup and its backward.
#include "common.cuh"

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

// db[c] += Σ_r dy[r, c], one block per column (the bias of a narrow affine layer).
template <typename T>
__device__ void column_sum_add(const T* dy, float* db, long rows, int n) {
    __shared__ float scratch[32];
    int col = blockIdx.x;
    float s = 0.f;
    for (long r = threadIdx.x; r < rows; r += blockDim.x) s += to_f(dy[r * n + col]);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) db[col] += s;
}
extern "C" __global__ void column_sum_add_f32(const float* dy, float* db, long rows, int n) { column_sum_add(dy, db, rows, n); }
extern "C" __global__ void column_sum_add_f16(const __half* dy, float* db, long rows, int n) { column_sum_add(dy, db, rows, n); }

// Ids are validated on the host before upload and generated ones come from the vocabulary, so an
// out-of-range id is clamped rather than read out of bounds.
extern "C" __global__ void embedding(const __half* table, const uint32_t* ids, float* out, long n_ids, int d, int rows) {
    long n = n_ids * d;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        uint32_t id = min(ids[i / d], (uint32_t)(rows - 1));
        out[i] = __half2float(table[(long)id * d + i % d]);
    }
}

// d_table[ids[i]] += dy[i]: repeated ids meet through atomics. Ids are clamped as the forward's
// embedding clamps them.
template <typename T>
__device__ void embedding_backward(const uint32_t* ids, const T* dy, float* table, long n_ids, int d, int rows) {
    long n = n_ids * d;
    GRID_STRIDE(i, n) {
        uint32_t id = min(ids[i / d], (uint32_t)(rows - 1));
        atomicAdd(table + (long)id * d + i % d, to_f(dy[i]));
    }
}
extern "C" __global__ void embedding_backward_f32(const uint32_t* ids, const float* dy, float* t, long n, int d, int rows) {
    embedding_backward(ids, dy, t, n, d, rows);
}
extern "C" __global__ void embedding_backward_f16(const uint32_t* ids, const __half* dy, float* t, long n, int d, int rows) {
    embedding_backward(ids, dy, t, n, d, rows);
}

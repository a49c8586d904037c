// Data movement: the pieces of a stacked projection split apart and joined back, row gathers,
// KV-cache appends and the decoding counter.
#include "common.cuh"

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

// One piece of a concatenation: src [rows, width] into columns col..col + width of dst [rows, total].
template <typename T>
__device__ void concat_piece(const T* src, float* dst, long rows, int width, int total, int col) {
    GRID_STRIDE(i, rows * width) dst[(i / width) * total + col + i % width] = to_f(src[i]);
}
extern "C" __global__ void concat_piece_f32(const float* s, float* d, long rows, int w, int total, int col) { concat_piece(s, d, rows, w, total, col); }
extern "C" __global__ void concat_piece_f16(const __half* s, float* d, long rows, int w, int total, int col) { concat_piece(s, d, rows, w, total, col); }

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

// Shared device helpers: element conversions, reductions, and the counter-based RNG that
// src/backend/rng.rs defines (keep the two identical: CPU and GPU must draw the same numbers).
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>
#include "launch.cuh"

typedef unsigned long long u64;

// A grid-stride loop over n elements.
#define GRID_STRIDE(i, n) for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (n); i += (long)gridDim.x * blockDim.x)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float uniform01(u64 seed, u64 stream, u64 counter) {
    u64 h = mix64(seed ^ mix64((stream + 0x9e3779b97f4a7c15ULL) ^ mix64(counter)));
    return (float)(h >> 40) * (1.0f / 16777216.0f);
}

// A dropout mask's key, drawn once per thread; each element is then one SplitMix64 step from it.
__device__ __forceinline__ u64 dropout_key(u64 seed, u64 stream) {
    return mix64(seed ^ mix64(stream + 0x9e3779b97f4a7c15ULL));
}

__device__ __forceinline__ bool dropout_keep(float p, u64 key, u64 index) {
    u64 h = mix64(key + index * 0x9e3779b97f4a7c15ULL);
    return (float)(h >> 40) * (1.0f / 16777216.0f) >= p;
}

// What dropout with probability p multiplies element `index` of the mask keyed `key` by: 0 or
// 1/(1 − p), and 1 when p is 0 (rng.rs's `dropout_factor`).
__device__ __forceinline__ float dropout_factor(float p, u64 key, u64 index) {
    if (p <= 0.f) return 1.f;
    return dropout_keep(p, key, index) ? 1.f / (1.f - p) : 0.f;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; every thread gets the result. `scratch` holds 32 floats; blockDim.x % 32 == 0.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

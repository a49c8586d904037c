// What every attention kernel shares: the parameter block (mirrored by `AttnParams` in
// src/backend/cuda/attention.rs), the position bias lookup, the probabilities' dropout mask, the
// graph-replay position and the tensor-core helpers.
#pragma once
#include "common.cuh"

struct AttnParams {
    const uint32_t* key_lengths;  // [B] or null: every key is real
    const uint32_t* counter;      // or null; when set, q_offset = *counter and Lk = *counter + Lq
    const __half* bias_table;     // [buckets, H] or null: no position bias
    const uint32_t* bucket_lut;   // bucket of rel = key − query for rel in [−max_distance, max_distance]
    u64 drop_key;                 // the probabilities' dropout mask (rng.rs's dropout_key)
    int B, Lq, Lk, cap, H, dk;
    int ldq, ldkv;                // row strides of q (and dq) and of k, v (and dk, dv): a projection's stacking
    int q_offset, causal, max_distance;
    float scale;
    float drop_p;                 // 0: no dropout on the probabilities
};

__device__ __forceinline__ float rel_bias(const AttnParams& p, int h, int rel) {
    if (!p.bias_table) return 0.f;
    rel = max(-p.max_distance, min(p.max_distance, rel));
    return __half2float(p.bias_table[p.bucket_lut[rel + p.max_distance] * p.H + h]);
}

// What probability (b, h, query i, key j) is multiplied by after the softmax: dropout's 0 or
// 1/(1 − p) for element ((b·H + h)·Lq + i)·Lk + j of the probabilities (AttnSpec::dropout's index,
// which the CPU draws too); 1 without dropout.
__device__ __forceinline__ float attn_drop(const AttnParams& p, int b, int h, int i, int j) {
    return dropout_factor(p.drop_p, p.drop_key, (((u64)b * p.H + h) * p.Lq + i) * (u64)p.Lk + j);
}

// A row's log-sum-exp of its scores from the online softmax's running max and sum, which the
// training forward keeps for the backward; +∞ for a row without keys, whose probabilities are 0.
__device__ __forceinline__ float row_lse(float m, float l) { return l > 0.f ? m + logf(l) : INFINITY; }

// Resolves the decoding position from the counter, for a step replayed as a graph.
__device__ __forceinline__ void resolve(AttnParams& p) {
    if (p.counter) {
        p.q_offset = (int)*p.counter;
        p.Lk = p.q_offset + p.Lq;
    }
}

__device__ __forceinline__ int key_count(const AttnParams& p, int b) {
    return p.key_lengths ? min((int)p.key_lengths[b], p.Lk) : p.Lk;
}

__device__ __forceinline__ uint32_t pack_half2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

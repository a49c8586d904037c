// Attention with T5's relative position bias, key padding and causal masks, softmax in fp32.
// Two shapes of work: many queries at once (the encoder, teacher-forced decoding), tiled over keys
// with an online softmax; and a few queries against a long cache (a decoding step), one block per
// (query, head, row) spreading the keys over its threads.
#include "common.cuh"

struct AttnParams {
    const uint32_t* key_lengths;  // [B] or null: every key is real
    const uint32_t* counter;      // or null; when set, q_offset = *counter and Lk = *counter + Lq
    const __half* bias_table;     // [buckets, H] or null: no position bias
    const uint32_t* bucket_lut;   // bucket of rel = key − query for rel in [−max_distance, max_distance]
    int B, Lq, Lk, cap, H, dk;
    int q_offset, causal, max_distance;
    float scale;
};

__device__ __forceinline__ float rel_bias(const AttnParams& p, int h, int rel) {
    if (!p.bias_table) return 0.f;
    rel = max(-p.max_distance, min(p.max_distance, rel));
    return __half2float(p.bias_table[p.bucket_lut[rel + p.max_distance] * p.H + h]);
}

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

#define QT 64
#define KT 32

// One thread per query; K and V tiles of KT keys staged in shared memory as f32.
template <typename T, int DK>
__device__ void attention_prefill(const T* q, const T* k, const T* v, __half* out, AttnParams p) {
    extern __shared__ float smem[];
    resolve(p);
    float* ks = smem;              // [KT][dk]
    float* vs = smem + KT * p.dk;  // [KT][dk]
    int b = blockIdx.z, h = blockIdx.y, i = blockIdx.x * QT + threadIdx.x;
    int inner = p.H * p.dk;
    bool active = i < p.Lq;
    float qr[DK], acc[DK];
#pragma unroll
    for (int d = 0; d < DK; d++) {
        qr[d] = (active && d < p.dk) ? to_f(q[((long)b * p.Lq + i) * inner + h * p.dk + d]) * p.scale : 0.f;
        acc[d] = 0.f;
    }
    int klen = key_count(p, b);
    int qpos = p.q_offset + i;
    int visible = p.causal ? min(qpos + 1, klen) : klen;
    int block_keys = p.causal ? min(p.q_offset + (int)blockIdx.x * QT + QT, klen) : klen;
    float m = -INFINITY, l = 0.f;
    for (int j0 = 0; j0 < block_keys; j0 += KT) {
        __syncthreads();
        for (int e = threadIdx.x; e < KT * p.dk; e += blockDim.x) {
            int jj = e / p.dk, d = e % p.dk, j = j0 + jj;
            long off = ((long)b * p.cap + j) * inner + h * p.dk + d;
            ks[e] = j < block_keys ? to_f(k[off]) : 0.f;
            vs[e] = j < block_keys ? to_f(v[off]) : 0.f;
        }
        __syncthreads();
        if (!active) continue;
        for (int jj = 0; jj < KT && j0 + jj < visible; jj++) {
            const float* kr = ks + jj * p.dk;
            float s = 0.f;
#pragma unroll
            for (int d = 0; d < DK; d++)
                if (d < p.dk) s += qr[d] * kr[d];
            s += rel_bias(p, h, j0 + jj - qpos);
            if (s > m) {
                float corr = __expf(m - s);
                l *= corr;
#pragma unroll
                for (int d = 0; d < DK; d++) acc[d] *= corr;
                m = s;
            }
            float e = __expf(s - m);
            l += e;
            const float* vr = vs + jj * p.dk;
#pragma unroll
            for (int d = 0; d < DK; d++)
                if (d < p.dk) acc[d] += e * vr[d];
        }
    }
    if (!active) return;
    float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int d = 0; d < DK; d++)
        if (d < p.dk) out[((long)b * p.Lq + i) * inner + h * p.dk + d] = __float2half_rn(acc[d] * inv);
}

#define PREFILL(T, NAME, DK) \
    extern "C" __global__ void __launch_bounds__(QT) NAME(const T* q, const T* k, const T* v, __half* o, AttnParams p) { \
        attention_prefill<T, DK>(q, k, v, o, p); \
    }
PREFILL(float, attention_prefill_f32_32, 32)
PREFILL(float, attention_prefill_f32_64, 64)
PREFILL(float, attention_prefill_f32_128, 128)
PREFILL(__half, attention_prefill_f16_32, 32)
PREFILL(__half, attention_prefill_f16_64, 64)
PREFILL(__half, attention_prefill_f16_128, 128)

// Grid (H, B, Lq). Shared memory: q [dk], scores [cap], partial outputs [parts][dk].
template <typename T>
__device__ void attention_decode(const T* q, const T* k, const T* v, __half* out, AttnParams p) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    resolve(p);
    int h = blockIdx.x, b = blockIdx.y, i = blockIdx.z;
    int inner = p.H * p.dk;
    float* qs = smem;
    float* scores = smem + p.dk;
    float* part = scores + p.cap;
    for (int d = threadIdx.x; d < p.dk; d += blockDim.x)
        qs[d] = to_f(q[((long)b * p.Lq + i) * inner + h * p.dk + d]) * p.scale;
    __syncthreads();
    int klen = key_count(p, b);
    int qpos = p.q_offset + i;
    int visible = p.causal ? min(qpos + 1, klen) : klen;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) {
        const T* kr = k + ((long)b * p.cap + j) * inner + h * p.dk;
        float s = 0.f;
        for (int d = 0; d < p.dk; d++) s += qs[d] * to_f(kr[d]);
        s += rel_bias(p, h, j - qpos);
        scores[j] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_max(mx, scratch);
    float sum = 0.f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) {
        float e = __expf(scores[j] - mx);
        scores[j] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    __syncthreads();
    int parts = blockDim.x / p.dk;
    int d = threadIdx.x % p.dk, pi = threadIdx.x / p.dk;
    float acc = 0.f;
    if (pi < parts)
        for (int j = pi; j < visible; j += parts) acc += scores[j] * to_f(v[((long)b * p.cap + j) * inner + h * p.dk + d]);
    if (pi < parts) part[pi * p.dk + d] = acc;
    __syncthreads();
    if (threadIdx.x < p.dk) {
        float o = 0.f;
        for (int q2 = 0; q2 < parts; q2++) o += part[q2 * p.dk + threadIdx.x];
        out[((long)b * p.Lq + i) * inner + h * p.dk + threadIdx.x] = __float2half_rn(sum > 0.f ? o / sum : 0.f);
    }
}
extern "C" __global__ void attention_decode_f32(const float* q, const float* k, const float* v, __half* o, AttnParams p) { attention_decode(q, k, v, o, p); }
extern "C" __global__ void attention_decode_f16(const __half* q, const __half* k, const __half* v, __half* o, AttnParams p) { attention_decode(q, k, v, o, p); }

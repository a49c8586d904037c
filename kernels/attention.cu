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
PREFILL(__half, attention_prefill_f16_32, 32)
PREFILL(__half, attention_prefill_f16_64, 64)
PREFILL(__half, attention_prefill_f16_128, 128)

// Grid (H, B, Lq), 128 threads. Shared memory: q [dk], scores [cap], partial outputs [16][dk].
// Scores: one thread per key, its row read in 16-byte pieces. Output: dk/8 threads cover one value
// row in 16-byte pieces and the block's groups of them split the keys, then sum their partials.
// DK > 0 fixes the head size at compile time (every load of a row in flight at once); DK == 0
// serves any head size one element at a time.
template <int DK>
__device__ void attention_decode(const __half* q, const __half* k, const __half* v, __half* out, AttnParams p) {
    constexpr bool VEC = DK > 0;
    if (VEC) p.dk = DK;
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    resolve(p);
    int h = blockIdx.x, b = blockIdx.y, i = blockIdx.z;
    int inner = p.H * p.dk;
    float* qs = smem;
    float* scores = smem + p.dk;
    float* part = scores + p.cap;
    for (int d = threadIdx.x; d < p.dk; d += blockDim.x)
        qs[d] = __half2float(q[((long)b * p.Lq + i) * inner + h * p.dk + d]) * p.scale;
    __syncthreads();
    int klen = key_count(p, b);
    int qpos = p.q_offset + i;
    int visible = p.causal ? min(qpos + 1, klen) : klen;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) {
        const __half* kr = k + ((long)b * p.cap + j) * inner + h * p.dk;
        float s = 0.f;
        if (VEC) {
            uint4 row[DK > 0 ? DK / 8 : 1];
#pragma unroll
            for (int c = 0; c < DK / 8; c++) row[c] = reinterpret_cast<const uint4*>(kr)[c];
#pragma unroll
            for (int c = 0; c < DK / 8; c++) {
                uint4 u = row[c];
                const __half2* hp = reinterpret_cast<const __half2*>(&u);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float2 f = __half22float2(hp[e]);
                    s += qs[c * 8 + 2 * e] * f.x + qs[c * 8 + 2 * e + 1] * f.y;
                }
            }
        } else {
            for (int d = 0; d < p.dk; d++) s += qs[d] * __half2float(kr[d]);
        }
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
    int width = VEC ? p.dk / 8 : p.dk;  // threads per value row
    int groups = blockDim.x / width;
    int c = threadIdx.x % width, g = threadIdx.x / width;
    if (g < groups) {
        if (VEC) {
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
            for (int j = g; j < visible; j += groups) {
                uint4 u = reinterpret_cast<const uint4*>(v + ((long)b * p.cap + j) * inner + h * p.dk)[c];
                const __half2* hp = reinterpret_cast<const __half2*>(&u);
                float w = scores[j];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float2 f = __half22float2(hp[e]);
                    acc[2 * e] += w * f.x;
                    acc[2 * e + 1] += w * f.y;
                }
            }
#pragma unroll
            for (int e = 0; e < 8; e++) part[g * p.dk + c * 8 + e] = acc[e];
        } else {
            float acc = 0.f;
            for (int j = g; j < visible; j += groups)
                acc += scores[j] * __half2float(v[((long)b * p.cap + j) * inner + h * p.dk + c]);
            part[g * p.dk + c] = acc;
        }
    }
    __syncthreads();
    for (int d = threadIdx.x; d < p.dk; d += blockDim.x) {
        float o = 0.f;
        for (int g2 = 0; g2 < groups; g2++) o += part[g2 * p.dk + d];
        out[((long)b * p.Lq + i) * inner + h * p.dk + d] = __float2half_rn(sum > 0.f ? o / sum : 0.f);
    }
}
extern "C" __global__ void attention_decode_64(const __half* q, const __half* k, const __half* v, __half* o, AttnParams p) { attention_decode<64>(q, k, v, o, p); }
extern "C" __global__ void attention_decode_32(const __half* q, const __half* k, const __half* v, __half* o, AttnParams p) { attention_decode<32>(q, k, v, o, p); }
extern "C" __global__ void attention_decode_any(const __half* q, const __half* k, const __half* v, __half* o, AttnParams p) { attention_decode<0>(q, k, v, o, p); }

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

// Tensor-core attention for many queries (FlashAttention-2's scheme): 4 warps × 16 queries per block,
// K and V tiles of 64 keys in shared memory, S = Q·Kᵀ and O += P·V with mma.sync m16n8k16 (f16 in,
// f32 accumulate), an online softmax in f32 on the S fragments, the position bias of the tile staged
// once in shared memory. Grid (⌈Lq/64⌉, H, B), 128 threads; dk == DK.
template <int DK>
__device__ void attention_mma(const __half* q, const __half* k, const __half* v, __half* out, AttnParams p) {
    constexpr int QB = 64, KB = 64, PAD = DK + 8;
    __shared__ __align__(16) __half ks[KB * PAD];
    __shared__ __align__(16) __half vs[KB * PAD];
    __shared__ float bias_s[QB + KB];
    resolve(p);
    int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * QB;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    int inner = p.H * DK;
    int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    uint32_t qa[DK / 16][4];
#pragma unroll
    for (int kk = 0; kk < DK / 16; kk++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int r = rows[e & 1], col = kk * 16 + tq * 2 + (e >> 1) * 8;
            qa[kk][e] = 0;
            if (r < p.Lq) qa[kk][e] = *reinterpret_cast<const uint32_t*>(q + ((long)b * p.Lq + r) * inner + h * DK + col);
        }
    }
    float o[DK / 8][4];
#pragma unroll
    for (int n = 0; n < DK / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
    int klen = key_count(p, b);
    int kmax = p.causal ? min(p.q_offset + q0 + QB, klen) : klen;
    for (int kt0 = 0; kt0 < kmax; kt0 += KB) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < KB * DK / 8; idx += blockDim.x) {
            int row = idx / (DK / 8), c = idx % (DK / 8), j = kt0 + row;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (j < kmax) {
                long off = ((long)b * p.cap + j) * inner + h * DK;
                kv = reinterpret_cast<const uint4*>(k + off)[c];
                vv = reinterpret_cast<const uint4*>(v + off)[c];
            }
            *reinterpret_cast<uint4*>(&ks[row * PAD + c * 8]) = kv;
            *reinterpret_cast<uint4*>(&vs[row * PAD + c * 8]) = vv;
        }
        // rel = key − query_pos spans [base, base + QB + KB − 2] over this tile.
        int base = kt0 - p.q_offset - q0 - (QB - 1);
        for (int idx = threadIdx.x; idx < QB + KB - 1; idx += blockDim.x) bias_s[idx] = rel_bias(p, h, base + idx);
        __syncthreads();
        float s[KB / 8][4];
#pragma unroll
        for (int nt = 0; nt < KB / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < DK / 16; kk++) {
                const __half* kr = &ks[(nt * 8 + g) * PAD + kk * 16 + tq * 2];
                mma16816(s[nt], qa[kk], *reinterpret_cast<const uint32_t*>(kr), *reinterpret_cast<const uint32_t*>(kr + 8));
            }
        }
#pragma unroll
        for (int rr = 0; rr < 2; rr++) {
            int r = rows[rr], qpos = p.q_offset + r;
            float mx = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < KB / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int key = kt0 + nt * 8 + tq * 2 + e;
                    float val = s[nt][rr * 2 + e] * p.scale + bias_s[key - qpos - base];
                    bool masked = key >= klen || (p.causal && key > qpos);
                    val = masked ? -INFINITY : val;
                    s[nt][rr * 2 + e] = val;
                    mx = fmaxf(mx, val);
                }
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float m_new = fmaxf(m_r[rr], mx);
            float corr = m_new == -INFINITY ? 1.f : __expf(m_r[rr] - m_new);
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < KB / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float pe = m_new == -INFINITY ? 0.f : __expf(s[nt][rr * 2 + e] - m_new);
                    s[nt][rr * 2 + e] = pe;
                    sum += pe;
                }
            }
            l_r[rr] = l_r[rr] * corr + sum;
            m_r[rr] = m_new;
#pragma unroll
            for (int n = 0; n < DK / 8; n++) {
                o[n][rr * 2] *= corr;
                o[n][rr * 2 + 1] *= corr;
            }
        }
#pragma unroll
        for (int kk2 = 0; kk2 < KB / 16; kk2++) {
            uint32_t pa[4] = {pack_half2(s[2 * kk2][0], s[2 * kk2][1]), pack_half2(s[2 * kk2][2], s[2 * kk2][3]),
                              pack_half2(s[2 * kk2 + 1][0], s[2 * kk2 + 1][1]), pack_half2(s[2 * kk2 + 1][2], s[2 * kk2 + 1][3])};
#pragma unroll
            for (int n = 0; n < DK / 8; n++) {
                const __half* vc = &vs[(kk2 * 16 + tq * 2) * PAD + n * 8 + g];
                __half2 b0 = __halves2half2(vc[0], vc[PAD]);
                __half2 b1 = __halves2half2(vc[8 * PAD], vc[9 * PAD]);
                mma16816(o[n], pa, *reinterpret_cast<uint32_t*>(&b0), *reinterpret_cast<uint32_t*>(&b1));
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        float l = l_r[rr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        int r = rows[rr];
        if (r >= p.Lq) continue;
        float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int n = 0; n < DK / 8; n++) {
            __half2 hv = __floats2half2_rn(o[n][rr * 2] * inv, o[n][rr * 2 + 1] * inv);
            *reinterpret_cast<__half2*>(out + ((long)b * p.Lq + r) * inner + h * DK + n * 8 + tq * 2) = hv;
        }
    }
}
extern "C" __global__ void __launch_bounds__(128) attention_mma_64(const __half* q, const __half* k, const __half* v, __half* o, AttnParams p) { attention_mma<64>(q, k, v, o, p); }
extern "C" __global__ void __launch_bounds__(128) attention_mma_32(const __half* q, const __half* k, const __half* v, __half* o, AttnParams p) { attention_mma<32>(q, k, v, o, p); }

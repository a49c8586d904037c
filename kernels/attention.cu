// Attention with T5's relative position bias, key padding and causal masks, softmax in fp32, and
// its backward forms. Forward: many queries at once (the encoder, teacher-forced decoding), tiled
// over keys with an online softmax; a few queries against a long cache (a decoding step), one block
// per (query, head, row) spreading the keys over its threads. Backward: dq, dk, dv and, gathered by
// the key-side launch, the relative-position bias table's gradient. Dropout on the probabilities (training) is drawn inside
// the many-query forms and the backward from the counter hash (`attn_drop`), never stored: the
// forward's normaliser counts every key and only kept ones reach P·V; the backward's
// dp_j = factor_j · dout·v_j and dV takes the kept probabilities.
#include "attention.cuh"


// One thread per query; K and V tiles of ATTN_PREFILL_KEYS keys staged in shared memory as f32.
template <typename T, int DK>
__device__ void attention_prefill(const T* q, const T* k, const T* v, __half* out, float* lse, AttnParams p) {
    extern __shared__ float smem[];
    resolve(p);
    float* ks = smem;              // [ATTN_PREFILL_KEYS][dk]
    float* vs = smem + ATTN_PREFILL_KEYS * p.dk;  // [ATTN_PREFILL_KEYS][dk]
    int b = blockIdx.z, h = blockIdx.y, i = blockIdx.x * ATTN_ROWS + threadIdx.x;
    int inner = p.H * p.dk;
    bool active = i < p.Lq;
    float qr[DK], acc[DK];
#pragma unroll
    for (int d = 0; d < DK; d++) {
        qr[d] = (active && d < p.dk) ? to_f(q[((long)b * p.Lq + i) * p.ldq + h * p.dk + d]) * p.scale : 0.f;
        acc[d] = 0.f;
    }
    int klen = key_count(p, b);
    int qpos = p.q_offset + i;
    int visible = p.causal ? min(qpos + 1, klen) : klen;
    int block_keys = p.causal ? min(p.q_offset + (int)blockIdx.x * ATTN_ROWS + ATTN_ROWS, klen) : klen;
    float m = -INFINITY, l = 0.f;
    for (int j0 = 0; j0 < block_keys; j0 += ATTN_PREFILL_KEYS) {
        __syncthreads();
        for (int e = threadIdx.x; e < ATTN_PREFILL_KEYS * p.dk; e += blockDim.x) {
            int jj = e / p.dk, d = e % p.dk, j = j0 + jj;
            long off = ((long)b * p.cap + j) * p.ldkv + h * p.dk + d;
            ks[e] = j < block_keys ? to_f(k[off]) : 0.f;
            vs[e] = j < block_keys ? to_f(v[off]) : 0.f;
        }
        __syncthreads();
        if (!active) continue;
        for (int jj = 0; jj < ATTN_PREFILL_KEYS && j0 + jj < visible; jj++) {
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
            e *= attn_drop(p, b, h, i, j0 + jj);
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
    if (lse) lse[((long)b * p.H + h) * p.Lq + i] = row_lse(m, l);
}

#define PREFILL(T, NAME, DK) \
    extern "C" __global__ void __launch_bounds__(ATTN_ROWS) NAME(const T* q, const T* k, const T* v, __half* o, float* lse, \
                                                                 AttnParams p) { \
        attention_prefill<T, DK>(q, k, v, o, lse, p); \
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
        qs[d] = __half2float(q[((long)b * p.Lq + i) * p.ldq + h * p.dk + d]) * p.scale;
    __syncthreads();
    int klen = key_count(p, b);
    int qpos = p.q_offset + i;
    int visible = p.causal ? min(qpos + 1, klen) : klen;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) {
        const __half* kr = k + ((long)b * p.cap + j) * p.ldkv + h * p.dk;
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
                uint4 u = reinterpret_cast<const uint4*>(v + ((long)b * p.cap + j) * p.ldkv + h * p.dk)[c];
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
                acc += scores[j] * __half2float(v[((long)b * p.cap + j) * p.ldkv + h * p.dk + c]);
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

// Tensor-core attention for many queries (FlashAttention-2's scheme): 4 warps × 16 queries per block,
// K and V tiles of 64 keys in shared memory, S = Q·Kᵀ and O += P·V with mma.sync m16n8k16 (f16 in,
// f32 accumulate), an online softmax in f32 on the S fragments, the position bias of the tile staged
// once in shared memory. Grid (⌈Lq/64⌉, H, B), 128 threads; dk == DK.
template <int DK>
__device__ void attention_mma(const __half* q, const __half* k, const __half* v, __half* out, float* lse, AttnParams p) {
    constexpr int QB = ATTN_ROWS, KB = 64, PAD = DK + 8;
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
            if (r < p.Lq) qa[kk][e] = *reinterpret_cast<const uint32_t*>(q + ((long)b * p.Lq + r) * p.ldq + h * DK + col);
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
                long off = ((long)b * p.cap + j) * p.ldkv + h * DK;
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
                    sum += pe;
                    // The normaliser counts every key; only the kept ones reach P·V.
                    s[nt][rr * 2 + e] = pe * attn_drop(p, b, h, r, kt0 + nt * 8 + tq * 2 + e);
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
        if (lse && tq == 0) lse[((long)b * p.H + h) * p.Lq + r] = row_lse(m_r[rr], l);
    }
}
#define MMA_FORWARD(DK) \
    extern "C" __global__ void __launch_bounds__(ATTN_MMA_THREADS) attention_mma_##DK( \
        const __half* q, const __half* k, const __half* v, __half* o, float* lse, AttnParams p) { \
        attention_mma<DK>(q, k, v, o, lse, p); \
    }
MMA_FORWARD(64)
MMA_FORWARD(32)

// ---- attention backward ----
//
// FlashAttention-2's backward split in two launches without atomics, from the training forward's
// per-row log-sum-exp of the scores (lse) and its output O. The first (one block per 64 queries)
// takes D = dO·O per row, which equals Σ_j p_j·dp_j with dp_j = dout·v_j, then
// dq = scale · Σ_j p_j (dp_j − D) k_j in one pass over the keys; the second (one block per 64
// keys) recomputes p and dp from lse and D and accumulates dv = Σ_i p_i dout_i and
// dk = scale · Σ_i p_i (dp_i − D_i) q_i over the queries that see its keys. The gradients are
// written in half, where the projections' backward products read them, with the row strides of
// the inputs (`ldq`, `ldkv`), so that they land in the stacked q/k/v (or k/v) layout of the
// projection that made them. Every row of dk and dv up to the cache's capacity is written (zero
// past the real keys). Head sizes 16, 32 and 64 use the tensor cores (mma.sync m16n8k16, f16 in,
// f32 accumulate); any other head size up to 128 takes a plain f32 form.

// The bias table's gradient. The bias is added after the scale, so d_table[bucket, h] is the sum
// of ds = p·(dp − D) over the (query, key) pairs in that bucket. The key-side launch, which holds
// every ds, sums it per clamped relative position rel = key − query ∈ [−max_distance, max_distance]
// into d_rel [H, 2·max_distance + 1] (ATTN_REL_WARPS slot rows per block in dynamic shared memory,
// one per warp, then one global reduction per slot and block); `attention_bias_fold` then sums
// those slots into the buckets. Every pair past the clamp lands in one of its two end slots, so a
// thread sums those in registers (RelEdges) rather than contend for one address.
struct RelEdges {
    float lo = 0.f, hi = 0.f;
};

__device__ __forceinline__ int rel_slots(const AttnParams& p) { return 2 * p.max_distance + 1; }

// Adds ds at relative position rel: to an end sum past the clamp, else to the warp's row of slots.
// ATOMIC is for callers whose lanes may share a slot within one step.
template <bool ATOMIC>
__device__ __forceinline__ void rel_grad_add(float* row, RelEdges& e, int md, int rel, float ds) {
    if (rel <= -md) {
        e.lo += ds;
    } else if (rel >= md) {
        e.hi += ds;
    } else if (ATOMIC) {
        atomicAdd(row + rel + md, ds);
    } else {
        row[rel + md] += ds;
    }
}

__device__ __forceinline__ void rel_grad_begin(float* slots, const AttnParams& p) {
    for (int idx = threadIdx.x; idx < ATTN_REL_WARPS * rel_slots(p); idx += blockDim.x) slots[idx] = 0.f;
    __syncthreads();
}

// The block's sums into d_rel: each warp's end sums join its row, then the rows are added up.
__device__ void rel_grad_end(float* slots, RelEdges e, float* d_rel, const AttnParams& p, int h) {
    int n = rel_slots(p), warp = threadIdx.x / 32;
    float lo = warp_sum(e.lo), hi = warp_sum(e.hi);
    __syncwarp();
    if (threadIdx.x % 32 == 0) {
        slots[warp * n] += lo;
        slots[warp * n + n - 1] += hi;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < ATTN_REL_WARPS; w++) sum += slots[w * n + idx];
        if (sum != 0.f) atomicAdd(d_rel + (long)h * n + idx, sum);
    }
}

// d_table[bucket, h] += Σ d_rel[h, rel] over the slots rel in that bucket. Grid (H), one thread
// per bucket.
extern "C" __global__ void attention_bias_fold(const float* d_rel, float* d_table, const uint32_t* bucket_lut,
                                               int max_distance, int buckets, int H) {
    int h = blockIdx.x, n = 2 * max_distance + 1;
    for (int t = threadIdx.x; t < buckets; t += blockDim.x) {
        float sum = 0.f;
        for (int idx = 0; idx < n; idx++)
            if (bucket_lut[idx] == (uint32_t)t) sum += d_rel[(long)h * n + idx];
        d_table[(long)t * H + h] += sum;
    }
}

// The plain form: one thread per query (first kernel) or per key (second), tiles of BT rows of
// the other side staged in shared memory as f32. DK ≥ dk is the compile-time row size.
#define BT 32

template <int DK>
__device__ void attn_bwd_dq_plain(const __half* q, const __half* k, const __half* v, const __half* out,
                                  const __half* dout, __half* dq, const float* lse, float* dsum_out,
                                  AttnParams p) {
    __shared__ float ks[BT * DK];
    __shared__ float vs[BT * DK];
    resolve(p);
    int b = blockIdx.z, h = blockIdx.y, i = blockIdx.x * ATTN_ROWS + threadIdx.x;
    int inner = p.H * p.dk;
    bool active = i < p.Lq;
    long qoff = ((long)b * p.Lq + i) * p.ldq + h * p.dk, ooff = ((long)b * p.Lq + i) * inner + h * p.dk;
    long row = ((long)b * p.H + h) * p.Lq + i;
    float qr[DK], gr[DK], acc[DK];
    float D = 0.f;
#pragma unroll
    for (int d = 0; d < DK; d++) {
        bool in = active && d < p.dk;
        qr[d] = in ? __half2float(q[qoff + d]) : 0.f;
        gr[d] = in ? __half2float(dout[ooff + d]) : 0.f;
        D += in ? gr[d] * __half2float(out[ooff + d]) : 0.f;
        acc[d] = 0.f;
    }
    float row_lse = active ? lse[row] : INFINITY;
    int klen = key_count(p, b);
    int qpos = p.q_offset + i;
    int visible = p.causal ? min(qpos + 1, klen) : klen;
    int block_keys = p.causal ? min(p.q_offset + (int)blockIdx.x * ATTN_ROWS + ATTN_ROWS, klen) : klen;
    for (int j0 = 0; j0 < block_keys; j0 += BT) {
        __syncthreads();
        // Columns dk..DK are zero too: the dot products run over DK.
        for (int e = threadIdx.x; e < BT * DK; e += blockDim.x) {
            int jj = e / DK, d = e % DK, j = j0 + jj;
            bool in = j < block_keys && d < p.dk;
            long off = ((long)b * p.cap + j) * p.ldkv + h * p.dk + d;
            ks[e] = in ? __half2float(k[off]) : 0.f;
            vs[e] = in ? __half2float(v[off]) : 0.f;
        }
        __syncthreads();
        if (!active) continue;
        for (int jj = 0; jj < BT && j0 + jj < visible; jj++) {
            float s = 0.f, dp = 0.f;
#pragma unroll
            for (int d = 0; d < DK; d++) {
                s += qr[d] * ks[jj * DK + d];
                dp += gr[d] * vs[jj * DK + d];
            }
            s = s * p.scale + rel_bias(p, h, j0 + jj - qpos);
            dp *= attn_drop(p, b, h, i, j0 + jj);
            float ds = expf(s - row_lse) * (dp - D);
#pragma unroll
            for (int d = 0; d < DK; d++) acc[d] += ds * ks[jj * DK + d];
        }
    }
    if (!active) return;
    dsum_out[row] = D;
#pragma unroll
    for (int d = 0; d < DK; d++)
        if (d < p.dk) dq[qoff + d] = __float2half_rn(acc[d] * p.scale);
}

template <int DK>
__device__ void attn_bwd_dkdv_plain(const __half* q, const __half* k, const __half* v, const __half* dout, __half* dk,
                                    __half* dv, const float* lse, const float* dsum, float* d_rel,
                                    AttnParams p) {
    __shared__ float qs[BT * DK];
    __shared__ float gs[BT * DK];
    __shared__ float ls[BT], ds_[BT];
    extern __shared__ float slots[];  // d_rel set: [ATTN_REL_WARPS][2·max_distance + 1]
    resolve(p);
    int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * ATTN_ROWS, j = j0 + threadIdx.x;
    float* row = slots + threadIdx.x / 32 * rel_slots(p);
    RelEdges edges;
    if (d_rel) rel_grad_begin(slots, p);
    int inner = p.H * p.dk;
    int klen = key_count(p, b);
    bool live = j < klen;  // keys past the real ones (padding, spare capacity) get zero gradients
    long koff = ((long)b * p.cap + j) * p.ldkv + h * p.dk;
    float kr[DK], vr[DK], adk[DK], adv[DK];
#pragma unroll
    for (int d = 0; d < DK; d++) {
        bool in = live && d < p.dk;
        kr[d] = in ? __half2float(k[koff + d]) : 0.f;
        vr[d] = in ? __half2float(v[koff + d]) : 0.f;
        adk[d] = adv[d] = 0.f;
    }
    // Causal: only queries at positions ≥ the block's first key see any of its keys.
    int i_start = p.causal ? max(0, j0 - p.q_offset) : 0;
    long stats = ((long)b * p.H + h) * p.Lq;
    if (j0 < klen) {
        for (int i0 = i_start; i0 < p.Lq; i0 += BT) {
            __syncthreads();
            for (int e = threadIdx.x; e < BT * DK; e += blockDim.x) {
                int ii = e / DK, d = e % DK, i = i0 + ii;
                bool in = i < p.Lq && d < p.dk;
                long qrow = (long)b * p.Lq + i, col = h * p.dk + d;
                qs[e] = in ? __half2float(q[qrow * p.ldq + col]) : 0.f;
                gs[e] = in ? __half2float(dout[qrow * inner + col]) : 0.f;
            }
            for (int ii = threadIdx.x; ii < BT; ii += blockDim.x) {
                bool in = i0 + ii < p.Lq;
                ls[ii] = in ? lse[stats + i0 + ii] : INFINITY;
                ds_[ii] = in ? dsum[stats + i0 + ii] : 0.f;
            }
            __syncthreads();
            if (!live) continue;
            for (int ii = 0; ii < BT && i0 + ii < p.Lq; ii++) {
                int qpos = p.q_offset + i0 + ii;
                if (p.causal && j > qpos) continue;
                float s = 0.f, dp = 0.f;
#pragma unroll
                for (int d = 0; d < DK; d++) {
                    s += kr[d] * qs[ii * DK + d];
                    dp += vr[d] * gs[ii * DK + d];
                }
                s = s * p.scale + rel_bias(p, h, j - qpos);
                float drop = attn_drop(p, b, h, i0 + ii, j);
                float pr = expf(s - ls[ii]);
                float ds = pr * (dp * drop - ds_[ii]);
                float kept = pr * drop;
                if (d_rel) rel_grad_add<true>(row, edges, p.max_distance, j - qpos, ds);
#pragma unroll
                for (int d = 0; d < DK; d++) {
                    adv[d] += kept * gs[ii * DK + d];
                    adk[d] += ds * qs[ii * DK + d];
                }
            }
        }
    }
    if (d_rel) rel_grad_end(slots, edges, d_rel, p, h);
    if (j >= p.cap) return;
#pragma unroll
    for (int d = 0; d < DK; d++) {
        if (d < p.dk) {
            dk[koff + d] = __float2half_rn(adk[d] * p.scale);
            dv[koff + d] = __float2half_rn(adv[d]);
        }
    }
}

#define PLAIN(DK) \
    extern "C" __global__ void __launch_bounds__(ATTN_ROWS) attention_backward_dq_plain_##DK( \
        const __half* q, const __half* k, const __half* v, const __half* o, const __half* g, __half* dq, \
        const float* lse, float* ds, AttnParams p) { \
        attn_bwd_dq_plain<DK>(q, k, v, o, g, dq, lse, ds, p); \
    } \
    extern "C" __global__ void __launch_bounds__(ATTN_ROWS) attention_backward_dkdv_plain_##DK( \
        const __half* q, const __half* k, const __half* v, const __half* g, __half* dk, __half* dv, \
        const float* lse, const float* ds, float* d_rel, AttnParams p) { \
        attn_bwd_dkdv_plain<DK>(q, k, v, g, dk, dv, lse, ds, d_rel, p); \
    }
PLAIN(32)
PLAIN(64)
PLAIN(128)

// The A fragments (16 rows × DK) of rows `r0` and `r0 + 8` of a [rows, H·DK] half tensor at head
// column `col0`; rows at or past `limit` read as zero.
template <int DK>
__device__ __forceinline__ void load_a(uint32_t (&a)[DK / 16][4], const __half* x, long row_base, int r0, int limit,
                                       int inner, int col0, int tq) {
#pragma unroll
    for (int kk = 0; kk < DK / 16; kk++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int r = r0 + (e & 1) * 8, col = kk * 16 + tq * 2 + (e >> 1) * 8;
            a[kk][e] = r < limit ? *reinterpret_cast<const uint32_t*>(x + (row_base + r) * inner + col0 + col) : 0u;
        }
    }
}

// c[nt] = A · Bᵀ over DK for 8 n-tiles of 8 rows of `tile` ([64][PAD] half): S = Q·Kᵀ and the like.
template <int DK, int PAD>
__device__ __forceinline__ void product_nt(float (&c)[8][4], const uint32_t (&a)[DK / 16][4], const __half* tile, int g,
                                           int tq) {
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
        c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DK / 16; kk++) {
            const __half* r = &tile[(nt * 8 + g) * PAD + kk * 16 + tq * 2];
            mma16816(c[nt], a[kk], *reinterpret_cast<const uint32_t*>(r), *reinterpret_cast<const uint32_t*>(r + 8));
        }
    }
}

// acc[n] += X · tile where X (16 × 64) is given as C fragments x[8][4] (rounded to half here) and
// tile ([64][PAD] half) is the k-major B operand: dQ += dS·K, dV += Pᵀ·dO, dK += dSᵀ·Q.
template <int DK, int PAD>
__device__ __forceinline__ void product_nn(float (&acc)[DK / 8][4], const float (&x)[8][4], const __half* tile, int g,
                                           int tq) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        uint32_t a[4] = {pack_half2(x[2 * kk][0], x[2 * kk][1]), pack_half2(x[2 * kk][2], x[2 * kk][3]),
                         pack_half2(x[2 * kk + 1][0], x[2 * kk + 1][1]), pack_half2(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
        for (int n = 0; n < DK / 8; n++) {
            const __half* c = &tile[(kk * 16 + tq * 2) * PAD + n * 8 + g];
            __half2 b0 = __halves2half2(c[0], c[PAD]);
            __half2 b1 = __halves2half2(c[8 * PAD], c[9 * PAD]);
            mma16816(acc[n], a, *reinterpret_cast<uint32_t*>(&b0), *reinterpret_cast<uint32_t*>(&b1));
        }
    }
}

// Rows row0..row0+63 of two half tensors (rows `lda` and `ldb` elements apart) into [64][PAD]
// tiles, 16 bytes at a time; rows at or past `limit` are zero (so masked rows can never carry NaN
// from unwritten memory).
template <int DK, int PAD>
__device__ __forceinline__ void load_tiles(__half* ta, __half* tb, const __half* a, const __half* b, long row_base,
                                           int row0, int limit, int lda, int ldb, int col0) {
    for (int idx = threadIdx.x; idx < 64 * DK / 8; idx += blockDim.x) {
        int row = idx / (DK / 8), c = idx % (DK / 8), r = row0 + row;
        uint4 va = make_uint4(0, 0, 0, 0), vb = make_uint4(0, 0, 0, 0);
        if (r < limit) {
            va = reinterpret_cast<const uint4*>(a + (row_base + r) * lda + col0)[c];
            vb = reinterpret_cast<const uint4*>(b + (row_base + r) * ldb + col0)[c];
        }
        *reinterpret_cast<uint4*>(&ta[row * PAD + c * 8]) = va;
        *reinterpret_cast<uint4*>(&tb[row * PAD + c * 8]) = vb;
    }
}

// First launch, tensor cores: grid (⌈Lq/64⌉, H, B), 128 threads; warp w owns queries
// q0 + 16w .. q0 + 16w + 15 (fragment rows g and g + 8). One pass over the keys: S = Q·Kᵀ and
// dP = dO·Vᵀ per tile of 64 keys, dS = P (dP − D) with P from the forward's lse, dQ += dS·K.
template <int DK>
__device__ void attn_bwd_dq_mma(const __half* q, const __half* k, const __half* v, const __half* out,
                                const __half* dout, __half* dq, const float* lse_in, float* dsum_out,
                                AttnParams p) {
    constexpr int QB = ATTN_ROWS, KB = 64, PAD = DK + 8;
    __shared__ __align__(16) __half ks[KB * PAD];
    __shared__ __align__(16) __half vs[KB * PAD];
    __shared__ float bias_s[QB + KB];
    resolve(p);
    int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * QB;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    int inner = p.H * DK;
    int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    uint32_t qa[DK / 16][4], ga[DK / 16][4];
    load_a<DK>(qa, q, (long)b * p.Lq, rows[0], p.Lq, p.ldq, h * DK, tq);
    load_a<DK>(ga, dout, (long)b * p.Lq, rows[0], p.Lq, inner, h * DK, tq);
    // D = Σ_j p_j·dp_j = dO·O per row (O = Σ_j p_j·factor_j·v_j), from the rows' O fragments.
    float D[2] = {0.f, 0.f}, lse[2];
    {
        uint32_t oa[DK / 16][4];
        load_a<DK>(oa, out, (long)b * p.Lq, rows[0], p.Lq, inner, h * DK, tq);
#pragma unroll
        for (int kk = 0; kk < DK / 16; kk++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float2 go = __half22float2(*reinterpret_cast<__half2*>(&ga[kk][e]));
                float2 oo = __half22float2(*reinterpret_cast<__half2*>(&oa[kk][e]));
                D[e & 1] += go.x * oo.x + go.y * oo.y;
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        D[rr] += __shfl_xor_sync(0xffffffffu, D[rr], 1);
        D[rr] += __shfl_xor_sync(0xffffffffu, D[rr], 2);
        lse[rr] = rows[rr] < p.Lq ? lse_in[((long)b * p.H + h) * p.Lq + rows[rr]] : INFINITY;
    }
    int klen = key_count(p, b);
    int kmax = p.causal ? min(p.q_offset + q0 + QB, klen) : klen;
    float acc[DK / 8][4];
#pragma unroll
    for (int n = 0; n < DK / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    for (int kt0 = 0; kt0 < kmax; kt0 += KB) {
        __syncthreads();
        load_tiles<DK, PAD>(ks, vs, k, v, (long)b * p.cap, kt0, kmax, p.ldkv, p.ldkv, h * DK);
        // rel = key − query_pos spans [base, base + QB + KB − 2] over this tile.
        int base = kt0 - p.q_offset - q0 - (QB - 1);
        for (int idx = threadIdx.x; idx < QB + KB - 1; idx += blockDim.x) bias_s[idx] = rel_bias(p, h, base + idx);
        __syncthreads();
        float s[KB / 8][4], dp[KB / 8][4];
        product_nt<DK, PAD>(s, qa, ks, g, tq);
        product_nt<DK, PAD>(dp, ga, vs, g, tq);
#pragma unroll
        for (int rr = 0; rr < 2; rr++) {
            int qpos = p.q_offset + rows[rr];
#pragma unroll
            for (int nt = 0; nt < KB / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int key = kt0 + nt * 8 + tq * 2 + e;
                    bool masked = key >= klen || (p.causal && key > qpos);
                    // A row without keys has lse = +∞, so its probabilities are 0 too.
                    float pr = masked ? 0.f : __expf(s[nt][rr * 2 + e] * p.scale + bias_s[key - qpos - base] - lse[rr]);
                    float dpe = dp[nt][rr * 2 + e] * attn_drop(p, b, h, rows[rr], key);
                    s[nt][rr * 2 + e] = pr * (dpe - D[rr]);
                }
            }
        }
        product_nn<DK, PAD>(acc, s, ks, g, tq);
    }
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        int r = rows[rr];
        if (r >= p.Lq) continue;
        if (tq == 0) dsum_out[((long)b * p.H + h) * p.Lq + r] = D[rr];
#pragma unroll
        for (int n = 0; n < DK / 8; n++) {
            __half2 o = __floats2half2_rn(acc[n][rr * 2] * p.scale, acc[n][rr * 2 + 1] * p.scale);
            *reinterpret_cast<__half2*>(dq + ((long)b * p.Lq + r) * p.ldq + h * DK + n * 8 + tq * 2) = o;
        }
    }
}

// Second launch, tensor cores: grid (⌈cap/64⌉, H, B), 128 threads; warp w owns keys
// k0 + 16w .. k0 + 16w + 15. Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ per tile of 64 queries, then
// dV += Pᵀ·dO and dK += dSᵀ·Q. With d_rel, each warp also stages its 16 × 64 block of dS in
// shared memory and each lane sums diagonals of it (one relative position each) into the warp's
// row of slots; a tile whose every pair lies past the clamp goes to the end sums directly.
template <int DK>
__device__ void attn_bwd_dkdv_mma(const __half* q, const __half* k, const __half* v, const __half* dout, __half* dk,
                                  __half* dv, const float* lse, const float* dsum, float* d_rel,
                                  AttnParams p) {
    constexpr int QB = ATTN_ROWS, KB = 64, PAD = DK + 8, SPAD = ATTN_DS_STRIDE;
    __shared__ __align__(16) __half qs[QB * PAD];
    __shared__ __align__(16) __half gs[QB * PAD];
    __shared__ float ls[QB], dl[QB], bias_s[QB + KB];
    // d_rel set: dS staging [ATTN_REL_WARPS][16][SPAD], then the slots [ATTN_REL_WARPS][2·max_distance + 1].
    extern __shared__ __align__(16) float rel_smem[];
    resolve(p);
    int b = blockIdx.z, h = blockIdx.y, k0 = blockIdx.x * KB;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    float* staged = rel_smem + warp * 16 * SPAD;
    float* slots = rel_smem + ATTN_REL_WARPS * 16 * SPAD;
    float* row = slots + warp * rel_slots(p);
    RelEdges edges;
    if (d_rel) rel_grad_begin(slots, p);
    int inner = p.H * DK;
    int keys[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    int klen = key_count(p, b);
    uint32_t ka[DK / 16][4], va[DK / 16][4];
    load_a<DK>(ka, k, (long)b * p.cap, keys[0], klen, p.ldkv, h * DK, tq);
    load_a<DK>(va, v, (long)b * p.cap, keys[0], klen, p.ldkv, h * DK, tq);
    float adk[DK / 8][4], adv[DK / 8][4];
#pragma unroll
    for (int n = 0; n < DK / 8; n++) {
        adk[n][0] = adk[n][1] = adk[n][2] = adk[n][3] = 0.f;
        adv[n][0] = adv[n][1] = adv[n][2] = adv[n][3] = 0.f;
    }
    long stats = ((long)b * p.H + h) * p.Lq;
    // Causal: only queries at positions ≥ the block's first key see any of its keys.
    int i_start = p.causal ? max(0, k0 - p.q_offset) : 0;
    if (k0 < klen) {
        for (int i0 = i_start; i0 < p.Lq; i0 += QB) {
            __syncthreads();
            load_tiles<DK, PAD>(qs, gs, q, dout, (long)b * p.Lq, i0, p.Lq, p.ldq, inner, h * DK);
            for (int idx = threadIdx.x; idx < QB; idx += blockDim.x) {
                bool in = i0 + idx < p.Lq;
                ls[idx] = in ? lse[stats + i0 + idx] : INFINITY;
                dl[idx] = in ? dsum[stats + i0 + idx] : 0.f;
            }
            int base = k0 - p.q_offset - i0 - (QB - 1);
            for (int idx = threadIdx.x; idx < QB + KB - 1; idx += blockDim.x) bias_s[idx] = rel_bias(p, h, base + idx);
            __syncthreads();
            float s[QB / 8][4], dp[QB / 8][4];
            product_nt<DK, PAD>(s, ka, qs, g, tq);
            product_nt<DK, PAD>(dp, va, gs, g, tq);
#pragma unroll
            for (int rr = 0; rr < 2; rr++) {
                int key = keys[rr];
#pragma unroll
                for (int nt = 0; nt < QB / 8; nt++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        int col = nt * 8 + tq * 2 + e, qpos = p.q_offset + i0 + col;
                        bool masked = key >= klen || i0 + col >= p.Lq || (p.causal && key > qpos);
                        float pr = masked ? 0.f
                                          : __expf(s[nt][rr * 2 + e] * p.scale + bias_s[key - qpos - base] - ls[col]);
                        float drop = attn_drop(p, b, h, i0 + col, key);
                        s[nt][rr * 2 + e] = pr * drop;
                        dp[nt][rr * 2 + e] = pr * (dp[nt][rr * 2 + e] * drop - dl[col]);
                    }
                }
            }
            product_nn<DK, PAD>(adv, s, gs, g, tq);
            product_nn<DK, PAD>(adk, dp, qs, g, tq);
            if (d_rel) {
                // rel = key − query = rel0 + key_row − query_col over the warp's block.
                int rel0 = k0 + warp * 16 - p.q_offset - i0;
                if (rel0 + 15 <= -p.max_distance || rel0 - (QB - 1) >= p.max_distance) {
                    float sum = 0.f;
#pragma unroll
                    for (int nt = 0; nt < QB / 8; nt++) sum += dp[nt][0] + dp[nt][1] + dp[nt][2] + dp[nt][3];
                    (rel0 > 0 ? edges.hi : edges.lo) += sum;
                } else {
#pragma unroll
                    for (int rr = 0; rr < 2; rr++)
#pragma unroll
                        for (int nt = 0; nt < QB / 8; nt++)
                            *reinterpret_cast<float2*>(&staged[(g + 8 * rr) * SPAD + nt * 8 + tq * 2]) =
                                make_float2(dp[nt][rr * 2], dp[nt][rr * 2 + 1]);
                    __syncwarp();
                    // Diagonal t holds the pairs (r, r + QB − 1 − t): rel = rel0 + t − (QB − 1).
                    for (int t = lane; t < QB + 15; t += 32) {
                        float sum = 0.f;
#pragma unroll
                        for (int r = 0; r < 16; r++) {
                            int col = r + QB - 1 - t;
                            if (col >= 0 && col < QB) sum += staged[r * SPAD + col];
                        }
                        rel_grad_add<false>(row, edges, p.max_distance, rel0 + t - (QB - 1), sum);
                    }
                    __syncwarp();
                }
            }
        }
    }
    if (d_rel) rel_grad_end(slots, edges, d_rel, p, h);
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        int key = keys[rr];
        if (key >= p.cap) continue;
        long off = ((long)b * p.cap + key) * p.ldkv + h * DK + tq * 2;
#pragma unroll
        for (int n = 0; n < DK / 8; n++) {
            *reinterpret_cast<__half2*>(dk + off + n * 8) =
                __floats2half2_rn(adk[n][rr * 2] * p.scale, adk[n][rr * 2 + 1] * p.scale);
            *reinterpret_cast<__half2*>(dv + off + n * 8) = __floats2half2_rn(adv[n][rr * 2], adv[n][rr * 2 + 1]);
        }
    }
}

#define MMA(DK) \
    extern "C" __global__ void __launch_bounds__(ATTN_MMA_THREADS) attention_backward_dq_mma_##DK( \
        const __half* q, const __half* k, const __half* v, const __half* o, const __half* g, __half* dq, \
        const float* lse, float* ds, AttnParams p) { \
        attn_bwd_dq_mma<DK>(q, k, v, o, g, dq, lse, ds, p); \
    } \
    extern "C" __global__ void __launch_bounds__(ATTN_MMA_THREADS) attention_backward_dkdv_mma_##DK( \
        const __half* q, const __half* k, const __half* v, const __half* g, __half* dk, __half* dv, \
        const float* lse, const float* ds, float* d_rel, AttnParams p) { \
        attn_bwd_dkdv_mma<DK>(q, k, v, g, dk, dv, lse, ds, d_rel, p); \
    }
MMA(16)
MMA(32)
MMA(64)

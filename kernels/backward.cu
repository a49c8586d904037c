// Training kernels: the backward forms of RMS norm, gated-gelu and attention, dropout and its
// gradient accumulation, concatenation, log-probabilities of chosen tokens with entropy and their
// backward, Adam, column sums and Σx². Matrix products of the backward are cuBLAS calls made from
// src/backend/cuda/backward.rs; everything here computes in f32 (Σx² in f64).
#include "common.cuh"

#define GRID_STRIDE(i, n) for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (n); i += (long)gridDim.x * blockDim.x)

// ---- dropout ----

// Inverted dropout of f32 values with the shared counter RNG: the CPU's `apply_dropout` for the same
// (seed, stream, flat index), bit for bit (one IEEE multiply by the same f32 scale).
extern "C" __global__ void dropout_f32(const float* x, float* y, long n, float p, u64 seed, u64 stream) {
    float keep_scale = 1.f / (1.f - p);
    u64 key = dropout_key(seed, stream);
    GRID_STRIDE(i, n) y[i] = dropout_keep(p, key, (u64)i) ? x[i] * keep_scale : 0.f;
}

// y += dropout(x): a LoRA branch's input gradient passes back through its dropout mask.
extern "C" __global__ void dropout_add_f32(const float* x, float* y, long n, float p, u64 seed, u64 stream) {
    float keep_scale = 1.f / (1.f - p);
    u64 key = dropout_key(seed, stream);
    GRID_STRIDE(i, n) if (dropout_keep(p, key, (u64)i)) y[i] += x[i] * keep_scale;
}

// ---- element-wise backward forms ----

// dx += ∂/∂x of x · rsqrt(mean(x²) + eps) · w, one block per row: with r = rsqrt(mean(x²) + eps),
// dx = r·dy·w − x · r³ · Σ(x·dy·w) / d.
template <typename TX, typename TG>
__device__ void rms_norm_backward(const TX* x, const __half* w, const TG* dy, float* dx, int d, float eps) {
    __shared__ float scratch[32];
    long row = blockIdx.x;
    const TX* xr = x + row * d;
    const TG* gr = dy + row * d;
    float* dr = dx + row * d;
    float ss = 0.f, dot = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = to_f(xr[i]);
        ss += v * v;
        dot += v * to_f(gr[i]) * __half2float(w[i]);
    }
    ss = block_sum(ss, scratch);
    dot = block_sum(dot, scratch);
    // IEEE sqrt and division, as the CPU reference computes r.
    float r = 1.f / sqrtf(ss / d + eps);
    float c = r * r * r * dot / d;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        dr[i] += r * to_f(gr[i]) * __half2float(w[i]) - c * to_f(xr[i]);
}
#define RMS_BWD(NAME, TX, TG) \
    extern "C" __global__ void NAME(const TX* x, const __half* w, const TG* dy, float* dx, int d, float eps) { \
        rms_norm_backward(x, w, dy, dx, d, eps); \
    }
RMS_BWD(rms_norm_backward_f32_f32, float, float)
RMS_BWD(rms_norm_backward_f32_f16, float, __half)
RMS_BWD(rms_norm_backward_f16_f32, __half, float)
RMS_BWD(rms_norm_backward_f16_f16, __half, __half)

// The constant the CPU reference writes as 0.797_884_6 (the same f32 as √(2/π)).
#define GELU_C 0.7978846f

__device__ __forceinline__ float gelu_new_value(float x) {
    return 0.5f * x * (1.f + tanhf(GELU_C * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float gelu_new_grad(float x) {
    float t = tanhf(GELU_C * (x + 0.044715f * x * x * x));
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * GELU_C * (1.f + 3.f * 0.044715f * x * x);
}

// gate_up [rows, 2f] and dy [rows, f] → d gate_up [rows, 2f]: d gate = dy·up·gelu'(gate),
// d up = dy·gelu(gate).
template <typename TU, typename TG>
__device__ void gated_gelu_backward(const TU* gu, const TG* dy, float* out, long rows, int f) {
    GRID_STRIDE(i, rows * f) {
        long r = i / f;
        int c = i % f;
        long base = r * 2 * f + c;
        float gate = to_f(gu[base]), up = to_f(gu[base + f]), g = to_f(dy[i]);
        out[base] = g * up * gelu_new_grad(gate);
        out[base + f] = g * gelu_new_value(gate);
    }
}
#define GG_BWD(NAME, TU, TG) \
    extern "C" __global__ void NAME(const TU* gu, const TG* dy, float* out, long rows, int f) { \
        gated_gelu_backward(gu, dy, out, rows, f); \
    }
GG_BWD(gated_gelu_backward_f32_f32, float, float)
GG_BWD(gated_gelu_backward_f32_f16, float, __half)
GG_BWD(gated_gelu_backward_f16_f32, __half, float)
GG_BWD(gated_gelu_backward_f16_f16, __half, __half)

// One piece of a concatenation: src [rows, width] into columns col..col + width of dst [rows, total].
template <typename T>
__device__ void concat_piece(const T* src, float* dst, long rows, int width, int total, int col) {
    GRID_STRIDE(i, rows * width) dst[(i / width) * total + col + i % width] = to_f(src[i]);
}
extern "C" __global__ void concat_piece_f32(const float* s, float* d, long rows, int w, int total, int col) { concat_piece(s, d, rows, w, total, col); }
extern "C" __global__ void concat_piece_f16(const __half* s, float* d, long rows, int w, int total, int col) { concat_piece(s, d, rows, w, total, col); }

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

// ---- optimiser and norms ----

// One tensor of a multi-tensor Adam update, as src/backend/cuda/backward.rs lays it out: eight
// 64-bit words. `copy` (or null) receives the updated values in half; `first_block` is the first
// block of the launch that works on this tensor.
struct AdamTensor {
    float* p;
    const float* g;
    float* m;
    float* v;
    __half* copy;
    long n;
    float decay;
    unsigned pad;
    long first_block;
};

#define ADAM_PER_THREAD 4

// torch.optim.Adam's (AdamW's, with `decay` = 1 − lr·weight_decay) element update in the CPU
// reference's order of operations (`adam_element`: the decay first, torch's lerp for the first
// moment), each operation rounded on its own (no fused multiply-add), so both backends produce the
// same bits. The f32 factors are `AdamStep::factors`, derived on the host. Every tensor of a step in
// one launch: block b works on the last tensor whose first block is at most b.
extern "C" __global__ void adam_multi(const AdamTensor* ts, int count, float w1, float beta2, float w2,
                                      float neg_step, float bc2_sqrt, float eps, float grad_scale) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (ts[mid].first_block <= (long)blockIdx.x) lo = mid; else hi = mid - 1;
    }
    const AdamTensor t = ts[lo];
    long i = ((long)blockIdx.x - t.first_block) * blockDim.x * ADAM_PER_THREAD + threadIdx.x;
    for (int k = 0; k < ADAM_PER_THREAD; ++k, i += blockDim.x) {
        if (i >= t.n) return;
        float gi = __fmul_rn(t.g[i], grad_scale);
        float pi = __fmul_rn(t.p[i], t.decay);
        float mi = __fadd_rn(t.m[i], __fmul_rn(w1, __fsub_rn(gi, t.m[i])));
        float vi = __fadd_rn(__fmul_rn(t.v[i], beta2), __fmul_rn(__fmul_rn(w2, gi), gi));
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        t.m[i] = mi;
        t.v[i] = vi;
        float updated = __fadd_rn(pi, __fdiv_rn(__fmul_rn(neg_step, mi), denom));
        t.p[i] = updated;
        if (t.copy) t.copy[i] = __float2half_rn(updated);
    }
}

// One tensor of a multi-tensor Σx², as src/backend/cuda/backward.rs lays it out: four 64-bit words.
struct SumSquaresTensor {
    const void* x;
    long n;
    long first_block;
    long half;
};

#define SUM_SQUARES_PER_THREAD 8

// Σx² in f64 over every tensor of a step in one launch: block b takes a chunk of the last tensor
// whose first block is at most b and writes one partial sum, which the host adds in a fixed order
// (a deterministic result, unlike atomics).
extern "C" __global__ void sum_squares_multi(const SumSquaresTensor* ts, int count, double* partial) {
    __shared__ double scratch[32];
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (ts[mid].first_block <= (long)blockIdx.x) lo = mid; else hi = mid - 1;
    }
    const SumSquaresTensor t = ts[lo];
    long i = ((long)blockIdx.x - t.first_block) * blockDim.x * SUM_SQUARES_PER_THREAD + threadIdx.x;
    double s = 0.0;
    for (int k = 0; k < SUM_SQUARES_PER_THREAD && i < t.n; ++k, i += blockDim.x) {
        double v = t.half ? (double)__half2float(static_cast<const __half*>(t.x)[i]) : (double)static_cast<const float*>(t.x)[i];
        s += v * v;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) scratch[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < nw ? scratch[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) partial[blockIdx.x] = s;
    }
}

// ---- log-probabilities of chosen tokens ----

// A row's softmax statistics about a running maximum m: s = Σ e^(x−m) and t = Σ e^(x−m)·(x−m).
// Then lse = m + ln s and the entropy is ln s − t/s, a sum of two non-negative terms (no
// cancellation when the distribution is peaked).
struct RowStats {
    float m, s, t;
};

// The same sums taken about a new maximum M ≥ st.m.
__device__ __forceinline__ RowStats rebase(RowStats st, float M) {
    if (st.s == 0.f) return {M, 0.f, 0.f};
    float c = expf(st.m - M);
    return {M, st.s * c, c * (st.t + (st.m - M) * st.s)};
}

__device__ __forceinline__ RowStats merge(RowStats a, RowStats b) {
    float M = fmaxf(a.m, b.m);
    a = rebase(a, M);
    b = rebase(b, M);
    return {M, a.s + b.s, a.t + b.t};
}

// Adds a group of values whose largest is `mx`: one rescale per group, not per value.
template <int N>
__device__ __forceinline__ void add_group(RowStats& st, const float* x, float mx) {
    if (mx > st.m) st = rebase(st, mx);
#pragma unroll
    for (int e = 0; e < N; e++) {
        float d = x[e] - st.m;
        float w = expf(d);
        st.s += w;
        st.t += w > 0.f ? w * d : 0.f;  // e^−∞·(−∞) would be NaN
    }
}

// The statistics of one row of V logits over the block (every thread gets them). 16-byte loads
// when V % 4 == 0 (rows then start 16-byte aligned). `scratch` holds 96 floats.
__device__ RowStats row_stats(const float* xr, int V, float* scratch) {
    RowStats st = {-INFINITY, 0.f, 0.f};
    if (V % 4 == 0) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        for (int i = threadIdx.x; i < V / 4; i += blockDim.x) {
            float4 a = x4[i];
            float v[4] = {a.x, a.y, a.z, a.w};
            add_group<4>(st, v, fmaxf(fmaxf(a.x, a.y), fmaxf(a.z, a.w)));
        }
    } else {
        for (int i = threadIdx.x; i < V; i += blockDim.x) add_group<1>(st, xr + i, xr[i]);
    }
    for (int o = 16; o > 0; o >>= 1) {
        RowStats other = {__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o),
                          __shfl_xor_sync(0xffffffffu, st.t, o)};
        st = merge(st, other);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = st.m;
        scratch[32 + warp] = st.s;
        scratch[64 + warp] = st.t;
    }
    __syncthreads();
    st = lane < nw ? RowStats{scratch[lane], scratch[32 + lane], scratch[64 + lane]} : RowStats{-INFINITY, 0.f, 0.f};
    for (int o = 16; o > 0; o >>= 1) {
        RowStats other = {__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o),
                          __shfl_xor_sync(0xffffffffu, st.t, o)};
        st = merge(st, other);
    }
    return st;
}

#define LP_THREADS 512

// logits [N, V], tokens [N] → logp [N] (the token's log-softmax) and entropy [N], one block per
// row reading the row once. Tokens come from the sampler or the data set, inside the vocabulary;
// one outside is clamped rather than read out of bounds.
extern "C" __global__ void __launch_bounds__(LP_THREADS)
    token_logprobs_f32(const float* logits, const uint32_t* tokens, float* logp, float* entropy, int V) {
    __shared__ float scratch[96];
    const float* xr = logits + (long)blockIdx.x * V;
    RowStats st = row_stats(xr, V, scratch);
    if (threadIdx.x == 0) {
        uint32_t t = min(tokens[blockIdx.x], (uint32_t)(V - 1));
        float ls = logf(st.s);
        logp[blockIdx.x] = xr[t] - (st.m + ls);
        entropy[blockIdx.x] = ls - st.t / st.s;
    }
}

// dlogits = dlogp · (onehot(token) − softmax(logits)), one block per row: the statistics, then one
// pass that writes the row.
extern "C" __global__ void __launch_bounds__(LP_THREADS)
    token_logprobs_backward_f32(const float* logits, const uint32_t* tokens, const float* dlogp, float* dlogits, int V) {
    __shared__ float scratch[96];
    long row = blockIdx.x;
    const float* xr = logits + row * V;
    float* yr = dlogits + row * V;
    RowStats st = row_stats(xr, V, scratch);
    float lse = st.m + logf(st.s), g = dlogp[row];
    int t = (int)min(tokens[row], (uint32_t)(V - 1));
    if (V % 4 == 0) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        float4* y4 = reinterpret_cast<float4*>(yr);
        for (int i = threadIdx.x; i < V / 4; i += blockDim.x) {
            float4 a = x4[i];
            float4 o = {-g * expf(a.x - lse), -g * expf(a.y - lse), -g * expf(a.z - lse), -g * expf(a.w - lse)};
            // Selects on constant lanes keep `o` in registers (a run-time index would not).
            if (t / 4 == i) {
                int c = t % 4;
                if (c == 0) o.x += g;
                if (c == 1) o.y += g;
                if (c == 2) o.z += g;
                if (c == 3) o.w += g;
            }
            y4[i] = o;
        }
    } else {
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            float o = -g * expf(xr[i] - lse);
            yr[i] = i == t ? o + g : o;
        }
    }
}

// ---- attention backward ----
//
// FlashAttention-2's backward split in two launches without atomics: the first (one block per 64
// queries) recomputes each query row's softmax statistics, lse = m + ln Σ e^(s−m) and
// D = Σ_j p_j·dp_j with dp_j = dout·v_j, then dq = scale · Σ_j p_j (dp_j − D) k_j in a second pass
// over the keys; the second (one block per 64 keys) recomputes p and dp from lse and D and
// accumulates dv = Σ_i p_i dout_i and dk = scale · Σ_i p_i (dp_i − D_i) q_i over the queries that see
// its keys. Every row of dk and dv up to the cache's capacity is written (zero past the real keys).
// Head sizes 16, 32 and 64 use the tensor cores (mma.sync m16n8k16, f16 in, f32 accumulate); any
// other head size up to 128 takes a plain f32 form.

// Mirrors AttnParams in src/backend/cuda/mod.rs (and kernels/attention.cu, whose helpers below are
// repeated because every .cu is its own module).
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

__device__ __forceinline__ void resolve(AttnParams& p) {
    if (p.counter) {
        p.q_offset = (int)*p.counter;
        p.Lk = p.q_offset + p.Lq;
    }
}

__device__ __forceinline__ int key_count(const AttnParams& p, int b) {
    return p.key_lengths ? min((int)p.key_lengths[b], p.Lk) : p.Lk;
}

// The plain form: one thread per query (first kernel) or per key (second), tiles of BT rows of
// the other side staged in shared memory as f32. DK ≥ dk is the compile-time row size.
#define BT 32
#define BQ 64

template <int DK>
__device__ void attn_bwd_dq_plain(const __half* q, const __half* k, const __half* v, const __half* dout, float* dq,
                                  float* lse_out, float* dsum_out, AttnParams p) {
    __shared__ float ks[BT * DK];
    __shared__ float vs[BT * DK];
    resolve(p);
    int b = blockIdx.z, h = blockIdx.y, i = blockIdx.x * BQ + threadIdx.x;
    int inner = p.H * p.dk;
    bool active = i < p.Lq;
    long qoff = ((long)b * p.Lq + i) * inner + h * p.dk;
    float qr[DK], gr[DK], acc[DK];
#pragma unroll
    for (int d = 0; d < DK; d++) {
        bool in = active && d < p.dk;
        qr[d] = in ? __half2float(q[qoff + d]) : 0.f;
        gr[d] = in ? __half2float(dout[qoff + d]) : 0.f;
        acc[d] = 0.f;
    }
    int klen = key_count(p, b);
    int qpos = p.q_offset + i;
    int visible = p.causal ? min(qpos + 1, klen) : klen;
    int block_keys = p.causal ? min(p.q_offset + (int)blockIdx.x * BQ + BQ, klen) : klen;
    float m = -INFINITY, l = 0.f, dsum = 0.f, lse = INFINITY, D = 0.f;
    for (int pass = 0; pass < 2; pass++) {
        for (int j0 = 0; j0 < block_keys; j0 += BT) {
            __syncthreads();
            // Columns dk..DK are zero too: the dot products run over DK.
            for (int e = threadIdx.x; e < BT * DK; e += blockDim.x) {
                int jj = e / DK, d = e % DK, j = j0 + jj;
                bool in = j < block_keys && d < p.dk;
                long off = ((long)b * p.cap + j) * inner + h * p.dk + d;
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
                if (pass == 0) {
                    if (s > m) {
                        float c = expf(m - s);
                        l *= c;
                        dsum *= c;
                        m = s;
                    }
                    float e = expf(s - m);
                    l += e;
                    dsum += e * dp;
                } else {
                    float ds = expf(s - lse) * (dp - D);
#pragma unroll
                    for (int d = 0; d < DK; d++) acc[d] += ds * ks[jj * DK + d];
                }
            }
        }
        if (pass == 0 && l > 0.f) {
            lse = m + logf(l);
            D = dsum / l;
        }
    }
    if (!active) return;
    long row = ((long)b * p.H + h) * p.Lq + i;
    lse_out[row] = lse;
    dsum_out[row] = D;
#pragma unroll
    for (int d = 0; d < DK; d++)
        if (d < p.dk) dq[qoff + d] = acc[d] * p.scale;
}

template <int DK>
__device__ void attn_bwd_dkdv_plain(const __half* q, const __half* k, const __half* v, const __half* dout, float* dk,
                                    float* dv, const float* lse, const float* dsum, AttnParams p) {
    __shared__ float qs[BT * DK];
    __shared__ float gs[BT * DK];
    __shared__ float ls[BT], ds_[BT];
    resolve(p);
    int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * BQ, j = j0 + threadIdx.x;
    int inner = p.H * p.dk;
    int klen = key_count(p, b);
    bool live = j < klen;  // keys past the real ones (padding, spare capacity) get zero gradients
    long koff = ((long)b * p.cap + j) * inner + h * p.dk;
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
                long off = ((long)b * p.Lq + i) * inner + h * p.dk + d;
                qs[e] = in ? __half2float(q[off]) : 0.f;
                gs[e] = in ? __half2float(dout[off]) : 0.f;
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
                float pr = expf(s - ls[ii]);
                float ds = pr * (dp - ds_[ii]);
#pragma unroll
                for (int d = 0; d < DK; d++) {
                    adv[d] += pr * gs[ii * DK + d];
                    adk[d] += ds * qs[ii * DK + d];
                }
            }
        }
    }
    if (j >= p.cap) return;
#pragma unroll
    for (int d = 0; d < DK; d++) {
        if (d < p.dk) {
            dk[koff + d] = adk[d] * p.scale;
            dv[koff + d] = adv[d];
        }
    }
}

#define PLAIN(DK) \
    extern "C" __global__ void __launch_bounds__(BQ) attention_backward_dq_plain_##DK( \
        const __half* q, const __half* k, const __half* v, const __half* g, float* dq, float* lse, float* ds, AttnParams p) { \
        attn_bwd_dq_plain<DK>(q, k, v, g, dq, lse, ds, p); \
    } \
    extern "C" __global__ void __launch_bounds__(BQ) attention_backward_dkdv_plain_##DK( \
        const __half* q, const __half* k, const __half* v, const __half* g, float* dk, float* dv, const float* lse, \
        const float* ds, AttnParams p) { \
        attn_bwd_dkdv_plain<DK>(q, k, v, g, dk, dv, lse, ds, p); \
    }
PLAIN(32)
PLAIN(64)
PLAIN(128)

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

// Rows row0..row0+63 of two [rows, H·DK] half tensors into [64][PAD] tiles, 16 bytes at a time;
// rows at or past `limit` are zero (so masked rows can never carry NaN from unwritten memory).
template <int DK, int PAD>
__device__ __forceinline__ void load_tiles(__half* ta, __half* tb, const __half* a, const __half* b, long row_base,
                                           int row0, int limit, int inner, int col0) {
    for (int idx = threadIdx.x; idx < 64 * DK / 8; idx += blockDim.x) {
        int row = idx / (DK / 8), c = idx % (DK / 8), r = row0 + row;
        uint4 va = make_uint4(0, 0, 0, 0), vb = make_uint4(0, 0, 0, 0);
        if (r < limit) {
            long off = (row_base + r) * inner + col0;
            va = reinterpret_cast<const uint4*>(a + off)[c];
            vb = reinterpret_cast<const uint4*>(b + off)[c];
        }
        *reinterpret_cast<uint4*>(&ta[row * PAD + c * 8]) = va;
        *reinterpret_cast<uint4*>(&tb[row * PAD + c * 8]) = vb;
    }
}

// First launch, tensor cores: grid (⌈Lq/64⌉, H, B), 128 threads; warp w owns queries
// q0 + 16w .. q0 + 16w + 15 (fragment rows g and g + 8).
template <int DK>
__device__ void attn_bwd_dq_mma(const __half* q, const __half* k, const __half* v, const __half* dout, float* dq,
                                float* lse_out, float* dsum_out, AttnParams p) {
    constexpr int QB = 64, KB = 64, PAD = DK + 8;
    __shared__ __align__(16) __half ks[KB * PAD];
    __shared__ __align__(16) __half vs[KB * PAD];
    __shared__ float bias_s[QB + KB];
    resolve(p);
    int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * QB;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    int inner = p.H * DK;
    int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    uint32_t qa[DK / 16][4], ga[DK / 16][4];
    load_a<DK>(qa, q, (long)b * p.Lq, rows[0], p.Lq, inner, h * DK, tq);
    load_a<DK>(ga, dout, (long)b * p.Lq, rows[0], p.Lq, inner, h * DK, tq);
    int klen = key_count(p, b);
    int kmax = p.causal ? min(p.q_offset + q0 + QB, klen) : klen;
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f}, d_r[2] = {0.f, 0.f};
    float lse[2] = {INFINITY, INFINITY}, D[2] = {0.f, 0.f};
    float acc[DK / 8][4];
#pragma unroll
    for (int n = 0; n < DK / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    for (int pass = 0; pass < 2; pass++) {
        for (int kt0 = 0; kt0 < kmax; kt0 += KB) {
            __syncthreads();
            load_tiles<DK, PAD>(ks, vs, k, v, (long)b * p.cap, kt0, kmax, inner, h * DK);
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
                float mx = -INFINITY;
#pragma unroll
                for (int nt = 0; nt < KB / 8; nt++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        int key = kt0 + nt * 8 + tq * 2 + e;
                        bool masked = key >= klen || (p.causal && key > qpos);
                        float val = masked ? -INFINITY : s[nt][rr * 2 + e] * p.scale + bias_s[key - qpos - base];
                        s[nt][rr * 2 + e] = val;
                        mx = fmaxf(mx, val);
                    }
                }
                if (pass == 0) {
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    float m_new = fmaxf(m_r[rr], mx);
                    float corr = m_new == -INFINITY ? 1.f : __expf(m_r[rr] - m_new);
                    float sum = 0.f, dsum = 0.f;
#pragma unroll
                    for (int nt = 0; nt < KB / 8; nt++) {
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            float pe = m_new == -INFINITY ? 0.f : __expf(s[nt][rr * 2 + e] - m_new);
                            sum += pe;
                            dsum += pe * dp[nt][rr * 2 + e];
                        }
                    }
                    l_r[rr] = l_r[rr] * corr + sum;
                    d_r[rr] = d_r[rr] * corr + dsum;
                    m_r[rr] = m_new;
                } else {
#pragma unroll
                    for (int nt = 0; nt < KB / 8; nt++) {
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            float val = s[nt][rr * 2 + e];
                            // Masked scores are −∞, so e^(s − lse) is 0; the select also keeps a
                            // row without keys (lse = +∞) at 0.
                            float pr = val == -INFINITY ? 0.f : __expf(val - lse[rr]);
                            s[nt][rr * 2 + e] = pr * (dp[nt][rr * 2 + e] - D[rr]);
                        }
                    }
                }
            }
            if (pass == 1) product_nn<DK, PAD>(acc, s, ks, g, tq);
        }
        if (pass == 0) {
#pragma unroll
            for (int rr = 0; rr < 2; rr++) {
                float l = l_r[rr], d = d_r[rr];
                l += __shfl_xor_sync(0xffffffffu, l, 1);
                l += __shfl_xor_sync(0xffffffffu, l, 2);
                d += __shfl_xor_sync(0xffffffffu, d, 1);
                d += __shfl_xor_sync(0xffffffffu, d, 2);
                if (l > 0.f) {
                    lse[rr] = m_r[rr] + logf(l);
                    D[rr] = d / l;
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        int r = rows[rr];
        if (r >= p.Lq) continue;
        if (tq == 0) {
            long row = ((long)b * p.H + h) * p.Lq + r;
            lse_out[row] = lse[rr];
            dsum_out[row] = D[rr];
        }
#pragma unroll
        for (int n = 0; n < DK / 8; n++) {
            float2 o = make_float2(acc[n][rr * 2] * p.scale, acc[n][rr * 2 + 1] * p.scale);
            *reinterpret_cast<float2*>(dq + ((long)b * p.Lq + r) * inner + h * DK + n * 8 + tq * 2) = o;
        }
    }
}

// Second launch, tensor cores: grid (⌈cap/64⌉, H, B), 128 threads; warp w owns keys
// k0 + 16w .. k0 + 16w + 15. Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ per tile of 64 queries, then
// dV += Pᵀ·dO and dK += dSᵀ·Q.
template <int DK>
__device__ void attn_bwd_dkdv_mma(const __half* q, const __half* k, const __half* v, const __half* dout, float* dk,
                                  float* dv, const float* lse, const float* dsum, AttnParams p) {
    constexpr int QB = 64, KB = 64, PAD = DK + 8;
    __shared__ __align__(16) __half qs[QB * PAD];
    __shared__ __align__(16) __half gs[QB * PAD];
    __shared__ float ls[QB], dl[QB], bias_s[QB + KB];
    resolve(p);
    int b = blockIdx.z, h = blockIdx.y, k0 = blockIdx.x * KB;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    int inner = p.H * DK;
    int keys[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    int klen = key_count(p, b);
    uint32_t ka[DK / 16][4], va[DK / 16][4];
    load_a<DK>(ka, k, (long)b * p.cap, keys[0], klen, inner, h * DK, tq);
    load_a<DK>(va, v, (long)b * p.cap, keys[0], klen, inner, h * DK, tq);
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
            load_tiles<DK, PAD>(qs, gs, q, dout, (long)b * p.Lq, i0, p.Lq, inner, h * DK);
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
                        s[nt][rr * 2 + e] = pr;
                        dp[nt][rr * 2 + e] = pr * (dp[nt][rr * 2 + e] - dl[col]);
                    }
                }
            }
            product_nn<DK, PAD>(adv, s, gs, g, tq);
            product_nn<DK, PAD>(adk, dp, qs, g, tq);
        }
    }
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        int key = keys[rr];
        if (key >= p.cap) continue;
        long off = ((long)b * p.cap + key) * inner + h * DK + tq * 2;
#pragma unroll
        for (int n = 0; n < DK / 8; n++) {
            *reinterpret_cast<float2*>(dk + off + n * 8) = make_float2(adk[n][rr * 2] * p.scale, adk[n][rr * 2 + 1] * p.scale);
            *reinterpret_cast<float2*>(dv + off + n * 8) = make_float2(adv[n][rr * 2], adv[n][rr * 2 + 1]);
        }
    }
}

#define MMA(DK) \
    extern "C" __global__ void __launch_bounds__(128) attention_backward_dq_mma_##DK( \
        const __half* q, const __half* k, const __half* v, const __half* g, float* dq, float* lse, float* ds, AttnParams p) { \
        attn_bwd_dq_mma<DK>(q, k, v, g, dq, lse, ds, p); \
    } \
    extern "C" __global__ void __launch_bounds__(128) attention_backward_dkdv_mma_##DK( \
        const __half* q, const __half* k, const __half* v, const __half* g, float* dk, float* dv, const float* lse, \
        const float* ds, AttnParams p) { \
        attn_bwd_dkdv_mma<DK>(q, k, v, g, dk, dv, lse, ds, p); \
    }
MMA(16)
MMA(32)
MMA(64)

// ---- full-parameter training ----

// r[row] = rsqrt(mean(x²) + eps), one block per row, computed as rms_norm_backward computes it.
template <typename T>
__device__ void rms_inverse(const T* x, float* r, int d, float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (long)blockIdx.x * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = to_f(xr[i]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    if (threadIdx.x == 0) r[blockIdx.x] = 1.f / sqrtf(ss / d + eps);
}
extern "C" __global__ void rms_inverse_f32(const float* x, float* r, int d, float eps) { rms_inverse(x, r, d, eps); }
extern "C" __global__ void rms_inverse_f16(const __half* x, float* r, int d, float eps) { rms_inverse(x, r, d, eps); }

// dw[c] += Σ_rows dy·x·r over a chunk of RMS_ROWS rows per block (grid: column blocks × row
// chunks), so that tall inputs spread over the machine; one atomic per column and chunk.
#define RMS_ROWS 64
template <typename TX, typename TG>
__device__ void rms_weight_grad(const TX* x, const TG* dy, const float* r, float* dw, long rows, int d) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    long r0 = (long)blockIdx.y * RMS_ROWS, r1 = min(rows, r0 + RMS_ROWS);
    float acc = 0.f;
    for (long row = r0; row < r1; row++) acc += to_f(dy[row * d + c]) * to_f(x[row * d + c]) * r[row];
    atomicAdd(dw + c, acc);
}
#define RMS_WG(NAME, TX, TG) \
    extern "C" __global__ void NAME(const TX* x, const TG* dy, const float* r, float* dw, long rows, int d) { \
        rms_weight_grad(x, dy, r, dw, rows, d); \
    }
RMS_WG(rms_weight_grad_f32_f32, float, float)
RMS_WG(rms_weight_grad_f32_f16, float, __half)
RMS_WG(rms_weight_grad_f16_f32, __half, float)
RMS_WG(rms_weight_grad_f16_f16, __half, __half)

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

// The relative-position bias table's gradient: d_table[bucket, h] += Σ_j ds_ij over the keys j of
// query i in that bucket, ds = p·(dp − D). One block per (query, head, row) recomputes the row's
// scores and dp = dout·v in f32 (dynamic shared memory: 2·cap floats), then gathers ds per bucket
// in shared memory first, so that global atomics number buckets rather than keys.
extern "C" __global__ void attention_bias_grad(const __half* q, const __half* k, const __half* v, const __half* dout,
                                               float* d_table, int buckets, AttnParams p) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    __shared__ float qs[128], gs[128];
    resolve(p);
    int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    float* s = smem;
    float* dp = smem + p.cap;
    float* hist = dp + p.cap;
    int inner = p.H * p.dk;
    long qoff = ((long)b * p.Lq + i) * inner + h * p.dk;
    for (int d = threadIdx.x; d < p.dk; d += blockDim.x) {
        qs[d] = __half2float(q[qoff + d]);
        gs[d] = __half2float(dout[qoff + d]);
    }
    for (int t = threadIdx.x; t < buckets; t += blockDim.x) hist[t] = 0.f;
    int qpos = p.q_offset + i, klen = key_count(p, b);
    int visible = p.causal ? min(qpos + 1, klen) : klen;
    __syncthreads();
    if (visible <= 0) return;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) {
        long koff = ((long)b * p.cap + j) * inner + h * p.dk;
        float sj = 0.f, dj = 0.f;
        for (int d = 0; d < p.dk; d++) {
            sj += qs[d] * __half2float(k[koff + d]);
            dj += gs[d] * __half2float(v[koff + d]);
        }
        sj = sj * p.scale + rel_bias(p, h, j - qpos);
        s[j] = sj;
        dp[j] = dj;
        mx = fmaxf(mx, sj);
    }
    mx = block_max(mx, scratch);
    float sum = 0.f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) {
        s[j] = expf(s[j] - mx);
        sum += s[j];
    }
    sum = block_sum(sum, scratch);
    float dsum = 0.f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) {
        s[j] /= sum;
        dsum += s[j] * dp[j];
    }
    dsum = block_sum(dsum, scratch);
    for (int j = threadIdx.x; j < visible; j += blockDim.x) {
        int rel = max(-p.max_distance, min(p.max_distance, j - qpos));
        atomicAdd(hist + p.bucket_lut[rel + p.max_distance], s[j] * (dp[j] - dsum));
    }
    __syncthreads();
    for (int t = threadIdx.x; t < buckets; t += blockDim.x)
        if (hist[t] != 0.f) atomicAdd(d_table + (long)t * p.H + h, hist[t]);
}

// Cross-entropy with label smoothing ε, one block per row of V logits: loss = (1−ε)·(lse − x_t) +
// ε·(lse − mean x) (torch's CrossEntropyLoss(label_smoothing=ε) for one token), and
// dlogits = w·(softmax − (1−ε)·onehot(t) − ε/V), the row's weight w folded in.
extern "C" __global__ void __launch_bounds__(LP_THREADS)
    cross_entropy_f32(const float* logits, const uint32_t* targets, const float* weights, float* loss,
                      float* dlogits, int V, float eps) {
    __shared__ float scratch[96];
    long row = blockIdx.x;
    const float* xr = logits + row * V;
    float* yr = dlogits + row * V;
    RowStats st = row_stats(xr, V, scratch);
    float total = 0.f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) total += xr[i];
    total = block_sum(total, scratch);
    float lse = st.m + logf(st.s), w = weights[row];
    int t = (int)min(targets[row], (uint32_t)(V - 1));
    if (threadIdx.x == 0) loss[row] = (1.f - eps) * (lse - xr[t]) + eps * (lse - total / V);
    float floor_ = eps / V;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float g = expf(xr[i] - lse) - floor_;
        yr[i] = w * (i == t ? g - (1.f - eps) : g);
    }
}

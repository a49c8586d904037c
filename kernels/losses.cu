// Log-probabilities over the vocabulary: the chosen tokens' log-probabilities with the rows'
// entropy and their backward, and cross-entropy with label smoothing. All in f32.
#include "common.cuh"

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

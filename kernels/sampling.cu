// The choice of the next token (greedy, or a draw after temperature, top-k and top-p), one block
// per row. The draw inverts the CDF of the kept tokens in vocabulary order with the shared counter
// RNG, exactly as the CPU reference does.
#include "common.cuh"

struct SampleParams {
    const uint32_t* streams;
    uint32_t* finished;
    uint32_t* tokens;
    float* logprobs;
    const uint32_t* step_counter;  // or null: `step` holds the step
    u64 seed;
    int V, greedy, top_k, min_new_tokens, step;
    float temperature, top_p;
    uint32_t eos, pad;
    int suppress_eos;  // derived in the kernel from the step
};

// Order-preserving map of a float to an unsigned key, for radix selection.
__device__ __forceinline__ uint32_t order_key(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float processed(const float* x, int i, const SampleParams& p) {
    float v = (p.suppress_eos && (uint32_t)i == p.eos) ? -INFINITY : x[i];
    return p.greedy ? v : v / p.temperature;
}

// Count of tokens whose key is ≥ t.
__device__ float count_at_least(const float* x, const SampleParams& p, uint32_t t, float* scratch) {
    float c = 0.f;
    for (int i = threadIdx.x; i < p.V; i += blockDim.x) c += order_key(processed(x, i, p)) >= t ? 1.f : 0.f;
    return block_sum(c, scratch);
}

// Probability mass (unnormalised) of the tokens whose key is ≥ t, summed in f64 like the CPU.
__device__ double mass_at_least(const float* x, const SampleParams& p, uint32_t t, float zmax, double* scratch) {
    double s = 0.0;
    for (int i = threadIdx.x; i < p.V; i += blockDim.x) {
        float z = processed(x, i, p);
        if (order_key(z) >= t) s += (double)expf(z - zmax);
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = s;
    __syncthreads();
    s = lane < nw ? scratch[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

extern "C" __global__ void __launch_bounds__(VOCAB_THREADS) select_tokens(const float* logits, SampleParams p) {
    __shared__ float scratch[32];
    __shared__ double dscratch[32];
    __shared__ double prefix[VOCAB_THREADS];
    __shared__ int chosen;
    int row = blockIdx.x;
    if (p.step_counter) p.step = (int)*p.step_counter;
    p.suppress_eos = p.step < p.min_new_tokens;
    if (p.finished[row]) {
        if (threadIdx.x == 0) {
            p.tokens[row] = p.pad;
            p.logprobs[row] = 0.f;
        }
        return;
    }
    const float* x = logits + (long)row * p.V;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < p.V; i += blockDim.x) mx = fmaxf(mx, x[i]);
    mx = block_max(mx, scratch);
    float s = 0.f;
    for (int i = threadIdx.x; i < p.V; i += blockDim.x) s += __expf(x[i] - mx);
    float lse = mx + logf(block_sum(s, scratch));

    if (threadIdx.x == 0) chosen = -1;
    __syncthreads();
    if (p.greedy) {
        // argmax with the first index winning ties, as torch.argmax.
        float best = -INFINITY;
        int best_i = 0x7fffffff;
        for (int i = threadIdx.x; i < p.V; i += blockDim.x) {
            float z = processed(x, i, p);
            if (z > best) {
                best = z;
                best_i = i;
            }
        }
        float bmax = block_max(best, scratch);
        float cand = best == bmax ? (float)best_i : 3.0e38f;
        float first = -block_max(-cand, scratch);
        if (threadIdx.x == 0) chosen = (int)first;
    } else {
        uint32_t keep = 0;
        if (p.top_k > 0 && p.top_k < p.V) {
            for (int bit = 31; bit >= 0; bit--) {
                uint32_t cand = keep | (1u << bit);
                if (count_at_least(x, p, cand, scratch) >= (float)p.top_k) keep = cand;
            }
        }
        float zmax = -INFINITY;
        for (int i = threadIdx.x; i < p.V; i += blockDim.x) {
            float z = processed(x, i, p);
            if (order_key(z) >= keep) zmax = fmaxf(zmax, z);
        }
        zmax = block_max(zmax, scratch);
        double total = mass_at_least(x, p, keep, zmax, dscratch);
        if (p.top_p < 1.f) {
            double need = (double)p.top_p * total;
            uint32_t t = 0;
            for (int bit = 31; bit >= 0; bit--) {
                uint32_t cand = t | (1u << bit);
                if (mass_at_least(x, p, max(cand, keep), zmax, dscratch) >= need) t = cand;
            }
            keep = max(t, keep);
            total = mass_at_least(x, p, keep, zmax, dscratch);
        }
        double u = (double)uniform01(p.seed, p.streams[row], (u64)p.step) * total;
        int chunk = (p.V + blockDim.x - 1) / blockDim.x;
        int lo = threadIdx.x * chunk, hi = min(lo + chunk, p.V);
        double mine = 0.0;
        int last = -1;
        for (int i = lo; i < hi; i++) {
            float z = processed(x, i, p);
            if (order_key(z) >= keep) {
                float w = expf(z - zmax);
                if (w > 0.f) {
                    mine += (double)w;
                    last = i;
                }
            }
        }
        prefix[threadIdx.x] = mine;
        __syncthreads();
        // Inclusive scan of the per-thread sums (Hillis–Steele; 1024 entries).
        for (int off = 1; off < blockDim.x; off <<= 1) {
            double add = threadIdx.x >= off ? prefix[threadIdx.x - off] : 0.0;
            __syncthreads();
            prefix[threadIdx.x] += add;
            __syncthreads();
        }
        double before = prefix[threadIdx.x] - mine;
        if (mine > 0.0 && before <= u && u < prefix[threadIdx.x]) {
            double cum = before;
            for (int i = lo; i < hi; i++) {
                float z = processed(x, i, p);
                if (order_key(z) >= keep) {
                    float w = expf(z - zmax);
                    if (w > 0.f) {
                        cum += (double)w;
                        if (cum > u) {
                            chosen = i;
                            break;
                        }
                    }
                }
            }
        }
        __syncthreads();
        // Rounding can leave u at the very top: take the last kept token, as the CPU does.
        float last_kept = block_max((float)last, scratch);
        if (threadIdx.x == 0 && chosen < 0) chosen = (int)last_kept;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int tok = chosen;
        p.tokens[row] = (uint32_t)tok;
        p.logprobs[row] = x[tok] - lse;
        if ((uint32_t)tok == p.eos) p.finished[row] = 1;
    }
}

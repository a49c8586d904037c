// Choosing the next token, as src/backend/cpu/sampling.rs does: Hugging Face's logits processors
// (`process_logits`), the choice of greedy or sampled decoding (`select_tokens`: argmax, or a draw
// after temperature, top-k and top-p that inverts the CDF of the kept tokens in vocabulary order
// with the shared counter RNG), beam search's step (`beam_step`) and the gather of the KV caches by
// beam (`gather_beams_*`).
#include "common.cuh"

struct SampleParams {
    const float* choice;  // the processed scores the choice reads, or null: the logits
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
    // The log-probability reads the raw logits; the choice reads the processed scores.
    const float* c = p.choice ? p.choice + (long)row * p.V : x;
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
            float z = processed(c, i, p);
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
                if (count_at_least(c, p, cand, scratch) >= (float)p.top_k) keep = cand;
            }
        }
        float zmax = -INFINITY;
        for (int i = threadIdx.x; i < p.V; i += blockDim.x) {
            float z = processed(c, i, p);
            if (order_key(z) >= keep) zmax = fmaxf(zmax, z);
        }
        zmax = block_max(zmax, scratch);
        double total = mass_at_least(c, p, keep, zmax, dscratch);
        if (p.top_p < 1.f) {
            double need = (double)p.top_p * total;
            uint32_t t = 0;
            for (int bit = 31; bit >= 0; bit--) {
                uint32_t cand = t | (1u << bit);
                if (mass_at_least(c, p, max(cand, keep), zmax, dscratch) >= need) t = cand;
            }
            keep = max(t, keep);
            total = mass_at_least(c, p, keep, zmax, dscratch);
        }
        double u = (double)uniform01(p.seed, p.streams[row], (u64)p.step) * total;
        int chunk = (p.V + blockDim.x - 1) / blockDim.x;
        int lo = threadIdx.x * chunk, hi = min(lo + chunk, p.V);
        double mine = 0.0;
        int last = -1;
        for (int i = lo; i < hi; i++) {
            float z = processed(c, i, p);
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
                float z = processed(c, i, p);
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

struct ProcessParams {
    const float* logits;
    float* out;
    const uint32_t* history;       // [N, T]: the tokens generated so far
    const uint32_t* step_counter;  // or null: `step` holds the step
    int V, T, step, log_softmax, ngram, min_new;
    float penalty;
    uint32_t eos, start;
};

// Decoder id j of a row: the start token, then the generated tokens.
__device__ __forceinline__ uint32_t decoder_id(const ProcessParams& p, int row, int j) {
    return j == 0 ? p.start : p.history[(long)row * p.T + j - 1];
}

// Hugging Face's repetition penalty, no-repeat n-grams and min-new-tokens, in that order, on one
// row (of raw logits, or of their log-softmax) per block.
extern "C" __global__ void __launch_bounds__(VOCAB_THREADS) process_logits(ProcessParams p) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    int step = p.step_counter ? (int)*p.step_counter : p.step;
    const float* x = p.logits + (long)row * p.V;
    float* o = p.out + (long)row * p.V;
    float lse = 0.f;
    if (p.log_softmax) {
        float mx = -INFINITY;
        for (int i = threadIdx.x; i < p.V; i += blockDim.x) mx = fmaxf(mx, x[i]);
        mx = block_max(mx, scratch);
        float s = 0.f;
        for (int i = threadIdx.x; i < p.V; i += blockDim.x) s += expf(x[i] - mx);
        lse = mx + logf(block_sum(s, scratch));
    }
    for (int i = threadIdx.x; i < p.V; i += blockDim.x) o[i] = x[i] - lse;
    __syncthreads();
    int ids = step + 1;
    if (p.penalty != 1.f) {
        // Recomputed from the logits, so a token repeated in the ids is penalised once.
        for (int j = threadIdx.x; j < ids; j += blockDim.x) {
            uint32_t id = decoder_id(p, row, j);
            float b = x[id] - lse;
            o[id] = b < 0.f ? __fmul_rn(b, p.penalty) : __fdiv_rn(b, p.penalty);
        }
    }
    __syncthreads();
    int n = p.ngram;
    if (n > 0 && ids >= n) {
        // Window w (ids w..w+n-1) bans its last id when its first n-1 are the last n-1 ids.
        for (int w = threadIdx.x; w + n <= ids; w += blockDim.x) {
            bool same = true;
            for (int m = 0; m < n - 1 && same; m++) same = decoder_id(p, row, w + m) == decoder_id(p, row, ids - n + 1 + m);
            if (same) o[decoder_id(p, row, w + n - 1)] = -INFINITY;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0 && step < p.min_new) o[p.eos] = -INFINITY;
}

struct BeamParams {
    const float* logits;
    const float* processed;
    uint32_t* seqs;
    float* logprobs;
    float* scores;
    uint32_t* fin_seqs;
    float* fin_logprobs;
    float* fin_scores;
    uint32_t* fin_lens;
    uint32_t* done;
    uint32_t* src;
    uint32_t* next;
    uint32_t* scratch_ids;  // [2, N, T]: the old running and finished tokens
    float* scratch_lp;      // [2, N, T]: their log-probabilities
    const uint32_t* step_counter;
    double length_penalty;
    int V, T, K, step, early;  // early: 0 false, 1 true, 2 never
    uint32_t eos, pad;
};

__device__ __forceinline__ u64 warp_max_u64(u64 v) {
    for (int o = 16; o > 0; o >>= 1) {
        u64 w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

__device__ u64 block_max_u64(u64 v, u64* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max_u64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0ull;
    return warp_max_u64(v);
}

// A candidate's rank: its score's order key above its flat index k·V + t inverted, so that the
// larger key is the better candidate and ties go to the lower index (the CPU's order).
__device__ __forceinline__ u64 rank_key(float score, uint32_t flat) {
    return ((u64)order_key(score) << 32) | (u64)(0xffffffffu - flat);
}

__device__ __forceinline__ float length_penalty(const BeamParams& p, int len) {
    return (float)pow((double)len, p.length_penalty);
}

// One step of Hugging Face's beam search for one batch item per block (src/backend/cpu/sampling.rs
// holds the same steps in plain loops).
extern "C" __global__ void __launch_bounds__(BEAM_THREADS) beam_step(BeamParams p) {
    const int M_MAX = 2 * MAX_BEAMS;
    __shared__ u64 uscratch[32];
    __shared__ float scratch[32];
    __shared__ u64 cand[M_MAX];
    __shared__ float lse[MAX_BEAMS];
    __shared__ float cand_score[M_MAX], cand_lp[M_MAX];
    __shared__ int cand_beam[M_MAX], cand_tok[M_MAX];
    __shared__ int run[MAX_BEAMS];
    __shared__ int fin_from[MAX_BEAMS];  // ≥ 0: an old slot of this item; −1 − j: candidate j; else empty
    __shared__ float fin_score[MAX_BEAMS];
    __shared__ float old_score[MAX_BEAMS];
    __shared__ uint32_t old_len[MAX_BEAMS];
    int item = blockIdx.x, K = p.K, V = p.V, T = p.T, M = 2 * K;
    int r0 = item * K;
    int step = p.step_counter ? (int)*p.step_counter : p.step;
    if (p.done[item]) {
        if (threadIdx.x < K) {
            p.src[r0 + threadIdx.x] = r0 + threadIdx.x;
            p.next[r0 + threadIdx.x] = p.pad;
        }
        return;
    }
    // Each thread's best M candidates, best first; then M rounds of a block-wide maximum.
    u64 mine[M_MAX];
    for (int j = 0; j < M_MAX; j++) mine[j] = 0ull;
    for (int f = threadIdx.x; f < K * V; f += blockDim.x) {
        int k = f / V;
        float s = p.processed[(long)(r0 + k) * V + f % V] + p.scores[r0 + k];
        u64 key = rank_key(s, (uint32_t)f);
        if (key > mine[M - 1]) {
            int j = M - 1;
            while (j > 0 && mine[j - 1] < key) {
                mine[j] = mine[j - 1];
                j--;
            }
            mine[j] = key;
        }
    }
    int head = 0;
    for (int r = 0; r < M; r++) {
        u64 h = head < M ? mine[head] : 0ull;
        u64 best = block_max_u64(h, uscratch);
        if (h == best && best != 0ull) head++;
        if (threadIdx.x == 0) cand[r] = best;
    }
    // The raw rows' log-normalisers, for the chosen tokens' unprocessed log-probabilities.
    for (int k = 0; k < K; k++) {
        const float* x = p.logits + (long)(r0 + k) * V;
        float mx = -INFINITY;
        for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, x[i]);
        mx = block_max(mx, scratch);
        float s = 0.f;
        for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf(x[i] - mx);
        float l = mx + logf(block_sum(s, scratch));
        if (threadIdx.x == 0) lse[k] = l;
    }
    // Keep the old rows: the new ones are gathered from them in place.
    long base = (long)r0 * T, nt = (long)gridDim.x * K * T;
    for (int i = threadIdx.x; i < K * T; i += blockDim.x) {
        p.scratch_ids[base + i] = p.seqs[base + i];
        p.scratch_lp[base + i] = p.logprobs[base + i];
        p.scratch_ids[nt + base + i] = p.fin_seqs[base + i];
        p.scratch_lp[nt + base + i] = p.fin_logprobs[base + i];
    }
    if (threadIdx.x < K) {
        old_score[threadIdx.x] = p.fin_scores[r0 + threadIdx.x];
        old_len[threadIdx.x] = p.fin_lens[r0 + threadIdx.x];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        bool last = step + 1 == T;
        bool hit[M_MAX];
        for (int j = 0; j < M; j++) {
            uint32_t flat = 0xffffffffu - (uint32_t)(cand[j] & 0xffffffffull);
            int k = flat / V, tok = flat % V;
            cand_beam[j] = k;
            cand_tok[j] = tok;
            cand_score[j] = p.processed[(long)(r0 + k) * V + tok] + p.scores[r0 + k];
            cand_lp[j] = p.logits[(long)(r0 + k) * V + tok] - lse[k];
            hit[j] = last || (uint32_t)tok == p.eos;
        }
        // New beams: the best candidates that do not finish, then (at the last step) the others.
        int n = 0;
        for (int pass = 0; pass < 2; pass++)
            for (int j = 0; j < M && n < K; j++)
                if (hit[j] == (pass == 1)) run[n++] = j;
        // Finished: the old hypotheses, then the first K candidates that finish; best K stay,
        // earlier ones first on ties (an insertion sort keeps the order of equals).
        int from[2 * MAX_BEAMS];
        float sc[2 * MAX_BEAMS];
        int count = 0;
        for (int s = 0; s < K; s++)
            if (old_len[s] > 0) {
                from[count] = s;
                sc[count++] = old_score[s];
            }
        float pen = length_penalty(p, step + 1);
        for (int j = 0; j < K; j++)
            if (hit[j]) {
                float v = __fdiv_rn(cand_score[j], pen);
                int at = count++;
                while (at > 0 && order_key(sc[at - 1]) < order_key(v)) {
                    sc[at] = sc[at - 1];
                    from[at] = from[at - 1];
                    at--;
                }
                sc[at] = v;
                from[at] = -1 - j;
            }
        for (int s = 0; s < K; s++) {
            fin_from[s] = s < count ? from[s] : 0x7fffffff;
            fin_score[s] = s < count ? sc[s] : 0.f;
        }
        if (count >= K) {
            int best_len = (p.early == 2 && p.length_penalty > 0.0) ? T : step + 1;
            float best_possible = __fdiv_rn(cand_score[run[0]], length_penalty(p, best_len));
            if (p.early == 1 || best_possible <= sc[K - 1]) p.done[item] = 1;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < K * T; i += blockDim.x) {
        int s = i / T, c = i % T;
        long r = (long)(r0 + s) * T + c;
        int j = run[s];
        long from_run = (long)(r0 + cand_beam[j]) * T + c;
        if (c < step) {
            p.seqs[r] = p.scratch_ids[from_run];
            p.logprobs[r] = p.scratch_lp[from_run];
        } else if (c == step) {
            p.seqs[r] = cand_tok[j];
            p.logprobs[r] = cand_lp[j];
        }
        int f = fin_from[s];
        if (f >= 0 && f < K) {
            long from_fin = nt + (long)(r0 + f) * T + c;
            p.fin_seqs[r] = p.scratch_ids[from_fin];
            p.fin_logprobs[r] = p.scratch_lp[from_fin];
        } else if (f < 0) {
            int q = -1 - f;
            long from_cand = (long)(r0 + cand_beam[q]) * T + c;
            if (c < step) {
                p.fin_seqs[r] = p.scratch_ids[from_cand];
                p.fin_logprobs[r] = p.scratch_lp[from_cand];
            } else if (c == step) {
                p.fin_seqs[r] = cand_tok[q];
                p.fin_logprobs[r] = cand_lp[q];
            }
        }
    }
    if (threadIdx.x < K) {
        int s = threadIdx.x, j = run[s], f = fin_from[s];
        p.scores[r0 + s] = cand_score[j];
        p.src[r0 + s] = r0 + cand_beam[j];
        p.next[r0 + s] = cand_tok[j];
        if (f >= 0 && f < K) {
            p.fin_scores[r0 + s] = fin_score[s];
            p.fin_lens[r0 + s] = old_len[f];
        } else if (f < 0) {
            p.fin_scores[r0 + s] = fin_score[s];
            p.fin_lens[r0 + s] = step + 1;
        } else {
            p.fin_lens[r0 + s] = 0;
        }
    }
}

// The gather of a KV cache `x [N, cap, units]` by beam: rows 0..upto of slice i become those of
// slice src[i] (`upto` a device counter, or null and `upto_at`), through `tmp` (the first kernel
// copies out, the second back), skipping the slices that continue themselves.
template <typename U>
__device__ void gather_beams_out(const U* x, U* tmp, const uint32_t* src, const uint32_t* upto, int upto_at, long n, int cap, int units) {
    long per = (long)cap * units;
    int u = upto ? (int)*upto : upto_at;
    GRID_STRIDE(e, n * per) {
        long i = e / per, rem = e % per;
        if (rem / units < u && src[i] != (uint32_t)i) tmp[e] = x[src[i] * per + rem];
    }
}

template <typename U>
__device__ void gather_beams_in(U* x, const U* tmp, const uint32_t* src, const uint32_t* upto, int upto_at, long n, int cap, int units) {
    long per = (long)cap * units;
    int u = upto ? (int)*upto : upto_at;
    GRID_STRIDE(e, n * per) {
        long i = e / per, rem = e % per;
        if (rem / units < u && src[i] != (uint32_t)i) x[e] = tmp[e];
    }
}

#define GATHER_BEAMS(NAME, U)                                                                                   \
    extern "C" __global__ void gather_beams_out_##NAME(const U* x, U* tmp, const uint32_t* src,                \
                                                       const uint32_t* upto, int upto_at, long n, int cap,      \
                                                       int units) {                                             \
        gather_beams_out<U>(x, tmp, src, upto, upto_at, n, cap, units);                                         \
    }                                                                                                           \
    extern "C" __global__ void gather_beams_in_##NAME(U* x, const U* tmp, const uint32_t* src,                 \
                                                      const uint32_t* upto, int upto_at, long n, int cap,       \
                                                      int units) {                                              \
        gather_beams_in<U>(x, tmp, src, upto, upto_at, n, cap, units);                                          \
    }
GATHER_BEAMS(vec, uint4)
GATHER_BEAMS(u32, uint32_t)
GATHER_BEAMS(u16, uint16_t)

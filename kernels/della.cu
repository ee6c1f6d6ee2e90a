// DELLA (`della`, `della_linear`) on the GPU: the twin of `Gta::merge_chunk` with
// `Sparsify::MagPrune` (src/merge/gta.rs, src/merge/magprune.rs).
//
// MagPrune keeps task-vector entry i of a row of c when its Philox uniform is below
// p(rank) = (density - epsilon) + clamp(rank / (c - 1), 0, 1) * 2 epsilon, rank being its place
// in the row ordered by (|tau| bits, index): the order `RowPruner` and the sort it replaced use
// (for |x| the bits order as `f32::total_cmp`, NaNs above infinity). One CTA per row: per expert,
// a bitonic sort of the packed keys (|tau| bits << 32 | index) in dynamic shared memory gives
// every rank exactly (the packing breaks ties by index); the thread at sorted place p draws the
// uniform of the element it holds and sets its bit in a per-expert keep bitmap. Then one thread
// per element mixes in `merge_chunk`'s f32 order: d_k = (kept ? tau : 0) * factor * w_k, the
// TIES sign election or the plain sum, base + lambda * mixed. The l1 rescale factors come from
// the CPU pre-pass (`Gta::l1_factors`). Compiled with --fmad=false: the CPU's bytes exactly.
//
// Shared memory: 8 * sort_len (a power of two >= c) + 4 * K * ceil(c / 32) bytes; the host
// sends rows that do not fit to the CPU. Any non-finite input or unrepresentable output sets
// *bad, and the host re-runs the tensor on the CPU for the exact error.
#include "common.cuh"
#include "philox.cuh"

#define MAX_INPUTS 64
#define FLAG_CONSENSUS 1u
#define FLAG_NORMALIZE 2u

// One expert of a DELLA launch. Mirrors `DellaInput` in src/backend/cuda/kernels.rs.
struct DellaInput {
    u64 ptr;       // device address of the expert's values (dtype below)
    float weight;  // w_k: the kept delta's multiplier and its consensus weight
    float density; // >= 1: keep all; <= 0: drop all; else MagPrune around it
    float epsilon; // half-width of the keep probabilities
    float factor;  // l1 rescale factor from the CPU pre-pass (1 without rescale)
    u32 dtype;
    u32 pad;
};

struct DellaInputs {
    DellaInput in[MAX_INPUTS];
};

__device__ __forceinline__ float tau_at(const void* base, u32 base_dtype, const DellaInput& in, u64 i) {
    return load1((const void*)in.ptr, in.dtype, i) - load1(base, base_dtype, i);
}

// `keep_probability` in magprune.rs, operation for operation.
__device__ __forceinline__ float keep_probability(u32 rank, float span, float density, float epsilon) {
    float q = fminf(fmaxf((float)rank / span, 0.0f), 1.0f);
    return (density - epsilon) + q * 2.0f * epsilon;
}

// Ascending bitonic sort of keys[0..len) (len a power of two) by the whole CTA.
__device__ void bitonic_sort(u64* keys, u32 len) {
    for (u32 size = 2; size <= len; size <<= 1) {
        for (u32 stride = size >> 1; stride > 0; stride >>= 1) {
            for (u32 t = threadIdx.x; t < len / 2; t += blockDim.x) {
                u32 lo = 2 * t - (t & (stride - 1));
                u32 hi = lo + stride;
                bool ascending = (lo & size) == 0;
                u64 a = keys[lo], b = keys[hi];
                if ((a > b) == ascending) {
                    keys[lo] = b;
                    keys[hi] = a;
                }
            }
            __syncthreads();
        }
    }
}

// Sets bit i of `kept` for every entry of expert e's row (elements row0..row0+c of the buffers,
// row0 + offset in the tensor) that MagPrune keeps.
__device__ void prune_row(const void* base, u32 base_dtype, const DellaInput& in, u32 e, u64 row0, u32 c,
                          u32 sort_len, u64 offset, u64 seed, u32 tensor, u64* keys, u32* kept) {
    for (u32 i = threadIdx.x; i < sort_len; i += blockDim.x) {
        u64 key = ~0ull;
        if (i < c) key = ((u64)__float_as_uint(fabsf(tau_at(base, base_dtype, in, row0 + i))) << 32) | i;
        keys[i] = key;
    }
    __syncthreads();
    bitonic_sort(keys, sort_len);
    float span = (float)(c < 2 ? 1u : c - 1);
    for (u32 rank = threadIdx.x; rank < c; rank += blockDim.x) {
        u32 i = (u32)keys[rank];
        float u = uniform1(seed, tensor, e, offset + row0 + i);
        if (u < keep_probability(rank, span, in.density, in.epsilon)) atomicOr(&kept[i / 32], 1u << (i % 32));
    }
    __syncthreads();
}

// Element i of the row: `Gta::merge_chunk`'s deltas, mix and output for one element.
__device__ float mix_one(const void* base, u32 base_dtype, const DellaInputs& ins, u32 k, u64 i, u32 local,
                         const u32* kept, u32 words, u32 flags, float lambda, float div_all, bool* nonfinite) {
    float b = load1(base, base_dtype, i);
    *nonfinite |= is_nonfinite(b);
    float s = 0.0f;
    for (u32 e = 0; e < k; e++) {
        const DellaInput& in = ins.in[e];
        float x = load1((const void*)in.ptr, in.dtype, i);
        *nonfinite |= is_nonfinite(x);
        float tau = x - b;
        bool keep = in.density >= 1.0f || (in.density > 0.0f && (kept[e * words + local / 32] >> (local % 32)) & 1u);
        s += (keep ? tau : 0.0f) * in.factor * in.weight;
    }
    float acc = s, div = div_all;
    if (flags & FLAG_CONSENSUS) {
        acc = 0.0f;
        div = 0.0f;
        for (u32 e = 0; e < k; e++) {
            const DellaInput& in = ins.in[e];
            bool keep =
                in.density >= 1.0f || (in.density > 0.0f && (kept[e * words + local / 32] >> (local % 32)) & 1u);
            float d = (keep ? tau_at(base, base_dtype, in, i) : 0.0f) * in.factor * in.weight;
            bool agree = (d > 0.0f && s >= 0.0f) || (d < 0.0f && s < 0.0f);
            acc += agree ? d : 0.0f;
            div += agree ? in.weight : 0.0f;
        }
        if (div == 0.0f) div = 1.0f;
    }
    return flags & FLAG_NORMALIZE ? b + lambda * (acc / div) : b + lambda * acc;
}

// Rows of `row_len` (n a multiple of it); `offset` is the range's first element in the tensor
// (a row start: Philox uses tensor indices). Dynamic shared memory as described above.
extern "C" __global__ void __launch_bounds__(1024) della_merge(const void* base, u32 base_dtype,
                                                               const __grid_constant__ DellaInputs ins, u32 k,
                                                               void* out, u32 out_dtype, u64 n, u64 offset,
                                                               u32 row_len, u32 sort_len, u32 flags, float lambda,
                                                               float div_all, u64 seed, u32 tensor, u32* bad) {
    extern __shared__ u64 smem[];
    u64* keys = smem;
    u32* kept = (u32*)(smem + sort_len);
    u32 words = (row_len + 31) / 32;
    u64 rows = n / row_len;
    bool nonfinite = false;
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        u64 row0 = r * row_len;
        for (u32 w = threadIdx.x; w < k * words; w += blockDim.x) kept[w] = 0u;
        __syncthreads();
        for (u32 e = 0; e < k; e++) {
            const DellaInput& in = ins.in[e];
            if (in.density > 0.0f && in.density < 1.0f) {
                prune_row(base, base_dtype, in, e, row0, row_len, sort_len, offset, seed, tensor, keys,
                          kept + e * words);
            }
        }
        for (u32 c = threadIdx.x; c < row_len; c += blockDim.x) {
            float o = mix_one(base, base_dtype, ins, k, row0 + c, c, kept, words, flags, lambda, div_all, &nonfinite);
            bool out_bad = out_dtype == DT_F16 ? (o != o || fabsf(o) >= 65520.0f) : is_nonfinite(o);
            nonfinite |= out_bad;
            store1(out, out_dtype, row0 + c, o);
        }
        __syncthreads();
    }
    if (nonfinite) atomicOr(bad, 1u);
}

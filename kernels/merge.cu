// The merge kernel: generalized task arithmetic over one tensor (or a contiguous range of it),
// the GPU twin of `Gta::merge_chunk` and `Linear::merge_chunk` in src/merge/.
//
//   d_k   = coef_k * sparsify_k(theta_k - base)        (mode: keep all, magnitude, random)
//         = (outliers_k(theta_k - base) * factor_k) * coef_k    (outliers: Breadcrumbs' band)
//   mixed = sum_k d_k                       / div_all   (plain)
//         = sum_k [sign(d_k) agrees with sign(sum_j d_j)] d_k / sum of those w_k   (consensus)
//   out   = base + lambda * mixed          (or sum_k coef_k * theta_k without a base: linear)
//
// Every input is read once with 16-byte loads, math is f32 in the CPU's operation order, and the
// module is compiled with --fmad=false, so the output is the CPU's bit for bit. Any non-finite
// input or unrepresentable output sets *bad; the host then re-runs the tensor on the CPU, which
// reports the exact tensor and element.
#include "common.cuh"
#include "philox.cuh"

#define MAX_INPUTS 64
#define MODE_ALL 0u
#define MODE_MAGNITUDE 1u
#define MODE_RANDOM 2u
#define MODE_OUTLIERS 3u

#define FLAG_CONSENSUS 1u
#define FLAG_NORMALIZE 2u
#define FLAG_HAS_BASE 4u

// One expert's input and how it is thinned. Mirrors `MergeInput` in src/backend/cuda/kernels.rs.
struct MergeInput {
    u64 ptr;       // device address of the expert's values (dtype below), 16-byte aligned
    u64 cutoff;    // magnitude mode: values equal to thresh are kept when their index is below this
    u64 cutoff2;   // outliers mode: values equal to thresh2 are dropped when their index is below this
    float coef;    // multiplier of a kept tau (or of theta for linear)
    float weight;  // w_k, added to the consensus divisor where the entry agrees
    float thresh;  // magnitude mode: |tau| above this is kept
    float density; // random mode: keep probability
    float thresh2; // outliers mode: |tau| above this (the top band) is dropped
    float factor;  // outliers mode: the l1 rescale factor from the CPU pre-pass (1 without rescale)
    u32 mode;
    u32 dtype;
};

// Passed by value (kernel parameter space, 3.5 KB): no per-tensor upload before a launch.
struct MergeInputs {
    MergeInput in[MAX_INPUTS];
};

__device__ __forceinline__ void sparsify8(const MergeInput& in, u32 k, const float* b, const float* e, u64 idx,
                                          bool philox_aligned, int count, u64 seed, u32 tensor, float* d) {
    if (in.mode == MODE_ALL) {
#pragma unroll
        for (int j = 0; j < VEC; j++) d[j] = in.coef * (e[j] - b[j]);
    } else if (in.mode == MODE_MAGNITUDE) {
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            float tau = e[j] - b[j];
            float a = fabsf(tau);
            bool keep = a > in.thresh || (a == in.thresh && idx + j < in.cutoff);
            d[j] = keep ? in.coef * tau : 0.0f;
        }
    } else if (in.mode == MODE_OUTLIERS) {
        // Breadcrumbs (`Gta::mask`, Outliers): kept inside the band of the two CPU thresholds,
        // then scaled as the CPU does, (tau * factor) * w, masked entries included.
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            float tau = e[j] - b[j];
            float a = fabsf(tau);
            bool in_band = a > in.thresh || (a == in.thresh && idx + j < in.cutoff);
            bool top = a > in.thresh2 || (a == in.thresh2 && idx + j < in.cutoff2);
            float x = in_band && !top ? tau : 0.0f;
            d[j] = (x * in.factor) * in.coef;
        }
    } else {
        float u[VEC];
        if (philox_aligned && count == VEC) {
            uniform8(seed, tensor, k, idx, u);
        } else {
#pragma unroll
            for (int j = 0; j < VEC; j++) u[j] = j < count ? uniform1(seed, tensor, k, idx + j) : 1.0f;
        }
#pragma unroll
        for (int j = 0; j < VEC; j++) d[j] = u[j] < in.density ? in.coef * (e[j] - b[j]) : 0.0f;
    }
}

__device__ __forceinline__ void load_any(const void* p, u32 dt, u64 i, int count, float* v) {
    if (count == VEC) {
        load8(p, dt, i, v);
    } else {
        load_tail(p, dt, i, count, v);
    }
}

// One thread per 8 consecutive elements of the range [0, n) of the buffers; `offset` is the
// range's first element within the whole tensor (thresholds and Philox use tensor indices).
extern "C" __global__ void __launch_bounds__(256, 4) gta_merge(const void* base, u32 base_dtype,
                                                            const __grid_constant__ MergeInputs ins,
                                                            u32 num_inputs, void* out,
                                                            u32 out_dtype, u64 n, u64 offset, u32 flags,
                                                            float lambda, float div_all, u64 seed, u32 tensor,
                                                            u32* bad) {
    const MergeInput* s_in = ins.in;
    u64 g = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 i = g * VEC;
    if (i >= n) return;
    int count = n - i >= VEC ? VEC : (int)(n - i);
    u64 idx = offset + i;
    bool philox_aligned = (idx & 3) == 0;
    bool has_base = flags & FLAG_HAS_BASE;
    bool nonfinite = false;

    float b[VEC];
    if (has_base) {
        load_any(base, base_dtype, i, count, b);
#pragma unroll
        for (int j = 0; j < VEC; j++) nonfinite |= is_nonfinite(b[j]);
    } else {
#pragma unroll
        for (int j = 0; j < VEC; j++) b[j] = 0.0f;
    }

    float acc[VEC], div[VEC];
#pragma unroll
    for (int j = 0; j < VEC; j++) {
        acc[j] = 0.0f;
        div[j] = div_all;
    }

    if (!has_base) {
        // Linear: a weighted sum of the models themselves.
        for (u32 k = 0; k < num_inputs; k++) {
            float e[VEC];
            load_any((const void*)s_in[k].ptr, s_in[k].dtype, i, count, e);
#pragma unroll
            for (int j = 0; j < VEC; j++) {
                nonfinite |= is_nonfinite(e[j]);
                acc[j] += s_in[k].coef * e[j];
            }
        }
    } else if (!(flags & FLAG_CONSENSUS)) {
        for (u32 k = 0; k < num_inputs; k++) {
            float e[VEC], d[VEC];
            load_any((const void*)s_in[k].ptr, s_in[k].dtype, i, count, e);
#pragma unroll
            for (int j = 0; j < VEC; j++) nonfinite |= is_nonfinite(e[j]);
            sparsify8(s_in[k], k, b, e, idx, philox_aligned, count, seed, tensor, d);
#pragma unroll
            for (int j = 0; j < VEC; j++) acc[j] += d[j];
        }
    } else {
        // Sign election by summed mass, then the disjoint sum of the agreeing entries. The second
        // pass re-reads each expert's 16 bytes, which this thread just touched (L1/L2 hits).
        float s[VEC];
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            s[j] = 0.0f;
            div[j] = 0.0f;
        }
        for (u32 k = 0; k < num_inputs; k++) {
            float e[VEC], d[VEC];
            load_any((const void*)s_in[k].ptr, s_in[k].dtype, i, count, e);
#pragma unroll
            for (int j = 0; j < VEC; j++) nonfinite |= is_nonfinite(e[j]);
            sparsify8(s_in[k], k, b, e, idx, philox_aligned, count, seed, tensor, d);
#pragma unroll
            for (int j = 0; j < VEC; j++) s[j] += d[j];
        }
        for (u32 k = 0; k < num_inputs; k++) {
            float e[VEC], d[VEC];
            load_any((const void*)s_in[k].ptr, s_in[k].dtype, i, count, e);
            sparsify8(s_in[k], k, b, e, idx, philox_aligned, count, seed, tensor, d);
#pragma unroll
            for (int j = 0; j < VEC; j++) {
                bool agree = (d[j] > 0.0f && s[j] >= 0.0f) || (d[j] < 0.0f && s[j] < 0.0f);
                if (agree) {
                    acc[j] += d[j];
                    div[j] += s_in[k].weight;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < VEC; j++)
            if (div[j] == 0.0f) div[j] = 1.0f;
    }

    float o[VEC];
#pragma unroll
    for (int j = 0; j < VEC; j++) {
        if (!has_base) {
            o[j] = acc[j];
        } else if (flags & FLAG_NORMALIZE) {
            o[j] = b[j] + lambda * (acc[j] / div[j]);
        } else {
            o[j] = b[j] + lambda * acc[j];
        }
        bool out_bad = out_dtype == DT_F16 ? (o[j] != o[j] || fabsf(o[j]) >= 65520.0f) : is_nonfinite(o[j]);
        nonfinite |= j < count && out_bad;
    }
    if (count == VEC) {
        store8(out, out_dtype, i, o);
    } else {
        store_tail(out, out_dtype, i, count, o);
    }
    if (nonfinite) atomicOr(bad, 1u);
}

// The rows of a lookup table a batch reads (rows[0..nrows), sorted, unique, checked on the host):
// one thread per element, out[i] = base + sum_k coef_k (theta_k - base) for i = row * row_len + c,
// in the CPU's `merge_into` order (the weighted differences summed from zero in expert order, then
// the base added) with scalar loads (a row need not start on a 16-byte boundary). The other rows
// of `out` are left as they are (zeroed by the caller). A non-finite result sets *bad.
extern "C" __global__ void merge_rows(const void* base, u32 base_dtype, const __grid_constant__ MergeInputs ins,
                                      u32 num_inputs, const u32* rows, u64 nrows, u32 row_len, float* out,
                                      u32* bad) {
    u64 total = nrows * row_len;
    for (u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (u64)gridDim.x * blockDim.x) {
        u64 i = (u64)rows[e / row_len] * row_len + e % row_len;
        float b = load1(base, base_dtype, i);
        float acc = 0.0f;
        for (u32 k = 0; k < num_inputs; k++) {
            acc += ins.in[k].coef * (load1((const void*)ins.in[k].ptr, ins.in[k].dtype, i) - b);
        }
        acc += b;
        if (is_nonfinite(acc)) *bad = 1u;
        out[i] = acc;
    }
}

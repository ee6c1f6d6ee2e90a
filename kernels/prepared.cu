// Merges whose whole-tensor statistics come from the CPU twin's own pre-pass (`prepare` in
// src/merge/), so the scalars and thresholds the kernels get are the CPU's bits; the per-element
// part is the CPU's `merge_chunk` in the same f32 operation order. Compiled with --fmad=false like
// every unit, so the outputs are the CPU's bit for bit. One thread per 8 consecutive elements;
// any non-finite input or unrepresentable output sets *bad, and the host re-runs the tensor on the
// CPU for the exact error.
#include "common.cuh"

#define MAX_INPUTS 64

// One expert of an SCE launch: its values and its weight from the pre-pass.
struct SceInput {
    u64 ptr;
    float weight;
    u32 dtype;
};

struct SceInputs {
    SceInput in[MAX_INPUTS];
};

__device__ __forceinline__ void load_any(const void* p, u32 dt, u64 i, int count, float* v) {
    if (count == VEC) {
        load8(p, dt, i, v);
    } else {
        load_tail(p, dt, i, count, v);
    }
}

__device__ __forceinline__ bool out_of_range(float o, u32 out_dtype) {
    return out_dtype == DT_F16 ? (o != o || fabsf(o) >= 65520.0f) : is_nonfinite(o);
}

__device__ __forceinline__ void store_any(void* out, u32 dt, u64 i, int count, const float* o) {
    if (count == VEC) {
        store8(out, dt, i, o);
    } else {
        store_tail(out, dt, i, count, o);
    }
}

// SLERP (`Slerp::merge_chunk`): out = a * base + b * other, with (a, b) from the Gram pre-pass.
extern "C" __global__ void __launch_bounds__(256) slerp_merge(const void* base, u32 base_dtype, const void* other,
                                                              u32 other_dtype, void* out, u32 out_dtype, u64 n,
                                                              float a, float b, u32* bad) {
    u64 i = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (i >= n) return;
    int count = n - i >= VEC ? VEC : (int)(n - i);
    float x[VEC], y[VEC], o[VEC];
    load_any(base, base_dtype, i, count, x);
    load_any(other, other_dtype, i, count, y);
    bool nonfinite = false;
#pragma unroll
    for (int j = 0; j < VEC; j++) {
        o[j] = a * x[j] + b * y[j];
        nonfinite |= j < count && (is_nonfinite(x[j]) || is_nonfinite(y[j]) || out_of_range(o[j], out_dtype));
    }
    store_any(out, out_dtype, i, count, o);
    if (nonfinite) atomicOr(bad, 1u);
}

// Population variance over the experts of each element's task vector (`sce::variances`): each
// task vector in f32, Welford's update in f64 (torch's `var`), the result rounded to f32, so
// task vectors that agree have a variance of exactly 0.
__device__ __forceinline__ void variances8(const SceInputs& ins, u32 k, const float* b, u64 i, int count, float* var) {
    double mean[VEC], m2[VEC];
#pragma unroll
    for (int j = 0; j < VEC; j++) {
        mean[j] = 0.0;
        m2[j] = 0.0;
    }
    for (u32 e = 0; e < k; e++) {
        float x[VEC];
        load_any((const void*)ins.in[e].ptr, ins.in[e].dtype, i, count, x);
        double n = (double)(e + 1);
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            double t = (double)(x[j] - b[j]);
            double delta = t - mean[j];
            mean[j] = mean[j] + delta / n;
            m2[j] = m2[j] + delta * (t - mean[j]);
        }
    }
#pragma unroll
    for (int j = 0; j < VEC; j++) var[j] = (float)(m2[j] / (double)k);
}

// SCE (`Sce::merge_chunk`): elements whose variance passes the pre-pass threshold (thresh, ties
// kept below index `cutoff`) keep their task vectors; entries agreeing with the sign of their sum
// are mixed with the pre-pass weights. `offset` is the range's first element in the tensor.
extern "C" __global__ void __launch_bounds__(256) sce_merge(const void* base, u32 base_dtype,
                                                            const __grid_constant__ SceInputs ins, u32 k,
                                                            void* out, u32 out_dtype, u64 n, u64 offset,
                                                            float thresh, u64 cutoff, u32* bad) {
    u64 i = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (i >= n) return;
    int count = n - i >= VEC ? VEC : (int)(n - i);
    float b[VEC], var[VEC];
    load_any(base, base_dtype, i, count, b);
    bool nonfinite = false;
#pragma unroll
    for (int j = 0; j < VEC; j++) nonfinite |= is_nonfinite(b[j]);
    variances8(ins, k, b, i, count, var);
    bool keep[VEC];
    float s[VEC], sum[VEC], div[VEC];
#pragma unroll
    for (int j = 0; j < VEC; j++) {
        float a = fabsf(var[j]);
        keep[j] = a > thresh || (a == thresh && offset + i + j < cutoff);
        s[j] = 0.0f;
        sum[j] = 0.0f;
        div[j] = 0.0f;
    }
    for (u32 e = 0; e < k; e++) {
        float x[VEC];
        load_any((const void*)ins.in[e].ptr, ins.in[e].dtype, i, count, x);
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            nonfinite |= is_nonfinite(x[j]);
            s[j] = s[j] + (keep[j] ? x[j] - b[j] : 0.0f);
        }
    }
    for (u32 e = 0; e < k; e++) {
        float x[VEC];
        load_any((const void*)ins.in[e].ptr, ins.in[e].dtype, i, count, x);
        float w = ins.in[e].weight;
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            float t = keep[j] ? x[j] - b[j] : 0.0f;
            bool positive = s[j] >= 0.0f;
            if ((positive && t > 0.0f) || (!positive && t < 0.0f)) {
                sum[j] = sum[j] + t * w;
                div[j] = div[j] + w;
            }
        }
    }
    float o[VEC];
#pragma unroll
    for (int j = 0; j < VEC; j++) {
        o[j] = b[j] + sum[j] / fmaxf(div[j], 1e-6f);
        nonfinite |= j < count && out_of_range(o[j], out_dtype);
    }
    store_any(out, out_dtype, i, count, o);
    if (nonfinite) atomicOr(bad, 1u);
}

// Shared by every symerge kernel: fixed-width types, dtype codes and conversions, 16-byte
// vector loads and stores of 8 elements. No CUDA headers are included, so NVRTC needs no
// include path (the builtin bf16/f16 headers are not assumed); conversions use PTX directly.
#pragma once

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;

// Storage dtype codes, as `FloatDType` maps them on the Rust side.
#define DT_F32 0u
#define DT_F16 1u
#define DT_BF16 2u

// Elements handled per thread step: one 16-byte load of f16/bf16, two of f32.
#define VEC 8

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}

// Round to nearest even, NaN kept quiet with its sign: the CPU encoder's rule, bit for bit.
__device__ __forceinline__ u16 f32_to_bf16(float v) {
    u32 x = __float_as_uint(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)(0x7fc0u | ((x >> 16) & 0x8000u));
    u32 round = 0x7fffu + ((x >> 16) & 1u);
    return (u16)((x + round) >> 16);
}

__device__ __forceinline__ u16 f32_to_f16(float v) {
    u16 h;
    asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(v));
    return h;
}

__device__ __forceinline__ bool is_nonfinite(float v) { return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u; }

__device__ __forceinline__ float load1(const void* p, u32 dt, u64 i) {
    if (dt == DT_F32) return ((const float*)p)[i];
    u16 h = ((const u16*)p)[i];
    return dt == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

__device__ __forceinline__ void store1(void* p, u32 dt, u64 i, float v) {
    if (dt == DT_F32) {
        ((float*)p)[i] = v;
    } else {
        ((u16*)p)[i] = dt == DT_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
    }
}

__device__ __forceinline__ void unpack_halves(uint4 q, u32 dt, float* v) {
    u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        u16 lo = (u16)(w[j] & 0xffffu), hi = (u16)(w[j] >> 16);
        v[2 * j] = dt == DT_BF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
        v[2 * j + 1] = dt == DT_BF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
    }
}

// Loads elements i..i+8 (i a multiple of 8, the buffer 16-byte aligned) with 16-byte loads.
// Streaming data is read once, so the loads bypass L1 allocation (`ld.global.nc` via __ldg).
__device__ __forceinline__ void load8(const void* p, u32 dt, u64 i, float* v) {
    if (dt == DT_F32) {
        const float4* q = (const float4*)((const float*)p + i);
        float4 a = __ldg(q), b = __ldg(q + 1);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
        uint4 q = __ldg((const uint4*)((const u16*)p + i));
        unpack_halves(q, dt, v);
    }
}

// Loads up to 8 elements at i (any count 1..8, for the tail of a tensor) one at a time.
__device__ __forceinline__ void load_tail(const void* p, u32 dt, u64 i, int count, float* v) {
#pragma unroll
    for (int j = 0; j < VEC; j++) v[j] = j < count ? load1(p, dt, i + j) : 0.0f;
}

__device__ __forceinline__ void store8(void* p, u32 dt, u64 i, const float* v) {
    if (dt == DT_F32) {
        float4* q = (float4*)((float*)p + i);
        q[0] = make_float4(v[0], v[1], v[2], v[3]);
        q[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        u32 w[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            u16 lo = dt == DT_BF16 ? f32_to_bf16(v[2 * j]) : f32_to_f16(v[2 * j]);
            u16 hi = dt == DT_BF16 ? f32_to_bf16(v[2 * j + 1]) : f32_to_f16(v[2 * j + 1]);
            w[j] = (u32)lo | ((u32)hi << 16);
        }
        *(uint4*)((u16*)p + i) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

__device__ __forceinline__ void store_tail(void* p, u32 dt, u64 i, int count, const float* v) {
#pragma unroll
    for (int j = 0; j < VEC; j++)
        if (j < count) store1(p, dt, i + j, v[j]);
}

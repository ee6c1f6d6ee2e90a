// Philox4x32-10 (Random123), the same generator as src/merge/philox.rs: element e of the
// stream (seed, tensor, task) is lane e % 4 of philox(ctr = [e / 4 lo, e / 4 hi, tensor, task],
// key = [seed lo, seed hi]), mapped to [0, 1) with 24 bits. Counter-based, so the GPU draws the
// CPU's masks bit for bit whatever the launch shape.
#pragma once
#include "common.cuh"

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, u32 k0, u32 k1) {
#pragma unroll
    for (int r = 0; r < 10; r++) {
        if (r > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        u32 lo0 = 0xD2511F53u * c.x, hi0 = __umulhi(0xD2511F53u, c.x);
        u32 lo1 = 0xCD9E8D57u * c.z, hi1 = __umulhi(0xCD9E8D57u, c.z);
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    }
    return c;
}

__device__ __forceinline__ float unit_f32(u32 bits) { return (float)(bits >> 8) * (1.0f / 16777216.0f); }

__device__ __forceinline__ uint4 philox_block(u64 seed, u32 tensor, u32 task, u64 block) {
    return philox4x32_10(make_uint4((u32)block, (u32)(block >> 32), tensor, task), (u32)seed, (u32)(seed >> 32));
}

// Uniforms for elements e..e+8 where e is a multiple of 4 (two Philox blocks).
__device__ __forceinline__ void uniform8(u64 seed, u32 tensor, u32 task, u64 e, float* u) {
    uint4 a = philox_block(seed, tensor, task, e / 4);
    uint4 b = philox_block(seed, tensor, task, e / 4 + 1);
    u[0] = unit_f32(a.x); u[1] = unit_f32(a.y); u[2] = unit_f32(a.z); u[3] = unit_f32(a.w);
    u[4] = unit_f32(b.x); u[5] = unit_f32(b.y); u[6] = unit_f32(b.z); u[7] = unit_f32(b.w);
}

// Uniform for one element e, any alignment.
__device__ __forceinline__ float uniform1(u64 seed, u32 tensor, u32 task, u64 e) {
    uint4 r = philox_block(seed, tensor, task, e / 4);
    u32 lane = (u32)(e % 4);
    u32 bits = lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
    return unit_f32(bits);
}

// DARE pieces on their own (the merge itself runs in gta_merge's random mode): the Philox
// uniforms of one (seed, tensor, task) stream, for the bit-exact check against the CPU
// generator, and drop-and-rescale of one task vector.
#include "common.cuh"
#include "philox.cuh"

// out[i] = uniform of element offset + i.
extern "C" __global__ void __launch_bounds__(256) dare_uniform(u64 seed, u32 tensor, u32 task, u64 offset, u64 n,
                                                               float* out) {
    u64 i = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (i >= n) return;
    u64 e = offset + i;
    float u[VEC];
    if (n - i >= VEC && (e & 3) == 0) {
        uniform8(seed, tensor, task, e, u);
        float4* q = (float4*)(out + i);
        q[0] = make_float4(u[0], u[1], u[2], u[3]);
        q[1] = make_float4(u[4], u[5], u[6], u[7]);
    } else {
        for (int j = 0; j < VEC && i + j < n; j++) out[i + j] = uniform1(seed, tensor, task, e + j);
    }
}

// out[i] = u < density ? scale * (expert - base) : 0, in f32, elements offset + i of the tensor.
extern "C" __global__ void __launch_bounds__(256) dare_sparsify(const void* base, u32 base_dtype,
                                                                const void* expert, u32 dtype, u64 n, u64 offset,
                                                                u64 seed, u32 tensor, u32 task, float density,
                                                                float scale, float* out) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float tau = load1(expert, dtype, i) - load1(base, base_dtype, i);
    out[i] = uniform1(seed, tensor, task, offset + i) < density ? scale * tau : 0.0f;
}

// TIES trimming on the GPU: the exact magnitude threshold of src/merge/select.rs, found by the
// same two-level radix select over the bits of |tau| (tau = expert - base, computed in f32 as the
// CPU does). A selection, not a sort: two histogram passes (high 16 bits, then the low 16 bits
// inside the chosen bucket) and, only when values tie at the threshold, a per-tile count of the
// tied values so the host can find the index cutoff. The host walks the histograms exactly as
// the CPU does, so both keep the same elements. Sign election and the disjoint mean are the
// consensus mode of gta_merge (merge.cu).
#include "common.cuh"

__device__ __forceinline__ u32 abs_tau_bits(const void* base, u32 base_dtype, const void* expert, u32 dtype, u64 i) {
    float tau = load1(expert, dtype, i) - load1(base, base_dtype, i);
    return __float_as_uint(fabsf(tau));
}

// Adds one count per element to hist[bin]; lanes of a warp with the same bin add once together,
// which keeps the atomics cheap when (as for task vectors) most values share a few buckets.
__device__ __forceinline__ void warp_add(u32* hist, u32 bin, bool valid) {
    u32 active = __ballot_sync(0xffffffffu, valid);
    if (!valid) return;
    u32 peers = __match_any_sync(active, bin);
    int leader = __ffs(peers) - 1;
    if ((int)(threadIdx.x & 31) == leader) atomicAdd(&hist[bin], (u32)__popc(peers));
}

// bucket == 0xffffffff: histogram of the high 16 bits of |tau| over all n values.
// Otherwise: histogram of the low 16 bits of the values whose high 16 bits equal `bucket`.
extern "C" __global__ void __launch_bounds__(256) abs_histogram(const void* base, u32 base_dtype,
                                                                const void* expert, u32 dtype, u64 n, u32 bucket,
                                                                u32* hist) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    u64 start = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 rounds = (n + stride - 1) / stride;
    for (u64 r = 0; r < rounds; r++) {
        u64 i = start + r * stride;
        bool valid = i < n;
        u32 bits = valid ? abs_tau_bits(base, base_dtype, expert, dtype, i) : 0u;
        u32 bin;
        if (bucket == 0xffffffffu) {
            bin = bits >> 16;
        } else {
            valid = valid && (bits >> 16) == bucket;
            bin = bits & 0xffffu;
        }
        warp_add(hist, bin, valid);
    }
}

// counts[t] = how many of elements [t * tile, (t + 1) * tile) have |tau| bits equal to t_bits.
extern "C" __global__ void __launch_bounds__(256) count_equal(const void* base, u32 base_dtype, const void* expert,
                                                              u32 dtype, u64 n, u32 t_bits, u64 tile,
                                                              u32* counts) {
    __shared__ u32 s_count;
    if (threadIdx.x == 0) s_count = 0;
    __syncthreads();
    u64 begin = (u64)blockIdx.x * tile;
    u64 end = begin + tile < n ? begin + tile : n;
    u32 c = 0;
    for (u64 i = begin + threadIdx.x; i < end; i += blockDim.x)
        c += abs_tau_bits(base, base_dtype, expert, dtype, i) == t_bits;
    atomicAdd(&s_count, c);
    __syncthreads();
    if (threadIdx.x == 0) counts[blockIdx.x] = s_count;
}

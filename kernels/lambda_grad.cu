// dL/dLambda for one tensor: g_k = sum_i grad_i * tau_k,i for every task k in one pass (grad
// and each task vector are read once). tau_k is given directly, or as theta_k - base.
//
// Deterministic by construction: CTA c always owns elements [c * TILE, (c + 1) * TILE) whatever
// the device, reduces them in a fixed tree (warp shuffles, then warps in order) into
// partials[c][k], and `lambda_grad_finish` sums the partials in a fixed order in f64. No atomics
// on floats, so two runs give the same bits. The CPU twin is src/merge/lambda_grad.rs.
#include "common.cuh"

#define LG_THREADS 256
#define LG_STEPS 4
#define LG_TILE (LG_THREADS * VEC * LG_STEPS)
#define LG_MAX_TASKS 32

// Device addresses of the task vectors (or expert weights) and each one's dtype, passed by value:
// an expert may be stored in another dtype than the base (float32 fine-tunes of a bfloat16 base).
struct TaskPtrs {
    u64 p[LG_MAX_TASKS];
    u32 dt[LG_MAX_TASKS];
};

template <int KMAX>
__device__ void lambda_grad_body(const float* grad, const TaskPtrs& taus, const void* base, u32 base_dt, u32 num_tasks,
                                 u64 n, float* partials) {
    __shared__ float s_warp[LG_THREADS / 32][KMAX];
    float acc[KMAX];
#pragma unroll
    for (int k = 0; k < KMAX; k++) acc[k] = 0.0f;

    u64 tile = (u64)blockIdx.x * LG_TILE;
#pragma unroll 1
    for (int step = 0; step < LG_STEPS; step++) {
        u64 i = tile + ((u64)step * LG_THREADS + threadIdx.x) * VEC;
        if (i >= n) break;
        int count = n - i >= VEC ? VEC : (int)(n - i);
        float g[VEC], b[VEC];
        if (count == VEC) {
            load8(grad, DT_F32, i, g);
        } else {
            load_tail(grad, DT_F32, i, count, g);
        }
        if (base) {
            if (count == VEC) {
                load8(base, base_dt, i, b);
            } else {
                load_tail(base, base_dt, i, count, b);
            }
        } else {
#pragma unroll
            for (int j = 0; j < VEC; j++) b[j] = 0.0f;
        }
#pragma unroll
        for (int k = 0; k < KMAX; k++) {
            if (k < (int)num_tasks) {
                float t[VEC];
                const void* p = (const void*)taus.p[k];
                if (count == VEC) {
                    load8(p, taus.dt[k], i, t);
                } else {
                    load_tail(p, taus.dt[k], i, count, t);
                }
                float part = 0.0f;
#pragma unroll
                for (int j = 0; j < VEC; j++) part = __fmaf_rn(g[j], t[j] - b[j], part);
                acc[k] += part;
            }
        }
    }

    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int k = 0; k < KMAX; k++) {
        float v = acc[k];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0) s_warp[warp][k] = v;
    }
    __syncthreads();
    if (threadIdx.x < num_tasks) {
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < LG_THREADS / 32; w++) v += s_warp[w][threadIdx.x];
        partials[(u64)blockIdx.x * num_tasks + threadIdx.x] = v;
    }
}

// One instance per register budget: the launcher picks the smallest KMAX >= K, so the
// accumulators stay in registers (a run-time-indexed array would live in local memory).
#define LAMBDA_GRAD(KMAX)                                                                                     \
    extern "C" __global__ void __launch_bounds__(LG_THREADS, 2)                                                \
        lambda_grad_k##KMAX(const float* grad, const __grid_constant__ TaskPtrs taus, const void* base, u32 base_dt, u32 num_tasks, \
                            u64 n, float* partials) {                                                         \
        lambda_grad_body<KMAX>(grad, taus, base, base_dt, num_tasks, n, partials);                              \
    }
LAMBDA_GRAD(4)
LAMBDA_GRAD(8)
LAMBDA_GRAD(16)
LAMBDA_GRAD(32)

// out[k] = sum over CTAs c of partials[c][k], one CTA per task, fixed order: thread t sums
// c = t, t + 256, ... in f64, then a fixed tree over the threads.
extern "C" __global__ void __launch_bounds__(256) lambda_grad_finish(const float* partials, u32 num_ctas,
                                                                     u32 num_tasks, double* out) {
    __shared__ double s[256];
    u32 k = blockIdx.x;
    double v = 0.0;
    for (u32 c = threadIdx.x; c < num_ctas; c += blockDim.x) v += (double)partials[(u64)c * num_tasks + k];
    s[threadIdx.x] = v;
    __syncthreads();
    for (u32 half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) s[threadIdx.x] += s[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[k] = s[0];
}

// dL/dLambda of a lookup table whose gradient is zero outside the listed rows (sorted, unique,
// checked on the host): CTA r reads only row rows[r] and writes partials[r * K + k] =
// sum_c grad_i (theta_k,i - base_i) in f64 (the difference in f32, as the CPU's `dot_f64`), a
// fixed tree per task; lambda_grad_rows_finish adds the rows in order.
extern "C" __global__ void __launch_bounds__(LG_THREADS)
    lambda_grad_rows(const float* grad, const __grid_constant__ TaskPtrs taus, const void* base, u32 base_dt,
                     u32 num_tasks, const u32* rows, u32 row_len, double* partials) {
    __shared__ double sh[LG_THREADS];
    u64 start = (u64)rows[blockIdx.x] * row_len;
    for (u32 k = 0; k < num_tasks; k++) {
        double acc = 0.0;
        for (u32 c = threadIdx.x; c < row_len; c += LG_THREADS) {
            u64 i = start + c;
            float b = base ? load1(base, base_dt, i) : 0.0f;
            acc += (double)grad[i] * (double)(load1((const void*)taus.p[k], taus.dt[k], i) - b);
        }
        sh[threadIdx.x] = acc;
        __syncthreads();
        for (u32 half = LG_THREADS / 2; half > 0; half >>= 1) {
            if (threadIdx.x < half) sh[threadIdx.x] += sh[threadIdx.x + half];
            __syncthreads();
        }
        if (threadIdx.x == 0) partials[(u64)blockIdx.x * num_tasks + k] = sh[0];
        __syncthreads();
    }
}

// One thread per task: out[k] = sum over the rows, in order, of partials[r * K + k].
extern "C" __global__ void lambda_grad_rows_finish(const double* partials, u32 nrows, u32 num_tasks, double* out) {
    u32 k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= num_tasks) return;
    double acc = 0.0;
    for (u32 r = 0; r < nrows; r++) acc += partials[(u64)r * num_tasks + k];
    out[k] = acc;
}

// The transformer ops of the CUDA backend (src/backend/cuda/ops.rs): everything except the
// matrix products, which go through cuBLAS. Each kernel mirrors its CPU twin in
// src/backend/cpu.rs expression for expression (the unit is compiled with --fmad=false, so
// products and sums are rounded separately as on the CPU); only the order of long sums differs.
//
// Deterministic by construction: no float atomics. Row kernels use one CTA per row and a fixed
// shared-memory tree; column sums give each column to one thread column and add the partial sums
// of its rows in a fixed order; the scatter-add of the embedding backward is grouped by id on the
// host, so each output row is summed by one CTA in position order.
#include "common.cuh"

// Threads of every 1-D launch; the row reductions assume exactly this many.
#define OPS_THREADS 256
// Column-sum CTAs: 32 columns x 16 row lanes.
#define COL_X 32
#define COL_Y 16
// Elements per CTA of the L1 partial sums (fixed, so the sum order does not depend on the device).
#define L1_TILE 4096
// Elements per CTA of the sums of squares (a gradient norm: large buffers, few partials to read back).
#define SUMSQ_TILE 65536

#define SQRT_2_OVER_PI 0.7978846f
#define GELU_A 0.044715f
#define FRAC_1_SQRT_2 0.70710678118654752440f
#define FRAC_2_SQRT_PI 1.12837916709551257390f
// f32::MIN, what the CPU writes into masked attention scores.
#define F32_MIN (-3.40282347e+38f)

__device__ __forceinline__ u64 gtid() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 gstride() { return (u64)gridDim.x * blockDim.x; }
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Fixed-tree reductions over the OPS_THREADS threads of a CTA; every thread gets the result.
__device__ __forceinline__ float block_sum_f(float v, float* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (u32 half = OPS_THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) sh[threadIdx.x] += sh[threadIdx.x + half];
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ float block_max_f(float v, float* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (u32 half = OPS_THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + half]);
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ double block_sum_d(double v, double* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (u32 half = OPS_THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) sh[threadIdx.x] += sh[threadIdx.x + half];
        __syncthreads();
    }
    double r = sh[0];
    __syncthreads();
    return r;
}

// ---------------------------------------------------------------- element-wise

// y[r, c] = row[c]: the bias a linear layer's product then adds to (beta = 1).
extern "C" __global__ void fill_rows(const float* row, u64 rows, u32 cols, float* y) {
    u64 n = rows * cols;
    for (u64 i = gtid(); i < n; i += gstride()) y[i] = row[i % cols];
}

// out = a + b (out may be a: add_assign).
extern "C" __global__ void add_f32(const float* a, const float* b, u64 n, float* out) {
    for (u64 i = gtid(); i < n; i += gstride()) out[i] = a[i] + b[i];
}

// One Adam update (PyTorch's), the twin of `stored_ops::adam_update`: the same f32 operations in
// the same order (the module is compiled with --fmad=false), so parameters match the CPU's bits.
// `gs` scales each gradient first (gradient-norm clipping; 1 leaves it as it is).
extern "C" __global__ void adam_step(float* p, const float* g, float* m, float* v, u64 n, float beta1, float beta2,
                                     float one_b1, float one_b2, float step_size, float c2_sqrt, float eps, float gs) {
    for (u64 i = gtid(); i < n; i += gstride()) {
        float gi = g[i] * gs;
        float mi = beta1 * m[i] + one_b1 * gi;
        float vi = beta2 * v[i] + one_b2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] - step_size * mi / (sqrtf(vi) / c2_sqrt + eps);
    }
}

// c *= beta: a product with an empty inner dimension.
extern "C" __global__ void scale_f32(float* c, u64 n, float beta) {
    for (u64 i = gtid(); i < n; i += gstride()) c[i] = c[i] * beta;
}

__device__ __forceinline__ float gelu_f(float x, u32 kind) {
    if (kind == 0) return 0.5f * x * (1.0f + erff(x * FRAC_1_SQRT_2));
    return 0.5f * x * (1.0f + tanhf(SQRT_2_OVER_PI * (x + GELU_A * x * x * x)));
}

__device__ __forceinline__ float gelu_grad(float x, u32 kind) {
    if (kind == 0) {
        float cdf = 0.5f * (1.0f + erff(x * FRAC_1_SQRT_2));
        float pdf = expf(-0.5f * x * x) * (0.5f * FRAC_2_SQRT_PI * FRAC_1_SQRT_2);
        return cdf + x * pdf;
    }
    float t = tanhf(SQRT_2_OVER_PI * (x + GELU_A * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_A * x * x);
}

// kind 0: erf GELU, 1: tanh approximation.
extern "C" __global__ void gelu_fwd(const float* x, u64 n, u32 kind, float* y) {
    for (u64 i = gtid(); i < n; i += gstride()) y[i] = gelu_f(x[i], kind);
}

extern "C" __global__ void gelu_bwd(const float* x, const float* dy, u64 n, u32 kind, float* dx) {
    for (u64 i = gtid(); i < n; i += gstride()) dx[i] = dy[i] * gelu_grad(x[i], kind);
}

extern "C" __global__ void tanh_fwd(const float* x, u64 n, float* y) {
    for (u64 i = gtid(); i < n; i += gstride()) y[i] = tanhf(x[i]);
}

extern "C" __global__ void tanh_bwd(const float* x, const float* dy, u64 n, float* dx) {
    for (u64 i = gtid(); i < n; i += gstride()) {
        float t = tanhf(x[i]);
        dx[i] = dy[i] * (1.0f - t * t);
    }
}

// ---------------------------------------------------------------- softmax

// One CTA per row: y = softmax(x + mask[r / group]) (mask may be null). y may be x.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    softmax_rows(const float* x, const float* mask, u32 cols, u32 group, float* y) {
    __shared__ float sh[OPS_THREADS];
    u64 r = blockIdx.x;
    const float* xr = x + r * cols;
    float* yr = y + r * cols;
    const float* mr = mask ? mask + (r / group) * cols : (const float*)0;
    float m = neg_inf();
    for (u32 j = threadIdx.x; j < cols; j += OPS_THREADS) m = fmaxf(m, mr ? xr[j] + mr[j] : xr[j]);
    m = block_max_f(m, sh);
    float s = 0.0f;
    for (u32 j = threadIdx.x; j < cols; j += OPS_THREADS) {
        float e = expf((mr ? xr[j] + mr[j] : xr[j]) - m);
        yr[j] = e;
        s += e;
    }
    s = block_sum_f(s, sh);
    float inv = 1.0f / s;
    for (u32 j = threadIdx.x; j < cols; j += OPS_THREADS) yr[j] *= inv;
}

// One CTA per row: dx = y * (dy - sum(dy * y)). dx may be dy (each element is read and written
// by the same thread, after the row's sum).
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    softmax_bwd_rows(const float* y, const float* dy, u32 cols, float* dx) {
    __shared__ float sh[OPS_THREADS];
    u64 r = blockIdx.x;
    const float* yr = y + r * cols;
    const float* dyr = dy + r * cols;
    float* dxr = dx + r * cols;
    float dot = 0.0f;
    for (u32 j = threadIdx.x; j < cols; j += OPS_THREADS) dot += yr[j] * dyr[j];
    dot = block_sum_f(dot, sh);
    for (u32 j = threadIdx.x; j < cols; j += OPS_THREADS) dxr[j] = yr[j] * (dyr[j] - dot);
}

// Attention probabilities in place: p holds the scaled scores [batch * heads * seq_q, seq_k]
// (row ((b * heads + h) * seq_q + i)); key j of query i is hidden when key_mask[b, j] == 0
// (key_mask may be null) or, if causal, when j > i + shift. Hidden scores become f32::MIN
// before the softmax, as on the CPU (a fully hidden row is uniform there too).
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    attn_softmax(float* p, const float* key_mask, u32 seq_q, u32 seq_k, u32 heads, u32 causal, u32 shift) {
    __shared__ float sh[OPS_THREADS];
    u64 r = blockIdx.x;
    u64 b = r / ((u64)heads * seq_q);
    u32 i = (u32)(r % seq_q);
    float* pr = p + r * seq_k;
    const float* mr = key_mask ? key_mask + b * seq_k : (const float*)0;
    float m = neg_inf();
    for (u32 j = threadIdx.x; j < seq_k; j += OPS_THREADS) {
        bool hidden = (mr && mr[j] == 0.0f) || (causal && j > i + shift);
        float v = hidden ? F32_MIN : pr[j];
        pr[j] = v;
        m = fmaxf(m, v);
    }
    m = block_max_f(m, sh);
    float s = 0.0f;
    for (u32 j = threadIdx.x; j < seq_k; j += OPS_THREADS) {
        float e = expf(pr[j] - m);
        pr[j] = e;
        s += e;
    }
    s = block_sum_f(s, sh);
    float inv = 1.0f / s;
    for (u32 j = threadIdx.x; j < seq_k; j += OPS_THREADS) pr[j] *= inv;
}

// ---------------------------------------------------------------- LayerNorm

// Mean and 1/std of a row in f64, as the CPU's `moments`.
__device__ __forceinline__ void row_moments(const float* xr, u32 dim, float eps, double* sh, float* mean_out,
                                            float* rstd_out) {
    double n = dim > 0 ? (double)dim : 1.0;
    double s = 0.0;
    for (u32 j = threadIdx.x; j < dim; j += OPS_THREADS) s += (double)xr[j];
    double mean = block_sum_d(s, sh) / n;
    double q = 0.0;
    for (u32 j = threadIdx.x; j < dim; j += OPS_THREADS) {
        double d = (double)xr[j] - mean;
        q += d * d;
    }
    double var = block_sum_d(q, sh) / n;
    *mean_out = (float)mean;
    *rstd_out = (float)(1.0 / sqrt(var + (double)eps));
}

// One CTA per row.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    layernorm_fwd(const float* x, const float* gamma, const float* beta, u32 dim, float eps, float* y) {
    __shared__ double sh[OPS_THREADS];
    u64 r = blockIdx.x;
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    float mean, rstd;
    row_moments(xr, dim, eps, sh, &mean, &rstd);
    for (u32 j = threadIdx.x; j < dim; j += OPS_THREADS) yr[j] = (xr[j] - mean) * rstd * gamma[j] + beta[j];
}

// One CTA per row: dx, and the row's (mean, rstd) into stats[2r], stats[2r + 1] for
// layernorm_bwd_params.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    layernorm_bwd_dx(const float* x, const float* gamma, const float* dy, u32 dim, float eps, float* dx,
                     float* stats) {
    __shared__ double sh[OPS_THREADS];
    u64 r = blockIdx.x;
    const float* xr = x + r * dim;
    const float* dyr = dy + r * dim;
    float* dxr = dx + r * dim;
    float mean, rstd;
    row_moments(xr, dim, eps, sh, &mean, &rstd);
    double s1 = 0.0, s2 = 0.0;
    for (u32 j = threadIdx.x; j < dim; j += OPS_THREADS) {
        float xhat = (xr[j] - mean) * rstd;
        float g = dyr[j] * gamma[j];
        s1 += (double)g;
        s2 += (double)(g * xhat);
    }
    s1 = block_sum_d(s1, sh);
    s2 = block_sum_d(s2, sh);
    float fdim = (float)dim;
    float m1 = (float)s1 / fdim, m2 = (float)s2 / fdim;
    for (u32 j = threadIdx.x; j < dim; j += OPS_THREADS) {
        float xhat = (xr[j] - mean) * rstd;
        dxr[j] = rstd * (dyr[j] * gamma[j] - m1 - xhat * m2);
    }
    if (threadIdx.x == 0) {
        stats[2 * r] = mean;
        stats[2 * r + 1] = rstd;
    }
}

// CTAs of COL_X x COL_Y threads, one per COL_X columns: dgamma = sum_r dy * xhat,
// dbeta = sum_r dy. Row lane y sums rows y, y + COL_Y, ...; the lanes are added in order.
extern "C" __global__ void __launch_bounds__(COL_X * COL_Y)
    layernorm_bwd_params(const float* x, const float* dy, const float* stats, u64 rows, u32 dim, float* dgamma,
                         float* dbeta) {
    __shared__ float sg[COL_Y][COL_X + 1];
    __shared__ float sb[COL_Y][COL_X + 1];
    u32 col = blockIdx.x * COL_X + threadIdx.x;
    float ag = 0.0f, ab = 0.0f;
    if (col < dim) {
        for (u64 r = threadIdx.y; r < rows; r += COL_Y) {
            float xhat = (x[r * dim + col] - stats[2 * r]) * stats[2 * r + 1];
            float d = dy[r * dim + col];
            ag += d * xhat;
            ab += d;
        }
    }
    sg[threadIdx.y][threadIdx.x] = ag;
    sb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && col < dim) {
        float g = 0.0f, b = 0.0f;
        for (int k = 0; k < COL_Y; k++) {
            g += sg[k][threadIdx.x];
            b += sb[k][threadIdx.x];
        }
        dgamma[col] = g;
        dbeta[col] = b;
    }
}

// Column sums of a [rows, cols] matrix (the bias gradient), same scheme as above.
extern "C" __global__ void __launch_bounds__(COL_X * COL_Y)
    col_sum(const float* a, u64 rows, u32 cols, float* out) {
    __shared__ float sh[COL_Y][COL_X + 1];
    u32 col = blockIdx.x * COL_X + threadIdx.x;
    float acc = 0.0f;
    if (col < cols) {
        for (u64 r = threadIdx.y; r < rows; r += COL_Y) acc += a[r * cols + col];
    }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        float s = 0.0f;
        for (int k = 0; k < COL_Y; k++) s += sh[k][threadIdx.x];
        out[col] = s;
    }
}

// ---------------------------------------------------------------- gathers

// out[i, :] = table[ids[i], :] (ids checked on the host).
extern "C" __global__ void gather_rows(const float* table, const u32* ids, u64 n, u32 dim, float* out) {
    u64 total = n * dim;
    for (u64 e = gtid(); e < total; e += gstride()) {
        u64 i = e / dim;
        u32 c = (u32)(e % dim);
        out[e] = table[(u64)ids[i] * dim + c];
    }
}

// One CTA per distinct id u: table[uniq[u], :] = sum of dy rows order[starts[u] .. starts[u + 1]]
// (positions in increasing order, so the sum runs in the CPU's order). table is zeroed before.
extern "C" __global__ void scatter_rows(const float* dy, const u32* order, const u32* starts, const u32* uniq,
                                        u32 dim, float* table) {
    u32 u = blockIdx.x;
    u32 lo = starts[u], hi = starts[u + 1];
    float* dst = table + (u64)uniq[u] * dim;
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) {
        float acc = 0.0f;
        for (u32 p = lo; p < hi; p++) acc += dy[(u64)order[p] * dim + c];
        dst[c] = acc;
    }
}

// ---------------------------------------------------------------- losses

// log(sum(exp(z))) of a row in f64, as the CPU's `logsumexp`.
__device__ __forceinline__ double row_lse(const float* z, u32 cols) {
    float m = neg_inf();
    for (u32 j = 0; j < cols; j++) m = fmaxf(m, z[j]);
    double md = (double)m, s = 0.0;
    for (u32 j = 0; j < cols; j++) s += exp((double)z[j] - md);
    return md + log(s);
}

// One CTA (OPS_THREADS threads); thread t takes rows t, t + OPS_THREADS, ...; out[0] = mean over
// rows of sum_j t_j (lse - z_j), in f64.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    soft_ce_loss(const float* logits, const float* targets, u64 rows, u32 cols, float* out) {
    __shared__ double sh[OPS_THREADS];
    double acc = 0.0;
    for (u64 r = threadIdx.x; r < rows; r += OPS_THREADS) {
        const float* z = logits + r * cols;
        const float* t = targets + r * cols;
        double lse = row_lse(z, cols), s = 0.0;
        for (u32 j = 0; j < cols; j++) s += (double)t[j] * (lse - (double)z[j]);
        acc += s;
    }
    acc = block_sum_d(acc, sh);
    if (threadIdx.x == 0) out[0] = (float)(acc / (double)rows);
}

// One thread per row, the CPU's f32 expressions in its order: g = (softmax(z) * sum(t) - t) * s.
extern "C" __global__ void soft_ce_grad(const float* logits, const float* targets, u64 rows, u32 cols, float s,
                                        float* g) {
    for (u64 r = gtid(); r < rows; r += gstride()) {
        const float* z = logits + r * cols;
        const float* t = targets + r * cols;
        float* gr = g + r * cols;
        float tsum = 0.0f, m = neg_inf();
        double sum = 0.0;  // as the CPU: an f32 sum over a vocabulary loses its smallest weights
        for (u32 j = 0; j < cols; j++) tsum += t[j];
        for (u32 j = 0; j < cols; j++) m = fmaxf(m, z[j]);
        for (u32 j = 0; j < cols; j++) {
            float e = expf(z[j] - m);
            gr[j] = e;
            sum += (double)e;
        }
        float inv = (float)(1.0 / sum);
        for (u32 j = 0; j < cols; j++) gr[j] = (gr[j] * inv * tsum - t[j]) * s;
    }
}

// -sum p log p of softmax(z), in f64.
__device__ __forceinline__ double row_entropy(const float* z, u32 cols, double lse) {
    double h = 0.0;
    for (u32 j = 0; j < cols; j++) {
        double logp = (double)z[j] - lse;
        h += exp(logp) * logp;
    }
    return -h;
}

// One CTA, as soft_ce_loss: out[0] = mean row entropy.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    entropy_loss(const float* logits, u64 rows, u32 cols, float* out) {
    __shared__ double sh[OPS_THREADS];
    double acc = 0.0;
    for (u64 r = threadIdx.x; r < rows; r += OPS_THREADS) {
        const float* z = logits + r * cols;
        acc += row_entropy(z, cols, row_lse(z, cols));
    }
    acc = block_sum_d(acc, sh);
    if (threadIdx.x == 0) out[0] = (float)(acc / (double)rows);
}

// One thread per row: dH/dz_j = -p_j (log p_j + H), times s.
extern "C" __global__ void entropy_grad(const float* logits, u64 rows, u32 cols, float s, float* g) {
    for (u64 r = gtid(); r < rows; r += gstride()) {
        const float* z = logits + r * cols;
        float* gr = g + r * cols;
        double lse = row_lse(z, cols);
        double h = row_entropy(z, cols, lse);
        for (u32 j = 0; j < cols; j++) {
            double logp = (double)z[j] - lse;
            gr[j] = (float)(-exp(logp) * (logp + h)) * s;
        }
    }
}

// CTA c sums |x - t| (t may be null: 0) over elements [c * L1_TILE, (c + 1) * L1_TILE) in f64.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    l1_partial(const float* x, const float* t, u64 n, double* partials) {
    __shared__ double sh[OPS_THREADS];
    u64 start = (u64)blockIdx.x * L1_TILE;
    double acc = 0.0;
    for (u64 i = start + threadIdx.x; i < start + L1_TILE && i < n; i += OPS_THREADS) {
        double d = t ? (double)x[i] - (double)t[i] : (double)x[i];
        acc += fabs(d);
    }
    acc = block_sum_d(acc, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// CTA c sums x^2 over elements [c * SUMSQ_TILE, (c + 1) * SUMSQ_TILE) in f64; the host adds the
// partials in order (Backend::sum_squares).
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    sumsq_partial(const float* x, u64 n, double* partials) {
    __shared__ double sh[OPS_THREADS];
    u64 start = (u64)blockIdx.x * SUMSQ_TILE;
    double acc = 0.0;
    for (u64 i = start + threadIdx.x; i < start + SUMSQ_TILE && i < n; i += OPS_THREADS) {
        double d = (double)x[i];
        acc += d * d;
    }
    acc = block_sum_d(acc, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// One CTA: out[0] = sum of the partials (fixed order) / n.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    l1_finish(const double* partials, u32 count, u64 n, float* out) {
    __shared__ double sh[OPS_THREADS];
    double acc = 0.0;
    for (u32 c = threadIdx.x; c < count; c += OPS_THREADS) acc += partials[c];
    acc = block_sum_d(acc, sh);
    if (threadIdx.x == 0) out[0] = (float)(acc / (double)n);
}

// g = sign(x - t) * s (0 where equal or NaN); t may be null.
extern "C" __global__ void l1_grad(const float* x, const float* t, u64 n, float s, float* g) {
    for (u64 i = gtid(); i < n; i += gstride()) {
        float d = t ? x[i] - t[i] : x[i];
        g[i] = d > 0.0f ? s : (d < 0.0f ? -s : 0.0f);
    }
}

// ---------------------------------------------------------------- Llama family

// 1 / sqrt(mean(x^2) + eps) of a row, the squares summed in f64 as the CPU's `rms_rstd`.
__device__ __forceinline__ float row_rstd(const float* xr, u32 dim, float eps, double* sh) {
    double s = 0.0;
    for (u32 j = threadIdx.x; j < dim; j += OPS_THREADS) s += (double)xr[j] * (double)xr[j];
    double ms = block_sum_d(s, sh) / (dim > 0 ? (double)dim : 1.0);
    return (float)(1.0 / sqrt(ms + (double)eps));
}

// One CTA per row: y = gamma * (x * rstd) (Hugging Face's order: normalise, then scale).
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    rmsnorm_fwd(const float* x, const float* gamma, u32 dim, float eps, float* y) {
    __shared__ double sh[OPS_THREADS];
    u64 r = blockIdx.x;
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    float rs = row_rstd(xr, dim, eps, sh);
    for (u32 j = threadIdx.x; j < dim; j += OPS_THREADS) yr[j] = gamma[j] * (xr[j] * rs);
}

// One CTA per row: dx_j = r g_j dy_j - x_j c with c = r^3 / dim * sum_k dy_k g_k x_k (f64), and
// the row's r into rstd[r] for rmsnorm_bwd_params.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    rmsnorm_bwd_dx(const float* x, const float* gamma, const float* dy, u32 dim, float eps, float* dx, float* rstd) {
    __shared__ double sh[OPS_THREADS];
    u64 r = blockIdx.x;
    const float* xr = x + r * dim;
    const float* dyr = dy + r * dim;
    float* dxr = dx + r * dim;
    float rs = row_rstd(xr, dim, eps, sh);
    double s = 0.0;
    for (u32 j = threadIdx.x; j < dim; j += OPS_THREADS) s += (double)dyr[j] * (double)gamma[j] * (double)xr[j];
    s = block_sum_d(s, sh);
    double rd = (double)rs;
    float c = (float)(s * (rd * rd * rd) / (double)dim);
    for (u32 j = threadIdx.x; j < dim; j += OPS_THREADS) dxr[j] = rs * gamma[j] * dyr[j] - xr[j] * c;
    if (threadIdx.x == 0) rstd[r] = rs;
}

// dgamma = sum_r dy * x * rstd[r], in the column scheme of layernorm_bwd_params.
extern "C" __global__ void __launch_bounds__(COL_X * COL_Y)
    rmsnorm_bwd_params(const float* x, const float* dy, const float* rstd, u64 rows, u32 dim, float* dgamma) {
    __shared__ float sg[COL_Y][COL_X + 1];
    u32 col = blockIdx.x * COL_X + threadIdx.x;
    float ag = 0.0f;
    if (col < dim) {
        for (u64 r = threadIdx.y; r < rows; r += COL_Y) ag += dy[r * dim + col] * x[r * dim + col] * rstd[r];
    }
    sg[threadIdx.y][threadIdx.x] = ag;
    __syncthreads();
    if (threadIdx.y == 0 && col < dim) {
        float g = 0.0f;
        for (int k = 0; k < COL_Y; k++) g += sg[k][threadIdx.x];
        dgamma[col] = g;
    }
}

// Rotary embedding, one thread per rotated pair (row, head, i < half): angles position *
// inv_freq[i] in f32 (inv_freq computed on the host exactly as the CPU does), sin times `sign`
// (-1 rotates back: the backward).
extern "C" __global__ void rope_rotate(const float* x, const u32* positions, const float* inv_freq, u64 rows,
                                       u32 heads, u32 head_dim, float sign, float* out) {
    u32 half = head_dim / 2;
    u64 pairs = rows * heads * half;
    for (u64 e = gtid(); e < pairs; e += gstride()) {
        u32 i = (u32)(e % half);
        u64 rh = e / half;  // row * heads + head
        u64 r = rh / heads;
        float s, c;
        sincosf((float)positions[r] * inv_freq[i], &s, &c);
        s = sign * s;
        u64 at = rh * head_dim + i;
        float x1 = x[at], x2 = x[at + half];
        out[at] = x1 * c - x2 * s;
        out[at + half] = x2 * c + x1 * s;
    }
}

__device__ __forceinline__ float sigmoid_f(float v) { return 1.0f / (1.0f + expf(-v)); }

// y = silu(gate) * up = gate * sigmoid(gate) * up.
extern "C" __global__ void swiglu_fwd(const float* gate, const float* up, u64 n, float* y) {
    for (u64 i = gtid(); i < n; i += gstride()) {
        float g = gate[i];
        y[i] = g * sigmoid_f(g) * up[i];
    }
}

// dgate = dy up s (1 + g (1 - s)), dup = dy g s with s = sigmoid(g).
extern "C" __global__ void swiglu_bwd(const float* gate, const float* up, const float* dy, u64 n, float* dgate,
                                      float* dup) {
    for (u64 i = gtid(); i < n; i += gstride()) {
        float g = gate[i], u = up[i], d = dy[i];
        float s = sigmoid_f(g);
        dgate[i] = d * u * s * (1.0f + g * (1.0f - s));
        dup[i] = d * g * s;
    }
}

// ---------------------------------------------------------------- top-k cross-entropy

// The row's log-sum-exp over every column (lse) and over the columns outside its top-k ids
// (lse_out; has_out = 0 when the ids cover the row), both in f64 after an f32 max, as the CPU's
// `topk_lses`. `inside` is a shared bitmap of cols bits, set from the row's ids.
__device__ __forceinline__ void topk_row_lses(const float* z, const u32* ids, u32 cols, u32 k, u32* inside, float* shf,
                              double* shd, double* lse, double* lse_out, bool* has_out) {
    u32 words = (cols + 31) / 32;
    for (u32 w = threadIdx.x; w < words; w += OPS_THREADS) inside[w] = 0u;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (u32 j = 0; j < k; j++) inside[ids[j] / 32] |= 1u << (ids[j] % 32);
    }
    __syncthreads();
    float m = neg_inf(), mo = neg_inf();
    for (u32 j = threadIdx.x; j < cols; j += OPS_THREADS) {
        m = fmaxf(m, z[j]);
        if (!((inside[j / 32] >> (j % 32)) & 1u)) mo = fmaxf(mo, z[j]);
    }
    m = block_max_f(m, shf);
    mo = block_max_f(mo, shf);
    double md = (double)m, mod = (double)mo, s = 0.0, so = 0.0;
    bool out = mo != neg_inf();
    for (u32 j = threadIdx.x; j < cols; j += OPS_THREADS) {
        s += exp((double)z[j] - md);
        if (out && !((inside[j / 32] >> (j % 32)) & 1u)) so += exp((double)z[j] - mod);
    }
    s = block_sum_d(s, shd);
    so = block_sum_d(so, shd);
    *lse = md + log(s);
    *lse_out = out ? mod + log(so) : 0.0;
    *has_out = out;
}

// One CTA per row, dynamic shared memory: a bitmap of ceil(cols / 32) words. row_loss[r] =
// sum_j t_j (lse - z[id_j]) + rest (lse - lse_out) (the bucket only when it has columns and
// mass), in f64; l1_finish then takes the mean in a fixed order.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    topk_ce_rows(const float* logits, const u32* ids, const float* targets, const float* rest, u32 cols, u32 k,
                 double* row_loss) {
    extern __shared__ u32 inside[];
    __shared__ float shf[OPS_THREADS];
    __shared__ double shd[OPS_THREADS];
    u64 r = blockIdx.x;
    const float* z = logits + r * cols;
    const u32* id = ids + r * k;
    const float* t = targets + r * k;
    double lse, lo;
    bool has_out;
    topk_row_lses(z, id, cols, k, inside, shf, shd, &lse, &lo, &has_out);
    if (threadIdx.x == 0) {
        double acc = 0.0;
        for (u32 j = 0; j < k; j++) acc += (double)t[j] * (lse - (double)z[id[j]]);
        double bucket = (has_out && rest[r] != 0.0f) ? (double)rest[r] * (lse - lo) : 0.0;
        row_loss[r] = acc + bucket;
    }
}

// One CTA per row, dynamic shared memory as topk_ce_rows: the CPU's gradient, element by element
// in its order: p_j * mass * s for every column, minus t * s at each id (in id order, by one
// thread), minus rest * exp(z_j - lse_out) * s outside the ids when the bucket counts.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    topk_ce_grad(const float* logits, const u32* ids, const float* targets, const float* rest, u32 cols, u32 k,
                 double s, float* g) {
    extern __shared__ u32 inside[];
    __shared__ float shf[OPS_THREADS];
    __shared__ double shd[OPS_THREADS];
    u64 r = blockIdx.x;
    const float* z = logits + r * cols;
    const u32* id = ids + r * k;
    const float* t = targets + r * k;
    float* gr = g + r * cols;
    double lse, lo;
    bool has_out;
    topk_row_lses(z, id, cols, k, inside, shf, shd, &lse, &lo, &has_out);
    bool bucket = has_out && rest[r] != 0.0f;
    double rm = (double)rest[r];
    double mass = 0.0;
    for (u32 j = 0; j < k; j++) mass += (double)t[j];
    if (bucket) mass += rm;
    for (u32 j = threadIdx.x; j < cols; j += OPS_THREADS) gr[j] = (float)(exp((double)z[j] - lse) * mass * s);
    if (bucket) {
        // The same thread owns the same columns as in the loop above.
        for (u32 j = threadIdx.x; j < cols; j += OPS_THREADS) {
            if (!((inside[j / 32] >> (j % 32)) & 1u)) gr[j] -= (float)(rm * exp((double)z[j] - lo) * s);
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (u32 j = 0; j < k; j++) gr[id[j]] -= (float)((double)t[j] * s);
    }
}

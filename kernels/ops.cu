// Fused training ops on the GPU: RMSNorm forward/backward, rotary embedding (both layouts, either
// direction), SwiGLU forward/backward, and the row kernels of the chunked cross-entropy (logsumexp
// and loss per row; the logits' gradient in place). Math in f32 whatever the storage (f32 or bf16),
// one rounding at the store; the formulas are in ops_math.cuh, shared with the host check.
// The cross-entropy never sees more than one chunk of logits (rows x V): src/cuda/ computes them
// chunk by chunk with a GEMM and reuses the buffer.
#include <cuda_bf16.h>

#include "ops_math.cuh"

namespace {

__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const uint16_t* p, long long i) { return qt::bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(uint16_t* p, long long i, float v) { p[i] = qt::f32_to_bf16(v); }
template <typename T> __device__ constexpr bool is_bf16() { return sizeof(T) == 2; }

// Sum over the thread block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    __syncthreads();  // `part` may still be read by a previous call
    if (lane == 0) part[w] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ float block_max(float v) {
    __shared__ float part[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) part[w] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? part[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// One thread block per row of x (rows, c); w (c) f32.
template <typename T>
__device__ void rmsnorm_fwd(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ y,
                            int c, float eps) {
    const long long r0 = (long long)blockIdx.x * c;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float v = ld(x, r0 + i);
        ss += v * v;
    }
    const float r = qt::rms_rstd(block_sum(ss), c, eps);
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float wi = w[i];
        if (is_bf16<T>()) wi = qt::bf16_to_f32(qt::f32_to_bf16(wi));
        st(y, r0 + i, qt::rms_out(ld(x, r0 + i), r, wi, is_bf16<T>()));
    }
}

template <typename T>
__device__ void rmsnorm_bwd(const T* __restrict__ x, const float* __restrict__ w,
                            const T* __restrict__ dy, T* __restrict__ dx, int c, float eps) {
    const long long r0 = (long long)blockIdx.x * c;
    float ss = 0.0f, gx = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float v = ld(x, r0 + i);
        ss += v * v;
        gx += ld(dy, r0 + i) * w[i] * v;
    }
    const float r = qt::rms_rstd(block_sum(ss), c, eps);
    const float k = qt::rms_bwd_k(r, block_sum(gx), c);
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        st(dx, r0 + i, qt::rms_bwd(ld(x, r0 + i), ld(dy, r0 + i), w[i], r, k));
    }
}

// x, y (bh, t, 2*half); cos, sin (t, half) f32. One thread per pair.
template <typename T>
__device__ void rope(const T* __restrict__ x, const float* __restrict__ cs,
                     const float* __restrict__ sn, T* __restrict__ y, long long bh, int t, int half,
                     int interleaved, float sign) {
    const long long npairs = bh * t * half;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < npairs;
         i += (long long)gridDim.x * blockDim.x) {
        const int k = (int)(i % half);
        const long long row = i / half;  // (b, h, p)
        const int p = (int)(row % t);
        const long long base = row * 2 * half;
        const long long i1 = interleaved ? base + 2 * k : base + k;
        const long long i2 = interleaved ? base + 2 * k + 1 : base + k + half;
        float a, b;
        qt::rope_pair(ld(x, i1), ld(x, i2), cs[p * half + k], sn[p * half + k], sign, &a, &b);
        st(y, i1, a);
        st(y, i2, b);
    }
}

template <typename T>
__device__ void swiglu_fwd(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ h,
                           long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        st(h, i, qt::swiglu(ld(g, i), ld(u, i)));
    }
}

template <typename T>
__device__ void swiglu_bwd(const T* __restrict__ g, const T* __restrict__ u,
                           const T* __restrict__ dh, T* __restrict__ dg, T* __restrict__ du,
                           long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float a, b;
        qt::swiglu_bwd(ld(g, i), ld(u, i), ld(dh, i), &a, &b);
        st(dg, i, a);
        st(du, i, b);
    }
}

// One thread block per row of logits (rows, v): lse[row] and loss[row] = lse - logit[label]
// (0 for a negative label).
template <typename T>
__device__ void ce_fwd(const T* __restrict__ logits, const long long* __restrict__ labels,
                       float* __restrict__ lse, float* __restrict__ loss, int v) {
    const long long r0 = (long long)blockIdx.x * v;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, ld(logits, r0 + j));
    m = block_max(m);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(ld(logits, r0 + j) - m);
    s = block_sum(s);
    if (threadIdx.x == 0) {
        const float z = m + logf(s);
        const long long label = labels[blockIdx.x];
        lse[blockIdx.x] = z;
        loss[blockIdx.x] = label < 0 ? 0.0f : z - ld(logits, r0 + label);
    }
}

// logits become g * (softmax - onehot) in place (0 on ignored rows).
template <typename T>
__device__ void ce_grad(T* __restrict__ logits, const long long* __restrict__ labels,
                        const float* __restrict__ lse, float g, int v) {
    const long long r0 = (long long)blockIdx.x * v;
    const long long label = labels[blockIdx.x];
    const float z = lse[blockIdx.x];
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        st(logits, r0 + j, qt::ce_grad(ld(logits, r0 + j), z, g, label, j));
    }
}

// x (rows, v) += bias (v), the lm_head's bias on a chunk of logits.
template <typename T>
__device__ void add_bias(T* __restrict__ x, const float* __restrict__ bias, long long rows, int v) {
    const long long n = rows * v;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        st(x, i, ld(x, i) + bias[i % v]);
    }
}

}  // namespace

// C entry points, one per storage type: _f32 (float) and _bf16 (uint16 bit patterns).
#define QT_OPS(sfx, T)                                                                           \
    extern "C" __global__ void qt_rmsnorm_fwd_##sfx(const T* x, const float* w, T* y, int c,     \
                                                    float eps) {                                 \
        rmsnorm_fwd<T>(x, w, y, c, eps);                                                         \
    }                                                                                            \
    extern "C" __global__ void qt_rmsnorm_bwd_##sfx(const T* x, const float* w, const T* dy,     \
                                                    T* dx, int c, float eps) {                   \
        rmsnorm_bwd<T>(x, w, dy, dx, c, eps);                                                    \
    }                                                                                            \
    extern "C" __global__ void qt_rope_##sfx(const T* x, const float* cs, const float* sn, T* y, \
                                             long long bh, int t, int half, int interleaved,     \
                                             float sign) {                                       \
        rope<T>(x, cs, sn, y, bh, t, half, interleaved, sign);                                   \
    }                                                                                            \
    extern "C" __global__ void qt_swiglu_fwd_##sfx(const T* g, const T* u, T* h, long long n) {  \
        swiglu_fwd<T>(g, u, h, n);                                                               \
    }                                                                                            \
    extern "C" __global__ void qt_swiglu_bwd_##sfx(const T* g, const T* u, const T* dh, T* dg,   \
                                                   T* du, long long n) {                         \
        swiglu_bwd<T>(g, u, dh, dg, du, n);                                                      \
    }                                                                                            \
    extern "C" __global__ void qt_ce_fwd_##sfx(const T* logits, const long long* labels,         \
                                               float* lse, float* loss, int v) {                 \
        ce_fwd<T>(logits, labels, lse, loss, v);                                                 \
    }                                                                                            \
    extern "C" __global__ void qt_ce_grad_##sfx(T* logits, const long long* labels,              \
                                                const float* lse, float g, int v) {              \
        ce_grad<T>(logits, labels, lse, g, v);                                                   \
    }                                                                                            \
    extern "C" __global__ void qt_add_bias_##sfx(T* x, const float* bias, long long rows, int v) { \
        add_bias<T>(x, bias, rows, v);                                                           \
    }

QT_OPS(f32, float)
QT_OPS(bf16, uint16_t)

// Dequantisation of a frozen weight into a dense bf16 (or f32) scratch matrix, which a cuBLAS GEMM
// then multiplies (src/cuda/). The scratch is one buffer reused by every layer, sized to the
// largest; no dequantised copy outlives a GEMM.
//
// GGUF blocks (18, 22, 34, 144, 210 bytes) are byte-packed, so a block is rarely 16-byte aligned;
// eight consecutive blocks always are a multiple of 16 bytes. Each warp therefore owns a group of
// eight blocks: it copies them into shared memory with 16-byte loads (the weight buffer is padded
// to a multiple of 16 bytes by the host), then each lane decodes 8-element parts (quant_blocks.cuh)
// and writes each as one 16-byte bf16 store (two for f32); consecutive lanes write consecutive
// 16-byte chunks, so stores coalesce. NF4's packed codes are 32 bytes per block: one lane takes 16
// bytes (32 elements) with a single 16-byte load.
#include <cuda_bf16.h>

#include "quant_blocks.cuh"

namespace {

constexpr int WARPS = 8;        // warps per thread block (256 threads)
constexpr int GROUP = 8;        // quant blocks per warp iteration (a multiple of 16 bytes)

typedef void (*DecodeFn)(const uint8_t*, int, float*);

__device__ __forceinline__ uint32_t pack2(float a, float b) {
    return (uint32_t)qt::f32_to_bf16(a) | ((uint32_t)qt::f32_to_bf16(b) << 16);
}

// Stores 8 values at element 8*part_index of dst.
__device__ __forceinline__ void store8(uint16_t* dst, long long part, const float o[8]) {
    uint4 v = make_uint4(pack2(o[0], o[1]), pack2(o[2], o[3]), pack2(o[4], o[5]), pack2(o[6], o[7]));
    reinterpret_cast<uint4*>(dst)[part] = v;
}

__device__ __forceinline__ void store8(float* dst, long long part, const float o[8]) {
    float4* d = reinterpret_cast<float4*>(dst) + 2 * part;
    d[0] = make_float4(o[0], o[1], o[2], o[3]);
    d[1] = make_float4(o[4], o[5], o[6], o[7]);
}

template <int BYTES, int PARTS, DecodeFn DECODE, typename Out>
__device__ __forceinline__ void dequant_ggml(const uint8_t* __restrict__ src, Out* __restrict__ dst,
                                             long long nblocks) {
    constexpr int VECS = (GROUP * BYTES + 15) / 16;
    __shared__ uint4 stage[WARPS][VECS];
    const int lane = threadIdx.x & 31;
    const int w = threadIdx.x >> 5;
    const long long ngroups = (nblocks + GROUP - 1) / GROUP;
    for (long long g = (long long)blockIdx.x * WARPS + w; g < ngroups;
         g += (long long)gridDim.x * WARPS) {
        const long long b0 = g * GROUP;
        const int nb = (int)min((long long)GROUP, nblocks - b0);
        const int nvec = (nb * BYTES + 15) / 16;
        const uint4* s = reinterpret_cast<const uint4*>(src + b0 * BYTES);
        for (int i = lane; i < nvec; i += 32) stage[w][i] = __ldg(s + i);
        __syncwarp();
        const uint8_t* sb = reinterpret_cast<const uint8_t*>(stage[w]);
        for (int p = lane; p < nb * PARTS; p += 32) {
            float o[8];
            DECODE(sb + (p / PARTS) * BYTES, p % PARTS, o);
            store8(dst, b0 * PARTS + p, o);
        }
        __syncwarp();
    }
}

template <typename Out>
__device__ __forceinline__ void dequant_nf4(const uint8_t* __restrict__ packed,
                                            const uint8_t* __restrict__ absmax_q,
                                            const float* __restrict__ nested_absmax,
                                            const float* __restrict__ nested_code,
                                            const float* __restrict__ code, float offset,
                                            long long nelems, Out* __restrict__ dst) {
    __shared__ float s_code[16];
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    const long long nchunks = nelems / 32;  // 16 packed bytes each; half an NF4 block
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < nchunks;
         t += (long long)gridDim.x * blockDim.x) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(packed) + t);
        const float am = qt::nf4_absmax(absmax_q, nested_absmax, nested_code, offset, t >> 1);
        const uint32_t words[4] = {v.x, v.y, v.z, v.w};
        for (int i = 0; i < 4; ++i) {
            uint8_t b4[4];
            memcpy(b4, &words[i], 4);  // little-endian: byte order of the packed stream
            float o[8];
            qt::decode8_nf4(b4, am, s_code, o);
            store8(dst, t * 4 + i, o);
        }
    }
}

}  // namespace

// Entry points (C names, looked up by src/cuda/). `src` and `packed` must be 16-byte aligned and
// readable up to the next multiple of 16 bytes; `dst` 16-byte aligned with room for every element.
#define QT_GGML(name, BYTES, PARTS, FN)                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        qt_dequant_##name##_bf16(const uint8_t* src, uint16_t* dst, long long nblocks) {         \
        dequant_ggml<BYTES, PARTS, FN, uint16_t>(src, dst, nblocks);                             \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        qt_dequant_##name##_f32(const uint8_t* src, float* dst, long long nblocks) {             \
        dequant_ggml<BYTES, PARTS, FN, float>(src, dst, nblocks);                                \
    }

QT_GGML(q4_0, qt::Q4_0_BYTES, 4, qt::decode8_q4_0)
QT_GGML(q5_0, qt::Q5_0_BYTES, 4, qt::decode8_q5_0)
QT_GGML(q8_0, qt::Q8_0_BYTES, 4, qt::decode8_q8_0)
QT_GGML(q4_k, qt::Q4_K_BYTES, 32, qt::decode8_q4_k)
QT_GGML(q6_k, qt::Q6_K_BYTES, 32, qt::decode8_q6_k)

extern "C" __global__ void __launch_bounds__(256)
    qt_dequant_nf4_bf16(const uint8_t* packed, const uint8_t* absmax_q, const float* nested_absmax,
                        const float* nested_code, const float* code, float offset,
                        long long nelems, uint16_t* dst) {
    dequant_nf4<uint16_t>(packed, absmax_q, nested_absmax, nested_code, code, offset, nelems, dst);
}

extern "C" __global__ void __launch_bounds__(256)
    qt_dequant_nf4_f32(const uint8_t* packed, const uint8_t* absmax_q, const float* nested_absmax,
                       const float* nested_code, const float* code, float offset, long long nelems,
                       float* dst) {
    dequant_nf4<float>(packed, absmax_q, nested_absmax, nested_code, code, offset, nelems, dst);
}

// Dense weights (F16, BF16, F32 tensors: an lm_head or a bf16 base) into the same scratch, one
// element per thread iteration, so that every stored type takes the same GEMM path.
namespace {

__device__ __forceinline__ float dense_ld(const uint16_t* p, long long i, bool is_f16) {
    return is_f16 ? qt::f16_to_f32(p[i]) : qt::bf16_to_f32(p[i]);
}

}  // namespace

extern "C" __global__ void qt_dense16_bf16(const uint16_t* src, uint16_t* dst, long long n, int is_f16) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        dst[i] = is_f16 ? qt::f32_to_bf16(qt::f16_to_f32(src[i])) : src[i];
    }
}

extern "C" __global__ void qt_dense16_f32(const uint16_t* src, float* dst, long long n, int is_f16) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        dst[i] = dense_ld(src, i, is_f16 != 0);
    }
}

extern "C" __global__ void qt_dense32_bf16(const float* src, uint16_t* dst, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        dst[i] = qt::f32_to_bf16(src[i]);
    }
}

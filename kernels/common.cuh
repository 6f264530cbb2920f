// Shared helpers for qtune's kernels, usable from device code (nvcc) and from host C++ (g++), so
// that kernels/host_check.cpp runs exactly the arithmetic the GPU runs.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define QT_HD __host__ __device__ __forceinline__
#else
#define QT_HD inline
#endif

namespace qt {

// f32 product and sum, each rounded once. nvcc contracts `a * b + c` into an FMA by default, which
// changes the last bit; the CPU reference (and gguf-py, bitsandbytes) rounds twice. Exact equality
// with the fixtures needs both roundings on both sides.
QT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

QT_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

QT_HD uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

QT_HD float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// IEEE half (as stored in GGUF block scales, little-endian u16) to f32, exactly, subnormals included.
QT_HD float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) {
        return bits_f32(sign | 0x7f800000u | (man << 13));  // inf / NaN (payload kept)
    }
    if (exp != 0) {
        return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
    }
    if (man == 0) {
        return bits_f32(sign);
    }
    // subnormal: value = man * 2^-24, exact in f32
    int e = 113;
    while ((man & 0x400u) == 0) {
        man <<= 1;
        --e;
    }
    return bits_f32(sign | ((uint32_t)e << 23) | ((man & 0x3ffu) << 13));
}

// f32 to bf16 bits, round to nearest even; NaN stays NaN (quiet). The same rounding as the CPU's
// `half::bf16::from_f32` and PyTorch's `.to(torch.bfloat16)`.
QT_HD uint16_t f32_to_bf16(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (uint16_t)((u >> 16) | 0x0040u);
    }
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

QT_HD float bf16_to_f32(uint16_t b) { return bits_f32((uint32_t)b << 16); }

// Little-endian loads from byte pointers (blocks are byte-packed, so no alignment is assumed).
QT_HD uint16_t ld_u16(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }

QT_HD uint32_t ld_u32(const uint8_t* p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

}  // namespace qt

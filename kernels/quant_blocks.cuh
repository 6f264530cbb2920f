// Per-block decoders of the quantised weight formats qtune trains on: GGUF Q4_0, Q5_0, Q8_0, Q4_K,
// Q6_K and bitsandbytes NF4 with double quantisation. Each decodes one "part" of a block: 8
// consecutive elements, which the GPU kernel stores as one 16-byte bf16 vector. The functions are
// `__host__ __device__`: kernels/host_check.cpp runs them on the CPU against the gguf-py and
// bitsandbytes fixtures in tests/fixtures/, so the decode math is checked without a GPU.
//
// The arithmetic is the CPU path's (src/quant/scalar.rs, src/quant/nf4.rs), which is bit-exact
// with gguf-py and bitsandbytes in f32: every product and sum is rounded separately (no FMA), so
// the f32 values are identical and the bf16 outputs are those values rounded once.
#pragma once

#include "common.cuh"

namespace qt {

// Bytes per block and elements per block of each format.
enum : int {
    Q4_0_BYTES = 18, Q4_0_ELEMS = 32,
    Q5_0_BYTES = 22, Q5_0_ELEMS = 32,
    Q8_0_BYTES = 34, Q8_0_ELEMS = 32,
    Q4_K_BYTES = 144, Q4_K_ELEMS = 256,
    Q6_K_BYTES = 210, Q6_K_ELEMS = 256,
    NF4_ELEMS = 64,           // 32 bytes of packed codes per block
    NF4_NESTED = 256,         // absmax codes per nested (double-quant) block
};

// Q4_0: w[j] = d * ((qs[j] & 15) - 8), w[j+16] = d * ((qs[j] >> 4) - 8). part 0..3.
QT_HD void decode8_q4_0(const uint8_t* b, int part, float o[8]) {
    const float d = f16_to_f32(ld_u16(b));
    const uint8_t* qs = b + 2;
    const int j0 = (part & 1) * 8;
    const int shift = (part >> 1) * 4;  // parts 2, 3 are the high nibbles (elements 16..31)
    for (int i = 0; i < 8; ++i) {
        o[i] = mul_rn((float)((int)((qs[j0 + i] >> shift) & 15) - 8), d);
    }
}

// Q5_0: as Q4_0 with a fifth bit: bit j of the 32-bit qh is bit 4 of element j; w = d * (q - 16).
QT_HD void decode8_q5_0(const uint8_t* b, int part, float o[8]) {
    const float d = f16_to_f32(ld_u16(b));
    const uint32_t qh = ld_u32(b + 2);
    const uint8_t* qs = b + 6;
    const int j0 = (part & 1) * 8;
    const int shift = (part >> 1) * 4;
    for (int i = 0; i < 8; ++i) {
        const int e = part * 8 + i;  // element index in the block
        const int q = ((qs[j0 + i] >> shift) & 15) | (int)(((qh >> e) & 1u) << 4);
        o[i] = mul_rn((float)(q - 16), d);
    }
}

// Q8_0: w[j] = d * (int8) qs[j]. part 0..3.
QT_HD void decode8_q8_0(const uint8_t* b, int part, float o[8]) {
    const float d = f16_to_f32(ld_u16(b));
    const uint8_t* qs = b + 2 + part * 8;
    for (int i = 0; i < 8; ++i) {
        o[i] = mul_rn((float)(int8_t)qs[i], d);
    }
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K block (ggml's get_scale_min_k4).
QT_HD void scale_min_k4(int j, const uint8_t* s, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Q4_K: 256 elements in 8 sub-blocks of 32; element c*64 + h*32 + l is nibble h of qs[c*32 + l],
// w = (d * sc) * q - (dmin * m). part 0..31 (all 8 elements of a part share one sub-block).
QT_HD void decode8_q4_k(const uint8_t* b, int part, float o[8]) {
    const float d = f16_to_f32(ld_u16(b));
    const float dmin = f16_to_f32(ld_u16(b + 2));
    const uint8_t* scales = b + 4;
    const int e0 = part * 8;
    const int c = e0 >> 6, h = (e0 >> 5) & 1, l0 = e0 & 31;
    int sc, m;
    scale_min_k4(2 * c + h, scales, &sc, &m);
    const float d1 = mul_rn(d, (float)sc);
    const float m1 = mul_rn(dmin, (float)m);
    const uint8_t* qs = b + 16 + c * 32 + l0;
    for (int i = 0; i < 8; ++i) {
        const int q = (qs[i] >> (4 * h)) & 15;
        o[i] = add_rn(mul_rn(d1, (float)q), -m1);
    }
}

// Q6_K: 256 elements, ql (128 bytes of low nibbles), qh (64 bytes of 2-bit highs), 16 int8 scales,
// f16 d. Element e = a*128 + s*32 + l takes nibble s/2 of ql[a*64 + (s%2)*32 + l] and bits 2s..2s+1
// of qh[a*32 + l]; w = (d * scales[e/16]) * (q - 32). part 0..31.
QT_HD void decode8_q6_k(const uint8_t* b, int part, float o[8]) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* scales = (const int8_t*)(b + 192);
    const float d = f16_to_f32(ld_u16(b + 208));
    const int e0 = part * 8;
    const int a = e0 >> 7, s = (e0 >> 5) & 3, l0 = e0 & 31;
    const float dl = mul_rn(d, (float)scales[e0 >> 4]);
    for (int i = 0; i < 8; ++i) {
        const int l = l0 + i;
        const int lo = (ql[a * 64 + (s & 1) * 32 + l] >> (4 * (s >> 1))) & 15;
        const int hi = (qh[a * 32 + l] >> (2 * s)) & 3;
        o[i] = mul_rn(dl, (float)((lo | (hi << 4)) - 32));
    }
}

// NF4 with double quant: the f32 absmax of block `blk`, as bitsandbytes' dequantize_blockwise plus
// the offset computes it: nested_code[absmax_q[blk]] * nested_absmax[blk / 256] + offset, two
// roundings.
QT_HD float nf4_absmax(const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code,
                       float offset, long long blk) {
    return add_rn(mul_rn(nested_code[absmax_q[blk]], nested_absmax[blk / NF4_NESTED]), offset);
}

// NF4: 8 elements from 4 packed bytes (high nibble first): w = code[nibble] * absmax.
QT_HD void decode8_nf4(const uint8_t* packed4, float absmax, const float* code, float o[8]) {
    for (int i = 0; i < 4; ++i) {
        o[2 * i] = mul_rn(code[packed4[i] >> 4], absmax);
        o[2 * i + 1] = mul_rn(code[packed4[i] & 15], absmax);
    }
}

}  // namespace qt

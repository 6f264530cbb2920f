// Element-wise math of the fused training ops (RMSNorm, rotary, SwiGLU, cross-entropy), shared by
// the kernels in ops.cu and the host check (kernels/host_check.cpp), which runs it against the
// transformers/PyTorch fixtures in tests/fixtures/ops/. Reductions (row sums, maxima) are in the
// kernels; here are the formulas that turn a row's statistics into outputs.
#pragma once

#include <math.h>

#include "common.cuh"

namespace qt {

// 1 / sqrt(mean(x^2) + eps) from the f32 sum of squares of a row of `c`, in f64 as the CPU op does
// (one division per row: the cost of f64 is nothing next to the row's loads).
QT_HD float rms_rstd(float sumsq, int c, double eps) {
    return (float)(1.0 / sqrt((double)sumsq / (double)c + eps));
}

// RMSNorm output: w * (x * r), with x * r rounded to the activation dtype first when that is bf16
// (transformers' LlamaRMSNorm casts the normalised value before the weight product); `w` is
// already rounded to the activation dtype by the caller.
QT_HD float rms_out(float x, float r, float w, bool round_bf16) {
    float n = x * r;
    if (round_bf16) n = bf16_to_f32(f32_to_bf16(n));
    return w * n;
}

// The row constant of RMSNorm's backward: k = r^3 * sum(dy * w * x) / c (in f64, as the CPU).
QT_HD float rms_bwd_k(float r, float gx, int c) {
    const double rd = (double)r;
    return (float)(rd * rd * rd * (double)gx / (double)c);
}

// RMSNorm input gradient of one element: dx = r * dy * w - k * x.
QT_HD float rms_bwd(float x, float dy, float w, float r, float k) { return r * dy * w - k * x; }

// One rotary pair (a, b) by the angle with (c, s): (a c - b s, b c + a s). sign = -1 rotates back
// (the backward of the forward rotation).
QT_HD void rope_pair(float a, float b, float c, float s, float sign, float* oa, float* ob) {
    const float sn = sign * s;
    *oa = a * c - b * sn;
    *ob = b * c + a * sn;
}

QT_HD float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

// SwiGLU forward: h = silu(g) * u = g * sigmoid(g) * u.
QT_HD float swiglu(float g, float u) { return g * sigmoid(g) * u; }

// SwiGLU backward: dg = dh * u * sig(g) * (1 + g (1 - sig(g))), du = dh * silu(g).
QT_HD void swiglu_bwd(float g, float u, float dh, float* dg, float* du) {
    const float sg = sigmoid(g);
    *dg = dh * u * sg * (1.0f + g * (1.0f - sg));
    *du = dh * g * sg;
}

// Cross-entropy gradient of one logit given its row's logsumexp: g * (softmax - onehot); a row with
// a negative label (ignored token) gives 0.
QT_HD float ce_grad(float logit, float lse, float g, long long label, long long j) {
    if (label < 0) return 0.0f;
    const float p = g * expf(logit - lse);
    return j == label ? p - g : p;
}

}  // namespace qt

// Host check of the GPU kernels' math, no GPU needed: runs the `__host__ __device__` decoders of
// quant_blocks.cuh and the op formulas of ops_math.cuh on the CPU against the fixtures other
// people's code wrote (tests/fixtures/: gguf-py 0.10.0, bitsandbytes 0.47.0, transformers 4.46.3 /
// PyTorch 2.5.1). Built and run by kernels/build.sh (g++ or nvcc's host compiler, with
// -ffp-contract=off so that products and sums are rounded as on the device, where the decoders use
// __fmul_rn/__fadd_rn).
//
//   dequantisers: every f32 value bit-identical to the reference, and every bf16 output equal to
//                 the reference rounded once to bf16 (what the kernels store);
//   ops:          RMSNorm (f32 y, dx; bf16 y), rotary (both layouts, y and dx), cross-entropy
//                 (loss and dh through an f32 and a Q8_0 lm_head) within the Rust tests'
//                 tolerances (1e-5 outputs, 1e-4 gradients; bf16 RMSNorm 1e-2).
//
// Usage: host_check <repo root>. Exit status 0 when everything matches.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <string>
#include <vector>

#include "ops_math.cuh"
#include "quant_blocks.cuh"

static std::string g_root;
static int g_failures = 0;

static std::vector<uint8_t> read_file(const std::string& rel) {
    const std::string p = g_root + "/" + rel;
    FILE* f = fopen(p.c_str(), "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", p.c_str());
        exit(2);
    }
    std::vector<uint8_t> v;
    uint8_t buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) v.insert(v.end(), buf, buf + n);
    fclose(f);
    return v;
}

static std::vector<float> as_f32(const std::vector<uint8_t>& b) {
    std::vector<float> v(b.size() / 4);
    memcpy(v.data(), b.data(), v.size() * 4);
    return v;
}

static void check(bool ok, const char* what) {
    printf("%-60s %s\n", what, ok ? "ok" : "FAILED");
    if (!ok) ++g_failures;
}

// Compares decoded f32 values bit for bit with the reference, and their bf16 rounding with the
// reference's. Reports the first mismatch.
static bool compare_exact(const char* what, const std::vector<float>& got,
                          const std::vector<float>& want) {
    if (got.size() != want.size()) {
        printf("%s: %zu values, reference %zu\n", what, got.size(), want.size());
        return false;
    }
    for (size_t i = 0; i < got.size(); ++i) {
        if (qt::f32_bits(got[i]) != qt::f32_bits(want[i]) ||
            qt::f32_to_bf16(got[i]) != qt::f32_to_bf16(want[i])) {
            printf("%s: element %zu: got %.9g, reference %.9g\n", what, i, got[i], want[i]);
            return false;
        }
    }
    return true;
}

typedef void (*Decode)(const uint8_t*, int, float*);

static void check_ggml(const char* name, int bytes, int elems, Decode fn) {
    const std::vector<uint8_t> raw = read_file(std::string("tests/fixtures/ggml/deq_") + name + ".bin");
    const std::vector<float> want = as_f32(read_file(std::string("tests/fixtures/ggml/deq_") + name + ".f32"));
    const size_t nblocks = raw.size() / bytes;
    std::vector<float> got(nblocks * elems);
    for (size_t b = 0; b < nblocks; ++b) {
        for (int p = 0; p < elems / 8; ++p) fn(raw.data() + b * bytes, p, &got[b * elems + p * 8]);
    }
    char what[128];
    snprintf(what, sizeof what, "%s: %zu blocks vs gguf-py (f32 bits, bf16)", name, nblocks);
    check(raw.size() == nblocks * bytes && compare_exact(what, got, want), what);
}

// `"offset_bits": N` of one case in tests/fixtures/nf4/manifest.json (a fixed layout written by
// json.dump; no JSON library needed for one integer).
static uint32_t nf4_offset_bits(const std::string& manifest, const std::string& c) {
    size_t at = manifest.find("\"" + c + "\": {");
    if (at == std::string::npos) {
        fprintf(stderr, "manifest: no case %s\n", c.c_str());
        exit(2);
    }
    at = manifest.find("\"offset_bits\":", at);
    return (uint32_t)strtoul(manifest.c_str() + at + 14, nullptr, 10);
}

// F16 and BF16 tensors (the dense kernels' element conversions) against gguf-py's f32 values.
static void check_dense(const char* name, bool is_f16) {
    const std::vector<uint8_t> raw = read_file(std::string("tests/fixtures/ggml/deq_") + name + ".bin");
    const std::vector<float> want = as_f32(read_file(std::string("tests/fixtures/ggml/deq_") + name + ".f32"));
    std::vector<float> got(raw.size() / 2);
    for (size_t i = 0; i < got.size(); ++i) {
        const uint16_t h = qt::ld_u16(&raw[2 * i]);
        got[i] = is_f16 ? qt::f16_to_f32(h) : qt::bf16_to_f32(h);
    }
    char what[128];
    snprintf(what, sizeof what, "%s: %zu values vs gguf-py (f32 bits, bf16)", name, got.size());
    check(compare_exact(what, got, want), what);
}

static void check_nf4() {
    const std::vector<uint8_t> m = read_file("tests/fixtures/nf4/manifest.json");
    const std::string manifest(m.begin(), m.end());
    const char* cases[] = {"small_f32", "outliers_f32", "f16", "bf16", "ties_f32", "offset_sensitive"};
    for (const char* c : cases) {
        const std::string p = std::string("tests/fixtures/nf4/") + c;
        const std::vector<uint8_t> packed = read_file(p + ".packed.bin");
        const std::vector<uint8_t> absmax_q = read_file(p + ".absmax_q.bin");
        const std::vector<float> nested_absmax = as_f32(read_file(p + ".nested_absmax.bin"));
        const std::vector<float> nested_code = as_f32(read_file(p + ".nested_code.bin"));
        const std::vector<float> code = as_f32(read_file(p + ".code.bin"));
        const std::vector<float> want = as_f32(read_file(p + ".deq.bin"));
        const float offset = qt::bits_f32(nf4_offset_bits(manifest, c));
        const size_t n = packed.size() * 2;
        std::vector<float> got(n);
        // the kernel's order: one 16-byte chunk (32 elements) per thread, 4 bytes per decode
        for (size_t e = 0; e < n; e += 8) {
            const float am = qt::nf4_absmax(absmax_q.data(), nested_absmax.data(),
                                            nested_code.data(), offset, (long long)(e / qt::NF4_ELEMS));
            qt::decode8_nf4(packed.data() + e / 2, am, code.data(), &got[e]);
        }
        char what[128];
        snprintf(what, sizeof what, "NF4 %s: %zu values vs bitsandbytes (f32 bits, bf16)", c, n);
        check(compare_exact(what, got, want), what);
    }
}

// ------------------------------------------------------------------------------------------------
// Minimal safetensors reader: the header is JSON with one object per tensor; we need dtype-free
// f32/i64/bf16 data by name, located by `"data_offsets":[a,b]` after the tensor's name.

struct SafeTensors {
    std::vector<uint8_t> bytes;
    std::string header;
    size_t data_start = 0;

    explicit SafeTensors(const std::string& rel) : bytes(read_file(rel)) {
        uint64_t n;
        memcpy(&n, bytes.data(), 8);
        header.assign(bytes.begin() + 8, bytes.begin() + 8 + n);
        data_start = 8 + n;
    }

    std::vector<uint8_t> raw(const std::string& name) const {
        size_t at = header.find("\"" + name + "\":");
        if (at == std::string::npos) {
            fprintf(stderr, "safetensors: no tensor %s\n", name.c_str());
            exit(2);
        }
        at = header.find("\"data_offsets\":[", at) + 16;
        char* end;
        const size_t a = strtoull(header.c_str() + at, &end, 10);
        const size_t b = strtoull(end + 1, nullptr, 10);
        return std::vector<uint8_t>(bytes.begin() + data_start + a, bytes.begin() + data_start + b);
    }

    std::vector<float> f32(const std::string& name) const { return as_f32(raw(name)); }

    std::vector<float> bf16(const std::string& name) const {
        const std::vector<uint8_t> r = raw(name);
        std::vector<float> v(r.size() / 2);
        for (size_t i = 0; i < v.size(); ++i) v[i] = qt::bf16_to_f32(qt::ld_u16(&r[2 * i]));
        return v;
    }

    std::vector<long long> i64(const std::string& name) const {
        const std::vector<uint8_t> r = raw(name);
        std::vector<long long> v(r.size() / 8);
        memcpy(v.data(), r.data(), v.size() * 8);
        return v;
    }
};

// max |got - want| / max |want|, as the Rust tests measure.
static double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
    if (got.size() != want.size()) return INFINITY;
    double scale = 0.0, diff = 0.0;
    for (size_t i = 0; i < want.size(); ++i) {
        scale = fmax(scale, fabs((double)want[i]));
        const double d = fabs((double)got[i] - (double)want[i]);
        diff = isnan(d) ? INFINITY : fmax(diff, d);
    }
    return diff / scale;
}

static void check_close(const char* what, const std::vector<float>& got,
                        const std::vector<float>& want, double tol) {
    const double e = rel_err(got, want);
    char line[160];
    snprintf(line, sizeof line, "%s: rel err %.2e (tol %.0e)", what, e, tol);
    check(e <= tol, line);
}

static float row_sumsq(const float* x, int c) {
    float s = 0.0f;
    for (int i = 0; i < c; ++i) s += x[i] * x[i];
    return s;
}

static void check_rms_norm() {
    const SafeTensors f("tests/fixtures/ops/rms_norm.safetensors");
    const int c = 64;
    const double eps = 1e-5;
    const std::vector<float> x = f.f32("x"), w = f.f32("w"), dy = f.f32("dy");
    const size_t rows = x.size() / c;
    std::vector<float> y(x.size()), dx(x.size());
    for (size_t r = 0; r < rows; ++r) {
        const float* xr = &x[r * c];
        const float rs = qt::rms_rstd(row_sumsq(xr, c), c, eps);
        float gx = 0.0f;
        for (int i = 0; i < c; ++i) gx += dy[r * c + i] * w[i] * xr[i];
        const float k = qt::rms_bwd_k(rs, gx, c);
        for (int i = 0; i < c; ++i) {
            y[r * c + i] = qt::rms_out(xr[i], rs, w[i], false);
            dx[r * c + i] = qt::rms_bwd(xr[i], dy[r * c + i], w[i], rs, k);
        }
    }
    check_close("RMSNorm f32 y vs transformers", y, f.f32("y"), 1e-5);
    check_close("RMSNorm f32 dx vs torch autograd", dx, f.f32("dx"), 1e-4);

    const std::vector<float> xb = f.bf16("x_bf16"), wb = f.bf16("w_bf16");
    std::vector<float> yb(xb.size());
    for (size_t r = 0; r < rows; ++r) {
        const float rs = qt::rms_rstd(row_sumsq(&xb[r * c], c), c, eps);
        for (int i = 0; i < c; ++i) {
            const float v = qt::rms_out(xb[r * c + i], rs, wb[i], true);
            yb[r * c + i] = qt::bf16_to_f32(qt::f32_to_bf16(v));
        }
    }
    check_close("RMSNorm bf16 y vs transformers (bf16)", yb, f.bf16("y_bf16"), 1e-2);
}

static void check_rope() {
    const SafeTensors f("tests/fixtures/ops/rope.safetensors");
    const std::vector<float> x = f.f32("x"), dy = f.f32("dy"), cs = f.f32("cos"), sn = f.f32("sin");
    const int t = 7, d = 16, half = d / 2;  // x (2, 4, 7, 16); cos, sin (7, 16): halves repeated
    const size_t bh = x.size() / (t * d);
    for (int interleaved = 0; interleaved < 2; ++interleaved) {
        std::vector<float> y(x.size()), dx(x.size());
        for (size_t r = 0; r < bh * t; ++r) {
            const int p = (int)(r % t);
            for (int k = 0; k < half; ++k) {
                const size_t i1 = r * d + (interleaved ? 2 * k : k);
                const size_t i2 = r * d + (interleaved ? 2 * k + 1 : k + half);
                const float c = cs[p * d + k], s = sn[p * d + k];
                qt::rope_pair(x[i1], x[i2], c, s, 1.0f, &y[i1], &y[i2]);
                qt::rope_pair(dy[i1], dy[i2], c, s, -1.0f, &dx[i1], &dx[i2]);
            }
        }
        const std::string sfx = interleaved ? "_interleaved" : "";
        check_close(interleaved ? "rope interleaved y vs complex reference" : "rope y vs transformers",
                    y, f.f32("y" + sfx), 1e-5);
        check_close(interleaved ? "rope interleaved dx" : "rope dx vs torch autograd", dx,
                    f.f32("dx" + sfx), 1e-4);
    }
}

static void check_cross_entropy() {
    const SafeTensors f("tests/fixtures/ops/cross_entropy.safetensors");
    const int n = 13, c = 64, v = 300;
    const float g = 0.7f;  // upstream gradient of the summed loss
    const std::vector<long long> labels = f.i64("labels");
    // lm_head W (V, C): f32, and the Q8_0 bytes decoded by the GPU decoder
    std::vector<float> w_q8(v * c);
    const std::vector<uint8_t> q8 = f.raw("w_q8_0");
    for (int b = 0; b < v * c / 32; ++b) {
        for (int p = 0; p < 4; ++p) qt::decode8_q8_0(&q8[b * qt::Q8_0_BYTES], p, &w_q8[b * 32 + p * 8]);
    }
    const std::vector<float> bias = f.f32("bias");
    const char* cases[] = {"f32", "q8_0", "f32_bias"};
    for (const char* cs : cases) {
        const std::string k = cs;
        const std::vector<float> w = k == "q8_0" ? w_q8 : f.f32("w");
        const std::vector<float> h = f.f32(k + ".h");
        std::vector<float> logits(n * v), dh(n * c, 0.0f);
        double loss = 0.0;
        for (int r = 0; r < n; ++r) {
            float* row = &logits[r * v];
            for (int j = 0; j < v; ++j) {
                double s = 0.0;
                for (int i = 0; i < c; ++i) s += (double)h[r * c + i] * w[j * c + i];
                row[j] = (float)s + (k == "f32_bias" ? bias[j] : 0.0f);
            }
            // the kernel's row reduction: max, then sum of exp, in f32
            float m = -INFINITY, s = 0.0f;
            for (int j = 0; j < v; ++j) m = fmaxf(m, row[j]);
            for (int j = 0; j < v; ++j) s += expf(row[j] - m);
            const float z = m + logf(s);
            if (labels[r] >= 0) loss += z - row[labels[r]];
            for (int j = 0; j < v; ++j) {
                const float dl = qt::ce_grad(row[j], z, g, labels[r], j);
                for (int i = 0; i < c; ++i) dh[r * c + i] += dl * w[j * c + i];
            }
        }
        check_close(("cross-entropy " + k + ": loss vs torch").c_str(), {(float)loss},
                    f.f32(k + ".loss"), 1e-5);
        check_close(("cross-entropy " + k + ": dh vs torch autograd").c_str(), dh,
                    f.f32(k + ".dh"), 1e-4);
    }
}

// SwiGLU has no fixture: its backward is checked against a central difference of its forward.
static void check_swiglu() {
    double worst = 0.0;
    for (int i = -40; i <= 40; ++i) {
        const double gv = i * 0.2, uv = 1.3 - i * 0.05, hstep = 1e-3;
        float dg, du;
        qt::swiglu_bwd((float)gv, (float)uv, 1.0f, &dg, &du);
        const double silu = [](double a) { return a / (1.0 + exp(-a)); }(gv);
        const double fd_g = ((gv + hstep) / (1.0 + exp(-(gv + hstep))) -
                             (gv - hstep) / (1.0 + exp(-(gv - hstep)))) * uv / (2 * hstep);
        worst = fmax(worst, fabs(dg - fd_g) / fmax(1.0, fabs(fd_g)));
        worst = fmax(worst, fabs(du - silu) / fmax(1.0, fabs(silu)));
        worst = fmax(worst, fabs(qt::swiglu((float)gv, (float)uv) - silu * uv) / fmax(1.0, fabs(silu * uv)));
    }
    char line[128];
    snprintf(line, sizeof line, "SwiGLU fwd/bwd vs f64 and central differences: %.2e (tol 1e-5)", worst);
    check(worst < 1e-5, line);
}

int main(int argc, char** argv) {
    g_root = argc > 1 ? argv[1] : ".";
    check_ggml("Q4_0", qt::Q4_0_BYTES, qt::Q4_0_ELEMS, qt::decode8_q4_0);
    check_ggml("Q5_0", qt::Q5_0_BYTES, qt::Q5_0_ELEMS, qt::decode8_q5_0);
    check_ggml("Q8_0", qt::Q8_0_BYTES, qt::Q8_0_ELEMS, qt::decode8_q8_0);
    check_ggml("Q4_K", qt::Q4_K_BYTES, qt::Q4_K_ELEMS, qt::decode8_q4_k);
    check_ggml("Q6_K", qt::Q6_K_BYTES, qt::Q6_K_ELEMS, qt::decode8_q6_k);
    check_dense("F16", true);
    check_dense("BF16", false);
    check_nf4();
    check_rms_norm();
    check_rope();
    check_cross_entropy();
    check_swiglu();
    if (g_failures) {
        printf("%d check(s) FAILED\n", g_failures);
        return 1;
    }
    printf("all host checks passed\n");
    return 0;
}

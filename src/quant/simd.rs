//! SIMD dequantisers (AVX2+FMA, AVX-512, NEON). Each has the same signature as its `scalar`
//! reference and is only reached through `dispatch`, after a run-time CPU feature check.

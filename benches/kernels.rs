//! Kernel benchmarks: memory bandwidth, dequantisation GB/s per type, fused quantised matmul
//! GFLOP/s (forward and input-gradient, f32 and the bf16 kernels), candle's `QMatMul::forward` on the same weights,
//! and the 8-bit-activation decode products (row by row and in the packed decode layout).
//! Results and the exact commands are in docs/BENCHMARKS.md.
//!
//! Run: `cargo bench --bench kernels` (filter with a trailing pattern, e.g. `-- matmul/`).
//! Criterion's "elem/s" on the matmul groups is flop/s (2·M·N·K per call).
#[path = "util/qrand.rs"]
mod qrand;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use half::bf16;
use qrand::{random_weights, Rng, BENCH_TYPES, MATMUL_TYPES};
use qtune::quant::dispatch::dequantize_bf16_staged;
use qtune::quant::matmul::{qmatmul_bwd_input, qmatmul_fwd};
use qtune::quant::matmul_bf16::{
    dp_chains_all, has_bf16_kernels, qmatmul_bwd_input_bf16, qmatmul_fwd_bf16, DP_FLOPS_PER_ITER,
};
use qtune::quant::{dequantize_bf16, dequantize_f32, kernel_name, QData, QMatrix, QType};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Duration;

/// Matmul weight shapes (N, K): Llama-7B attention (4096×4096) and MLP gate/up (11008×4096).
const SHAPES: [(usize, usize); 2] = [(4096, 4096), (11008, 4096)];
/// Activation rows: decode (1), a short sequence (64), a training micro-batch (512).
const MS: [usize; 3] = [1, 64, 512];

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
}

fn bandwidth(c: &mut Criterion) {
    eprintln!(
        "bench: {} rayon threads, qtune kernels: {}",
        rayon::current_num_threads(),
        kernel_name()
    );
    let mut g = c.benchmark_group("bandwidth");
    g.sampling_mode(SamplingMode::Flat);
    // 1 GiB of u64, filled (so every page is really mapped) with non-zero data.
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64)
        .into_par_iter()
        .map(|i| i.wrapping_mul(0x9e37_79b9))
        .collect();
    g.throughput(Throughput::Bytes((words * 8) as u64));
    g.bench_function("read_sum_1GiB", |b| {
        b.iter(|| {
            let s: u64 = buf
                .par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, v| a.wrapping_add(*v)))
                .reduce(|| 0, u64::wrapping_add);
            black_box(s)
        })
    });
    // The same sum with the streaming kernels' software prefetch (`simd::prefetch_ahead`): on a
    // VM whose memory neighbours share, the hardware prefetcher alone understates what the
    // cores can read, and the kernels' "% of read bandwidth" is taken against the faster sum.
    g.bench_function("read_sum_prefetch_1GiB", |b| {
        b.iter(|| {
            let s: u64 = buf
                .par_chunks(1 << 16)
                .map(|c| {
                    c.chunks(8).fold(0u64, |a, line| {
                        qtune::quant::simd::prefetch_ahead(line.as_ptr() as *const u8, 1);
                        line.iter().fold(a, |a, v| a.wrapping_add(*v))
                    })
                })
                .reduce(|| 0, u64::wrapping_add);
            black_box(s)
        })
    });
    drop(buf);
    // Copy 512 MiB -> 512 MiB: throughput counts bytes read plus bytes written (1 GiB).
    let half = words / 2;
    let src: Vec<u64> = (0..half as u64)
        .into_par_iter()
        .map(|i| i ^ 0x5555)
        .collect();
    let mut dst: Vec<u64> = vec![1; half];
    g.throughput(Throughput::Bytes((half * 16) as u64));
    g.bench_function("copy_512MiB", |b| {
        b.iter(|| {
            dst.par_chunks_mut(1 << 16)
                .zip(src.par_chunks(1 << 16))
                .for_each(|(d, s)| d.copy_from_slice(s));
            black_box(dst[half - 1])
        })
    });
    g.finish();
}

/// f32 FMA peak: each thread runs `iters` rounds of 12 independent 16-lane FMA chains (enough to
/// cover FMA latency × pipes); flops = threads × iters × 12 × 16 × 2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains(iters: usize, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    let x = _mm512_set1_ps(seed);
    // Twelve named accumulators (an array here ends up spilled to the stack).
    let (mut c0, mut c1, mut c2, mut c3, mut c4, mut c5) = (x, x, x, x, x, x);
    let (mut c6, mut c7, mut c8, mut c9, mut c10, mut c11) = (x, x, x, x, x, x);
    for _ in 0..iters {
        c0 = _mm512_fmadd_ps(c0, a, b);
        c1 = _mm512_fmadd_ps(c1, a, b);
        c2 = _mm512_fmadd_ps(c2, a, b);
        c3 = _mm512_fmadd_ps(c3, a, b);
        c4 = _mm512_fmadd_ps(c4, a, b);
        c5 = _mm512_fmadd_ps(c5, a, b);
        c6 = _mm512_fmadd_ps(c6, a, b);
        c7 = _mm512_fmadd_ps(c7, a, b);
        c8 = _mm512_fmadd_ps(c8, a, b);
        c9 = _mm512_fmadd_ps(c9, a, b);
        c10 = _mm512_fmadd_ps(c10, a, b);
        c11 = _mm512_fmadd_ps(c11, a, b);
    }
    let s = _mm512_add_ps(
        _mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
        _mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7)),
    );
    let s = _mm512_add_ps(
        s,
        _mm512_add_ps(_mm512_add_ps(c8, c9), _mm512_add_ps(c10, c11)),
    );
    _mm512_reduce_add_ps(s)
}

fn fma_peak(c: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        let threads = rayon::current_num_threads();
        let iters = 1usize << 22;
        let mut g = c.benchmark_group("peak");
        g.sampling_mode(SamplingMode::Flat);
        g.throughput(Throughput::Elements((threads * iters * 12 * 16 * 2) as u64));
        g.bench_function("avx512_fma_f32", |b| {
            b.iter(|| {
                // Plain OS threads, one per core, so both really run at once.
                std::thread::scope(|sc| {
                    let hs: Vec<_> = (0..threads)
                        // SAFETY: AVX-512F detected above.
                        .map(|t| sc.spawn(move || unsafe { fma_chains(iters, t as f32) }))
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).sum::<f32>()
                })
            })
        });
        if let Some(iters) = dp_chains_all(1).map(|_| 1usize << 21) {
            // The bf16 kernels' instruction ceiling (AVX-512 BF16).
            g.throughput(Throughput::Elements(
                (threads * iters * DP_FLOPS_PER_ITER) as u64,
            ));
            g.bench_function("avx512_dpbf16", |b| b.iter(|| dp_chains_all(iters)));
        }
        g.finish();
    }
    #[cfg(target_arch = "aarch64")]
    if let Some(iters) = dp_chains_all(1).map(|_| 1usize << 22) {
        // The BFDOT kernels' instruction ceiling (FEAT_BF16; Arm hardware only, not qemu).
        let threads = rayon::current_num_threads();
        let mut g = c.benchmark_group("peak");
        g.sampling_mode(SamplingMode::Flat);
        g.throughput(Throughput::Elements(
            (threads * iters * DP_FLOPS_PER_ITER) as u64,
        ));
        g.bench_function("neon_bfdot", |b| b.iter(|| dp_chains_all(iters)));
        g.finish();
    }
}

fn dequant(c: &mut Criterion) {
    let mut g = c.benchmark_group("dequant");
    g.sampling_mode(SamplingMode::Flat);
    let mut rng = Rng(11);
    for &t in MATMUL_TYPES {
        // ~64 MB of stored bytes (more than L3), dequantised 64 KiB of f32 at a time into a per-thread
        // L2-resident buffer, as the matmul does: this times the read + unpack, not f32 stores to DRAM.
        let chunk_elems = 16384usize; // a multiple of every block size
        let chunk_bytes = t.bytes_for(chunk_elems).unwrap();
        let nchunks = (64 << 20) / chunk_bytes;
        let src = random_weights(t, nchunks, chunk_elems, &mut rng);
        g.throughput(Throughput::Bytes(src.len() as u64));
        g.bench_function(BenchmarkId::new("2threads_in", t.name()), |b| {
            b.iter(|| {
                src.par_chunks(chunk_bytes).for_each_init(
                    || vec![0f32; chunk_elems],
                    |out, s| {
                        dequantize_f32(t, s, out);
                        black_box(out[0]);
                    },
                )
            })
        });
        g.bench_function(BenchmarkId::new("1thread_in", t.name()), |b| {
            let mut out = vec![0f32; chunk_elems];
            b.iter(|| {
                for s in src.chunks(chunk_bytes) {
                    dequantize_f32(t, s, &mut out);
                    black_box(out[0]);
                }
            })
        });
        // The same into bf16 (the bf16 kernels' tiles), throughput still in stored bytes: the
        // kernels that round in the register, and the f32 kernel staged in L1 then rounded (the
        // path before them, and still F16's).
        let level = qtune::quant::dispatch::active_level();
        for (name, staged) in [
            ("2threads_in_bf16", false),
            ("2threads_in_bf16_staged", true),
        ] {
            g.bench_function(BenchmarkId::new(name, t.name()), |b| {
                b.iter(|| {
                    src.par_chunks(chunk_bytes).for_each_init(
                        || vec![bf16::ZERO; chunk_elems],
                        |out, s| {
                            if staged {
                                dequantize_bf16_staged(t, level, s, out);
                            } else {
                                dequantize_bf16(t, s, out);
                            }
                            black_box(out[0]);
                        },
                    )
                })
            });
        }
    }
    g.finish();
}

/// Dequantisation into bf16 from a 1 GiB source (the bf16 kernels' tiles, 2 threads): larger than
/// any L3 here (an AMX Xeon VM has 300 MiB, where `dequant`'s 64 MB sources stay in L3), so the
/// blocks come from DRAM as `bandwidth/read_sum_1GiB`'s do. Throughput in stored bytes.
fn dequant_dram(c: &mut Criterion) {
    let mut g = c.benchmark_group("dequant_dram");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    let mut rng = Rng(12);
    for t in [QType::Q4_0, QType::Q8_0, QType::Q4_K, QType::Q6_K] {
        let chunk_elems = 16384usize;
        let chunk_bytes = t.bytes_for(chunk_elems).unwrap();
        let src = random_weights(t, (1 << 30) / chunk_bytes, chunk_elems, &mut rng);
        g.throughput(Throughput::Bytes(src.len() as u64));
        g.bench_function(BenchmarkId::new("2threads_in_bf16_1GiB", t.name()), |b| {
            b.iter(|| {
                src.par_chunks(chunk_bytes).for_each_init(
                    || vec![bf16::ZERO; chunk_elems],
                    |out, s| {
                        dequantize_bf16(t, s, out);
                        black_box(out[0]);
                    },
                )
            })
        });
    }
    g.finish();
}

/// NF4 (bitsandbytes' layout, double quant): f32 out, and bf16 out by the table kernel and
/// staged through f32; throughput in stored bytes (codes and 8-bit absmax).
fn dequant_nf4(c: &mut Criterion) {
    let mut g = c.benchmark_group("dequant");
    g.sampling_mode(SamplingMode::Flat);
    // 64M weights: 32 MiB of codes (more than L3), as the ggml cases above.
    let n = 64 << 20;
    let x: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| ((i * 2654435761usize) % 1000003) as f32 / 1000003.0 - 0.5)
        .collect();
    let q = qtune::quant::nf4::quantize_nf4(&x).expect("NF4");
    drop(x);
    let r = q.as_ref();
    let chunk = 16384usize;
    g.throughput(Throughput::Bytes((n / 2 + n / 64) as u64));
    let level = qtune::quant::dispatch::active_level();
    g.bench_function(BenchmarkId::new("2threads_in", "nf4"), |b| {
        b.iter(|| {
            (0..n / chunk).into_par_iter().for_each_init(
                || vec![0f32; chunk],
                |out, i| {
                    r.dequantize(i * chunk, out);
                    black_box(out[0]);
                },
            )
        })
    });
    for (name, staged) in [
        ("2threads_in_bf16", false),
        ("2threads_in_bf16_staged", true),
    ] {
        g.bench_function(BenchmarkId::new(name, "nf4"), |b| {
            b.iter(|| {
                (0..n / chunk).into_par_iter().for_each_init(
                    || vec![bf16::ZERO; chunk],
                    |out, i| {
                        if staged {
                            r.dequantize_bf16_staged(level, i * chunk, out);
                        } else {
                            r.dequantize_bf16(i * chunk, out);
                        }
                        black_box(out[0]);
                    },
                )
            })
        });
    }
    g.finish();
}

fn candle_dtype(t: QType) -> Option<GgmlDType> {
    Some(match t {
        QType::Q4_0 => GgmlDType::Q4_0,
        QType::Q8_0 => GgmlDType::Q8_0,
        QType::Q4_K => GgmlDType::Q4K,
        QType::Q6_K => GgmlDType::Q6K,
        QType::Q5_0 => GgmlDType::Q5_0,
        _ => return None,
    })
}

fn matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul");
    g.sampling_mode(SamplingMode::Flat);
    let mut rng = Rng(5);
    // candle's own comparison is always run for Q4_K too (its dequantiser lives in candle).
    let mut types: Vec<QType> = BENCH_TYPES.to_vec();
    if !types.contains(&QType::Q4_K) {
        types.push(QType::Q4_K);
    }
    for &(n, k) in &SHAPES {
        for &t in &types {
            let bytes = random_weights(t, n, k, &mut rng);
            let w = QMatrix {
                rows: n,
                cols: k,
                data: QData::Ggml {
                    qtype: t,
                    bytes: &bytes,
                },
            };
            let ours = BENCH_TYPES.contains(&t);
            let qm = candle_dtype(t).map(|dt| {
                let qt = qtensor_from_ggml(dt, &bytes, vec![n, k], &Device::Cpu)
                    .expect("candle QTensor");
                QMatMul::from_qtensor(qt).expect("candle QMatMul")
            });
            let dense: Option<Vec<f32>> = (t == types[0]).then(|| rng.vec(n * k));
            for &m in &MS {
                let flops = 2 * m * n * k;
                g.throughput(Throughput::Elements(flops as u64));
                let x = rng.vec(m * k);
                let label = format!("{}/{n}x{k}/M{m}", t.name());
                if ours {
                    let mut y = vec![0f32; m * n];
                    g.bench_function(BenchmarkId::new("qtune_fwd", &label), |b| {
                        b.iter(|| qmatmul_fwd(black_box(&x), m, &w, &mut y))
                    });
                    let dy = rng.vec(m * n);
                    let mut dx = vec![0f32; m * k];
                    g.bench_function(BenchmarkId::new("qtune_bwd_input", &label), |b| {
                        b.iter(|| qmatmul_bwd_input(black_box(&dy), m, &w, &mut dx, false))
                    });
                    if has_bf16_kernels() {
                        // The --dtype bf16 kernels (bf16 products, f32 sums), bf16 activations:
                        // AVX-512 BF16 on x86, BFDOT on aarch64 with FEAT_BF16 (the same case
                        // names; time these on Arm hardware, never under qemu).
                        let xb: Vec<bf16> = x.iter().map(|v| bf16::from_f32(*v)).collect();
                        let dyb: Vec<bf16> = dy.iter().map(|v| bf16::from_f32(*v)).collect();
                        g.bench_function(BenchmarkId::new("qtune_fwd_bf16", &label), |b| {
                            b.iter(|| qmatmul_fwd_bf16(black_box(&xb), m, &w, &mut y))
                        });
                        g.bench_function(BenchmarkId::new("qtune_bwd_input_bf16", &label), |b| {
                            b.iter(|| {
                                qmatmul_bwd_input_bf16(black_box(&dyb), m, &w, &mut dx, false)
                            })
                        });
                    }
                }
                if let Some(wd) = &dense {
                    // Ceiling: the same product on a dense f32 W with gemm's own 2-thread parallelism.
                    let mut y = vec![0f32; m * n];
                    g.bench_function(
                        BenchmarkId::new("dense_f32_gemm", format!("{n}x{k}/M{m}")),
                        |b| {
                            b.iter(|| unsafe {
                                gemm::gemm(
                                    m,
                                    n,
                                    k,
                                    y.as_mut_ptr(),
                                    1,
                                    n as isize,
                                    false,
                                    x.as_ptr(),
                                    1,
                                    k as isize,
                                    wd.as_ptr(),
                                    k as isize,
                                    1,
                                    1.0,
                                    1.0,
                                    false,
                                    false,
                                    false,
                                    gemm::Parallelism::Rayon(rayon::current_num_threads()),
                                )
                            })
                        },
                    );
                }
                if let Some(qm) = &qm {
                    let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap();
                    if ours && m == 64 {
                        // Same work? candle quantises x to 8 bits; report how far its y is from ours
                        // (ours is tested against an f64 reference to ~1e-6).
                        let yc: Vec<f32> = qm
                            .forward(&xt)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap();
                        let mut yo = vec![0f32; m * n];
                        qmatmul_fwd(&x, m, &w, &mut yo);
                        let big = yo.iter().fold(0f32, |a, v| a.max(v.abs()));
                        let diff = yc
                            .iter()
                            .zip(&yo)
                            .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
                        eprintln!(
                            "candle vs qtune {label}: max |dy| / max |y| = {:.2e}",
                            diff / big
                        );
                    }
                    let name = if cfg!(target_feature = "avx2") {
                        "candle_fwd_native"
                    } else {
                        "candle_fwd_default"
                    };
                    g.bench_function(BenchmarkId::new(name, &label), |b| {
                        b.iter(|| qm.forward(black_box(&xt)).unwrap())
                    });
                }
            }
        }
    }
    g.finish();
}

/// Decode products with 8-bit activations on one matrix: row by row (`dot8`) and in
/// the decode layout (`dot8_pack`), one token and an 8-token prompt. Throughput: weight bytes.
fn decode(c: &mut Criterion) {
    use qtune::quant::{dot8::gemv_q8, dot8_pack};
    let mut g = c.benchmark_group("decode");
    g.sampling_mode(SamplingMode::Flat);
    let mut rng = Rng(13);
    // 11008×4096 streams from memory; 512×4096 stays in the two cores' L2 (the kernel's own
    // ceiling, without DRAM).
    for (t, n, k) in [
        (QType::Q4_0, 11008, 4096),
        (QType::Q4_K, 11008, 4096),
        (QType::Q4_0, 512, 4096),
        (QType::Q4_K, 512, 4096),
    ] {
        let wb = random_weights(t, n, k, &mut rng);
        let w = QMatrix {
            rows: n,
            cols: k,
            data: QData::Ggml {
                qtype: t,
                bytes: &wb,
            },
        };
        let packed = dot8_pack::worth_packing()
            .then(|| dot8_pack::Packed::new(&w))
            .flatten();
        g.throughput(Throughput::Bytes(wb.len() as u64));
        for m in [1usize, 8] {
            let x = rng.vec(m * k);
            let mut y = vec![0f32; m * n];
            let label = format!("{}_{n}x{k}_m{m}", t.name());
            g.bench_function(BenchmarkId::new("rows", &label), |b| {
                b.iter(|| gemv_q8(black_box(&x), m, &w, &mut y))
            });
            // Every SIMD group kernel (the scalar reference is far slower and not a contender).
            if let Some(p) = &packed {
                for (name, f) in dot8_pack::group_impls().into_iter().skip(1) {
                    g.bench_function(BenchmarkId::new(format!("packed-{name}"), &label), |b| {
                        b.iter(|| dot8_pack::gemv_packed(black_box(&x), m, p, &mut y, Some(f)))
                    });
                }
            }
        }
    }
    g.finish();
}

/// LoRA's branch `y + s·(x·Aᵀ)·Bᵀ`, forward and backward (`lora_down`, `lora_up_add` and candle's
/// backward over them, as the step runs them), r 16, 256 tokens, f32 activations as a bf16 step's
/// recompute has them: f32 products against bf16 ones. Throughput: flop (6·M·r·(I + O)).
fn lora(c: &mut Criterion) {
    use candle_core::{DType, Var};
    use qtune::nn::fused::{backward_collecting, lora_down, lora_up_add};
    let mut g = c.benchmark_group("lora");
    g.sampling_mode(SamplingMode::Flat);
    let (m, r) = (256usize, 16usize);
    let mut rng = Rng(17);
    // ~100M MLP up (768 → 2048) and Llama-2-7B MLP up (4096 → 11008)
    for (i, o) in [(768usize, 2048usize), (4096, 11008)] {
        let t = |rows: usize, cols: usize, rng: &mut Rng| {
            Tensor::from_vec(rng.vec(rows * cols), (rows, cols), &Device::Cpu).unwrap()
        };
        let (x, y) = (
            Var::from_tensor(&t(m, i, &mut rng)).unwrap(),
            Var::from_tensor(&t(m, o, &mut rng)).unwrap(),
        );
        let bf = |v: Tensor| Var::from_tensor(&v.to_dtype(DType::BF16).unwrap()).unwrap();
        let (a, b) = (bf(t(r, i, &mut rng)), bf(t(o, r, &mut rng)));
        g.throughput(Throughput::Elements((6 * m * r * (i + o)) as u64));
        for bf16 in [false, true] {
            if bf16 && !has_bf16_kernels() {
                continue;
            }
            let label = format!("{i}x{o}_r{r}_m{m}");
            let name = if bf16 {
                "bf16_products"
            } else {
                "f32_products"
            };
            g.bench_function(BenchmarkId::new(name, &label), |bch| {
                bch.iter(|| {
                    let h = lora_down(x.as_tensor(), a.as_tensor(), 2.0, None, bf16).unwrap();
                    let z = lora_up_add(y.as_tensor(), &h, b.as_tensor(), bf16).unwrap();
                    backward_collecting(&z.sum_all().unwrap()).unwrap()
                })
            });
        }
    }
    g.finish();
}

/// A whole activation-sized f32 tensor rounded to bf16 on both threads, as the fused ops return
/// their results (512K values: a ~100M MLP activation of 256 tokens): `half`'s scalar rounding
/// mapped element by element, against the pool's fill then the SIMD rounding (`row_to_bf16`,
/// `vcvtneps2bf16` where the CPU has AVX-512 BF16). Throughput: values.
fn round_to_bf16(c: &mut Criterion) {
    let mut g = c.benchmark_group("round_to_bf16");
    let n = 256 * 2048;
    let v = Rng(23).vec(n);
    let cvt = qtune::quant::simd::f32_to_bf16_fn(qtune::quant::dispatch::active_level());
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("scalar_map", |b| {
        b.iter(|| -> Vec<bf16> {
            v.par_iter()
                .with_min_len(4096)
                .map(|&x| bf16::from_f32(x))
                .collect()
        })
    });
    g.bench_function("fill_then_simd", |b| {
        b.iter(|| {
            let mut o = Vec::with_capacity(n);
            o.par_extend(rayon::iter::repeat_n(bf16::ZERO, n));
            o.par_chunks_mut(4096)
                .zip(v.par_chunks(4096))
                .for_each(|(o, s)| cvt(s, o));
            o
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bandwidth, fma_peak, dequant, dequant_nf4, dequant_dram, matmul, decode, lora,
        round_to_bf16
}
criterion_main!(benches);

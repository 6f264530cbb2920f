//! Every CUDA kernel against the CPU path, on a real GPU (`--features cuda`; see docs/BENCHMARKS.md
//! "CUDA: to run on a GPU"). Without a GPU these tests fail at device creation: they are never
//! part of the default build or of CI, which has no GPU.
//!
//! - dequantisers (NF4, Q4_0, Q5_0, Q8_0, Q4_K, Q6_K, and the F16/BF16/F32 conversions): f32
//!   output bit-identical to the CPU's, bf16 output equal to the CPU value rounded once, on shapes
//!   whose block count leaves a partial group of eight (the kernels' tail path);
//! - the frozen quantised linear (dequantise into the shared scratch + cuBLAS): forward and input
//!   gradient through candle's autograd, f32 (1e-4) and bf16 (1e-2) against the CPU kernels;
//! - RMSNorm, rotary (both layouts), SwiGLU and the cross-entropy rows, forward and backward.
//!
//! Outputs are poisoned (0xff bytes: NaN) before every kernel (`qtune::cuda::POISON_OUTPUTS`), so
//! an element a kernel fails to write fails the comparison; NaN never passes one.
#![cfg(feature = "cuda")]

use candle_core::backend::BackendStorage;
use candle_core::{DType, Device, Module, Storage, Tensor, Var};
use half::{bf16, f16};
use qtune::cuda::{self, GpuWeightCache, Out};
use qtune::lora::QLinear;
use qtune::nn::fused;
use qtune::quant::nf4::quantize_nf4;
use qtune::quant::QType;
use qtune::store::{Bytes, Nf4Stats, StoredTensor};
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn gpu() -> Device {
    cuda::POISON_OUTPUTS.store(true, Ordering::Relaxed);
    Device::new_cuda(0).expect("tests/cuda_kernels.rs needs a CUDA GPU (compute capability >= 8.0)")
}

/// xorshift64*: deterministic random data without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit().max(1e-9), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }
    fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
}

/// Byte offsets of each block's f16 scales (kept finite and modest so outputs compare).
fn f16_fields(t: QType) -> &'static [usize] {
    match t {
        QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => &[0],
        QType::Q4_K => &[0, 2],
        QType::Q6_K => &[208],
        _ => &[],
    }
}

/// A random `(rows, cols)` weight of type `t`: random block bytes with finite scales for the GGUF
/// types (every code pattern), bitsandbytes-exact NF4 of normal values, or dense values.
fn weight(t: QType, rows: usize, cols: usize, rng: &mut Rng) -> Arc<StoredTensor> {
    let n = rows * cols;
    let (data, nf4) = match t {
        QType::NF4 => {
            let q = quantize_nf4(&rng.normals(n)).unwrap();
            let stats = Nf4Stats {
                absmax_q: Bytes::from_vec(q.absmax_q),
                nested_absmax: q.nested_absmax,
                nested_code: q.nested_code,
                code: q.code,
                offset: q.offset,
            };
            (q.packed, Some(stats))
        }
        QType::F32 => (bytemuck::cast_slice(&rng.normals(n)).to_vec(), None),
        QType::F16 => (
            rng.normals(n)
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            None,
        ),
        QType::BF16 => (
            rng.normals(n)
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            None,
        ),
        _ => {
            let ts = t.type_size();
            let mut raw: Vec<u8> = (0..t.bytes_for(n).unwrap())
                .map(|_| rng.next() as u8)
                .collect();
            for b in raw.chunks_exact_mut(ts) {
                for &off in f16_fields(t) {
                    let mag = 10f32.powf(-3.0 + 2.5 * rng.unit());
                    let s = if rng.next() & 1 == 0 { mag } else { -mag };
                    b[off..off + 2].copy_from_slice(&f16::from_f32(s).to_le_bytes());
                }
            }
            (raw, None)
        }
    };
    Arc::new(StoredTensor {
        name: format!("test.{}.weight", t.name()),
        qtype: t,
        shape: vec![rows, cols],
        data: Bytes::from_vec(data),
        nf4,
    })
}

/// The CPU path's f32 values of a weight.
fn cpu_dequant(w: &StoredTensor) -> Vec<f32> {
    let mut v = vec![0f32; w.numel()];
    let m = w.matrix();
    m.dequant_tile(0, m.rows, 0, m.cols, &mut v);
    v
}

const TYPES: [QType; 9] = [
    QType::NF4,
    QType::Q4_0,
    QType::Q5_0,
    QType::Q8_0,
    QType::Q4_K,
    QType::Q6_K,
    QType::F16,
    QType::BF16,
    QType::F32,
];

/// Shapes per type: the first leaves a partial group of eight blocks (13 rows), the second is a
/// multiple of everything.
fn shapes(t: QType) -> [(usize, usize); 2] {
    match t {
        QType::Q4_K | QType::Q6_K => [(13, 768), (64, 1024)],
        QType::NF4 => [(13, 64), (64, 1024)],
        _ => [(13, 96), (64, 1024)],
    }
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |got - want| / max |want|; NaN anywhere is infinite.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let mut diff = 0f64;
    for (a, b) in got.iter().zip(want) {
        let d = (*a as f64 - *b as f64).abs();
        diff = if d.is_nan() {
            f64::INFINITY
        } else {
            diff.max(d)
        };
    }
    assert!(scale > 0.0, "reference is all zeros");
    diff / scale
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(&to_vec(got), &to_vec(want));
    eprintln!("{what}: relative error {e:.2e} (tolerance {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

#[test]
fn dequantisers_match_the_cpu_exactly() {
    let dev = gpu();
    let cdev = dev.as_cuda_device().unwrap();
    let mut rng = Rng(0x5eed);
    for t in TYPES {
        for (rows, cols) in shapes(t) {
            let w = weight(t, rows, cols, &mut rng);
            let want = cpu_dequant(&w);
            let cache = GpuWeightCache::default();
            for out in [Out::F32, Out::Bf16] {
                let s = cuda::dequantize(cdev, &cache, &w, out, true).unwrap();
                let got: Vec<u32> = match out {
                    Out::F32 => cdev
                        .clone_dtoh(s.as_cuda_slice::<f32>().unwrap())
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect(),
                    Out::Bf16 => cdev
                        .clone_dtoh(s.as_cuda_slice::<bf16>().unwrap())
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits() as u32)
                        .collect(),
                };
                let expect: Vec<u32> = match out {
                    Out::F32 => want.iter().map(|v| v.to_bits()).collect(),
                    Out::Bf16 => want
                        .iter()
                        .map(|&v| bf16::from_f32(v).to_bits() as u32)
                        .collect(),
                };
                assert_eq!(got.len(), expect.len());
                let bad = got.iter().zip(&expect).position(|(a, b)| a != b);
                assert!(
                    bad.is_none(),
                    "{} {rows}x{cols} {out:?}: element {bad:?} got {:#x}, CPU {:#x}",
                    t.name(),
                    got[bad.unwrap_or(0)],
                    expect[bad.unwrap_or(0)]
                );
            }
            eprintln!("{} {rows}x{cols}: f32 and bf16 exact", t.name());
        }
    }
}

#[test]
fn quantised_linear_forward_and_input_gradient_match_the_cpu() {
    let dev = gpu();
    let mut rng = Rng(7);
    for t in TYPES {
        let (rows, cols) = shapes(t)[1];
        let w = weight(t, rows, cols, &mut rng);
        let lin = QLinear::new(w, None).unwrap();
        // x (2, 19, K): 38 rows, not a multiple of any tile
        let x = Tensor::from_vec(rng.normals(38 * cols), (2, 19, cols), &Device::Cpu).unwrap();
        let g = Tensor::from_vec(rng.normals(38 * rows), (2, 19, rows), &Device::Cpu).unwrap();
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 1e-2)] {
            // the CPU reference sees the same (rounded) input
            let xc = Var::from_tensor(&x.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap())
                .unwrap();
            let yc = lin.forward(xc.as_tensor()).unwrap();
            let gc = (&yc * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let dxc = gc.get(&xc).unwrap();

            let xg =
                Var::from_tensor(&x.to_dtype(dtype).unwrap().to_device(&dev).unwrap()).unwrap();
            let yg = lin.forward(xg.as_tensor()).unwrap();
            assert_eq!(yg.dtype(), dtype);
            let gg = g.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            let grads = (&yg * &gg).unwrap().sum_all().unwrap().backward().unwrap();
            let dxg = grads.get(&xg).unwrap();
            let what = format!("{} {dtype:?}", t.name());
            assert_close(&format!("{what}: y"), &yg, &yc, tol);
            assert_close(&format!("{what}: dx"), dxg, dxc, tol);
        }
    }
    let cdev = dev.as_cuda_device().unwrap();
    eprintln!(
        "scratch {} bytes; device memory in use {} bytes",
        cuda::scratch_bytes(cdev),
        cuda::device_used_bytes(cdev).unwrap()
    );
}

/// The storage of a contiguous GPU tensor, for calling the launchers directly.
fn with_storage<R>(
    t: &Tensor,
    f: impl FnOnce(&candle_core::CudaStorage, &candle_core::Layout) -> R,
) -> R {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => f(c, l),
        _ => panic!("not a CUDA tensor"),
    }
}

#[test]
fn fused_ops_match_the_cpu() {
    let dev = gpu();
    let mut rng = Rng(11);
    for (dtype, tol_y, tol_g) in [(DType::F32, 1e-5, 1e-4), (DType::BF16, 1e-2, 1e-2)] {
        // RMSNorm (rows 2x7, C 4544: Falcon's width, not a multiple of the block size)
        let c = 4544;
        let x = Tensor::from_vec(rng.normals(14 * c), (2, 7, c), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let w = Tensor::from_vec(rng.normals(c), c, &Device::Cpu).unwrap();
        let dy = Tensor::from_vec(rng.normals(14 * c), (2, 7, c), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let run = |d: &Device| {
            let xv = Var::from_tensor(&x.to_device(d).unwrap()).unwrap();
            let y = fused::rms_norm(xv.as_tensor(), &w, 1e-5).unwrap();
            let gr = (&y * dy.to_device(d).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (y, gr.get(&xv).unwrap().clone())
        };
        let ((yc, dxc), (yg, dxg)) = (run(&Device::Cpu), run(&dev));
        assert_close(&format!("rms_norm {dtype:?} y"), &yg, &yc, tol_y);
        assert_close(&format!("rms_norm {dtype:?} dx"), &dxg, &dxc, tol_g);

        // rotary, both layouts: x (B 2, H 3, T 17, D 128)
        let (t, d) = (17, 128);
        let (cos, sin) = fused::rope_tables(t, d, 10000.0, DType::F32).unwrap();
        let x = Tensor::from_vec(rng.normals(6 * t * d), (2, 3, t, d), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let dy = Tensor::from_vec(rng.normals(6 * t * d), (2, 3, t, d), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        for interleaved in [false, true] {
            let run = |dv: &Device| {
                let xv = Var::from_tensor(&x.to_device(dv).unwrap()).unwrap();
                let y = if interleaved {
                    fused::rope_interleaved(xv.as_tensor(), &cos, &sin)
                } else {
                    fused::rope(xv.as_tensor(), &cos, &sin)
                }
                .unwrap();
                let gr = (&y * dy.to_device(dv).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (y, gr.get(&xv).unwrap().clone())
            };
            let ((yc, dxc), (yg, dxg)) = (run(&Device::Cpu), run(&dev));
            assert_close(
                &format!("rope {dtype:?} interleaved={interleaved} y"),
                &yg,
                &yc,
                tol_y,
            );
            assert_close(
                &format!("rope {dtype:?} interleaved={interleaved} dx"),
                &dxg,
                &dxc,
                tol_g,
            );
        }

        // SwiGLU: h = silu(g)·u and its two gradients, against candle's CPU ops
        let n = 3 * 11008 + 5;
        let g = Tensor::from_vec(rng.normals(n), n, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let u = Tensor::from_vec(rng.normals(n), n, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let dh = Tensor::from_vec(rng.normals(n), n, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let (g32, u32_, dh32) = (
            g.to_dtype(DType::F32).unwrap(),
            u.to_dtype(DType::F32).unwrap(),
            dh.to_dtype(DType::F32).unwrap(),
        );
        let sg = candle_nn::ops::sigmoid(&g32).unwrap();
        let silu = (&g32 * &sg).unwrap();
        let h_ref = (&silu * &u32_).unwrap();
        let one = Tensor::ones_like(&sg).unwrap();
        let dg_ref = (&dh32 * &u32_).unwrap()
            * (&sg * (&one + (&g32 * (&one - &sg).unwrap()).unwrap()).unwrap()).unwrap();
        let dg_ref = dg_ref.unwrap();
        let du_ref = (&dh32 * &silu).unwrap();
        let (gg, ug, dhg) = (
            g.to_device(&dev).unwrap(),
            u.to_device(&dev).unwrap(),
            dh.to_device(&dev).unwrap(),
        );
        let h = with_storage(&gg, |gs, gl| {
            with_storage(&ug, |us, ul| {
                cuda::ops::swiglu_fwd((gs, gl), (us, ul)).unwrap()
            })
        });
        let (dgs, dus) = with_storage(&gg, |gs, gl| {
            with_storage(&ug, |us, ul| {
                with_storage(&dhg, |ds, dl| {
                    cuda::ops::swiglu_bwd((gs, gl), (us, ul), (ds, dl)).unwrap()
                })
            })
        });
        let back = |s: candle_core::CudaStorage| -> Vec<f32> {
            let cdev = dev.as_cuda_device().unwrap();
            match dtype {
                DType::F32 => cdev.clone_dtoh(s.as_cuda_slice::<f32>().unwrap()).unwrap(),
                _ => cdev
                    .clone_dtoh(s.as_cuda_slice::<bf16>().unwrap())
                    .unwrap()
                    .iter()
                    .map(|v| v.to_f32())
                    .collect(),
            }
        };
        for (what, got, want) in [
            ("h", back(h), h_ref),
            ("dg", back(dgs), dg_ref),
            ("du", back(dus), du_ref),
        ] {
            let e = rel_err(&got, &want.to_vec1::<f32>().unwrap());
            eprintln!("swiglu {dtype:?} {what}: relative error {e:.2e}");
            assert!(e <= tol_g, "swiglu {dtype:?} {what}: {e:.3e}");
        }

        // cross-entropy rows: logits (rows 9, V 32003), one ignored label
        let (rows, v) = (9, 32003);
        let labels: Vec<i64> = (0..rows as i64)
            .map(|i| if i == 4 { -100 } else { (i * 7919) % v as i64 })
            .collect();
        let logits = Tensor::from_vec(rng.normals(rows * v), (rows, v), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let l32: Vec<Vec<f32>> = logits.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        let gscale = 0.7f32;
        let lg = logits.to_device(&dev).unwrap();
        let (lse, loss) = with_storage(&lg, |s, l| cuda::ops::ce_fwd((s, l), &labels, v).unwrap());
        let cdev = dev.as_cuda_device().unwrap();
        let (lse_h, loss_h) = (
            cdev.clone_dtoh(&lse).unwrap(),
            cdev.clone_dtoh(&loss).unwrap(),
        );
        let mut dl_ref = Vec::with_capacity(rows * v);
        for (r, row) in l32.iter().enumerate() {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let z = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            assert!(
                (lse_h[r] as f64 - z).abs() < 1e-4 * z.abs().max(1.0),
                "lse row {r}"
            );
            let want_loss = if labels[r] < 0 {
                0.0
            } else {
                z - row[labels[r] as usize] as f64
            };
            assert!(
                (loss_h[r] as f64 - want_loss).abs() < 1e-4 * want_loss.abs().max(1.0),
                "loss row {r}"
            );
            for (j, &x) in row.iter().enumerate() {
                let p = if labels[r] < 0 {
                    0.0
                } else {
                    gscale as f64 * (x as f64 - z).exp()
                };
                dl_ref.push(
                    (if j as i64 == labels[r] {
                        p - gscale as f64
                    } else {
                        p
                    }) as f32,
                );
            }
        }
        let mut s = with_storage(&lg, |s, l| {
            // a private copy to turn into the gradient in place
            let (a, b) = l.contiguous_offsets().unwrap();
            assert_eq!((a, b), (0, rows * v));
            s.try_clone(l).unwrap()
        });
        cuda::ops::ce_grad_in_place(&mut s, &labels, &lse.slice(..), gscale, v).unwrap();
        let e = rel_err(&back(s), &dl_ref);
        eprintln!("cross-entropy {dtype:?} dlogits: relative error {e:.2e}");
        assert!(e <= tol_g, "cross-entropy {dtype:?} dlogits: {e:.3e}");
    }
}

#[test]
fn chunked_cross_entropy_through_a_quantised_lm_head_matches_the_cpu() {
    let dev = gpu();
    let mut rng = Rng(23);
    let (n, c, v) = (21, 256, 1000);
    let labels: Vec<i64> = (0..n as i64)
        .map(|i| {
            if i % 5 == 3 {
                -100
            } else {
                (i * 37) % v as i64
            }
        })
        .collect();
    for t in [QType::Q4_0, QType::NF4, QType::Q6_K] {
        let head = QLinear::new(weight(t, v, c, &mut rng), None).unwrap();
        let h = Tensor::from_vec(rng.normals(n * c), (n, c), &Device::Cpu).unwrap();
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2)] {
            let run = |d: &Device| {
                let hv =
                    Var::from_tensor(&h.to_dtype(dtype).unwrap().to_device(d).unwrap()).unwrap();
                // chunk 8: three chunks, the last partial
                let (loss, count) =
                    fused::cross_entropy_chunked(hv.as_tensor(), &head, &labels, 8).unwrap();
                assert_eq!(count, labels.iter().filter(|&&l| l >= 0).count());
                let gr = (&loss * 0.7).unwrap().backward().unwrap();
                (loss, gr.get(&hv).unwrap().clone())
            };
            let ((lc, dhc), (lg, dhg)) = (run(&Device::Cpu), run(&dev));
            let what = format!("cross-entropy {} {dtype:?}", t.name());
            assert_close(&format!("{what}: loss"), &lg, &lc, tol);
            assert_close(&format!("{what}: dh"), &dhg, &dhc, tol);
        }
    }
}

/// Mean seconds per call of `f` over `iters` calls after 3 warm-ups, the GPU synchronised around.
fn time_gpu(dev: &Device, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    dev.synchronize().unwrap();
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        f();
    }
    dev.synchronize().unwrap();
    t0.elapsed().as_secs_f64() / iters as f64
}

/// Timing, not a check: the frozen quantised linear (dequantise into the scratch + bf16 GEMM) of a
/// Llama-2-7B MLP shape against a dense bf16 matmul of the same shape (the floor it approaches),
/// and the dequantiser alone. Run on a GPU with `--ignored --nocapture`.
#[test]
#[ignore = "timing; run on a GPU with --ignored --nocapture"]
fn speed_of_the_quantised_linear_vs_dense_bf16() {
    let dev = gpu();
    cuda::POISON_OUTPUTS.store(false, Ordering::Relaxed);
    let cdev = dev.as_cuda_device().unwrap();
    let mut rng = Rng(99);
    let (n, k, m) = (11008, 4096, 512);
    let flop = 2.0 * (m * n * k) as f64;
    let x = Tensor::from_vec(rng.normals(m * k), (m, k), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    let dense = Tensor::from_vec(rng.normals(n * k), (n, k), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    let wt = dense.t().unwrap();
    let s = time_gpu(&dev, 20, || {
        x.matmul(&wt).unwrap();
    });
    eprintln!(
        "dense bf16 matmul {m}x{k} . ({n}x{k})T: {:.3} ms, {:.0} TFLOP/s",
        s * 1e3,
        flop / s / 1e12
    );
    for t in [
        QType::NF4,
        QType::Q4_0,
        QType::Q5_0,
        QType::Q8_0,
        QType::Q4_K,
        QType::Q6_K,
    ] {
        let w = weight(t, n, k, &mut rng);
        let stored = w.nbytes();
        let lin = QLinear::new(w.clone(), None).unwrap();
        let s = time_gpu(&dev, 20, || {
            lin.forward(&x).unwrap();
        });
        let cache = GpuWeightCache::default();
        let d = time_gpu(&dev, 20, || {
            cuda::dequantize(cdev, &cache, &w, Out::Bf16, false).unwrap();
        });
        eprintln!(
            "{:5} qlinear fwd: {:.3} ms, {:.0} TFLOP/s; dequantise alone (+ one bf16 copy): {:.3} ms \
             = {:.0} GB/s of blocks in, {:.0} GB/s of bf16 out",
            t.name(),
            s * 1e3,
            flop / s / 1e12,
            d * 1e3,
            stored as f64 / d / 1e9,
            (n * k * 2) as f64 / d / 1e9
        );
    }
}

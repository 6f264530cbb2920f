//! Fused quantised matmul (`qtune::quant::matmul`) against its f64 scalar references, for every type
//! in `MATMUL_TYPES`, and the scratch bound. The references read W through the same
//! `dequant_tile` (whose dequantisers are tested against gguf-py elsewhere), so these tests check the
//! tiling, the `gemm` strides, the GEMV paths and accumulation.
#[path = "../benches/util/qrand.rs"]
mod qrand;

use qrand::{random_weights, Rng, MATMUL_TYPES};
use qtune::quant::matmul::{
    bwd_tiling, fwd_tiling, peak_scratch_bytes, qmatmul_bwd_input, qmatmul_bwd_input_ref,
    qmatmul_fwd, qmatmul_fwd_ref, GEMV_MAX_M, MAX_TILE_K,
};
use qtune::quant::nf4::{quantize_nf4, Nf4Owned};
use qtune::quant::{QData, QMatrix, QType};

// (N, K): N not a multiple of any tile height, K a multiple of 256 (every block size) but not of
// the tile widths; 4864 > MAX_TILE_K (and > GEMV_CHUNK_K) exercises K chunking in the forward pass, and N = 300 exceeds
// the input-gradient tile height for K tiles of 512.
const SHAPES: [(usize, usize); 3] = [(75, 768), (300, 4864), (13, 256)];
const MS: [usize; 4] = [1, 3, 64, 130];

fn mat(t: QType, n: usize, k: usize, bytes: &[u8]) -> QMatrix<'_> {
    QMatrix {
        rows: n,
        cols: k,
        data: QData::Ggml { qtype: t, bytes },
    }
}

/// Max over outputs of |got - want| / sum_k |a_k||b_k| (the f32 error scale of a dot product).
fn worst(got: &[f32], want: &[f32], scale: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .zip(scale)
        .map(|((g, w), s)| (*g as f64 - *w as f64).abs() / s.max(1e-30))
        .fold(0.0, f64::max)
}

const TOL: f64 = 1e-5;

/// Storage behind a test matrix.
enum Owned {
    Ggml(Vec<u8>),
    Nf4(Nf4Owned),
}

#[test]
fn fused_matches_reference() {
    const {
        assert!(
            MAX_TILE_K < 4864 && GEMV_MAX_M >= 3 && GEMV_MAX_M < 64,
            "shapes no longer cover the paths"
        )
    };
    let mut rng = Rng(7);
    let mut max_err = 0f64;
    // Every ggml type, plus NF4 (its statistics live beside the blocks, so it is built by our
    // bitsandbytes-exact quantiser from random values).
    for &t in MATMUL_TYPES.iter().chain(&[QType::NF4]) {
        for &(n, k) in &SHAPES {
            let owned = if t == QType::NF4 {
                Owned::Nf4(quantize_nf4(&rng.vec(n * k)).unwrap())
            } else {
                Owned::Ggml(random_weights(t, n, k, &mut rng))
            };
            let w = match &owned {
                Owned::Ggml(bytes) => mat(t, n, k, bytes),
                Owned::Nf4(q) => QMatrix {
                    rows: n,
                    cols: k,
                    data: QData::Nf4(q.as_ref()),
                },
            };
            let mut wf = vec![0f32; n * k];
            w.dequant_tile(0, n, 0, k, &mut wf);
            let wabs: Vec<f64> = wf.iter().map(|v| v.abs() as f64).collect();
            for &m in &MS {
                // forward
                let x = rng.vec(m * k);
                let mut y = vec![f32::NAN; m * n];
                let mut yr = vec![0f32; m * n];
                qmatmul_fwd(&x, m, &w, &mut y);
                qmatmul_fwd_ref(&x, m, &w, &mut yr);
                let scale: Vec<f64> = (0..m * n)
                    .map(|o| {
                        (0..k)
                            .map(|c| x[o / n * k + c].abs() as f64 * wabs[o % n * k + c])
                            .sum()
                    })
                    .collect();
                let e = worst(&y, &yr, &scale);
                max_err = max_err.max(e);
                assert!(
                    e < TOL,
                    "fwd {} N={n} K={k} M={m}: relative error {e:e}",
                    t.name()
                );

                // input gradient, overwrite and accumulate
                let dy = rng.vec(m * n);
                let scale: Vec<f64> = (0..m * k)
                    .map(|o| {
                        (0..n)
                            .map(|r| dy[o / k * n + r].abs() as f64 * wabs[r * k + o % k])
                            .sum()
                    })
                    .collect();
                for acc in [false, true] {
                    let init = if acc {
                        rng.vec(m * k)
                    } else {
                        vec![f32::NAN; m * k]
                    };
                    let mut dx = init.clone();
                    let mut dxr = if acc { init.clone() } else { vec![0f32; m * k] };
                    qmatmul_bwd_input(&dy, m, &w, &mut dx, acc);
                    qmatmul_bwd_input_ref(&dy, m, &w, &mut dxr, acc);
                    let e = worst(&dx, &dxr, &scale);
                    max_err = max_err.max(e);
                    assert!(
                        e < TOL,
                        "bwd {} N={n} K={k} M={m} acc={acc}: relative error {e:e}",
                        t.name()
                    );
                }
            }
        }
    }
    eprintln!("largest relative error over all cases: {max_err:e} (tolerance {TOL:e})");
}

#[test]
fn reference_is_a_plain_matmul() {
    // The references themselves, on a tiny hand-checkable F32 case: W = [[1,2],[3,4],[5,6]].
    let wb: Vec<u8> = [1f32, 2., 3., 4., 5., 6.]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let w = mat(QType::F32, 3, 2, &wb);
    let mut y = [0f32; 3];
    qmatmul_fwd_ref(&[1., -1.], 1, &w, &mut y);
    assert_eq!(y, [-1., -1., -1.]);
    qmatmul_fwd(&[1., -1.], 1, &w, &mut y);
    assert_eq!(y, [-1., -1., -1.]);
    let mut dx = [10f32, 20.];
    qmatmul_bwd_input_ref(&[1., 0., 2.], 1, &w, &mut dx, true);
    assert_eq!(dx, [21., 34.]);
    let mut dx = [10f32, 20.];
    qmatmul_bwd_input(&[1., 0., 2.], 1, &w, &mut dx, false);
    assert_eq!(dx, [11., 14.]);
}

#[test]
fn scratch_is_bounded() {
    const L2: usize = 2 << 20;
    // Llama-7B MLP shapes: gate/up (11008×4096) and down (4096×11008).
    for (n, k) in [(11008, 4096), (4096, 11008)] {
        for t in [QType::Q4_0, QType::Q8_0, QType::Q4_K, QType::F32] {
            let bytes = vec![0u8; t.bytes_for(n * k).unwrap()];
            let w = mat(t, n, k, &bytes);
            for m in [1, 3, 64, 512, 4096] {
                for tl in [fwd_tiling(&w, m), bwd_tiling(&w, m)] {
                    assert!(
                        tl.scratch_bytes() < L2,
                        "{} {n}×{k} M={m}: {tl:?}",
                        t.name()
                    );
                    assert!(tl.rows * tl.cols < n * k / 8, "tile is not a tile: {tl:?}");
                }
            }
        }
    }
    // And measured: run both kernels on 11008×4096 Q8_0 and read the largest scratch buffer any
    // thread allocated (other tests in this process use smaller shapes).
    let (n, k) = (11008, 4096);
    let mut rng = Rng(3);
    let bytes = random_weights(QType::Q8_0, n, k, &mut rng);
    let w = mat(QType::Q8_0, n, k, &bytes);
    for m in [1, 64] {
        let x = rng.vec(m * k);
        let mut y = vec![0f32; m * n];
        qmatmul_fwd(&x, m, &w, &mut y);
        let mut dx = vec![0f32; m * k];
        qmatmul_bwd_input(&y, m, &w, &mut dx, false);
    }
    let peak = peak_scratch_bytes();
    assert!(
        peak > 0 && peak < L2,
        "peak scratch {peak} bytes per thread"
    );
}

/// The small-M input gradient sums fixed bands of W's rows in order: the same bits on one thread
/// and on three, and from run to run (rayon's own splits, which follow its work stealing, once
/// decided the grouping). The M > 4 tiles own their dx columns whole.
#[test]
fn small_m_input_gradient_does_not_depend_on_the_threads() {
    let mut rng = Rng(11);
    let (n, k) = (300, 768);
    let bytes = random_weights(QType::Q4_0, n, k, &mut rng);
    let w = mat(QType::Q4_0, n, k, &bytes);
    for m in [1, 3] {
        let dy: Vec<f32> = (0..m * n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
            .collect();
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut dx = vec![0f32; m * k];
            pool.install(|| qmatmul_bwd_input(&dy, m, &w, &mut dx, false));
            dx
        };
        let one = on(1);
        for _ in 0..3 {
            assert_eq!(on(3), one, "M = {m}");
        }
    }
}

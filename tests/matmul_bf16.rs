//! The bf16 quantised matmul (`qtune::quant::matmul_bf16`): the AVX-512 BF16 and aarch64 FEAT_BF16
//! (BFDOT, run under qemu: `.ci/aarch64.sh`) kernels against their f64 references on the same bf16-rounded operands (f32 summation tolerance), and against
//! the exact f32 kernels at bf16 tolerance, for every type in `MATMUL_TYPES` and NF4, over shapes
//! with every tail (M not a multiple of 48 or 6, N odd and not a multiple of 8, K tiles).
mod common;
#[path = "../benches/util/qrand.rs"]
mod qrand;

use half::bf16;
use qrand::{random_weights, Rng, MATMUL_TYPES};
use qtune::quant::matmul::{
    qmatmul_bwd_input, qmatmul_bwd_input_ref, qmatmul_fwd, qmatmul_fwd_ref,
};
use qtune::quant::matmul_bf16::{
    bf16_kernel_name, has_bf16_kernels, qmatmul_bwd_input_bf16, qmatmul_bwd_input_bf16_ref,
    qmatmul_fwd_bf16, qmatmul_fwd_bf16_ref,
};
use qtune::quant::nf4::{quantize_nf4, Nf4Owned};
use qtune::quant::{QData, QMatrix, QType};

// (N, K): odd N (pairs padded), N past one 128-row input-gradient chunk, K of 256 and 1280
// (several 256-column tasks, a 1024-element staging chunk and its tail), and K = 208: 104 pairs,
// whose last 8 are past AMX's 16-pair tiles (the AVX-512 micro-tiles add them); N = 517 past
// one 512-row AMX input-gradient chunk and eight 64-row AMX forward tasks.
const SHAPES: [(usize, usize); 5] = [(75, 768), (301, 1280), (13, 256), (37, 208), (517, 256)];
// M: one GEMV-sized (falls back to f32), partial 48-row blocks and 6-row micro-tiles.
const MS: [usize; 4] = [3, 5, 50, 131];

/// The M values to run: under qemu (`QTUNE_QEMU` set, as `.ci/aarch64.sh` does) all but 131, whose
/// f64 references take minutes emulated; 50 still has partial 16- and 48-row blocks and tiles.
fn ms() -> &'static [usize] {
    if std::env::var_os("QTUNE_QEMU").is_some() {
        &MS[..3]
    } else {
        &MS
    }
}

enum Owned {
    Ggml(QType, Vec<u8>),
    Nf4(Nf4Owned),
}

/// Max over outputs of |got - want| / scale (the per-output Σ|a||b|).
fn worst(got: &[f32], want: &[f32], scale: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .zip(scale)
        .map(|((g, w), s)| (*g as f64 - *w as f64).abs() / s.max(1e-30))
        .fold(0.0, f64::max)
}

/// Random weights of type `t`, `n`×`k` (NF4 through our quantiser, the rest as `qrand` makes them).
fn weights(t: QType, n: usize, k: usize, rng: &mut Rng) -> Owned {
    if t == QType::NF4 {
        Owned::Nf4(quantize_nf4(&rng.vec(n * k)).unwrap())
    } else {
        Owned::Ggml(t, random_weights(t, n, k, rng))
    }
}

/// The `QMatrix` view of `owned` (`n`×`k`).
fn matrix(owned: &Owned, n: usize, k: usize) -> QMatrix<'_> {
    match owned {
        Owned::Ggml(t, bytes) => QMatrix {
            rows: n,
            cols: k,
            data: QData::Ggml { qtype: *t, bytes },
        },
        Owned::Nf4(q) => QMatrix {
            rows: n,
            cols: k,
            data: QData::Nf4(q.as_ref()),
        },
    }
}

/// `QTUNE_EXPECT_BF16_KERNEL` (set by `.ci/aarch64.sh`: `neon-bf16` under `qemu -cpu max`, `f32`
/// under `-cpu cortex-a72`) names the kernel this CPU must pick: the run-time dispatch, checked.
#[test]
fn dispatch_picks_the_expected_kernel() {
    let name = bf16_kernel_name();
    eprintln!("bf16 kernels on this CPU: {name}");
    assert_eq!(has_bf16_kernels(), !name.starts_with("f32"), "{name}");
    // The instruction-peak probe (`qtune bench`'s MFU) runs exactly where the kernels do.
    let chains = qtune::quant::matmul_bf16::dp_chains_all(4);
    assert_eq!(chains.is_some(), has_bf16_kernels(), "{name}");
    assert!(chains.is_none_or(f32::is_finite), "{chains:?}");
    // AMX's tile-instruction peak exists exactly where the AMX kernels run.
    #[cfg(target_arch = "x86_64")]
    {
        let amx = qtune::quant::matmul_bf16::measure_amx_peak();
        assert_eq!(amx.is_some(), name.starts_with("amx"), "{name}: {amx:?}");
        assert!(amx.is_none_or(|p| p.is_finite() && p > 0.0), "{amx:?}");
    }
    if let Ok(want) = std::env::var("QTUNE_EXPECT_BF16_KERNEL") {
        assert!(name.starts_with(&want), "kernel {name}, expected {want}");
    }
}

/// Without bf16 kernels (or where the shape does not fit) the bf16 entry points run the exact f32
/// kernels: bit for bit what `qmatmul_fwd` / `qmatmul_bwd_input` give on the same (f32) input.
#[test]
fn fallback_is_the_f32_kernel() {
    let mut rng = Rng(5);
    let (n, k) = (75, 768);
    let owned = weights(QType::Q4_0, n, k, &mut rng);
    let w = matrix(&owned, n, k);
    // m = 3 never fits (GEMV); m = 50 fits only where there are bf16 kernels.
    let ms: &[usize] = if has_bf16_kernels() { &[3] } else { &[3, 50] };
    for &m in ms {
        let x = rng.vec(m * k);
        let (mut got, mut want) = (vec![f32::NAN; m * n], vec![0f32; m * n]);
        qmatmul_fwd_bf16(&x, m, &w, &mut got);
        qmatmul_fwd(&x, m, &w, &mut want);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits()),
            "fwd m={m}"
        );
        let dy = rng.vec(m * n);
        let (mut got, mut want) = (vec![f32::NAN; m * k], vec![0f32; m * k]);
        qmatmul_bwd_input_bf16(&dy, m, &w, &mut got, false);
        qmatmul_bwd_input(&dy, m, &w, &mut want, false);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits()),
            "bwd m={m}"
        );
    }
}

#[test]
fn bf16_kernels_match_their_references() {
    if !has_bf16_kernels() {
        eprintln!(
            "skipped: {} (the f32 kernels run: fallback_is_the_f32_kernel)",
            bf16_kernel_name()
        );
        return;
    }
    eprintln!("bf16 kernels: {}", bf16_kernel_name());
    let mut rng = Rng(11);
    let (mut worst_ref, mut worst_f32) = (0f64, 0f64);
    for &t in MATMUL_TYPES.iter().chain(&[QType::NF4]) {
        for &(n, k) in &SHAPES {
            if k % t.block_size() != 0 {
                continue;
            }
            let owned = weights(t, n, k, &mut rng);
            let w = matrix(&owned, n, k);
            let mut wf = vec![0f32; n * k];
            w.dequant_tile(0, n, 0, k, &mut wf);
            for &m in ms() {
                // forward, f32 and bf16 activations
                let x = rng.vec(m * k);
                let xb: Vec<bf16> = x.iter().map(|v| bf16::from_f32(*v)).collect();
                let scale: Vec<f64> = (0..m * n)
                    .map(|o| {
                        let (i, r) = (o / n, o % n);
                        (0..k)
                            .map(|c| (x[i * k + c] * wf[r * k + c]).abs() as f64)
                            .sum()
                    })
                    .collect();
                let (mut got, mut want, mut exact) =
                    (vec![f32::NAN; m * n], vec![0f32; m * n], vec![0f32; m * n]);
                qmatmul_fwd_bf16(&x, m, &w, &mut got);
                qmatmul_fwd_bf16_ref(&x, m, &w, &mut want);
                qmatmul_fwd_ref(&x, m, &w, &mut exact);
                let (e_ref, e_f32) = (worst(&got, &want, &scale), worst(&got, &exact, &scale));
                let mut got_b = vec![f32::NAN; m * n];
                qmatmul_fwd_bf16(&xb, m, &w, &mut got_b);
                let e_b = worst(&got_b, &want, &scale);
                let label = format!("{} fwd m={m} n={n} k={k}", t.name());
                if m > 4 {
                    assert!(
                        e_ref < 1e-5 && e_b < 1e-5,
                        "{label}: {e_ref:e} / {e_b:e} from the bf16 reference"
                    );
                    worst_ref = worst_ref.max(e_ref).max(e_b);
                } else {
                    // GEMV sizes run the exact f32 kernel.
                    assert!(worst(&got, &exact, &scale) < 1e-5, "{label}: f32 fallback");
                }
                assert!(e_f32 < 1e-2, "{label}: {e_f32:e} from the f32 product");
                worst_f32 = worst_f32.max(e_f32);
                if matches!(t, QType::Q4_0 | QType::Q8_0 | QType::NF4) {
                    worst_ref = worst_ref.max(low_rank_term(&w, (m, n, k), &x, &wf, &mut rng));
                }

                // input gradient, accumulating onto a non-zero dx
                let dy = rng.vec(m * n);
                let base = rng.vec(m * k);
                let scale: Vec<f64> = (0..m * k)
                    .map(|o| {
                        let (i, c) = (o / k, o % k);
                        base[o].abs() as f64
                            + (0..n)
                                .map(|r| (dy[i * n + r] * wf[r * k + c]).abs() as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let (mut got, mut want, mut exact) = (base.clone(), base.clone(), base.clone());
                qmatmul_bwd_input_bf16(&dy, m, &w, &mut got, true);
                qmatmul_bwd_input_bf16_ref(&dy, m, &w, &mut want, true);
                qmatmul_bwd_input_ref(&dy, m, &w, &mut exact, true);
                let (e_ref, e_f32) = (worst(&got, &want, &scale), worst(&got, &exact, &scale));
                let label = format!("{} bwd m={m} n={n} k={k}", t.name());
                if m > 4 {
                    assert!(e_ref < 1e-5, "{label}: {e_ref:e} from the bf16 reference");
                    worst_ref = worst_ref.max(e_ref);
                }
                assert!(e_f32 < 1e-2, "{label}: {e_f32:e} from the f32 product");
                // and overwriting
                let mut got2 = vec![f32::NAN; m * k];
                let mut want2 = vec![0f32; m * k];
                qmatmul_bwd_input_bf16(&dy, m, &w, &mut got2, false);
                qmatmul_bwd_input_bf16_ref(&dy, m, &w, &mut want2, false);
                if m > 4 {
                    assert!(worst(&got2, &want2, &scale) < 1e-5, "{label}: overwrite");
                }
                written_whole(&w, (m, n, k), &x, &dy);
                if matches!(t, QType::Q4_0 | QType::Q8_0 | QType::NF4) {
                    worst_ref = worst_ref.max(low_rank_grad(&w, (m, n, k), &dy, &mut rng));
                }
            }
        }
    }
    eprintln!(
        "worst error: {worst_ref:e} of Σ|terms| from the bf16 reference, {worst_f32:e} from f32"
    );
}

/// The `_into` entry points (outputs written once into uninitialised memory) give the bits of
/// `qmatmul_fwd_bf16` and of the overwriting `qmatmul_bwd_input_bf16` into memory that starts as
/// NaN, every element written; where the tiled kernels do not run (GEMV-sized M) they decline and
/// leave it alone.
fn written_whole(w: &QMatrix, (m, n, k): (usize, usize, usize), x: &[f32], dy: &[f32]) {
    use qtune::quant::matmul_bf16::{qmatmul_bwd_input_bf16_into, qmatmul_fwd_bf16_into, FwdOut};
    use std::mem::MaybeUninit;
    let nan = |len| vec![MaybeUninit::new(f32::NAN); len];
    // SAFETY: every element was initialised (NaN) before the calls.
    let init = |v: Vec<MaybeUninit<f32>>| {
        v.iter()
            .map(|v| unsafe { v.assume_init() })
            .collect::<Vec<f32>>()
    };
    let (mut y, mut dx) = (nan(m * n), nan(m * k));
    let ran = qmatmul_fwd_bf16_into(x, m, w, None, FwdOut::F32(&mut y));
    let ran_b = qmatmul_bwd_input_bf16_into(dy, m, w, &mut dx, None);
    let (y, dx) = (init(y), init(dx));
    let label = format!("_into m={m} n={n} k={k}");
    assert_eq!(
        (ran, ran_b),
        (m > 4, m > 4),
        "{label}: ran where the tiled kernels run"
    );
    let (mut fwd, mut bwd) = (vec![0f32; m * n], vec![0f32; m * k]);
    qmatmul_fwd_bf16(x, m, w, &mut fwd);
    qmatmul_bwd_input_bf16(dy, m, w, &mut bwd, false);
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
    if ran {
        assert!(same(&y, &fwd), "{label}: forward bits");
        assert!(same(&dx, &bwd), "{label}: input gradient bits");
    } else {
        assert!(y.iter().chain(&dx).all(|v| v.is_nan()), "{label}: touched");
    }
}

/// `qmatmul_fwd_bf16_into` with a low-rank term (LoRA's `h·Bᵀ` summed in the product's accumulators, each tile
/// written straight out) against the f64 references of both terms on the same bf16-rounded
/// operands, for ranks 0, below, at and past one 32-wide round (odd ones padded), into f32 and into
/// bf16: the bf16 output is the f32 one rounded, to the bit. Where the tiled kernels do not run
/// (GEMV-sized M) it must decline and leave y alone. Returns the worst error seen.
fn low_rank_term(
    w: &QMatrix,
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    wf: &[f32],
    rng: &mut Rng,
) -> f64 {
    use qtune::quant::matmul_bf16::{low_rank_ref, qmatmul_fwd_bf16_into, FwdOut, LowRank};
    use std::mem::MaybeUninit;
    let mut worst_seen = 0f64;
    for r in [0usize, 1, 5, 16, 40] {
        let (h, b) = (rng.vec(m * r), rng.vec(n * r));
        let lr = LowRank { h: &h, b: &b, r };
        let mut got = vec![MaybeUninit::new(f32::NAN); m * n];
        let mut got_b = vec![MaybeUninit::new(bf16::NAN); m * n];
        let ran = qmatmul_fwd_bf16_into(x, m, w, Some(lr), FwdOut::F32(&mut got));
        let ran_b = qmatmul_fwd_bf16_into(x, m, w, Some(lr), FwdOut::Bf16(&mut got_b));
        // SAFETY: every element was initialised (NaN) before the calls.
        let got: Vec<f32> = got.iter().map(|v| unsafe { v.assume_init() }).collect();
        let got_b: Vec<bf16> = got_b.iter().map(|v| unsafe { v.assume_init() }).collect();
        let label = format!("low rank {r} m={m} n={n} k={k}");
        assert_eq!(ran, ran_b, "{label}");
        if m <= 4 {
            assert!(!ran, "{label}: GEMV sizes decline");
            assert!(got.iter().all(|v| v.is_nan()), "{label}: y touched");
            continue;
        }
        assert!(ran, "{label}: the tiled kernels declined");
        let mut want = vec![0f32; m * n];
        qtune::quant::matmul_bf16::qmatmul_fwd_bf16_ref(x, m, w, &mut want);
        low_rank_ref(lr, m, n, &mut want);
        let scale: Vec<f64> = (0..m * n)
            .map(|o| {
                let (i, j) = (o / n, o % n);
                let xw: f64 = (0..k)
                    .map(|c| (x[i * k + c] * wf[j * k + c]).abs() as f64)
                    .sum();
                let hb: f64 = (0..r)
                    .map(|q| (h[i * r + q] * b[j * r + q]).abs() as f64)
                    .sum();
                xw + hb
            })
            .collect();
        let e = worst(&got, &want, &scale);
        assert!(e < 1e-5, "{label}: {e:e} from the references");
        worst_seen = worst_seen.max(e);
        let rounded = got
            .iter()
            .zip(&got_b)
            .position(|(g, b)| bf16::from_f32(*g).to_bits() != b.to_bits());
        assert_eq!(
            rounded, None,
            "{label}: the bf16 output is not the f32 one rounded"
        );
    }
    worst_seen
}

/// The input gradient's rank-R side: `dh = dy·B` from the same bf16 rows of dy
/// (`LowRankGrad`) against its f64 reference (ranks 0, 1, 5, 16, 40: R under, at and over one
/// 16-column unit), with dx unchanged to the bit beside it; GEMV sizes decline, dh untouched.
fn low_rank_grad(w: &QMatrix, (m, n, k): (usize, usize, usize), dy: &[f32], rng: &mut Rng) -> f64 {
    use qtune::quant::matmul_bf16::{low_rank_grad_ref, qmatmul_bwd_input_bf16_into, LowRankGrad};
    use std::mem::MaybeUninit;
    let nan = |len| vec![MaybeUninit::new(f32::NAN); len];
    // SAFETY: every element was initialised (NaN) before the calls.
    let init = |v: Vec<MaybeUninit<f32>>| -> Vec<f32> {
        v.iter().map(|x| unsafe { x.assume_init() }).collect()
    };
    let mut alone = nan(m * k);
    let ran_alone = qmatmul_bwd_input_bf16_into(dy, m, w, &mut alone, None);
    let alone = init(alone);
    let mut worst_seen = 0f64;
    for r in [0usize, 1, 5, 16, 40] {
        let b = rng.vec(n * r);
        let mut dh = vec![f32::NAN; m * r];
        let mut dx = nan(m * k);
        let lr = LowRankGrad {
            b: &b,
            r,
            dh: &mut dh,
        };
        let ran = qmatmul_bwd_input_bf16_into(dy, m, w, &mut dx, Some(lr));
        let dx = init(dx);
        let label = format!("low rank grad {r} m={m} n={n} k={k}");
        assert_eq!(ran, ran_alone, "{label}");
        if !ran {
            assert!(m <= 4, "{label}: the tiled kernels declined");
            assert!(dh.iter().chain(&dx).all(|v| v.is_nan()), "{label}: touched");
            continue;
        }
        let same = dx
            .iter()
            .zip(&alone)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{label}: dx is not the one without the term");
        let want = low_rank_grad_ref(dy, (m, n), &b, r);
        let scale: Vec<f64> = (0..m * r)
            .map(|o| {
                let (i, q) = (o / r, o % r);
                (0..n)
                    .map(|j| (dy[i * n + j] * b[j * r + q]).abs() as f64)
                    .sum()
            })
            .collect();
        let e = worst(&dh, &want, &scale);
        assert!(e < 1e-5, "{label}: {e:e} from the reference");
        worst_seen = worst_seen.max(e);
    }
    worst_seen
}

/// Alternating timings of the f32 and bf16 kernels at a 7B shape (not a benchmark: run it by hand,
/// `cargo test --release --test matmul_bf16 -- --ignored --nocapture`, on a quiet machine).
#[test]
#[ignore]
fn probe_timings() {
    use qtune::quant::matmul::{qmatmul_bwd_input, qmatmul_fwd};
    use std::time::Instant;
    let mut rng = Rng(3);
    eprintln!(
        "vdpbf16ps peak {:.0} GFLOP/s on {} threads",
        qtune::quant::matmul_bf16::measure_bf16_peak().unwrap_or(0.0),
        rayon::current_num_threads()
    );
    #[cfg(target_arch = "x86_64")]
    eprintln!(
        "AMX tdpbf16ps peak {:?} GFLOP/s",
        qtune::quant::matmul_bf16::measure_amx_peak()
    );
    for (n, k) in [(4096usize, 4096usize), (11008, 4096), (4096, 11008)] {
        let bytes = random_weights(QType::Q4_0, n, k, &mut rng);
        let w = QMatrix {
            rows: n,
            cols: k,
            data: QData::Ggml {
                qtype: QType::Q4_0,
                bytes: &bytes,
            },
        };
        let m = 512;
        let x = rng.vec(m * k);
        let dy = rng.vec(m * n);
        let (mut y, mut dx) = (vec![0f32; m * n], vec![0f32; m * k]);
        let gf = 2.0 * (m * n * k) as f64 / 1e9;
        let mut best = [f64::MAX; 4];
        for _ in 0..3 {
            let t = Instant::now();
            qmatmul_fwd(&x, m, &w, &mut y);
            best[0] = best[0].min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            qmatmul_fwd_bf16(&x, m, &w, &mut y);
            best[1] = best[1].min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            qmatmul_bwd_input(&dy, m, &w, &mut dx, false);
            best[2] = best[2].min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            qmatmul_bwd_input_bf16(&dy, m, &w, &mut dx, false);
            best[3] = best[3].min(t.elapsed().as_secs_f64());
        }
        eprintln!(
            "Q4_0 {n}x{k} M{m}: fwd f32 {:.0} bf16 {:.0} GFLOP/s; bwd f32 {:.0} bf16 {:.0} GFLOP/s",
            gf / best[0],
            gf / best[1],
            gf / best[2],
            gf / best[3]
        );
    }
}

/// On a CPU with AMX the tests above run the AMX kernels; this runs the references test again in
/// a child process with `QTUNE_NO_AMX=1`, so the AVX-512 BF16 micro-kernels are checked too.
#[test]
fn avx512_kernels_without_amx() {
    if !qtune::quant::matmul_bf16::has_amx() {
        eprintln!("no AMX here: the tests above ran the kernels this CPU has");
        return;
    }
    let text = common::rerun_without_amx("bf16_kernels_match_their_references");
    assert!(text.contains("bf16 kernels: avx512-bf16"), "{text}");
}

/// The dense products (`dense_bf16`, the bf16 step's attention) against an f64 reference on the
/// same bf16-rounded operands, packed from row-major f32 by `pack_rows` and `pack_transposed`
/// (which transposes through `quant::transpose`), over shapes with whole AMX tiles and with every
/// edge, writing and accumulating. Under `qemu -cpu max` (`.ci/aarch64.sh`) this runs the BFDOT
/// sweep; where the CPU has no bf16 kernels `dense_bf16` declines and the test says so.
#[test]
fn dense_products_match_f64() {
    use qtune::quant::matmul_bf16::{dense_bf16, pack_rows, pack_transposed, Pairs};
    let mut rng = Rng(7);
    for &(rows, inner, cols) in &[(64usize, 64usize, 64usize), (37, 70, 48), (5, 9, 16)] {
        let pairs = inner.div_ceil(2);
        // out (rows × cols) = x (rows × inner) · yᵀ, y (cols × inner)
        let x = rng.vec(rows * inner);
        let y = rng.vec(cols * inner);
        let (mut a, mut b) = (vec![0u32; rows * pairs], vec![0u32; pairs * (cols + 16)]);
        pack_rows(&x, inner, (rows, inner), &mut a, pairs);
        pack_transposed(&y, inner, (cols, inner), (&mut b, cols + 16), false);
        let r = |v: f32| bf16::from_f32(v).to_f64();
        for accumulate in [false, true] {
            let init = rng.vec(rows * cols);
            let mut got = init.clone();
            let (pa, pb) = (
                Pairs {
                    data: &a,
                    stride: pairs,
                },
                Pairs {
                    data: &b,
                    stride: cols + 16,
                },
            );
            if !dense_bf16(pa, pb, &mut got, cols, (rows, pairs, cols), accumulate) {
                assert!(!has_bf16_kernels());
                eprintln!(
                    "skipped: no bf16 kernels on this CPU ({})",
                    bf16_kernel_name()
                );
                return;
            }
            let mut scale = 0f64;
            let want: Vec<f64> = (0..rows * cols)
                .map(|i| {
                    let (i0, c) = (i / cols, i % cols);
                    let dot: f64 = (0..inner)
                        .map(|k| r(x[i0 * inner + k]) * r(y[c * inner + k]))
                        .sum();
                    scale = scale.max(dot.abs());
                    dot + if accumulate { init[i] as f64 } else { 0.0 }
                })
                .collect();
            let err = got
                .iter()
                .zip(&want)
                .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
            assert!(
                err <= 1e-5 * scale,
                "{rows}×{inner}×{cols} acc {accumulate}: {err:e}"
            );
        }
    }
}

//! LoRA's f32 row products: `dots` (r dot products a row), `axpys` (r scaled rows summed into
//! one) and `rank_update` (a rank-r update of a block of columns), each keeping a block of sums in
//! registers, compiled per instruction set (AVX-512, AVX2 + FMA, portable) by one macro; the
//! parent's f32 products call the set [`prims`] picks.
//
// Row primitives, compiled for AVX-512, for AVX2+FMA and portably; the callers pick one set per
// call. Each keeps a block of sums in registers across the loop that feeds it (the plain loops
// loaded and stored every sum once per product, and read each row of A once per row of x), but
// every sum takes its FMAs in the plain loop's order, so the results are bit for bit the same on
// every instruction set (tested below against the plain loops).

/// Lanes of a dot product's partial sums: lane l sums elements l, l+32, ... of the full chunks.
const DOT_LANES: usize = 32;

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// A dot product from its lanes and the elements past the last full chunk: the lanes summed in
/// order, plus the tail's products (the one summation order every `dots` keeps).
#[inline(always)]
fn lane_sum(lanes: &[f32; DOT_LANES], a_tail: &[f32], b_tail: &[f32]) -> f32 {
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(a, b)| a * b).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `a·b` of one pair of rows.
#[inline(always)]
fn dot_rows<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; DOT_LANES];
    let full = a.len() / DOT_LANES * DOT_LANES;
    for c in (0..full).step_by(DOT_LANES) {
        for l in 0..DOT_LANES {
            acc[l] = madd::<FMA>(a[c + l], b[c + l], acc[l]);
        }
    }
    lane_sum(&acc, &a[full..], &b[full..])
}

/// `out[t·R + k] = s·(x_t·rows_k)` for the rows of `xs` (`out.len() / R` rows of `n`) and the R
/// rows of `rows`, one row of x at a time.
#[inline(always)]
fn dots<const FMA: bool>(xs: &[f32], n: usize, rows: &[f32], s: f32, out: &mut [f32]) {
    let r = rows.len() / n.max(1);
    for (x, out) in xs
        .chunks_exact(n.max(1))
        .zip(out.chunks_exact_mut(r.max(1)))
    {
        for (o, row) in out.iter_mut().zip(rows.chunks_exact(n.max(1))) {
            *o = s * dot_rows::<FMA>(x, row);
        }
    }
}

/// `acc += Σ_k coef[k]·rows_k` (rows of `acc.len()`), 64 columns of acc held across all k.
#[inline(always)]
fn axpys<const FMA: bool>(acc: &mut [f32], coef: &[f32], rows: &[f32]) {
    const CW: usize = 64;
    let n = acc.len();
    let full = n / CW * CW;
    for c0 in (0..full).step_by(CW) {
        let mut a: [f32; CW] = acc[c0..c0 + CW].try_into().expect("chunk");
        for (&c, row) in coef.iter().zip(rows.chunks_exact(n)) {
            let v: &[f32; CW] = row[c0..c0 + CW].try_into().expect("chunk");
            for l in 0..CW {
                a[l] = madd::<FMA>(c, v[l], a[l]);
            }
        }
        acc[c0..c0 + CW].copy_from_slice(&a);
    }
    for (&c, row) in coef.iter().zip(rows.chunks_exact(n.max(1))) {
        for (a, &v) in acc[full..].iter_mut().zip(&row[full..]) {
            *a = madd::<FMA>(c, v, *a);
        }
    }
}

/// `acc (R, w) += coefᵀ·panel`: `acc[k][c] += Σ_i coef[i·R + k]·panel[i·w + c]` over the panel's
/// rows in order, a block of 8 k × `CW` columns held in registers across the rows.
#[inline(always)]
fn rank_update<const FMA: bool, const CW: usize>(
    acc: &mut [f32],
    w: usize,
    coef: &[f32],
    r: usize,
    panel: &[f32],
) {
    const KB: usize = 8;
    let rows = panel.len() / w.max(1);
    for k0 in (0..r).step_by(KB) {
        let kb = KB.min(r - k0);
        for c0 in (0..w).step_by(CW) {
            let cw = CW.min(w - c0);
            if kb == KB && cw == CW {
                let mut a = [[0f32; CW]; KB];
                for (kk, a_k) in a.iter_mut().enumerate() {
                    a_k.copy_from_slice(&acc[(k0 + kk) * w + c0..][..CW]);
                }
                for i in 0..rows {
                    let v: &[f32; CW] = panel[i * w + c0..][..CW].try_into().expect("chunk");
                    for (kk, a_k) in a.iter_mut().enumerate() {
                        let cf = coef[i * r + k0 + kk];
                        for l in 0..CW {
                            a_k[l] = madd::<FMA>(cf, v[l], a_k[l]);
                        }
                    }
                }
                for (kk, a_k) in a.iter().enumerate() {
                    acc[(k0 + kk) * w + c0..][..CW].copy_from_slice(a_k);
                }
            } else {
                for k in k0..k0 + kb {
                    let acc_k = &mut acc[k * w + c0..][..cw];
                    for i in 0..rows {
                        let cf = coef[i * r + k];
                        for (a, &v) in acc_k.iter_mut().zip(&panel[i * w + c0..][..cw]) {
                            *a = madd::<FMA>(cf, v, *a);
                        }
                    }
                }
            }
        }
    }
}

/// The row primitives of one instruction set.
#[derive(Clone, Copy)]
pub(super) struct Prims {
    /// [`dots`] with this set's row block.
    pub(super) dots: fn(&[f32], usize, &[f32], f32, &mut [f32]),
    /// [`axpys`].
    pub(super) axpys: fn(&mut [f32], &[f32], &[f32]),
    /// [`rank_update`] with this set's column block.
    pub(super) rank_update: fn(&mut [f32], usize, &[f32], usize, &[f32]),
    /// Rows of x a `dots` call should get at once (its row block).
    pub(super) xb: usize,
}

/// One instruction set's primitives: the generic bodies compiled with its features enabled.
macro_rules! isa_prims {
    ($name:ident, $features:literal, dots = $dots:path, xb = $xb:literal, cw = $cw:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            #[target_feature(enable = $features)]
            unsafe fn dots(xs: &[f32], n: usize, rows: &[f32], s: f32, out: &mut [f32]) {
                $dots(xs, n, rows, s, out)
            }

            #[target_feature(enable = $features)]
            unsafe fn axpys(acc: &mut [f32], coef: &[f32], rows: &[f32]) {
                super::axpys::<true>(acc, coef, rows)
            }

            #[target_feature(enable = $features)]
            unsafe fn rank_update(acc: &mut [f32], w: usize, coef: &[f32], r: usize, p: &[f32]) {
                super::rank_update::<true, $cw>(acc, w, coef, r, p)
            }

            /// These primitives; `None` where the CPU lacks the features.
            pub(super) fn prims() -> Option<super::Prims> {
                let has = $features.split(',').all(|f| match f {
                    "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
                    "avx2" => std::arch::is_x86_feature_detected!("avx2"),
                    "fma" => std::arch::is_x86_feature_detected!("fma"),
                    _ => false,
                });
                has.then_some(super::Prims {
                    // SAFETY: returned only where `has` saw every feature these are compiled for.
                    dots: |xs, n, rows, s, out| unsafe { dots(xs, n, rows, s, out) },
                    // SAFETY: as for `dots`.
                    axpys: |acc, coef, rows| unsafe { axpys(acc, coef, rows) },
                    // SAFETY: as for `dots`.
                    rank_update: |acc, w, coef, r, p| unsafe { rank_update(acc, w, coef, r, p) },
                    xb: $xb,
                })
            }
        }
    };
}

// AVX-512: 4 rows' dot lanes in 8 zmm, 8 × 16 sums in 8 zmm; AVX2: one row, 8 × 8 sums in 8 ymm.
isa_prims!(
    avx512,
    "avx512f,avx2,fma",
    dots = super::dots_avx512,
    xb = 4,
    cw = 16
);
isa_prims!(avx2, "avx2,fma", dots = super::dots::<true>, xb = 1, cw = 8);

/// [`dots`] on AVX-512, four rows of x at a time (each chunk of row k loaded once for the four),
/// each dot's 32 lanes in two zmm, finished by [`lane_sum`]. (A generic four-row block loop
/// stayed scalar: LLVM kept its 4 × 32 sums on the stack.)
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dots_avx512(xs: &[f32], n: usize, rows: &[f32], s: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    const XB: usize = 4;
    let r = rows.len() / n.max(1);
    let nx = out.len() / r.max(1);
    let full = n / DOT_LANES * DOT_LANES;
    let mut t0 = 0;
    while t0 + XB <= nx {
        // Row t of this block of x; every read below stays inside xs[.. nx·n] and rows[.. r·n]
        // (c + 32 <= full <= n).
        let x = |t: usize| xs.as_ptr().add((t0 + t) * n);
        for k in 0..r {
            let row = rows.as_ptr().add(k * n);
            let mut acc = [[_mm512_setzero_ps(); 2]; XB];
            for c in (0..full).step_by(DOT_LANES) {
                let (b0, b1) = (
                    _mm512_loadu_ps(row.add(c)),
                    _mm512_loadu_ps(row.add(c + 16)),
                );
                for (t, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(x(t).add(c)), b0, a[0]);
                    a[1] = _mm512_fmadd_ps(_mm512_loadu_ps(x(t).add(c + 16)), b1, a[1]);
                }
            }
            for (t, a) in acc.iter().enumerate() {
                let mut lanes = [0f32; DOT_LANES];
                _mm512_storeu_ps(lanes.as_mut_ptr(), a[0]);
                _mm512_storeu_ps(lanes.as_mut_ptr().add(16), a[1]);
                let xt = &xs[(t0 + t) * n + full..(t0 + t + 1) * n];
                let dot = lane_sum(&lanes, xt, &rows[k * n + full..(k + 1) * n]);
                out[(t0 + t) * r + k] = s * dot;
            }
        }
        t0 += XB;
    }
    dots::<true>(&xs[t0 * n..nx * n], n, rows, s, &mut out[t0 * r..nx * r]);
}

/// The best primitives this CPU runs.
pub(super) fn prims() -> Prims {
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = avx512::prims().or_else(avx2::prims) {
        return p;
    }
    Prims {
        dots: dots::<false>,
        axpys: axpys::<false>,
        rank_update: rank_update::<false, 8>,
        xb: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain loops the blocked primitives replace (one product of one row at a time).
    fn plain_dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
        let full = a.len() / DOT_LANES * DOT_LANES;
        let tail: f32 = a[full..].iter().zip(&b[full..]).map(|(x, y)| x * y).sum();
        let mut acc = [0f32; DOT_LANES];
        for c in (0..full).step_by(DOT_LANES) {
            for l in 0..DOT_LANES {
                acc[l] = madd::<FMA>(a[c + l], b[c + l], acc[l]);
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    fn plain_axpy<const FMA: bool>(acc: &mut [f32], c: f32, row: &[f32]) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a = madd::<FMA>(c, v, *a);
        }
    }

    fn check<const FMA: bool>(p: Prims, name: &str) {
        let mut rng = crate::rng::SplitMix64(7);
        let mut vec = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
                .collect()
        };
        // n past a multiple of the lanes and of 64; r past a multiple of 8; rows past xb and SLAB.
        for (m, n, r) in [(7, 203, 13), (9, 256, 16), (70, 96, 8), (3, 40, 1)] {
            let (x, mat, coef) = (vec(m * n), vec(r * n), vec(m * r));
            let mut got = vec![0f32; m * r];
            (p.dots)(&x, n, &mat, 0.5, &mut got);
            for t in 0..m {
                for k in 0..r {
                    let want = 0.5 * plain_dot::<FMA>(&x[t * n..][..n], &mat[k * n..][..n]);
                    assert_eq!(
                        got[t * r + k].to_bits(),
                        want.to_bits(),
                        "{name} dots {m}x{n}x{r}"
                    );
                }
            }
            let mut got = vec(n);
            let mut want = got.clone();
            (p.axpys)(&mut got, &coef[..r], &mat);
            for k in 0..r {
                plain_axpy::<FMA>(&mut want, coef[k], &mat[k * n..][..n]);
            }
            assert_eq!(got, want, "{name} axpys {n}x{r}");
            let mut got = vec(r * n);
            let mut want = got.clone();
            // Slabs of 5 rows: the sums run on across calls, as outer_sum's do across SLABs.
            for i0 in (0..m).step_by(5) {
                let rows = 5.min(m - i0);
                let panel = &x[i0 * n..(i0 + rows) * n];
                (p.rank_update)(&mut got, n, &coef[i0 * r..(i0 + rows) * r], r, panel);
                for i in i0..i0 + rows {
                    for k in 0..r {
                        plain_axpy::<FMA>(
                            &mut want[k * n..][..n],
                            coef[i * r + k],
                            &x[i * n..][..n],
                        );
                    }
                }
            }
            assert_eq!(got, want, "{name} rank_update {m}x{n}x{r}");
        }
    }

    #[test]
    fn blocked_primitives_equal_the_plain_loops_bit_for_bit() {
        check::<false>(
            Prims {
                dots: dots::<false>,
                axpys: axpys::<false>,
                rank_update: rank_update::<false, 8>,
                xb: 1,
            },
            "portable",
        );
        #[cfg(target_arch = "x86_64")]
        for (p, name) in [(avx512::prims(), "avx512"), (avx2::prims(), "avx2")] {
            if let Some(p) = p {
                check::<true>(p, name);
            }
        }
    }
}

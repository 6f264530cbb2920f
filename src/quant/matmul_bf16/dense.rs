//! Dense bf16 products on the quantised products' micro-kernels (AMX tiles, AVX-512 BF16,
//! FEAT_BF16): `out (+)= a · b` for operands already in bf16 pairs, single-threaded (the caller
//! parallelises). The bf16 step's attention runs its block products here.
//!
//! Layouts, as [`super::Sweep`] reads them: `a` holds rows of pairs along the contraction
//! (`a[r][q]` = elements 2q, 2q+1 of row r: a row-major bf16 matrix seen as u32), `b` holds pairs
//! of contraction rows per column (`b[q][c]` = rows 2q, 2q+1 of column c: the VNNI layout).
use super::Activation;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use super::{Bf16Kernels, Sweep};
use crate::quant::matmul::with_thread_buffer;
use half::bf16;

/// A matrix of bf16 pairs (u32) at row stride `stride`.
#[derive(Clone, Copy)]
pub struct Pairs<'a> {
    /// The elements, row after row.
    pub data: &'a [u32],
    /// u32 from one row to the next.
    pub stride: usize,
}

/// `out (rows × cols at row stride out_stride) (+)= a (rows × pairs) · b (pairs × cols)` with
/// bf16 products and f32 sums, adding to `out` when `accumulate`; `cols` a multiple of 16. Returns
/// false, `out` untouched, where this CPU has no bf16 kernels ([`super::has_bf16_kernels`]).
pub fn dense_bf16(
    a: Pairs,
    b: Pairs,
    out: &mut [f32],
    out_stride: usize,
    (rows, pairs, cols): (usize, usize, usize),
    accumulate: bool,
) -> bool {
    if !super::has_bf16_kernels() {
        return false;
    }
    assert!(
        cols.is_multiple_of(16),
        "dense_bf16: {cols} columns, not a multiple of 16"
    );
    if rows == 0 || cols == 0 {
        return true;
    }
    if pairs == 0 {
        if !accumulate {
            (0..rows).for_each(|r| out[r * out_stride..][..cols].fill(0.0));
        }
        return true;
    }
    use crate::quant::transpose::holds;
    let fits = |m: Pairs, r: usize, c: usize| holds(m.data.len(), m.stride, (r, c));
    assert!(fits(a, rows, pairs), "dense_bf16: a out of bounds");
    assert!(fits(b, pairs, cols), "dense_bf16: b out of bounds");
    assert!(
        holds(out.len(), out_stride, (rows, cols)),
        "dense_bf16: out out of bounds"
    );
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        let s = Sweep {
            rows,
            pairs,
            a: a.data.as_ptr(),
            a_stride: a.stride,
            b: b.data.as_ptr(),
            b_stride: b.stride,
            cols,
            out: out.as_mut_ptr(),
            out_stride,
            load: accumulate,
        };
        return_on_bf16_kernels!(K => {
            // SAFETY: the macro checked K's features; the asserts above keep every element the
            // sweep names inside a, b and out, and out is borrowed mutably.
            unsafe { K::sweep(s, K::BWD_MR) };
            true
        });
        unreachable!("has_bf16_kernels was true")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (a, b, out, out_stride, accumulate);
        unreachable!("has_bf16_kernels is false off x86-64 and aarch64")
    }
}

/// `pairs` of contraction rounded up to what [`dense_bf16`] takes whole: 16 (an AMX tile) where
/// this CPU has AMX, whose sweep hands a partial tile's pairs to the AVX-512 edge kernel; as given
/// elsewhere. Operands zero-padded to it give the same products.
pub fn padded_pairs(pairs: usize) -> usize {
    match super::has_amx() {
        true => pairs.next_multiple_of(16),
        false => pairs,
    }
}

std::thread_local! {
    /// Staging rows and transposes of the packers below.
    static STAGE: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `a` operand of a row-major matrix `src` (f32 or bf16, `rows × cols` at row stride `stride`):
/// `dst[r][q] = (src[r][2q], src[r][2q+1])` rounded to bf16 for `q < cols.div_ceil(2)` (an odd
/// last column paired with 0), rows at `dst_stride`.
pub fn pack_rows<A: Activation>(
    src: &[A],
    stride: usize,
    (rows, cols): (usize, usize),
    dst: &mut [u32],
    dst_stride: usize,
) {
    let half = cols.div_ceil(2);
    for r in 0..rows {
        let d: &mut [bf16] = bytemuck::cast_slice_mut(&mut dst[r * dst_stride..][..half]);
        A::row_to_bf16(&src[r * stride..][..cols], &mut d[..cols]);
        if cols % 2 == 1 {
            d[cols] = bf16::ZERO;
        }
    }
}

/// `b` operand of `src` (`rows × cols`): `dst[q][c] = (src[2q][c], src[2q+1][c])` for
/// `q < rows.div_ceil(2)` (an odd last row paired with 0), rows of `dst` at `dst_stride`.
pub fn pack_row_pairs<A: Activation>(
    src: &[A],
    stride: usize,
    (rows, cols): (usize, usize),
    dst: &mut [u32],
    dst_stride: usize,
) {
    let level = crate::quant::dispatch::active_level();
    // f32 rows where one pass rounds and pairs them (LoRA's dA and dB: 3.7 % of a ~100M bf16
    // step's samples went to rounding rows into a stage and pairing it, session 26): every whole
    // pair, the stage then taking an odd last row only
    let done = match (A::as_f32(src), crate::quant::simd::pair_rows_fn(level)) {
        (Some(x), Some(pair)) => {
            for q in 0..rows / 2 {
                let (lo, hi) = (
                    &x[2 * q * stride..][..cols],
                    &x[(2 * q + 1) * stride..][..cols],
                );
                pair(lo, hi, &mut dst[q * dst_stride..][..cols]);
            }
            rows / 2
        }
        _ => 0,
    };
    if done == rows.div_ceil(2) {
        return;
    }
    with_thread_buffer(&STAGE, cols, usize::MAX, |stage| {
        // both rows of a pair rounded into one staging row (lo in the first half of its bytes)
        let stage: &mut [bf16] = bytemuck::cast_slice_mut(stage);
        let (lo, hi) = stage.split_at_mut(cols);
        for q in done..rows.div_ceil(2) {
            A::row_to_bf16(&src[2 * q * stride..][..cols], lo);
            if 2 * q + 1 < rows {
                A::row_to_bf16(&src[(2 * q + 1) * stride..][..cols], hi);
            } else {
                hi.fill(bf16::ZERO);
            }
            let d = &mut dst[q * dst_stride..][..cols];
            for ((o, &l), &h) in d.iter_mut().zip(&*lo).zip(&*hi) {
                *o = super::pair(l, h);
            }
        }
    })
}

/// Interleaves rows 2q and 2q+1 of the bf16 chunk `src` (`nr` rows × `kc`) into pairs
/// `dst[q][c]` (an odd last row is paired with zero): a shift and an or, which the compiler
/// vectorises.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(super) fn interleave_rows(src: &[bf16], nr: usize, kc: usize, dst: &mut [u32]) {
    for q in 0..nr.div_ceil(2) {
        let lo = &src[2 * q * kc..][..kc];
        let out = &mut dst[q * kc..][..kc];
        if 2 * q + 1 < nr {
            let hi = &src[(2 * q + 1) * kc..][..kc];
            for ((o, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
                *o = super::pair(l, h);
            }
        } else {
            for (o, &l) in out.iter_mut().zip(lo) {
                *o = super::pair(l, bf16::ZERO);
            }
        }
    }
}

/// An operand of `srcᵀ` (`src` is `rows × cols`), by the packers above and a transpose: with
/// `rows_paired` the `a` operand `dst[c][q] = (src[2q][c], src[2q+1][c])` (`c < cols`,
/// `q < rows.div_ceil(2)`), else the `b` operand `dst[q][r] = (src[r][2q], src[r][2q+1])`
/// (`q < cols.div_ceil(2)`, `r < rows`); an odd count paired with 0.
pub fn pack_transposed<A: Activation>(
    src: &[A],
    stride: usize,
    (rows, cols): (usize, usize),
    dst: (&mut [u32], usize),
    rows_paired: bool,
) {
    let staged = match rows_paired {
        true => rows.div_ceil(2) * cols,
        false => rows * cols.div_ceil(2),
    };
    pack_transposed_via(
        src,
        stride,
        (rows, cols),
        dst,
        rows_paired,
        &mut vec![0u32; staged],
    );
}

/// [`pack_transposed`], staged in `staged` (a buffer the caller keeps; at least the packed
/// operand's size before its transpose).
pub fn pack_transposed_via<A: Activation>(
    src: &[A],
    stride: usize,
    (rows, cols): (usize, usize),
    (dst, dst_stride): (&mut [u32], usize),
    rows_paired: bool,
    staged: &mut [u32],
) {
    type Packer<A> = fn(&[A], usize, (usize, usize), &mut [u32], usize);
    let (r, c, pack): (usize, usize, Packer<A>) = match rows_paired {
        true => (rows.div_ceil(2), cols, pack_row_pairs),
        false => (rows, cols.div_ceil(2), pack_rows),
    };
    let staged = &mut staged[..r * c];
    pack(src, stride, (rows, cols), staged, c);
    crate::quant::transpose::transpose(staged, c, (r, c), dst, dst_stride);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scalar reference of [`dense_bf16`] (f64 sums of the same bf16 products), for tests.
    fn dense_bf16_ref(
        a: Pairs,
        b: Pairs,
        out: &mut [f32],
        out_stride: usize,
        (rows, pairs, cols): (usize, usize, usize),
        accumulate: bool,
    ) {
        let half = |p: u32, hi: bool| bf16::from_bits(if hi { (p >> 16) as u16 } else { p as u16 });
        for r in 0..rows {
            for c in 0..cols {
                let mut s = if accumulate {
                    out[r * out_stride + c] as f64
                } else {
                    0.0
                };
                for q in 0..pairs {
                    let (x, y) = (a.data[r * a.stride + q], b.data[q * b.stride + c]);
                    for hi in [false, true] {
                        s += half(x, hi).to_f64() * half(y, hi).to_f64();
                    }
                }
                out[r * out_stride + c] = s as f32;
            }
        }
    }

    /// Deterministic values in (-2, 2) with full bf16 mantissas.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The kernels against the f64 reference over shapes with whole AMX tiles and with edges
    /// (rows and pairs past a multiple of 16, strides wider than the operands), both writing and
    /// accumulating; packed through the four packers from row-major f32.
    #[test]
    fn dense_products_equal_the_reference() {
        let shapes: [(usize, usize, usize); 4] =
            [(64, 64, 64), (37, 70, 48), (16, 32, 16), (5, 9, 32)];
        for &(rows, inner, cols) in &shapes {
            let pairs = inner.div_ceil(2);
            // a (rows × inner) row-major; b given as bᵀ (cols × inner) to use the transposed packers too
            let (x, y) = (values(rows * inner, 1), values(cols * inner, 2));
            let (mut a, mut b) = (
                vec![0u32; rows * (pairs + 3)],
                vec![0u32; pairs * (cols + 16)],
            );
            pack_rows(&x, inner, (rows, inner), &mut a, pairs + 3);
            pack_transposed(&y, inner, (cols, inner), (&mut b, cols + 16), false);
            // the same operands through the other two packers: xᵀ's column pairs are x's rows,
            // yᵀ's row pairs are pack_pairs_t's
            let mut a2 = vec![0u32; rows * pairs];
            let xt: Vec<f32> = (0..inner * rows)
                .map(|i| x[(i % rows) * inner + i / rows])
                .collect();
            pack_transposed(&xt, rows, (inner, rows), (&mut a2, pairs), true);
            let mut b2 = vec![0u32; pairs * cols];
            let yt: Vec<f32> = (0..inner * cols)
                .map(|i| y[(i % cols) * inner + i / cols])
                .collect();
            pack_row_pairs(&yt, cols, (inner, cols), &mut b2, cols);
            for r in 0..rows {
                assert_eq!(a[r * (pairs + 3)..][..pairs], a2[r * pairs..][..pairs]);
            }
            for q in 0..pairs {
                assert_eq!(b[q * (cols + 16)..][..cols], b2[q * cols..][..cols]);
            }
            for accumulate in [false, true] {
                let init = values(rows * (cols + 8), 3);
                let (mut got, mut want) = (init.clone(), init);
                let (pa, pb) = (
                    Pairs {
                        data: &a,
                        stride: pairs + 3,
                    },
                    Pairs {
                        data: &b,
                        stride: cols + 16,
                    },
                );
                let dims = (rows, pairs, cols);
                if !dense_bf16(pa, pb, &mut got, cols + 8, dims, accumulate) {
                    return; // no bf16 kernels on this CPU: nothing to check
                }
                dense_bf16_ref(pa, pb, &mut want, cols + 8, dims, accumulate);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * scale,
                        "{rows}×{inner}×{cols} acc {accumulate}: [{i}] {g} vs {w}"
                    );
                }
            }
        }
    }

    /// `pack_row_pairs` from f32 rows (the one-pass rounding where this CPU has it) and from the
    /// same rows in bf16 equal the definition: odd and even row counts, columns off a multiple of
    /// 16, strides wider than the rows, and a subnormal among the values (its vector is rounded
    /// apart); the padding past `cols` is left as it was.
    #[test]
    fn row_pairs_equal_the_definition() {
        for (rows, cols) in [(7, 37), (8, 64), (1, 16), (12, 5)] {
            let (stride, dst_stride) = (cols + 3, cols + 5);
            let mut x = values(rows * stride, 11);
            x[(rows / 2) * stride + 2] = f32::from_bits(0x0000_8001); // a subnormal
            let half: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let at = |r: usize, c: usize| match r < rows {
                true => half[r * stride + c].to_bits() as u32,
                false => 0,
            };
            let want: Vec<u32> = (0..rows.div_ceil(2) * dst_stride)
                .map(|i| match (i / dst_stride, i % dst_stride) {
                    (q, c) if c < cols => at(2 * q, c) | (at(2 * q + 1, c) << 16),
                    _ => 7,
                })
                .collect();
            let mut got = vec![7u32; want.len()];
            pack_row_pairs(&x, stride, (rows, cols), &mut got, dst_stride);
            assert_eq!(got, want, "f32 rows {rows}×{cols}");
            let mut got = vec![7u32; want.len()];
            pack_row_pairs(&half, stride, (rows, cols), &mut got, dst_stride);
            assert_eq!(got, want, "bf16 rows {rows}×{cols}");
        }
    }
}

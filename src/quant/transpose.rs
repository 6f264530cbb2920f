//! Transposes of 32-bit matrices (f32 tiles, bf16 pairs): 16 × 16 blocks in AVX-512 registers
//! where the CPU has them, 8 × 8 blocks of scalar moves elsewhere and at the edges. The bf16
//! forward kernel writes each y tile out transposed (one scalar move an element was 5.7 % of a
//! ~100M bf16 step, session 14), and the dense products' packers transpose their operands.

/// `dst[c][r] = src[r][c]` for a `rows × cols` matrix of 32-bit values (strides `ss`, `ds`), the
/// safe form of [`transpose32`].
pub(crate) fn transpose(
    src: &[u32],
    ss: usize,
    (rows, cols): (usize, usize),
    dst: &mut [u32],
    ds: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        holds(src.len(), ss, (rows, cols)),
        "transpose: src out of bounds"
    );
    assert!(
        holds(dst.len(), ds, (cols, rows)),
        "transpose: dst out of bounds"
    );
    // SAFETY: the asserts keep both matrices inside their slices; dst is borrowed mutably.
    unsafe { transpose32(src.as_ptr(), ss, (rows, cols), dst.as_mut_ptr(), ds) }
}

/// Whether a slice of `len` elements holds a `rows × cols` matrix whose rows lie `stride` apart
/// (the bounds check of every strided kernel wrapper).
pub(crate) fn holds(len: usize, stride: usize, (rows, cols): (usize, usize)) -> bool {
    rows == 0 || cols == 0 || (cols <= stride && len >= (rows - 1) * stride + cols)
}

/// `dst[c·ds + r] = src[r·ss + c]` for `r < rows`, `c < cols`.
///
/// # Safety
/// `src` and `dst` address those elements (`src` readable, `dst` writable) and do not overlap;
/// no other thread touches the elements of `dst` written.
pub(crate) unsafe fn transpose32(
    src: *const u32,
    ss: usize,
    (rows, cols): (usize, usize),
    dst: *mut u32,
    ds: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let (rb, cb) = (rows / 16 * 16, cols / 16 * 16);
        for r0 in (0..rb).step_by(16) {
            for c0 in (0..cb).step_by(16) {
                x86::block16(src.add(r0 * ss + c0), ss, dst.add(c0 * ds + r0), ds);
            }
        }
        // the columns past the last whole block for the block rows, then the rows past them
        scalar(src.add(cb), ss, (rb, cols - cb), dst.add(cb * ds), ds);
        scalar(src.add(rb * ss), ss, (rows - rb, cols), dst.add(rb), ds);
        return;
    }
    scalar(src, ss, (rows, cols), dst, ds)
}

/// [`transpose32`] as 8 × 8 blocks of scalar moves (the reference, and the edges).
///
/// # Safety
/// As [`transpose32`].
unsafe fn scalar(
    src: *const u32,
    ss: usize,
    (rows, cols): (usize, usize),
    dst: *mut u32,
    ds: usize,
) {
    for r0 in (0..rows).step_by(8) {
        for c0 in (0..cols).step_by(8) {
            for r in r0..(r0 + 8).min(rows) {
                for c in c0..(c0 + 8).min(cols) {
                    *dst.add(c * ds + r) = *src.add(r * ss + c);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// One 16 × 16 block: 32-bit then 64-bit interleaves within 128-bit lanes (each lane then
    /// holds a 4 × 4 block transposed), then two rounds of 128-bit lane shuffles.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; as [`super::transpose32`] for a 16 × 16 block.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block16(src: *const u32, ss: usize, dst: *mut u32, ds: usize) {
        let r: [__m512i; 16] =
            std::array::from_fn(|i| _mm512_loadu_si512(src.add(i * ss) as *const __m512i));
        // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved (low and high pairs of each lane)
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // u[4i+j], lane k: column 4k+j of rows 4i..4i+3
        let mut u = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            let b = 4 * i;
            u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
            u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
            u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
            u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
        }
        // v[j] = columns j, 8+j of rows 0..8; v[4+j] = columns 4+j, 12+j; v[8+j], v[12+j]: rows 8..16
        let mut v = [_mm512_setzero_si512(); 16];
        for j in 0..4 {
            v[j] = _mm512_shuffle_i32x4::<0x88>(u[j], u[4 + j]);
            v[4 + j] = _mm512_shuffle_i32x4::<0xdd>(u[j], u[4 + j]);
            v[8 + j] = _mm512_shuffle_i32x4::<0x88>(u[8 + j], u[12 + j]);
            v[12 + j] = _mm512_shuffle_i32x4::<0xdd>(u[8 + j], u[12 + j]);
        }
        let store = |c: usize, x: __m512i| _mm512_storeu_si512(dst.add(c * ds) as *mut __m512i, x);
        for j in 0..4 {
            store(j, _mm512_shuffle_i32x4::<0x88>(v[j], v[8 + j]));
            store(8 + j, _mm512_shuffle_i32x4::<0xdd>(v[j], v[8 + j]));
            store(4 + j, _mm512_shuffle_i32x4::<0x88>(v[4 + j], v[12 + j]));
            store(12 + j, _mm512_shuffle_i32x4::<0xdd>(v[4 + j], v[12 + j]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape class (whole blocks, edges in either direction, smaller than a block) at
    /// strides wider than the matrices, against the index definition.
    #[test]
    fn transposes_match_the_definition() {
        for &(rows, cols) in &[
            (16usize, 16usize),
            (48, 64),
            (37, 21),
            (5, 3),
            (64, 17),
            (1, 40),
        ] {
            let (ss, ds) = (cols + 5, rows + 3);
            let src: Vec<u32> = (0..rows * ss).map(|i| i as u32 * 2654435761).collect();
            let mut dst = vec![7u32; cols * ds];
            // SAFETY: src holds rows × ss, dst cols × ds elements; separate buffers.
            unsafe { transpose32(src.as_ptr(), ss, (rows, cols), dst.as_mut_ptr(), ds) };
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * ds + r],
                        src[r * ss + c],
                        "{rows}×{cols} at ({r}, {c})"
                    );
                }
            }
            // padding between rows of dst untouched
            for c in 0..cols {
                assert!(dst[c * ds + rows..(c + 1) * ds].iter().all(|&x| x == 7));
            }
        }
    }
}

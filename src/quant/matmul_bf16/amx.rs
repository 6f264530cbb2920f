//! Intel AMX (`tdpbf16ps`) for the bulk of both bf16 products; the AVX-512 BF16 micro-tiles take
//! the edges (rows or pairs past the last multiple of 16).
//!
//! `tdpbf16ps c, a, b` multiplies a 16 × 32 bf16 tile by a 32 × 16 one held as 16 rows of pairs
//! along the contraction axis, into a 16 × 16 f32 tile: `c[r][j] += Σ_q a[r][q] · b[q][j]` over
//! 16 pairs `q`, each a product of bf16 pairs. Those are the operands a [`Sweep`] already holds:
//! `a` row-major pairs (W's bf16 tile in the forward, dy in the input gradient), `b` rows of
//! pairs (x packed in blocks, or W's interleaved row pairs), so a tile is a strided load of
//! either, and `out` a strided store. Per 32 rows × 32 columns ([`quad`]): four accumulators
//! (tmm0-3), two `a` tiles (tmm4-5) and two `b` tiles (tmm6-7) a round of 16 pairs, each tile
//! loaded feeding two `tdpbf16ps`; a strip of 16 rows or 16 to 48 columns left over
//! ([`strip`]): one `a` tile (tmm3) and up to three `b` tiles and accumulators.
//!
//! Linux hands a process the tile data state only when it asks (`arch_prctl`
//! `ARCH_REQ_XCOMP_PERM`, once, in [`has_amx`]); each sweep loads its tile configuration
//! (`ldtilecfg`: per thread) and releases the tiles at its end. Stable Rust has no AMX
//! intrinsics: the instructions are `asm!`.
use super::avx512::Avx512;
use super::{Bf16Kernels, Sweep};
use std::arch::asm;
use std::sync::OnceLock;

/// `arch_prctl` code asking for an extended state component (Linux `ARCH_REQ_XCOMP_PERM`).
const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
/// The AMX tile data state component (`XFEATURE_XTILEDATA`).
const XFEATURE_XTILEDATA: libc::c_long = 18;

/// Whether AMX-BF16 runs here: the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7), AVX-512 BF16
/// for the edges, Linux granted the tile state, and `QTUNE_NO_AMX` is unset (checked once; what
/// makes the tile instructions sound to run).
pub fn has_amx() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        if !super::has_avx512_bf16() || std::env::var_os("QTUNE_NO_AMX").is_some() {
            return false;
        }
        let id = std::arch::x86_64::__cpuid_count(7, 0);
        let (tile, bf16) = ((id.edx >> 24) & 1 == 1, (id.edx >> 22) & 1 == 1);
        // SAFETY: arch_prctl with these two integer arguments only changes this process's
        // permission to use the tile state; it reads and writes no memory of ours.
        let granted = || unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        };
        tile && bf16 && granted()
    })
}

/// `ldtilecfg`'s 64-byte operand: palette 1, every tile used 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Tiles 0..=7 at 16 × 64 bytes, the rest unused.
    fn tiles_16x64() -> TileConfig {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            (c.colsb[t], c.rows[t]) = (64, 16);
        }
        c
    }
}

/// The same tile instruction on accumulator `j` (0..3) and, where named, its `b` tile: the
/// register numbers are part of the instruction, so a run-time index picks one of three.
macro_rules! on_tile {
    ($j:expr, [$t0:literal, $t1:literal, $t2:literal], $($args:tt)*) => {
        match $j {
            0 => asm!($t0, $($args)*),
            1 => asm!($t1, $($args)*),
            _ => asm!($t2, $($args)*),
        }
    };
}

/// `out[r][c] (+)= Σ_q a[r][q] · b[q][c]` over rows `0..rows` and pairs `0..pairs` (both
/// multiples of 16) and all of `s.cols` (a multiple of 16), in tiles: [`quad`] over the 32-row,
/// 32-column blocks, [`strip`] over the rest. Every output element takes its pairs in order, 16
/// a `tdpbf16ps`, in either: the same sums whichever covers it.
///
/// # Safety
/// [`has_amx`] is true; the pointers address what `s` names for those rows and pairs.
unsafe fn bulk(s: &Sweep, rows: usize, pairs: usize) {
    let cfg = TileConfig::tiles_16x64();
    asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
    let (r2, c2) = (rows / 32 * 32, s.cols / 32 * 32);
    if r2 > 0 && c2 > 0 {
        quad(s, r2, c2, pairs);
    }
    if c2 < s.cols && r2 > 0 {
        // columns c2.. of rows 0..r2
        let right = Sweep {
            b: s.b.add(c2),
            out: s.out.add(c2),
            cols: s.cols - c2,
            ..*s
        };
        strip(&right, r2, pairs);
    }
    if r2 < rows {
        // rows r2..rows, every column
        let below = Sweep {
            a: s.a.add(r2 * s.a_stride),
            out: s.out.add(r2 * s.out_stride),
            ..*s
        };
        strip(&below, rows - r2, pairs);
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// Sweeps of at most this many columns take their pairs in chunks of [`CHUNK_PAIRS`] (see
/// [`quad`]).
const CHUNK_COLS: usize = 64;
/// Pairs a chunk of a narrow sweep: its `b` rows (128 × 64 columns × 4 bytes, 32 KiB) and a
/// 32-row block of `a` (16 KiB) stay in L1 while every block of the sweep takes them.
const CHUNK_PAIRS: usize = 128;

/// [`bulk`] over rows `0..rows` and columns `0..cols` (multiples of 32), 2 × 2 tiles a block.
/// A sweep of at most [`CHUNK_COLS`] columns (the forward's: W's tile against one x block) runs
/// its pairs in chunks of [`CHUNK_PAIRS`], every block's accumulators stored and loaded again
/// between chunks (exact: f32 tiles, each element's pairs still in order). Why: over all of K
/// at once both operands stream from L2 for every block; chunked, they are read from L1.
/// Measured on one core (session 25, benches/amx/quad.c, single runs on a noisy VM): 64 columns
/// at K = 768, 128 rows 1,241 -> 1,581 GFLOP/s, 256 rows 1,191 -> 1,530; K = 4096 no better
/// (1,483 -> 1,429); K = 11008 591 -> 733; in the step, alternating: the ~100M batch-4 step
/// +1.6-3.7 %, Llama-2-7B +4.2-4.8 % (docs/BENCHMARKS.md). Wider sweeps (the input gradient's,
/// 96 to 256 columns) lost by it (1,379 -> 1,290 at 256), so they keep one pass.
///
/// # Safety
/// As for [`bulk`], with the tile configuration loaded.
unsafe fn quad(s: &Sweep, rows: usize, cols: usize, pairs: usize) {
    let chunk = match s.cols <= CHUNK_COLS {
        true => CHUNK_PAIRS,
        false => pairs.max(16),
    };
    for p0 in (0..pairs).step_by(chunk) {
        let part = Sweep {
            load: s.load || p0 > 0,
            ..*s
        };
        quad_pairs(&part, rows, cols, p0..pairs.min(p0 + chunk));
    }
}

/// [`quad`] over the pairs `ps` (multiples of 16), loading the accumulators where `s.load`.
///
/// # Safety
/// As for [`quad`].
unsafe fn quad_pairs(s: &Sweep, rows: usize, cols: usize, ps: std::ops::Range<usize>) {
    let (sa, sb, so) = (s.a_stride * 4, s.b_stride * 4, s.out_stride * 4);
    for r in (0..rows).step_by(32) {
        for c in (0..cols).step_by(32) {
            // accumulators: tmm0 (r, c), tmm1 (r, c+16), tmm2 (r+16, c), tmm3 (r+16, c+16)
            let o = s.out.add(r * s.out_stride + c);
            let o2 = o.add(16 * s.out_stride);
            if s.load {
                asm!("tileloadd tmm0, [{o} + {s}*1]", "tileloadd tmm1, [{o1} + {s}*1]",
                    "tileloadd tmm2, [{o2} + {s}*1]", "tileloadd tmm3, [{o3} + {s}*1]",
                    o = in(reg) o, o1 = in(reg) o.add(16), o2 = in(reg) o2,
                    o3 = in(reg) o2.add(16), s = in(reg) so, options(nostack, readonly));
            } else {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
            }
            for p in ps.clone().step_by(16) {
                let a = s.a.add(r * s.a_stride + p);
                let b = s.b.add(p * s.b_stride + c);
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a, a1 = in(reg) a.add(16 * s.a_stride), sa = in(reg) sa,
                    b0 = in(reg) b, b1 = in(reg) b.add(16), sb = in(reg) sb,
                    options(nostack, readonly)
                );
            }
            asm!("tilestored [{o} + {s}*1], tmm0", "tilestored [{o1} + {s}*1], tmm1",
                "tilestored [{o2} + {s}*1], tmm2", "tilestored [{o3} + {s}*1], tmm3",
                o = in(reg) o, o1 = in(reg) o.add(16), o2 = in(reg) o2,
                o3 = in(reg) o2.add(16), s = in(reg) so, options(nostack));
        }
    }
}

/// [`bulk`] over rows `0..rows` (a multiple of 16) and all of `s.cols` (a multiple of 16), 16
/// rows by up to 48 columns a block.
///
/// # Safety
/// As for [`bulk`], with the tile configuration loaded.
unsafe fn strip(s: &Sweep, rows: usize, pairs: usize) {
    let (sa, sb, so) = (s.a_stride * 4, s.b_stride * 4, s.out_stride * 4);
    for r in (0..rows).step_by(16) {
        let mut c = 0;
        while c < s.cols {
            let tiles = ((s.cols - c) / 16).min(3);
            let out = s.out.add(r * s.out_stride + c);
            for j in 0..tiles {
                let o = out.add(16 * j);
                if s.load {
                    on_tile!(j, ["tileloadd tmm0, [{o} + {s}*1]", "tileloadd tmm1, [{o} + {s}*1]",
                        "tileloadd tmm2, [{o} + {s}*1]"], o = in(reg) o, s = in(reg) so,
                        options(nostack, readonly));
                } else {
                    on_tile!(
                        j,
                        ["tilezero tmm0", "tilezero tmm1", "tilezero tmm2"],
                        options(nostack, nomem)
                    );
                }
            }
            for p in (0..pairs).step_by(16) {
                let a = s.a.add(r * s.a_stride + p);
                asm!("tileloadd tmm3, [{a} + {s}*1]", a = in(reg) a, s = in(reg) sa,
                    options(nostack, readonly));
                for j in 0..tiles {
                    let b = s.b.add(p * s.b_stride + c + 16 * j);
                    on_tile!(j, [
                        "tileloadd tmm4, [{b} + {s}*1]\n tdpbf16ps tmm0, tmm3, tmm4",
                        "tileloadd tmm5, [{b} + {s}*1]\n tdpbf16ps tmm1, tmm3, tmm5",
                        "tileloadd tmm6, [{b} + {s}*1]\n tdpbf16ps tmm2, tmm3, tmm6"],
                        b = in(reg) b, s = in(reg) sb, options(nostack, readonly));
                }
            }
            for j in 0..tiles {
                let o = out.add(16 * j);
                on_tile!(j, ["tilestored [{o} + {s}*1], tmm0", "tilestored [{o} + {s}*1], tmm1",
                    "tilestored [{o} + {s}*1], tmm2"], o = in(reg) o, s = in(reg) so,
                    options(nostack));
            }
            c += 16 * tiles;
        }
    }
}

/// AMX over the bulk of a sweep, AVX-512 BF16's micro-tiles over its edges.
pub(super) struct Amx;

impl Bf16Kernels for Amx {
    /// 64 rows of x a block: [`quad`] covers it whole (48 left a 16-column [`strip`] a tile row,
    /// and a 256-row batch padded its last block from 16 rows to 48).
    const MB: usize = super::AMX_MB;
    const FWD_MR: usize = Avx512::FWD_MR;
    const BWD_MR: usize = Avx512::BWD_MR;
    const NR: usize = Avx512::NR;
    const ROW_UNIT: usize = super::AMX_ROW_UNIT;
    const BWD_CHUNK: usize = super::AMX_BWD_CHUNK;

    unsafe fn tile(t: &Sweep, width: usize) {
        Avx512::tile(t, width)
    }

    /// Rows and pairs up to their last multiple of 16 in tiles; then the pairs past it added by
    /// the AVX-512 micro-tiles, and the rows past it over every pair.
    unsafe fn sweep(s: Sweep, mr: usize) {
        let (mut rows, pairs) = (s.rows / 16 * 16, s.pairs / 16 * 16);
        if rows > 0 && pairs > 0 && s.cols.is_multiple_of(16) {
            bulk(&s, rows, pairs);
            if pairs < s.pairs {
                let rest = Sweep {
                    rows,
                    pairs: s.pairs - pairs,
                    a: s.a.add(pairs),
                    b: s.b.add(pairs * s.b_stride),
                    load: true,
                    ..s
                };
                super::sweep::<Avx512>(rest, mr);
            }
        } else {
            rows = 0;
        }
        if rows < s.rows {
            let rest = Sweep {
                rows: s.rows - rows,
                a: s.a.add(rows * s.a_stride),
                out: s.out.add(rows * s.out_stride),
                ..s
            };
            super::sweep::<Avx512>(rest, mr);
        }
    }
}

/// Flops of one [`tile_chains`] iteration: four `tdpbf16ps` of 16 × 16 × 32 products and sums.
const TILE_FLOPS_PER_ITER: usize = 4 * 2 * 16 * 16 * 32;

/// `iters` rounds of four independent `tdpbf16ps` on tiles loaded once (the instruction's
/// throughput, nothing else); returns one accumulator element so the work is kept. The tiles hold
/// (1.0, 1.0) pairs: the low-activity ceiling. Tiles of full-mantissa values ran at about half of
/// it on the Intel VM of session 13, so an MFU against this peak understates, never flatters.
///
/// # Safety
/// [`has_amx`] is true.
unsafe fn tile_chains(iters: usize) -> f32 {
    let cfg = TileConfig::tiles_16x64();
    let a = [0x3f80_3f80u32; 256]; // bf16 pairs (1, 1)
    let mut c = [0f32; 256];
    asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
        "tileloadd tmm4, [{a} + {s}*1]", "tileloadd tmm5, [{a} + {s}*1]",
        a = in(reg) a.as_ptr(), s = in(reg) 64usize, options(nostack, readonly));
    for _ in 0..iters {
        asm!(
            "tdpbf16ps tmm0, tmm4, tmm5",
            "tdpbf16ps tmm1, tmm4, tmm5",
            "tdpbf16ps tmm2, tmm4, tmm5",
            "tdpbf16ps tmm3, tmm4, tmm5",
            options(nostack, nomem)
        );
    }
    asm!("tilestored [{c} + {s}*1], tmm3", "tilerelease",
        c = in(reg) c.as_mut_ptr(), s = in(reg) 64usize, options(nostack));
    c[0]
}

/// The AMX instruction ceiling in GFLOP/s: [`tile_chains`] on every rayon thread at once (plain
/// OS threads), best of 4; `None` without AMX. `qtune bench` takes the MFU against it where it is
/// the largest peak.
pub fn measure_amx_peak() -> Option<f64> {
    if !has_amx() {
        return None;
    }
    let iters = 1usize << 16;
    let threads = rayon::current_num_threads().max(1);
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let t0 = std::time::Instant::now();
        let sum: f32 = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..threads)
                // SAFETY: has_amx checked above (the permission is the process's, every thread's).
                .map(|_| sc.spawn(move || unsafe { tile_chains(iters) }))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(sum);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Some((threads * iters * TILE_FLOPS_PER_ITER) as f64 / best / 1e9)
}

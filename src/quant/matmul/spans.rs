//! Outputs written once, in place: [`par_spans`] hands each parallel task a [`Span`] of
//! uninitialised memory to write front to back, where the ops used to fill a
//! [`zeroed`](super::zeroed) buffer and then overwrite it.
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `n` values made span by span on the pool, each written once in place: span `i` (`len`
/// values, the last one shorter) by `fill(state, i, span)`, front to back through [`Span`];
/// `init` makes a task's state, and a task takes `min` spans at least. Why: an op that filled a
/// [`zeroed`](super::zeroed) output wrote each value twice, and at the ~100M shape ~500 MB a
/// step went to zero fills (10 % of the batch-4 step's samples). Written in place, that step ran
/// 1.04-1.07x (session 22); filling a zeroed per-task buffer and copying it gained nothing, the
/// copy being the pass the zeros had been.
pub(crate) fn par_spans_init<T, S>(
    n: usize,
    (len, min): (usize, usize),
    zero: T,
    init: impl Fn() -> S + Sync + Send,
    fill: impl Fn(&mut S, usize, &mut Span<'_, T>) + Sync + Send,
) -> Vec<T>
where
    T: Copy + Send + Sync,
{
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(len.max(1))
        .enumerate()
        .with_min_len(min.max(1))
        .for_each_init(init, |state, (i, dst)| {
            let start = i * len.max(1);
            let mut span = Span {
                dst,
                start,
                at: 0,
                zero,
            };
            fill(state, i, &mut span);
            assert_eq!(
                span.at,
                span.dst.len(),
                "an output span left part unwritten"
            );
        });
    // SAFETY: the spans cover the first n elements (capacity ≥ n); a `Span` writes only the
    // elements before `at`, each once (through `MaybeUninit::write` or `write_copy_of_slice` of
    // exactly the length it advances by), and each span was checked full above. A panic in a
    // task leaves the length 0.
    unsafe { v.set_len(n) };
    v
}

/// [`par_spans_init`] without a task state, one span a task at least.
pub(crate) fn par_spans<T: Copy + Send + Sync>(
    n: usize,
    len: usize,
    zero: T,
    fill: impl Fn(usize, &mut Span<'_, T>) + Sync + Send,
) -> Vec<T> {
    par_spans_init(n, (len, 1), zero, || (), |_, i, span| fill(i, span))
}

/// A span of a [`par_spans`] output, written front to back: what is written is initialised,
/// what is not cannot be read, and the span must be full when its task ends.
pub(crate) struct Span<'a, T> {
    dst: &'a mut [MaybeUninit<T>],
    /// Where the span starts in the output.
    start: usize,
    /// How many values are written.
    at: usize,
    zero: T,
}

impl<T: Copy> Span<'_, T> {
    /// The span's elements in the output: the same range of an element-wise op's inputs.
    pub(crate) fn range(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.dst.len()
    }

    /// Writes `src` next.
    pub(crate) fn put_slice(&mut self, src: &[T]) {
        self.dst[self.at..self.at + src.len()].write_copy_of_slice(src);
        self.at += src.len();
    }

    /// Writes `f(0)`, ..., `f(n - 1)` next.
    pub(crate) fn put_with(&mut self, n: usize, mut f: impl FnMut(usize) -> T) {
        for (j, d) in self.dst[self.at..self.at + n].iter_mut().enumerate() {
            d.write(f(j));
        }
        self.at += n;
    }

    /// Writes `n` values next, computed in f32 by `f(j0, block)` (the values of elements
    /// `j0..j0 + block.len()` of the `n`) 64 at a time on the stack and written by
    /// `put(self, block)` (rounded to T: `Elem::put_row`). Why: an element-wise loop writing
    /// `T::of(..)` a value at a time kept each rounding scalar; over a block of f32 the
    /// arithmetic vectorises and the rounding is one SIMD pass.
    pub(crate) fn put_blocks(
        &mut self,
        n: usize,
        put: impl Fn(&mut Self, &[f32]),
        mut f: impl FnMut(usize, &mut [f32]),
    ) {
        let mut buf = [0f32; 64];
        for j0 in (0..n).step_by(64) {
            let block = &mut buf[..64.min(n - j0)];
            f(j0, block);
            put(self, block);
        }
    }

    /// Writes `src` next as `convert` turns f32 values into T (a SIMD rounding that writes a
    /// slice), 64 values at a time through the stack.
    pub(crate) fn put_converted(&mut self, src: &[f32], convert: impl Fn(&[f32], &mut [T])) {
        let mut tmp = [self.zero; 64];
        for part in src.chunks(64) {
            let tmp = &mut tmp[..part.len()];
            convert(part, tmp);
            self.put_slice(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_spans_writes_every_span_in_place() {
        // 10,007 values in spans of 64 (the last one shorter), each put in two parts
        let n = 10_007;
        let v = par_spans_init(
            n,
            (64, 3),
            0u32,
            || 7u32,
            |k, i, span| {
                let half = span.range().len() / 2;
                span.put_with(half, |j| (i * 64 + j) as u32 * *k);
                let rest: Vec<u32> = (half..span.range().len())
                    .map(|j| (i * 64 + j) as u32 * 7)
                    .collect();
                span.put_slice(&rest);
            },
        );
        assert!(v.iter().enumerate().all(|(j, &x)| x == j as u32 * 7));
        let f = par_spans(130, 64, 0f32, |_, span| {
            span.put_converted(&vec![1.5f32; span.range().len()], |s, d| {
                d.copy_from_slice(s)
            })
        });
        assert_eq!(f, vec![1.5f32; 130]);
    }

    #[test]
    #[should_panic(expected = "left part unwritten")]
    fn par_spans_refuses_a_span_left_short() {
        par_spans(100, 64, 0u8, |_, span| {
            span.put_with(span.range().len() - 1, |_| 1)
        });
    }

    /// `written` (the same module's other way to write an output once): what the writer filled
    /// is the vector; a writer that declines gives None (Miri checks the uninitialised memory).
    #[test]
    fn spans_of_written_outputs() {
        use super::super::written;
        let v = written(1000, |d: &mut [MaybeUninit<u32>]| {
            for (i, d) in d.iter_mut().enumerate() {
                d.write(i as u32 * 3);
            }
            true
        });
        assert_eq!(v, Some((0..1000).map(|i| i * 3).collect::<Vec<u32>>()));
        assert_eq!(written(10, |_: &mut [MaybeUninit<u32>]| false), None);
    }
}

//! Attention's head layout as one op each way: `(B, T, n·D) -> (B, n, T, D)` and back, a permuted
//! copy whose backward is the other permutation; and [`take_heads`], the heads of a fused
//! projection's rows (Falcon's query, key and value side by side), whose backward puts them back.
//!
//! Why: as candle ops the same change is a reshape, a transpose and a copy, and candle's backward
//! fills a zero gradient and adds the incoming one into it at each of them (per node: an
//! allocation, a memset and a whole-tensor add, in bf16 through its unvectorised conversions). In
//! a profile of the ~100M bf16 step those adds took more samples than the quantised products.
use super::*;

/// `y (B, T, n·D)` as `(B, n, T, D)`, contiguous (attention's query, key or value heads).
pub fn split_heads(y: &Tensor, n: usize) -> Result<Tensor> {
    check_cpu("split_heads", &[y])?;
    let (_, _, c) = y.dims3()?;
    if n == 0 || !c.is_multiple_of(n) {
        bail!("split_heads: {c} features do not split into {n} heads");
    }
    tape::apply1(&y.contiguous()?, Heads { split: true, n })
}

/// `a (B, H, T, D)` as `(B, T, H·D)`, contiguous (attention's output before its projection).
pub fn merge_heads(a: &Tensor) -> Result<Tensor> {
    check_cpu("merge_heads", &[a])?;
    let (_, h, _, _) = a.dims4()?;
    tape::apply1(&a.contiguous()?, Heads { split: false, n: h })
}

/// The permutation: `split` takes `(B, T, n·D)` to `(B, n, T, D)`, else the reverse.
struct Heads {
    split: bool,
    n: usize,
}

impl Heads {
    /// `(B, T, n, D)` of the op's input shape.
    fn dims(&self, s: &Shape) -> Result<(usize, usize, usize, usize)> {
        Ok(if self.split {
            let (b, t, c) = s.dims3()?;
            (b, t, self.n, c / self.n)
        } else {
            let (b, h, t, d) = s.dims4()?;
            (b, t, h, d)
        })
    }

    /// Rows of `d` elements moved: split reads row `(bi, ti, hi)` into row `(bi, hi, ti)`; merge
    /// the other way.
    fn permute<T: Copy + Send + Sync>(
        &self,
        src: &[T],
        (_b, t, h, d): (usize, usize, usize, usize),
    ) -> Vec<T> {
        let Some(&first) = src.first() else {
            return Vec::new();
        };
        par_spans(src.len(), d.max(1), first, |r, row| {
            // r indexes the output rows: (bi, hi, ti) when splitting, (bi, ti, hi) when merging
            let from = if self.split {
                let (bi, hi, ti) = (r / (h * t), r / t % h, r % t);
                (bi * t + ti) * h + hi
            } else {
                let (bi, ti, hi) = (r / (t * h), r / h % t, r % h);
                (bi * h + hi) * t + ti
            };
            row.put_slice(&src[from * d..(from + 1) * d]);
        })
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        if self.split {
            "qtune-split-heads"
        } else {
            "qtune-merge-heads"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CpuOut {
        let dims = self.dims(l.shape())?;
        let (b, t, h, d) = dims;
        let name = self.name();
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.permute(slice_of(v, l, name)?, dims)),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.permute(slice_of(v, l, name)?, dims)),
            CpuStorage::F16(v) => CpuStorage::F16(self.permute(slice_of(v, l, name)?, dims)),
            s => bail!("{name}: unsupported dtype {:?}", s.dtype()),
        };
        let shape = if self.split {
            Shape::from((b, h, t, d))
        } else {
            Shape::from((b, t, h * d))
        };
        Ok((out, shape))
    }

    /// The gradient moved back by the other permutation.
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Heads {
            split: !self.split,
            n: self.n,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// Where each of `n` heads of D features sits in a row of `width` features: head i at
/// `off + (i / group)·outer + (i % group)·D` (`group` heads side by side, groups `outer` apart).
/// Falcon's fused query-key-value rows, for example: multi-query `[q₀..q_H | k | v]`, per head
/// `[q₀ k₀ v₀ | q₁ k₁ v₁ | ..]`, grouped `[q.. k v | q.. k v | ..]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadCols {
    /// Features a row holds (F).
    pub width: usize,
    /// Where head 0 starts.
    pub off: usize,
    /// Heads side by side in one group.
    pub group: usize,
    /// Features from one group to the next.
    pub outer: usize,
}

impl HeadCols {
    /// Where head `i` of `d` features starts in a row.
    fn start(&self, i: usize, d: usize) -> usize {
        self.off + (i / self.group) * self.outer + (i % self.group) * d
    }
}

/// Heads `0..n` of `d` features each of `y (B, T, F)`, found at `cols`, as `(B, n, T, D)`
/// contiguous. Backward: the gradient put back at those columns of a `(B, T, F)` zero tensor.
/// Why: as candle ops the same is a narrow, a reshape, a transpose and a copy per part, each a
/// zero-filled gradient and an add in candle's backward, and a layer with them is not one the
/// step walks itself (`tape`).
pub fn take_heads(y: &Tensor, n: usize, d: usize, cols: HeadCols) -> Result<Tensor> {
    check_cpu("take_heads", &[y])?;
    let (_, _, f) = y.dims3()?;
    let fits = (0..n).all(|i| cols.start(i, d) + d <= f);
    if f != cols.width || n == 0 || d == 0 || cols.group == 0 || !fits {
        bail!("take_heads: {n} heads of {d} at {cols:?} do not fit rows of {f} features");
    }
    tape::apply1(&y.contiguous()?, TakeHeads { n, d, cols })
}

/// [`take_heads`]' op.
struct TakeHeads {
    n: usize,
    d: usize,
    cols: HeadCols,
}

impl TakeHeads {
    /// `(B, n, T, D)` rows from `src (B, T, F)`.
    fn take<T: Copy + Send + Sync>(&self, src: &[T], b: usize, t: usize) -> Vec<T> {
        let (n, d, f) = (self.n, self.d, self.cols.width);
        let Some(&first) = src.first() else {
            return Vec::new();
        };
        par_spans(b * n * t * d, d, first, |r, row| {
            let (bi, hi, ti) = (r / (n * t), r / t % n, r % t);
            let at = (bi * t + ti) * f + self.cols.start(hi, d);
            row.put_slice(&src[at..at + d]);
        })
    }

    /// `(B, T, F)` rows, zero but at the heads' columns, from `g (B, n, T, D)`.
    fn put<T: Copy + Send + Sync>(&self, g: &[T], b: usize, t: usize, zero: T) -> Vec<T> {
        let (n, d, f) = (self.n, self.d, self.cols.width);
        let mut out = zeroed(b * t * f, zero);
        out.par_chunks_mut(f).enumerate().for_each(|(r, row)| {
            let (bi, ti) = (r / t, r % t);
            for hi in 0..n {
                let from = ((bi * n + hi) * t + ti) * d;
                let at = self.cols.start(hi, d);
                row[at..at + d].copy_from_slice(&g[from..from + d]);
            }
        });
        out
    }
}

impl CustomOp1 for TakeHeads {
    fn name(&self) -> &'static str {
        "qtune-take-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CpuOut {
        let (b, t, _) = l.shape().dims3()?;
        let name = self.name();
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.take(slice_of(v, l, name)?, b, t)),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.take(slice_of(v, l, name)?, b, t)),
            CpuStorage::F16(v) => CpuStorage::F16(self.take(slice_of(v, l, name)?, b, t)),
            s => bail!("{name}: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, Shape::from((b, self.n, t, self.d))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, f) = arg.dims3()?;
        let g = grad.contiguous()?;
        let (sg, lg) = g.storage_and_layout();
        let Storage::Cpu(sg) = &*sg else {
            bail!("take_heads: only the CPU kernels exist");
        };
        let name = self.name();
        let dims = (b, t, f);
        let out = match sg {
            CpuStorage::F32(v) => Tensor::from_vec(
                self.put(slice_of(v, lg, name)?, b, t, 0.0),
                dims,
                &Device::Cpu,
            ),
            CpuStorage::BF16(v) => Tensor::from_vec(
                self.put(slice_of(v, lg, name)?, b, t, bf16::ZERO),
                dims,
                &Device::Cpu,
            ),
            CpuStorage::F16(v) => Tensor::from_vec(
                self.put(slice_of(v, lg, name)?, b, t, f16::ZERO),
                dims,
                &Device::Cpu,
            ),
            s => bail!("{name}: unsupported dtype {:?}", s.dtype()),
        }?;
        Ok(Some(out))
    }
}

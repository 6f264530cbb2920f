//! Attention's head layout as one op each way: `(B, T, n·D) -> (B, n, T, D)` and back, a permuted
//! copy whose backward is the other permutation.
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

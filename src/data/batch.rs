//! Padded batches, packing and seeded shuffling.
use super::jsonl::{count_targets, Example};
use super::IGNORE;
use crate::rng::SplitMix64;
use candle_core::{Device, Tensor};

/// A right-padded batch, row-major `(batch, seq)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Token ids; padding positions hold `pad_id`.
    pub ids: Vec<u32>,
    /// 1 on real tokens, 0 on padding.
    pub mask: Vec<u32>,
    /// Labels, -100 on padding and on tokens without loss.
    pub labels: Vec<i64>,
    /// Rows.
    pub batch: usize,
    /// Columns: the longest example in the batch.
    pub seq: usize,
    /// Target tokens the loss counts (to normalise across gradient-accumulation micro-batches).
    pub targets: usize,
}

impl Batch {
    /// `(ids u32, mask u32, labels i64)`, each `(batch, seq)`, on `device`.
    pub fn tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let shape = (self.batch, self.seq);
        Ok((
            Tensor::from_slice(&self.ids, shape, device)?,
            Tensor::from_slice(&self.mask, shape, device)?,
            Tensor::from_slice(&self.labels, shape, device)?,
        ))
    }
}

/// Consecutive groups of `batch_size` examples (the last may be smaller), right-padded.
pub fn batches(examples: &[Example], batch_size: usize, pad_id: u32) -> Vec<Batch> {
    assert!(batch_size > 0, "batch size must be positive");
    examples
        .chunks(batch_size)
        .map(|rows| {
            let seq = rows.iter().map(|e| e.ids.len()).max().unwrap_or(0);
            let mut b = Batch {
                ids: Vec::with_capacity(rows.len() * seq),
                mask: Vec::with_capacity(rows.len() * seq),
                labels: Vec::with_capacity(rows.len() * seq),
                batch: rows.len(),
                seq,
                targets: 0,
            };
            for e in rows {
                let pad = seq - e.ids.len();
                b.ids.extend_from_slice(&e.ids);
                b.ids.extend(std::iter::repeat_n(pad_id, pad));
                b.mask.extend(std::iter::repeat_n(1, e.ids.len()));
                b.mask.extend(std::iter::repeat_n(0, pad));
                b.labels.extend_from_slice(&e.labels);
                b.labels.extend(std::iter::repeat_n(IGNORE, pad));
                b.targets += count_targets(&e.labels);
            }
            b
        })
        .collect()
}

/// Greedy packing in order: examples are appended to the current sequence while it stays within
/// `seq_len`. Each example's first label becomes -100, so no token is trained to follow the
/// previous example (attention still sees it: the packed sequence is one causal context).
pub fn pack(examples: Vec<Example>, seq_len: usize) -> Vec<Example> {
    let mut out: Vec<Example> = Vec::new();
    let mut cur = Example {
        ids: Vec::new(),
        labels: Vec::new(),
    };
    for mut e in examples {
        if !cur.ids.is_empty() && cur.ids.len() + e.ids.len() > seq_len {
            out.push(std::mem::replace(
                &mut cur,
                Example {
                    ids: Vec::new(),
                    labels: Vec::new(),
                },
            ));
        }
        if let Some(l) = e.labels.first_mut() {
            *l = IGNORE;
        }
        cur.ids.extend(e.ids);
        cur.labels.extend(e.labels);
    }
    if !cur.ids.is_empty() {
        out.push(cur);
    }
    out
}

/// Fisher-Yates shuffle of `items`, determined by `seed` alone.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64(seed);
    for i in (1..items.len()).rev() {
        let j = rng.below(i + 1);
        items.swap(i, j);
    }
}

/// A permutation of `0..n` determined by `seed` (e.g. seed + epoch for each epoch's order).
pub fn shuffled_indices(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    shuffle(&mut v, seed);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], loss_from: usize) -> Example {
        Example {
            ids: ids.to_vec(),
            labels: ids
                .iter()
                .enumerate()
                .map(|(t, &i)| if t >= loss_from { i as i64 } else { IGNORE })
                .collect(),
        }
    }

    #[test]
    fn batches_pad_right_and_count_targets() {
        let b = batches(&[ex(&[5, 6, 7], 1), ex(&[8, 9], 0), ex(&[4, 4], 1)], 2, 0);
        assert_eq!(b.len(), 2);
        assert_eq!((b[0].batch, b[0].seq), (2, 3));
        assert_eq!(b[0].ids, vec![5, 6, 7, 8, 9, 0]);
        assert_eq!(b[0].mask, vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(b[0].labels, vec![-100, 6, 7, 8, 9, -100]);
        // Row 0 has targets 6, 7; row 1 has 9 (its first label is never a target).
        assert_eq!(b[0].targets, 3);
        assert_eq!((b[1].batch, b[1].seq, b[1].targets), (1, 2, 1));
        let (ids, mask, labels) = b[0].tensors(&Device::Cpu).unwrap();
        assert_eq!(ids.dims(), &[2, 3]);
        assert_eq!(mask.to_vec2::<u32>().unwrap()[1], vec![1, 1, 0]);
        assert_eq!(labels.to_vec2::<i64>().unwrap()[1], vec![8, 9, -100]);
    }

    #[test]
    fn pack_fills_up_to_seq_len_and_masks_joins() {
        let p = pack(vec![ex(&[1, 2], 0), ex(&[3, 4], 0), ex(&[5, 6, 7], 0)], 4);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].ids, vec![1, 2, 3, 4]);
        assert_eq!(p[0].labels, vec![-100, 2, -100, 4]);
        assert_eq!(p[1].ids, vec![5, 6, 7]);
    }

    #[test]
    fn shuffle_depends_on_seed_only() {
        let a = shuffled_indices(50, 7);
        assert_eq!(a, shuffled_indices(50, 7));
        assert_ne!(a, shuffled_indices(50, 8));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_ne!(a, s, "a 50-element shuffle left everything in place");
    }
}

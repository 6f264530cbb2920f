//! Training data as the loop sees it: tokenised samples, their order over epochs, micro-batches.
//!
//! Conventions. A sample is token ids and labels of the same length (-100: no loss); the model
//! predicts `labels[t + 1]` from position t. Micro-batches are right-padded and masked.
use crate::rng::SplitMix64;
use crate::{Error, Result};
use candle_core::{Device, Tensor};

/// One tokenised training example.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sample {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Label per position (-100: ignored); position t+1's label is the target at t.
    pub labels: Vec<i64>,
}

impl Sample {
    /// Target tokens this sample contributes (shifted labels that are not -100).
    pub fn targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l >= 0).count()
    }
}

/// A micro-batch of samples as tensors.
pub struct Batch {
    /// Token ids (B, T) u32, right-padded.
    pub ids: Tensor,
    /// 1 for real tokens, 0 for padding (B, T) u32.
    pub mask: Tensor,
    /// Labels (B, T) i64, -100 where ignored.
    pub labels: Tensor,
    /// Target tokens (shifted labels that are not -100).
    pub targets: usize,
    /// Rows whose first label is not -100: targets too where virtual tokens come first (prompt
    /// tuning, P-tuning: the last virtual row predicts the first token).
    pub first_targets: usize,
    /// Real (unpadded) tokens.
    pub tokens: usize,
}

/// Right-padded, masked tensors of `samples` (T = the longest sample).
pub fn make_batch(samples: &[&Sample]) -> Result<Batch> {
    let t = samples
        .iter()
        .map(|s| s.ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let b = samples.len();
    let (mut ids, mut mask, mut labels) =
        (vec![0u32; b * t], vec![0u32; b * t], vec![-100i64; b * t]);
    let (mut targets, mut tokens, mut first_targets) = (0, 0, 0);
    for (r, s) in samples.iter().enumerate() {
        ids[r * t..r * t + s.ids.len()].copy_from_slice(&s.ids);
        mask[r * t..r * t + s.ids.len()].fill(1);
        labels[r * t..r * t + s.labels.len()].copy_from_slice(&s.labels);
        targets += s.targets();
        first_targets += usize::from(s.labels.first().is_some_and(|&l| l >= 0));
        tokens += s.ids.len();
    }
    let e = |e: candle_core::Error| Error::Invalid(format!("batch: {e}"));
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), &Device::Cpu).map_err(e)?,
        mask: Tensor::from_vec(mask, (b, t), &Device::Cpu).map_err(e)?,
        labels: Tensor::from_vec(labels, (b, t), &Device::Cpu).map_err(e)?,
        targets,
        first_targets,
        tokens,
    })
}

/// Samples cut to `seq_len` (ids and labels alike); returns how many were cut. Samples without any
/// target are dropped (they cannot contribute a loss).
pub(crate) fn fit_samples(
    samples: Vec<Sample>,
    seq_len: usize,
    what: &str,
) -> Result<(Vec<Sample>, usize)> {
    let mut cut = 0;
    let mut out = Vec::with_capacity(samples.len());
    for (i, mut s) in samples.into_iter().enumerate() {
        if s.ids.len() != s.labels.len() {
            return Err(Error::Invalid(format!(
                "{what} example {i}: {} ids but {} labels",
                s.ids.len(),
                s.labels.len()
            )));
        }
        if s.ids.len() > seq_len {
            s.ids.truncate(seq_len);
            s.labels.truncate(seq_len);
            cut += 1;
        }
        if s.targets() > 0 {
            out.push(s);
        }
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!(
            "{what} data has no example with a target token (after truncation to --seq-len {seq_len})"
        )));
    }
    Ok((out, cut))
}

/// SplitMix64's first output from state `z`: the data order's generator (stateless per epoch, so
/// a position is a step count).
fn mix(z: u64) -> u64 {
    SplitMix64(z).next()
}

/// The example order of `epoch`: identity without shuffling, else a Fisher-Yates permutation seeded
/// by (seed, epoch).
pub(crate) fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut s = mix(seed ^ 0x6461_7461) ^ mix(epoch);
        for i in (1..n).rev() {
            s = mix(s);
            v.swap(i, (s % (i as u64 + 1)) as usize);
        }
    }
    v
}

/// The examples of every micro-batch, as a pure function of its position in the run (so a resumed
/// run sees exactly what an uninterrupted one would).
pub(crate) struct DataOrder {
    /// Examples in the training set.
    pub(crate) n: usize,
    /// Examples per micro-batch.
    pub(crate) micro: usize,
    seed: u64,
    shuffle: bool,
}

impl DataOrder {
    /// The order over `n` examples in micro-batches of `micro`.
    pub(crate) fn new(n: usize, micro: usize, seed: u64, shuffle: bool) -> Self {
        DataOrder {
            n,
            micro,
            seed,
            shuffle,
        }
    }

    /// Example indices of micro-batch `k` (counting from the start of the run).
    pub(crate) fn micro_batch(&self, k: usize) -> Vec<usize> {
        (k * self.micro..(k + 1) * self.micro)
            .map(|p| {
                let (e, i) = (p / self.n, p % self.n);
                // Orders are cheap at these sizes; recomputing keeps the position a pure step count.
                epoch_order(self.n, self.seed, e as u64, self.shuffle)[i]
            })
            .collect()
    }
}

/// FNV-1a, fed 64-bit words: the data fingerprint a resumed run must match.
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv::new()
    }
}

impl Fnv {
    /// The empty hash.
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    /// Feeds one word.
    pub fn eat(&mut self, x: u64) {
        for b in x.to_le_bytes() {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    /// Feeds a sample (length, ids, labels).
    pub fn eat_sample(&mut self, s: &Sample) {
        self.eat(s.ids.len() as u64);
        s.ids.iter().for_each(|&i| self.eat(i as u64));
        s.labels.iter().for_each(|&l| self.eat(l as u64));
    }
    /// The hash as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_and_seeded() {
        let a = epoch_order(50, 7, 0, true);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_ne!(a, epoch_order(50, 7, 1, true));
        assert_ne!(a, epoch_order(50, 8, 0, true));
        assert_eq!(a, epoch_order(50, 7, 0, true));
        assert_eq!(epoch_order(5, 7, 0, false), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn micro_batches_walk_epochs_in_order() {
        let o = DataOrder::new(5, 2, 3, false);
        assert_eq!(o.micro_batch(0), vec![0, 1]);
        assert_eq!(o.micro_batch(2), vec![4, 0]);
        let s = DataOrder::new(5, 5, 3, true);
        assert_eq!(s.micro_batch(1), epoch_order(5, 3, 1, true));
    }

    #[test]
    fn batches_pad_right_and_count_targets() {
        let a = Sample {
            ids: vec![5, 6, 7],
            labels: vec![-100, 6, 7],
        };
        let b = Sample {
            ids: vec![8],
            labels: vec![8],
        };
        let m = make_batch(&[&a, &b]).unwrap();
        assert_eq!(m.targets, 2);
        assert_eq!(
            m.mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1], vec![1, 0, 0]]
        );
        assert_eq!(
            m.labels.to_vec2::<i64>().unwrap(),
            vec![vec![-100, 6, 7], vec![8, -100, -100]]
        );
    }
}

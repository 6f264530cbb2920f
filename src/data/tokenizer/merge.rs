//! The greedy pairwise merge that byte-level BPE (by merge rank) and SentencePiece BPE (by token
//! score) both run, as llama.cpp does: every adjacent pair that may merge waits on a heap; the best
//! one (then the leftmost) merges, its new neighbours are offered, and stale entries are skipped.
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A candidate merge of symbols `left` and `right` (heap order: `priority`, then leftmost).
struct Candidate<P> {
    priority: P,
    left: usize,
    right: usize,
    /// Byte length of the merged text when the pair was queued (stale entries are skipped).
    len: usize,
}

impl<P: Ord> PartialEq for Candidate<P> {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl<P: Ord> Eq for Candidate<P> {}
impl<P: Ord> PartialOrd for Candidate<P> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<P: Ord> Ord for Candidate<P> {
    fn cmp(&self, o: &Self) -> Ordering {
        self.priority
            .cmp(&o.priority)
            .then_with(|| o.left.cmp(&self.left))
    }
}

/// The pieces `text`'s characters merge into. `priority(a, b, ab)` ranks merging the adjacent
/// pieces `a` and `b` (`ab` is their concatenation, a slice of `text`), or refuses it with `None`;
/// the greatest priority merges first.
pub(crate) fn merge_pieces<P: Ord>(
    text: &str,
    mut priority: impl FnMut(&str, &str, &str) -> Option<P>,
) -> Vec<&str> {
    // Symbols: [start, start+len) in `text`, linked left/right; a merged-away symbol has len 0.
    let start: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
    let n = start.len();
    if n == 0 {
        return Vec::new();
    }
    let mut len: Vec<usize> = (0..n)
        .map(|i| start.get(i + 1).copied().unwrap_or(text.len()) - start[i])
        .collect();
    let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
    let mut next: Vec<Option<usize>> = (0..n).map(|i| (i + 1 < n).then_some(i + 1)).collect();
    let mut heap = BinaryHeap::new();
    let mut offer = |heap: &mut BinaryHeap<Candidate<P>>, l: usize, r: usize, len: &[usize]| {
        let a = &text[start[l]..start[l] + len[l]];
        let b = &text[start[r]..start[r] + len[r]];
        let ab = &text[start[l]..start[r] + len[r]];
        if let Some(priority) = priority(a, b, ab) {
            heap.push(Candidate {
                priority,
                left: l,
                right: r,
                len: ab.len(),
            });
        }
    };
    for i in 1..n {
        offer(&mut heap, i - 1, i, &len);
    }
    while let Some(p) = heap.pop() {
        // Stale: a side merged since, or the two are no longer neighbours.
        if len[p.left] == 0 || len[p.right] == 0 || len[p.left] + len[p.right] != p.len {
            continue;
        }
        if start[p.left] + len[p.left] != start[p.right] {
            continue;
        }
        len[p.left] += len[p.right];
        len[p.right] = 0;
        next[p.left] = next[p.right];
        if let Some(r) = next[p.left] {
            prev[r] = Some(p.left);
        }
        if let Some(l) = prev[p.left] {
            offer(&mut heap, l, p.left, &len);
        }
        if let Some(r) = next[p.left] {
            offer(&mut heap, p.left, r, &len);
        }
    }
    let mut pieces = Vec::new();
    let mut i = Some(0);
    while let Some(s) = i {
        pieces.push(&text[start[s]..start[s] + len[s]]);
        i = next[s];
    }
    pieces
}

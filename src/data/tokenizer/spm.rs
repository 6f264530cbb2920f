//! SentencePiece BPE as llama.cpp runs it ("llama" vocabularies): adjacent symbols merge by the
//! highest score whose concatenation is a token (leftmost on ties); a character that no token
//! covers falls back to its `<0xNN>` byte tokens.
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A candidate merge of symbols `left` and `right` (heap order: score, then leftmost).
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

/// Appends the ids of `text` (spaces already escaped to U+2581). `lookup` maps a token text to its
/// id, `score` gives a token's score, `byte` the id of a raw byte.
pub(crate) fn encode(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<u32>,
    score: &dyn Fn(u32) -> f32,
    byte: &dyn Fn(u8) -> u32,
    out: &mut Vec<u32>,
) {
    // Symbols: byte ranges in `text`, linked left/right; a merged-away symbol has len 0.
    let start: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
    let n = start.len();
    if n == 0 {
        return;
    }
    let mut len: Vec<usize> = (0..n)
        .map(|i| start.get(i + 1).copied().unwrap_or(text.len()) - start[i])
        .collect();
    let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
    let mut next: Vec<Option<usize>> = (0..n).map(|i| (i + 1 < n).then_some(i + 1)).collect();
    let mut heap = BinaryHeap::new();
    let try_add = |heap: &mut BinaryHeap<Bigram>, l: usize, r: usize, ln: &[usize]| {
        let piece = &text[start[l]..start[l] + ln[l] + ln[r]];
        if let Some(id) = lookup(piece) {
            heap.push(Bigram {
                score: score(id),
                left: l,
                right: r,
                len: piece.len(),
            });
        }
    };
    for i in 1..n {
        try_add(&mut heap, i - 1, i, &len);
    }
    while let Some(b) = heap.pop() {
        // Stale: one side already merged into something else.
        if len[b.left] == 0 || len[b.right] == 0 || len[b.left] + len[b.right] != b.len {
            continue;
        }
        len[b.left] += len[b.right];
        len[b.right] = 0;
        next[b.left] = next[b.right];
        if let Some(r) = next[b.left] {
            prev[r] = Some(b.left);
        }
        if let Some(l) = prev[b.left] {
            try_add(&mut heap, l, b.left, &len);
        }
        if let Some(r) = next[b.left] {
            try_add(&mut heap, b.left, r, &len);
        }
    }
    // Every merged symbol is a token by construction; only single characters can miss.
    let mut i = Some(0);
    while let Some(s) = i {
        let piece = &text[start[s]..start[s] + len[s]];
        match lookup(piece) {
            Some(id) => out.push(id),
            None => out.extend(piece.bytes().map(byte)),
        }
        i = next[s];
    }
}

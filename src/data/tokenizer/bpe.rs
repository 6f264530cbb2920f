//! Byte-level BPE as llama.cpp runs it on a GGUF vocabulary: each pre-tokenized word is split into
//! characters, the adjacent pair with the lowest merge rank (leftmost on ties) merges until none is
//! left, and a final symbol that is not a token falls back to its single-byte tokens.
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// Merge ranks keyed by "left\u{1}right".
pub(crate) struct Merges {
    ranks: HashMap<String, u32>,
}

/// Separator of the two halves of a rank key (no byte-level token holds U+0001: byte 1 maps to Ā).
const SEP: char = '\u{1}';

impl Merges {
    /// Ranks from `tokenizer.ggml.merges` ("a b" per merge; the first space after the first byte
    /// splits, and a repeated pair keeps its first rank).
    pub fn new(merges: &[String]) -> Merges {
        let mut ranks = HashMap::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            // Byte search, as llama.cpp's `find(' ', 1)`: a space is never inside a UTF-8 sequence.
            let (a, b) = match m.bytes().skip(1).position(|c| c == b' ') {
                Some(p) => (&m[..p + 1], &m[p + 2..]),
                None => ("", ""),
            };
            ranks.entry(format!("{a}{SEP}{b}")).or_insert(i as u32);
        }
        Merges { ranks }
    }

    fn rank(&self, key: &mut String, a: &str, b: &str) -> Option<u32> {
        key.clear();
        key.push_str(a);
        key.push(SEP);
        key.push_str(b);
        self.ranks.get(key.as_str()).copied()
    }
}

/// A candidate merge; the heap pops the lowest rank, then the leftmost.
struct Pair {
    rank: u32,
    left: usize,
    right: usize,
    /// Byte length of the merged text when the pair was queued (stale entries are skipped).
    len: usize,
}

impl PartialEq for Pair {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Pair {}
impl PartialOrd for Pair {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pair {
    fn cmp(&self, o: &Self) -> Ordering {
        o.rank.cmp(&self.rank).then_with(|| o.left.cmp(&self.left))
    }
}

/// Appends the ids of one byte-level word. `lookup` maps a token text to its id.
pub(crate) fn encode_word(
    word: &str,
    merges: &Merges,
    ignore_merges: bool,
    lookup: &dyn Fn(&str) -> Option<u32>,
    out: &mut Vec<u32>,
) {
    if word.is_empty() {
        return;
    }
    if ignore_merges {
        if let Some(id) = lookup(word) {
            out.push(id);
            return;
        }
    }
    // Symbols: [start, start+len) in `word`; a merged-away symbol has len 0.
    let start: Vec<usize> = word.char_indices().map(|(i, _)| i).collect();
    let n = start.len();
    let mut len: Vec<usize> = (0..n)
        .map(|i| start.get(i + 1).copied().unwrap_or(word.len()) - start[i])
        .collect();
    let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
    let mut next: Vec<Option<usize>> = (0..n).map(|i| (i + 1 < n).then_some(i + 1)).collect();
    let mut heap = BinaryHeap::new();
    let mut key = String::new();
    let mut push = |heap: &mut BinaryHeap<Pair>, l: usize, r: usize, len: &[usize]| {
        let a = &word[start[l]..start[l] + len[l]];
        let b = &word[start[r]..start[r] + len[r]];
        if let Some(rank) = merges.rank(&mut key, a, b) {
            heap.push(Pair {
                rank,
                left: l,
                right: r,
                len: len[l] + len[r],
            });
        }
    };
    for i in 1..n {
        push(&mut heap, i - 1, i, &len);
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
            push(&mut heap, l, p.left, &len);
        }
        if let Some(r) = next[p.left] {
            push(&mut heap, p.left, r, &len);
        }
    }
    let mut i = Some(0);
    while let Some(s) = i {
        let piece = &word[start[s]..start[s] + len[s]];
        match lookup(piece) {
            Some(id) => out.push(id),
            // llama.cpp then looks each byte up as a one-byte token; only ASCII can be one.
            None => {
                for b in piece.bytes().filter(u8::is_ascii) {
                    let mut buf = [0u8; 4];
                    if let Some(id) = lookup((b as char).encode_utf8(&mut buf)) {
                        out.push(id);
                    }
                }
            }
        }
        i = next[s];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_rank_merges_first_and_unknown_symbols_fall_back_to_bytes() {
        let merges = Merges::new(&["b c".into(), "a b".into(), "a bc".into()]);
        let vocab: HashMap<&str, u32> = [
            ("a", 0),
            ("b", 1),
            ("c", 2),
            ("bc", 3),
            ("abc", 4),
            ("ab", 5),
        ]
        .into();
        let lookup = |t: &str| vocab.get(t).copied();
        let mut out = Vec::new();
        // "b c" (rank 0) wins over "a b" (rank 1); then "a bc".
        encode_word("abc", &merges, false, &lookup, &mut out);
        assert_eq!(out, [4]);
        out.clear();
        // "é" is no token and not ASCII: dropped, as llama.cpp does; "a" stays.
        encode_word("éa", &merges, false, &lookup, &mut out);
        assert_eq!(out, [0]);
    }
}

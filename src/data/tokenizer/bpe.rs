//! Byte-level BPE as llama.cpp runs it on a GGUF vocabulary: each pre-tokenized word is split into
//! characters, the adjacent pair with the lowest merge rank (leftmost on ties) merges until none is
//! left, and a final symbol that is not a token falls back to its single-byte tokens.
use super::merge::merge_pieces;
use std::cmp::Reverse;
use std::collections::HashMap;

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
    let mut key = String::new();
    // The lowest rank merges first.
    let pieces = merge_pieces(word, |a, b, _| merges.rank(&mut key, a, b).map(Reverse));
    for piece in pieces {
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

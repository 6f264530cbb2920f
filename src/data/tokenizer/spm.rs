//! SentencePiece BPE as llama.cpp runs it ("llama" vocabularies): adjacent symbols merge by the
//! highest score whose concatenation is a token (leftmost on ties); a character that no token
//! covers falls back to its `<0xNN>` byte tokens.
use super::merge::merge_pieces;

/// Appends the ids of `text` (spaces already escaped to U+2581). `lookup` maps a token text to its
/// id, `score` gives a token's score, `byte` the id of a raw byte.
pub(crate) fn encode(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<u32>,
    score: &dyn Fn(u32) -> f32,
    byte: &dyn Fn(u8) -> u32,
    out: &mut Vec<u32>,
) {
    // The highest score merges first (f32's total order, as `total_cmp`: the bits with the
    // magnitude flipped on negatives, compared as signed integers).
    let score_key = |id: u32| {
        let b = score(id).to_bits() as i32;
        b ^ (((b >> 31) as u32) >> 1) as i32
    };
    let pieces = merge_pieces(text, |_, _, ab| lookup(ab).map(score_key));
    // Every merged symbol is a token by construction; only single characters can miss.
    for piece in pieces {
        match lookup(piece) {
            Some(id) => out.push(id),
            None => out.extend(piece.bytes().map(byte)),
        }
    }
}

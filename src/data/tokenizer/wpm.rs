//! BERT's WordPiece as llama.cpp runs it ("bert" vocabularies): characters reduced to the first
//! code point of their NFD form and lower-cased, split at whitespace, punctuation, ASCII symbols
//! and CJK ideographs, control characters dropped; each word (with a "▁" word-start marker) is cut
//! greedily into the longest tokens, and a word that cannot be cut is the unknown token.
use fancy_regex::Regex;
use std::sync::OnceLock;

/// Unicode classes WordPiece splits on (the `tokenizers` crate's tables through fancy-regex).
struct Classes {
    space: Regex,
    punct: Regex,
    symbol: Regex,
    control: Regex,
}

fn classes() -> &'static Classes {
    static C: OnceLock<Classes> = OnceLock::new();
    C.get_or_init(|| {
        let re = |p: &str| Regex::new(p).unwrap_or_else(|e| panic!("built-in regex {p}: {e}"));
        Classes {
            space: re(r"^\s$"),
            punct: re(r"^\p{P}$"),
            symbol: re(r"^\p{S}$"),
            control: re(r"^\p{C}$"),
        }
    })
}

fn is(re: &Regex, c: char) -> bool {
    let mut buf = [0u8; 4];
    re.is_match(c.encode_utf8(&mut buf)).unwrap_or(false)
}

fn is_chinese(c: u32) -> bool {
    (0x4E00..=0x9FFF).contains(&c)
        || (0x3400..=0x4DBF).contains(&c)
        || (0x20000..=0x2A6DF).contains(&c)
        || (0x2A700..=0x2B73F).contains(&c)
        || (0x2B740..=0x2B81F).contains(&c)
        || (0x2B920..=0x2CEAF).contains(&c)
        || (0xF900..=0xFAFF).contains(&c)
        || (0x2F800..=0x2FA1F).contains(&c)
}

/// The first code point of `c`'s canonical decomposition.
fn nfd_first(c: char) -> char {
    if c.is_ascii() {
        return c;
    }
    let mut s = tokenizers::NormalizedString::from(c.to_string());
    s.nfd();
    s.get().chars().next().unwrap_or(c)
}

/// Lower case when it is one code point (llama.cpp's table maps one to one).
fn lower(c: char) -> char {
    let mut l = c.to_lowercase();
    match (l.next(), l.next()) {
        (Some(x), None) => x,
        _ => c,
    }
}

fn words(text: &str) -> Vec<String> {
    let cl = classes();
    let mut words = vec![String::new()];
    for c in text.chars().map(nfd_first) {
        if is(&cl.space, c) {
            if !words.last().is_some_and(String::is_empty) {
                words.push(String::new());
            }
            continue;
        }
        if c == '\0' || c == '\u{FFFD}' || is(&cl.control, c) {
            continue;
        }
        let l = lower(c);
        if is(&cl.punct, c) || (c < '\u{7F}' && is(&cl.symbol, c)) || is_chinese(c as u32) {
            if !words.last().is_some_and(String::is_empty) {
                words.push(String::new());
            }
            if let Some(w) = words.last_mut() {
                w.push(l);
            }
            words.push(String::new());
        } else if let Some(w) = words.last_mut() {
            w.push(l);
        }
    }
    if words.last().is_some_and(String::is_empty) {
        words.pop();
    }
    words
}

/// Appends the WordPiece ids of `text`.
pub(crate) fn encode(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<u32>,
    max_token_len: usize,
    unk: Option<u32>,
    out: &mut Vec<u32>,
) {
    for word in words(text) {
        if word.is_empty() {
            continue;
        }
        let w = format!("\u{2581}{word}");
        let b = w.as_bytes();
        let n = b.len();
        let before = out.len();
        let mut i = 0;
        while i < n {
            // Longest token starting at byte i (byte offsets, as llama.cpp slices bytes).
            let mut found = None;
            let mut j = n.min(i + max_token_len + 1);
            while j > i {
                if let Some(id) = std::str::from_utf8(&b[i..j]).ok().and_then(lookup) {
                    found = Some((id, j));
                    break;
                }
                j -= 1;
            }
            match found {
                Some((id, j)) => {
                    out.push(id);
                    i = j;
                }
                None => {
                    out.truncate(before);
                    break;
                }
            }
        }
        if out.len() == before {
            out.extend(unk);
        }
    }
}

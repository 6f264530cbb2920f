//! llama.cpp's BPE pre-tokenizers: the `tokenizer.ggml.pre` names it recognises, the regex sets
//! each one splits text with, and GPT-2's byte-to-unicode mapping applied to every piece.
//!
//! llama.cpp applies a set's regexes one after the other, each to the pieces the previous one left;
//! text a regex does not match stays a piece of its own (the "gaps" between matches). It runs its
//! regexes either through hand-written matchers (the GPT-2 and Llama-3 sets) or through `std::regex`
//! over a text whose non-ASCII code points are replaced by one byte per Unicode category: both are
//! equivalent to running the regex itself with Unicode classes, which we do with `fancy-regex`
//! (look-ahead is needed). Three translations keep llama.cpp's semantics: its `\p{S}` leaves out the
//! ASCII `~`; `std::regex`'s `\d` is ASCII only; and since llama.cpp replaces every non-ASCII
//! whitespace character by U+000B before matching, a literal class never matches one (`&&[^\s]`).
use fancy_regex::Regex;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The pre-tokenizer types of llama.cpp (`llama_vocab_pre_type`), one regex set each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum PreType {
    Default,
    Llama3,
    DeepseekLlm,
    DeepseekCoder,
    Deepseek3Llm,
    Falcon,
    Mpt,
    Starcoder,
    Gpt2,
    Refact,
    CommandR,
    Stablelm2,
    Qwen2,
    Olmo,
    Dbrx,
    Smaug,
    Poro,
    Chatglm4,
    Viking,
    Jais,
    Tekken,
    Smollm,
    Codeshell,
    Bloom,
    Gpt3Finnish,
    Exaone,
    Chameleon,
    Minerva,
    Gpt4o,
    Superbpe,
    Trillion,
    Bailingmoe,
    SeedCoder,
    Hunyuan,
    HunyuanDense,
    KimiK2,
}

/// What a `tokenizer.ggml.pre` name selects: the regex set and the flags llama.cpp sets with it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PreSpec {
    pub kind: PreType,
    /// Words that are whole tokens skip the merges (Llama 3, Tekken).
    pub ignore_merges: bool,
    /// Default of `add_bos_token` when the file does not say.
    pub add_bos: bool,
    /// Detokenising tidies " ," / " 's" and the like (llama.cpp's `clean_spaces`).
    pub clean_spaces: bool,
}

/// Maps a `tokenizer.ggml.pre` name to its spec, as llama.cpp's vocabulary loader does; `None` for a
/// name llama.cpp does not know. A missing name means "default".
pub(crate) fn pre_spec(name: &str) -> Option<PreSpec> {
    use PreType::*;
    let spec = |kind, ignore_merges, add_bos, clean_spaces| PreSpec {
        kind,
        ignore_merges,
        add_bos,
        clean_spaces,
    };
    Some(match name {
        "default" => spec(Default, false, false, true),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => spec(Llama3, true, true, true),
        "deepseek-llm" => spec(DeepseekLlm, false, false, false),
        "deepseek-coder" => spec(DeepseekCoder, false, false, false),
        "deepseek-v3" => spec(Deepseek3Llm, false, false, false),
        "falcon" => spec(Falcon, false, false, true),
        "mpt" => spec(Mpt, false, false, true),
        "starcoder" => spec(Starcoder, false, false, true),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" | "exaone4" => {
            spec(Gpt2, false, false, true)
        }
        "refact" => spec(Refact, false, false, true),
        "command-r" => spec(CommandR, false, false, false),
        "qwen2" | "deepseek-r1-qwen" => spec(Qwen2, false, false, false),
        // megrez takes Qwen2's regexes but keeps clean_spaces.
        "megrez" => spec(Qwen2, false, false, true),
        "stablelm2" => spec(Stablelm2, false, false, true),
        "olmo" => spec(Olmo, false, false, true),
        "dbrx" => spec(Dbrx, false, false, true),
        "smaug-bpe" => spec(Smaug, false, false, true),
        "poro-chat" => spec(Poro, false, false, false),
        "glm4" | "chatglm-bpe" => spec(Chatglm4, false, false, true),
        "viking" => spec(Viking, false, false, false),
        "jais" => spec(Jais, false, false, true),
        "tekken" => spec(Tekken, true, true, false),
        "smollm" => spec(Smollm, false, false, false),
        "codeshell" => spec(Codeshell, false, false, true),
        "bloom" => spec(Bloom, false, false, true),
        "gpt3-finnish" => spec(Gpt3Finnish, false, false, true),
        "exaone" => spec(Exaone, false, false, true),
        "chameleon" => spec(Chameleon, false, true, false),
        "minerva-7b" => spec(Minerva, false, false, true),
        "gpt-4o" | "llama4" => spec(Gpt4o, false, false, false),
        "superbpe" => spec(Superbpe, false, false, false),
        "trillion" => spec(Trillion, false, false, false),
        "bailingmoe" => spec(Bailingmoe, false, false, false),
        "seed-coder" => spec(SeedCoder, false, false, false),
        "hunyuan" => spec(Hunyuan, false, false, false),
        "hunyuan-dense" => spec(HunyuanDense, false, false, false),
        "kimi-k2" => spec(KimiK2, false, false, false),
        _ => return None,
    })
}

/// The names [`pre_spec`] accepts (for error messages and tests).
pub(crate) const PRE_NAMES: &[&str] = &[
    "default",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
    "falcon",
    "mpt",
    "starcoder",
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "gigachat",
    "jina-v2-es",
    "jina-v2-de",
    "a.x-4.0",
    "mellum",
    "jina-v1-en",
    "jina-v2-code",
    "roberta-bpe",
    "refact",
    "command-r",
    "qwen2",
    "deepseek-r1-qwen",
    "stablelm2",
    "olmo",
    "dbrx",
    "smaug-bpe",
    "poro-chat",
    "glm4",
    "chatglm-bpe",
    "viking",
    "jais",
    "tekken",
    "smollm",
    "codeshell",
    "bloom",
    "gpt3-finnish",
    "exaone",
    "exaone4",
    "chameleon",
    "minerva-7b",
    "megrez",
    "gpt-4o",
    "llama4",
    "superbpe",
    "trillion",
    "bailingmoe",
    "seed-coder",
    "hunyuan",
    "hunyuan-dense",
    "kimi-k2",
];

/// GPT-2's word split (llama.cpp runs it by hand; this is the regex it implements).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's split with the case-insensitive contractions spelled out (as llama.cpp does).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 / StableLM2: Llama 3's split with single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// BLOOM-style: runs of anything but whitespace and a few punctuation marks.
const BLOOM: &str = " ?[^(\\s|.,!?\u{2026}\u{3002}\u{FF0C}\u{3001}\u{964}\u{6D4}\u{60C})]+";
/// Cased words (Tekken, GPT-4o): an upper/other-letter run then a lower/other-letter run. llama.cpp
/// writes "upper" as "a letter that is not a-z" (and "lower" as "not A-Z"), which we keep.
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// DeepSeek LLM's Latin/Greek/Cyrillic/... letter class (from its tokenizer.json, as llama.cpp has it).
const DEEPSEEK_LLM_LETTERS: &str = "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+";
/// Kimi K2's split as llama.cpp's hand-written matcher runs it (not quite tokenization_kimi.py's
/// regex): Han runs by llama.cpp's own Han ranges, then letter runs of any case without marks.
const KIMI_K2: &str = "[\u{3400}-\u{4DBF}\u{4E00}-\u{9FFF}\u{F900}-\u{FAFF}\u{20000}-\u{2A6DF}\u{2A700}-\u{2EBEF}\u{2F800}-\u{2FA1F}]+|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}&&[^\u{3400}-\u{4DBF}\u{4E00}-\u{9FFF}\u{F900}-\u{FAFF}\u{20000}-\u{2A6DF}\u{2A700}-\u{2EBEF}\u{2F800}-\u{2FA1F}]]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/// The regexes a pre-tokenizer type applies, in order.
fn regex_set(kind: PreType) -> Vec<&'static str> {
    use PreType::*;
    match kind {
        Llama3 | Dbrx | Smaug | Chatglm4 => vec![LLAMA3],
        DeepseekLlm => vec![
            r"[\r\n]",
            DEEPSEEK_LLM_LETTERS,
            "\\s?[!-/:-~\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}&&[^\\s]]+",
            r"\s+$",
            "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}&&[^\\s]]+",
            r"\p{N}+",
        ],
        Deepseek3Llm | HunyuanDense => vec![
            r"\p{N}{1,3}",
            "[\u{4E00}-\u{9FA5}\u{3040}-\u{309F}\u{30A0}-\u{30FF}]+",
            // llama.cpp's \p{S} has no ASCII '~' (its category collapse maps only $+<=>^`| there).
            r"[!-/:-@\[-`{-~][A-Za-z]+|[^\r\n\p{L}\p{P}[\p{S}&&[^~]]]?[\p{L}\p{M}]+| ?[\p{P}[\p{S}&&[^~]]]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        DeepseekCoder => vec![
            r"[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}&&[^\\s]]+",
            r"\p{N}",
        ],
        Falcon => vec![r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
        Starcoder | Refact | CommandR | Smollm | Codeshell | Exaone | Minerva => {
            vec![r"\p{N}", GPT2]
        }
        Gpt2 | Mpt | Olmo | Jais | Trillion => vec![GPT2],
        Stablelm2 | Qwen2 | Hunyuan => vec![QWEN2],
        Poro | Bloom | Gpt3Finnish => vec![BLOOM],
        Viking => vec![BLOOM, r"\p{N}"],
        Tekken => vec![TEKKEN],
        Chameleon => vec![
            r"<sentinel:[0-9]+>",
            r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
            r"([\t\n]|    |  )",
            r"\p{N}",
            r"[\p{P}!-/:-@\[-`{-~]",
            GPT2,
        ],
        Gpt4o => vec![GPT4O],
        KimiK2 => vec![KIMI_K2],
        // std::regex's \d is ASCII digits.
        Superbpe => vec![r"\p{N}+", r"(?=([0-9]{3})+(?![0-9]))"],
        Bailingmoe => vec![
            r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
        ],
        SeedCoder => vec![
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        Default => vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    }
}

/// A compiled pre-tokenizer: splits text into byte-level-encoded words for the BPE merges.
pub(crate) struct PreTokenizer {
    regexes: Vec<Regex>,
    /// GPT-2's byte -> printable character map.
    byte_char: [char; 256],
}

impl PreTokenizer {
    /// Compiles the regex set of `kind` (every set compiles; a failure is a bug, hence the message).
    pub fn new(kind: PreType) -> Result<PreTokenizer, String> {
        // Compiled once per type and process: the sets are constants, and compiling their
        // Unicode classes costs milliseconds per tokenizer (most of a fuzz input's time).
        static COMPILED: OnceLock<Mutex<HashMap<PreType, Vec<Regex>>>> = OnceLock::new();
        let cache = COMPILED.get_or_init(Default::default);
        let cached = cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&kind)
            .cloned();
        let regexes = match cached {
            Some(r) => r,
            None => {
                let r = regex_set(kind)
                    .into_iter()
                    .map(|r| Regex::new(r).map_err(|e| format!("pre-tokenizer regex {r:?}: {e}")))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
                c.insert(kind, r.clone());
                r
            }
        };
        Ok(PreTokenizer {
            regexes,
            byte_char: byte_to_char(),
        })
    }

    /// The words of `text`, each mapped byte by byte to GPT-2's printable characters.
    pub fn split(&self, text: &str) -> Vec<String> {
        let mut pieces: Vec<(usize, usize)> = vec![(0, text.len())];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for &(s, e) in &pieces {
                split_piece(re, text, s, e, &mut next);
            }
            pieces = next;
        }
        pieces
            .into_iter()
            .map(|(s, e)| {
                text[s..e]
                    .bytes()
                    .map(|b| self.byte_char[b as usize])
                    .collect()
            })
            .collect()
    }
}

/// Splits `text[s..e]` at the matches of `re`: every match and every run of text between matches
/// is a piece (empty matches only mark a split point).
fn split_piece(re: &Regex, text: &str, s: usize, e: usize, out: &mut Vec<(usize, usize)>) {
    let slice = &text[s..e];
    let mut last = 0;
    let mut pos = 0;
    while pos <= slice.len() {
        // A regex that backtracks past its limit: llama.cpp's std::regex would throw; keep the rest
        // of the piece whole rather than fail the whole text.
        let m = match re.find_from_pos(slice, pos) {
            Ok(Some(m)) => m,
            _ => break,
        };
        if m.start() > last {
            out.push((s + last, s + m.start()));
        }
        if m.end() > m.start() {
            out.push((s + m.start(), s + m.end()));
            pos = m.end();
        } else {
            // Empty match: try again one character further on.
            pos = m.end() + slice[m.end()..].chars().next().map_or(1, char::len_utf8);
        }
        last = m.end();
    }
    if last < slice.len() {
        out.push((s + last, e));
    }
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the other 68 bytes map
/// to U+0100.. in order.
pub(crate) fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    map
}

/// The inverse of [`byte_to_char`].
pub(crate) fn char_to_byte() -> HashMap<char, u8> {
    byte_to_char()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_has_a_compiling_regex_set() {
        assert_eq!(PRE_NAMES.len(), 59);
        for name in PRE_NAMES {
            let spec = pre_spec(name).unwrap_or_else(|| panic!("{name}"));
            PreTokenizer::new(spec.kind).unwrap();
        }
        assert!(pre_spec("no-such-pre").is_none());
    }

    #[test]
    fn gpt2_split_keeps_one_space_before_words() {
        let p = PreTokenizer::new(PreType::Gpt2).unwrap();
        // "Ġ" is the byte-level space.
        assert_eq!(
            p.split("Hello  world's 42!"),
            ["Hello", "Ġ", "Ġworld", "'s", "Ġ42", "!"]
        );
    }
}

//! Preference pairs for DPO: `{"prompt", "chosen", "rejected"}` JSONL, as strings or as chat
//! messages, tokenised with qtune's prompt/completion convention so that SFT and DPO on one model
//! agree.
//!
//! - Strings: encode(prompt, with the tokenizer's special tokens: BOS where it adds one) then, per
//!   completion, encode(completion, no special tokens) + EOS. (TRL 0.12 drops the prompt's BOS; TRL
//!   0.11 and earlier kept it, as we do.)
//! - Conversational (`"prompt": [messages]`, `"chosen"`/`"rejected"`: the assistant turn(s) that
//!   follow; or, without `"prompt"`, chosen and rejected as whole conversations whose shared
//!   leading turns are the prompt): rendered with the model's chat template as SFT's `messages`
//!   are — the prompt with the generation prompt, each completion as the text the template adds
//!   after it (TRL's `apply_chat_template`). The prompt is encoded with the tokenizer's special
//!   tokens unless the template already wrote the BOS text (one BOS either way), each completion
//!   without them + EOS (so a completion ends with the template's end-of-turn marker and EOS).
//! - Over-long pairs (prompt + the longer completion > `seq_len`): a prompt longer than half of
//!   `seq_len` keeps its last tokens, then each completion is cut at its end to fit.
use super::jsonl::{for_each_line, kind, parse_messages, DataOptions, Loader};
use super::template::Message;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use serde_json::{Map, Value as Json};
use std::path::Path;

/// One tokenised preference pair; each completion ends with EOS (unless cut).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pair {
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Preferred completion ids.
    pub chosen: Vec<u32>,
    /// Dispreferred completion ids.
    pub rejected: Vec<u32>,
}

/// How a pairs file is shaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairFormat {
    /// Prompt and completions as strings.
    Text,
    /// Chat messages rendered with the chat template.
    Conversational,
}

/// What loading a pairs file found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairStats {
    /// Pairs read.
    pub n: usize,
    /// Pairs cut to `seq_len`.
    pub truncated: usize,
    /// Tokens over both sequences of every pair.
    pub tokens: usize,
    /// The file's format.
    pub format: PairFormat,
}

/// Reads `path` (JSONL of preference pairs) and tokenises every line.
pub fn load_pairs(
    path: &Path,
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Result<(Vec<Pair>, PairStats)> {
    let why = " for preference pairs (prompt and completion need 4 tokens)";
    opts.require_seq_len(4, why)?;
    let mut l = Loader::new(path, tok, opts);
    let (mut pairs, mut truncated) = (Vec::new(), 0);
    for_each_line(path, |no, line| {
        let mut p = l.pair(line, no)?;
        truncated += fit_pair(&mut p, opts.seq_len) as usize;
        pairs.push(p);
        Ok(())
    })?;
    let Some(format) = l.format else {
        return Err(Error::Json {
            path: path.to_path_buf(),
            msg: "the file holds no preference pairs (every line is blank)".into(),
        });
    };
    let tokens = pairs
        .iter()
        .map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len())
        .sum();
    let stats = PairStats {
        n: pairs.len(),
        truncated,
        tokens,
        format,
    };
    Ok((pairs, stats))
}

/// Cuts an over-long pair (see the module doc); true if it was cut.
pub fn fit_pair(p: &mut Pair, seq_len: usize) -> bool {
    let longest = p.chosen.len().max(p.rejected.len());
    if p.prompt.len() + longest <= seq_len {
        return false;
    }
    let half = seq_len / 2;
    if p.prompt.len() > half {
        p.prompt.drain(..p.prompt.len() - half);
    }
    let room = seq_len - p.prompt.len();
    p.chosen.truncate(room);
    p.rejected.truncate(room);
    true
}

impl Loader<'_, PairFormat> {
    fn pair(&mut self, line: &str, no: usize) -> Result<Pair> {
        let obj = self.object(line, no)?;
        self.check_keys(&obj, no)?;
        let conv = matches!(obj.get("chosen"), Some(Json::Array(_)));
        let fmt = if conv {
            PairFormat::Conversational
        } else {
            PairFormat::Text
        };
        match self.format {
            None => self.format = Some(fmt),
            Some(f) if f != fmt => {
                return Err(self.err(
                    no,
                    "mixed formats: strings and chat messages in one file; use one per file",
                ))
            }
            Some(_) => {}
        }
        let eos = self.eos(no, "completion")?;
        let (prompt, chosen, rejected) = if conv {
            self.render(&obj, no)?
        } else {
            let text = |key: &str| match obj.get(key) {
                Some(Json::String(s)) => Ok(s.as_str()),
                Some(o) => {
                    Err(self.err(no, format!("\"{key}\" must be a string, found {}", kind(o))))
                }
                None => Err(self.err(no, format!("missing \"{key}\""))),
            };
            let p = self.tok.encode(text("prompt")?, true)?;
            (
                p,
                text("chosen")?.to_string(),
                text("rejected")?.to_string(),
            )
        };
        for (k, c) in [("chosen", &chosen), ("rejected", &rejected)] {
            if c.is_empty() {
                return Err(self.err(no, format!("empty \"{k}\": nothing to prefer")));
            }
        }
        if chosen == rejected {
            return Err(self.err(
                no,
                "\"chosen\" and \"rejected\" are the same: the pair holds no preference",
            ));
        }
        let completion = |c: &str| -> Result<Vec<u32>> {
            let mut ids = self.tok.encode(c, false)?;
            ids.push(eos);
            Ok(ids)
        };
        Ok(Pair {
            prompt,
            chosen: completion(&chosen)?,
            rejected: completion(&rejected)?,
        })
    }

    /// Keys of a pairs line; an SFT line is named as such.
    fn check_keys(&self, obj: &Map<String, Json>, no: usize) -> Result<()> {
        let sft = ["text", "completion", "messages", "instruction", "output"];
        if !obj.contains_key("chosen") || !obj.contains_key("rejected") {
            if let Some(k) = sft.iter().find(|k| obj.contains_key(**k)) {
                return Err(self.err(
                    no,
                    format!(
                        "this is supervised data (key \"{k}\"), not preference pairs; train on it \
                         with --objective sft, or give {{\"prompt\", \"chosen\", \"rejected\"}} lines"
                    ),
                ));
            }
            let missing = if obj.contains_key("chosen") {
                "rejected"
            } else {
                "chosen"
            };
            return Err(self.err(
                no,
                format!(
                    "missing \"{missing}\": a preference pair is {{\"prompt\", \"chosen\", \
                     \"rejected\"}}"
                ),
            ));
        }
        if let Some(bad) = obj
            .keys()
            .find(|k| !["prompt", "chosen", "rejected"].contains(&k.as_str()))
        {
            return Err(self.err(
                no,
                format!("unknown key \"{bad}\" (allowed: prompt, chosen, rejected)"),
            ));
        }
        Ok(())
    }

    /// Prompt ids and the two completions' texts of a conversational pair.
    fn render(&mut self, obj: &Map<String, Json>, no: usize) -> Result<(Vec<u32>, String, String)> {
        let err = |m: String| self.err(no, m);
        let mut chosen = parse_messages(obj.get("chosen"), "chosen", &err)?;
        let mut rejected = parse_messages(obj.get("rejected"), "rejected", &err)?;
        let prompt: Vec<Message> = match obj.get("prompt") {
            Some(p) => parse_messages(Some(p), "prompt", &err)?,
            None => {
                // Whole conversations: the shared leading turns are the prompt.
                let n = chosen
                    .iter()
                    .zip(&rejected)
                    .take_while(|(a, b)| a == b)
                    .count();
                let p = chosen[..n].to_vec();
                chosen.drain(..n);
                rejected.drain(..n);
                p
            }
        };
        if prompt.is_empty() {
            return Err(self.err(no, "the prompt has no messages"));
        }
        for (k, c) in [("chosen", &chosen), ("rejected", &rejected)] {
            if c.is_empty() {
                return Err(self.err(no, format!("\"{k}\" adds no message to the prompt")));
            }
        }
        let t = self.template(no)?;
        let head = t
            .render(&prompt, true)
            .map_err(|e| self.err(no, e.to_string()))?;
        let tail = |c: &[Message]| -> Result<String> {
            let all: Vec<Message> = prompt.iter().chain(c).cloned().collect();
            let full = t
                .render(&all, false)
                .map_err(|e| self.err(no, e.to_string()))?;
            full.strip_prefix(&head).map(str::to_string).ok_or_else(|| {
                self.err(
                    no,
                    "the chat template does not render the prompt (with its generation prompt) \
                     as the start of the whole conversation, so the completion cannot be cut \
                     from it",
                )
            })
        };
        let (c, r) = (tail(&chosen)?, tail(&rejected)?);
        // The prompt gets the tokenizer's special tokens (BOS), as the string form does, unless
        // the template already wrote the BOS text itself (Llama-2's and Llama-3's do): one BOS.
        let bos_text = self.tok.bos_id().and_then(|b| self.tok.id_to_token(b));
        let has_bos = bos_text.is_some_and(|b| !b.is_empty() && head.starts_with(&b));
        Ok((self.tok.encode(&head, !has_bos)?, c, r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(p: usize, c: usize, r: usize) -> Pair {
        Pair {
            prompt: (0..p as u32).collect(),
            chosen: (100..100 + c as u32).collect(),
            rejected: (200..200 + r as u32).collect(),
        }
    }

    #[test]
    fn long_prompts_keep_their_end_and_completions_their_start() {
        let mut a = pair(3, 4, 2);
        assert!(!fit_pair(&mut a, 8));
        let mut b = pair(10, 6, 3);
        assert!(fit_pair(&mut b, 8));
        assert_eq!(b.prompt, vec![6, 7, 8, 9]);
        assert_eq!(b.chosen, vec![100, 101, 102, 103]);
        assert_eq!(b.rejected, vec![200, 201, 202]);
        let mut c = pair(3, 9, 1);
        assert!(fit_pair(&mut c, 8));
        assert_eq!(
            (c.prompt.len(), c.chosen.len(), c.rejected.len()),
            (3, 5, 1)
        );
    }
}

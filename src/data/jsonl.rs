//! JSONL training data: format detection per file, validation per line, tokenisation with loss
//! masks, truncation and optional packing. Any bad line fails the whole load (file:line, reason):
//! nothing is trained on data we could not read as intended.
use super::batch::pack;
use super::template::{ChatTemplate, Message};
use super::tokenizer::Tokenizer;
use super::IGNORE;
use crate::error::{Error, Result};
use serde_json::{Map, Value as Json};
use std::cell::OnceCell;
use std::path::{Path, PathBuf};

/// How a file's lines are shaped (detected from its first line; every line must agree).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFormat {
    /// `{"text": ...}`
    Text,
    /// `{"prompt": ..., "completion": ...}`
    PromptCompletion,
    /// `{"messages": [{"role": ..., "content": ...}, ...]}`
    Messages,
    /// `{"instruction": ..., "input": ... (optional), "output": ...}`
    Alpaca,
}

impl DataFormat {
    /// The keys that name this format, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            DataFormat::Text => "{\"text\"}",
            DataFormat::PromptCompletion => "{\"prompt\", \"completion\"}",
            DataFormat::Messages => "{\"messages\"}",
            DataFormat::Alpaca => "{\"instruction\", \"input\", \"output\"}",
        }
    }
}

/// How examples are built from the data.
#[derive(Clone, Debug)]
pub struct DataOptions {
    /// Put the loss on prompt / user tokens too.
    pub train_on_prompt: bool,
    /// Longest sequence in tokens; longer examples are cut (and counted).
    pub seq_len: usize,
    /// Concatenate consecutive examples into sequences of up to `seq_len` tokens.
    pub packing: bool,
    /// Chat template for `messages`: a built-in name ("chatml"), a file of Jinja, or Jinja text;
    /// `None` uses the model's.
    pub template: Option<String>,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            train_on_prompt: false,
            seq_len: 1024,
            packing: false,
            template: None,
        }
    }
}

impl DataOptions {
    /// Refuses a `seq_len` under `min` tokens; `why` ends the message.
    pub(crate) fn require_seq_len(&self, min: usize, why: &str) -> Result<()> {
        if self.seq_len < min {
            return Err(Error::Invalid(format!(
                "seq_len {} is too short{why}",
                self.seq_len
            )));
        }
        Ok(())
    }
}

/// One training sequence; `labels[t]` is `ids[t]` where token t carries loss, else -100 (the model
/// predicts `labels[t+1]` at position t).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Same length as `ids`; -100 = no loss.
    pub labels: Vec<i64>,
}

/// What loading found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataStats {
    /// Examples read (non-blank lines).
    pub n: usize,
    /// Examples longer than `seq_len`, cut to it.
    pub truncated: usize,
    /// Examples left with no target after the cut (the prompt filled `seq_len`), dropped.
    pub dropped: usize,
    /// Tokens in the returned sequences.
    pub tokens: usize,
    /// Tokens that carry loss (positions after the first whose label is not -100).
    pub targets: usize,
    /// Sequences returned (fewer than `n` when packed).
    pub sequences: usize,
    /// The file's format.
    pub format: DataFormat,
}

impl std::fmt::Display for DataStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} examples ({}) -> {} sequences, {} tokens, {} with loss; {} truncated to seq_len, \
             {} dropped (no target left)",
            self.n,
            self.format.describe(),
            self.sequences,
            self.tokens,
            self.targets,
            self.truncated,
            self.dropped
        )
    }
}

/// Calls `f(number, line)` on each non-blank line of the JSONL file `path` (numbers from 1), in
/// order: a UTF-8 byte-order mark (Windows editors) is not part of the first line's JSON, CRLF
/// endings are accepted, and a line that is not UTF-8 is an error naming it.
pub(crate) fn for_each_line(
    path: &Path,
    mut f: impl FnMut(usize, &str) -> Result<()>,
) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = std::str::from_utf8(line).map_err(|e| {
            let msg = format!("not valid UTF-8 (byte {} of the line)", e.valid_up_to());
            line_err(path, i + 1, msg)
        })?;
        if !line.trim().is_empty() {
            f(i + 1, line)?;
        }
    }
    Ok(())
}

/// An error on line `line` of `path`.
pub(crate) fn line_err(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

/// Reads `path` (JSONL), tokenises every line and returns the examples and what was found.
pub fn load_examples(
    path: &Path,
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Result<(Vec<Example>, DataStats)> {
    opts.require_seq_len(2, ": a sequence needs at least 2 tokens")?;
    let mut loader = Loader::new(path, tok, opts);
    let mut examples = Vec::new();
    let (mut n, mut truncated, mut dropped) = (0, 0, 0);
    for_each_line(path, |lineno, line| {
        n += 1;
        let mut ex = loader.example(line, lineno)?;
        if ex.ids.len() > opts.seq_len {
            ex.ids.truncate(opts.seq_len);
            ex.labels.truncate(opts.seq_len);
            truncated += 1;
        }
        if count_targets(&ex.labels) == 0 {
            dropped += 1;
        } else {
            examples.push(ex);
        }
        Ok(())
    })?;
    let Some((format, _)) = loader.format else {
        return Err(Error::Json {
            path: path.to_path_buf(),
            msg: "the file holds no examples (every line is blank)".into(),
        });
    };
    if examples.is_empty() {
        return Err(Error::Json {
            path: path.to_path_buf(),
            msg: format!(
                "no example has a token to train on within seq_len {} (prompts fill it); raise \
                 --seq-len",
                opts.seq_len
            ),
        });
    }
    if opts.packing {
        examples = pack(examples, opts.seq_len);
    }
    let stats = DataStats {
        n,
        truncated,
        dropped,
        tokens: examples.iter().map(|e| e.ids.len()).sum(),
        targets: examples.iter().map(|e| count_targets(&e.labels)).sum(),
        sequences: examples.len(),
        format,
    };
    Ok((examples, stats))
}

/// Positions that the loss counts: labels after the first that are not -100.
pub fn count_targets(labels: &[i64]) -> usize {
    labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
}

/// A JSONL file being read: SFT's examples (`F`: the format and the line that set it) and DPO's
/// preference pairs (`F`: their format) both read through it.
pub(crate) struct Loader<'a, F> {
    pub(crate) path: PathBuf,
    pub(crate) tok: &'a Tokenizer,
    pub(crate) opts: &'a DataOptions,
    /// What the first line set.
    pub(crate) format: Option<F>,
    /// The chat template, compiled when a line first needs it.
    template: OnceCell<ChatTemplate>,
}

impl<'a, F> Loader<'a, F> {
    pub(crate) fn new(path: &Path, tok: &'a Tokenizer, opts: &'a DataOptions) -> Self {
        Loader {
            path: path.to_path_buf(),
            tok,
            opts,
            format: None,
            template: OnceCell::new(),
        }
    }

    pub(crate) fn err(&self, line: usize, msg: impl Into<String>) -> Error {
        line_err(&self.path, line, msg)
    }

    /// Line `no` as a JSON object.
    pub(crate) fn object(&self, line: &str, no: usize) -> Result<Map<String, Json>> {
        let v: Json =
            serde_json::from_str(line).map_err(|e| self.err(no, format!("not valid JSON: {e}")))?;
        let Json::Object(obj) = v else {
            return Err(self.err(no, "expected a JSON object"));
        };
        Ok(obj)
    }

    /// The tokenizer's EOS id, which every `what` (example, completion) ends with.
    pub(crate) fn eos(&self, no: usize, what: &str) -> Result<u32> {
        self.tok.eos_id().ok_or_else(|| {
            self.err(
                no,
                format!(
                    "the tokenizer ({}) names no EOS token, which every {what} ends with",
                    self.tok.source().display()
                ),
            )
        })
    }

    /// The chat template (`--template`, else the tokenizer's), compiled on first use; its errors
    /// name line `no`.
    pub(crate) fn template(&self, no: usize) -> Result<&ChatTemplate> {
        if let Some(t) = self.template.get() {
            return Ok(t);
        }
        let t = compile_template(self.tok, self.opts.template.as_deref(), &|m| {
            self.err(no, m)
        })?;
        Ok(self.template.get_or_init(|| t))
    }
}

impl Loader<'_, (DataFormat, usize)> {
    fn example(&mut self, line: &str, no: usize) -> Result<Example> {
        let obj = self.object(line, no)?;
        let fmt = self.detect(&obj, no)?;
        match self.format {
            None => self.format = Some((fmt, no)),
            Some((f, first)) if f != fmt => {
                return Err(self.err(
                    no,
                    format!(
                        "mixed formats: this line is {} but line {first} made the file {}; use \
                         one format per file",
                        fmt.describe(),
                        f.describe()
                    ),
                ))
            }
            Some(_) => {}
        }
        let text = |key: &str| -> Result<&str> {
            match obj.get(key) {
                Some(Json::String(s)) => Ok(s),
                Some(other) => Err(self.err(
                    no,
                    format!("\"{key}\" must be a string, found {}", kind(other)),
                )),
                None => Err(self.err(no, format!("missing \"{key}\""))),
            }
        };
        match fmt {
            DataFormat::Text => {
                let t = text("text")?;
                if t.is_empty() {
                    return Err(self.err(no, "empty \"text\""));
                }
                let mut ids = self.tok.encode(t, true)?;
                ids.push(self.eos(no, "example")?);
                let labels = ids.iter().map(|&i| i as i64).collect();
                Ok(Example { ids, labels })
            }
            DataFormat::PromptCompletion => {
                let (p, c) = (text("prompt")?, text("completion")?);
                if c.is_empty() {
                    return Err(self.err(no, "empty \"completion\": nothing to train on"));
                }
                self.prompt_completion(p, c, no)
            }
            DataFormat::Alpaca => {
                let (ins, out) = (text("instruction")?, text("output")?);
                let input = match obj.get("input") {
                    None => "",
                    Some(_) => text("input")?,
                };
                if out.is_empty() {
                    return Err(self.err(no, "empty \"output\": nothing to train on"));
                }
                self.prompt_completion(&alpaca_prompt(ins, input), out, no)
            }
            DataFormat::Messages => self.messages(&obj, no),
        }
    }

    fn prompt_completion(&self, prompt: &str, completion: &str, no: usize) -> Result<Example> {
        let mut ids = self.tok.encode(prompt, true)?;
        let n_prompt = ids.len();
        ids.extend(self.tok.encode(completion, false)?);
        ids.push(self.eos(no, "example")?);
        let labels = ids
            .iter()
            .enumerate()
            .map(|(t, &i)| {
                if t < n_prompt && !self.opts.train_on_prompt {
                    IGNORE
                } else {
                    i as i64
                }
            })
            .collect();
        Ok(Example { ids, labels })
    }

    fn messages(&mut self, obj: &Map<String, Json>, no: usize) -> Result<Example> {
        let msgs = parse_messages(obj.get("messages"), "messages", &|m| self.err(no, m))?;
        if msgs.is_empty() {
            return Err(self.err(no, "\"messages\" is empty"));
        }
        if !self.opts.train_on_prompt && !msgs.iter().any(|m| m.role == "assistant") {
            return Err(self.err(
                no,
                "no assistant message: nothing to train on (or use --train-on-prompt)",
            ));
        }
        let segs = self
            .template(no)?
            .segments(&msgs)
            .map_err(|e| self.err(no, e.to_string()))?;
        let (mut ids, mut labels) = (Vec::new(), Vec::new());
        for (seg, loss) in segs {
            let seg_ids = self.tok.encode(&seg, false)?;
            let on = loss || self.opts.train_on_prompt;
            labels.extend(seg_ids.iter().map(|&i| if on { i as i64 } else { IGNORE }));
            ids.extend(seg_ids);
        }
        Ok(Example { ids, labels })
    }

    fn detect(&self, obj: &Map<String, Json>, no: usize) -> Result<DataFormat> {
        let has = |k: &str| obj.contains_key(k);
        if has("chosen") || has("rejected") {
            return Err(self.err(
                no,
                "this is preference data ({\"prompt\", \"chosen\", \"rejected\"}), not \
                 supervised examples; train on it with --objective dpo",
            ));
        }
        let (fmt, allowed): (DataFormat, &[&str]) = if has("messages") {
            (DataFormat::Messages, &["messages"])
        } else if has("prompt") || has("completion") {
            (DataFormat::PromptCompletion, &["prompt", "completion"])
        } else if has("instruction") || has("output") {
            (DataFormat::Alpaca, &["instruction", "input", "output"])
        } else if has("text") {
            (DataFormat::Text, &["text"])
        } else {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            return Err(self.err(
                no,
                format!(
                    "unknown format (keys: {keys:?}); expected {{\"text\"}}, {{\"prompt\", \
                     \"completion\"}}, {{\"messages\"}} or {{\"instruction\", \"input\", \
                     \"output\"}}"
                ),
            ));
        };
        if let Some(bad) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(self.err(
                no,
                format!(
                    "unknown key \"{bad}\" for the {} format (allowed: {allowed:?})",
                    fmt.describe()
                ),
            ));
        }
        Ok(fmt)
    }
}

/// The `{"role", "content"}` list under `key` of a line (`err` makes a `file:line` error).
pub(crate) fn parse_messages(
    v: Option<&Json>,
    key: &str,
    err: &dyn Fn(String) -> Error,
) -> Result<Vec<Message>> {
    let Some(Json::Array(list)) = v else {
        return Err(err(format!(
            "\"{key}\" must be a list of {{\"role\", \"content\"}}"
        )));
    };
    let mut msgs = Vec::with_capacity(list.len());
    for (k, m) in list.iter().enumerate() {
        let Json::Object(m) = m else {
            return Err(err(format!("message {k} is {}, not an object", kind(m))));
        };
        if let Some(bad) = m.keys().find(|k| *k != "role" && *k != "content") {
            return Err(err(format!(
                "message {k} has unknown key \"{bad}\" (expected role, content)"
            )));
        }
        let field = |key: &str| match m.get(key) {
            Some(Json::String(s)) => Ok(s.clone()),
            Some(o) => Err(err(format!(
                "message {k}: \"{key}\" must be a string, found {}",
                kind(o)
            ))),
            None => Err(err(format!("message {k} has no \"{key}\""))),
        };
        let (role, content) = (field("role")?, field("content")?);
        if role == "assistant" && content.is_empty() {
            return Err(err(format!("message {k}: empty assistant content")));
        }
        msgs.push(Message { role, content });
    }
    Ok(msgs)
}

/// The chat template for `messages` data: `template` (a built-in name, a file of Jinja, or Jinja
/// text), else the model's (`err` makes a `file:line` error).
pub(crate) fn compile_template(
    tok: &Tokenizer,
    template: Option<&str>,
    err: &dyn Fn(String) -> Error,
) -> Result<ChatTemplate> {
    let (source, origin) = match template {
        Some(t) => {
            if let Some(b) = ChatTemplate::builtin(t) {
                (b.to_string(), format!("the built-in chat template {t}"))
            } else if Path::new(t).is_file() {
                let s = std::fs::read_to_string(t).map_err(|e| Error::io(t, e))?;
                (s, format!("chat template file {t}"))
            } else if t.contains("{%") || t.contains("{{") {
                (t.to_string(), "the --chat-template text".to_string())
            } else {
                let names: Vec<&str> = super::BUILTIN_TEMPLATES.iter().map(|(n, _)| *n).collect();
                return Err(Error::Invalid(format!(
                    "template '{t}' is neither a built-in ({}) nor a file of Jinja",
                    names.join(", ")
                )));
            }
        }
        None => match tok.chat_template() {
            Some(t) => (
                t.to_string(),
                format!("the chat template of {}", tok.source().display()),
            ),
            None => {
                return Err(err(format!(
                    "\"messages\" need a chat template and the model ({}) has none; pick a \
                     built-in one (--chat-template chatml)",
                    tok.source().display()
                )))
            }
        },
    };
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    let t = ChatTemplate::new(&source, &name(tok.bos_id()), &name(tok.eos_id()))
        .map_err(|e| Error::Invalid(format!("{origin}: {e}")))?;
    Ok(t.with_origin(origin))
}

/// Stanford Alpaca's prompt (with and without an input).
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

pub(crate) fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

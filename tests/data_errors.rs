//! Every bad-input case of a training JSONL is an error naming file:line and what is wrong.
use qtune::data::{load_examples, DataOptions, Tokenizer};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chat_tok() -> Tokenizer {
    Tokenizer::from_model_dir(&root().join("tests/fixtures/data/model_chat")).unwrap()
}

/// Loads `lines` as a JSONL file; returns the error message.
fn err_with(tok: &Tokenizer, opts: &DataOptions, lines: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    match load_examples(&p, tok, opts) {
        Ok((ex, _)) => panic!("{lines:?} loaded {} examples", ex.len()),
        Err(e) => e.to_string(),
    }
}

/// Asserts the error names bad.jsonl:`line` and contains `what`.
fn check(lines: &[&str], line: usize, what: &str) {
    check_opts(&DataOptions::default(), lines, line, what);
}

/// `line` 0: an error about the whole file, named without a line.
fn check_opts(opts: &DataOptions, lines: &[&str], line: usize, what: &str) {
    let msg = err_with(&chat_tok(), opts, lines);
    let at = match line {
        0 => "bad.jsonl: ".to_string(),
        n => format!("bad.jsonl:{n}: "),
    };
    assert!(
        msg.contains(&at),
        "{lines:?}: error does not name line {line}: {msg}"
    );
    assert!(msg.contains(what), "{lines:?}: expected '{what}' in: {msg}");
}

const OK_TEXT: &str = r#"{"text": "fine"}"#;

#[test]
fn bad_json() {
    check(
        &[OK_TEXT, r#"{"text": "unterminated}"#],
        2,
        "not valid JSON",
    );
    check(&[r#"["a list"]"#], 1, "expected a JSON object");
}

#[test]
fn unknown_format_and_unknown_keys() {
    check(
        &[r#"{"question": "q", "answer": "a"}"#],
        1,
        "unknown format",
    );
    check(
        &[r#"{"text": "a", "label": 1}"#],
        1,
        "unknown key \"label\"",
    );
    check(
        &[r#"{"prompt": "a", "completion": "b", "text": "c"}"#],
        1,
        "unknown key \"text\"",
    );
}

#[test]
fn mixed_formats() {
    check(
        &[OK_TEXT, "", r#"{"prompt": "a", "completion": "b"}"#],
        3,
        "mixed formats",
    );
}

#[test]
fn empty_fields() {
    check(
        &[r#"{"prompt": "a", "completion": ""}"#],
        1,
        "empty \"completion\"",
    );
    check(&[r#"{"text": ""}"#], 1, "empty \"text\"");
    check(
        &[r#"{"instruction": "a", "input": "", "output": ""}"#],
        1,
        "empty \"output\"",
    );
    check(
        &[
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}"#,
        ],
        1,
        "empty assistant content",
    );
    check(&[r#"{"messages": []}"#], 1, "\"messages\" is empty");
}

#[test]
fn missing_fields() {
    check(&[r#"{"prompt": "a"}"#], 1, "missing \"completion\"");
    check(
        &[r#"{"input": "x", "output": "y"}"#],
        1,
        "missing \"instruction\"",
    );
    check(
        &[r#"{"messages": [{"role": "user"}]}"#],
        1,
        "message 0 has no \"content\"",
    );
}

#[test]
fn wrong_types() {
    check(
        &[r#"{"text": 5}"#],
        1,
        "\"text\" must be a string, found a number",
    );
    check(
        &[r#"{"prompt": "a", "completion": ["b"]}"#],
        1,
        "\"completion\" must be a string, found a list",
    );
    check(&[r#"{"messages": "hi"}"#], 1, "\"messages\" must be a list");
    check(&[r#"{"messages": ["hi"]}"#], 1, "message 0 is a string");
    check(
        &[r#"{"messages": [{"role": "user", "content": {"x": 1}}]}"#],
        1,
        "\"content\" must be a string, found an object",
    );
    check(
        &[r#"{"messages": [{"role": "user", "content": "a", "name": "bob"}]}"#],
        1,
        "unknown key \"name\"",
    );
}

#[test]
fn nothing_to_train_on() {
    check(
        &[r#"{"messages": [{"role": "user", "content": "a"}]}"#],
        1,
        "no assistant message",
    );
    check(&["", "  "], 0, "no examples");
    // Every prompt fills seq_len: nothing left to train on.
    let opts = DataOptions {
        seq_len: 4,
        ..DataOptions::default()
    };
    check_opts(
        &opts,
        &[r#"{"prompt": "a long prompt that fills the window", "completion": "b"}"#],
        0,
        "raise --seq-len",
    );
}

#[test]
fn chat_template_problems() {
    let msgs = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
    // The base model ships no chat template.
    let base = Tokenizer::from_model_dir(&root().join("tests/fixtures/llama/model")).unwrap();
    let msg = err_with(&base, &DataOptions::default(), &[msgs]);
    assert!(
        msg.contains("bad.jsonl:1: ") && msg.contains("--chat-template chatml"),
        "{msg}"
    );
    // The model's template refuses an unknown role (raise_exception).
    check(
        &[
            r#"{"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
        ],
        1,
        "unknown role tool",
    );
    // A template that rewrites earlier turns cannot be split into loss segments.
    let opts = DataOptions {
        template: Some(
            "{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}".into(),
        ),
        ..DataOptions::default()
    };
    check_opts(&opts, &[msgs], 1, "re-renders earlier turns");
    // An unknown built-in name.
    let opts = DataOptions {
        template: Some("vicuna-42".into()),
        ..DataOptions::default()
    };
    let msg = err_with(&chat_tok(), &opts, &[msgs]);
    assert!(msg.contains("neither a built-in (chatml)"), "{msg}");
}

#[test]
fn not_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.jsonl");
    std::fs::write(&p, b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n").unwrap();
    let msg = load_examples(&p, &chat_tok(), &DataOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("bad.jsonl:2: not valid UTF-8"), "{msg}");
}

#[test]
fn a_good_file_loads() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ok.jsonl");
    // A byte-order mark, CRLF line ends and a blank line are fine.
    std::fs::write(&p, format!("\u{feff}{OK_TEXT}\r\n\r\n{OK_TEXT}\r\n")).unwrap();
    let (ex, stats) = load_examples(&p, &chat_tok(), &DataOptions::default()).unwrap();
    assert_eq!((ex.len(), stats.n), (2, 2));
    let plain = dir.path().join("plain.jsonl");
    std::fs::write(&plain, format!("{OK_TEXT}\n{OK_TEXT}")).unwrap();
    assert_eq!(
        load_examples(&plain, &chat_tok(), &DataOptions::default())
            .unwrap()
            .0,
        ex
    );
}

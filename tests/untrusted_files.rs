//! Found by trying qtune as a user would (issue #19): missing paths, damaged tokenizer.json files
//! that make the `tokenizers` crate panic, and the `--max-memory` advice on an NF4 base.
use qtune::data::Tokenizer;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn qtune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args(args)
        .output()
        .unwrap()
}

/// stderr of a run that must fail cleanly (exit 1, an `error:` line, no panic).
fn fails(args: &[&str]) -> String {
    let o = qtune(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains("error:"), "{err}");
    // No panic message from the default hook ("thread 'main' panicked at").
    assert!(!err.contains("thread '"), "{err}");
    err
}

#[test]
fn a_missing_model_is_named_as_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let data = root().join("tests/fixtures/train/data.jsonl");
    let (data, out) = (data.to_str().unwrap(), out.to_str().unwrap());
    let err = fails(&[
        "train",
        "--model",
        "/nonexistent/model",
        "--data",
        data,
        "--out",
        out,
    ]);
    assert!(err.contains("/nonexistent/model: does not exist"), "{err}");
    assert!(!err.contains("tokenizer.json"), "{err}");
    // A missing GGUF: the path and what is wrong, once.
    let err = fails(&["inspect", "/nonexistent/model.gguf"]);
    assert!(
        err.contains("/nonexistent/model.gguf: does not exist"),
        "{err}"
    );
    assert_eq!(err.matches("no such file").count(), 0, "{err}");
    // An OS error is printed once, not repeated by the error chain (`{:#}`, as main prints it).
    let e = qtune::Error::io("x.gguf", std::io::Error::other("disk on fire"));
    assert_eq!(
        format!("{:#}", anyhow::Error::from(e)),
        "x.gguf: disk on fire"
    );
    let e = Tokenizer::from_model_dir(Path::new("/nonexistent/dir"))
        .err()
        .unwrap()
        .to_string();
    assert_eq!(e, "/nonexistent/dir: does not exist");
}

/// A copy of the tiny Llama model directory with its `tokenizer.json` edited by `edit`.
fn damaged_tokenizer(edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let src = root().join("tests/fixtures/llama/model");
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    edit(&mut v);
    std::fs::write(dir.path().join("tokenizer.json"), v.to_string()).unwrap();
    dir
}

#[test]
fn a_deeply_nested_decoder_is_an_error_not_a_panic() {
    // tokenizers 0.23.2 unwraps serde's "recursion limit exceeded" (decoders/mod.rs:90).
    let dir = damaged_tokenizer(|v| {
        let mut d = json!([]);
        for _ in 0..200 {
            d = json!([d]);
        }
        v["decoder"] = d;
    });
    let e = Tokenizer::from_model_dir(dir.path())
        .err()
        .expect("must be refused")
        .to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    assert!(e.contains("cannot load tokenizer"), "{e}");
    // And through the binary: a clean error, no panic message on stderr.
    let err = fails(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--prompt",
        "hi there",
    ]);
    assert!(err.contains("cannot load tokenizer"), "{err}");
}

#[test]
fn a_bad_continuing_subword_prefix_is_an_error_not_a_panic() {
    // tokenizers 0.23.2 slices a word by the prefix length (models/bpe/model.rs:267).
    let dir = damaged_tokenizer(|v| v["model"]["continuing_subword_prefix"] = json!("xx"));
    // Depending on the vocabulary it panics while loading (added tokens are encoded then) or at
    // the first encode: either way a named error carrying the crate's message.
    let e = match Tokenizer::from_model_dir(dir.path()) {
        Err(e) => e.to_string(),
        Ok(tok) => tok
            .encode("hi there", true)
            .map(|_| ())
            .expect_err("must be refused")
            .to_string(),
    };
    assert!(e.contains("tokenizer.json"), "{e}");
    assert!(e.contains("panicked") && e.contains("slice index"), "{e}");
    let err = fails(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--prompt",
        "hi there",
    ]);
    assert!(err.contains("slice index"), "{err}");
    // The process stays usable: other text and other tokenizers still work.
    let good = Tokenizer::from_model_dir(&root().join("tests/fixtures/data/model_chat")).unwrap();
    assert!(!good.encode("hi there", true).unwrap().is_empty());
}

#[test]
fn max_memory_advice_follows_the_base_types() {
    // The embedded default model is NF4 already: no "--quant nf4" advice for it.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let err = fails(&[
        "train",
        "--max-memory",
        "100k",
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("exceeds --max-memory"), "{err}");
    assert!(!err.contains("--quant nf4"), "{err}");
    assert!(err.contains("--quant cannot save more"), "{err}");
}

fn train_args(out: &Path) -> Vec<String> {
    let m = root().join("tests/fixtures/llama/model");
    let d = root().join("tests/fixtures/train/data.jsonl");
    [
        "train",
        "--model",
        m.to_str().unwrap(),
        "--data",
        d.to_str().unwrap(),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--rank",
        "2",
        "--save-every",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn a_damaged_checkpoint_or_adapter_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = train_args(dir.path());
    a.extend(["--stop-after".into(), "2".into()]);
    let o = qtune(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck = dir.path().join("checkpoint-2");
    assert!(ck.join("checksums.sha256").is_file());
    let mut resume = train_args(dir.path());
    resume.extend(["--resume".into(), dir.path().display().to_string()]);
    let resume: Vec<&str> = resume.iter().map(String::as_str).collect();
    // Every file of the checkpoint: one flipped byte, then the file cut short, is refused by name.
    let mut files = Vec::new();
    for sub in ["", "adapter", "optimizer"] {
        for e in std::fs::read_dir(ck.join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() && !p.ends_with("checksums.sha256") {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 4, "{files:?}");
    for f in &files {
        let good = std::fs::read(f).unwrap();
        let mut bad = good.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x10;
        for damaged in [&bad[..], &good[..good.len() - 1]] {
            std::fs::write(f, damaged).unwrap();
            let err = fails(&resume);
            let name = f.file_name().unwrap().to_str().unwrap();
            assert!(err.contains(name) && err.contains("damaged"), "{err}");
        }
        std::fs::write(f, &good).unwrap();
    }
    // Intact again: it resumes and finishes.
    let o = qtune(&resume);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The final adapter carries checksums too: a damaged copy is refused on load.
    let adapter = dir.path().join("adapter");
    let f = adapter.join("adapter_model.safetensors");
    let mut b = std::fs::read(&f).unwrap();
    let n = b.len();
    b[n - 3] ^= 1;
    std::fs::write(&f, &b).unwrap();
    let e = qtune::lora::adapter::load_peft(&adapter)
        .map(|_| ())
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("damaged"),
        "{e}"
    );
}

/// Chat templates that build values without bound inside the fuel (docs/SECURITY.md): each once
/// allocated gigabytes to terabytes, or aborted the process, in a few hundred instructions.
const HOSTILE_TEMPLATES: &[(&str, &str)] = &[
    (
        "`~` doubling in a loop",
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    ),
    (
        "`+` doubling in a loop",
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    ),
    (
        "a macro recursing with s ~ s",
        "{% macro m(s, n) %}{% if n > 0 %}{{ m(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}{{ m('ab', 40) }}",
    ),
    (
        "a macro doubling its own output",
        "{% macro m(n) %}{% if n > 0 %}{% set x = m(n - 1) %}{{ x }}{{ x }}{% else %}xx{% endif %}{% endmacro %}{{ m(40) }}",
    ),
    (
        "str.replace with itself",
        "{% set s = 'a' * 46 %}{% set s = s.replace('a', s) %}{% set s = s.replace('a', s) %}{% set s = s.replace('a', s) %}{{ s|length }}",
    ),
    (
        "|replace with itself",
        "{% set s = 'a' * 46 %}{% set s = s|replace('a', s) %}{% set s = s|replace('a', s) %}{% set s = s|replace('a', s) %}{{ s|length }}",
    ),
    (
        "a list doubled with + then |list",
        "{% set ns = namespace(l=[1]) %}{% for i in range(30) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|list|length }}",
    ),
    (
        "a list doubled with + then |join",
        "{% set ns = namespace(l=['ab']) %}{% for i in range(30) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|join|length }}",
    ),
    (
        "a list doubled with + then |string",
        "{% set ns = namespace(l=['ab']) %}{% for i in range(30) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|string|length }}",
    ),
    (
        "a list doubled with + then |tojson",
        "{% set ns = namespace(l=['ab']) %}{% for i in range(30) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|tojson|length }}",
    ),
    ("a list repeated with *", "{{ ([1, 2] * 1000000000)|length }}"),
    ("a string repeated with * (within minijinja's 100 MB)", "{% set s = 'ab' * 49000000 %}{{ s|length }}"),
    ("|indent with a huge width", "{{ ('a\\n' * 100000)|indent(100000000) }}"),
    ("|format with a huge width", "{{ '%999999999999s'|format('x') }}"),
    ("str.format with a huge width", "{{ '{:>999999999999}'.format('x') }}"),
    ("|tojson with a huge indent", "{{ messages|tojson(indent=1000000000) }}"),
    (
        "a captured block doubling",
        "{% set ns = namespace(s='x' * 1000000) %}{% for i in range(30) %}{% set c %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = c %}{% endfor %}{{ ns.s|length }}",
    ),
    (
        "template text repeated into a capture",
        "{% set c %}{% for i in range(100000) %}{% for j in range(10) %}{RAW}{% endfor %}{% endfor %}{% endset %}{{ c|length }}",
    ),
    (
        "distinct 10 MB strings kept in a list",
        "{% set ns = namespace(b='x' * 10000000, l=[]) %}{% for i in range(1000) %}{% set ns.l = ns.l + [ns.b ~ i] %}{% endfor %}{{ ns.l|length }}",
    ),
    (
        "10 MB slices kept in a list",
        "{% set ns = namespace(b='x' * 10000000, l=[]) %}{% for i in range(1000) %}{% set ns.l = ns.l + [ns.b[i:]] %}{% endfor %}{{ ns.l|length }}",
    ),
    ("a string split into 16 M pieces", "{{ ('a' * 16000000).split('a')|length }}"),
    (
        "upper-cased copies kept in a list",
        "{% set ns = namespace(b='x' * 10000000, l=[]) %}{% for i in range(1000) %}{% set ns.l = ns.l + [ns.b.upper()] %}{% endfor %}{{ ns.l|length }}",
    ),
    // Nesting: minijinja drops (and prints) lists and maps recursively; 200,000 levels overflowed
    // the stack and aborted the process when the value was dropped.
    (
        "a list nested 200,000 deep",
        "{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% for j in range(200) %}{% set ns.l = [ns.l] %}{% endfor %}{% endfor %}{{ ns.l|length }}",
    ),
    (
        "a map nested 200,000 deep",
        "{% set ns = namespace(m={}) %}{% for i in range(1000) %}{% for j in range(200) %}{% set ns.m = {'k': ns.m} %}{% endfor %}{% endfor %}{{ ns.m|length }}",
    ),
    (
        "dict() nested 200,000 deep",
        "{% set ns = namespace(m={}) %}{% for i in range(1000) %}{% for j in range(200) %}{% set ns.m = dict(k=ns.m) %}{% endfor %}{% endfor %}{{ ns.m|length }}",
    ),
    (
        "|batch nested 200,000 deep",
        "{% set ns = namespace(l=[1]) %}{% for i in range(1000) %}{% for j in range(200) %}{% set ns.l = ns.l|batch(1)|list %}{% endfor %}{% endfor %}{{ ns.l|length }}",
    ),
    (
        "a list nested as a map key",
        "{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% for j in range(200) %}{% set ns.l = {ns.l: 1} %}{% endfor %}{% endfor %}{{ ns.l|length }}",
    ),
];

/// Run by `hostile_chat_templates_stop_with_a_named_error_in_bounded_memory` in a child process
/// (one template each, under a 4 GiB address-space limit so a regression cannot take the
/// machine's memory): renders template `QTUNE_HOSTILE_TEMPLATE` and prints the result, the
/// time and the peak RSS growth. Does nothing when run as an ordinary test.
#[test]
fn hostile_template_child() {
    let Ok(i) = std::env::var("QTUNE_HOSTILE_TEMPLATE") else {
        return;
    };
    let (_, src) = HOSTILE_TEMPLATES[i.parse::<usize>().unwrap()];
    // 4 kB of template text (the test's table stays readable).
    let src = &src.replace("{RAW}", &"x".repeat(4000));
    let limit = libc::rlimit {
        rlim_cur: 4 << 30,
        rlim_max: 4 << 30,
    };
    // SAFETY: setrlimit reads the struct we pass; it only lowers this process's own limit.
    unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) };
    let hwm = || {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let l = s
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .unwrap()
            .to_string();
        l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
    };
    let before = hwm();
    let t0 = std::time::Instant::now();
    let msg = qtune::data::Message {
        role: "user".into(),
        content: "hi".into(),
    };
    // A constant expression too large is refused when the template is compiled.
    let r = qtune::data::template::ChatTemplate::new(src, "<s>", "</s>").and_then(|t| {
        t.with_origin("the chat template of hostile/tokenizer_config.json")
            .render(&[msg], true)
    });
    let ms = t0.elapsed().as_millis();
    let grown_kb = hwm() - before;
    println!("HOSTILE-RESULT {ms} {grown_kb} {r:?}");
}

#[test]
fn hostile_chat_templates_stop_with_a_named_error_in_bounded_memory() {
    for (i, (what, _)) in HOSTILE_TEMPLATES.iter().enumerate() {
        let o = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "hostile_template_child", "--nocapture"])
            .env("QTUNE_HOSTILE_TEMPLATE", i.to_string())
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix("HOSTILE-RESULT "))
            .unwrap_or_else(|| panic!("{what}: the child died: {:?} {out}", o.status));
        let mut f = line.splitn(3, ' ');
        let ms: u64 = f.next().unwrap().parse().unwrap();
        let grown_mib = f.next().unwrap().parse::<u64>().unwrap() >> 10;
        let r = f.next().unwrap();
        let named = r.contains("hostile/tokenizer_config.json")
            && r.contains("builds values without bound");
        assert!(
            !what.contains("nested") || r.contains("over 100 levels deep"),
            "{what}: {r}"
        );
        let constant = r.contains("a constant expression of over 16 MiB");
        assert!(
            (named || constant) && r.contains("--chat-template chatml"),
            "{what}: {r}"
        );
        // Each limit stops the template at tens of MiB built; a value's one copy in a wrapper
        // is at most 16 MiB x 6 (|tojson's escapes). Without the checks these took GiB to TiB.
        assert!(
            grown_mib < 400,
            "{what}: peak RSS grew {grown_mib} MiB: {r}"
        );
        // Generous on a loaded machine: without the checks these ran for minutes or aborted.
        assert!(ms < 30_000, "{what}: {ms} ms");
        eprintln!("{what}: {ms} ms, +{grown_mib} MiB peak RSS: {r}");
    }
}

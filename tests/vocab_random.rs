//! Random strings (mixed scripts, digits, whitespace runs, emoji, special tokens) tokenised and
//! detokenised by qtune and by llama.cpp itself (llama-cpp-python 0.3.16,
//! tests/reference/gen_vocab_random.py -> tests/fixtures/vocab_random/<vocab>.jsonl): ids and text
//! must be identical, with and without BOS/EOS and special-token parsing. The vocabularies are
//! llama.cpp's test files, fetched by tests/reference/fetch_vocab_suite.sh (never committed); where
//! they are absent the test says so and passes.
use qtune::data::Tokenizer;
use serde_json::Value;
use std::path::PathBuf;

fn suite_dir() -> PathBuf {
    std::env::var_os("QTUNE_VOCAB_SUITE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/vocab-suite"))
}

#[test]
fn random_strings_match_llama_cpp() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vocab_random");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&fixtures)
        .expect("tests/fixtures/vocab_random")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", fixtures.display());
    let dir = suite_dir();
    let mut failures = Vec::new();
    let mut checked = 0;
    for f in &files {
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let gguf = dir.join(format!("{stem}.gguf"));
        if !gguf.exists() {
            println!(
                "SKIPPED {stem}: {} not found (run tests/reference/fetch_vocab_suite.sh or set \
                 QTUNE_VOCAB_SUITE)",
                gguf.display()
            );
            continue;
        }
        // UGM (T5) and other vocabulary types qtune does not run: a clear error, reported here.
        let tk = match Tokenizer::for_model(&gguf) {
            Ok(tk) => tk,
            Err(e) if e.to_string().contains("is not supported") => {
                println!("NOT SUPPORTED {stem}: {e}");
                continue;
            }
            Err(e) => panic!("{stem}: {e}"),
        };
        let text = std::fs::read_to_string(f).unwrap();
        let (mut ids_ok, mut text_ok, mut n) = (0, 0, 0);
        let mut first_bad = None;
        for line in text.lines() {
            let rec: Value = serde_json::from_str(line).unwrap();
            let t = rec["t"].as_str().unwrap();
            let add = rec["b"].as_bool().unwrap();
            let special = rec["s"].as_bool().unwrap();
            let want: Vec<u32> = rec["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let want_text = rec.get("d").and_then(Value::as_str).unwrap_or(t);
            n += 1;
            let got = tk.encode_with(t, add, special).unwrap();
            if got == want {
                ids_ok += 1;
            } else if first_bad.is_none() {
                first_bad = Some(format!(
                    "{t:?} (add_special {add}, parse_special {special}): got {got:?}, want {want:?}"
                ));
            }
            let got_text = tk.decode(&want).unwrap();
            if got_text == want_text {
                text_ok += 1;
            } else if first_bad.is_none() {
                first_bad = Some(format!(
                    "decode {want:?}: got {got_text:?}, want {want_text:?}"
                ));
            }
        }
        println!("{stem}: ids {ids_ok}/{n}, detokenized text {text_ok}/{n}");
        checked += 1;
        if ids_ok != n || text_ok != n {
            failures.push(format!(
                "{stem}: ids {ids_ok}/{n}, text {text_ok}/{n}: {}",
                first_bad.unwrap()
            ));
        }
    }
    if checked == 0 {
        println!(
            "SKIPPED: no vocabulary of llama.cpp's suite found in {}",
            dir.display()
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Every pre-tokenizer type llama.cpp has, on one vocabulary: the suite's llama-bpe file with only
/// `tokenizer.ggml.pre` changed, built in memory here and by gguf-py for llama.cpp
/// (tests/reference/gen_vocab_pre.py -> tests/fixtures/vocab_random/pre/<name>.jsonl).
#[test]
fn every_pre_tokenizer_matches_llama_cpp() {
    use qtune::format::gguf::Value as GgufValue;
    let fixtures =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vocab_random/pre");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&fixtures)
        .expect("tests/fixtures/vocab_random/pre")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    let base = suite_dir().join("ggml-vocab-llama-bpe.gguf");
    if !base.exists() {
        println!(
            "SKIPPED: {} not found (run tests/reference/fetch_vocab_suite.sh)",
            base.display()
        );
        return;
    }
    let store = qtune::store::WeightStore::open(&base).unwrap();
    let mut failures = Vec::new();
    for f in &files {
        let name = f.file_stem().unwrap().to_string_lossy().to_string();
        let mut meta = store.gguf_metadata.clone();
        for (k, v) in meta.iter_mut() {
            if k == "tokenizer.ggml.pre" {
                *v = GgufValue::String(name.clone());
            }
        }
        let tk = Tokenizer::from_gguf_metadata(&base, &meta).unwrap();
        let (ok, n, bad) = check_file(&tk, f);
        println!("pre {name}: ids and text {ok}/{n}");
        if ok != n {
            failures.push(format!("{name}: {ok}/{n}: {}", bad.unwrap()));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// (cases with ids and text both right, cases, first mismatch).
fn check_file(tk: &Tokenizer, f: &std::path::Path) -> (usize, usize, Option<String>) {
    let text = std::fs::read_to_string(f).unwrap();
    let (mut ok, mut n, mut bad) = (0, 0, None);
    for line in text.lines() {
        let rec: Value = serde_json::from_str(line).unwrap();
        let t = rec["t"].as_str().unwrap();
        let add = rec["b"].as_bool().unwrap();
        let special = rec["s"].as_bool().unwrap();
        let want: Vec<u32> = rec["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let want_text = rec.get("d").and_then(Value::as_str).unwrap_or(t);
        n += 1;
        let got = tk.encode_with(t, add, special).unwrap();
        let got_text = tk.decode(&want).unwrap();
        if got == want && got_text == want_text {
            ok += 1;
        } else if bad.is_none() {
            bad = Some(format!(
                "{t:?} (add {add}, special {special}): ids {got:?} want {want:?}; text {got_text:?} want {want_text:?}"
            ));
        }
    }
    (ok, n, bad)
}

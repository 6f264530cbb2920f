//! llama.cpp's own tokenizer test suite (`models/ggml-vocab-*.gguf` with `.inp`/`.out`, run by its
//! `test-tokenizer-0`): every text tokenised without BOS and without parsing special tokens must give
//! exactly llama.cpp's ids. The files are fetched, never committed:
//! `tests/reference/fetch_vocab_suite.sh` puts them in target/vocab-suite; `QTUNE_VOCAB_SUITE`
//! points elsewhere. Where they are absent the test says so and passes.
use qtune::data::Tokenizer;
use std::path::PathBuf;

/// WordPiece (bert-bge) is checked and reported, but llama.cpp's WordPiece uses its own Unicode
/// tables for NFD and case; the issue leaves it out of the 100 % requirement.
const REPORT_ONLY: &[&str] = &["ggml-vocab-bert-bge.gguf"];

fn suite_dir() -> PathBuf {
    std::env::var_os("QTUNE_VOCAB_SUITE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/vocab-suite"))
}

/// (text, ids) pairs as test-tokenizer-0 reads them: texts separated by "\n__ggml_vocab_test__\n",
/// one line of ids per text.
fn read_cases(gguf: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(format!("{}.inp", gguf.display())).unwrap();
    let out = std::fs::read_to_string(format!("{}.out", gguf.display())).unwrap();
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    // A separator at the very end starts no further text.
    if texts.last() == Some(&"") {
        texts.pop();
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), ids.len(), "{}", gguf.display());
    texts.into_iter().map(str::to_string).zip(ids).collect()
}

#[test]
fn llama_cpp_vocab_suite() {
    let dir = suite_dir();
    let mut ggufs: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|e| e == "gguf")
                    && PathBuf::from(format!("{}.inp", p.display())).exists()
                    && PathBuf::from(format!("{}.out", p.display())).exists()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    if ggufs.is_empty() {
        println!(
            "SKIPPED: llama.cpp's vocab suite is not in {} (run tests/reference/fetch_vocab_suite.sh \
             or set QTUNE_VOCAB_SUITE)",
            dir.display()
        );
        return;
    }
    ggufs.sort();
    let mut failures = Vec::new();
    for gguf in &ggufs {
        let name = gguf.file_name().unwrap().to_string_lossy().to_string();
        let tk = Tokenizer::for_model(gguf).unwrap_or_else(|e| panic!("{name}: {e}"));
        let cases = read_cases(gguf);
        let mut pass = 0;
        let mut first_bad = None;
        for (text, want) in &cases {
            let got = tk.encode_with(text, false, false).unwrap();
            if &got == want {
                pass += 1;
            } else if first_bad.is_none() {
                first_bad = Some(format!("{text:?}: got {got:?}, want {want:?}"));
            }
            // Detokenising the ids gives llama.cpp's text for them; for these texts that is the
            // input itself wherever the vocabulary can spell it (checked against llama.cpp's own
            // detokeniser in tests/vocab_random.rs).
        }
        println!("{name}: {pass}/{} texts", cases.len());
        if let Some(b) = &first_bad {
            println!("  first mismatch: {b}");
        }
        if pass != cases.len() && !REPORT_ONLY.contains(&name.as_str()) {
            failures.push(format!(
                "{name}: {pass}/{}: {}",
                cases.len(),
                first_bad.unwrap()
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

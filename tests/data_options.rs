//! Truncation, packing and batching of loaded examples.
use qtune::data::{batches, load_examples, pack, DataOptions, Tokenizer};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tok() -> Tokenizer {
    Tokenizer::from_model_dir(&root().join("tests/fixtures/data/model_chat")).unwrap()
}

fn load(file: &str, opts: &DataOptions) -> (Vec<qtune::data::Example>, qtune::data::DataStats) {
    load_examples(&root().join("tests/fixtures/data").join(file), &tok(), opts).unwrap()
}

#[test]
fn truncation_cuts_and_counts() {
    let full = load("text.jsonl", &DataOptions::default()).0;
    let lens: Vec<usize> = full.iter().map(|e| e.ids.len()).collect();
    let cut = lens.iter().copied().min().unwrap(); // the shortest fits, the others are cut
    let opts = DataOptions {
        seq_len: cut,
        ..DataOptions::default()
    };
    let (ex, stats) = load("text.jsonl", &opts);
    assert_eq!(stats.truncated, lens.iter().filter(|&&l| l > cut).count());
    assert!(stats.truncated >= 1);
    assert_eq!(stats.tokens, cut * ex.len());
    for (e, f) in ex.iter().zip(&full) {
        assert_eq!(e.ids[..], f.ids[..cut]);
        assert_eq!(e.labels[..], f.labels[..cut]);
    }
}

#[test]
fn examples_whose_prompt_fills_seq_len_are_dropped_and_counted() {
    let full = load("pc.jsonl", &DataOptions::default()).0;
    // First prompt length: at that seq_len example 0 keeps no completion token.
    let p0 = full[0].labels.iter().take_while(|&&l| l == -100).count();
    let p1 = full[1].labels.iter().take_while(|&&l| l == -100).count();
    assert!(p1 > p0 + 1, "fixture: second prompt should be longer");
    let opts = DataOptions {
        seq_len: p0 + 1,
        ..DataOptions::default()
    };
    let (ex, stats) = load("pc.jsonl", &opts);
    assert_eq!((stats.n, stats.dropped, ex.len()), (2, 1, 1));
    let line = stats.to_string();
    assert!(
        line.contains("2 truncated") && line.contains("1 dropped"),
        "{line}"
    );
    assert_eq!(stats.truncated, 2);
    assert_eq!(ex[0].ids[..], full[0].ids[..p0 + 1]);
    assert_eq!(stats.targets, 1);
}

#[test]
fn packing_concatenates_within_seq_len() {
    let full = load("alpaca.jsonl", &DataOptions::default()).0;
    let l: Vec<usize> = full.iter().map(|e| e.ids.len()).collect();
    let opts = DataOptions {
        seq_len: l[0] + l[1],
        packing: true,
        ..DataOptions::default()
    };
    let (ex, stats) = load("alpaca.jsonl", &opts);
    assert_eq!(stats.sequences, ex.len());
    assert_eq!(ex, pack(full.clone(), l[0] + l[1]));
    assert_eq!(
        ex[0].ids,
        [full[0].ids.clone(), full[1].ids.clone()].concat()
    );
    // The join carries no loss: the second example's first label is masked.
    assert_eq!(ex[0].labels[l[0]], -100);
    assert_eq!(ex[0].labels[l[0] + 1..], full[1].labels[1..]);
}

#[test]
fn batches_of_loaded_examples() {
    let (ex, stats) = load("messages.jsonl", &DataOptions::default());
    let b = batches(&ex, 2, 0);
    assert_eq!(b.len(), 1);
    let seq = ex.iter().map(|e| e.ids.len()).max().unwrap();
    assert_eq!((b[0].batch, b[0].seq), (2, seq));
    assert_eq!(b[0].targets, stats.targets);
    let short = ex.iter().position(|e| e.ids.len() < seq).unwrap();
    let row = &b[0].mask[short * seq..(short + 1) * seq];
    assert_eq!(row.iter().filter(|&&m| m == 1).count(), ex[short].ids.len());
}

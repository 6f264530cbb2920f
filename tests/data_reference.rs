//! The data pipeline against transformers (token ids and loss labels per JSONL format, chat template
//! rendering) and llama.cpp (tokenisation of GGUF-embedded vocabularies).
//! Fixtures: tests/reference/gen_data_fixtures.py.
use qtune::data::template::ChatTemplate;
use qtune::data::{load_examples, DataFormat, DataOptions, Message, Tokenizer};
use qtune::store::WeightStore;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn expected() -> Value {
    let p = root().join("tests/fixtures/data/expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn i64s(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn jsonl_formats_match_transformers() {
    let exp = expected();
    let cases = exp["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let tok = Tokenizer::from_model_dir(&root().join(c["model"].as_str().unwrap())).unwrap();
        let o = &c["options"];
        let opts = DataOptions {
            train_on_prompt: o["train_on_prompt"].as_bool().unwrap_or(false),
            seq_len: 4096,
            packing: false,
            template: o["template"].as_str().map(str::to_string),
        };
        let path = root()
            .join("tests/fixtures/data")
            .join(c["jsonl"].as_str().unwrap());
        let (exs, stats) = load_examples(&path, &tok, &opts).unwrap();
        let want = c["examples"].as_array().unwrap();
        assert_eq!(exs.len(), want.len(), "{name}");
        assert_eq!(
            (stats.n, stats.truncated, stats.dropped),
            (want.len(), 0, 0)
        );
        for (i, (e, w)) in exs.iter().zip(want).enumerate() {
            assert_eq!(e.ids, u32s(&w["ids"]), "{name} example {i}: ids");
            assert_eq!(e.labels, i64s(&w["labels"]), "{name} example {i}: labels");
        }
        let fmt = match c["jsonl"].as_str().unwrap() {
            "text.jsonl" => DataFormat::Text,
            "pc.jsonl" => DataFormat::PromptCompletion,
            "alpaca.jsonl" => DataFormat::Alpaca,
            _ => DataFormat::Messages,
        };
        assert_eq!(stats.format, fmt, "{name}");
        let tokens: usize = want
            .iter()
            .map(|w| w["ids"].as_array().unwrap().len())
            .sum();
        assert_eq!(stats.tokens, tokens, "{name}");
    }
}

#[test]
fn model_chat_template_renders_as_jinja2() {
    let exp = expected();
    let dir = root().join("tests/fixtures/data/model_chat");
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    assert_eq!(tok.chat_template(), exp["chat_template"].as_str());
    let t = ChatTemplate::new(tok.chat_template().unwrap(), "<s>", "</s>").unwrap();
    let msgs: Vec<Message> = serde_json::from_value(
        serde_json::from_str::<Value>(
            std::fs::read_to_string(root().join("tests/fixtures/data/messages.jsonl"))
                .unwrap()
                .lines()
                .nth(1)
                .unwrap(),
        )
        .unwrap()["messages"]
            .clone(),
    )
    .unwrap();
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        exp["rendered_model_template"].as_str().unwrap()
    );
}

fn check_gguf(tok: &Tokenizer, exp: &Value, which: &str) -> usize {
    let mut n = 0;
    for g in exp["gguf"].as_array().unwrap() {
        if g["gguf"].as_str() != Some(which) {
            continue;
        }
        let text = g["text"].as_str().unwrap();
        let add = g["add_special"].as_bool().unwrap();
        let want = u32s(&g["ids"]);
        assert_eq!(
            tok.encode(text, add).unwrap(),
            want,
            "{which}: {text:?} add_special={add}"
        );
        n += 1;
    }
    n
}

#[test]
fn gguf_gpt2_vocab_matches_llama_cpp() {
    // The same GGUF the reference script made with `qtune quantize --type q8_0`.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    let src = WeightStore::open(&root().join("tests/fixtures/llama/model")).unwrap();
    qtune::quantize::quantize_to_gguf(&src, qtune::quant::QType::Q8_0, &out).unwrap();
    let store = WeightStore::open(&out).unwrap();
    let tok = Tokenizer::for_model(&out).unwrap();
    assert!(!store.gguf_metadata.is_empty());
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert_eq!(check_gguf(&tok, &expected(), "q8_0"), 8);
    // And it agrees with the tokenizer.json it came from.
    let hf = Tokenizer::from_model_dir(&root().join("tests/fixtures/llama/model")).unwrap();
    let t = "Hello world, this is a small test.";
    assert_eq!(tok.encode(t, false).unwrap(), hf.encode(t, false).unwrap());
    assert_eq!(tok.decode(&tok.encode(t, false).unwrap()).unwrap(), t);
}

fn vocab_gguf(name: &str) -> Tokenizer {
    let p: &Path = &root().join("tests/fixtures/data").join(name);
    Tokenizer::from_gguf(&WeightStore::open(p).unwrap()).unwrap()
}

#[test]
fn gguf_llama3_pre_tokenizer_matches_llama_cpp() {
    let tok = vocab_gguf("bpe-llama3-vocab.gguf");
    assert_eq!(check_gguf(&tok, &expected(), "bpe-llama3-vocab.gguf"), 8);
}

#[test]
fn gguf_sentencepiece_vocab_matches_llama_cpp() {
    let tok = vocab_gguf("spm-vocab.gguf");
    assert_eq!(check_gguf(&tok, &expected(), "spm-vocab.gguf"), 8);
    let t = "Hello world, this is a small test.";
    assert_eq!(tok.decode(&tok.encode(t, false).unwrap()).unwrap(), t);
}

#[test]
fn jinja_dialect_matches_transformers() {
    let exp = expected();
    let cases = exp["dialect"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    let mut refused = 0;
    for c in cases {
        let src = c["template"].as_str().unwrap();
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let got = t.render(&msgs, gen);
        match c["rendered"].as_str() {
            Some(want) => assert_eq!(got.unwrap(), want, "{src}"),
            None => {
                let e = got.unwrap_err().to_string();
                assert!(e.contains("roles must alternate"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 2);
}

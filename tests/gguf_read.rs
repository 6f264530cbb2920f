//! Our GGUF reader against gguf-py's GGUFReader (tests/fixtures/gguf/reader.json, written by
//! tests/reference/gen_gguf_fixtures.py) and against the gguf-rs crate's header parse.
use qtune::format::gguf::{self, Value};
use qtune::quant::dequantize_f32;
use serde_json::Value as J;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

fn reference() -> J {
    let s = std::fs::read_to_string(fixture("reader.json")).unwrap();
    serde_json::from_str(&s).unwrap()
}

/// Leaf values of a (possibly nested) array, flattened as gguf-py's `ReaderField.data` does.
fn leaves(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(_, items) => items.iter().for_each(|i| leaves(i, out)),
        x => out.push(x.clone()),
    }
}

/// Type ids as gguf-py lists them: the value's, then (arrays) the first element's, recursively.
fn type_chain(v: &Value) -> Vec<u64> {
    let mut t = vec![v.type_id() as u64];
    if let Value::Array(et, items) = v {
        match items.first() {
            Some(first) => t.extend(type_chain(first)),
            None => t.push(*et as u64),
        }
    }
    t
}

fn scalar_eq(ours: &Value, theirs: &J) -> bool {
    match ours {
        Value::String(s) => theirs.as_str() == Some(s),
        Value::Bool(b) => theirs.as_bool() == Some(*b),
        // gguf-py reports f32 widened to f64 exactly, so compare in f32.
        Value::F32(f) => theirs.as_f64().map(|x| x as f32) == Some(*f),
        Value::F64(f) => theirs.as_f64() == Some(*f),
        Value::U64(u) => theirs.as_u64() == Some(*u),
        x => x.as_i64().is_some() && theirs.as_i64() == x.as_i64(),
    }
}

fn check_file(name: &str) {
    let r = &reference()[name];
    let path = fixture(name);
    let store = gguf::load(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let header = gguf::parse_header(&path, &bytes).unwrap();
    assert_eq!(
        header.version as u64,
        r["version"].as_u64().unwrap(),
        "{name}: version"
    );
    assert_eq!(
        store.alignment,
        r["alignment"].as_u64().unwrap(),
        "{name}: alignment"
    );
    assert_eq!(
        header.data_offset,
        r["data_offset"].as_u64().unwrap(),
        "{name}: data offset"
    );

    let fields = r["fields"].as_array().unwrap();
    assert_eq!(store.gguf_metadata.len(), fields.len(), "{name}: key count");
    for ((k, v), f) in store.gguf_metadata.iter().zip(fields) {
        assert_eq!(k, f["key"].as_str().unwrap(), "{name}: key order");
        let types: Vec<u64> = f["types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        assert_eq!(type_chain(v), types, "{name}: types of {k}");
        match v {
            Value::Array(..) => {
                let mut ours = vec![];
                leaves(v, &mut ours);
                let theirs = f["value"].as_array().unwrap();
                assert_eq!(ours.len(), theirs.len(), "{name}: length of {k}");
                for (a, b) in ours.iter().zip(theirs) {
                    assert!(scalar_eq(a, b), "{name}: {k}: {a:?} vs {b}");
                }
            }
            _ => assert!(
                scalar_eq(v, &f["value"]),
                "{name}: {k}: {v:?} vs {}",
                f["value"]
            ),
        }
    }

    let tensors = r["tensors"].as_array().unwrap();
    assert_eq!(store.tensors.len(), tensors.len());
    for ((t, info), rt) in store.tensors.iter().zip(&header.tensors).zip(tensors) {
        assert_eq!(t.name, rt["name"].as_str().unwrap());
        assert_eq!(
            t.qtype.ggml_id().unwrap() as u64,
            rt["type"].as_u64().unwrap(),
            "{}",
            t.name
        );
        let ne: Vec<usize> = rt["ne"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let rev: Vec<usize> = ne.iter().rev().copied().collect();
        assert_eq!(t.shape, rev, "{}: shape is ne reversed", t.name);
        assert_eq!(
            t.data.len() as u64,
            rt["n_bytes"].as_u64().unwrap(),
            "{}",
            t.name
        );
        assert_eq!(
            header.data_offset + info.offset,
            rt["data_offset"].as_u64().unwrap(),
            "{}",
            t.name
        );
        // The view is the very bytes at that offset of the file.
        let off = rt["data_offset"].as_u64().unwrap() as usize;
        assert_eq!(
            t.data.as_slice(),
            &bytes[off..off + t.data.len()],
            "{}",
            t.name
        );
        // Dequantised with our kernels, equal to gguf-py's dequantisation (exact: same f16 scale
        // times the same small integer, both in f32).
        let want: Vec<f32> = rt["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let mut got = vec![0f32; t.numel()];
        dequantize_f32(t.qtype, t.data.as_slice(), &mut got);
        assert_eq!(&got[..want.len()], &want[..], "{}: values", t.name);
    }
}

#[test]
fn all_types_matches_gguf_py() {
    check_file("all-types.gguf");
}

#[test]
fn alignment_64_matches_gguf_py() {
    check_file("align64.gguf");
    assert_eq!(gguf::load(&fixture("align64.gguf")).unwrap().alignment, 64);
}

#[test]
fn v2_matches_gguf_py() {
    check_file("v2.gguf");
}

#[test]
fn tiny_llama_matches_gguf_py() {
    check_file("tiny-llama-q8_0.gguf");
    let s = gguf::load(&fixture("tiny-llama-q8_0.gguf")).unwrap();
    assert_eq!(
        gguf::find(&s.gguf_metadata, "general.architecture").and_then(Value::as_str),
        Some("llama")
    );
    assert_eq!(
        gguf::find(&s.gguf_metadata, "llama.block_count").and_then(Value::as_u64),
        Some(2)
    );
    assert_eq!(s.get("blk.0.attn_k.weight").unwrap().shape, vec![32, 64]);
}

/// The gguf-rs crate, an independent parser, reads the same header. gguf-rs 0.1 cannot read arrays
/// of arrays, so the all-types fixtures are checked through a copy without `test.arr_nested`,
/// written by our writer (the rest of the file keeps gguf-py's layout).
#[test]
fn agrees_with_gguf_rs() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "all-types.gguf",
        "align64.gguf",
        "v2.gguf",
        "tiny-llama-q8_0.gguf",
    ] {
        let mut path = fixture(name);
        let src = gguf::load(&path).unwrap();
        if gguf::find(&src.gguf_metadata, "test.arr_nested").is_some() {
            let meta: Vec<_> = src
                .gguf_metadata
                .iter()
                .filter(|(k, _)| k != "test.arr_nested")
                .cloned()
                .collect();
            let plan = src
                .tensors
                .iter()
                .map(|t| gguf::TensorPlan {
                    name: t.name.clone(),
                    qtype: t.qtype,
                    shape: t.shape.clone(),
                })
                .collect();
            path = dir.path().join(name);
            let mut w = gguf::GgufWriter::create(&path, &meta, plan).unwrap();
            for t in &src.tensors {
                w.write_tensor(t.data.as_slice()).unwrap();
            }
            w.finish().unwrap();
        }
        let store = gguf::load(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header = gguf::parse_header(&path, &bytes).unwrap();
        let mut c = gguf_rs::get_gguf_container(path.to_str().unwrap()).unwrap();
        let m = c.decode().unwrap();
        assert_eq!(m.get_version(), format!("v{}", header.version), "{name}");
        assert_eq!(m.num_kv(), store.gguf_metadata.len() as u64, "{name}");
        assert_eq!(m.num_tensor(), store.tensors.len() as u64, "{name}");
        assert_eq!(m.alignment(), store.alignment, "{name}");
        assert_eq!(m.data_offset(), header.data_offset, "{name}");
        let mut keys: Vec<&str> = store
            .gguf_metadata
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        keys.sort();
        let theirs: Vec<&str> = m.metadata().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, theirs, "{name}");
        for (t, (info, rt)) in store
            .tensors
            .iter()
            .zip(header.tensors.iter().zip(m.tensors()))
        {
            assert_eq!(t.name, rt.name, "{name}");
            assert_eq!(t.qtype.ggml_id().unwrap(), rt.kind, "{name} {}", t.name);
            assert_eq!(info.ne, rt.shape, "{name} {}", t.name);
            assert_eq!(info.offset, rt.offset, "{name} {}", t.name);
            // gguf-rs 0.1.8 gives every type id >= 10 a block of 256, so its BF16 size is wrong.
            if t.qtype != qtune::quant::QType::BF16 {
                assert_eq!(t.data.len() as u64, rt.size, "{name} {}", t.name);
            }
        }
    }
}

/// Our writer re-writing a gguf-py file gives the same bytes (same layout rules).
#[test]
fn rewrite_is_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    // QTUNE_KEEP_GGUF_DIR keeps the rewrites for tests/reference/check_gguf.py.
    let keep = std::env::var_os("QTUNE_KEEP_GGUF_DIR").map(PathBuf::from);
    for name in ["all-types.gguf", "align64.gguf", "tiny-llama-q8_0.gguf"] {
        let store = gguf::load(&fixture(name)).unwrap();
        let out = match &keep {
            Some(k) => {
                std::fs::create_dir_all(k).unwrap();
                k.join(format!("rewrite-{name}"))
            }
            None => dir.path().join(name),
        };
        gguf::rewrite(&store, &out).unwrap();
        let a = std::fs::read(fixture(name)).unwrap();
        let b = std::fs::read(&out).unwrap();
        assert_eq!(a.len(), b.len(), "{name}: length");
        assert!(a == b, "{name}: bytes differ");
    }
}

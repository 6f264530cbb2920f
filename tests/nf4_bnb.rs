//! A bitsandbytes 4-bit checkpoint (tests/fixtures/nf4/bnb_tiny, see gen_nf4_fixtures.py): loading
//! it gives NF4 tensors whose dequantisation equals bnb's `dequantize_4bit` bit for bit; and broken
//! or unsupported variants fail with clear errors.
use qtune::format::safetensors::{load, read_file};
use qtune::quant::QType;
use qtune::store::SourceFormat;
use qtune::Error;
use safetensors::tensor::{serialize, TensorView};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4/bnb_tiny")
}

#[test]
fn loads_and_dequantises_like_bnb() {
    let store = load(&fixture()).unwrap();
    assert_eq!(store.format, SourceFormat::BnbNf4);
    assert!(store
        .config
        .as_ref()
        .unwrap()
        .get("quantization_config")
        .is_some());
    let expected = read_file(&fixture().join("expected.safetensors")).unwrap();
    assert_eq!(expected.len(), 7, "one layer: q k v o gate up down");
    for e in &expected {
        let t = store
            .get(&e.name)
            .unwrap_or_else(|| panic!("{} missing", e.name));
        assert_eq!(t.qtype, QType::NF4);
        assert_eq!(t.shape, e.shape, "{}", e.name);
        let m = t.matrix();
        let mut got = vec![0f32; m.rows * m.cols];
        m.dequant_tile(0, m.rows, 0, m.cols, &mut got);
        let want: Vec<f32> = e
            .data
            .as_slice()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let bad = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(bad.is_none(), "{}: element {bad:?} differs", e.name);
    }
    // Everything else is plain fp16, and no bnb part leaks out as its own tensor.
    assert_eq!(
        store.get("model.embed_tokens.weight").unwrap().qtype,
        QType::F16
    );
    assert!(store
        .tensors
        .iter()
        .all(|t| !t.name.contains("absmax") && !t.name.contains("quant_")));
}

/// Rewrites the fixture with `edit` applied to its (name, dtype, shape, bytes) list.
fn variant(dir: &Path, edit: impl Fn(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>)) {
    let raw = read_file(&fixture().join("model.safetensors")).unwrap();
    let mut ts: Vec<_> = raw
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.dtype,
                t.shape.clone(),
                t.data.as_slice().to_vec(),
            )
        })
        .collect();
    edit(&mut ts);
    let views: Vec<(String, TensorView<'_>)> = ts
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        serialize(views, None).unwrap(),
    )
    .unwrap();
}

const Q: &str = "model.layers.0.self_attn.q_proj.weight";

fn set_state(
    ts: &mut [(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
    f: impl Fn(&mut serde_json::Value),
) {
    let key = format!("{Q}.quant_state.bitsandbytes__nf4");
    let e = ts.iter_mut().find(|t| t.0 == key).unwrap();
    let mut j: serde_json::Value = serde_json::from_slice(&e.3).unwrap();
    f(&mut j);
    e.3 = j.to_string().into_bytes();
    e.2 = vec![e.3.len()];
}

#[test]
fn missing_part() {
    let d = tempfile::tempdir().unwrap();
    variant(d.path(), |ts| {
        ts.retain(|t| t.0 != format!("{Q}.nested_absmax"))
    });
    match load(d.path()) {
        Err(Error::MissingTensor { tensor, .. }) => {
            assert_eq!(tensor, format!("{Q}.nested_absmax"))
        }
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn rejects_fp4() {
    let d = tempfile::tempdir().unwrap();
    variant(d.path(), |ts| {
        for t in ts.iter_mut() {
            t.0 = t.0.replace("bitsandbytes__nf4", "bitsandbytes__fp4");
        }
    });
    assert!(matches!(load(d.path()), Err(Error::UnsupportedType { .. })));
}

#[test]
fn rejects_other_blocksizes() {
    for (key, val) in [("blocksize", 128), ("nested_blocksize", 128)] {
        let d = tempfile::tempdir().unwrap();
        variant(d.path(), |ts| set_state(ts, |j| j[key] = val.into()));
        match load(d.path()) {
            Err(e @ Error::UnsupportedType { .. }) => assert!(e.to_string().contains(Q), "{e}"),
            other => panic!("{key}: {:?}", other.err()),
        }
    }
}

#[test]
fn rejects_wrong_shape_in_state() {
    let d = tempfile::tempdir().unwrap();
    variant(d.path(), |ts| {
        set_state(ts, |j| j["shape"] = serde_json::json!([64, 128]))
    });
    assert!(matches!(load(d.path()), Err(Error::Shape { .. })));
}

#[test]
fn missing_quant_state() {
    let d = tempfile::tempdir().unwrap();
    variant(d.path(), |ts| {
        ts.retain(|t| !t.0.starts_with(&format!("{Q}.quant_state")))
    });
    match load(d.path()) {
        Err(Error::MissingTensor { tensor, .. }) => {
            assert_eq!(tensor, format!("{Q}.quant_state.bitsandbytes__nf4"))
        }
        other => panic!("{:?}", other.err()),
    }
}

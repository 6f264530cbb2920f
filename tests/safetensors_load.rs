//! safetensors loading: good single and sharded files, and one test per kind of bad input, each
//! checking the error names the file and (where there is one) the tensor.
use qtune::format::safetensors::load;
use qtune::quant::QType;
use qtune::store::SourceFormat;
use qtune::Error;
use safetensors::tensor::{serialize, Dtype, TensorView};
use std::path::Path;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A file written by the `safetensors` crate: (name, dtype, shape, bytes).
fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, serialize(views, None).unwrap()).unwrap();
}

/// A hand-made file: 8-byte length, header text, data.
fn write_raw(path: &Path, header: &str, data: &[u8]) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

fn sample() -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
    let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
    let h: Vec<u8> = [1.5f32, -2.0, 0.25, 8.0]
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    let b: Vec<u8> = [3.0f32, -0.5]
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect();
    vec![
        ("a.weight", Dtype::F32, vec![3, 4], f32_bytes(&w)),
        ("b.h", Dtype::F16, vec![4], h),
        ("c.bf", Dtype::BF16, vec![1, 2], b),
    ]
}

fn values(store: &qtune::store::WeightStore, name: &str) -> Vec<f32> {
    let t = store.get(name).unwrap();
    let m = t.matrix();
    let mut out = vec![0f32; m.rows * m.cols];
    m.dequant_tile(0, m.rows, 0, m.cols, &mut out);
    out
}

#[test]
fn single_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.safetensors");
    write_st(&p, &sample());
    let s = load(&p).unwrap();
    assert_eq!(s.format, SourceFormat::Safetensors);
    assert_eq!(s.tensors.len(), 3);
    let a = s.get("a.weight").unwrap();
    assert_eq!((a.qtype, a.shape.clone()), (QType::F32, vec![3, 4]));
    assert_eq!(values(&s, "a.weight")[5], 1.5);
    assert_eq!(values(&s, "b.h"), vec![1.5, -2.0, 0.25, 8.0]);
    assert_eq!(s.get("c.bf").unwrap().qtype, QType::BF16);
    assert_eq!(values(&s, "c.bf"), vec![3.0, -0.5]);
    assert!(s.config.is_none());
}

#[test]
fn directory_with_config() {
    let d = tempfile::tempdir().unwrap();
    write_st(&d.path().join("model.safetensors"), &sample());
    std::fs::write(d.path().join("config.json"), r#"{"hidden_size": 4}"#).unwrap();
    let s = load(d.path()).unwrap();
    assert_eq!(s.tensors.len(), 3);
    assert_eq!(s.config.unwrap()["hidden_size"], 4);
}

fn write_index(dir: &Path, map: &[(&str, &str)]) {
    let wm: serde_json::Map<String, serde_json::Value> = map
        .iter()
        .map(|(t, f)| (t.to_string(), serde_json::Value::String(f.to_string())))
        .collect();
    let j = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": wm});
    std::fs::write(dir.join("model.safetensors.index.json"), j.to_string()).unwrap();
}

fn sharded(dir: &Path) {
    let s = sample();
    write_st(&dir.join("model-00001-of-00002.safetensors"), &s[..2]);
    write_st(&dir.join("model-00002-of-00002.safetensors"), &s[2..]);
    write_index(
        dir,
        &[
            ("a.weight", "model-00001-of-00002.safetensors"),
            ("b.h", "model-00001-of-00002.safetensors"),
            ("c.bf", "model-00002-of-00002.safetensors"),
        ],
    );
}

#[test]
fn sharded_directory() {
    let d = tempfile::tempdir().unwrap();
    sharded(d.path());
    let s = load(d.path()).unwrap();
    let names: Vec<&str> = s.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a.weight", "b.h", "c.bf"]);
    assert_eq!(values(&s, "c.bf"), vec![3.0, -0.5]);
}

#[test]
fn missing_shard() {
    let d = tempfile::tempdir().unwrap();
    sharded(d.path());
    std::fs::remove_file(d.path().join("model-00002-of-00002.safetensors")).unwrap();
    match load(d.path()) {
        Err(Error::MissingShard { shard, tensor, .. }) => {
            assert_eq!(
                (shard.as_str(), tensor.as_str()),
                ("model-00002-of-00002.safetensors", "c.bf")
            )
        }
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn tensor_listed_but_absent_from_shard() {
    let d = tempfile::tempdir().unwrap();
    sharded(d.path());
    write_index(
        d.path(),
        &[
            ("a.weight", "model-00001-of-00002.safetensors"),
            ("b.h", "model-00001-of-00002.safetensors"),
            ("c.bf", "model-00002-of-00002.safetensors"),
            ("ghost", "model-00002-of-00002.safetensors"),
        ],
    );
    match load(d.path()) {
        Err(Error::MissingTensor { path, tensor, .. }) => {
            assert_eq!(tensor, "ghost");
            assert!(path.ends_with("model-00002-of-00002.safetensors"));
        }
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn truncated_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.safetensors");
    std::fs::write(&p, [1u8, 2, 3]).unwrap();
    let e = load(&p).err().expect("must fail");
    assert!(matches!(e, Error::Truncated { len: 3, .. }), "{e}");
    assert!(e.to_string().contains("t.safetensors"));
}

#[test]
fn header_length_past_end() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("h.safetensors");
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&p, b).unwrap();
    let e = load(&p).err().expect("must fail");
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("1000"), "{e}");
}

#[test]
fn bad_json() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("j.safetensors");
    write_raw(&p, r#"{"a": {"dtype": "F32", "#, &[]);
    let e = load(&p).err().expect("must fail");
    assert!(matches!(e, Error::Json { .. }), "{e}");
    assert!(e.to_string().contains("j.safetensors"));
}

#[test]
fn data_past_end() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("d.safetensors");
    write_raw(
        &p,
        r#"{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#,
        &[0u8; 10],
    );
    match load(&p) {
        Err(Error::DataPastEnd { tensor, len, .. }) => {
            assert_eq!((tensor.as_str(), len), ("w", 8 + 62 + 10))
        }
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn shape_bytes_mismatch() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("s.safetensors");
    write_raw(
        &p,
        r#"{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}"#,
        &[0u8; 16],
    );
    match load(&p) {
        Err(e @ Error::Shape { .. }) => assert!(e.to_string().contains("'w'"), "{e}"),
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn unsupported_dtype_names_tensor() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("u.safetensors");
    write_st(&p, &[("ids", Dtype::I32, vec![2], vec![0u8; 8])]);
    match load(&p) {
        Err(Error::UnsupportedType {
            tensor, type_name, ..
        }) => assert_eq!((tensor.as_str(), type_name.as_str()), ("ids", "I32")),
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn empty_directory() {
    let d = tempfile::tempdir().unwrap();
    assert!(matches!(load(d.path()), Err(Error::Invalid(_))));
}

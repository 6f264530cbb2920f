//! The NF4 writer: quantise the fp16 tiny Llama (tests/fixtures/nf4/src_tiny), load the written
//! directory back, and compare with `quantize_nf4` on the source and with bitsandbytes' own
//! quantisation of the same weights (tests/fixtures/nf4/bnb_tiny).
//! `QTUNE_KEEP_NF4_DIR=<path>` keeps a copy of the output for tests/reference/check_nf4_dir.py.
use qtune::format::bnb::{is_nf4_target, write_nf4_dir};
use qtune::format::safetensors::{load, read_file};
use qtune::quant::nf4::quantize_nf4;
use qtune::quant::QType;
use qtune::store::{SourceFormat, StoredTensor};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4")
}

fn f32s(t: &StoredTensor) -> Vec<f32> {
    let m = t.matrix();
    let mut x = vec![0f32; m.rows * m.cols];
    m.dequant_tile(0, m.rows, 0, m.cols, &mut x);
    x
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn round_trip_matches_quantize_nf4_and_bnb() {
    let src = load(&fixtures().join("src_tiny")).unwrap();
    let bnb = load(&fixtures().join("bnb_tiny")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("nf4");
    let report = write_nf4_dir(&src, &out).unwrap();
    assert_eq!(report.nf4_tensors, 7);
    assert_eq!(report.copied_tensors, src.tensors.len() - 7);
    assert!(report
        .extra_files
        .contains(&"tokenizer_config.json".to_string()));
    assert!(!d.path().join("nf4.tmp").exists());
    assert_eq!(
        std::fs::metadata(out.join("model.safetensors"))
            .unwrap()
            .len(),
        report.file_bytes
    );
    if let Ok(keep) = std::env::var("QTUNE_KEEP_NF4_DIR") {
        copy_dir(&out, Path::new(&keep));
    }

    // Every key bnb writes, and each quant-state JSON equal to bnb's byte for byte (ours carries
    // trailing spaces: its length is fixed in the header before the offset is known).
    let ours = read_file(&out.join("model.safetensors")).unwrap();
    let theirs = read_file(&fixtures().join("bnb_tiny/model.safetensors")).unwrap();
    let mut names: Vec<&str> = ours.iter().map(|t| t.name.as_str()).collect();
    let mut bnb_names: Vec<&str> = theirs.iter().map(|t| t.name.as_str()).collect();
    names.sort();
    bnb_names.sort();
    assert_eq!(names, bnb_names);
    for t in ours
        .iter()
        .filter(|t| t.name.ends_with("bitsandbytes__nf4"))
    {
        let b = theirs.iter().find(|b| b.name == t.name).unwrap();
        assert_eq!(
            t.data.as_slice().trim_ascii_end(),
            b.data.as_slice(),
            "{}",
            t.name
        );
    }

    let got = load(&out).unwrap();
    assert_eq!(got.format, SourceFormat::BnbNf4);
    let qc = &got.config.as_ref().unwrap()["quantization_config"];
    assert_eq!(
        qc,
        &bnb.config.as_ref().unwrap()["quantization_config"],
        "as transformers writes it"
    );
    assert_eq!(got.tensors.len(), src.tensors.len());
    for s in &src.tensors {
        let g = got.get(&s.name).unwrap();
        assert_eq!(g.shape, s.shape, "{}", s.name);
        if !is_nf4_target(s) {
            assert_eq!(
                (g.qtype, g.data.as_slice()),
                (s.qtype, s.data.as_slice()),
                "{} copied",
                s.name
            );
            continue;
        }
        assert_eq!(g.qtype, QType::NF4);
        let st = g.nf4.as_ref().unwrap();
        // Against our own quantiser on the source values.
        let q = quantize_nf4(&f32s(s)).unwrap();
        assert_eq!(g.data.as_slice(), &q.packed[..], "{}", s.name);
        assert_eq!(st.absmax_q.as_slice(), &q.absmax_q[..], "{}", s.name);
        assert_eq!(st.nested_absmax, q.nested_absmax, "{}", s.name);
        assert_eq!(st.offset.to_bits(), q.offset.to_bits(), "{}", s.name);
        // Against bitsandbytes' checkpoint of the same fp16 weights: byte for byte.
        let b = bnb.get(&s.name).unwrap();
        let bs = b.nf4.as_ref().unwrap();
        assert_eq!(g.data.as_slice(), b.data.as_slice(), "{} vs bnb", s.name);
        assert_eq!(
            st.absmax_q.as_slice(),
            bs.absmax_q.as_slice(),
            "{} vs bnb",
            s.name
        );
        assert_eq!(st.nested_absmax, bs.nested_absmax, "{} vs bnb", s.name);
        assert_eq!(
            st.offset.to_bits(),
            bs.offset.to_bits(),
            "{} vs bnb",
            s.name
        );
        assert_eq!(st.nested_code, bs.nested_code);
        assert_eq!(st.code, bs.code);
    }
}

#[test]
fn refuses_existing_output() {
    let src = load(&fixtures().join("src_tiny")).unwrap();
    let d = tempfile::tempdir().unwrap();
    assert!(write_nf4_dir(&src, d.path()).is_err());
}

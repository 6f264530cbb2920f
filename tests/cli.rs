//! The `qtune` binary end to end: good runs print what they did, bad input exits 1 with a message
//! that names the file and what to do, never a panic or a backtrace.
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn qtune(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args(args)
        .output()
        .expect("run qtune");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_clean_error(stderr: &str) {
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
}

#[test]
fn inspect_embedded_default_with_verify() {
    let p = fixture("gguf/tiny-llama-q8_0.gguf");
    let (code, out, err) = qtune(&["inspect", p.to_str().unwrap(), "--verify"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("architecture: llama"), "{out}");
    assert!(
        out.contains("blk.0.attn_q.weight") && out.contains("Q8_0"),
        "{out}"
    );
    assert!(out.contains("bits per weight"), "{out}");
    assert!(
        out.contains("gguf-rs agrees: GGUF v3, 21 keys, 21 tensors"),
        "{out}"
    );
}

#[test]
fn quantize_gguf_then_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("gguf/tiny-llama-q8_0.gguf");
    for t in ["q4_0", "q8_0", "q4_k"] {
        let out = dir.path().join(format!("m-{t}.gguf"));
        let (code, stdout, err) = qtune(&[
            "quantize",
            "--model",
            src.to_str().unwrap(),
            "--type",
            t,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{t}: {err}");
        assert!(stdout.contains("wrote"), "{stdout}");
        let (code, stdout, err) = qtune(&["inspect", out.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let want = if t == "q4_0" { "Q4_0" } else { "Q8_0" }; // tiny rows (64) are no Q4_K rows: Q8_0 fallback
        assert!(stdout.contains(want), "{t}: {stdout}");
        assert!(!Path::new(&format!("{}.tmp", out.display())).exists());
    }
}

#[test]
fn quantize_hf_dir_to_nf4_then_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nf4");
    let src = fixture("nf4/src_tiny");
    let (code, stdout, err) = qtune(&[
        "quantize",
        "--model",
        src.to_str().unwrap(),
        "--type",
        "nf4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("quantised to NF4"), "{stdout}");
    let (code, stdout, err) = qtune(&["inspect", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("NF4"), "{stdout}");
}

#[test]
fn missing_file_is_a_clean_error() {
    let (code, _, err) = qtune(&["inspect", "/nonexistent/model.gguf"]);
    assert_eq!(code, 1);
    assert_clean_error(&err);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
}

#[test]
fn corrupt_gguf_is_a_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("gguf/tiny-llama-q8_0.gguf")).unwrap();
    let p = dir.path().join("cut.gguf");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let (code, _, err) = qtune(&["inspect", p.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_clean_error(&err);
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );
    let p = dir.path().join("magic.gguf");
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGML");
    std::fs::write(&p, &b).unwrap();
    let (code, _, err) = qtune(&["inspect", p.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_clean_error(&err);
    assert!(err.contains("magic.gguf"), "{err}");
}

#[test]
fn unsupported_target_type_is_a_clean_error() {
    let src = fixture("gguf/tiny-llama-q8_0.gguf");
    let (code, _, err) = qtune(&[
        "quantize",
        "--model",
        src.to_str().unwrap(),
        "--type",
        "q5_1",
        "--out",
        "/tmp/never.gguf",
    ]);
    assert_eq!(code, 1);
    assert_clean_error(&err);
    assert!(err.contains("q4_0, q8_0"), "{err}");
}

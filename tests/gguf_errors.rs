//! Every malformed-GGUF case gives its named error (with the path, and the tensor where there is one),
//! never a panic or an allocation the file cannot back. Bad files are patched copies of a good one.
use qtune::format::gguf::{self, GgufWriter, TensorPlan, Value};
use qtune::quant::QType;
use qtune::Error;
use std::path::{Path, PathBuf};

/// A small good file: 3 metadata keys (one an array), tensors "w" (Q8_0, [2, 32]) and "b" (F32, [4]).
fn good(dir: &Path) -> (PathBuf, Vec<u8>) {
    let p = dir.join("good.gguf");
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String("test".into()),
        ),
        ("general.alignment".to_string(), Value::U32(32)),
        (
            "x.arr".to_string(),
            Value::Array(4, vec![Value::U32(1), Value::U32(2), Value::U32(3)]),
        ),
    ];
    let plan = vec![
        TensorPlan {
            name: "w".into(),
            qtype: QType::Q8_0,
            shape: vec![2, 32],
        },
        TensorPlan {
            name: "b".into(),
            qtype: QType::F32,
            shape: vec![4],
        },
    ];
    let mut w = GgufWriter::create(&p, &meta, plan).unwrap();
    w.write_tensor(&[1u8; 68]).unwrap();
    w.write_tensor(&[0u8; 16]).unwrap();
    w.finish().unwrap();
    gguf::load(&p).expect("the good file loads");
    let b = std::fs::read(&p).unwrap();
    (p, b)
}

fn find(b: &[u8], pat: &[u8]) -> usize {
    b.windows(pat.len())
        .position(|w| w == pat)
        .expect("pattern in file")
}

/// Position of the n_dims field of tensor `name`'s info.
fn info_pos(b: &[u8], name: &str) -> usize {
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(name.as_bytes());
    pat.extend_from_slice(&[1, 0, 0, 0]); // n_dims = 1 ("b") ...
    let p = b.windows(pat.len()).position(|w| w == pat).or_else(|| {
        pat.truncate(pat.len() - 4);
        pat.extend_from_slice(&[2, 0, 0, 0]); // ... or 2 ("w")
        b.windows(pat.len()).position(|w| w == pat)
    });
    p.unwrap() + 8 + name.len()
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes `bytes` beside the good file and loads it; the error must mention the file.
fn load_bad(dir: &Path, bytes: &[u8]) -> (PathBuf, Error) {
    let p = dir.join("bad.gguf");
    std::fs::write(&p, bytes).unwrap();
    let e = match gguf::load(&p) {
        Ok(_) => panic!("a bad file loaded"),
        Err(e) => e,
    };
    assert!(
        e.to_string().contains(p.to_str().unwrap()),
        "message lacks the path: {e}"
    );
    (p, e)
}

fn setup() -> (tempfile::TempDir, Vec<u8>) {
    let d = tempfile::tempdir().unwrap();
    let (_, b) = good(d.path());
    (d, b)
}

#[test]
fn bad_magic() {
    let (d, mut b) = setup();
    b[..4].copy_from_slice(b"GGML");
    let (_, e) = load_bad(d.path(), &b);
    assert!(matches!(e, Error::BadMagic { .. }), "{e}");
}

#[test]
fn version_1_and_4() {
    for v in [1u32, 4, 0] {
        let (d, mut b) = setup();
        put_u32(&mut b, 4, v);
        let (_, e) = load_bad(d.path(), &b);
        assert!(
            matches!(e, Error::UnsupportedVersion { version, .. } if version == v as u64),
            "{e}"
        );
    }
}

#[test]
fn big_endian() {
    let (d, mut b) = setup();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    let (_, e) = load_bad(d.path(), &b);
    assert!(
        matches!(e, Error::Corrupt { .. }) && e.to_string().contains("big-endian"),
        "{e}"
    );
}

#[test]
fn truncated_header_metadata_and_infos() {
    let (d, b) = setup();
    let key = find(&b, b"x.arr");
    let b_info = info_pos(&b, "b");
    for (cut, what) in [
        (2, "magic"),
        (12, "tensor count"),
        (key + 2, "key of metadata entry 2"),
        (key + 12, "x.arr"),
        (b_info + 6, "'b'"),
    ] {
        let (_, e) = load_bad(d.path(), &b[..cut]);
        assert!(matches!(e, Error::Truncated { .. }), "{e}");
        assert!(e.to_string().contains(what), "cut at {cut}: {e}");
    }
}

#[test]
fn unsupported_type() {
    let (d, mut b) = setup();
    let p = info_pos(&b, "w");
    put_u32(&mut b, p + 4 + 16, 16); // IQ2_XXS
    let (_, e) = load_bad(d.path(), &b);
    assert!(
        matches!(e, Error::UnsupportedType { ref tensor, .. } if tensor == "w"),
        "{e}"
    );
    assert!(
        e.to_string().contains("IQ2_XXS") && e.to_string().contains("'w'"),
        "{e}"
    );
    put_u32(&mut b, p + 4 + 16, 1000);
    let (_, e) = load_bad(d.path(), &b);
    assert!(
        matches!(e, Error::UnsupportedType { .. }) && e.to_string().contains("1000"),
        "{e}"
    );
}

#[test]
fn too_many_dims() {
    let (d, mut b) = setup();
    let p = info_pos(&b, "w");
    put_u32(&mut b, p, 5);
    let (_, e) = load_bad(d.path(), &b);
    assert!(
        matches!(e, Error::Shape { ref tensor, .. } if tensor == "w"),
        "{e}"
    );
    assert!(e.to_string().contains("'w'"));
}

#[test]
fn zero_dim() {
    let (d, mut b) = setup();
    let p = info_pos(&b, "w");
    put_u64(&mut b, p + 4 + 8, 0); // ne[1] = 0
    let (_, e) = load_bad(d.path(), &b);
    assert!(
        matches!(e, Error::Shape { ref tensor, .. } if tensor == "w"),
        "{e}"
    );
}

#[test]
fn overflowing_dims() {
    let (d, mut b) = setup();
    let p = info_pos(&b, "w");
    put_u64(&mut b, p + 4, 1 << 45);
    put_u64(&mut b, p + 4 + 8, 1 << 40);
    let (_, e) = load_bad(d.path(), &b);
    assert!(
        matches!(e, Error::Corrupt { .. }) && e.to_string().contains("'w'"),
        "{e}"
    );
}

#[test]
fn row_not_multiple_of_block() {
    let (d, mut b) = setup();
    let p = info_pos(&b, "w");
    put_u64(&mut b, p + 4, 33);
    let (_, e) = load_bad(d.path(), &b);
    assert!(
        matches!(e, Error::Shape { ref tensor, .. } if tensor == "w"),
        "{e}"
    );
    assert!(e.to_string().contains("block size 32"), "{e}");
}

#[test]
fn misaligned_offset() {
    let (d, mut b) = setup();
    let p = info_pos(&b, "b");
    put_u64(&mut b, p + 4 + 8 + 4, 96 + 4);
    let (_, e) = load_bad(d.path(), &b);
    assert!(
        matches!(e, Error::Misaligned { ref tensor, offset: 100, alignment: 32, .. } if tensor == "b"),
        "{e}"
    );
}

#[test]
fn bad_alignment_value() {
    let (d, mut b) = setup();
    let p = find(&b, b"general.alignment") + "general.alignment".len() + 4;
    put_u32(&mut b, p, 48);
    let (_, e) = load_bad(d.path(), &b);
    assert!(
        matches!(e, Error::Corrupt { .. }) && e.to_string().contains("general.alignment"),
        "{e}"
    );
}

#[test]
fn data_past_end() {
    let (d, b) = setup();
    let (_, e) = load_bad(d.path(), &b[..b.len() - 20]);
    assert!(
        matches!(e, Error::DataPastEnd { ref tensor, .. } if tensor == "b"),
        "{e}"
    );
    let mut b2 = b.clone();
    let p = info_pos(&b2, "w");
    put_u64(&mut b2, p + 4 + 16 + 4, u64::MAX - 31); // aligned, but start + size overflows
    let (_, e) = load_bad(d.path(), &b2);
    assert!(
        matches!(e, Error::DataPastEnd { ref tensor, .. } if tensor == "w"),
        "{e}"
    );
}

#[test]
fn overlapping_tensors() {
    let (d, mut b) = setup();
    let p = info_pos(&b, "b");
    put_u64(&mut b, p + 4 + 8 + 4, 64); // inside w's 68 bytes
    let (_, e) = load_bad(d.path(), &b);
    assert!(
        matches!(e, Error::Corrupt { .. }) && e.to_string().contains("overlaps"),
        "{e}"
    );
    assert!(
        e.to_string().contains("'w'") && e.to_string().contains("'b'"),
        "{e}"
    );
}

#[test]
fn duplicate_names() {
    let (d, mut b) = setup();
    let p = info_pos(&b, "b");
    b[p - 1] = b'w';
    let (_, e) = load_bad(d.path(), &b);
    assert!(
        matches!(e, Error::Corrupt { .. }) && e.to_string().contains("'w' appears twice"),
        "{e}"
    );
}

#[test]
fn hostile_counts_and_lengths_do_not_allocate() {
    let (d, b) = setup();
    // n_tensors, n_kv
    for at in [8, 16] {
        let mut x = b.clone();
        put_u64(&mut x, at, u64::MAX);
        let (_, e) = load_bad(d.path(), &x);
        assert!(matches!(e, Error::Truncated { .. }), "{e}");
        put_u64(&mut x, at, 1 << 40);
        let (_, e) = load_bad(d.path(), &x);
        assert!(matches!(e, Error::Truncated { .. }), "{e}");
    }
    // key string length
    let mut x = b.clone();
    put_u64(&mut x, 24, 1 << 62);
    let (_, e) = load_bad(d.path(), &x);
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
    // array length
    let mut x = b.clone();
    let p = find(&x, b"x.arr") + 5 + 4 + 4;
    assert_eq!(&x[p..p + 8], &3u64.to_le_bytes());
    put_u64(&mut x, p, u64::MAX / 2);
    let (_, e) = load_bad(d.path(), &x);
    assert!(
        matches!(e, Error::Truncated { .. }) && e.to_string().contains("x.arr"),
        "{e}"
    );
    // tensor name length
    let mut x = b.clone();
    let p = info_pos(&x, "w") - 1 - 8;
    put_u64(&mut x, p, u64::MAX);
    let (_, e) = load_bad(d.path(), &x);
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
}

#[test]
fn truncation_anywhere_is_an_error() {
    let (d, b) = setup();
    let p = d.path().join("cut.gguf");
    // A cut inside the last tensor's trailing padding leaves every byte of data: that file is fine.
    let data_end = |path: &Path, b: &[u8]| {
        let h = gguf::parse_header(path, b).unwrap();
        h.tensors
            .iter()
            .map(|t| h.data_offset + t.offset + t.nbytes)
            .max()
            .unwrap() as usize
    };
    for n in (0..data_end(&p, &b)).step_by(7) {
        std::fs::write(&p, &b[..n]).unwrap();
        assert!(gguf::load(&p).is_err(), "loaded a file cut at {n}");
    }
    // The larger Llama fixture, through the same parser on slices (no file writes).
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/tiny-llama-q8_0.gguf");
    let big = std::fs::read(&path).unwrap();
    for n in (0..data_end(&path, &big)).step_by(7) {
        assert!(
            gguf::parse_header(&path, &big[..n]).is_err(),
            "parsed a file cut at {n}"
        );
    }
    assert!(gguf::parse_header(&path, &big).is_ok());
}

/// Random byte corruptions of the header region never panic (any Ok or Err is fine).
#[test]
fn corrupted_headers_never_panic() {
    for name in ["all-types.gguf", "tiny-llama-q8_0.gguf"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf")
            .join(name);
        corrupt_and_parse(&path);
    }
}

fn corrupt_and_parse(path: &Path) {
    let good = std::fs::read(path).unwrap();
    let header_len = gguf::parse_header(path, &good).unwrap().data_offset as usize;
    let mut s = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let (mut ok, mut err) = (0, 0);
    for _ in 0..20_000 {
        let mut b = good.clone();
        for _ in 0..1 + next() % 3 {
            let at = (next() % header_len as u64) as usize;
            b[at] = match next() % 4 {
                0 => 0xff,
                1 => 0,
                _ => next() as u8,
            };
        }
        match gguf::parse_header(path, &b) {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    // Most corruptions are caught; some (inside string bytes or values) are still valid files.
    assert!(
        err > 1_000 && ok > 0,
        "{}: {ok} ok, {err} errors",
        path.display()
    );
}

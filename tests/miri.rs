//! The unsafe-adjacent core, small enough for Miri (`cargo +nightly miri test --test miri`, run by
//! .ci/run when Miri is installed): the GGUF reader's views into shared bytes, every scalar
//! dequantiser bit-exact against gguf-py, the scalar quantisers, NF4, and the quantised matmul whose
//! rayon tasks write through a shared raw pointer. Inputs come from `include_bytes!` (Miri's
//! isolation forbids file reads; memory maps are not supported by Miri, so the mmap paths are
//! covered by the fuzzers instead). Also part of the normal `cargo test`.
use qtune::quant::dispatch::{dequant_fn, SimdLevel};
use qtune::quant::{scalar, QType};
use qtune::store::Bytes;
use std::path::Path;
use std::sync::Arc;

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Under Miri only a prefix (whole blocks), to keep the interpreter's run short.
fn prefix(n: usize, block: usize) -> usize {
    if cfg!(miri) {
        n.min(2 * block.max(256))
    } else {
        n
    }
}

#[test]
fn gguf_views_and_dequantisation() {
    for (name, bytes) in [
        (
            "all-types.gguf",
            &include_bytes!("fixtures/gguf/all-types.gguf")[..],
        ),
        (
            "align64.gguf",
            &include_bytes!("fixtures/gguf/align64.gguf")[..],
        ),
        ("v2.gguf", &include_bytes!("fixtures/gguf/v2.gguf")[..]),
    ] {
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(bytes.to_vec());
        let store = qtune::format::gguf::from_shared(Path::new(name), owner).unwrap();
        assert!(!store.tensors.is_empty(), "{name}");
        for t in &store.tensors {
            let m = t.matrix();
            let mut row = vec![0f32; m.cols];
            for r in 0..m.rows.min(2) {
                m.dequant_tile(r, 1, 0, m.cols, &mut row);
            }
        }
        // Every prefix of the file is refused cleanly (the reader never reads past the bytes).
        let step = if cfg!(miri) { 97 } else { 1 };
        let h = qtune::format::gguf::parse_header(Path::new(name), bytes).unwrap();
        let end = h.tensors.iter().map(|t| t.offset + t.nbytes).max().unwrap() + h.data_offset;
        // (Trailing alignment padding after the last tensor may go.)
        for cut in (0..end as usize).step_by(step) {
            let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(bytes[..cut].to_vec());
            assert!(qtune::format::gguf::from_shared(Path::new(name), owner).is_err());
        }
    }
}

#[test]
fn byte_views_stay_in_bounds() {
    let b = Bytes::from_vec((0u8..100).collect());
    assert_eq!(b.len(), 100);
    let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new((0u8..100).collect::<Vec<u8>>());
    let v = Bytes::from_shared(owner.clone(), 10, 20);
    assert_eq!(v.as_slice(), &(10u8..30).collect::<Vec<u8>>()[..]);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Bytes::from_shared(owner, 90, 20)
    }));
    assert!(r.is_err(), "a view past the end must be refused");
}

#[test]
fn scalar_dequantisers_match_gguf_py() {
    let cases: [(QType, &[u8], &[u8]); 12] = [
        (
            QType::F16,
            include_bytes!("fixtures/ggml/deq_F16.bin"),
            include_bytes!("fixtures/ggml/deq_F16.f32"),
        ),
        (
            QType::BF16,
            include_bytes!("fixtures/ggml/deq_BF16.bin"),
            include_bytes!("fixtures/ggml/deq_BF16.f32"),
        ),
        (
            QType::Q4_0,
            include_bytes!("fixtures/ggml/deq_Q4_0.bin"),
            include_bytes!("fixtures/ggml/deq_Q4_0.f32"),
        ),
        (
            QType::Q4_1,
            include_bytes!("fixtures/ggml/deq_Q4_1.bin"),
            include_bytes!("fixtures/ggml/deq_Q4_1.f32"),
        ),
        (
            QType::Q5_0,
            include_bytes!("fixtures/ggml/deq_Q5_0.bin"),
            include_bytes!("fixtures/ggml/deq_Q5_0.f32"),
        ),
        (
            QType::Q5_1,
            include_bytes!("fixtures/ggml/deq_Q5_1.bin"),
            include_bytes!("fixtures/ggml/deq_Q5_1.f32"),
        ),
        (
            QType::Q8_0,
            include_bytes!("fixtures/ggml/deq_Q8_0.bin"),
            include_bytes!("fixtures/ggml/deq_Q8_0.f32"),
        ),
        (
            QType::Q2_K,
            include_bytes!("fixtures/ggml/deq_Q2_K.bin"),
            include_bytes!("fixtures/ggml/deq_Q2_K.f32"),
        ),
        (
            QType::Q3_K,
            include_bytes!("fixtures/ggml/deq_Q3_K.bin"),
            include_bytes!("fixtures/ggml/deq_Q3_K.f32"),
        ),
        (
            QType::Q4_K,
            include_bytes!("fixtures/ggml/deq_Q4_K.bin"),
            include_bytes!("fixtures/ggml/deq_Q4_K.f32"),
        ),
        (
            QType::Q5_K,
            include_bytes!("fixtures/ggml/deq_Q5_K.bin"),
            include_bytes!("fixtures/ggml/deq_Q5_K.f32"),
        ),
        (
            QType::Q6_K,
            include_bytes!("fixtures/ggml/deq_Q6_K.bin"),
            include_bytes!("fixtures/ggml/deq_Q6_K.f32"),
        ),
    ];
    for (t, raw, want) in cases {
        let want = f32s(want);
        let n = prefix(want.len(), t.block_size());
        let raw = &raw[..t.bytes_for(n).unwrap()];
        let mut got = vec![0f32; n];
        dequant_fn(t, SimdLevel::Scalar)(raw, &mut got);
        for (i, (g, w)) in got.iter().zip(&want[..n]).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{} element {i}", t.name());
        }
    }
}

#[test]
fn scalar_quantisers_round_trip() {
    let n = 512;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
        .collect();
    type Quantiser = fn(&[f32], &mut [u8]);
    let quants: [(QType, Quantiser); 4] = [
        (QType::Q8_0, scalar::quant_q8_0),
        (QType::Q4_0, scalar::quant_q4_0),
        (QType::Q4_K, scalar::quant_q4_k),
        (QType::Q6_K, scalar::quant_q6_k),
    ];
    for (t, q) in quants {
        let mut bytes = vec![0u8; t.bytes_for(n).unwrap()];
        q(&x, &mut bytes);
        let mut back = vec![0f32; n];
        dequant_fn(t, SimdLevel::Scalar)(&bytes, &mut back);
        let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= max / 6.0, "{}: {a} vs {b}", t.name());
        }
    }
}

#[test]
fn nf4_round_trip() {
    let x: Vec<f32> = (0..512)
        .map(|i| ((i * 13 % 29) as f32 - 14.0) / 3.0)
        .collect();
    let q = qtune::quant::nf4::quantize_nf4(&x).unwrap();
    let mut back = vec![0f32; x.len()];
    q.as_ref().dequantize_scalar(0, &mut back);
    for (a, b) in x.iter().zip(&back) {
        assert!((a - b).abs() <= 14.0 / 3.0 * 0.2, "{a} vs {b}");
    }
    // A view that starts inside the tensor (a tile's row).
    let mut tail = vec![0f32; 64];
    q.as_ref().dequantize_scalar(448, &mut tail);
    assert_eq!(tail, back[448..]);
}

#[test]
fn quantised_matmul_tasks_write_disjoint_outputs() {
    // y = x·Wᵀ with W (rows 8, cols 64) in Q8_0: the parallel kernel against the scalar reference.
    let (rows, cols, m) = (8, 64, 3);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i % 17) as f32 - 8.0) / 4.0)
        .collect();
    let mut wq = vec![0u8; QType::Q8_0.bytes_for(w.len()).unwrap()];
    scalar::quant_q8_0(&w, &mut wq);
    let wm = qtune::quant::QMatrix {
        rows,
        cols,
        data: qtune::quant::QData::Ggml {
            qtype: QType::Q8_0,
            bytes: &wq,
        },
    };
    let x: Vec<f32> = (0..m * cols)
        .map(|i| ((i % 5) as f32 - 2.0) / 2.0)
        .collect();
    let (mut y, mut y_ref) = (vec![0f32; m * rows], vec![0f32; m * rows]);
    qtune::quant::matmul::qmatmul_fwd(&x, m, &wm, &mut y);
    qtune::quant::matmul::qmatmul_fwd_ref(&x, m, &wm, &mut y_ref);
    for (a, b) in y.iter().zip(&y_ref) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

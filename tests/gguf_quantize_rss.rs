//! `quantize_to_gguf` streams: converting a ~300 MB Q8_0 GGUF (537 MB as f16) to F16 keeps the
//! process's anonymous memory (our buffers; mapped file pages are not counted) far below one
//! tensor's f32 data (134 MB here).
use qtune::format::gguf::{self, GgufWriter, TensorPlan, Value};
use qtune::quant::QType;
use qtune::quantize::quantize_to_gguf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// RssAnon of this process in bytes (Linux): heap and stacks, not file-backed map pages.
fn rss_anon() -> u64 {
    status_bytes("RssAnon:")
}

/// VmRSS: everything resident, mapped file pages of the source included.
fn rss_total() -> u64 {
    status_bytes("VmRSS:")
}

fn status_bytes(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn quantize_streams_one_chunk_at_a_time() {
    const ROWS: usize = 4096;
    const COLS: usize = 8192;
    const N: usize = 8;
    let dir = tempfile::Builder::new()
        .prefix("qtune-qrss")
        .tempdir_in("/tmp")
        .unwrap();
    let src_path = dir.path().join("src.gguf");
    let plan: Vec<TensorPlan> = (0..N)
        .map(|i| TensorPlan {
            name: format!("blk.{i}.ffn_up.weight"),
            qtype: QType::Q8_0,
            shape: vec![ROWS, COLS],
        })
        .collect();
    let meta = vec![(
        "general.architecture".to_string(),
        Value::String("llama".into()),
    )];
    let mut w = GgufWriter::create(&src_path, &meta, plan).unwrap();
    let mut block = vec![0x00u8, 0x2C]; // f16 0.0625
    block.extend((0..32).map(|k| (k as i8 - 16) as u8));
    let chunk: Vec<u8> = block.iter().copied().cycle().take(34 * 30_000).collect();
    let tensor_bytes = QType::Q8_0.bytes_for(ROWS * COLS).unwrap();
    for _ in 0..N {
        let mut left = tensor_bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_chunk(&chunk[..n]).unwrap();
            left -= n;
        }
    }
    w.finish().unwrap();
    drop(chunk);

    let src = gguf::load(&src_path).unwrap();
    let out = dir.path().join("out.gguf");
    let base = rss_anon();
    let base_total = rss_total();
    let peak = Arc::new(AtomicU64::new(base));
    let peak_total = Arc::new(AtomicU64::new(base_total));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, peak_total, done) = (peak.clone(), peak_total.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_anon(), Ordering::Relaxed);
                peak_total.fetch_max(rss_total(), Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    let t0 = std::time::Instant::now();
    let r = quantize_to_gguf(&src, QType::F16, &out).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let grew = peak.load(Ordering::Relaxed).saturating_sub(base);
    let grew_total = peak_total
        .load(Ordering::Relaxed)
        .saturating_sub(base_total);
    eprintln!(
        "F16 conversion of {} weights ({} MB as f16) in {secs:.2} s; peak anonymous RSS +{} MB, \
         peak total RSS +{} MB",
        r.params,
        (r.params * 2) >> 20,
        grew >> 20,
        grew_total >> 20
    );
    // Source pages are released after each tensor (Bytes::release_pages): the whole RSS, mapped
    // pages included, stays near one source tensor (35 MB of Q8_0 here), far below the 285 MB file.
    let src_bytes = (N * tensor_bytes) as u64;
    assert!(
        grew_total < 96 << 20,
        "total RSS grew {} MB (source file {} MB): consumed pages are not released",
        grew_total >> 20,
        src_bytes >> 20
    );
    let one_tensor_f32 = (ROWS * COLS * 4) as u64;
    assert!(
        grew < 32 << 20,
        "anonymous RSS grew {} MB (one tensor in f32 is {} MB)",
        grew >> 20,
        one_tensor_f32 >> 20
    );

    let o = gguf::load(&out).unwrap();
    let t = o.get("blk.7.ffn_up.weight").unwrap();
    assert_eq!(t.qtype, QType::F16);
    let mut v = vec![0f32; 64];
    t.matrix().dequant_tile(ROWS - 1, 1, 0, 64, &mut v);
    assert_eq!(v[0], -16.0 * 0.0625);
    assert_eq!(v[33], -15.0 * 0.0625);
}

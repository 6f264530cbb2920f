//! Opening a ~2 GB GGUF maps it without reading it: resident memory grows by the header only, and
//! reading one tile faults in only that tile's pages.
use qtune::format::gguf::{self, GgufWriter, TensorPlan, Value};
use qtune::quant::QType;

/// VmRSS of this process in bytes (Linux).
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[test]
fn two_gb_file_maps_without_reading() {
    const ROWS: usize = 4096;
    const COLS: usize = 16384;
    const N: usize = 28; // 28 x 71.3 MB = 2.0 GB
    let dir = tempfile::Builder::new()
        .prefix("qtune-rss")
        .tempdir_in("/tmp")
        .unwrap();
    let path = dir.path().join("big.gguf");
    let plan: Vec<TensorPlan> = (0..N)
        .map(|i| TensorPlan {
            name: format!("blk.{i}.w"),
            qtype: QType::Q8_0,
            shape: vec![ROWS, COLS],
        })
        .collect();
    let tensor_bytes = QType::Q8_0.bytes_for(ROWS * COLS).unwrap();
    let meta = vec![(
        "general.architecture".to_string(),
        Value::String("test".into()),
    )];
    let mut w = GgufWriter::create(&path, &meta, plan).unwrap();
    // A 1 MiB-ish chunk of whole Q8_0 blocks: scale 1.0 (f16 0x3C00), quants k % 127.
    let mut block = vec![0x00u8, 0x3C];
    block.extend((0..32).map(|k| (k % 127) as u8));
    let chunk: Vec<u8> = block.iter().copied().cycle().take(34 * 30_000).collect();
    for _ in 0..N {
        let mut left = tensor_bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_chunk(&chunk[..n]).unwrap();
            left -= n;
        }
    }
    w.finish().unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size > 1_900_000_000, "file is {size} bytes");

    let before = rss();
    let store = gguf::load(&path).unwrap();
    let after_load = rss();
    assert_eq!(store.tensors.len(), N);
    assert!(
        after_load.saturating_sub(before) < 64 << 20,
        "load grew RSS by {} MB for a {} MB file",
        (after_load - before) >> 20,
        size >> 20
    );

    // One 32 x 1024 tile of the last tensor.
    let t = store.get(&format!("blk.{}.w", N - 1)).unwrap();
    let m = t.matrix();
    let mut tile = vec![0f32; 32 * 1024];
    m.dequant_tile(100, 32, 2048, 1024, &mut tile);
    assert_eq!(tile[0], 0.0);
    assert_eq!(tile[5], 5.0);
    let after_tile = rss();
    assert!(
        after_tile.saturating_sub(before) < 64 << 20,
        "load + one tile grew RSS by {} MB",
        (after_tile - before) >> 20
    );
    eprintln!(
        "file {} MB; RSS +{} KB after load, +{} KB after one tile",
        size >> 20,
        (after_load - before) >> 10,
        (after_tile - before) >> 10
    );
    drop(store);
    drop(dir);
}

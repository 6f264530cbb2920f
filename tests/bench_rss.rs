//! A synthetic bench model is generated straight into its quantised form: peak RSS growth while
//! generating ~64M weights as Q4_0 stays near their 36 MB of blocks, far below the 256 MB a
//! full-precision copy of them would take. (The only test in this binary, so no other test's
//! memory runs concurrently.)
use qtune::bench::{status_bytes, synthetic_store};
use qtune::quant::QType;

#[test]
fn generation_never_holds_a_full_precision_copy() {
    let cfg = serde_json::json!({
        "model_type": "llama", "vocab_size": 8192, "hidden_size": 1024,
        "intermediate_size": 4096, "num_hidden_layers": 4, "num_attention_heads": 8,
        "rms_norm_eps": 1e-5,
    });
    let before = status_bytes("VmRSS:");
    if before == 0 || std::fs::write("/proc/self/clear_refs", "5").is_err() {
        eprintln!("no /proc RSS counters here; skipping");
        return;
    }
    let store = synthetic_store(&cfg, QType::Q4_0, 3).unwrap();
    let peak = status_bytes("VmHWM:");
    let numel = store.numel();
    assert!(numel > 60_000_000, "{numel}");
    let quantised = store.nbytes();
    assert_eq!(quantised, (numel - 9 * 1024) / 32 * 18 + 9 * 1024 * 4);
    let grown = peak.saturating_sub(before);
    eprintln!(
        "{numel} weights, {quantised} bytes stored; RSS grew by {grown} (f32 would be {})",
        4 * numel
    );
    // Allocator slack and the thread pool's stacks: 16 MiB at most.
    assert!(
        grown <= quantised + (16 << 20),
        "RSS grew by {grown} for {quantised} stored bytes"
    );
    assert!(
        grown >= quantised / 2,
        "the store's bytes must be resident: grew {grown}"
    );
}

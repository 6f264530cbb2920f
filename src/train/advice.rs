//! Advice in the `--max-memory` refusal that depends on the base model: suggest `--quant nf4` only
//! where it would shrink the frozen weights.
use crate::quant::QType;
use crate::store::WeightStore;

/// Widest average (bits per weight) that counts as already 4-bit: NF4 with double quantisation is
/// ~4.13, Q4_0 4.5, Q4_K 4.5.
const FOUR_BIT: f64 = 4.6;

/// The end of the refusal's suggestion list: `" or --quant nf4 (now none)"` when the matrices the
/// run would hold (the decoder layers' 2-D weights, re-quantised to `--quant` if it names a type) average
/// wider than 4 bits, else a note that `--quant` cannot help, naming the base's types.
pub fn quant_hint(store: &WeightStore, quant: &str) -> String {
    let planned = QType::parse(&quant.to_ascii_lowercase());
    let (mut bits, mut n) = (0f64, 0f64);
    let mut types: Vec<&str> = Vec::new();
    // The decoder layers' matrices (GGUF `blk.N.*`): what `--quant` re-quantises; embeddings and
    // the output head stay as stored.
    let layer = |n: &str| {
        n.starts_with("model.layers.") || n.starts_with("transformer.h.") || n.starts_with("blk.")
    };
    for t in store
        .tensors
        .iter()
        .filter(|t| t.shape.len() == 2 && layer(&t.name))
    {
        let q = planned.unwrap_or(t.qtype);
        bits += q.bits_per_weight() * t.numel() as f64;
        n += t.numel() as f64;
        if !types.contains(&t.qtype.name()) {
            types.push(t.qtype.name());
        }
    }
    let bpw = if n > 0.0 { bits / n } else { 32.0 };
    if bpw > FOUR_BIT {
        format!(" or --quant nf4 (now {quant})")
    } else {
        format!(
            " (--quant cannot save more: the weights are already {} at {bpw:.2} bits per weight)",
            if planned.is_some() {
                quant.to_string()
            } else {
                types.join("/")
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::quant_hint;
    use crate::store::WeightStore;
    use std::path::Path;

    fn fixture(p: &str) -> WeightStore {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        WeightStore::open(&root.join(p)).unwrap()
    }

    #[test]
    fn nf4_only_where_it_helps() {
        // f32 safetensors base: NF4 would shrink it.
        let f32_base = fixture("llama/model");
        assert_eq!(quant_hint(&f32_base, "none"), " or --quant nf4 (now none)");
        assert_eq!(quant_hint(&f32_base, "q8_0"), " or --quant nf4 (now q8_0)");
        let h = quant_hint(&f32_base, "nf4");
        assert!(h.contains("cannot save more") && h.contains("nf4"), "{h}");
        // A bitsandbytes NF4 checkpoint, kept as it is.
        let nf4 = fixture("nf4/bnb_tiny");
        let h = quant_hint(&nf4, "none");
        assert!(h.contains("cannot save more") && h.contains("NF4"), "{h}");
        assert!(!h.contains("--quant nf4"), "{h}");
    }
}

//! `qtune inspect`: a human summary of a weight store (architecture, metadata, tensors, totals).
use crate::error::{Error, Result};
use crate::format::gguf::{self, Value};
use crate::store::{SourceFormat, WeightStore};
use std::fmt::Write;
use std::path::Path;

/// The model architecture: GGUF `general.architecture`, else config.json `model_type`, else its
/// first `architectures` entry.
pub fn architecture(store: &WeightStore) -> Option<String> {
    if let Some(a) =
        gguf::find(&store.gguf_metadata, "general.architecture").and_then(Value::as_str)
    {
        return Some(a.to_string());
    }
    let c = store.config.as_ref()?;
    c.get("model_type")
        .and_then(|v| v.as_str())
        .or_else(|| {
            c.get("architectures")
                .and_then(|a| a.get(0))
                .and_then(|v| v.as_str())
        })
        .map(str::to_string)
}

/// `1234567` -> `"1.23 M"`.
fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.2} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// `123456789` -> `"117.7 MiB"`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A multi-line report: source, architecture, metadata (`key = value`, long arrays shortened to
/// `[type; len] first few…`), one line per tensor (name, type, shape, bytes), then totals
/// (parameters, bytes, bits per weight of the whole model).
pub fn inspect(store: &WeightStore) -> String {
    let mut s = String::new();
    let fmt = match store.format {
        SourceFormat::Gguf => "GGUF",
        SourceFormat::Safetensors => "safetensors",
        SourceFormat::BnbNf4 => "bitsandbytes NF4 safetensors",
    };
    let _ = writeln!(s, "file: {} ({fmt})", store.path.display());
    let _ = writeln!(
        s,
        "architecture: {}",
        architecture(store).as_deref().unwrap_or("unknown")
    );
    if store.format == SourceFormat::Gguf {
        let _ = writeln!(s, "alignment: {}", store.alignment);
    }
    if !store.gguf_metadata.is_empty() {
        let _ = writeln!(s, "metadata ({} keys):", store.gguf_metadata.len());
        for (k, v) in &store.gguf_metadata {
            let _ = writeln!(s, "  {k} = {v}");
        }
    }
    if let Some(serde_json::Value::Object(c)) = &store.config {
        let _ = writeln!(s, "config.json ({} keys):", c.len());
        for (k, v) in c {
            let mut v = v.to_string();
            if v.len() > 80 {
                v = format!("{}…", v.chars().take(77).collect::<String>());
            }
            let _ = writeln!(s, "  {k} = {v}");
        }
    }
    let w = store
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(s, "tensors ({}):", store.tensors.len());
    let _ = writeln!(
        s,
        "  {:<w$}  {:<5}  {:<20}  {:>12}",
        "name", "type", "shape", "bytes"
    );
    for t in &store.tensors {
        let shape = format!("{:?}", t.shape);
        let _ = writeln!(
            s,
            "  {:<w$}  {:<5}  {:<20}  {:>12}",
            t.name,
            t.qtype.name(),
            shape,
            t.nbytes()
        );
    }
    let (n, b) = (store.numel() as u64, store.nbytes() as u64);
    let _ = writeln!(
        s,
        "total: {n} parameters ({}), {b} bytes ({}), {:.3} bits per weight",
        human_count(n),
        human_bytes(b),
        store.bits_per_weight()
    );
    s
}

/// Cross-checks our parse of a GGUF header against the independent `gguf-rs` parser (`qtune inspect
/// --verify`): version, counts, alignment, data offset, key names, and each tensor's name, type,
/// dims, offset and size. Returns a one-line summary, or an error listing the disagreements.
pub fn verify_gguf(path: &Path) -> Result<String> {
    let store = gguf::load(path)?;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map; only the header is touched (a multi-GB model is not read).
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let h = gguf::parse_header(path, &bytes)?;
    let p = path.to_str().ok_or_else(|| {
        Error::Invalid(format!(
            "{}: path is not UTF-8 (gguf-rs needs UTF-8)",
            path.display()
        ))
    })?;
    let m = gguf_rs::get_gguf_container(p)
        .and_then(|mut c| c.decode())
        .map_err(|e| {
            Error::Invalid(format!(
                "{}: gguf-rs cannot read this file ({e}); qtune's parser can",
                path.display()
            ))
        })?;
    let mut diffs = Vec::new();
    let mut cmp = |what: String, ours: String, theirs: String| {
        if ours != theirs {
            diffs.push(format!("{what}: qtune {ours}, gguf-rs {theirs}"));
        }
    };
    cmp("version".into(), format!("v{}", h.version), m.get_version());
    cmp(
        "metadata count".into(),
        store.gguf_metadata.len().to_string(),
        m.num_kv().to_string(),
    );
    cmp(
        "tensor count".into(),
        store.tensors.len().to_string(),
        m.num_tensor().to_string(),
    );
    cmp(
        "alignment".into(),
        store.alignment.to_string(),
        m.alignment().to_string(),
    );
    cmp(
        "data offset".into(),
        h.data_offset.to_string(),
        m.data_offset().to_string(),
    );
    let mut keys: Vec<&str> = store
        .gguf_metadata
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    keys.sort_unstable();
    let theirs: Vec<&str> = m.metadata().keys().map(String::as_str).collect();
    cmp("keys".into(), format!("{keys:?}"), format!("{theirs:?}"));
    for (t, r) in h.tensors.iter().zip(m.tensors()) {
        let id = t.qtype.ggml_id().unwrap_or(u32::MAX);
        cmp(
            format!("tensor '{}'", t.name),
            format!("{} {:?} @{}", t.name, t.ne, t.offset),
            format!("{} {:?} @{}", r.name, r.shape, r.offset),
        );
        cmp(
            format!("tensor '{}' type id", t.name),
            id.to_string(),
            r.kind.to_string(),
        );
        // gguf-rs 0.1.8 sizes every type id >= 10 with 256-element blocks: its BF16 size is wrong.
        if t.qtype != crate::quant::QType::BF16 {
            cmp(
                format!("tensor '{}' bytes", t.name),
                t.nbytes.to_string(),
                r.size.to_string(),
            );
        }
    }
    if diffs.is_empty() {
        Ok(format!(
            "gguf-rs agrees: GGUF v{}, {} keys, {} tensors, data at {}",
            h.version,
            store.gguf_metadata.len(),
            store.tensors.len(),
            h.data_offset
        ))
    } else {
        Err(Error::corrupt(
            path,
            "GGUF",
            format!("parsers disagree: {}", diffs.join("; ")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_against_gguf_rs() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
        let ok = verify_gguf(&dir.join("tiny-llama-q8_0.gguf")).unwrap();
        assert!(ok.contains("21 keys, 21 tensors"), "{ok}");
        // gguf-rs cannot read arrays of arrays: said plainly, not as a disagreement.
        let e = verify_gguf(&dir.join("all-types.gguf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gguf-rs cannot read this file"), "{e}");
        assert!(verify_gguf(&dir.join("missing.gguf")).is_err());
    }

    #[test]
    fn tiny_llama_report() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf/tiny-llama-q8_0.gguf");
        let store = gguf::load(&p).unwrap();
        let r = inspect(&store);
        assert!(r.contains("architecture: llama"), "{r}");
        assert!(r.contains("  llama.block_count = 2\n"), "{r}");
        assert!(r.contains("  tokenizer.ggml.model = \"gpt2\"\n"), "{r}");
        // 262 tokens: shortened to the type, the length and the first few.
        assert!(
            r.contains("tokenizer.ggml.tokens = [string; 262] [\"Ā\", \"ā\""),
            "{r}"
        );
        let line = r
            .lines()
            .find(|l| l.trim_start().starts_with("blk.1.ffn_down.weight"))
            .unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], "Q8_0");
        assert!(line.contains("[64, 128]"), "{line}");
        assert_eq!(*cols.last().unwrap(), (64 * 128 / 32 * 34).to_string());
        // Totals: all Q8_0 matrices plus five F32 norms of 64.
        let q8 = 2 * (262 * 64) + 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64);
        let f32s = 5 * 64;
        let bytes = q8 / 32 * 34 + f32s * 4;
        let want = format!("total: {} parameters", q8 + f32s);
        assert!(r.contains(&want), "{r}");
        assert!(r.contains(&format!("{bytes} bytes")), "{r}");
        let bpw = 8.0 * bytes as f64 / (q8 + f32s) as f64;
        assert!(r.contains(&format!("{bpw:.3} bits per weight")), "{r}");
        assert_eq!(r.lines().filter(|l| l.contains(".weight")).count(), 21);
    }
}

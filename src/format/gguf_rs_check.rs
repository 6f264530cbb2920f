//! `qtune inspect --verify`: parse a GGUF header a second time with the independent `gguf-rs` crate
//! and check it agrees with our own parser (tensor names, type ids, shapes, offsets, keys).
use super::gguf;
use crate::{Error, Result};
use std::path::Path;

/// Compares our parse of `path` with gguf-rs's; returns a one-line summary, or an error naming the
/// first disagreement.
pub fn cross_check_gguf_rs(path: &Path) -> Result<String> {
    let store = gguf::load(path)?;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map of a file we just opened; only the header is read.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
    let ours = gguf::parse_header(path, &map)?;
    let disagree =
        |what: String| Error::corrupt(path, "GGUF", format!("gguf-rs disagrees: {what}"));
    let reader = std::io::BufReader::new(f);
    // Past the magic: gguf-rs' container reads from the version field on.
    let mut reader = reader;
    std::io::Read::read_exact(&mut reader, &mut [0u8; 4]).map_err(|e| Error::io(path, e))?;
    let mut c = gguf_rs::GGUFContainer::new(gguf_rs::ByteOrder::LE, Box::new(reader), u64::MAX);
    let theirs = c
        .decode()
        .map_err(|e| disagree(format!("gguf-rs could not parse the header: {e}")))?;
    if theirs.num_tensor() != store.tensors.len() as u64 {
        return Err(disagree(format!(
            "{} tensors vs our {}",
            theirs.num_tensor(),
            store.tensors.len()
        )));
    }
    if theirs.num_kv() != store.gguf_metadata.len() as u64 {
        return Err(disagree(format!(
            "{} metadata keys vs our {}",
            theirs.num_kv(),
            store.gguf_metadata.len()
        )));
    }
    if theirs.data_offset() != ours.data_offset {
        return Err(disagree(format!(
            "data section at {} vs our {}",
            theirs.data_offset(),
            ours.data_offset
        )));
    }
    for (info, rt) in ours.tensors.iter().zip(theirs.tensors()) {
        if info.name != rt.name || info.ne != rt.shape || info.offset != rt.offset {
            return Err(disagree(format!(
                "tensor '{}' {:?}@{} vs our '{}' {:?}@{}",
                rt.name, rt.shape, rt.offset, info.name, info.ne, info.offset
            )));
        }
    }
    for (k, _) in &store.gguf_metadata {
        if !theirs.metadata().contains_key(k) {
            return Err(disagree(format!("key '{k}' missing in gguf-rs's parse")));
        }
    }
    Ok(format!(
        "verify: gguf-rs agrees on {} tensors (names, shapes, offsets), {} metadata keys and the data offset {}",
        store.tensors.len(),
        store.gguf_metadata.len(),
        ours.data_offset
    ))
}

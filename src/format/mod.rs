//! File formats, parsed without copying tensor data: each returns views into one memory map.
pub mod bnb;
pub mod gguf;
pub mod inspect;
pub mod safetensors;

use crate::{Error, Result};
use std::path::Path;
use std::sync::Arc;

/// Maps the file at `path` read-only; a file shorter than `min_len` bytes is truncated before its
/// `what`.
fn map_file(path: &Path, min_len: u64, what: &str) -> Result<Arc<memmap2::Mmap>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < min_len {
        return Err(Error::Truncated {
            path: path.to_path_buf(),
            what: what.into(),
            len,
        });
    }
    // SAFETY: the map is read-only; a file truncated or rewritten by another process while mapped
    // is outside what any mmap-based loader can guard against (llama.cpp and safetensors share this).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Arc::new(map))
}

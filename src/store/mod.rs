//! The memory-mapped weight store: one read-only map per file, tensors are views into it.
//! Opening a model reads headers only; pages are faulted in when a kernel touches a tile.
pub mod hub;

use crate::quant::{nf4::Nf4Ref, QData, QMatrix, QType};
use std::sync::Arc;

/// Bytes of a tensor: a range of a shared memory map, or an owned buffer (a tensor quantised at
/// load time). Cloning shares the backing.
#[derive(Clone)]
pub struct Bytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    /// The read-only file map behind `owner`, when there is one (see [`Bytes::release_pages`]).
    file_map: Option<Arc<memmap2::Mmap>>,
    start: usize,
    len: usize,
}

impl Bytes {
    /// A view of `len` bytes at `start` of a shared map (the caller has bounds-checked it).
    pub fn from_shared(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        start: usize,
        len: usize,
    ) -> Self {
        assert!(start + len <= (*owner).as_ref().len(), "view out of bounds");
        Bytes {
            owner,
            file_map: None,
            start,
            len,
        }
    }

    /// A view of `len` bytes at `start` of a read-only file map (the caller has bounds-checked it).
    pub fn from_map(map: Arc<memmap2::Mmap>, start: usize, len: usize) -> Self {
        assert!(start + len <= map.len(), "view out of bounds");
        Bytes {
            owner: map.clone(),
            file_map: Some(map),
            start,
            len,
        }
    }

    /// Drops this view's pages from the process's resident set (a read-only file map re-reads
    /// them from the page cache if touched again; an owned buffer is left alone). Streaming
    /// passes over a whole model (quantise, merge) call it after each tensor, so their peak RSS
    /// stays near one tensor instead of growing to the size of the file.
    pub fn release_pages(&self) {
        if let Some(map) = &self.file_map {
            // SAFETY: MADV_DONTNEED on a read-only, file-backed map discards no data: pages are
            // faulted back in from the file. No `&mut` into the map exists.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, self.start, self.len)
            };
        }
    }

    /// Owns `v`.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Bytes {
            owner: Arc::new(v),
            file_map: None,
            start: 0,
            len,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes at {})", self.len, self.start)
    }
}

/// Double-quantised statistics of an NF4 tensor (small, except `absmax_q`: 1 byte per 64 weights).
#[derive(Clone, Debug)]
pub struct Nf4Stats {
    /// 8-bit absmax codes, one per block of 64.
    pub absmax_q: Bytes,
    /// f32 scale per 256 absmax codes.
    pub nested_absmax: Vec<f32>,
    /// bitsandbytes' 8-bit dynamic map.
    pub nested_code: Box<[f32; 256]>,
    /// The NF4 table.
    pub code: Box<[f32; 16]>,
    /// Mean removed from absmax before quantising it.
    pub offset: f32,
}

/// One stored tensor. `shape` is in PyTorch order (outermost first): a linear weight is
/// `[out_features, in_features]`, the reverse of GGUF's `ne`.
#[derive(Clone, Debug)]
pub struct StoredTensor {
    /// Name as stored in the file.
    pub name: String,
    /// Element type.
    pub qtype: QType,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Stored bytes (for NF4: the packed codes).
    pub data: Bytes,
    /// NF4 statistics (only for `QType::NF4`).
    pub nf4: Option<Nf4Stats>,
}

impl StoredTensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Stored bytes including NF4 statistics.
    pub fn nbytes(&self) -> usize {
        self.data.len()
            + self.nf4.as_ref().map_or(0, |s| {
                s.absmax_q.len() + 4 * s.nested_absmax.len() + 4 * (256 + 16 + 1)
            })
    }

    /// Kernel view as a 2-D matrix (rows = product of all but the last dim, cols = last dim).
    pub fn matrix(&self) -> QMatrix<'_> {
        let cols = *self.shape.last().unwrap_or(&1);
        let rows = self.numel().checked_div(cols).unwrap_or(0);
        let data = match &self.nf4 {
            Some(s) => QData::Nf4(Nf4Ref {
                packed: self.data.as_slice(),
                absmax_q: s.absmax_q.as_slice(),
                nested_absmax: &s.nested_absmax,
                nested_code: &s.nested_code,
                code: &s.code,
                offset: s.offset,
            }),
            None => QData::Ggml {
                qtype: self.qtype,
                bytes: self.data.as_slice(),
            },
        };
        QMatrix { rows, cols, data }
    }
}

/// Where a store came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    /// A llama.cpp GGUF file.
    Gguf,
    /// A Hugging Face directory (or single file) of safetensors, possibly sharded.
    Safetensors,
    /// A Hugging Face bitsandbytes 4-bit checkpoint (NF4 + double quant).
    BnbNf4,
}

/// A model's tensors, memory-mapped, in file order, with the file's metadata.
pub struct WeightStore {
    /// The path that was opened (file or directory).
    pub path: std::path::PathBuf,
    /// Detected format.
    pub format: SourceFormat,
    /// Tensors in file order.
    pub tensors: Vec<StoredTensor>,
    /// GGUF metadata in file order (empty for safetensors).
    pub gguf_metadata: Vec<(String, crate::format::gguf::Value)>,
    /// GGUF data alignment (32 unless `general.alignment` says otherwise).
    pub alignment: u64,
    /// config.json of a Hugging Face directory, if present.
    pub config: Option<serde_json::Value>,
}

impl WeightStore {
    /// Looks a tensor up by its stored name.
    pub fn get(&self, name: &str) -> Option<&StoredTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Total stored bytes of all tensors.
    pub fn nbytes(&self) -> usize {
        self.tensors.iter().map(|t| t.nbytes()).sum()
    }

    /// Total number of weights.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.numel()).sum()
    }

    /// Average storage bits per weight over the whole model.
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.nbytes() as f64 / self.numel().max(1) as f64
    }
}

impl WeightStore {
    /// Opens a model without reading its tensor data: a `.gguf` file, a `.safetensors` file, or a
    /// Hugging Face directory (safetensors, sharded or not; bitsandbytes 4-bit detected).
    pub fn open(path: &std::path::Path) -> crate::Result<WeightStore> {
        if path.is_dir() {
            return crate::format::safetensors::load(path);
        }
        if !path.exists() {
            return Err(crate::Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "does not exist (expected a .gguf or .safetensors file or a model directory)",
                ),
            ));
        }
        let mut magic = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
            let n = f.read(&mut magic).map_err(|e| crate::Error::io(path, e))?;
            if n < 4 {
                return Err(crate::Error::Truncated {
                    path: path.into(),
                    what: "the magic number".into(),
                    len: n as u64,
                });
            }
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if &magic == b"GGUF" || ext == "gguf" {
            crate::format::gguf::load(path)
        } else if ext == "safetensors" {
            crate::format::safetensors::load(path)
        } else {
            Err(crate::Error::Invalid(format!(
                "{}: not a GGUF file (magic {magic:02x?}) nor a .safetensors file or model directory",
                path.display()
            )))
        }
    }
}

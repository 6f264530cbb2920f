//! GGUF v2/v3: typed metadata, tensor infos, zero-copy tensor views; and a streaming writer.
//!
//! File layout (little-endian): magic `GGUF`, version u32, n_tensors u64, n_kv u64, then n_kv
//! (key string, type u32, value), then n_tensors infos (name string, n_dims u32, ne[n_dims] u64,
//! ggml type u32, offset u64), zero padding to the alignment, then the data section. Tensor offsets
//! are relative to the data section and each is a multiple of the alignment.
use crate::error::{Error, Result};
use crate::quant::QType;
use crate::store::{Bytes, SourceFormat, StoredTensor, WeightStore};
use std::path::Path;
use std::sync::Arc;

mod read;
mod write;

pub use read::parse_header;
pub use write::{rewrite, GgufWriter, TensorPlan};

/// The four magic bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The version this crate writes.
pub const WRITE_VERSION: u32 = 3;
/// Alignment of the data section and tensor offsets when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a ggml tensor can have.
pub const MAX_DIMS: usize = 4;
/// Metadata key that overrides the alignment.
pub const KEY_ALIGNMENT: &str = "general.alignment";

const FMT: &str = "GGUF";
// Arrays of arrays deeper than this are refused: each level costs a stack frame while parsing.
const MAX_NESTING: usize = 8;

// Metadata value type ids (GGUF spec, `gguf_metadata_value_type`).
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// A typed GGUF metadata value (types as in the GGUF spec, so a file can be rewritten unchanged).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Array with its element type id (kept so empty arrays round-trip).
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The GGUF type id of this value.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => T_U8,
            Value::I8(_) => T_I8,
            Value::U16(_) => T_U16,
            Value::I16(_) => T_I16,
            Value::U32(_) => T_U32,
            Value::I32(_) => T_I32,
            Value::F32(_) => T_F32,
            Value::Bool(_) => T_BOOL,
            Value::String(_) => T_STRING,
            Value::Array(..) => T_ARRAY,
            Value::U64(_) => T_U64,
            Value::I64(_) => T_I64,
            Value::F64(_) => T_F64,
        }
    }

    /// The GGUF spec's name of a value type id (`"u32"`, `"string"`, ...).
    pub fn type_name_of_id(id: u32) -> &'static str {
        match id {
            T_U8 => "u8",
            T_I8 => "i8",
            T_U16 => "u16",
            T_I16 => "i16",
            T_U32 => "u32",
            T_I32 => "i32",
            T_F32 => "f32",
            T_BOOL => "bool",
            T_STRING => "string",
            T_ARRAY => "array",
            T_U64 => "u64",
            T_I64 => "i64",
            T_F64 => "f64",
            _ => "unknown",
        }
    }

    /// A non-negative integer value as u64 (any integer type); `None` for other types or negatives.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// An integer value as i64 (any integer type that fits).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A numeric value (integer or float) as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self
                .as_i64()
                .map(|v| v as f64)
                .or_else(|| self.as_u64().map(|v| v as f64)),
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A boolean value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements of an array value.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, v) => Some(v),
            _ => None,
        }
    }

    /// Serialised size in bytes (type id excluded).
    fn encoded_len(&self) -> usize {
        match self {
            Value::U8(_) | Value::I8(_) | Value::Bool(_) => 1,
            Value::U16(_) | Value::I16(_) => 2,
            Value::U32(_) | Value::I32(_) | Value::F32(_) => 4,
            Value::U64(_) | Value::I64(_) | Value::F64(_) => 8,
            Value::String(s) => 8 + s.len(),
            Value::Array(_, v) => 12 + v.iter().map(Value::encoded_len).sum::<usize>(),
        }
    }

    /// Appends the value (without its type id) to `out`, little-endian.
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Bool(v) => out.push(*v as u8),
            Value::String(s) => encode_str(s, out),
            Value::Array(t, v) => {
                out.extend_from_slice(&t.to_le_bytes());
                out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for e in v {
                    e.encode(out);
                }
            }
            Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
}

impl std::fmt::Display for Value {
    /// Short human form; arrays longer than 8 show as `[type; len] first few…`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::String(s) => {
                // Chat templates and licences can be kilobytes: cut them at a char boundary.
                let cut: String = s.chars().take(60).collect();
                let cut = cut.replace('\n', "\\n");
                if cut.len() < s.len() {
                    write!(f, "{cut:?}… ({} bytes)", s.len())
                } else {
                    write!(f, "{cut:?}")
                }
            }
            Value::Array(t, v) => {
                const SHOWN: usize = 8;
                if v.len() > SHOWN {
                    write!(f, "[{}; {}] ", Value::type_name_of_id(*t), v.len())?;
                }
                write!(f, "[")?;
                for (i, e) in v.iter().take(SHOWN).enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{e}")?;
                }
                if v.len() > SHOWN {
                    write!(f, ", …")?;
                }
                write!(f, "]")
            }
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
        }
    }
}

fn encode_str(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The value of `key` in a metadata list (first occurrence).
pub fn find<'a>(metadata: &'a [(String, Value)], key: &str) -> Option<&'a Value> {
    metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// One tensor as the file describes it (before it is turned into a view).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// GGUF dimensions, innermost first (`ne[0]` is the row length).
    pub ne: Vec<u64>,
    /// Element type.
    pub qtype: QType,
    /// Offset relative to the data section.
    pub offset: u64,
    /// Bytes of tensor data.
    pub nbytes: u64,
}

impl TensorInfo {
    /// Shape in PyTorch order (outermost first): `ne` reversed.
    pub fn shape(&self) -> Vec<usize> {
        // Each dim was checked to fit usize when parsed.
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
}

/// Everything before the data section.
#[derive(Clone, Debug)]
pub struct Header {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// Data alignment (`general.alignment`, else 32).
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Opens a GGUF file: maps it, parses and validates the header; tensors are views into the map
/// (nothing of the data section is read).
pub fn load(path: &Path) -> Result<WeightStore> {
    let map = super::map_file(path, 4, "magic")?;
    build(path, map.clone(), Some(map))
}

/// Parses GGUF bytes already in memory (a map, or `include_bytes!` data such as the embedded tiny
/// model of `qtune inspect`); tensors are views into `owner`. `path` only names it in errors.
pub fn from_shared(path: &Path, owner: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Result<WeightStore> {
    build(path, owner, None)
}

/// Views into `owner`; `map` is the same bytes as a file map, when they are one (so streaming passes
/// can release consumed pages, see `Bytes::release_pages`).
fn build(
    path: &Path,
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    map: Option<Arc<memmap2::Mmap>>,
) -> Result<WeightStore> {
    let header = parse_header(path, (*owner).as_ref())?;
    let tensors = header
        .tensors
        .iter()
        .map(|t| StoredTensor {
            name: t.name.clone(),
            qtype: t.qtype,
            shape: t.shape(),
            // Bounds were checked against the file length in parse_header.
            data: match &map {
                Some(m) => Bytes::from_map(
                    m.clone(),
                    (header.data_offset + t.offset) as usize,
                    t.nbytes as usize,
                ),
                None => Bytes::from_shared(
                    owner.clone(),
                    (header.data_offset + t.offset) as usize,
                    t.nbytes as usize,
                ),
            },
            nf4: None,
        })
        .collect();
    Ok(WeightStore {
        path: path.to_path_buf(),
        format: SourceFormat::Gguf,
        tensors,
        gguf_metadata: header.metadata,
        alignment: header.alignment,
        config: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_then_reader_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.gguf");
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            (
                "x.arr".to_string(),
                Value::Array(T_ARRAY, vec![Value::Array(T_I32, vec![Value::I32(-1)])]),
            ),
            ("x.empty".to_string(), Value::Array(T_U8, vec![])),
        ];
        let plan = vec![
            TensorPlan {
                name: "a".into(),
                qtype: QType::F32,
                shape: vec![3],
            },
            TensorPlan {
                name: "b".into(),
                qtype: QType::Q8_0,
                shape: vec![2, 32],
            },
        ];
        let mut w = GgufWriter::create(&p, &meta, plan).unwrap();
        w.write_tensor(&[1u8; 12]).unwrap();
        w.write_chunk(&[2u8; 34]).unwrap();
        w.write_chunk(&[3u8; 34]).unwrap();
        w.finish().unwrap();
        let s = load(&p).unwrap();
        assert_eq!(s.gguf_metadata, meta);
        assert_eq!(s.tensors[1].shape, vec![2, 32]);
        assert_eq!(s.tensors[1].data.as_slice()[34], 3);
        assert_eq!(std::fs::metadata(&p).unwrap().len() % 32, 0);
    }

    #[test]
    fn from_static_bytes() {
        static TINY: &[u8] = include_bytes!("../../../tests/fixtures/gguf/tiny-llama-q8_0.gguf");
        let s = from_shared(Path::new("<embedded tiny-llama>"), Arc::new(TINY)).unwrap();
        assert_eq!(s.tensors.len(), 21);
        // Zero-copy: the view points into the static bytes.
        let view = s.get("output.weight").unwrap().data.as_slice();
        assert!(TINY.as_ptr_range().contains(&view.as_ptr()));
        assert_eq!(view.len(), 17816);
        let Err(e) = from_shared(Path::new("<embedded>"), Arc::new(&TINY[..100])) else {
            panic!("a truncated header parsed")
        };
        assert!(e.to_string().contains("<embedded>"), "{e}");
    }

    #[test]
    fn unfinished_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.gguf");
        let plan = vec![TensorPlan {
            name: "a".into(),
            qtype: QType::F32,
            shape: vec![3],
        }];
        let w = GgufWriter::create(&p, &[], plan).unwrap();
        assert!(w.finish().is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

//! GGUF v2/v3: typed metadata, tensor infos, zero-copy tensor views; and a streaming writer.
//!
//! File layout (little-endian): magic `GGUF`, version u32, n_tensors u64, n_kv u64, then n_kv
//! (key string, type u32, value), then n_tensors infos (name string, n_dims u32, ne[n_dims] u64,
//! ggml type u32, offset u64), zero padding to the alignment, then the data section. Tensor offsets
//! are relative to the data section and each is a multiple of the alignment.
use crate::error::{Error, Result};
use crate::quant::QType;
use crate::store::{Bytes, SourceFormat, StoredTensor, WeightStore};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// A bounds-checked little-endian cursor over the file bytes.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }

    fn truncated(&self, what: &str) -> Error {
        Error::Truncated {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            len: self.b.len() as u64,
        }
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.truncated(&what()));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    /// A length-prefixed UTF-8 string; the length is checked against the bytes left first.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.u64(what)?;
        if n > self.remaining() as u64 {
            return Err(self.truncated(&format!("{} (string of {n} bytes)", what())));
        }
        let s = self.take(n as usize, what)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| Error::corrupt(self.path, FMT, format!("{} is not valid UTF-8", what())))
    }

    /// One value of type `t` (not its type id).
    fn value(&mut self, t: u32, depth: usize, what: &dyn Fn() -> String) -> Result<Value> {
        Ok(match t {
            T_U8 => Value::U8(self.arr::<1>(what)?[0]),
            T_I8 => Value::I8(i8::from_le_bytes(self.arr(what)?)),
            T_U16 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            T_I16 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            T_U32 => Value::U32(self.u32(what)?),
            T_I32 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            T_F32 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            T_BOOL => match self.arr::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(Error::corrupt(
                        self.path,
                        FMT,
                        format!("{}: bool byte {b} is not 0 or 1", what()),
                    ))
                }
            },
            T_STRING => Value::String(self.string(what)?),
            T_U64 => Value::U64(self.u64(what)?),
            T_I64 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            T_F64 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            T_ARRAY => {
                if depth >= MAX_NESTING {
                    return Err(Error::corrupt(
                        self.path,
                        FMT,
                        format!("{}: arrays nested deeper than {MAX_NESTING}", what()),
                    ));
                }
                let et = self.u32(what)?;
                let n = self.u64(what)?;
                let min = match et {
                    T_U8 | T_I8 | T_BOOL => 1,
                    T_U16 | T_I16 => 2,
                    T_U32 | T_I32 | T_F32 => 4,
                    T_U64 | T_I64 | T_F64 | T_STRING => 8,
                    T_ARRAY => 12,
                    _ => {
                        return Err(Error::corrupt(
                            self.path,
                            FMT,
                            format!("{}: unknown array element type {et}", what()),
                        ))
                    }
                };
                // Checked before allocating: a hostile count cannot make us reserve memory.
                if n.checked_mul(min)
                    .is_none_or(|b| b > self.remaining() as u64)
                {
                    return Err(self.truncated(&format!(
                        "{} (array of {n} {} values)",
                        what(),
                        Value::type_name_of_id(et)
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, depth + 1, what)?);
                }
                Value::Array(et, v)
            }
            _ => {
                return Err(Error::corrupt(
                    self.path,
                    FMT,
                    format!("{}: unknown value type {t}", what()),
                ))
            }
        })
    }
}

/// Parses everything before the data section of the GGUF bytes `b` (read from `path`), and
/// validates every tensor against the file length.
pub fn parse_header(path: &Path, b: &[u8]) -> Result<Header> {
    let mut c = Cursor { b, pos: 0, path };
    let magic = c.arr::<4>(&|| "magic".into())?;
    if magic != MAGIC {
        return Err(Error::BadMagic {
            path: path.to_path_buf(),
            format: FMT,
            found: magic.to_vec(),
        });
    }
    let version = c.u32(&|| "version".into())?;
    if !(1..=3).contains(&version) && (1..=3).contains(&version.swap_bytes()) {
        return Err(Error::corrupt(
            path,
            FMT,
            format!(
                "big-endian file (version {} byte-swapped); qtune reads little-endian GGUF only: \
                 convert it with gguf-py's gguf_convert_endian.py",
                version.swap_bytes()
            ),
        ));
    }
    if !(2..=3).contains(&version) {
        return Err(Error::UnsupportedVersion {
            path: path.to_path_buf(),
            format: FMT,
            version: version as u64,
            supported: "2 and 3",
        });
    }
    let n_tensors = c.u64(&|| "tensor count".into())?;
    let n_kv = c.u64(&|| "metadata count".into())?;
    // A key-value takes at least 13 bytes, a tensor info at least 24: refuse counts the file cannot hold.
    if n_kv
        .checked_mul(13)
        .is_none_or(|x| x > c.remaining() as u64)
    {
        return Err(c.truncated(&format!("metadata ({n_kv} key-value pairs announced)")));
    }
    let mut metadata = Vec::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let key = c.string(&|| format!("key of metadata entry {i}"))?;
        let what = || format!("metadata '{key}'");
        let t = c.u32(&what)?;
        let v = c.value(t, 0, &what)?;
        metadata.push((key, v));
    }
    let alignment = match find(&metadata, KEY_ALIGNMENT) {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 30 => a,
            _ => {
                return Err(Error::corrupt(
                    path,
                    FMT,
                    format!("{KEY_ALIGNMENT} = {v} is not a power of two"),
                ));
            }
        },
    };
    if n_tensors
        .checked_mul(24)
        .is_none_or(|x| x > c.remaining() as u64)
    {
        return Err(c.truncated(&format!("tensor infos ({n_tensors} tensors announced)")));
    }
    let mut raw = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string(&|| format!("name of tensor info {i}"))?;
        let what = || format!("tensor info of '{name}'");
        let n_dims = c.u32(&what)? as usize;
        if n_dims > MAX_DIMS {
            return Err(Error::Shape {
                path: path.to_path_buf(),
                tensor: name,
                msg: format!("{n_dims} dimensions; ggml tensors have at most {MAX_DIMS}"),
            });
        }
        let mut ne = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            ne.push(c.u64(&what)?);
        }
        let type_id = c.u32(&what)?;
        let offset = c.u64(&what)?;
        raw.push((name, ne, type_id, offset));
    }
    let data_offset = align_up(c.pos as u64, alignment);
    let file_len = b.len() as u64;

    let mut names = HashSet::with_capacity(raw.len());
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, ne, type_id, offset) in raw {
        let shape_err = |msg: String| Error::Shape {
            path: path.to_path_buf(),
            tensor: name.clone(),
            msg,
        };
        let Some(qtype) = QType::from_ggml_id(type_id) else {
            return Err(Error::UnsupportedType {
                path: path.to_path_buf(),
                tensor: name,
                type_name: QType::ggml_name_of_id(type_id),
                supported: QType::ALL
                    .iter()
                    .filter(|t| t.ggml_id().is_some())
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        if ne.contains(&0) {
            return Err(shape_err(format!("zero dimension in ne {ne:?}")));
        }
        let numel = ne
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= isize::MAX as u64);
        let Some(numel) = numel else {
            return Err(Error::corrupt(
                path,
                FMT,
                format!("tensor '{name}': dimensions {ne:?} overflow"),
            ));
        };
        let bs = qtype.block_size() as u64;
        let row = ne.first().copied().unwrap_or(1);
        if row % bs != 0 {
            return Err(shape_err(format!(
                "row length ne[0] = {row} is not a multiple of the {} block size {bs}",
                qtype.name()
            )));
        }
        let Some(nbytes) = (numel / bs).checked_mul(qtype.type_size() as u64) else {
            return Err(Error::corrupt(
                path,
                FMT,
                format!("tensor '{name}': byte size of dimensions {ne:?} overflows"),
            ));
        };
        if offset % alignment != 0 {
            return Err(Error::Misaligned {
                path: path.to_path_buf(),
                tensor: name,
                offset,
                alignment,
            });
        }
        let start = data_offset.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(nbytes));
        match (start, end) {
            (Some(_), Some(e)) if e <= file_len => {}
            _ => {
                return Err(Error::DataPastEnd {
                    path: path.to_path_buf(),
                    tensor: name,
                    start: data_offset.saturating_add(offset),
                    end: data_offset.saturating_add(offset).saturating_add(nbytes),
                    len: file_len,
                })
            }
        }
        if !names.insert(name.clone()) {
            return Err(Error::corrupt(
                path,
                FMT,
                format!("tensor '{name}' appears twice"),
            ));
        }
        tensors.push(TensorInfo {
            name,
            ne,
            qtype,
            offset,
            nbytes,
        });
    }
    // Overlap check on offsets sorted ascending.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    for w in order.windows(2) {
        let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
        if a.offset + a.nbytes > b.offset {
            return Err(Error::corrupt(
                path,
                FMT,
                format!(
                    "tensor '{}' data [{}, {}) overlaps tensor '{}' at {}",
                    a.name,
                    a.offset,
                    a.offset + a.nbytes,
                    b.name,
                    b.offset
                ),
            ));
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Opens a GGUF file: maps it, parses and validates the header; tensors are views into the map
/// (nothing of the data section is read).
pub fn load(path: &Path) -> Result<WeightStore> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < 4 {
        return Err(Error::Truncated {
            path: path.to_path_buf(),
            what: "magic".into(),
            len,
        });
    }
    // SAFETY: the map is read-only; a file truncated or rewritten by another process while mapped
    // is outside what any mmap-based loader can guard against (llama.cpp and safetensors share this).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let map = Arc::new(map);
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

/// One tensor the writer will write: name, type, PyTorch-order shape.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    /// Tensor name.
    pub name: String,
    /// Stored type.
    pub qtype: QType,
    /// Shape, outermost first (the file stores it reversed).
    pub shape: Vec<usize>,
}

impl TensorPlan {
    /// Bytes of the tensor's data, or `None` if the row length is not a whole number of blocks.
    pub fn nbytes(&self) -> Option<usize> {
        let row = *self.shape.last().unwrap_or(&1);
        if !row.is_multiple_of(self.qtype.block_size()) {
            return None;
        }
        self.qtype.bytes_for(self.shape.iter().product())
    }
}

/// Streaming GGUF v3 writer with the layout gguf-py's `GGUFWriter` produces: header, metadata,
/// tensor infos, padding, then each tensor's data padded to the alignment. Writes `<out>.tmp` and
/// renames it on [`GgufWriter::finish`]; dropped unfinished, it deletes the temporary file.
pub struct GgufWriter {
    out: PathBuf,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    plan: Vec<(TensorPlan, usize)>,
    alignment: usize,
    /// Index of the tensor being written and bytes of it written so far.
    cur: usize,
    cur_written: usize,
}

impl GgufWriter {
    /// Creates `<out>.tmp` and writes header, metadata and tensor infos. The alignment is taken
    /// from `general.alignment` in `metadata` if present, else 32.
    pub fn create(out: &Path, metadata: &[(String, Value)], plan: Vec<TensorPlan>) -> Result<Self> {
        let alignment = match find(metadata, KEY_ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}: {KEY_ALIGNMENT} = {v} is not a power of two",
                        out.display()
                    ))
                })?,
        } as usize;
        let mut names = HashSet::new();
        let mut sized = Vec::with_capacity(plan.len());
        for t in plan {
            if !names.insert(t.name.clone()) {
                return Err(Error::Invalid(format!(
                    "{}: tensor '{}' planned twice",
                    out.display(),
                    t.name
                )));
            }
            if t.shape.len() > MAX_DIMS || t.shape.contains(&0) {
                return Err(Error::Shape {
                    path: out.to_path_buf(),
                    tensor: t.name.clone(),
                    msg: format!(
                        "shape {:?} cannot be stored in GGUF (1 to 4 non-zero dims)",
                        t.shape
                    ),
                });
            }
            if t.qtype.ggml_id().is_none() {
                return Err(Error::Invalid(format!(
                    "{}: tensor '{}': {} cannot be stored in GGUF",
                    out.display(),
                    t.name,
                    t.qtype.name()
                )));
            }
            let n = t.nbytes().ok_or_else(|| Error::Shape {
                path: out.to_path_buf(),
                tensor: t.name.clone(),
                msg: format!(
                    "row length is not a multiple of the {} block size {}",
                    t.qtype.name(),
                    t.qtype.block_size()
                ),
            })?;
            sized.push((t, n));
        }

        let mut head = Vec::with_capacity(
            24 + metadata
                .iter()
                .map(|(k, v)| 12 + k.len() + v.encoded_len())
                .sum::<usize>()
                + sized.iter().map(|(t, _)| 60 + t.name.len()).sum::<usize>(),
        );
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&WRITE_VERSION.to_le_bytes());
        head.extend_from_slice(&(sized.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            encode_str(k, &mut head);
            head.extend_from_slice(&v.type_id().to_le_bytes());
            v.encode(&mut head);
        }
        let mut offset = 0usize;
        for (t, n) in &sized {
            encode_str(&t.name, &mut head);
            head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                head.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            head.extend_from_slice(&t.qtype.ggml_id().unwrap_or(0).to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += n.div_ceil(alignment) * alignment;
        }
        head.resize(head.len().div_ceil(alignment) * alignment, 0);

        let mut tmp_name = out.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = GgufWriter {
            out: out.to_path_buf(),
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, f)),
            plan: sized,
            alignment,
            cur: 0,
            cur_written: 0,
        };
        w.write_raw(&head)?;
        Ok(w)
    }

    fn write_raw(&mut self, b: &[u8]) -> Result<()> {
        let tmp = &self.tmp;
        match self.file.as_mut() {
            Some(f) => f.write_all(b).map_err(|e| Error::io(tmp, e)),
            None => Err(Error::Invalid(format!(
                "{}: writer already finished",
                self.out.display()
            ))),
        }
    }

    /// The tensor whose bytes are expected next, if any.
    pub fn next_tensor(&self) -> Option<&TensorPlan> {
        self.plan.get(self.cur).map(|(t, _)| t)
    }

    /// Appends `bytes` to the current tensor (a tensor may arrive in any number of chunks, in plan
    /// order); when its last byte arrives, pads to the alignment and moves to the next tensor.
    pub fn write_chunk(&mut self, bytes: &[u8]) -> Result<()> {
        let Some((t, n)) = self.plan.get(self.cur) else {
            return Err(Error::Invalid(format!(
                "{}: more tensor data than planned",
                self.out.display()
            )));
        };
        let n = *n;
        if self.cur_written + bytes.len() > n {
            return Err(Error::Shape {
                path: self.out.clone(),
                tensor: t.name.clone(),
                msg: format!(
                    "got {} bytes, the plan says {n}",
                    self.cur_written + bytes.len()
                ),
            });
        }
        self.write_raw(bytes)?;
        self.cur_written += bytes.len();
        if self.cur_written == n {
            let pad = n.div_ceil(self.alignment) * self.alignment - n;
            self.write_raw(&vec![0u8; pad])?;
            self.cur += 1;
            self.cur_written = 0;
        }
        Ok(())
    }

    /// Writes one whole tensor (the next in plan order).
    pub fn write_tensor(&mut self, bytes: &[u8]) -> Result<()> {
        if let Some((t, n)) = self.plan.get(self.cur) {
            if self.cur_written != 0 || bytes.len() != *n {
                return Err(Error::Shape {
                    path: self.out.clone(),
                    tensor: t.name.clone(),
                    msg: format!(
                        "got {} bytes for a whole tensor, the plan says {n}",
                        bytes.len()
                    ),
                });
            }
        }
        self.write_chunk(bytes)
    }

    /// Checks every planned tensor was written, flushes, syncs and renames `<out>.tmp` to `<out>`.
    pub fn finish(mut self) -> Result<()> {
        if let Some((t, n)) = self.plan.get(self.cur) {
            return Err(Error::Invalid(format!(
                "{}: tensor '{}' incomplete ({} of {n} bytes written); file not written",
                self.out.display(),
                t.name,
                self.cur_written
            )));
        }
        let f = self.file.take().expect("finish runs once");
        let f = f
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.out).map_err(|e| Error::io(&self.out, e))
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // Unfinished: leave no half-written file behind.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Rewrites a parsed GGUF store with our writer (same metadata, tensors, order and alignment).
pub fn rewrite(store: &WeightStore, out: &Path) -> Result<()> {
    let plan = store
        .tensors
        .iter()
        .map(|t| TensorPlan {
            name: t.name.clone(),
            qtype: t.qtype,
            shape: t.shape.clone(),
        })
        .collect();
    let mut w = GgufWriter::create(out, &store.gguf_metadata, plan)?;
    for t in &store.tensors {
        w.write_tensor(t.data.as_slice())?;
    }
    w.finish()
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
        static TINY: &[u8] = include_bytes!("../../tests/fixtures/gguf/tiny-llama-q8_0.gguf");
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

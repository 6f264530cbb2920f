//! The GGUF reader: a bounds-checked cursor, and the header parsed in steps (preamble, metadata,
//! tensor infos), each tensor checked against the file before anything is mapped or allocated.
use super::*;
use std::collections::HashSet;

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

    /// `n` items read in order by `each` (given this cursor and the item's index), the count
    /// refused first when the bytes left cannot hold `n` items of at least `min` bytes each: the
    /// vector is sized only then, so a hostile count cannot make us reserve memory.
    fn list<T>(
        &mut self,
        n: u64,
        min: u64,
        what: impl FnOnce() -> String,
        mut each: impl FnMut(&mut Self, u64) -> Result<T>,
    ) -> Result<Vec<T>> {
        let mut v = match n.checked_mul(min) {
            Some(b) if b <= self.remaining() as u64 => Vec::with_capacity(n as usize),
            _ => return Err(self.truncated(&what())),
        };
        for i in 0..n {
            v.push(each(self, i)?);
        }
        Ok(v)
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
                let of = || {
                    let name = Value::type_name_of_id(et);
                    format!("{} (array of {n} {name} values)", what())
                };
                Value::Array(
                    et,
                    self.list(n, min, of, |c, _| c.value(et, depth + 1, what))?,
                )
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
    let version = read_preamble(&mut c)?;
    let n_tensors = c.u64(&|| "tensor count".into())?;
    let n_kv = c.u64(&|| "metadata count".into())?;
    let metadata = read_metadata(&mut c, n_kv)?;
    let alignment = alignment_of(path, &metadata)?;
    let raw = read_tensor_infos(&mut c, n_tensors)?;
    let data_offset = align_up(c.pos as u64, alignment);
    let file_len = b.len() as u64;
    let mut names = HashSet::with_capacity(raw.len());
    let mut tensors = Vec::with_capacity(raw.len());
    for r in raw {
        let t = check_tensor(path, r, data_offset, alignment, file_len)?;
        if !names.insert(t.name.clone()) {
            return Err(Error::corrupt(
                path,
                FMT,
                format!("tensor '{}' appears twice", t.name),
            ));
        }
        tensors.push(t);
    }
    check_overlaps(path, &tensors)?;
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// The magic and the version (2 or 3; a byte-swapped one is a big-endian file).
fn read_preamble(c: &mut Cursor) -> Result<u32> {
    let path = c.path;
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
    Ok(version)
}

/// `n_kv` key-value pairs, the count checked against the bytes left first.
fn read_metadata(c: &mut Cursor, n_kv: u64) -> Result<Vec<(String, Value)>> {
    // A key-value takes at least 13 bytes.
    let announced = || format!("metadata ({n_kv} key-value pairs announced)");
    c.list(n_kv, 13, announced, |c, i| {
        let key = c.string(&|| format!("key of metadata entry {i}"))?;
        let what = || format!("metadata '{key}'");
        let t = c.u32(&what)?;
        let v = c.value(t, 0, &what)?;
        Ok((key, v))
    })
}

/// `general.alignment`, else 32; a power of two up to 1 GiB.
fn alignment_of(path: &Path, metadata: &[(String, Value)]) -> Result<u64> {
    Ok(match find(metadata, KEY_ALIGNMENT) {
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
    })
}

/// A tensor info as read, before its checks.
struct RawInfo {
    name: String,
    ne: Vec<u64>,
    type_id: u32,
    offset: u64,
}

/// `n_tensors` tensor infos, the count checked against the bytes left first.
fn read_tensor_infos(c: &mut Cursor, n_tensors: u64) -> Result<Vec<RawInfo>> {
    // A tensor info takes at least 24 bytes.
    let announced = || format!("tensor infos ({n_tensors} tensors announced)");
    c.list(n_tensors, 24, announced, |c, i| {
        let name = c.string(&|| format!("name of tensor info {i}"))?;
        let what = || format!("tensor info of '{name}'");
        let n_dims = c.u32(&what)? as usize;
        if n_dims > MAX_DIMS {
            return Err(Error::Shape {
                path: c.path.to_path_buf(),
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
        Ok(RawInfo {
            name,
            ne,
            type_id,
            offset,
        })
    })
}

/// One tensor checked: a known type, no zero or overflowing dimension, whole blocks per row, an
/// aligned offset, and its bytes inside the file.
fn check_tensor(
    path: &Path,
    raw: RawInfo,
    data_offset: u64,
    alignment: u64,
    file_len: u64,
) -> Result<TensorInfo> {
    let RawInfo {
        name,
        ne,
        type_id,
        offset,
    } = raw;
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
    Ok(TensorInfo {
        name,
        ne,
        qtype,
        offset,
        nbytes,
    })
}

/// No two tensors' data overlap (checked on offsets sorted ascending).
fn check_overlaps(path: &Path, tensors: &[TensorInfo]) -> Result<()> {
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
    Ok(())
}

//! GGUF v2/v3: typed metadata, tensor infos, zero-copy tensor views; and a streaming writer.

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

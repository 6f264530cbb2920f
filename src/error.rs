//! Library errors. Every variant names the file and/or tensor it is about and, where it can, what the
//! user should do; the CLI prints them with `anyhow` and exits non-zero, never a panic.
use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading, converting or computing with model files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on a named file.
    // The OS error is in the message and deliberately not a `source`: `{:#}` (anyhow's chain, as
    // the CLI prints errors) would otherwise repeat it ("x: No such file: No such file").
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },

    /// The file ends before a structure it announces (header, metadata, tensor data).
    #[error(
        "{path}: file is truncated: {what} (the file is {len} bytes); re-download or re-convert it"
    )]
    Truncated {
        path: PathBuf,
        what: String,
        len: u64,
    },

    /// The first bytes are not the expected magic number.
    #[error("{path}: not a {format} file (magic bytes {found:02x?}); check the path")]
    BadMagic {
        path: PathBuf,
        format: &'static str,
        found: Vec<u8>,
    },

    /// A format version we do not read.
    #[error("{path}: unsupported {format} version {version} (qtune reads {supported})")]
    UnsupportedVersion {
        path: PathBuf,
        format: &'static str,
        version: u64,
        supported: &'static str,
    },

    /// A tensor type id (ggml type, safetensors dtype) we do not support.
    #[error("{path}: tensor '{tensor}' has unsupported type {type_name}; supported: {supported}")]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        type_name: String,
        supported: String,
    },

    /// A structurally invalid file: the message says what is wrong.
    #[error("{path}: corrupt {format} file: {msg}")]
    Corrupt {
        path: PathBuf,
        format: &'static str,
        msg: String,
    },

    /// A tensor whose bytes do not lie inside the file.
    #[error("{path}: tensor '{tensor}' data [{start}, {end}) lies past the end of the file ({len} bytes); the file is truncated or corrupt")]
    DataPastEnd {
        path: PathBuf,
        tensor: String,
        start: u64,
        end: u64,
        len: u64,
    },

    /// A tensor whose offset breaks the file's alignment rule.
    #[error(
        "{path}: tensor '{tensor}' offset {offset} is not a multiple of the alignment {alignment}"
    )]
    Misaligned {
        path: PathBuf,
        tensor: String,
        offset: u64,
        alignment: u64,
    },

    /// A tensor whose declared shape and byte size disagree, or a shape a kernel cannot take.
    #[error("{path}: tensor '{tensor}': {msg}")]
    Shape {
        path: PathBuf,
        tensor: String,
        msg: String,
    },

    /// A tensor that a model or command needs is missing.
    #[error("{path}: tensor '{tensor}' not found{hint}")]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        hint: String,
    },

    /// A shard named by a safetensors index is not on disk.
    #[error("{index}: shard '{shard}' (holding '{tensor}') is missing; download every shard listed in the index")]
    MissingShard {
        index: PathBuf,
        shard: String,
        tensor: String,
    },

    /// A JSON file (config, index, quant state) that does not parse or lacks a key.
    #[error("{path}: {msg}")]
    Json { path: PathBuf, msg: String },

    /// A bad line in a training-data file: the message says what is wrong with it.
    #[error("{path}:{line}: {msg}")]
    Data {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    /// A request the library cannot serve (bad flag value, unsupported combination).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }

    /// A corrupt-file error.
    pub fn corrupt(path: impl Into<PathBuf>, format: &'static str, msg: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            format,
            msg: msg.into(),
        }
    }
}

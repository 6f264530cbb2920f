//! Subcommands that live in their own files: each has a clap `Args` and a `run`.
pub mod bench;
pub mod demo;
pub mod eval;
pub mod export;
pub mod generate;
pub mod merge;
pub mod train;

//! Subcommands of the `qtune` binary, one file each.
pub mod bench;

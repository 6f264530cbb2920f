//! Subcommands, one file each.
pub mod train;

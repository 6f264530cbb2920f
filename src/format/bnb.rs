//! bitsandbytes 4-bit checkpoints (`*-bnb-4bit`): NF4 tensors with double-quantised statistics.

//! safetensors (single file and sharded) as memory-mapped views.

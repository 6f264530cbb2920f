"""Writes the GGUF fixtures of tests/gguf_*.rs with gguf-py 0.10.0 (the reference writer), and a JSON
of what gguf-py's GGUFReader reports for each (the reference reader).

Run: /work/venv-ref/bin/python tests/reference/gen_gguf_fixtures.py
Outputs under tests/fixtures/gguf/: all-types.gguf, align64.gguf, v2.gguf, tiny-llama-q8_0.gguf,
reader.json.
"""
import json
import os
import shutil
import struct
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T, GGUFValueType as V

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "gguf")


def add_all_metadata(w: gguf.GGUFWriter) -> None:
    # One key per scalar type, then arrays (strings, ints, floats, bools) and a nested array.
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 3.14159)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo, gguf ✓")
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float64("test.f64", -2.718281828459045)
    w.add_array("test.arr_str", ["a", "bb", "", "ü"])
    w.add_array("test.arr_int", [1, -2, 3, 40000])
    w.add_array("test.arr_f32", [0.5, -1.25, 1e-3])
    w.add_array("test.arr_bool", [True, False, True])
    w.add_array("test.arr_nested", [[1, 2], [3, 4, 5]])
    w.add_key_value("test.arr_u8", b"\x01\x02\xff", V.ARRAY)  # bytes: an array of u8
    w.add_name("all-types")


def add_all_tensors(w: gguf.GGUFWriter, rng: np.random.Generator) -> None:
    f32 = rng.standard_normal((4, 8)).astype(np.float32)
    w.add_tensor("t.f32", f32)
    w.add_tensor("t.f32_1d", rng.standard_normal(5).astype(np.float32))
    w.add_tensor("t.f32_3d", rng.standard_normal((2, 3, 4)).astype(np.float32))
    w.add_tensor("t.f16", rng.standard_normal((3, 32)).astype(np.float16))
    bf = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), T.BF16)
    w.add_tensor("t.bf16", bf, raw_dtype=T.BF16)
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), T.Q8_0)
    w.add_tensor("t.q8_0", q8, raw_dtype=T.Q8_0)
    q4 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), T.Q4_0)
    w.add_tensor("t.q4_0", q4, raw_dtype=T.Q4_0)


def write(path: str, fill, alignment: int | None = None, arch: str = "test") -> None:
    w = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def byte_level_tokens() -> list[str]:
    # GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100 upwards.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out = {}
    n = 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def tiny_llama(w: gguf.GGUFWriter) -> None:
    rng = np.random.default_rng(1234)
    n_layer, d, n_head, n_kv, ffn = 2, 64, 4, 2, 128
    head_dim = d // n_head
    tokens = byte_level_tokens() + ["Ġt", "he", "Ġthe", "in", "<|bos|>", "<|eos|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n"]
    vocab = len(tokens)
    w.add_name("tiny-llama")
    w.add_file_type(7)  # MOSTLY_Q8_0
    w.add_vocab_size(vocab)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(ffn)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 2) + [3, 3])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    w.add_quantization_version(2)

    def q8(name, rows, cols):
        x = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(x, T.Q8_0), raw_dtype=T.Q8_0)

    def norm(name):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32))

    q8("token_embd.weight", vocab, d)
    for i in range(n_layer):
        norm(f"blk.{i}.attn_norm.weight")
        q8(f"blk.{i}.attn_q.weight", d, d)
        q8(f"blk.{i}.attn_k.weight", n_kv * head_dim, d)
        q8(f"blk.{i}.attn_v.weight", n_kv * head_dim, d)
        q8(f"blk.{i}.attn_output.weight", d, d)
        norm(f"blk.{i}.ffn_norm.weight")
        q8(f"blk.{i}.ffn_gate.weight", ffn, d)
        q8(f"blk.{i}.ffn_up.weight", ffn, d)
        q8(f"blk.{i}.ffn_down.weight", d, ffn)
    norm("output_norm.weight")
    q8("output.weight", vocab, d)


def field_json(f) -> dict:
    types = [int(t) for t in f.types]
    if types[0] == V.STRING:
        value = bytes(f.parts[f.data[0]]).decode("utf-8")
    elif types[0] == V.ARRAY:
        leaf = types[-1]
        if leaf == V.STRING:
            value = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        else:
            value = [f.parts[i][0].item() for i in f.data]
    else:
        value = f.parts[f.data[0]][0].item()
    if isinstance(value, bool):
        pass
    return {"key": f.name, "types": types, "value": value}


def describe(path: str, max_values: int) -> dict:
    r = gguf.GGUFReader(path)
    fields = [field_json(f) for f in r.fields.values() if not f.name.startswith("GGUF.")]
    version = int(r.fields["GGUF.version"].parts[-1][0])
    tensors = []
    for t in r.tensors:
        deq = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        tensors.append({
            "name": t.name,
            "type": int(t.tensor_type),
            "ne": [int(x) for x in t.shape],
            "n_bytes": int(t.n_bytes),
            "data_offset": int(t.data_offset),
            "values": [float(x) for x in deq[:max_values]],
        })
    return {"file": os.path.basename(path), "version": version, "alignment": int(r.alignment),
            "data_offset": int(r.data_offset), "size": os.path.getsize(path),
            "fields": fields, "tensors": tensors}


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    p_all = os.path.join(OUT, "all-types.gguf")
    write(p_all, lambda w: (add_all_metadata(w), add_all_tensors(w, np.random.default_rng(7))))
    p_al = os.path.join(OUT, "align64.gguf")
    write(p_al, lambda w: (add_all_metadata(w), add_all_tensors(w, np.random.default_rng(8))), alignment=64)
    # v2 has the same layout as v3 for little-endian files: only the version field differs.
    p_v2 = os.path.join(OUT, "v2.gguf")
    shutil.copy(p_all, p_v2)
    with open(p_v2, "r+b") as f:
        f.seek(4)
        f.write(struct.pack("<I", 2))
    p_llama = os.path.join(OUT, "tiny-llama-q8_0.gguf")
    write(p_llama, tiny_llama, arch="llama")

    out = {
        "all-types.gguf": describe(p_all, 256),
        "align64.gguf": describe(p_al, 256),
        "v2.gguf": describe(p_v2, 256),
        "tiny-llama-q8_0.gguf": describe(p_llama, 64),
    }
    with open(os.path.join(OUT, "reader.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    for name in out:
        print(name, os.path.getsize(os.path.join(OUT, name)), "bytes")


if __name__ == "__main__":
    sys.exit(main())

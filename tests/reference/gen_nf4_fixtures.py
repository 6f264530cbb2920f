"""Reference NF4 fixtures from bitsandbytes 0.47.0 on CPU (ground truth for tests/nf4.rs).

Run: /work/venv-ref/bin/python tests/reference/gen_nf4_fixtures.py
Writes tests/fixtures/nf4/<case>.* as raw little-endian arrays plus manifest.json.

Each case quantises an input with
    bitsandbytes.functional.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
and stores bnb's packed bytes, absmax codes, nested absmax, offset, code tables, and
dequantize_4bit output (with the state's dtype set to float32, so it is the f32 value bnb computes).
torch runs with one thread: its mean (the double-quant offset) sums in a thread-count-dependent
order, and qtune reproduces the single-thread order.
"""
import json
import os

import numpy as np
import torch
import bitsandbytes.functional as F

torch.set_num_threads(1)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "nf4")
os.makedirs(OUT, exist_ok=True)
manifest = {"bitsandbytes": __import__("bitsandbytes").__version__, "torch": torch.__version__, "cases": {}}


def fnv1a64(b: bytes) -> str:
    h = 0xCBF29CE484222325
    for c in b:
        h ^= c
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def formula_input(n: int) -> np.ndarray:
    """Deterministic input both Python and Rust compute exactly (integers / 4096, some outliers)."""
    i = np.arange(n, dtype=np.int64)
    v = ((i * 7919 + 13) % 65521 - 32760).astype(np.float32) / np.float32(4096.0)
    v[i % 997 == 0] *= np.float32(37.0)
    v[(i // 64) % 101 == 5] = 0.0  # some all-zero blocks
    return v.astype(np.float32)


def run_case(name: str, x: torch.Tensor, store_arrays: bool = True):
    packed, st = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert st.nested and st.blocksize == 64 and st.state2.blocksize == 256
    st32 = F.QuantState(
        absmax=st.absmax, shape=st.shape, code=st.code, blocksize=st.blocksize,
        quant_type=st.quant_type, dtype=torch.float32, offset=st.offset, state2=st.state2,
    )
    deq = F.dequantize_4bit(packed, st32, quant_type="nf4").float()
    arrays = {
        "packed": packed.reshape(-1).numpy().astype(np.uint8),
        "absmax_q": st.absmax.reshape(-1).numpy().astype(np.uint8),
        "nested_absmax": st.state2.absmax.reshape(-1).numpy().astype(np.float32),
        "nested_code": st.state2.code.numpy().astype(np.float32),
        "code": st.code.numpy().astype(np.float32),
        "deq": deq.reshape(-1).numpy().astype(np.float32),
        "input": x.float().reshape(-1).numpy().astype(np.float32),
    }
    meta = {
        "numel": x.numel(),
        "shape": list(x.shape),
        "input_dtype": str(x.dtype).replace("torch.", ""),
        "offset_bits": int(np.float32(st.offset.item()).view(np.uint32)),
        "nested_offset": st.offset.item(),
    }
    if store_arrays:
        for k, a in arrays.items():
            a.tofile(os.path.join(OUT, f"{name}.{k}.bin"))
    else:
        # Big case: the input is recomputed from formula_input; outputs are checked by hash.
        meta["hashes"] = {k: fnv1a64(arrays[k].tobytes()) for k in ("packed", "absmax_q", "deq")}
        arrays["nested_absmax"].tofile(os.path.join(OUT, f"{name}.nested_absmax.bin"))
    manifest["cases"][name] = meta


rng = np.random.default_rng(20251125)

# 7 blocks: fewer than one nested block.
run_case("small_f32", torch.tensor(rng.standard_normal(64 * 7).astype(np.float32)).reshape(7, 64))

# 300 blocks (one full nested block + 44), small weights with outliers.
x = (rng.standard_normal(64 * 300) * 0.02).astype(np.float32)
x[rng.integers(0, x.size, 20)] *= 50.0
run_case("outliers_f32", torch.tensor(x).reshape(150, 128))

# fp16 input, 290 blocks.
run_case("f16", torch.tensor(rng.standard_normal(64 * 290).astype(np.float16)).reshape(29, 640))

# bf16 input, 260 blocks.
run_case("bf16", torch.tensor(rng.standard_normal(64 * 260).astype(np.float32)).to(torch.bfloat16).reshape(260, 64))

# Ties and edge values: an all-zero block, blocks whose absmax is 1.0 holding every NF4 code value,
# every midpoint between neighbouring codes and their f32 neighbours, and a negative-max block.
code = F.get_4bit_type("nf4", device="cpu").numpy().astype(np.float32)
blocks = [np.zeros(64, np.float32)]
mids = ((code[:-1].astype(np.float64) + code[1:]) / 2).astype(np.float32)
vals = np.concatenate([code, mids, np.nextafter(mids, np.float32(2)), np.nextafter(mids, np.float32(-2))])
vals = np.concatenate([vals, np.zeros(64 * 2 - vals.size % 64 if vals.size % 64 else 0, np.float32)])
vals = vals[: (vals.size // 64) * 64]
for b in vals.reshape(-1, 64):
    b = b.copy()
    b[0] = 1.0
    blocks.append(b)
    nb = -b
    blocks.append(nb)
b = rng.standard_normal(64).astype(np.float32)
b[5] = -8.0
blocks.append(b)
blocks.append(np.full(64, -0.0, np.float32))
blocks.append(rng.standard_normal(64).astype(np.float32) * np.float32(1e-30))
run_case("ties_f32", torch.tensor(np.concatenate(blocks)))

# A case where torch's f32 cascade-sum mean differs from the correctly rounded mean: an offset
# computed any other way (f64, naive loop) gets the last bit wrong and the test catches it.
for seed in range(1000):
    r = np.random.default_rng(seed)
    x = (r.standard_normal(64 * 160) * r.uniform(0.5, 4)).astype(np.float32)
    am = np.abs(x.reshape(-1, 64)).max(axis=1)
    t_mean = np.float32(torch.tensor(am).mean().item())
    naive = np.float32(0)
    for v in am:
        naive = np.float32(naive + v)
    if t_mean != np.float32(am.astype(np.float64).mean()) and t_mean != naive / np.float32(am.size):
        break
manifest["offset_sensitive_seed"] = seed
run_case("offset_sensitive", torch.tensor(x))

# Big deterministic case: 40,000 blocks (the offset's sum uses torch's multi-level cascade).
run_case("big_formula", torch.tensor(formula_input(64 * 40000)), store_arrays=False)

# bnb's 8-bit dynamic blockwise quantiser alone (the double-quant step), on values that hit its
# code points, their midpoints and neighbours, scaled by a per-block absmax.
dyn = F.create_dynamic_map().numpy().astype(np.float32)
dyn[0] = -1.0  # bnb's CPU quantiser sets code[0] = -1 in place before searching
dm = ((dyn[:-1].astype(np.float64) + dyn[1:]) / 2).astype(np.float32)
parts = [dyn, dm, np.nextafter(dm, np.float32(2)), np.nextafter(dm, np.float32(-2))]
y = np.concatenate(parts + [rng.standard_normal(256 * 3 + 100).astype(np.float32)])
y[::256] = 1.0
y[256 * 5 + 7] = -3.5
q, st2 = F.quantize_blockwise(torch.tensor(y), blocksize=256)
y.tofile(os.path.join(OUT, "blockwise.input.bin"))
q.numpy().astype(np.uint8).tofile(os.path.join(OUT, "blockwise.q.bin"))
st2.absmax.numpy().astype(np.float32).tofile(os.path.join(OUT, "blockwise.absmax.bin"))
st2.code.numpy().astype(np.float32).tofile(os.path.join(OUT, "blockwise.code.bin"))
manifest["blockwise_numel"] = int(y.size)

with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
print("wrote", OUT)


def bnb_checkpoint():
    """A tiny bitsandbytes-4bit Llama checkpoint, written the way transformers saves one.

    transformers 4.46.3 refuses 4-bit loading on CPU with bitsandbytes 0.47 (its backend check
    calls `.discard` on a frozenset), so we build the same keys ourselves: for each Linear inside the
    decoder layers, `X.weight` = bnb's packed codes and `X.weight.<k>` for every item of
    `QuantState.as_dict(packed=True)` (exactly what bnb's `Linear4bit._save_to_state_dict` writes);
    other tensors stay fp16; config.json gains transformers' `quantization_config`.
    expected.safetensors holds bnb's `dequantize_4bit` of each weight in f32.
    """
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    # The fp16 source, as transformers saves it (input of qtune's NF4 writer in tests/nf4_write.rs).
    src_dir = os.path.join(OUT, "src_tiny")
    model.save_pretrained(src_dir, safe_serialization=True)
    with open(os.path.join(src_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    out_dir = os.path.join(OUT, "bnb_tiny")
    os.makedirs(out_dir, exist_ok=True)
    sd, expected = {}, {}
    for name, t in model.state_dict().items():
        if name.startswith("model.layers.") and name.endswith(".weight") and t.dim() == 2:
            packed, st = F.quantize_4bit(t, blocksize=64, compress_statistics=True, quant_type="nf4")
            sd[name] = packed
            for k, v in st.as_dict(packed=True).items():
                sd[f"{name}.{k}"] = v
            st32 = F.QuantState(absmax=st.absmax, shape=st.shape, code=st.code, blocksize=st.blocksize,
                                quant_type=st.quant_type, dtype=torch.float32, offset=st.offset, state2=st.state2)
            expected[name] = F.dequantize_4bit(packed, st32, quant_type="nf4").float().contiguous()
        else:
            sd[name] = t.contiguous()
    if "lm_head.weight" in sd and sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr():
        sd["lm_head.weight"] = sd["lm_head.weight"].clone()
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    save_file(expected, os.path.join(out_dir, "expected.safetensors"))
    c = model.config.to_diff_dict()
    c["torch_dtype"] = "float16"
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float16)
    c["quantization_config"] = qc.to_dict()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)


bnb_checkpoint()
print("wrote bnb_tiny")

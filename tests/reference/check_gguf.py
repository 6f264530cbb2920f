"""Reads GGUF files written by qtune with gguf-py 0.10.0 (the reference reader) and checks them.

Produce the files first (on a build with the ggml quantisers):
  QTUNE_KEEP_GGUF_DIR=/tmp/gguf-keep cargo test --test gguf_read --test gguf_quantize
then run:
  /work/venv-ref/bin/python tests/reference/check_gguf.py /tmp/gguf-keep

Checks:
- rewrite-*.gguf: gguf-py reads our rewrite of each fixture exactly as it reads the original
  (fields, tensor names, types, shapes, offsets, bytes).
- tiny-*.gguf (from tiny-llama-q8_0.gguf): same fields but general.file_type; tensors dequantised by
  gguf-py match the source's within the target type's step; Q8_0/Q4_0 blocks equal gguf-py's
  own quantisation of the same values.
- hf-*.gguf (from hf-llama/): tensors equal the safetensors source after llama.cpp's converter's
  Q/K permutation (reshape(n_head, 2, -1, ...).swapaxes(1, 2)), within the type's step.
- llama.cpp (llama-cpp-python 0.3.16) loads every output; its logits on hf-*.gguf match
  transformers' on hf-llama/ (plus a negative control for the Q/K layout).
Prints one line per check and exits non-zero on any mismatch.
"""
import json
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "gguf")
failures = []


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def field_value(f):
    t = f.types
    if t[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if t[0] == gguf.GGUFValueType.ARRAY:
        if t[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode() for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    return f.parts[f.data[0]][0].item()


def fields(r):
    return {k: ([int(x) for x in f.types], field_value(f)) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def deq(t):
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)


def check_rewrite(ours: str, orig: str) -> None:
    a, b = gguf.GGUFReader(orig), gguf.GGUFReader(ours)
    name = os.path.basename(ours)
    check(fields(a) == fields(b) and list(a.fields) == list(b.fields), f"{name}: fields and their order")
    ta, tb = a.tensors, b.tensors
    same = len(ta) == len(tb) and all(
        x.name == y.name and x.tensor_type == y.tensor_type and list(x.shape) == list(y.shape)
        and x.data_offset == y.data_offset and x.data.tobytes() == y.data.tobytes()
        for x, y in zip(ta, tb))
    check(same, f"{name}: {len(tb)} tensors (names, types, shapes, offsets, bytes)")


def step_bound(want: np.ndarray, qtype: int) -> np.ndarray:
    """Largest error the format allows per element, from each 32-block's absmax."""
    blocks = want.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    if qtype == T.Q8_0:
        b = 0.57 * amax / 127
    elif qtype == T.Q4_0:
        b = 1.01 * amax / 8  # a clamped value can be a whole step off
    else:
        b = 0.2 * amax  # Q4_K: checked by relative RMS below instead
    return np.broadcast_to(b, blocks.shape).reshape(-1) + 1e-7


def check_values(name: str, t, want: np.ndarray) -> None:
    got = deq(t)
    if t.tensor_type in (T.F32,):
        check(np.array_equal(got, want), f"{name}: {t.name} F32 exact")
    elif t.tensor_type in (T.F16, T.BF16):
        ref = gguf.quants.dequantize(gguf.quants.quantize(want, t.tensor_type), t.tensor_type).reshape(-1) \
            if t.tensor_type == T.BF16 else want.astype(np.float16).astype(np.float32)
        check(np.array_equal(got, ref), f"{name}: {t.name} {t.tensor_type.name} exact")
    else:
        within = bool(np.all(np.abs(got - want) <= step_bound(want, t.tensor_type)))
        rel = float(np.sqrt(((got - want) ** 2).sum() / (want ** 2).sum()))
        msg = f"{name}: {t.name} {t.tensor_type.name} rel RMS {rel:.4f}"
        if t.tensor_type in (T.Q8_0, T.Q4_0):
            rows = want.reshape(-1, int(t.shape[0]))
            ref = gguf.quants.quantize(rows, t.tensor_type)
            same = ref.tobytes() == t.data.tobytes()
            check(within, msg + ", within half a step")
            check(same, f"{name}: {t.name} {t.tensor_type.name} blocks identical to gguf-py's quantize")
        else:
            check(within and rel < 0.1, msg)


def check_tiny(path: str) -> None:
    src = gguf.GGUFReader(os.path.join(FIX, "tiny-llama-q8_0.gguf"))
    out = gguf.GGUFReader(path)
    name = os.path.basename(path)
    fa, fb = fields(src), fields(out)
    fa.pop("general.file_type"), fb.pop("general.file_type")
    check(fa == fb, f"{name}: metadata equal to the source's except general.file_type")
    print(f"     general.file_type = {field_value(out.fields['general.file_type'])}")
    for s, t in zip(src.tensors, out.tensors):
        assert s.name == t.name and list(s.shape) == list(t.shape)
        check_values(name, t, deq(s))


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # As llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (the reference for this layout).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(g: str) -> str:
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if g in fixed:
        return fixed[g]
    _, l, part, suffix = g.split(".")
    return f"model.layers.{l}.{HF_NAMES[part]}.{suffix}"


def check_hf(path: str, hf_dir: str) -> None:
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    src = load_file(os.path.join(hf_dir, "model.safetensors"))
    out = gguf.GGUFReader(path)
    name = os.path.basename(path)
    f = {k: v[1] for k, v in fields(out).items()}
    check(f["llama.attention.head_count"] == cfg["num_attention_heads"]
          and f["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
          and f["llama.block_count"] == cfg["num_hidden_layers"]
          and f["tokenizer.ggml.model"] == "gpt2" and len(f["tokenizer.ggml.tokens"]) == cfg["vocab_size"],
          f"{name}: llama.* and tokenizer keys as gguf-py reads them")
    expected = {hf_name(t.name) for t in out.tensors}
    check(expected == {k for k in src if not k.endswith("inv_freq")}, f"{name}: every HF tensor mapped once")
    for t in out.tensors:
        w = src[hf_name(t.name)].astype(np.float32)
        if ".attn_q." in t.name:
            w = permute(w, cfg["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = permute(w, cfg["num_key_value_heads"])
        check_values(name, t, w.reshape(-1))


def check_llama_cpp(d: str) -> None:
    """llama.cpp (llama-cpp-python) loads our files; on hf-*.gguf its logits match transformers'
    LlamaForCausalLM on the source directory. A negative control (Q/K rows permuted inside the HF
    model itself) shows the comparison is sensitive to the rotary layout."""
    try:
        import torch
        from llama_cpp import Llama
        from transformers import LlamaForCausalLM
    except ImportError as e:
        print(f"skip llama.cpp checks: {e}")
        return
    toks = [10, 200, 37, 5, 99, 258, 33, 120]

    def cpp_logits(path):
        m = Llama(model_path=path, logits_all=True, verbose=False, n_ctx=64, n_threads=2)
        m.eval(toks)
        return np.array(m.scores[:len(toks)], dtype=np.float64)

    for fn in sorted(os.listdir(d)):
        if fn.endswith(".gguf") and not fn.startswith("rewrite-"):
            lg = cpp_logits(os.path.join(d, fn))
            check(np.isfinite(lg).all(), f"llama.cpp loads {fn} and evaluates {len(toks)} tokens")
    hf_dir = os.path.join(d, "hf-llama")
    if not os.path.isdir(hf_dir):
        return
    # attention_bias: layer 0 carries q/k biases; the missing ones load as zeros, as in llama.cpp.
    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attention_bias=True)
    model = model.float().eval()  # one source tensor is F16
    with torch.no_grad():
        ref = model(torch.tensor([toks])).logits[0].double().numpy()

    def rel(a):
        return float(np.abs(a - ref).max() / np.abs(ref).max())

    for fn, tol in [("hf-f32.gguf", 5e-4), ("hf-q8_0.gguf", 5e-2), ("hf-q4_k.gguf", 2e-1)]:
        p = os.path.join(d, fn)
        if os.path.exists(p):
            r = rel(cpp_logits(p))
            check(r < tol, f"{fn}: llama.cpp logits vs transformers, max rel diff {r:.2e} (< {tol})")
    cfg = model.config
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            a.q_proj.weight.copy_(torch.from_numpy(permute(a.q_proj.weight.numpy(), cfg.num_attention_heads)))
            a.k_proj.weight.copy_(torch.from_numpy(permute(a.k_proj.weight.numpy(), cfg.num_key_value_heads)))
        wrong = model(torch.tensor([toks])).logits[0].double().numpy()
    r = float(np.abs(cpp_logits(os.path.join(d, "hf-f32.gguf")) - wrong).max() / np.abs(wrong).max())
    check(r > 4 * 5e-4, f"negative control: without llama.cpp's Q/K layout the logits differ by {r:.2e}")


def main() -> int:
    d = sys.argv[1] if len(sys.argv) > 1 else "/tmp/gguf-keep"
    for fn in sorted(os.listdir(d)):
        p = os.path.join(d, fn)
        if fn.startswith("rewrite-"):
            check_rewrite(p, os.path.join(FIX, fn[len("rewrite-"):]))
        elif fn.startswith("tiny-") and fn.endswith(".gguf"):
            check_tiny(p)
        elif fn.startswith("hf-") and fn.endswith(".gguf"):
            check_hf(p, os.path.join(d, "hf-llama"))
    check_llama_cpp(d)
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

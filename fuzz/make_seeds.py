#!/usr/bin/env python3
"""Seed inputs for every fuzz target, from the committed test fixtures (stdlib only).

    python3 fuzz/make_seeds.py OUT_DIR   # writes OUT_DIR/<target>/<seed>

Multi-file targets join their files with the harness's separator (fuzz/src/harness.rs SEP).
"""
import json, os, struct, sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FX = os.path.join(ROOT, "tests", "fixtures")
SEP = b"\n--qtune-fuzz-file--\n"


def rd(*p):
    with open(os.path.join(FX, *p), "rb") as f:
        return f.read()


def st(tensors, meta=None):
    """A small safetensors file: tensors = [(name, dtype, shape, bytes)]."""
    hdr, off, data = {}, 0, b""
    if meta:
        hdr["__metadata__"] = meta
    for name, dt, shape, b in tensors:
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(b)]}
        off += len(b)
        data += b
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def f32(*v):
    return struct.pack(f"<{len(v)}f", *v)


def main(out):
    seeds = {}
    add = lambda t, n, b: seeds.setdefault(t, {}).__setitem__(n, b)
    text = "Hello world! 123 <s> </s> <|im_start|>user\nhi there\u2581é😀 \t\r\n  x".encode()
    ids = bytes(range(0, 64))
    for f in ["align64.gguf", "all-types.gguf", "v2.gguf", "tiny-llama-q8_0.gguf"]:
        add("gguf", f, rd("gguf", f))
    for f in ["bpe-llama3-vocab.gguf", "spm-vocab.gguf"]:
        add("gguf", f, rd("data", f))
        add("gguf_tokenizer", f, rd("data", f) + SEP + text + SEP + ids)
    add("gguf_lora", "llamacpp-lora-f32.gguf", rd("export", "llamacpp-lora-f32.gguf"))
    add("gguf", "llamacpp-lora-f32.gguf", rd("export", "llamacpp-lora-f32.gguf"))

    small = [
        ("a.weight", "F32", [2, 4], f32(*range(8))),
        ("b.weight", "F16", [4], b"\x00\x3c" * 4),
        ("c.weight", "BF16", [1, 2], b"\x80\x3f" * 2),
    ]
    add("safetensors", "small", st(small, {"format": "pt"}))
    add("safetensors", "rms_norm", rd("ops", "rms_norm.safetensors"))
    add("safetensors", "adapter", rd("llama", "f32", "adapter", "adapter_model.safetensors"))
    add("safetensors", "bnb_tiny", rd("nf4", "bnb_tiny", "model.safetensors"))
    index = {"metadata": {"total_size": 44},
             "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors",
                            "c.weight": "model-00002-of-00002.safetensors"}}
    add("safetensors_sharded", "two",
        json.dumps(index).encode() + SEP + st(small[:1]) + SEP + st(small[1:]) + SEP
        + rd("llama", "model", "config.json"))
    add("bnb", "bnb_tiny", rd("nf4", "bnb_tiny", "model.safetensors") + SEP
        + rd("nf4", "bnb_tiny", "config.json"))

    for d in ["model_chat", "model_llamafast"]:
        add("tokenizer_json", d, rd("data", d, "tokenizer.json") + SEP
            + rd("data", d, "tokenizer_config.json") + SEP + text + SEP + ids)
    conv = b"system: be brief\nuser: hi\nassistant: hello\nuser: more\nassistant: ok"
    for d in ["model_chat", "model_llamafast"]:
        t = json.loads(rd("data", d, "tokenizer_config.json")).get("chat_template")
        if isinstance(t, str):
            add("chat_template", d, t.encode() + SEP + conv)
    chatml = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
              "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|im_start|>assistant\\n' }}{% endif %}")
    add("chat_template", "chatml", chatml.encode() + SEP + conv)
    add("chat_template", "features",
        b"{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.first %}{{ bos_token }}"
        b"{% endif %}{{ m.role|upper }}: {{ m.content.strip() }}{% set ns.n = ns.n + 1 %}"
        b"{% if m.role not in ['user','assistant','system'] %}{{ raise_exception('bad role') }}"
        b"{% endif %}{% endfor %}{{ ns.n }}{{ eos_token }}{{ range(3)|join(',') }}"
        b"{% macro f(x) %}[{{ x }}]{% endmacro %}{{ f('a' * 3) }}" + SEP + conv)

    for f in ["alpaca.jsonl", "messages.jsonl", "pc.jsonl", "text.jsonl"]:
        for flags in [0, 3, 0x41]:
            add("jsonl", f"{f}.{flags}", bytes([flags]) + SEP + rd("data", f))
    add("jsonl", "messages.chatml", bytes([0x20]) + b"chatml" + SEP + rd("data", "messages.jsonl"))
    add("jsonl", "train", bytes([0x40]) + SEP + rd("train", "data.jsonl"))

    add("peft_adapter", "f32", rd("llama", "f32", "adapter", "adapter_config.json") + SEP
        + rd("llama", "f32", "adapter", "adapter_model.safetensors"))

    with open(os.path.join(ROOT, "assets", "default.toml"), "rb") as f:
        add("config_toml", "default", f.read())
    add("config_toml", "all",
        b'model = "m"\ndata = "d.jsonl"\nrank = 16\nalpha = 32.0\nlr = 2e-4\nschedule = "linear"\n'
        b'quant = "nf4"\ndtype = "f32"\nmax-memory = "6G"\ntargets = ["q_proj", "v_proj"]\n'
        b'packing = true\nseq_len = 128\n[extra]\nx = 1\n')

    for t, files in seeds.items():
        d = os.path.join(out, t)
        os.makedirs(d, exist_ok=True)
        for n, b in files.items():
            with open(os.path.join(d, n), "wb") as f:
                f.write(b)
    print(f"{sum(len(v) for v in seeds.values())} seeds for {len(seeds)} targets in {out}")


if __name__ == "__main__":
    main(sys.argv[1])

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


def gguf(kvs, tensors=()):
    """A small GGUF v3 file: kvs = [(key, type_id, value)], arrays as (8 or 9, (elem_type, list))."""
    def enc(t, v):
        if t == 8:
            b = v.encode()
            return struct.pack("<Q", len(b)) + b
        if t == 9:
            et, items = v
            return struct.pack("<IQ", et, len(items)) + b"".join(enc(et, x) for x in items)
        fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
               10: "<Q", 11: "<q", 12: "<d"}[t]
        return struct.pack(fmt, v)
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for k, t, v in kvs:
        out += enc(8, k) + struct.pack("<I", t) + enc(t, v)
    data = b""
    for name, ne, tid, raw in tensors:
        data += b"\0" * (-len(data) % 32)
        out += enc(8, name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", tid, len(data))
        data += raw
    out += b"\0" * (-len(out) % 32)
    return out + data


def tiny_tokenizers():
    """Small tokenizer.json files of each model kind (fast to load, so many executions/s)."""
    base = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": 0, "content": "<s>", "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None}
    letters = list("abcdefghijklmnopqrstuvwxyz") + ["\u0120", "Ġt", "he", "th"]
    bpe_vocab = {t: i for i, t in enumerate(["<s>"] + letters)}
    yield "bpe_bytelevel", dict(base, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True,
                                                      "trim_offsets": True, "use_regex": True},
        decoder={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        post_processor={"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}], "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                        "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}},
        model={"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
               "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
               "ignore_merges": False, "vocab": bpe_vocab, "merges": [["t", "h"], ["h", "e"], ["\u0120", "t"]]})
    yield "bpe_spm_like", dict(base,
        normalizer={"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}, {"type": "NFKC"}]},
        decoder={"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                 {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        model={"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": "##",
               "end_of_word_suffix": "</w>", "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
               "vocab": dict(bpe_vocab, **{"<unk>": 31, "<0x41>": 32, "##a": 33}), "merges": ["t h", "h e"]})
    yield "wordpiece", dict(base, normalizer={"type": "BertNormalizer", "clean_text": True,
        "handle_chinese_chars": True, "strip_accents": None, "lowercase": True},
        pre_tokenizer={"type": "BertPreTokenizer"}, decoder={"type": "WordPiece", "prefix": "##", "cleanup": True},
        model={"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
               "max_input_chars_per_word": 100, "vocab": {"[UNK]": 0, "the": 1, "##re": 2, "hi": 3, "t": 4}})
    yield "unigram", dict(base, pre_tokenizer={"type": "Metaspace", "replacement": "\u2581",
        "prepend_scheme": "always", "split": True},
        decoder={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
        model={"type": "Unigram", "unk_id": 1, "byte_fallback": False,
               "vocab": [["<s>", 0.0], ["<unk>", 0.0], ["\u2581hi", -1.0], ["\u2581", -2.0], ["h", -3.0], ["i", -3.0], ["e", -3.5]]})
    yield "wordlevel_split", dict(base, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Removed", "invert": False},
        {"type": "Digits", "individual_digits": True}, {"type": "Punctuation", "behavior": "Isolated"}]},
        model={"type": "WordLevel", "vocab": {"<s>": 0, "hi": 1, "there": 2, "[UNK]": 3}, "unk_token": "[UNK]"})


def main(out):
    seeds = {}
    add = lambda t, n, b: seeds.setdefault(t, {}).__setitem__(n, b)
    text = "Hello world! 123 <s> </s> <|im_start|>user\nhi there\u2581é😀 \t\r\n  x".encode()
    ids = bytes(range(0, 64))
    for f in ["align64.gguf", "all-types.gguf", "v2.gguf"]:
        add("gguf", f, rd("gguf", f))
    for f in ["bpe-llama3-vocab.gguf", "spm-vocab.gguf"]:
        add("gguf", f, rd("data", f))
        add("gguf_tokenizer", f, rd("data", f) + SEP + text + SEP + ids)
    toks = ["<unk>", "<s>", "</s>", "\u2581", "h", "i", "\u2581h", "\u2581hi", "<0x41>", "<|im_end|>"]
    spm = [("tokenizer.ggml.model", 8, "llama"), ("tokenizer.ggml.tokens", 9, (8, toks)),
           ("tokenizer.ggml.scores", 9, (6, [0.0, 0, 0, -1, -2, -2, -1.5, -1, 0, 0])),
           ("tokenizer.ggml.token_type", 9, (5, [2, 3, 3, 1, 1, 1, 1, 1, 6, 4])),
           ("tokenizer.ggml.bos_token_id", 4, 1), ("tokenizer.ggml.eos_token_id", 4, 2),
           ("tokenizer.ggml.add_space_prefix", 7, True)]
    btoks = ["<|endoftext|>", "h", "i", "\u0120", "t", "e", "r", "\u0120t", "he", "hi"]
    bpe = [("tokenizer.ggml.model", 8, "gpt2"), ("tokenizer.ggml.pre", 8, "gpt-2"),
           ("tokenizer.ggml.tokens", 9, (8, btoks)),
           ("tokenizer.ggml.token_type", 9, (5, [3] + [1] * 9)),
           ("tokenizer.ggml.merges", 9, (8, ["\u0120 t", "h e", "h i"])),
           ("tokenizer.ggml.eos_token_id", 4, 0)]
    for name, kv in [("tiny-spm", spm), ("tiny-bpe", bpe),
                     ("tiny-llama3", [(k, t, "llama-bpe" if k == "tokenizer.ggml.pre" else v) for k, t, v in bpe])]:
        add("gguf_tokenizer", name, gguf(kv) + SEP + text + SEP + ids)
    add("gguf", "tiny-tensors", gguf([("general.architecture", 8, "llama"), ("general.alignment", 4, 32)],
        [("a", [32, 2], 8, (b"\x00\x3c" + bytes(range(32))) * 2), ("b", [4], 0, f32(1, 2, 3, 4))]))
    for name, spec in tiny_tokenizers():
        add("tokenizer_json", name, json.dumps(spec).encode() + SEP + b'{"bos_token": "<s>"}' + SEP
            + text + SEP + ids)
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
    # A tiny bitsandbytes NF4 weight (128 elements: 2 blocks of 64, one nested block) + a float one.
    qs = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [2, 64],
                     "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.01}).encode()
    w = "model.layers.0.mlp.up_proj.weight"
    nf4 = [(w, "U8", [64, 1], bytes(range(64))),
           (w + ".absmax", "U8", [2], b"\x10\xf0"),
           (w + ".quant_map", "F32", [16], f32(*[i / 7.5 - 1 for i in range(16)])),
           (w + ".nested_absmax", "F32", [1], f32(0.5)),
           (w + ".nested_quant_map", "F32", [256], f32(*[i / 127.5 - 1 for i in range(256)])),
           (w + ".quant_state.bitsandbytes__nf4", "U8", [len(qs)], qs),
           ("model.norm.weight", "F16", [4], b"\x00\x3c" * 4)]
    add("bnb", "tiny_nf4", st(nf4) + SEP + b'{"model_type": "llama"}')
    add("safetensors", "tiny_nf4", st(nf4))
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

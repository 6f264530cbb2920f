#!/usr/bin/env python3
"""Every llama.cpp pre-tokenizer type against llama.cpp itself, on one vocabulary.

llama.cpp's suite has vocabularies for only some `tokenizer.ggml.pre` names. To check the regex
sets of all of them, this writes (with gguf-py's GGUFWriter, to a temporary directory, never
committed) copies of the suite's llama-bpe vocabulary that differ only in `tokenizer.ggml.pre`,
one per pre-tokenizer type, loads each in llama.cpp and records its ids and detokenised text for
random strings: tests/fixtures/vocab_random/pre/<name>.jsonl, read by tests/vocab_random.rs (which
builds the same vocabulary in memory from the suite file with that name).

Needs llama-cpp-python 0.3.16 and gguf (gguf-py) beside it (see gen_vocab_random.py).
Run: /work/venvs/tok/bin/python tests/reference/gen_vocab_pre.py [target/vocab-suite] [N]
"""
import json
import os
import random
import sys
import tempfile
import zlib

import gguf
import llama_cpp
from llama_cpp import Llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_vocab_random import detokenize, random_text, special_texts  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "vocab_random", "pre")

# One name per llama.cpp pre-tokenizer type (llama-vocab.cpp), besides those the suite's own
# vocabularies already cover.
NAMES = [
    "default", "llama3", "deepseek-llm", "deepseek-coder", "deepseek-v3", "falcon", "mpt",
    "starcoder", "gpt-2", "refact", "command-r", "stablelm2", "qwen2", "olmo", "dbrx", "smaug-bpe",
    "poro-chat", "chatglm-bpe", "viking", "jais", "tekken", "smollm", "codeshell", "bloom",
    "gpt3-finnish", "exaone", "chameleon", "minerva-7b", "gpt-4o", "superbpe", "trillion",
    "bailingmoe", "seed-coder", "hunyuan", "hunyuan-dense", "kimi-k2", "falcon3", "phi-2",
    "megrez", "llama4", "exaone4", "glm4",
]


_FIELDS = {}


def read_fields(src):
    """(arch, [(key, value, type, sub_type)]) of a GGUF's metadata, read once per file."""
    if src not in _FIELDS:
        r = gguf.GGUFReader(src)
        fields = []
        for k, f in r.fields.items():
            if k.startswith("GGUF.") or k == "general.architecture":
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            fields.append((k, f.contents(), vtype, sub))
        _FIELDS[src] = (r.fields["general.architecture"].contents(), fields)
    return _FIELDS[src]


def copy_with_pre(src, dst, pre):
    arch, fields = read_fields(src)
    w = gguf.GGUFWriter(dst, arch)
    for k, val, vtype, sub in fields:
        w.add_key_value(k, pre if k == "tokenizer.ggml.pre" else val, vtype, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    suite = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "target", "vocab-suite")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 250
    src = os.path.join(suite, "ggml-vocab-llama-bpe.gguf")
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in NAMES:
            if os.environ.get("KEEP_EXISTING") and os.path.exists(os.path.join(OUT, f"{name}.jsonl")):
                continue
            path = os.path.join(tmp, f"{name}.gguf")
            copy_with_pre(src, path, name)
            llm = Llama(model_path=path, vocab_only=True, verbose=False)
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            specials = special_texts(llm, llm.n_vocab())[:64]
            rng = random.Random(zlib.crc32(("pre:" + name).encode()))
            lines = []
            for _ in range(n):
                text = random_text(rng, specials)
                add = rng.random() < 0.5
                special = rng.random() < 0.5
                ids = llm.tokenize(text.encode("utf-8"), add_bos=add, special=special)
                d = detokenize(vocab, ids).decode("utf-8", "replace")
                rec = {"t": text, "b": add, "s": special, "ids": ids}
                if d != text:
                    rec["d"] = d
                lines.append(json.dumps(rec, ensure_ascii=False, separators=(",", ":")))
            with open(os.path.join(OUT, f"{name}.jsonl"), "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            del llm
            os.remove(path)
            print(f"{name}: {n} strings")


if __name__ == "__main__":
    main()

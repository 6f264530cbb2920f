#!/usr/bin/env python3
"""Expected token ids (and detokenised text) from llama.cpp itself for random strings, per vocabulary
of llama.cpp's tokenizer suite: tests/fixtures/vocab_random/<vocab>.jsonl, read by
tests/vocab_random.rs.

Reference: llama-cpp-python 0.3.16 (llama.cpp as users run it), built from source:
    python3 -m venv /work/venvs/tok
    CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 10 /work/venvs/tok/bin/pip install llama-cpp-python==0.3.16
Vocabularies: tests/reference/fetch_vocab_suite.sh (target/vocab-suite).
Run: /work/venvs/tok/bin/python tests/reference/gen_vocab_random.py [target/vocab-suite] [N]

Each line: {"t": text, "b": add_special, "s": parse_special, "ids": [...], "d": text of ids}
("d" only where it differs from "t"). Strings mix scripts, digits, whitespace runs, emoji (with
ZWJ sequences and modifiers), combining marks, contractions and the vocabulary's own special
tokens. A fixed seed per vocabulary keeps the fixtures reproducible.
"""
import ctypes
import json
import os
import random
import sys
import zlib

import llama_cpp
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "vocab_random")

WORDS = ["hello", "world", "The", "quick", "brown", "fox", "don't", "I'm", "we'll", "they've",
         "it's", "you're", "He'd", "CAN'T", "LLaMA", "fine-tune", "naïve", "café", "Ünïcödé",
         "Straße", "Äpfel", "résumé", "über", "QLoRA", "GGUF", "candle", "x", "a", "I"]
SCRIPTS = [
    "αβγδ εζηθ Ελληνικά", "Привет мир", "нещо на Български", "שלום עולם", "مرحبا بالعالم",
    "नमस्ते दुनिया", "สวัสดีครับ", "こんにちは世界", "カタカナ", "你好，世界。", "中文字符测试",
    "안녕하세요 세계", "Tiếng Việt có dấu", "ქართული", "Հայերեն", "ᏣᎳᎩ", "ⲀⲂⲄ", "𐐀𐐨",
    "ｆｕｌｌｗｉｄｔｈ", "ﬁﬂ", "Ωℌ℃", "ǅǈǋ", "ΐΰ", "İstanbul", "ß ẞ",
]
EMOJI = ["🦙", "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🤖", "✨", "🔥🔥", "☕", "🏳️‍🌈", "1️⃣"]
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "…", "—", "–", "«", "»", "“", "”",
                                                       "¿", "¡", "§", "©", "®", "™", "°", "±",
                                                       "½", "¼", "€", "£", "¥", "→", "•", "·"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\t\t", "\u00a0", "\u3000",
          "\u2009", "\u200b", "\u2028", "\x0b", "\x0c", " \t \n"]
DIGITS = ["0", "7", "42", "123", "1234", "12345678", "3.14159", "1,000,000", "٣٤٥", "१२३", "²³",
          "Ⅻ", "①②"]
COMBINING = ["e\u0301", "a\u0308", "n\u0303", "\u0301", "o\u0302\u0323", "\u0915\u094d\u0937"]
CODE = ["def f(x):\n    return x+1", "for (int i=0;i<n;i++) {", "if a == b:", "<div class=\"x\">",
        "x = [1, 2, 3]", "// comment", "#include <stdio.h>", "fn main() -> Result<()>",
        "SELECT * FROM t;", "a->b", "a::b", "$HOME/.cache", "\\n\\t"]


def special_texts(llm, n_vocab):
    """Texts of the control / user-defined / unknown tokens (those llama.cpp may split out)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out = []
    for i in range(n_vocab):
        attr = llama_cpp.llama_vocab_get_attr(vocab, i)
        if attr & (1 | 8 | 16):  # UNKNOWN | CONTROL | USER_DEFINED
            t = llama_cpp.llama_vocab_get_text(vocab, i)
            if t:
                out.append(t.decode("utf-8", "replace"))
    return out


def random_text(rng, specials):
    pools = [WORDS] * 4 + [SCRIPTS, EMOJI, PUNCT, SPACES, SPACES, DIGITS, COMBINING, CODE]
    parts = []
    for _ in range(rng.randint(1, 10)):
        if specials and rng.random() < 0.08:
            s = rng.choice(specials)
            # Now and then glue spaces around a special token (lstrip/rstrip handling).
            parts.append(rng.choice(["", " ", "  ", "\n"]) + s + rng.choice(["", " ", "\n"]))
            continue
        pool = rng.choice(pools)
        p = rng.choice(pool)
        if pool is SCRIPTS and rng.random() < 0.5:
            words = p.split()
            p = rng.choice(words) if words else p
        parts.append(p)
        if rng.random() < 0.6:
            parts.append(" ")
    t = "".join(parts)
    if rng.random() < 0.1:
        t = " " + t
    if rng.random() < 0.1:
        t = t + rng.choice(SPACES)
    return t


def detokenize(vocab, ids):
    """llama_detokenize(remove_special=False, unparse_special=True), as qtune's decode."""
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    cap = 64 + 16 * len(ids)
    while True:
        buf = ctypes.create_string_buffer(cap)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, cap, False, True)
        if n >= 0:
            return buf.raw[:n]
        cap = -n + 1


def main():
    suite = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "target", "vocab-suite")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    os.makedirs(OUT, exist_ok=True)
    names = sorted(f for f in os.listdir(suite) if f.startswith("ggml-vocab-") and f.endswith(".gguf"))
    for name in names:
        path = os.path.join(suite, name)
        try:
            llm = Llama(model_path=path, vocab_only=True, verbose=False)
        except Exception as e:  # noqa: BLE001 - a vocabulary llama.cpp itself cannot load
            print(f"{name}: llama.cpp cannot load it ({e}); skipped")
            continue
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        specials = special_texts(llm, llm.n_vocab())
        rng = random.Random(zlib.crc32(name.encode()))
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
        out = os.path.join(OUT, name.replace(".gguf", ".jsonl"))
        with open(out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"{name}: {n} strings -> {os.path.relpath(out)}")


if __name__ == "__main__":
    main()

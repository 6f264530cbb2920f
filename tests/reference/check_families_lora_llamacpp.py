"""External check of `qtune export --format gguf-lora`, `qtune merge` and `qtune quantize` on the
Llama family's new members, with llama.cpp and transformers + PEFT, and the fixtures
tests/families_export.rs reads (tests/fixtures/families_export/<family>/).

The tiny random models of tests/fixtures/families (gen_families_fixtures.py): Llama 3.1 (rope_scaling
llama3: llama.cpp's converter adds `rope_freqs.weight`), Qwen2 (architecture `qwen2`: q/k/v biases,
rows NOT permuted, tied head), Mistral (a Llama to llama.cpp; the batch fits its window of 16) and
a SmolLM2-style Llama with a tied head. For each, a PEFT LoRA (r 4, alpha 8, all-linear, non-zero B)
is saved in f32 (committed: adapter/), then:
  1. base.gguf: llama.cpp's own convert_hf_to_gguf.py --outtype f32;
  2. ours.gguf: `qtune export --format gguf-lora --dtype f32` from the Hugging Face base;
  3. theirs.gguf: llama.cpp's convert_lora_to_gguf.py --outtype f32 on the same PEFT adapter
     (committed: llamacpp-lora-f32.gguf);
  4. merged.gguf: `qtune merge --type f32` of the adapter into the Hugging Face base (qtune's own
     HF -> GGUF conversion: `rope_freqs.weight`, the qwen2 keys and biases), and merged-gguf.gguf:
     `qtune merge` into base.gguf (llama.cpp's file);
  5. quantized.gguf: `qtune quantize --type f32` of the Hugging Face base, run by llama.cpp alone;
then llama.cpp (llama-cpp-python 0.3.16) logits of base+ours vs base+theirs (1e-5) and vs
transformers + PEFT f32 (1e-3); llama.cpp on both merged files vs transformers + PEFT (1e-3);
llama.cpp on quantized.gguf vs transformers without the adapter (1e-3).

The test tokenizer is a byte-level BPE llama.cpp knows by no hash: declared `gpt-2` to the converter
(check_lora_llamacpp.run_script), as the other fixtures; the tensors are untouched.

Usage: python tests/reference/check_families_lora_llamacpp.py PATH/TO/qtune LLAMA_CPP_SRC [family..]
  LLAMA_CPP_SRC: vendor/llama.cpp of the llama-cpp-python 0.3.16 source package (as
  check_lora_llamacpp.py).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from check_lora_llamacpp import llama_logits, rel  # noqa: E402

FIX = os.path.join(HERE, "..", "fixtures")
OUT = os.path.join(FIX, "families_export")
FAMILIES = ["llama3", "qwen2", "mistral", "tied"]
SEED = 9753
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules="all-linear")


def model_dir(fam):
    return os.path.join(FIX, "families", fam, "model")


def hf_model(fam):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir(fam), torch_dtype=torch.float32).eval()


def build_adapter(fam, d):
    """A PEFT LoRA on every linear of the family's fixture model, B non-zero, saved under d."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(SEED)
    pm = get_peft_model(hf_model(fam), LoraConfig(**LORA))
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED + 1)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out = os.path.join(d, "adapter")
    # The repository-relative base, not this machine's path.
    pm.peft_config["default"].base_model_name_or_path = f"tests/fixtures/families/{fam}/model"
    pm.save_pretrained(out)
    readme = os.path.join(out, "README.md")  # PEFT's model card: no test reads it
    if os.path.exists(readme):
        os.remove(readme)
    return out


def check(qtune, src, fam):
    from peft import PeftModel
    d = os.path.join(OUT, fam)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model = model_dir(fam)
    adapter = build_adapter(fam, d)
    g = torch.Generator().manual_seed(SEED + 2)
    ids = torch.randint(3, 300, (12,), generator=g).tolist()
    theirs = os.path.join(d, "llamacpp-lora-f32.gguf")

    def converter(script, argv):
        subprocess.run([sys.executable, "-c",
                        f"import sys; sys.path.insert(0, {HERE!r}); import check_lora_llamacpp as m; "
                        f"m.run_script({src!r}, {script!r}, {argv!r})"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def q(*args):
        subprocess.run([qtune, *args], check=True, stdout=subprocess.DEVNULL)

    with tempfile.TemporaryDirectory() as t:
        base = os.path.join(t, "base.gguf")
        ours = os.path.join(t, "ours.gguf")
        merged = os.path.join(t, "merged.gguf")
        merged_g = os.path.join(t, "merged-gguf.gguf")
        quantized = os.path.join(t, "quantized.gguf")
        converter("convert_hf_to_gguf.py", [model, "--outtype", "f32", "--outfile", base])
        converter("convert_lora_to_gguf.py", ["--base", model, "--outtype", "f32", "--outfile", theirs, adapter])
        q("export", "--model", model, "--adapter", adapter, "--format", "gguf-lora", "--dtype", "f32", "--out", ours)
        q("merge", "--model", model, "--adapter", adapter, "--type", "f32", "--out", merged)
        q("merge", "--model", base, "--adapter", adapter, "--out", merged_g)
        q("quantize", "--model", model, "--type", "f32", "--out", quantized)
        l_ours = llama_logits(base, ids, ours)
        l_theirs = llama_logits(base, ids, theirs)
        l_merged = llama_logits(merged, ids)
        l_merged_g = llama_logits(merged_g, ids)
        l_quant = llama_logits(quantized, ids)
        l_base = llama_logits(base, ids)
    with torch.no_grad():
        plain = hf_model(fam)(torch.tensor([ids])).logits[0].numpy()
        pm = PeftModel.from_pretrained(hf_model(fam), adapter).eval()
        ref = pm(torch.tensor([ids])).logits[0].numpy()
    checks = {
        "ours_vs_llamacpp_converter": rel(l_ours, l_theirs),
        "ours_vs_transformers_peft": rel(l_ours, ref),
        "converter_vs_transformers_peft": rel(l_theirs, ref),
        "merged_hf_vs_transformers_peft": rel(l_merged, ref),
        "merged_gguf_vs_transformers_peft": rel(l_merged_g, ref),
        "quantized_hf_vs_transformers": rel(l_quant, plain),
        "base_vs_lora_difference": rel(l_base, l_ours),
    }
    for k, v in checks.items():
        print(f"{fam} {k}: {v:.2e}")
    from safetensors.numpy import save_file
    save_file({"llamacpp_lora": l_ours, "llamacpp_converter_lora": l_theirs, "llamacpp_merged": l_merged,
               "llamacpp_merged_gguf": l_merged_g, "transformers_peft": ref, "transformers": plain},
              os.path.join(d, "logits.safetensors"))
    import llama_cpp, peft, transformers
    json.dump({"input_ids": ids, "checks": checks,
               "versions": {"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__, "peft": peft.__version__}},
              open(os.path.join(d, "expected.json"), "w"), indent=1)
    return (checks["ours_vs_llamacpp_converter"] < 1e-5 and checks["ours_vs_transformers_peft"] < 1e-3
            and checks["merged_hf_vs_transformers_peft"] < 1e-3
            and checks["merged_gguf_vs_transformers_peft"] < 1e-3
            and checks["quantized_hf_vs_transformers"] < 1e-3
            and checks["base_vs_lora_difference"] > 1e-2)


def main():
    qtune, src = sys.argv[1], sys.argv[2]
    fams = sys.argv[3:] or FAMILIES
    results = {f: check(qtune, src, f) for f in fams}
    for f, ok in results.items():
        print(f, "PASS" if ok else "FAIL")
    ok = all(results.values())
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

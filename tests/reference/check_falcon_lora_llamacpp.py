"""External check of `qtune export`, `qtune merge` and `qtune generate` on Falcon, with llama.cpp and
transformers + PEFT, and the fixtures tests/falcon_export.rs reads (tests/fixtures/falcon_export/).

Two tiny random FalconForCausalLM with the MLP at 4 x hidden (llama.cpp's Falcon graph takes its
size from `falcon.feed_forward_length`, which its converter writes as 4 x hidden):
  - `mq`: the Falcon-7B layout (multi-query, one KV head: llama.cpp's qkv reordering is the identity);
  - `gqa`: the new decoder layout with 2 KV groups of 2 heads (the converter regroups the fused qkv
    rows from per-group [q.., k, v] to [all q, all k, all v]; a LoRA B on query_key_value must be
    regrouped the same way).
Parameters are rounded to f16 and saved in f16; everything then runs in f32 on exactly those values.
A PEFT LoRA (r 4, alpha 8, all four linears, non-zero B) is saved in f32. For each model:
  1. base.gguf: llama.cpp's own convert_hf_to_gguf.py --outtype f32;
  2. ours.gguf: `qtune export --format gguf-lora --dtype f32` from the Hugging Face base;
  3. theirs.gguf: llama.cpp's convert_lora_to_gguf.py --outtype f32 on the same PEFT adapter
     (committed: llamacpp-lora-f32.gguf);
  4. merged.gguf: `qtune merge --type f32` of the adapter into the Hugging Face base (qtune's own
     HF -> GGUF conversion), and merged-gguf.gguf: `qtune merge` into base.gguf (llama.cpp's file);
  5. peft/: `qtune export --format peft` of theirs.gguf against base.gguf (the reverse reordering),
     loaded by PEFT on the Hugging Face base;
then llama.cpp (llama-cpp-python 0.3.16) logits of base+ours vs base+theirs (1e-5) and vs
transformers + PEFT f32 (1e-3); llama.cpp on both merged files vs transformers + PEFT (1e-3); PEFT
with the round-tripped adapter vs the original (1e-6). Also records transformers + PEFT greedy
`generate` (32 new tokens) for `qtune generate`.

Usage: python tests/reference/check_falcon_lora_llamacpp.py PATH/TO/qtune LLAMA_CPP_SRC [mq gqa]
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
from check_lora_llamacpp import greedy_reference, llama_logits, rel  # noqa: E402

FIX = os.path.join(HERE, "..", "fixtures")
OUT = os.path.join(FIX, "falcon_export")
# The Falcon fixtures' byte-level BPE tokenizer (vocab 300), which llama.cpp converts as gpt-2.
TOKENIZER = os.path.join(FIX, "falcon", "mq", "model")
SEED = 2468

COMMON = dict(vocab_size=300, hidden_size=128, num_hidden_layers=2, layer_norm_epsilon=1e-5,
              rope_theta=10000.0, alibi=False, bias=False, parallel_attn=True, tie_word_embeddings=True,
              attention_dropout=0.0, hidden_dropout=0.0, max_position_embeddings=128, bos_token_id=0,
              eos_token_id=0)
MODELS = {
    "mq": dict(COMMON, num_attention_heads=2, num_kv_heads=1, multi_query=True,
               new_decoder_architecture=False),
    "gqa": dict(COMMON, num_attention_heads=4, num_kv_heads=2, multi_query=False,
                new_decoder_architecture=True),
}
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
            target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])


def build(kind, d):
    """The Hugging Face model directory and the PEFT adapter directory of `kind` under `d`."""
    from transformers import FalconConfig, FalconForCausalLM
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(SEED)
    m = FalconForCausalLM(FalconConfig(**MODELS[kind])).to(torch.float32)
    assert m.config.ffn_hidden_size == 4 * m.config.hidden_size
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for mod in m.modules():  # non-trivial norms so a swapped or missing LayerNorm shows
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1.0 + 0.2 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))
        for p in m.parameters():
            # Larger than the 0.02 init so the logits have a spread and greedy decoding is decisive.
            p.copy_(p * 3.0 if p.dim() == 2 else p)
            p.copy_(p.half().float())
    model_dir = os.path.join(d, "model")
    m.half().save_pretrained(model_dir, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(os.path.join(TOKENIZER, f), model_dir)
    m = m.float()
    torch.manual_seed(SEED + 2)
    pm = get_peft_model(m, LoraConfig(**LORA))
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED + 3)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(os.path.join(d, "adapter"))
    return model_dir, os.path.join(d, "adapter")


def peft_model(model_dir, adapter):
    from transformers import FalconForCausalLM
    from peft import PeftModel
    m = FalconForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    return PeftModel.from_pretrained(m, adapter).eval()


def check(qtune, src, kind):
    d = os.path.join(OUT, kind)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model, adapter = build(kind, d)
    g = torch.Generator().manual_seed(SEED + 4)
    ids = torch.randint(1, COMMON["vocab_size"], (12,), generator=g).tolist()
    prompt = ids[:6]
    theirs = os.path.join(d, "llamacpp-lora-f32.gguf")

    def converter(script, argv):
        subprocess.run([sys.executable, "-c",
                        f"import sys; sys.path.insert(0, {HERE!r}); import check_lora_llamacpp as m; "
                        f"m.run_script({src!r}, {script!r}, {argv!r})"], check=True)

    def q(*args):
        subprocess.run([qtune, *args], check=True, stdout=subprocess.DEVNULL)

    with tempfile.TemporaryDirectory() as t:
        base = os.path.join(t, "base.gguf")
        ours = os.path.join(t, "ours.gguf")
        merged = os.path.join(t, "merged.gguf")
        merged_g = os.path.join(t, "merged-gguf.gguf")
        back = os.path.join(t, "peft")
        converter("convert_hf_to_gguf.py", [model, "--outtype", "f32", "--outfile", base])
        converter("convert_lora_to_gguf.py", ["--base", model, "--outtype", "f32", "--outfile", theirs, adapter])
        q("export", "--model", model, "--adapter", adapter, "--format", "gguf-lora", "--dtype", "f32", "--out", ours)
        q("merge", "--model", model, "--adapter", adapter, "--type", "f32", "--out", merged)
        q("merge", "--model", base, "--adapter", adapter, "--out", merged_g)
        q("export", "--model", base, "--adapter", theirs, "--format", "peft", "--out", back)
        l_ours = llama_logits(base, ids, ours)
        l_theirs = llama_logits(base, ids, theirs)
        l_merged = llama_logits(merged, ids)
        l_merged_g = llama_logits(merged_g, ids)
        l_base = llama_logits(base, ids)
        with torch.no_grad():
            l_back = peft_model(model, back)(torch.tensor([ids])).logits[0].numpy()
    pm = peft_model(model, adapter)
    with torch.no_grad():
        ref = pm(torch.tensor([ids])).logits[0].numpy()
    gen, margin = greedy_reference(pm, prompt)
    checks = {
        "ours_vs_llamacpp_converter": rel(l_ours, l_theirs),
        "ours_vs_transformers_peft": rel(l_ours, ref),
        "converter_vs_transformers_peft": rel(l_theirs, ref),
        "merged_hf_vs_transformers_peft": rel(l_merged, ref),
        "merged_gguf_vs_transformers_peft": rel(l_merged_g, ref),
        "peft_from_gguf_lora_vs_transformers_peft": rel(l_back, ref),
        "base_vs_lora_difference": rel(l_base, l_ours),
    }
    for k, v in checks.items():
        print(f"{kind} {k}: {v:.2e}")
    from safetensors.numpy import save_file
    save_file({"llamacpp_lora": l_ours, "llamacpp_converter_lora": l_theirs, "llamacpp_merged": l_merged,
               "llamacpp_merged_gguf": l_merged_g, "transformers_peft": ref},
              os.path.join(d, "logits.safetensors"))
    import llama_cpp, peft, transformers
    json.dump({"input_ids": ids, "gen_prompt": prompt, "gen_tokens": gen,
               "gen_min_top2_margin": margin, "checks": checks,
               "versions": {"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__, "peft": peft.__version__}},
              open(os.path.join(d, "expected.json"), "w"), indent=1)
    # The adapter's README is PEFT's model card: not needed by any test.
    readme = os.path.join(adapter, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    return (checks["ours_vs_llamacpp_converter"] < 1e-5 and checks["ours_vs_transformers_peft"] < 1e-3
            and checks["merged_hf_vs_transformers_peft"] < 1e-3
            and checks["merged_gguf_vs_transformers_peft"] < 1e-3
            and checks["peft_from_gguf_lora_vs_transformers_peft"] < 1e-6
            and checks["base_vs_lora_difference"] > 1e-2)


def main():
    qtune, src = sys.argv[1], sys.argv[2]
    kinds = sys.argv[3:] or list(MODELS)
    ok = all([check(qtune, src, k) for k in kinds])
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

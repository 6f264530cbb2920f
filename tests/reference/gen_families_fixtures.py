"""Reference fixtures for the Llama-family parity tests (issue 18 part 3): Llama 3 rotary scaling
(`rope_scaling` type llama3), Qwen2 (q/k/v biases, tied head), Mistral (sliding window) and a
SmolLM2-style Llama with a tied head (no lm_head.weight in the file).

Each family: a tiny random model made from a config by transformers (f32), saved as users get it
(`save_pretrained`), a PEFT LoRA on `all-linear` with a non-zero B, and the logits, loss and every
LoRA gradient of one padded batch. Each model directory gets gen_llama_fixtures.py's tokenizer. Modelled on gen_llama_fixtures.py (no quantised bases here).

Run: python tests/reference/gen_families_fixtures.py  (pinned stack in requirements.txt)
"""
import json
import os

import sys

import torch
from safetensors.torch import save_file

import transformers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)
import peft
from peft import LoraConfig, get_peft_model

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "families")
SEED = 4321
T = 12  # batch sequence length (below Mistral's window of 16)

COMMON = dict(vocab_size=300,  # gen_llama_fixtures.py's byte-level BPE tokenizer
              hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, torch_dtype="float32")

FAMILIES = {
    # Llama 3.1's rotary: head dim 8 -> 4 frequencies, wavelengths 6.3, 167, 4443, 118k; with
    # original 8192, low 1, high 4: two kept, one smoothed, one divided by the factor. (8192 is
    # Llama 3.1's value and the one llama.cpp's converter assumes: it does not read the key.)
    "llama3": (LlamaConfig, LlamaForCausalLM, dict(
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=16384,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192))),
    # Qwen2.5-0.5B-style: q/k/v biases, tied head, the sliding-window keys with the window off.
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        use_sliding_window=False, sliding_window=4096, max_window_layers=21)),
    # Mistral v0.1-style sliding window (16 here); the batch fits inside it.
    "mistral": (MistralConfig, MistralForCausalLM, dict(
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, sliding_window=16)),
    # SmolLM2-style: a Llama whose head is the embedding (no lm_head.weight in the file).
    "tied": (LlamaConfig, LlamaForCausalLM, dict(
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)),
}
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules="all-linear")


def batch():
    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(3, COMMON["vocab_size"], (2, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding on the second row
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :3] = -100  # prompt tokens excluded from the loss
    return ids, mask, labels


def build(name):
    cfg_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(SEED)
    model = model_cls(cfg_cls(**{**COMMON, **extra})).to(torch.float32)
    with torch.no_grad():  # transformers initialises biases to zero: make them count
        g = torch.Generator().manual_seed(SEED + 4)
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def run(name):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    model = build(name)
    model.save_pretrained(os.path.join(d, "model"), safe_serialization=True)
    # The Llama fixtures' tokenizer, so the models also run through the CLI (train, generate).
    sys.path.insert(0, os.path.dirname(__file__))
    from gen_llama_fixtures import tokenizer
    tokenizer(os.path.join(d, "model"))
    torch.manual_seed(SEED + 2)
    pm = get_peft_model(model, LoraConfig(**LORA))
    with torch.no_grad():  # non-zero B so every gradient path is exercised
        g = torch.Generator().manual_seed(SEED + 3)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ids, mask, labels = batch()
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    adapter0 = {n: p.detach().clone().contiguous() for n, p in pm.named_parameters() if p.requires_grad}
    grads = {n: p.grad.detach().clone().contiguous() for n, p in pm.named_parameters() if p.requires_grad}
    save_file({"logits": out.logits.detach().contiguous()}, os.path.join(d, "logits.safetensors"))
    save_file(grads, os.path.join(d, "grads.safetensors"))
    save_file(adapter0, os.path.join(d, "adapter_init.safetensors"))
    targets = sorted(pm.peft_config["default"].target_modules)
    meta = dict(loss=out.loss.item(), lora=LORA, peft_targets=targets,
                input_ids=ids.tolist(), attention_mask=mask.tolist(), labels=labels.tolist(),
                versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                              peft=peft.__version__))
    if name == "llama3":
        meta["inv_freq"] = model.model.rotary_emb.inv_freq.tolist()
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(name, "loss", out.loss.item(), "targets", targets)


def main():
    for name in FAMILIES:
        run(name)


if __name__ == "__main__":
    main()

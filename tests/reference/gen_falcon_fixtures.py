"""Reference fixtures for the Falcon + LoRA parity tests (issue 8: Falcon-7B, the second architecture).

Three tiny random FalconForCausalLM models built from a config, all with head counts and hidden sizes
that are not powers of two:
- `mq`: the Falcon-7B layout (new_decoder_architecture false, multi_query true, parallel_attn true,
  bias false, rotary, one shared input LayerNorm, num_kv_heads=1 as Falcon-7B implies), 3 heads of 64.
- `gqa`: the new decoder layout (Falcon-40B/180B) with grouped KV: 6 heads of 32 in 2 KV groups of
  3, ln_attn + ln_mlp.
- `seq`: the old layout without multi-query and with sequential attention then MLP (per-head fused
  qkv rows, post_attention_layernorm), linears with (randomised) bias; f32 and Q8_0 bases only.
Every parameter is rounded to f16 and the model is saved in f16 (half the fixture size); torch then
runs in f32 on exactly those values, as qtune does after reading the f16 file.
LayerNorm weights and biases are randomised so that a missing bias or a swapped norm shows.
PEFT LoRA on query_key_value, dense, dense_h_to_4h, dense_4h_to_h with non-zero B; logits, loss, every
LoRA gradient and the losses of 10 AdamW steps, on three bases: f32, and the decoder-layer linears
after Q8_0 (gguf-py) and NF4 double-quant (bitsandbytes) quantise->dequantise, so qtune's quantised
base is compared with PyTorch running on exactly the weights qtune sees. To keep fixtures small the
dequantised bases are not stored whole: `base_check.json` holds a fingerprint per linear (see below).

Run: python tests/reference/gen_falcon_fixtures.py [KIND..]  (pinned stack in requirements.txt)
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import transformers
from transformers import FalconConfig, FalconForCausalLM
import peft
from peft import LoraConfig, get_peft_model

from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import PreTrainedTokenizerFast

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "falcon")
SEED = 4321

COMMON = dict(
    vocab_size=300,  # = the tokenizer's vocabulary
    hidden_size=192,  # NF4 needs input features that are whole 64-blocks
    ffn_hidden_size=128,
    num_hidden_layers=2,
    layer_norm_epsilon=1e-5,
    rope_theta=10000.0,
    alibi=False,
    bias=False,
    parallel_attn=True,
    tie_word_embeddings=True,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    max_position_embeddings=128,
    bos_token_id=0,
    eos_token_id=0,
    torch_dtype="float32",
)
MODELS = {
    # Falcon-7B layout: fused qkv = [q heads..., k, v]
    "mq": dict(COMMON, num_attention_heads=3, num_kv_heads=1, multi_query=True,
               new_decoder_architecture=False),
    # Falcon-40B layout: fused qkv grouped by KV head: [q x (H/KVH), k, v] per group
    "gqa": dict(COMMON, num_attention_heads=6, num_kv_heads=2, multi_query=False,
                new_decoder_architecture=True),
    # Old layout without multi-query, sequential: per-head [q, k, v] fused rows, input_layernorm ->
    # attention -> residual -> post_attention_layernorm -> MLP, linears with bias. f32 and Q8_0 only
    # (NF4 needs 64-multiples of input features; this one stays small).
    "seq": dict(COMMON, hidden_size=96, ffn_hidden_size=64, num_attention_heads=3, multi_query=False,
                new_decoder_architecture=False, parallel_attn=False, bias=True),
}
TAGS = {"mq": ["f32", "q8_0", "nf4"], "gqa": ["f32", "q8_0", "nf4"], "seq": ["f32", "q8_0"]}
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
            target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
LR = 1e-2
STEPS = 10


def batch():
    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(1, COMMON["vocab_size"], (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding on the second row
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :3] = -100  # prompt tokens excluded from the loss
    return ids, mask, labels


def q8_0_roundtrip(w):
    import gguf
    from gguf import quants
    a = w.detach().numpy().astype(np.float32)
    q = quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).astype(np.float32))


def nf4_roundtrip(w):
    import bitsandbytes.functional as F
    q, st = F.quantize_4bit(w.detach().contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return F.dequantize_4bit(q, st, blocksize=64, quant_type="nf4").to(torch.float32)


def fingerprint(w):
    """sum(w[i] * (1 + i mod 7)) in f64 over the row-major f32 values, and the first 16 values."""
    a = w.detach().numpy().astype(np.float32).reshape(-1).astype(np.float64)
    k = 1.0 + (np.arange(a.size) % 7)
    return dict(weighted_sum=float((a * k).sum()), head=[float(x) for x in a[:16]])


def base_model(kind):
    torch.manual_seed(SEED)
    model = FalconForCausalLM(FalconConfig(**MODELS[kind])).to(torch.float32)
    g = torch.Generator().manual_seed(SEED + 7)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1.0 + 0.2 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))
            elif isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.copy_(0.05 * torch.randn(mod.bias.shape, generator=g))
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def build(kind, base_transform=None):
    model = base_model(kind)
    linears = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".h." in name:
                if base_transform is not None:
                    mod.weight.copy_(base_transform(mod.weight))
                linears[name + ".weight"] = fingerprint(mod.weight)
    torch.manual_seed(SEED + 2)
    pm = get_peft_model(model, LoraConfig(**LORA))
    with torch.no_grad():  # non-zero B so every gradient path is exercised from step 0
        g = torch.Generator().manual_seed(SEED + 3)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pm, linears


def run(kind, tag, base_transform=None):
    pm, linears = build(kind, base_transform)
    ids, mask, labels = batch()
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    d = os.path.join(OUT, kind, tag)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "base_check.json"), "w") as f:
        json.dump(linears, f, indent=1)
    adapter0 = {n: p.detach().clone().contiguous() for n, p in pm.named_parameters() if p.requires_grad}
    grads = {n: p.grad.detach().clone().contiguous() for n, p in pm.named_parameters() if p.requires_grad}
    save_file({"logits": out.logits.detach().contiguous()}, os.path.join(d, "logits.safetensors"))
    save_file(grads, os.path.join(d, "grads.safetensors"))
    save_file(adapter0, os.path.join(d, "adapter_init.safetensors"))
    if tag == "f32" and kind == "mq":  # one PEFT directory is enough for the round-trip test
        pm.save_pretrained(os.path.join(d, "adapter"))
    pm.zero_grad()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        l = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        losses.append(l.item())
        l.backward()
        opt.step()
    meta = dict(loss=out.loss.item(), losses=losses, lr=LR, steps=STEPS, lora=LORA,
                input_ids=ids.tolist(), attention_mask=mask.tolist(), labels=labels.tolist(),
                versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__))
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(kind, tag, "loss", out.loss.item(), "last", losses[-1])


TEXT = ["the quick brown fox jumps over the lazy dog", "a small falcon for a quantised test",
        "qtune trains adapters on quantised weights", "hello world, this is qtune"] * 20


def tokenizer(d):
    """Falcon-style byte-level BPE tokenizer.json: no BOS, `<|endoftext|>` as EOS (llama.cpp: gpt-2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=COMMON["vocab_size"], special_tokens=["<|endoftext|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, tr)
    assert tok.get_vocab_size() == COMMON["vocab_size"], tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(d)


def main():
    kinds = sys.argv[1:] or list(MODELS)
    transforms = {"f32": None, "q8_0": q8_0_roundtrip, "nf4": nf4_roundtrip}
    for kind in kinds:
        model = base_model(kind).half()
        model.save_pretrained(os.path.join(OUT, kind, "model"), safe_serialization=True)
        tokenizer(os.path.join(OUT, kind, "model"))
        for tag in TAGS[kind]:
            run(kind, tag, transforms[tag])


if __name__ == "__main__":
    sys.exit(main())

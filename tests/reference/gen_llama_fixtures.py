"""Reference fixtures for the Llama + LoRA parity tests (issue: Llama on a quantised base with LoRA).

Builds a tiny random LlamaForCausalLM from a config (GQA, untied lm_head, f32), attaches a PEFT LoRA
on all linear layers with non-zero B, and records logits, loss, every LoRA gradient and the losses of
10 AdamW steps, for three bases: the f32 weights, and the same weights after Q8_0 (gguf-py) and
NF4 double-quant (bitsandbytes) quantise->dequantise, so qtune's quantised base can be checked against
PyTorch running on exactly the weights qtune sees.

Run: python tests/reference/gen_llama_fixtures.py  (pinned stack in requirements.txt)
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import transformers
from transformers import LlamaConfig, LlamaForCausalLM
import peft
from peft import LoraConfig, get_peft_model

from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import PreTrainedTokenizerFast

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "llama")
SEED = 1234

CFG = dict(
    vocab_size=300,  # = the tokenizer's vocabulary (256 bytes + merges + 3 specials)
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
    torch_dtype="float32",
)
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
LR = 1e-2
STEPS = 10


def batch():
    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(3, CFG["vocab_size"], (2, 12), generator=g)
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


def build(base_transform=None):
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).to(torch.float32)
    if base_transform is not None:
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                    mod.weight.copy_(base_transform(mod.weight))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(SEED + 2)
    pm = get_peft_model(model, LoraConfig(**LORA))
    with torch.no_grad():  # non-zero B so every gradient path is exercised from step 0
        g = torch.Generator().manual_seed(SEED + 3)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pm, base_state


def run(tag, base_transform=None):
    pm, base_state = build(base_transform)
    ids, mask, labels = batch()
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    d = os.path.join(OUT, tag)
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in base_state.items()}, os.path.join(d, "base_dequantized.safetensors"))
    adapter0 = {n: p.detach().clone().contiguous() for n, p in pm.named_parameters() if p.requires_grad}
    grads = {n: p.grad.detach().clone().contiguous() for n, p in pm.named_parameters() if p.requires_grad}
    save_file({"logits": out.logits.detach().contiguous()}, os.path.join(d, "logits.safetensors"))
    save_file(grads, os.path.join(d, "grads.safetensors"))
    save_file(adapter0, os.path.join(d, "adapter_init.safetensors"))
    pm.save_pretrained(os.path.join(d, "adapter"))
    # 10 AdamW steps on the same batch: PyTorch defaults (betas 0.9/0.999, eps 1e-8), weight decay 0.
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
    print(tag, "loss", out.loss.item(), "last", losses[-1])


TEXT = ["the quick brown fox jumps over the lazy dog", "a small model for a quantised test",
        "qtune trains adapters on quantised weights", "hello world, this is qtune"] * 20


def tokenizer(d):
    """A byte-level BPE tokenizer.json trained offline (llama.cpp calls this pre-tokenizer gpt-2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=CFG["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, tr)
    assert tok.get_vocab_size() == CFG["vocab_size"], tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(d)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).to(torch.float32)
    model.save_pretrained(os.path.join(OUT, "model"), safe_serialization=True)
    tokenizer(os.path.join(OUT, "model"))
    run("f32")
    run("q8_0", q8_0_roundtrip)
    run("nf4", nf4_roundtrip)


if __name__ == "__main__":
    sys.exit(main())

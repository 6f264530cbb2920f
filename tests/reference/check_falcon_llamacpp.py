"""External check: a GGUF written by `qtune quantize` from a Hugging Face Falcon directory loads in
llama.cpp (through llama-cpp-python) and computes the logits transformers computes.

Builds two tiny random FalconForCausalLM (the Falcon-7B multi-query layout, and the new decoder
layout with grouped KV; ffn 4 x hidden, as llama.cpp's Falcon graph reads it from metadata), with a
byte-level BPE tokenizer, runs `qtune quantize --type <t>` on each, loads the GGUF with llama.cpp and
compares its logits with transformers' on the weights the GGUF holds (gguf-py's dequantisation, qkv
rows put back into Hugging Face's KV-group order). llama.cpp quantises activations to 8 bits when
weights are quantised (~1e-2, FIELD-NOTES).

Usage: python tests/reference/check_falcon_llamacpp.py PATH/TO/qtune [f32 q8_0 ...]
Needs: requirements.txt plus llama-cpp-python==0.3.16.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import FalconConfig, FalconForCausalLM, PreTrainedTokenizerFast

TEXT = ["the quick brown fox jumps over the lazy dog", "a small falcon for a quantised test",
        "llama dot cpp reads what we write", "hello world, this is qtune"] * 20

LAYOUTS = {
    "mq": dict(num_attention_heads=3, num_kv_heads=1, multi_query=True, new_decoder_architecture=False),
    "gqa": dict(num_attention_heads=6, num_kv_heads=2, multi_query=False, new_decoder_architecture=True),
}


def make_dir(d, layout):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, tr)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(d)
    cfg = FalconConfig(vocab_size=tok.get_vocab_size(), hidden_size=192, num_hidden_layers=2,
                       layer_norm_epsilon=1e-5, alibi=False, bias=False, parallel_attn=True,
                       bos_token_id=0, eos_token_id=0, **LAYOUTS[layout])
    torch.manual_seed(11)
    m = FalconForCausalLM(cfg).to(torch.float32)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():  # non-trivial norms so a swapped or missing LayerNorm shows
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1.0 + 0.2 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))
    m.save_pretrained(d, safe_serialization=True)
    return fast


def hf_name(name, cfg):
    fixed = {"token_embd.weight": "transformer.word_embeddings.weight",
             "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias"}
    if name in fixed:
        return fixed[name]
    _, i, kind, suffix = name.split(".")
    two = cfg.new_decoder_architecture
    blk = {"attn_norm": "ln_mlp" if two else "input_layernorm", "attn_norm_2": "ln_attn",
           "attn_qkv": "self_attention.query_key_value", "attn_output": "self_attention.dense",
           "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}
    return f"transformer.h.{i}.{blk[kind]}.{suffix}"


def ungroup(w, cfg):
    """llama.cpp's [all q, all k, all v] rows back to Hugging Face's per-KV-group [q.., k, v]."""
    h = cfg.num_attention_heads
    kv = cfg.num_kv_heads if cfg.new_decoder_architecture else 1
    hd = cfg.hidden_size // h
    q = w[: h * hd].reshape(kv, h // kv, hd, -1)
    k = w[h * hd: (h + kv) * hd].reshape(kv, 1, hd, -1)
    v = w[(h + kv) * hd:].reshape(kv, 1, hd, -1)
    return np.concatenate([q, k, v], axis=1).reshape(w.shape)


def load_gguf_weights(m, path):
    import gguf
    from gguf import quants
    r = gguf.GGUFReader(path)
    sd = m.state_dict()
    with torch.no_grad():
        for t in r.tensors:
            w = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            w = w.reshape([int(x) for x in reversed(t.shape)])
            if ".attn_qkv." in t.name:
                w = ungroup(w, m.config)
            hf = hf_name(t.name, m.config)
            sd[hf].copy_(torch.from_numpy(np.ascontiguousarray(w)).reshape(sd[hf].shape))


def main():
    qtune = sys.argv[1]
    qtypes = sys.argv[2:] or ["q8_0", "q4_0"]
    from llama_cpp import Llama
    worst = {}
    with tempfile.TemporaryDirectory() as d:
        for layout in LAYOUTS:
            hf = os.path.join(d, layout)
            fast = make_dir(hf, layout)
            ids = fast("the lazy fox reads what we write")["input_ids"]
            for qt in qtypes:
                out = os.path.join(d, f"{layout}-{qt}.gguf")
                subprocess.run([qtune, "quantize", "--model", hf, "--type", qt, "--out", out], check=True,
                               stdout=subprocess.DEVNULL)
                m = FalconForCausalLM.from_pretrained(hf, torch_dtype=torch.float32)
                load_gguf_weights(m, out)
                with torch.no_grad():
                    ref = m(torch.tensor([ids])).logits[0].numpy()
                llm = Llama(model_path=out, logits_all=True, n_ctx=64, verbose=False)
                llm.eval(ids)
                got = np.array(llm.scores[: len(ids)], dtype=np.float32)
                rel = float(np.abs(got - ref).max() / np.abs(ref).max())
                print(f"{layout} {qt}: llama.cpp vs transformers logits, max abs diff / max |logit| = "
                      f"{rel:.2e} ({len(ids)} tokens, vocab {ref.shape[1]})")
                worst[qt] = max(worst.get(qt, 0.0), rel)
    ok = all(v < (1e-3 if q in ("f32", "f16") else 5e-2) for q, v in worst.items())
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

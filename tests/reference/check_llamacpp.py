"""External check: a GGUF written by `qtune quantize` from a Hugging Face Llama directory loads in
llama.cpp (through llama-cpp-python) and computes the logits transformers computes.

Builds a tiny random LlamaForCausalLM (GQA) with a small byte-level BPE tokenizer, saves it as a
Hugging Face directory, runs `qtune quantize --type <t>` on it, loads the GGUF with llama.cpp and
compares its logits with transformers' on the weights the GGUF holds, as gguf-py's reader and
dequantiser see them (Q/K rows un-permuted back to Hugging Face's layout). What is left is
llama.cpp's own 8-bit activation quantisation (~1e-2, FIELD-NOTES).

Usage: python tests/reference/check_llamacpp.py PATH/TO/qtune [q8_0|q4_0|f32...]
Needs: requirements.txt plus llama-cpp-python==0.3.16 (builds llama.cpp from source).
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TEXT = ["the quick brown fox jumps over the lazy dog", "a small model for a quantised test",
        "llama dot cpp reads what we write", "hello world, this is qtune"] * 20


def make_dir(d):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, tr)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(d)
    # Rows of 256 so every matrix takes K-quants too (no fallback); head_dim 64.
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(7)
    m = LlamaForCausalLM(cfg).to(torch.float32)
    m.save_pretrained(d, safe_serialization=True)
    return fast


HF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
BLK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
       "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
       "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def unpermute(w, n_head):
    # Inverse of llama.cpp's converter permutation of Q/K rows (pairs of rotary halves, per head).
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_weights(m, path):
    """Put the weights llama.cpp will see (gguf-py's dequantisation of our file) into the HF model."""
    import gguf
    from gguf import quants
    r = gguf.GGUFReader(path)
    cfg = m.config
    sd = m.state_dict()
    with torch.no_grad():
        for t in r.tensors:
            w = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            w = w.reshape([int(x) for x in reversed(t.shape)]) if w.ndim != len(t.shape) else w
            name = t.name
            if name in HF_NAMES:
                hf = HF_NAMES[name]
            else:
                _, i, kind, _ = name.split(".")
                hf = f"model.layers.{i}.{BLK[kind]}.weight"
                if kind == "attn_q":
                    w = unpermute(w, cfg.num_attention_heads)
                elif kind == "attn_k":
                    w = unpermute(w, cfg.num_key_value_heads)
            sd[hf].copy_(torch.from_numpy(np.ascontiguousarray(w)).reshape(sd[hf].shape))


def main():
    qtune = sys.argv[1]
    qtypes = sys.argv[2:] or ["q8_0"]
    from llama_cpp import Llama
    worst = 0.0
    with tempfile.TemporaryDirectory() as d:
        hf = os.path.join(d, "hf")
        fast = make_dir(hf)
        ids = fast("the lazy fox reads what we write")["input_ids"]
        for qt in qtypes:
            out = os.path.join(d, f"m-{qt}.gguf")
            subprocess.run([qtune, "quantize", "--model", hf, "--type", qt, "--out", out], check=True)
            m = LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32)
            load_gguf_weights(m, out)
            with torch.no_grad():
                ref = m(torch.tensor([ids])).logits[0].numpy()
            llm = Llama(model_path=out, logits_all=True, n_ctx=64, verbose=False)
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)], dtype=np.float32)
            rel = np.abs(got - ref).max() / np.abs(ref).max()
            print(f"{qt}: llama.cpp vs transformers logits, max abs diff / max |logit| = {rel:.2e} "
                  f"({len(ids)} tokens, vocab {ref.shape[1]})")
            worst = max(worst, rel)
    # llama.cpp quantises activations to 8 bits when weights are quantised (~2e-2, FIELD-NOTES).
    ok = worst < 5e-2
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

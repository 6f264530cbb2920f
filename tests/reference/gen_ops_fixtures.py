"""Reference fixtures for qtune's fused ops (src/nn/fused.rs) from torch 2.5.1 autograd and
transformers 4.46.3: RMSNorm, rotary embeddings (HF half-rotation and Meta's interleaved complex
form), causal GQA attention with transformers' 4-D padding mask, chunked cross-entropy against
F.cross_entropy(reduction="sum") with an f32 and a Q8_0 (gguf-py) lm_head.

Run: /work/venv-ref/bin/python tests/reference/gen_ops_fixtures.py  (writes tests/fixtures/ops/*.safetensors)
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "ops")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(1234)


def save(name, tensors, meta):
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(OUT, f"{name}.safetensors"), metadata={"json": json.dumps(meta)})


# 1. RMSNorm: y = w * (x * rsqrt(mean(x^2) + eps)); dx from autograd with a random upstream dy.
def rms_norm():
    C, eps = 64, 1e-5
    x = (torch.randn(2, 5, C) * 1.7 + 0.3).requires_grad_()
    norm = LlamaRMSNorm(C, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.2 * torch.randn(C))
    y = norm(x)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    t = {"x": x, "w": norm.weight, "y": y, "dy": dy, "dx": x.grad}
    # bf16 activations and weight, as transformers runs a bf16 model (math in f32 inside).
    norm16 = LlamaRMSNorm(C, eps=eps).to(torch.bfloat16)
    with torch.no_grad():
        norm16.weight.copy_(norm.weight.to(torch.bfloat16))
    x16 = x.detach().to(torch.bfloat16)
    t.update({"x_bf16": x16, "w_bf16": norm16.weight, "y_bf16": norm16(x16)})
    save("rms_norm", t, {"eps": eps})


# 2. Rotary embeddings. Tables from transformers' LlamaRotaryEmbedding; half-rotation through
# apply_rotary_pos_emb; interleaved pairs as Meta's llama reference does it (complex multiply).
def rope():
    B, H, T, D, theta = 2, 4, 7, 16, 10000.0
    cfg = LlamaConfig(hidden_size=H * D, num_attention_heads=H, rope_theta=theta, max_position_embeddings=4096)
    emb = LlamaRotaryEmbedding(config=cfg)
    x = torch.randn(B, H, T, D).requires_grad_()
    pos = torch.arange(T)[None, :]
    cos, sin = emb(x, pos)  # (1, T, D)
    y, _ = apply_rotary_pos_emb(x, x, cos, sin)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    dx = x.grad.clone()

    xi = x.detach().clone().requires_grad_()
    # Meta's freqs_cis = polar(1, angle), built from the exact tables rather than recomputed angles
    freqs = torch.complex(cos[0, :, : D // 2], sin[0, :, : D // 2])
    xc = torch.view_as_complex(xi.reshape(B, H, T, D // 2, 2))
    yi = torch.view_as_real(xc * freqs).reshape(B, H, T, D)
    (yi * dy).sum().backward()

    # long tables: every position up to 1023 for head dim 32 (rounding of p * inv_freq matters there)
    T2, D2 = 1024, 32
    cfg2 = LlamaConfig(hidden_size=4 * D2, num_attention_heads=4, rope_theta=theta, max_position_embeddings=4096)
    emb2 = LlamaRotaryEmbedding(config=cfg2)
    cos2, sin2 = emb2(torch.zeros(1, dtype=torch.float32), torch.arange(T2)[None, :])
    save(
        "rope",
        {
            "x": x, "cos": cos[0], "sin": sin[0], "y": y, "dy": dy, "dx": dx,
            "y_interleaved": yi, "dx_interleaved": xi.grad,
            "cos_long": cos2[0], "sin_long": sin2[0], "inv_freq_long": emb2.inv_freq,
        },
        {"theta": theta, "T_long": T2, "D_long": D2},
    )


# 3. Causal GQA attention with a (B, T) key mask, through transformers' own 4-D mask builder and the
# SDPA call LlamaSdpaAttention makes on CPU (no unmasking of fully masked rows there); gradients
# from the eager path (see below).
def attention():
    B, Hq, Hkv, T, D = 2, 4, 2, 7, 16
    cases = {
        "right": ((B, Hq, Hkv, T, D), torch.tensor([[1] * T, [1] * 5 + [0] * 2])),
        "left": ((B, Hq, Hkv, T, D), torch.tensor([[1] * T, [0] * 3 + [1] * 4])),
        "none": ((B, Hq, Hkv, T, D), None),
        # several 64-row query blocks (the last one partial), one KV head for four query heads
        "long": ((1, 4, 1, 150, 8), torch.tensor([[1] * 130 + [0] * 20])),
    }
    t = {}
    for name, ((B, Hq, Hkv, T, D), mask) in cases.items():
        q = torch.randn(B, Hq, T, D)
        k = torch.randn(B, Hkv, T, D)
        v = torch.randn(B, Hkv, T, D)
        if mask is None:
            causal = None
        else:
            causal = LlamaModel._prepare_4d_causal_attention_mask_with_cache_position(
                mask, T, T, torch.float32, torch.device("cpu"), torch.arange(T), B
            )
        do = torch.randn(B, Hq, T, D)
        # transformers' default (sdpa) path and its eager path, each with autograd
        grads = {}
        for path in ["sdpa", "eager"]:
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            kr, vr = repeat_kv(kg, Hq // Hkv), repeat_kv(vg, Hq // Hkv)
            if path == "sdpa":
                o = F.scaled_dot_product_attention(qg, kr, vr, attn_mask=causal, is_causal=causal is None)
            else:
                s = qg @ kr.transpose(2, 3) / D**0.5
                s = s + (causal if causal is not None else torch.full((T, T), float("-inf")).triu(1))
                o = torch.softmax(s, dim=-1, dtype=torch.float32) @ vr
            (o * do).sum().backward()
            grads[path] = (o.detach(), qg.grad, kg.grad, vg.grad)
        (o_s, *g_s), (o_e, *g_e) = grads["sdpa"], grads["eager"]
        assert torch.allclose(o_s, o_e, atol=1e-5), name
        # Both paths agree on every gradient except where a query row sees no key (left padding):
        # there torch's CPU SDPA backward gives T times the gradient of the uniform softmax that
        # its own forward computes; eager autograd is the true gradient of that forward, so the
        # reference takes eager's. (Such rows never receive a gradient in training: their labels
        # are -100 and no query attends their keys.)
        for a, b in zip(g_s, g_e):
            if name != "left":
                assert torch.allclose(a, b, atol=1e-5), name
        assert name != "left" or not torch.allclose(g_s[0], g_e[0], atol=1e-5)
        dq, dk, dv = g_e
        t.update({f"{name}.q": q, f"{name}.k": k, f"{name}.v": v, f"{name}.o": o_s, f"{name}.do": do,
                  f"{name}.dq": dq, f"{name}.dk": dk, f"{name}.dv": dv})
        if mask is not None:
            t[f"{name}.mask"] = mask.to(torch.float32)
        # transformers' additive 4-D mask (B, 1, T, T) for this key mask (all ones for "none")
        t[f"{name}.bias"] = LlamaModel._prepare_4d_causal_attention_mask_with_cache_position(
            mask if mask is not None else torch.ones(B, T, dtype=torch.long),
            T, T, torch.float32, torch.device("cpu"), torch.arange(T), B,
        )
    save("attention", t, {"B": B, "Hq": Hq, "Hkv": Hkv, "T": T, "D": D})


# 4. Cross-entropy through an lm_head W (V, C): sum over tokens whose label != -100.
def cross_entropy():
    import gguf
    N, C, V = 13, 64, 300
    labels = torch.randint(0, V, (N,))
    labels[[0, 5, 6, 12]] = -100
    w = torch.randn(V, C) * 0.2
    w_q8 = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    w_q8_deq = torch.from_numpy(gguf.quants.dequantize(w_q8, gguf.GGMLQuantizationType.Q8_0).copy())
    t = {"labels": labels, "w": w, "w_q8_0": torch.from_numpy(np.ascontiguousarray(w_q8)).reshape(-1)}
    for name, weight in [("f32", w), ("q8_0", w_q8_deq)]:
        h = (torch.randn(N, C) * 1.5).requires_grad_()
        loss = F.cross_entropy(h @ weight.T, labels, reduction="sum", ignore_index=-100)
        g = 0.7  # upstream gradient of the summed loss
        (loss * g).backward()
        t.update({f"{name}.h": h, f"{name}.loss": loss.reshape(1), f"{name}.dh": h.grad})
    # an lm_head with a bias (f32 weight)
    bias = torch.randn(V) * 0.5
    h = (torch.randn(N, C) * 1.5).requires_grad_()
    loss = F.cross_entropy(h @ w.T + bias, labels, reduction="sum", ignore_index=-100)
    (loss * 0.7).backward()
    t.update({"bias": bias, "f32_bias.h": h, "f32_bias.loss": loss.reshape(1), "f32_bias.dh": h.grad})
    save("cross_entropy", t, {"N": N, "C": C, "V": V, "upstream": 0.7, "n_tokens": int((labels != -100).sum())})


rms_norm()
rope()
attention()
cross_entropy()
print("wrote", sorted(os.listdir(OUT)))

"""Reference fixture for qtune's fused attention at the shapes its bf16 block products tile
(src/nn/fused/attention_products.rs: AMX tiles of 16 rows x 32 bf16, AVX-512 BF16 at the edges),
from torch 2.5.1 autograd with transformers 4.46.3's additive 4-D mask:

- q, k, v and the upstream gradient do are drawn in f32 and rounded to bf16 (stored as bf16), so
  that qtune's bf16 step (which holds them in bf16) and its f32 step read the same values;
- o, dq, dk, dv are torch's eager attention on those values in float64 (the exact answer),
  stored as f32: qtune's f32 products must match them to f32 error, its bf16 products (P and dS
  rounded to bf16, as flash attention does in half precision) to bf16 error.

Shape: B=2, Hq=4, Hkv=2 (GQA), T=100 (a full 64-row query block and a partial one), D=32 (one
AMX tile of pairs; the probability products run over several). Batch row 0 is left-padded by 3 (rows that see no key at all), row 1
right-padded by 10.

Run: /work/venvs/ref/bin/python tests/reference/gen_attention_bf16_fixture.py
     (writes tests/fixtures/ops/attention_bf16.safetensors; requirements.txt pins the stack)
"""
import json
import os

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaModel, repeat_kv

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "ops")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(2026)
assert LlamaConfig  # the stack's pin: the mask helper below is transformers 4.46's

B, Hq, Hkv, T, D = 2, 4, 2, 100, 32
mask = torch.tensor([[0] * 3 + [1] * (T - 3), [1] * (T - 10) + [0] * 10])
bias = LlamaModel._prepare_4d_causal_attention_mask_with_cache_position(
    mask, T, T, torch.float32, torch.device("cpu"), torch.arange(T), B
)


def bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


q, k, v, do = bf16(B, Hq, T, D), bf16(B, Hkv, T, D), bf16(B, Hkv, T, D), bf16(B, Hq, T, D)
qg, kg, vg = (t.double().requires_grad_() for t in (q, k, v))
kr, vr = repeat_kv(kg, Hq // Hkv), repeat_kv(vg, Hq // Hkv)
# eager attention: the true gradient where a row sees no key (see gen_ops_fixtures.py)
s = qg @ kr.transpose(2, 3) / D**0.5 + bias.double()
o = torch.softmax(s, dim=-1) @ vr
(o * do.double()).sum().backward()
t = {
    "q": q, "k": k, "v": v, "do": do, "mask": mask.to(torch.float32), "bias": bias,
    "o": o.detach().float(), "dq": qg.grad.float(), "dk": kg.grad.float(), "dv": vg.grad.float(),
}
t = {n: x.detach().contiguous() for n, x in t.items()}
save_file(t, os.path.join(OUT, "attention_bf16.safetensors"),
          metadata={"json": json.dumps({"B": B, "Hq": Hq, "Hkv": Hkv, "T": T, "D": D})})
print("wrote attention_bf16.safetensors")

"""Reference fixture for qtune's fused SwiGLU gate (src/nn/fused/swiglu.rs) from torch 2.5.1
autograd: y = F.silu(g) * u, as transformers' LlamaMLP computes it, with dg and du for a random
upstream dy; in f32 and in bf16 (torch's own bf16 CPU kernels: silu rounded, then the product).
Values of g span the sigmoid's tails (|g| up to ~12).

Run: /work/venvs/ref/bin/python tests/reference/gen_swiglu_fixture.py
     (writes tests/fixtures/ops/swiglu.safetensors; requirements.txt pins the stack)
"""
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "ops")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(4321)

tensors = {}
for dtype, tag in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
    g0 = torch.randn(3, 7, 96) * 4.0
    g0[0, 0, :8] = torch.tensor([-12.0, -8.0, -3.0, -0.5, 0.0, 0.5, 3.0, 12.0])
    u0 = torch.randn(3, 7, 96) * 1.5
    dy = torch.randn(3, 7, 96).to(dtype)
    g = g0.to(dtype).requires_grad_()
    u = u0.to(dtype).requires_grad_()
    y = F.silu(g) * u
    y.backward(dy)
    tensors.update({
        f"{tag}.g": g.detach(), f"{tag}.u": u.detach(), f"{tag}.dy": dy,
        f"{tag}.y": y.detach(), f"{tag}.dg": g.grad, f"{tag}.du": u.grad,
    })

save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "swiglu.safetensors"),
          metadata={"json": json.dumps({"torch": torch.__version__})})
print("wrote", os.path.join(OUT, "swiglu.safetensors"))

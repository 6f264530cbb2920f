"""Reference fixture for qtune's fused exact GELU (src/nn/fused/gelu.rs) from torch 2.5.1
autograd: y = nn.GELU()(x) (approximate='none', as transformers' Falcon MLP runs it) and dx for a
random upstream dy, in f32 and in bf16 (torch's own CPU kernels: f32 math rounded once), plus the
same computed in f64 from the same inputs (`*.y64`, `*.dx64`) to tell torch's own rounding apart
from ours.

Inputs: a dense grid over [-10, 10], random N(0, 3²) values, values near 0 (down to 1e-30 and
signed zeros), the tails where erf saturates in f32 (|x| in 3..6.5, where 1 + erf(x/√2) cancels on
the negative side) and large |x| (up to 1e4).

Run: /work/venvs/ref/bin/python tests/reference/gen_gelu_fixture.py
     (writes tests/fixtures/ops/gelu.safetensors; requirements.txt pins the stack)
"""
import json
import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "ops")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(2718)

near0 = [0.0, -0.0, 1e-30, -1e-30, 1e-12, -1e-12, 1e-6, -1e-6, 1e-3, -1e-3, 0.03, -0.03]
large = [20.0, -20.0, 100.0, -100.0, 1e4, -1e4, 9.0, -9.0]
x0 = torch.cat([
    torch.linspace(-10.0, 10.0, 401),
    torch.randn(387) * 3.0,
    torch.tensor(near0 + large),
    -torch.linspace(3.0, 6.5, 108),  # the negative tail: y tiny, 1 + erf cancels
    torch.linspace(3.0, 6.5, 108),   # the positive tail: erf -> 1, y -> x
]).reshape(8, 128)
dy0 = torch.randn(8, 128)

gelu = torch.nn.GELU()  # approximate='none'
tensors = {}
for dtype, tag in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
    x = x0.to(dtype).detach().clone().requires_grad_()
    dy = dy0.to(dtype)
    y = gelu(x)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    y64 = gelu(x64)
    y64.backward(dy.double())
    tensors.update({
        f"{tag}.x": x.detach(), f"{tag}.dy": dy, f"{tag}.y": y.detach(), f"{tag}.dx": x.grad,
        f"{tag}.y64": y64.detach(), f"{tag}.dx64": x64.grad,
    })

save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "gelu.safetensors"),
          metadata={"json": json.dumps({"torch": torch.__version__})})
print("wrote", os.path.join(OUT, "gelu.safetensors"))

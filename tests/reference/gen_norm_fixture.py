"""Reference fixture for qtune's fused norms with their residual adds (src/nn/fused/residual.rs)
from torch 2.5.1 autograd and transformers 4.46.3, in f32 and in bf16 (torch's own CPU kernels
and roundings in each dtype; the weight and bias held in the dtype, as a model in it holds them):

- `ln`: torch's `nn.LayerNorm(C)` alone: y = LN(x), dx for an upstream dy;
- `add_ln`, `add_rms`: a sequential block's two residual adds around its second norm (transformers'
  LlamaDecoderLayer with LlamaRMSNorm, or FalconDecoderLayer without parallel attention with
  nn.LayerNorm): h = x + a; y = norm(h); out = h + r, with the loss Σ y·dy + Σ out·dout, so that
  h's gradient is the norm's input gradient plus the residual path's; y, out, dx, da, dr, and the
  norm's input gradient alone (`dh_norm`: torch.autograd.grad of y with respect to h);
- `par`: a parallel block's output out = x + (m + a) (transformers' Falcon: `mlp_output +=
  attention_output`, then `residual + mlp_output`).

Shapes (rows, C): (5, 77) (C odd, not a multiple of the kernels' eight lanes) and (2, 3, 136).
Rows carry an offset (row 0 at 30x the scale) so that LayerNorm's centring matters.

Run: /work/venvs/ref/bin/python tests/reference/gen_norm_fixture.py
     (writes tests/fixtures/ops/norm_residual.safetensors; requirements.txt pins the stack)
"""
import json
import os

import torch
from safetensors.torch import save_file
from transformers.models.llama.modeling_llama import LlamaRMSNorm

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "ops")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(1234)
EPS = 1e-5

SHAPES = {"s0": (5, 77), "s1": (2, 3, 136)}


def loss_of(outs, grads):
    return sum((o.float() * g.float()).sum() for o, g in zip(outs, grads))


tensors = {}
for sname, shape in SHAPES.items():
    c = shape[-1]
    x0 = torch.randn(shape) * 1.5 + 0.7
    x0.view(-1, c)[0] *= 30.0
    a0 = torch.randn(shape)
    r0 = torch.randn(shape)
    dy0 = torch.randn(shape)
    dout0 = torch.randn(shape)
    w0 = 1.0 + 0.2 * torch.randn(c)
    b0 = 0.1 * torch.randn(c)
    for dtype, tag in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
        pre = f"{tag}.{sname}"
        x, a, r = (t.to(dtype).requires_grad_() for t in (x0, a0, r0))
        dy, dout = dy0.to(dtype), dout0.to(dtype)
        ln = torch.nn.LayerNorm(c, eps=EPS).to(dtype)
        rms = LlamaRMSNorm(c, eps=EPS).to(dtype)
        with torch.no_grad():
            ln.weight.copy_(w0.to(dtype))
            ln.bias.copy_(b0.to(dtype))
            rms.weight.copy_(w0.to(dtype))
        for p in list(ln.parameters()) + list(rms.parameters()):
            p.requires_grad_(False)
        tensors.update({f"{pre}.{n}": t.detach() for n, t in
                        [("x", x), ("a", a), ("r", r), ("dy", dy), ("dout", dout)]})
        tensors[f"{pre}.w"] = ln.weight.detach().clone()
        tensors[f"{pre}.b"] = ln.bias.detach().clone()

        # LayerNorm alone
        y = ln(x)
        (dx,) = torch.autograd.grad(loss_of([y], [dy]), [x])
        tensors.update({f"{pre}.ln.y": y.detach(), f"{pre}.ln.dx": dx})

        # the sequential block's adds around its second norm
        for kind, norm in [("add_ln", ln), ("add_rms", rms)]:
            h = x + a
            y = norm(h)
            out = h + r
            dx, da, dr = torch.autograd.grad(loss_of([y, out], [dy, dout]), [x, a, r])
            hl = h.detach().requires_grad_()
            (dh_norm,) = torch.autograd.grad(loss_of([norm(hl)], [dy]), [hl])
            tensors.update({
                f"{pre}.{kind}.y": y.detach(), f"{pre}.{kind}.out": out.detach(),
                f"{pre}.{kind}.dx": dx, f"{pre}.{kind}.da": da, f"{pre}.{kind}.dr": dr,
                f"{pre}.{kind}.dh_norm": dh_norm,
            })

        # the parallel block's output: residual + (mlp_output + attention_output), r as the MLP's
        m = r.detach().clone()
        m += a.detach()
        tensors[f"{pre}.par.out"] = (x.detach() + m).detach()

save_file({k: v.contiguous().clone() for k, v in tensors.items()},
          os.path.join(OUT, "norm_residual.safetensors"),
          metadata={"json": json.dumps({"torch": torch.__version__, "eps": EPS})})
print("wrote", os.path.join(OUT, "norm_residual.safetensors"), len(tensors), "tensors")

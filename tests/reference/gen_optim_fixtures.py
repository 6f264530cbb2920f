"""Ground truth for qtune's AdamW, gradient clipping and LR schedules (tests/optim.rs).

torch 2.5.1 `torch.optim.AdamW(foreach=False)` (the single-tensor path, torch's default on CPU) on a
few random parameters with a fixed sequence of random gradients, its LR driven by transformers
4.46.3's schedulers; `torch.nn.utils.clip_grad_norm_`; and the schedulers' LR values.

Also the blockwise 8-bit AdamW of bitsandbytes 0.47.0 (`AdamW8bit`, whose CUDA kernel
`kOptimizerStatic8bit2StateBlockwise` has no CPU version): its step written out in numpy float32
(`adamw8bit_step`), with the moments quantised and dequantised by bnb's own
`functional.quantize_blockwise` / `dequantize_blockwise` in blocks of 256, the first moment with
`create_dynamic_map(signed=True)`, the second with `create_dynamic_map(signed=False)`.
Writes tests/fixtures/optim/{<case>.safetensors, cases.json}.
"""
import json
import math
import os

import bitsandbytes
import bitsandbytes.functional as BF
import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "optim")
SHAPES = {"layers.0.q.lora_A.weight": (4, 16), "layers.0.q.lora_B.weight": (24, 4), "bias": (7,), "tiny": (3,)}
# Gradient scale per parameter: "tiny"'s gradients are ~1e-8, so sqrt(v_hat) ~ eps and eps matters.
GSCALE = {"tiny": 1e-8}
STEPS = 5
SCHEDULERS = {"constant": get_constant_schedule_with_warmup, "linear": get_linear_schedule_with_warmup,
              "cosine": get_cosine_schedule_with_warmup}


def make_sched(kind, opt, warmup, total):
    if kind == "constant":
        return get_constant_schedule_with_warmup(opt, warmup)
    return SCHEDULERS[kind](opt, warmup, total)


def adamw_case(name, seed, lr, betas, eps, wd, sched, warmup, bf16_values=False):
    g = torch.Generator().manual_seed(seed)
    init = {n: torch.randn(s, generator=g) * 0.3 for n, s in SHAPES.items()}
    grads = [{n: torch.randn(s, generator=g) * (0.1 * (k + 1)) * GSCALE.get(n, 1.0) for n, s in SHAPES.items()}
             for k in range(STEPS)]
    if bf16_values:  # what a bf16 parameter and its bf16 gradient can hold
        init = {n: t.bfloat16().float() for n, t in init.items()}
        grads = [{n: t.bfloat16().float() for n, t in gr.items()} for gr in grads]
    params = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    sch = make_sched(sched, opt, warmup, STEPS)
    out = {f"init/{n}": t for n, t in init.items()}
    lrs = []
    for k in range(STEPS):
        lrs.append(sch.get_last_lr()[0])
        for n, p in params.items():
            # The last parameter gets no gradient at step 1: torch skips it (its step count stays).
            p.grad = None if (n == "bias" and k == 1) else grads[k][n].clone()
            out[f"grad{k}/{n}"] = grads[k][n]
        opt.step()
        sch.step()
        for n, p in params.items():
            out[f"param{k}/{n}"] = p.detach().clone()
    for n, p in params.items():
        st = opt.state[p]
        out[f"exp_avg/{n}"] = st["exp_avg"].clone()
        out[f"exp_avg_sq/{n}"] = st["exp_avg_sq"].clone()
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, f"{name}.safetensors"))
    return dict(name=name, lr=lr, betas=list(betas), eps=eps, weight_decay=wd, schedule=sched,
                warmup=warmup, total=STEPS, lrs=lrs, steps=STEPS, bf16_values=bf16_values,
                skipped={"bias": 1})


def clip_case(name, seed, max_norm):
    g = torch.Generator().manual_seed(seed)
    grads = {n: torch.randn(s, generator=g) * 0.4 for n, s in SHAPES.items()}
    params = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in SHAPES.items()}
    for n, p in params.items():
        p.grad = grads[n].clone()
    total = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
    out = {f"grad/{n}": t for n, t in grads.items()}
    out.update({f"clipped/{n}": p.grad for n, p in params.items()})
    save_file(out, os.path.join(OUT, f"{name}.safetensors"))
    return dict(name=name, max_norm=max_norm, total_norm=total.item())


BLOCK8 = 256  # bnb's block for blockwise optimizers (Optimizer2State.init_state)
SMAP = BF.create_dynamic_map(signed=True)  # entry 0 is -0.99296875, as the kernel's map
UMAP = BF.create_dynamic_map(signed=False)


def q8(x, code):
    """bnb's quantize_blockwise of float32 `x` with `code`: (codes, absmax per block).

    Given float64, bnb's CPU op takes its generic path: absmax per block, x * (1 / absmax), and the
    argmin over |x - code| (the nearest code). Its float32 path (C++ `quantize_cpu`) first sets
    code[0] = -1.0 in place, which suits the signed map of its 4-bit double quant but would make
    the unsigned map unable to hold 0; the optimizer kernel searches the map as given.
    """
    q, st = BF.quantize_blockwise(torch.from_numpy(x.astype(np.float64)), code=code.clone(),
                                  blocksize=BLOCK8)
    return q.numpy(), st.absmax.numpy()


def dq8(codes, absmax, code):
    """bnb's dequantize_blockwise: code[c] * absmax of the block, in float32."""
    return BF.dequantize_blockwise(torch.from_numpy(codes), absmax=torch.from_numpy(absmax),
                                   code=code, blocksize=BLOCK8).numpy()


def adamw8bit_step(p, g, st, t, lr, b1, b2, eps, wd):
    """One step of bnb's blockwise 8-bit Adam kernel (optimizer "adam", decoupled weight decay) on
    float32 numpy arrays, in the kernel's order: dequantise, update both moments, update the
    parameter from the unquantised moments, decay it, requantise (the first moment's code moved one
    step when its sign differs from the moment's). Scalars in float64, rounded to float32 once."""
    f = np.float32
    m = dq8(st["c1"], st["a1"], SMAP)
    v = dq8(st["c2"], st["a2"], UMAP)
    v = v * f(b2) + f(1 - b2) * g * g
    m = m * f(b1) + f(1 - b1) * g
    bc1 = 1 - b1 ** t
    bc2s = math.sqrt(1 - b2 ** t)
    p = (p + f(-lr * bc2s / bc1) * (m / (np.sqrt(v) + f(bc2s * eps)))) * f(1 - lr * wd)
    c1, a1 = q8(m, SMAP)
    smap = SMAP.numpy()
    flip = np.signbit(smap[c1]) != np.signbit(m)
    c1 = np.where(flip & (m > 0), c1 + np.uint8(1), np.where(flip, c1 - np.uint8(1), c1)).astype(np.uint8)
    c2, a2 = q8(v, UMAP)
    return p.astype(np.float32), dict(c1=c1, a1=a1, c2=c2, a2=a2), m, v


def adamw8bit_case(name, seed, lrs, betas, eps, wd):
    """A parameter of 4323 elements (not a multiple of 256) with 8-bit moments, and one of 63
    (below min_8bit_size 4096, so bnb keeps f32 state: here torch's AdamW, as qtune does)."""
    g = torch.Generator().manual_seed(seed)
    big, small = (33, 131), (7, 9)
    init = {"big": torch.randn(big, generator=g) * 0.3, "small": torch.randn(small, generator=g) * 0.3}
    grads = []
    for k in range(len(lrs)):
        gb = torch.randn(big, generator=g) * (0.05 * (k + 1))
        gb[:, :3] = 0.0  # zero moments: code 0.0 in both maps
        gb[:, 3] *= 1e-7  # tiny next to the block's absmax: exercises the sign fix-up
        grads.append({"big": gb, "small": torch.randn(small, generator=g) * 0.1})
    out = {f"init/{n}": t for n, t in init.items()}
    out["map/signed"], out["map/unsigned"] = SMAP.clone(), UMAP.clone()
    p = init["big"].numpy().reshape(-1).copy()
    nb = -(-p.size // BLOCK8)
    # bnb's zero-initialised state buffers.
    st = dict(c1=np.zeros(p.size, np.uint8), a1=np.zeros(nb, np.float32),
              c2=np.zeros(p.size, np.uint8), a2=np.zeros(nb, np.float32))
    sp = torch.nn.Parameter(init["small"].clone())
    opt = torch.optim.AdamW([sp], lr=lrs[0], betas=betas, eps=eps, weight_decay=wd, foreach=False)
    for k, lr in enumerate(lrs):
        gk = grads[k]["big"].numpy().reshape(-1)
        p, st, m, v = adamw8bit_step(p, gk, st, k + 1, lr, betas[0], betas[1], eps, wd)
        for group in opt.param_groups:
            group["lr"] = lr
        sp.grad = grads[k]["small"].clone()
        opt.step()
        out[f"grad{k}/big"], out[f"grad{k}/small"] = grads[k]["big"], grads[k]["small"]
        out[f"param{k}/big"] = torch.from_numpy(p.reshape(big).copy())
        out[f"param{k}/small"] = sp.detach().clone()
        for key in ("c1", "a1", "c2", "a2"):
            out[f"{key}_{k}/big"] = torch.from_numpy(st[key].copy())
    # The last step's moments before requantisation (what updated the parameter).
    out["exp_avg/big"], out["exp_avg_sq/big"] = torch.from_numpy(m.copy()), torch.from_numpy(v.copy())
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, f"{name}.safetensors"))
    return dict(name=name, lrs=lrs, betas=list(betas), eps=eps, weight_decay=wd, steps=len(lrs),
                block=BLOCK8)


def schedule_values():
    res = []
    for kind in SCHEDULERS:
        for warmup, total in [(3, 10), (0, 7), (4, 4)]:
            p = torch.nn.Parameter(torch.zeros(1))
            opt = torch.optim.AdamW([p], lr=2e-4)
            sch = make_sched(kind, opt, warmup, total)
            lrs = []
            for _ in range(total + 3):  # past the end too
                lrs.append(sch.get_last_lr()[0])
                opt.step()
                sch.step()
            res.append(dict(kind=kind, base_lr=2e-4, warmup=warmup, total=total, lrs=lrs))
    return res


def main():
    os.makedirs(OUT, exist_ok=True)
    cases = [
        adamw_case("adamw_wd0", 1, 1e-2, (0.9, 0.999), 1e-8, 0.0, "linear", 2),
        adamw_case("adamw_wd", 2, 3e-3, (0.9, 0.95), 1e-6, 0.1, "cosine", 1),
        # beta1 < 0.5: torch's lerp takes its other branch.
        adamw_case("adamw_beta1_low", 6, 5e-3, (0.4, 0.99), 1e-8, 0.05, "linear", 0),
        adamw_case("adamw_bf16", 3, 1e-2, (0.9, 0.999), 1e-8, 0.01, "constant", 0, bf16_values=True),
    ]
    clips = [clip_case("clip_active", 4, 1.0), clip_case("clip_inactive", 5, 1000.0)]
    eight = [adamw8bit_case("adamw8bit", 7, [1e-2, 8e-3, 5e-3, 3e-3, 1e-3], (0.9, 0.95), 1e-8, 0.1),
             adamw8bit_case("adamw8bit_wd0", 8, [2e-3] * 3, (0.9, 0.999), 1e-6, 0.0)]
    meta = dict(adamw=cases, clip=clips, schedules=schedule_values(), adamw8bit=eight,
                versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                              bitsandbytes=bitsandbytes.__version__))
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print("wrote", OUT)


if __name__ == "__main__":
    main()

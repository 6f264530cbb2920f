"""Ground truth for qtune's AdamW, gradient clipping and LR schedules (tests/optim.rs).

torch 2.5.1 `torch.optim.AdamW(foreach=False)` (the single-tensor path, torch's default on CPU) on a
few random parameters with a fixed sequence of random gradients, its LR driven by transformers
4.46.3's schedulers; `torch.nn.utils.clip_grad_norm_`; and the schedulers' LR values.
Writes tests/fixtures/optim/{<case>.safetensors, cases.json}.
"""
import json
import os

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
    meta = dict(adamw=cases, clip=clips, schedules=schedule_values(),
                versions=dict(torch=torch.__version__, transformers=transformers.__version__))
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print("wrote", OUT)


if __name__ == "__main__":
    main()

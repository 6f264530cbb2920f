#!/usr/bin/env python3
"""qtune vs PyTorch + PEFT: one LoRA training step on the same shape, measured the same way.

Each tool runs in its own fresh process; both are timed per step (forward, backward with gradient
checkpointing, AdamW) after warm-up, and both report their whole process's peak RSS (VmHWM, the
same /proc counter), both with glibc's default allocator settings, as users run them (pinning the
mmap threshold low made RSS follow live bytes but slowed both tools: every large tensor took
fresh pages; --pin-mmap restores that mode for both). PyTorch runs in f32: torch's bf16 matmul has
no fast path on this kind of CPU (docs/BENCHMARKS.md).

With --device cuda both run on the GPU: qtune in bf16 on its quantised weights, PyTorch + PEFT on a
bf16 base with SDPA attention (the issue's comparison); step times are taken after
torch.cuda.synchronize(), and memory is each tool's peak of allocated device bytes (qtune: its
memory pool's high-water mark; PyTorch: max_memory_allocated) plus what was in use on the device
before the model existed (context, cuBLAS).

Writes OUT/compare.json, OUT/compare.md (one table with both tools and the ratios) and
OUT/compare.png (bar chart). Pinned requirements: benches/compare/requirements.txt.

    python benches/compare/compare.py --shape benches/compare/llama-100m.json --quant q4_0 \
        --seq-len 256 --batch-size 1 --rank 16 --targets all-linear --steps 3 --warmup 1 \
        --qtune target/release/qtune --out bench-out
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# The named shapes `qtune bench` knows (same values as src/train/bench/shapes.rs, from the published configs).
SHAPES = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       rope_theta=1e6),
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def torch_child(a):
    """Runs in a fresh process: build, warm up, time; print one JSON object."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(a.seed)
    cuda = a.device.startswith("cuda")
    # the base's dtype; PEFT makes the LoRA matrices in f32 either way (the default dtype below)
    dtype = torch.bfloat16 if a.torch_dtype == "bf16" else torch.float32
    dev = torch.device(a.device)
    if cuda:
        torch.cuda.init()
        torch.empty(1, device=dev)  # the context
        free, total = torch.cuda.mem_get_info(dev)
        gpu_baseline = total - free
        torch.cuda.reset_peak_memory_stats(dev)
    if a.shape in SHAPES:
        cfg = LlamaConfig(rms_norm_eps=1e-5, tie_word_embeddings=False, **SHAPES[a.shape])
    else:
        cfg = LlamaConfig.from_json_file(a.shape)
    cfg._attn_implementation = "sdpa"
    baseline = status_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    torch.set_default_dtype(dtype)
    with dev:
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    targets = ALL_LINEAR if a.targets == ["all-linear"] else a.targets
    lcfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    setup_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len), generator=g).to(dev)

    def step():
        if cuda:
            torch.cuda.synchronize(dev)
        s0, c0 = time.perf_counter(), time.process_time()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if cuda:
            torch.cuda.synchronize(dev)
        return loss, time.perf_counter() - s0, time.process_time() - c0

    for i in range(a.warmup):
        _, s, _ = step()
        print(f"[torch] warm-up step {i + 1}/{a.warmup}: {s:.2f} s", file=sys.stderr)
    times, losses, cpu = [], [], []
    for i in range(a.steps):
        l, s, c = step()
        cpu.append(c)
        print(f"[torch] timed step {i + 1}/{a.steps}: {s:.2f} s, loss {l:.4f}", file=sys.stderr)
        times.append(s)
        losses.append(l)
    med = statistics.median(times)
    gpu = None
    if cuda:
        gpu = {"baseline_used_bytes": gpu_baseline,
               "peak_allocated_bytes": torch.cuda.max_memory_allocated(dev),
               "peak_reserved_bytes": torch.cuda.max_memory_reserved(dev),
               "device_peak_bytes": gpu_baseline + torch.cuda.max_memory_allocated(dev),
               "name": torch.cuda.get_device_name(dev)}
    print(json.dumps({
        "gpu": gpu,
        "tool": "pytorch+peft",
        "measured_peak_bytes": status_bytes("VmHWM:"),
        "baseline_bytes": baseline,
        "step_time_s": med,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "tokens_per_s": a.batch_size * a.seq_len / med,
        "losses": losses,
        "step_cpu_s": cpu,
        "tokens_per_cpu_s": a.batch_size * a.seq_len / sorted(cpu)[len(cpu) // 2],
        "setup_s": setup_s,
        "lora_params": sum(p.numel() for p in params),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
        "dtype": a.torch_dtype,
        "threads": torch.get_num_threads(),
    }))


def run(cmd, env):
    print("$ " + " ".join(cmd), file=sys.stderr)
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed with status {p.returncode}")
    return json.loads(p.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", required=True, help="a named shape or a config.json path")
    ap.add_argument("--quant", default="q4_0", help="qtune's weight type")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: both tools on the GPU in bf16")
    ap.add_argument("--torch-dtype", choices=["f32", "bf16"],
                    help="PyTorch's base weights (default: f32 on the CPU, bf16 on a GPU); the "
                         "LoRA matrices stay f32 as PEFT makes them")
    ap.add_argument("--qtune-dtype", help="qtune bench's --dtype (default: qtune's own, `auto`; "
                                          "bf16 on a GPU)")
    ap.add_argument("--pin-mmap", action="store_true",
                    help="run both tools with MALLOC_MMAP_THRESHOLD_=65536 (RSS = live bytes, slower)")
    ap.add_argument("--qtune", default="target/release/qtune", help="the qtune binary")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.targets = a.targets.split(",")
    if a.torch_dtype is None:
        a.torch_dtype = "bf16" if a.device.startswith("cuda") else "f32"
    if a.torch_child:
        return torch_child(a)
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ)
    if a.pin_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    common = ["--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--rank",
              str(a.rank), "--targets", ",".join(a.targets), "--steps", str(a.steps),
              "--warmup", str(a.warmup), "--seed", str(a.seed)]
    cuda = a.device.startswith("cuda")
    extra = ["--device", a.device] if cuda else []
    if a.qtune_dtype or cuda:
        extra += ["--dtype", a.qtune_dtype or "bf16"]
    q = run([a.qtune, "bench", "--shape", a.shape, "--quant", a.quant, "--json"] + common + extra,
            env)
    t = run([sys.executable, os.path.abspath(__file__), "--torch-child", "--shape", a.shape,
             "--device", a.device, "--torch-dtype", a.torch_dtype] + common, env)
    gib = 1 << 30
    mem_rows = [("peak RSS (GiB)", q["measured_peak_bytes"] / gib, t["measured_peak_bytes"] / gib)]
    if cuda:
        mem_rows = [
            ("device peak (GiB)", q["gpu"]["device_peak_bytes"] / gib,
             t["gpu"]["device_peak_bytes"] / gib),
            ("peak allocated (GiB)", q["gpu"]["peak_allocated_bytes"] / gib,
             t["gpu"]["peak_allocated_bytes"] / gib),
        ] + [("host peak RSS (GiB)",) + mem_rows[0][1:]]
    rows = mem_rows + [
        ("step time, median (s)", q["step_time_s"], t["step_time_s"]),
        ("tokens/s", q["tokens_per_s"], t["tokens_per_s"]),
        ("tokens per CPU-second", q["tokens_per_cpu_s"], t["tokens_per_cpu_s"]),
        ("trainable LoRA params", q["config"]["lora_params"], t["lora_params"]),
    ]
    name = os.path.basename(a.shape)
    where = t["gpu"]["name"] if cuda else f"{q['config']['threads']} threads"
    title = (f"{name}, seq {a.seq_len} x batch {a.batch_size}, LoRA r{a.rank} on "
             f"{','.join(a.targets)}, {where}")
    dt, tdt = q["config"].get("dtype", "f32"), t["dtype"]
    md = [f"**{title}**: qtune {a.quant.upper()} weights, {dt} compute; PyTorch {t['versions']['torch']} "
          f"+ PEFT {t['versions']['peft']} on a {tdt} base (LoRA f32); both with gradient checkpointing and AdamW, "
          f"{a.warmup} warm-up + {a.steps} timed steps.", "",
          "| | qtune | PyTorch + PEFT | qtune / PyTorch |", "|---|---:|---:|---:|"]
    for label, x, y in rows:
        fmt = (lambda v: f"{v:,.0f}") if "params" in label else (lambda v: f"{v:.3f}")
        md.append(f"| {label} | {fmt(x)} | {fmt(y)} | {x / y:.2f}x |")
    if cuda:
        pa, pr = q["gpu"]["peak_allocated_bytes"], q["gpu"]["predicted_allocated_bytes"]
        md.append(f"| qtune predicted allocated (GiB) | {pr / gib:.3f} | | "
                  f"measured/predicted {pa / pr:.3f} |")
    else:
        md.append(f"| qtune predicted peak (GiB) | {q['predicted_peak_bytes'] / gib:.3f} | | "
                  f"measured/predicted {q['measured_peak_bytes'] / q['predicted_peak_bytes']:.3f} |")
    md.append(f"| qtune MFU (of {q['peak_gflops']:.0f} GFLOP/s {q.get('peak_kind', dt)}) | {100 * q['mfu']:.1f} % | | |")
    text = "\n".join(md) + "\n"
    with open(os.path.join(a.out, "compare.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "compare.json"), "w") as f:
        json.dump({"qtune": q, "pytorch_peft": t, "args": vars(a)}, f, indent=2)
    print(text)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = ["#2a7ab0", "#d9822b"]
    picked = [rows[0], rows[len(mem_rows) + 1], rows[len(mem_rows) + 2]]
    for ax, (label, x, y) in zip(axes, picked):
        bars = ax.bar(["qtune " + a.quant.upper(), f"PyTorch+PEFT {tdt}"], [x, y], color=colors)
        ax.bar_label(bars, fmt="%.2f")
        lower = "RSS" in label or "GiB" in label
        ax.set_title(label + (" (lower is better)" if lower else " (higher is better)"))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "compare.png"), dpi=110)


if __name__ == "__main__":
    main()

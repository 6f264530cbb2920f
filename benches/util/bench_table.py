#!/usr/bin/env python3
"""Prints the markdown tables of docs/BENCHMARKS.md from criterion's JSON output.

usage: bench_table.py CRITERION_DIR [CRITERION_DIR ...]   (e.g. $CARGO_TARGET_DIR/criterion)
Later directories override earlier ones for the same benchmark id. Uses the mean estimate.
"""
import json, sys, pathlib

rows = {}
for d in sys.argv[1:]:
    for b in pathlib.Path(d).glob("**/new/benchmark.json"):
        meta = json.loads(b.read_text())
        est = json.loads((b.parent / "estimates.json").read_text())
        ns = est["mean"]["point_estimate"]
        lo, hi = est["mean"]["confidence_interval"]["lower_bound"], est["mean"]["confidence_interval"]["upper_bound"]
        tp = meta.get("throughput") or {}
        rows[meta["full_id"]] = (meta["group_id"], meta.get("function_id"), meta.get("value_str"), ns, lo, hi, tp)

def rate(ns, tp):
    n = tp.get("Bytes") or tp.get("Elements") or 0
    return n / ns  # per ns == G per s

bw = {}
print("### Bandwidth\n\n| case | time (ms) | GB/s |\n|---|---:|---:|")
for k, (g, f, v, ns, lo, hi, tp) in sorted(rows.items()):
    if g == "bandwidth":
        bw[f] = rate(ns, tp)
        print(f"| {f} | {ns/1e6:.1f} | {rate(ns, tp):.1f} |")
read_bw = bw.get("read_sum_1GiB")

print("\n### Dequantisation (input = stored bytes; f32 out = 4 bytes per element)\n")
print("| type | threads | in GB/s | f32 out GB/s | in, % of read bandwidth |\n|---|---:|---:|---:|---:|")
import re
BS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
      "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
      "Q5_K": (256, 176), "Q6_K": (256, 210)}
for k, (g, f, v, ns, lo, hi, tp) in sorted(rows.items(), key=lambda r: (r[1][2] or "", r[1][1] or "")):
    if g == "dequant":
        r = rate(ns, tp)
        bs, ts = BS[v]
        out = r / ts * bs * 4
        pct = f"{100*r/read_bw:.0f} %" if read_bw else "-"
        print(f"| {v} | {f.split('thread')[0]} | {r:.2f} | {out:.2f} | {pct} |")

print("\n### Matmul GFLOP/s (2·M·N·K / time)\n")
mm = {}
for k, (g, f, v, ns, lo, hi, tp) in rows.items():
    if g == "matmul":
        mm[(f, v)] = (rate(ns, tp), ns)
labels = sorted({v for (_, v) in mm}, key=lambda s: (s.split("/")[0], int(s.split("/")[1].split("x")[0]) if "x" in s.split("/")[1] else 0, int(s.split("M")[-1])))
print("| type/W (N×K)/M | qtune fwd | qtune bwd_input | candle fwd default | candle fwd native | fwd ours/candle-native | dense f32 gemm (same shape) |")
print("|---|---:|---:|---:|---:|---:|---:|")
for v in labels:
    if v.count("/") != 2:
        continue
    shape_m = v.split("/", 1)[1]
    def g_(f):
        x = mm.get((f, v))
        return f"{x[0]:.1f}" if x else "-"
    d = mm.get(("dense_f32_gemm", shape_m))
    ours, cn = mm.get(("qtune_fwd", v)), mm.get(("candle_fwd_native", v))
    ratio = f"{ours[0]/cn[0]:.2f}" if ours and cn else "-"
    print(f"| {v} | {g_('qtune_fwd')} | {g_('qtune_bwd_input')} | {g_('candle_fwd_default')} | {g_('candle_fwd_native')} | {ratio} | {f'{d[0]:.1f}' if d else '-'} |")

# Count first: the floor of each forward matmul from bytes of W over the measured read bandwidth and
# from flops over the f32 FMA peak (PEAK_GFLOPS, default 2 cores x 32 flop/cycle x 2.6 GHz).
import os
measured_peak = next((rate(r[3], r[6]) for r in rows.values() if r[0] == "peak"), None)
peak = float(os.environ.get("PEAK_GFLOPS", measured_peak or 2 * 32 * 2.6))
if measured_peak:
    print(f"\n### f32 FMA peak (measured, AVX-512, all threads): {measured_peak:.0f} GFLOP/s")
print(f"\n### Count first (read bandwidth {read_bw or 0:.1f} GB/s, f32 FMA peak {peak:.0f} GFLOP/s)\n")
print("| type/W (N×K)/M | W MB | GFLOP | floor bw (ms) | floor FMA (ms) | floor (ms) | qtune fwd (ms) | % of floor | qtune bwd_input (ms) | % of floor |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for v in labels:
    if v.count("/") != 2 or ("qtune_fwd", v) not in mm:
        continue
    t, shape, mstr = v.split("/")
    n, k = map(int, shape.split("x")); m = int(mstr[1:])
    bs, ts = BS[t]
    wb = n * k / bs * ts
    fl = 2 * m * n * k
    fb = wb / read_bw / 1e6 if read_bw else 0.0
    fc = fl / peak / 1e6
    floor = max(fb, fc)
    cells = []
    for f in ("qtune_fwd", "qtune_bwd_input"):
        x = mm.get((f, v))
        cells += [f"{x[1]/1e6:.2f}", f"{100*floor/(x[1]/1e6):.0f} %"] if x else ["-", "-"]
    print(f"| {v} | {wb/1e6:.1f} | {fl/1e9:.3f} | {fb:.2f} | {fc:.2f} | {floor:.2f} | " + " | ".join(cells) + " |")

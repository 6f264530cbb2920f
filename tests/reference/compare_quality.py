"""Compares two `qtune train` runs' metrics.jsonl (f32 against bf16): issue 15's quality bar.

"Over 100 steps of the ~100M shape on real text, the bf16 loss curve within 1 % of f32's."
Prints, for the train loss: the per-step relative difference |bf16 - f32| / f32 (max, mean,
the step of the max), the same for the curve smoothed by a mean over windows of W steps (non-
overlapping, and a trailing moving mean), the first/last losses; and every eval loss side by side.
Exit status 0 when the smoothed curves agree within the tolerance, 1 otherwise.

Run: python tests/reference/compare_quality.py A/metrics.jsonl B/metrics.jsonl [--window 10] [--tol 0.01]
Standard library only.
"""
import argparse
import json
import statistics


def read(path):
    """(train {step: loss}, eval {step: eval_loss}) from a metrics.jsonl."""
    train, evals = {}, {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not JSON ({e})")
            if "eval_loss" in row:
                evals[row["step"]] = row["eval_loss"]
            elif "loss" in row:
                train[row["step"]] = row["loss"]
    return train, evals


def rel(a, b):
    return abs(b - a) / abs(a)


def summary(name, ref, test):
    d = [rel(a, b) for a, b in zip(ref, test)]
    i = max(range(len(d)), key=d.__getitem__)
    print(f"{name:<34} max {100 * d[i]:7.3f} % (point {i + 1})   mean {100 * statistics.mean(d):7.3f} %")
    return max(d)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("f32")
    ap.add_argument("bf16")
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--tol", type=float, default=0.01)
    args = ap.parse_args()
    (ta, ea), (tb, eb) = read(args.f32), read(args.bf16)
    steps = sorted(set(ta) & set(tb))
    if not steps:
        raise SystemExit(f"no common train steps in {args.f32} and {args.bf16}")
    if set(ta) != set(tb):  # a run still going or cut short: compare the steps both have
        print(f"note: {len(ta)} steps in {args.f32}, {len(tb)} in {args.bf16}; comparing the "
              f"{len(steps)} both have")
    a = [ta[s] for s in steps]
    b = [tb[s] for s in steps]
    w = args.window

    print(f"{len(steps)} steps; train loss f32 {a[0]:.4f} -> {a[-1]:.4f}, bf16 {b[0]:.4f} -> {b[-1]:.4f}")
    print(f"{'step':>5} {'f32':>9} {'bf16':>9} {'rel %':>8}")
    for s, x, y in zip(steps, a, b):
        if s <= 5 or s % 10 == 0:
            print(f"{s:>5} {x:9.4f} {y:9.4f} {100 * rel(x, y):8.3f}")
    print()
    raw = summary("per step", a, b)
    blocks = range(0, len(a) - w + 1, w)
    wa = [statistics.mean(a[i:i + w]) for i in blocks]
    wb = [statistics.mean(b[i:i + w]) for i in blocks]
    win = summary(f"mean over windows of {w} ({len(wa)})", wa, wb)
    ma = [statistics.mean(a[i - w + 1:i + 1]) for i in range(w - 1, len(a))]
    mb = [statistics.mean(b[i - w + 1:i + 1]) for i in range(w - 1, len(b))]
    mov = summary(f"trailing moving mean of {w}", ma, mb)
    print(f"{'windows of ' + str(w):<34} f32 " + " ".join(f"{x:.3f}" for x in wa))
    print(f"{'':<34} bf16 " + " ".join(f"{x:.3f}" for x in wb))

    print()
    print(f"{'eval step':>9} {'f32':>9} {'bf16':>9} {'diff':>8} {'rel %':>8}")
    for s in sorted(set(ea) & set(eb)):
        print(f"{s:>9} {ea[s]:9.4f} {eb[s]:9.4f} {eb[s] - ea[s]:+8.4f} {100 * rel(ea[s], eb[s]):8.3f}")

    ok = max(win, mov) <= args.tol
    print()
    print(f"verdict (smoothed curves within {100 * args.tol:g} %): {'PASS' if ok else 'FAIL'}; "
          f"per-step within {100 * args.tol:g} %: {'yes' if raw <= args.tol else 'no'}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

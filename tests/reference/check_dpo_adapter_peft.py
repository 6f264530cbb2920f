"""Loads the adapters qtune's DPO runs wrote into PEFT 0.13.2 and computes TRL 0.12.2's DPO loss.

Usage: QTUNE_DPO_PEFT_CHECK_DIR=/tmp/dpocheck cargo test --release --test dpo_trl
       python tests/reference/check_dpo_adapter_peft.py /tmp/dpocheck
Each `<arch>_<tag>/` there is the adapter qtune saved after the 6 steps of tests/dpo_trl.rs.
`PeftModel.from_pretrained` loads it onto the same base TRL trained on (f32, or the quantised-
dequantised weights of the tag), and gen_dpo_fixtures.final_losses runs TRL's own DPO loss over
the 8 pairs. The mean must equal TRL's post-training loss (`final_mean_loss` of expected.json,
from TRL's own adapter) within 1e-4 relative, as qtune's own eval of it does.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_dpo_fixtures as g  # noqa: E402


def main(root):
    # The committed model directory gen_dpo_fixtures.llama_model_dir() wrote (not rewritten here).
    g.ARCHS["llama"]["model_dir"] = os.path.join(g.OUT, "llama", "model")
    ok = True
    for name in sorted(os.listdir(root)):
        arch, tag = name.split("_", 1)
        d = os.path.join(g.OUT, arch, tag)
        want = json.load(open(os.path.join(d, "expected.json")))
        rows = [json.loads(line) for line in open(os.path.join(g.OUT, want["data"]))]
        tok = g.tokenizer(arch)
        base_tag = "f32" if tag.startswith("f32") else tag
        recs = g.final_losses(arch, base_tag, os.path.join(root, name), tok, rows)
        got = sum(r["loss"] for r in recs) / len(recs)
        rel = abs(got - want["final_mean_loss"]) / abs(want["final_mean_loss"])
        good = rel < 1e-4
        ok &= good
        print(f"{name}: PEFT + TRL loss of qtune's adapter {got:.7f}, TRL's own {want['final_mean_loss']:.7f}, "
              f"rel {rel:.2e} {'ok' if good else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1])

"""Loads adapter directories qtune saved into PEFT 0.13.2 and checks PEFT sees the same weights.

Usage: QTUNE_PEFT_CHECK_DIR=/tmp/peftcheck cargo test --test adapter_peft export_for_peft_check
       python tests/reference/check_peft_adapter.py /tmp/peftcheck
qtune's test saved the f32 fixture adapter (tests/fixtures/llama/f32/adapter, written by PEFT) with
A * 0.5 and B * -2, as f32 (`f32/`) and bf16 (`bf16/`). Here PEFT loads each onto the tiny model in
tests/fixtures/llama/model; its LoRA weights must equal those expected values exactly (bf16: the
bf16 rounding of them), its scaling must be alpha/r, and a forward must match one computed with the
original adapter's weights substituted by hand.
"""
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures", "llama")


def main(root):
    orig = load_file(os.path.join(FIX, "f32", "adapter", "adapter_model.safetensors"))
    ok = True
    for tag, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        d = os.path.join(root, tag)
        base = LlamaForCausalLM.from_pretrained(os.path.join(FIX, "model"), torch_dtype=torch.float32)
        pm = PeftModel.from_pretrained(base, d)
        cfg = pm.peft_config["default"]
        assert cfg.r == 4 and cfg.lora_alpha == 8 and cfg.task_type == "CAUSAL_LM", cfg
        params = {n.replace(".default", ""): p for n, p in pm.named_parameters() if "lora_" in n}
        assert set(params) == set(orig), (set(params) ^ set(orig))
        worst = 0.0
        for n, p in params.items():
            k = 0.5 if "lora_A" in n else -2.0
            want = (orig[n] * k).to(dtype).to(torch.float32)
            got = p.detach().to(torch.float32)
            if not torch.equal(got, want):
                worst = max(worst, (got - want).abs().max().item())
                ok = False
        scalings = {m.scaling["default"] for m in pm.modules() if hasattr(m, "scaling") and "default" in m.scaling}
        assert scalings == {2.0}, scalings
        # Forward with the loaded adapter vs the base with the expected deltas merged by hand.
        ids = torch.arange(12).reshape(1, 12) * 7 % 300
        with torch.no_grad():
            y = pm(input_ids=ids).logits
            ref = LlamaForCausalLM.from_pretrained(os.path.join(FIX, "model"), torch_dtype=torch.float32)
            sd = ref.state_dict()
            for n in params:
                if "lora_A" not in n:
                    continue
                mod = n[len("base_model.model."):-len(".lora_A.weight")]
                a = (orig[n] * 0.5).to(dtype).float()
                b = (orig[n.replace("lora_A", "lora_B")] * -2.0).to(dtype).float()
                sd[mod + ".weight"] += 2.0 * b @ a
            ref.load_state_dict(sd)
            y_ref = ref(input_ids=ids).logits
        rel = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
        print(f"{tag}: {len(params)} LoRA tensors equal: {worst == 0.0} (max abs diff {worst:g}); "
              f"scaling {scalings}; logits vs merged-by-hand max rel diff {rel:.2e}")
        ok = ok and rel < 1e-5
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

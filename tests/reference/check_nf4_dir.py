"""Checks a directory written by qtune's NF4 writer (`write_nf4_dir`) with bitsandbytes itself.

Usage: python tests/reference/check_nf4_dir.py <nf4_dir> <source_dir>
  (a directory can be produced with
   QTUNE_KEEP_NF4_DIR=/tmp/x cargo test --test nf4_write, source tests/fixtures/nf4/src_tiny)

1. Loads it with transformers + bitsandbytes on CPU (4.46.3 needs its backend check bypassed, see
   below) and runs a forward pass; each loaded Linear4bit must dequantise to the values below.
2. Reads every NF4 weight with the Python safetensors package, rebuilds bnb's QuantState with
   `QuantState.from_dict` (the path transformers uses), and checks that
   - bnb's `dequantize_4bit` of our tensors equals bnb's `dequantize_4bit` of bnb's own quantisation
     of the source weight, bit for bit, and
   - our packed codes and statistics equal bnb's `quantize_4bit(..., compress_statistics=True)`.
3. Checks every other tensor equals the source.
Exits non-zero on any mismatch.
"""
import sys

import torch
import bitsandbytes.functional as F
from safetensors.torch import load_file

torch.set_num_threads(1)  # the offset's mean is summed in a thread-count-dependent order
out_dir, src_dir = sys.argv[1], sys.argv[2]
ours = load_file(f"{out_dir}/model.safetensors")
src = load_file(f"{src_dir}/model.safetensors")

def load_with_transformers():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(out_dir, device_map="cpu")


model = None
try:
    model = load_with_transformers()
    print("transformers: loaded the directory on CPU")
except AttributeError as e:
    # transformers 4.46.3's backend check calls .discard on bitsandbytes 0.47's frozenset of
    # backends; bnb itself runs on CPU, so retry with that check bypassed.
    print(f"transformers: refuses CPU 4-bit as shipped ({e}); retrying with its bnb backend check bypassed")
    import transformers.integrations as ti
    import transformers.integrations.bitsandbytes as tib
    import transformers.quantizers.quantizer_bnb_4bit as tqb
    tib.validate_bnb_backend_availability = lambda raise_exception=False: True
    ti.validate_bnb_backend_availability = lambda raise_exception=False: True
    tqb.validate_bnb_backend_availability = lambda raise_exception=False: True
    model = load_with_transformers()
    print("transformers: loaded the directory on CPU (backend check bypassed)")
if model is not None:
    logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    print(f"transformers: forward ok, logits finite: {bool(torch.isfinite(logits).all())}")
    msd = dict(model.named_modules())

suffix = ".quant_state.bitsandbytes__nf4"
bases = [k[: -len(suffix)] for k in ours if k.endswith(suffix)]
bad = 0
for b in sorted(bases):
    parts = {k[len(b) + 1:]: v for k, v in ours.items() if k.startswith(b + ".")}
    qs = F.QuantState.from_dict(parts, device=torch.device("cpu"))
    got = F.dequantize_4bit(ours[b], qs, quant_type="nf4")
    w = src[b]
    ref_packed, ref_qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    want = F.dequantize_4bit(ref_packed, ref_qs, quant_type="nf4")
    same = (
        torch.equal(got.view(torch.int16) if got.dtype != torch.float32 else got.view(torch.int32),
                    want.view(torch.int16) if want.dtype != torch.float32 else want.view(torch.int32))
        and torch.equal(ours[b], ref_packed)
        and torch.equal(parts["absmax"], ref_qs.absmax)
        and torch.equal(parts["nested_absmax"], ref_qs.state2.absmax)
        and float(qs.offset) == float(ref_qs.offset)
        and qs.dtype == w.dtype and tuple(qs.shape) == tuple(w.shape)
    )
    if model is not None:
        mod = msd[b[: -len(".weight")]]
        loaded = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state, quant_type="nf4")
        same = same and torch.equal(loaded, got)
    print(f"{b}: {'ok' if same else 'MISMATCH'}")
    bad += not same
for k, v in src.items():
    if k not in bases:
        if not torch.equal(ours[k], v):
            print(f"{k}: copied tensor differs")
            bad += 1
print(f"{len(bases)} NF4 weights checked, {bad} mismatches")
sys.exit(1 if bad else 0)

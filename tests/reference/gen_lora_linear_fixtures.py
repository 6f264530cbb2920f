"""Reference fixtures for the frozen quantised linear + LoRA (ground truth for tests/qlinear.rs).

Run: /work/venv-ref/bin/python tests/reference/gen_lora_linear_fixtures.py
Writes tests/fixtures/lora_linear/<case>.<array>.bin (raw little-endian) and manifest.json.

One nn.Linear(in=128, out=96) wrapped by PEFT LoRA (r=8, alpha=16, dropout 0) with a non-zero B.
Its base weight is used as:
- f32: the plain f32 weight;
- q8_0: quantised by gguf-py (`gguf.quants.quantize`), whose Q8_0 bytes are written so Rust loads
  the very same quantised tensor, and torch runs on gguf-py's dequantisation of them;
- nf4: quantised by bitsandbytes (`quantize_4bit`, nf4, blocksize 64, double quant), whose packed
  codes and statistics are written, and torch runs on bnb's f32 dequantisation of them;
- f32_bias_rslora: a second Linear with a bias and PEFT's rsLoRA scaling (alpha / sqrt(r)).
For each, torch (f32, CPU, one thread) computes y = lora(x) for x of shape (2, 5, 128), the loss
(y * g).sum() for a fixed g, and the gradients dx, dA (lora_A.weight), dB (lora_B.weight).
"""
import json
import os

import numpy as np
import torch
import gguf
import peft
import bitsandbytes
import bitsandbytes.functional as F
from gguf import GGMLQuantizationType
from peft import LoraConfig, get_peft_model

torch.set_num_threads(1)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "lora_linear")
os.makedirs(OUT, exist_ok=True)
IN, OUTF, R, ALPHA = 128, 96, 8, 16
X_SHAPE = (2, 5, IN)

manifest = {
    "versions": {
        "torch": torch.__version__, "peft": peft.__version__, "gguf": "0.10.0",
        "bitsandbytes": bitsandbytes.__version__, "numpy": np.__version__,
    },
    "in_features": IN, "out_features": OUTF, "r": R, "alpha": ALPHA,
    "x_shape": list(X_SHAPE), "cases": {},
}


def save(name, t):
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t
    a = np.ascontiguousarray(a)
    assert a.dtype in (np.float32, np.uint8), a.dtype
    a.tofile(os.path.join(OUT, f"{name}.bin"))


class One(torch.nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUTF, bias=bias)

    def forward(self, x):
        return self.proj(x)


torch.manual_seed(20251125)
x = torch.randn(*X_SHAPE)
g = torch.randn(*X_SHAPE[:-1], OUTF)
save("x", x)
save("g", g)


SEEDS = {"f32": 11, "q8_0": 12, "nf4": 13, "f32_bias_rslora": 14}


def run_case(name, w_deq, bias=None, rslora=False, extra=None):
    """PEFT LoRA over a Linear whose weight is `w_deq` (what the quantised tensor dequantises to)."""
    torch.manual_seed(SEEDS[name])  # A: PEFT's own Kaiming-uniform init
    base = One(bias is not None)
    with torch.no_grad():
        base.proj.weight.copy_(w_deq)
        if bias is not None:
            base.proj.bias.copy_(bias)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"],
                     use_rslora=rslora, bias="none")
    model = get_peft_model(base, cfg)
    layer = model.base_model.model.proj
    lora_a = layer.lora_A["default"].weight
    lora_b = layer.lora_B["default"].weight
    with torch.no_grad():
        lora_b.copy_(torch.randn(OUTF, R) * 0.1)  # PEFT initialises B to zeros: make it matter
    xx = x.clone().requires_grad_(True)
    y = model(xx)
    loss = (y * g).sum()
    loss.backward()
    assert layer.base_layer.weight.grad is None  # frozen: torch keeps no gradient for W either
    save(f"{name}.w_deq", w_deq)
    save(f"{name}.A", lora_a)
    save(f"{name}.B", lora_b)
    save(f"{name}.y", y)
    save(f"{name}.dx", xx.grad)
    save(f"{name}.dA", lora_a.grad)
    save(f"{name}.dB", lora_b.grad)
    meta = {"scaling": layer.scaling["default"], "rslora": rslora, "bias": bias is not None,
            "loss": loss.item()}
    if bias is not None:
        save(f"{name}.bias", bias)
    meta.update(extra or {})
    manifest["cases"][name] = meta


torch.manual_seed(1)
w = torch.randn(OUTF, IN) * 0.05

# f32 base.
run_case("f32", w.clone())

# Q8_0 base through gguf-py: the bytes Rust loads and the values torch multiplies.
q8 = gguf.quants.quantize(w.numpy(), GGMLQuantizationType.Q8_0)
assert q8.dtype == np.uint8 and q8.shape == (OUTF, IN // 32 * 34), q8.shape
save("q8_0.bytes", q8)
w_q8 = torch.from_numpy(gguf.quants.dequantize(q8, GGMLQuantizationType.Q8_0).astype(np.float32))
assert w_q8.shape == (OUTF, IN)
run_case("q8_0", w_q8, extra={"qtype": "Q8_0"})

# NF4 base through bitsandbytes with double quant.
packed, st = F.quantize_4bit(w.clone(), blocksize=64, compress_statistics=True, quant_type="nf4")
assert st.nested and st.blocksize == 64 and st.state2.blocksize == 256
st32 = F.QuantState(absmax=st.absmax, shape=st.shape, code=st.code, blocksize=st.blocksize,
                    quant_type=st.quant_type, dtype=torch.float32, offset=st.offset, state2=st.state2)
w_nf4 = F.dequantize_4bit(packed, st32, quant_type="nf4").float().reshape(OUTF, IN)
save("nf4.packed", packed.reshape(-1).numpy().astype(np.uint8))
save("nf4.absmax_q", st.absmax.reshape(-1).numpy().astype(np.uint8))
save("nf4.nested_absmax", st.state2.absmax.reshape(-1).numpy().astype(np.float32))
save("nf4.nested_code", st.state2.code.numpy().astype(np.float32))
save("nf4.code", st.code.numpy().astype(np.float32))
run_case("nf4", w_nf4, extra={
    "qtype": "NF4",
    "offset_bits": int(np.float32(st.offset.item()).view(np.uint32)),
})

# f32 base with a bias, rsLoRA scaling.
bias = torch.randn(OUTF) * 0.1
run_case("f32_bias_rslora", w.clone(), bias=bias, rslora=True)

with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
print(json.dumps(manifest, indent=1, sort_keys=True))

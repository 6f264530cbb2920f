"""Ground-truth fixtures for qtune's ggml kernels, from gguf-py (gguf 0.10.0, numpy).

Writes under tests/fixtures/ggml/ (all little-endian):
  deq_<TYPE>.bin / deq_<TYPE>.f32  random blocks and gguf.quants.dequantize of them
  q_<TYPE>_in.f32 / q_<TYPE>.bin    f32 rows and gguf.quants.quantize of them (Q8_0, Q4_0)
  gauss.f32                         N(0,1) data for the Q4_K-vs-Q4_0 error comparison
  q4_k_ours_gguf.f32, q6_k_...      gguf-py's dequantisation of OUR Q4_K / Q6_K bytes of gauss.f32,
                                    made only when q4_k_ours.bin / q6_k_ours.bin exist (written by
                                    `QTUNE_WRITE_FIXTURES=1 cargo test --test quant_ggml`)
  index.json                        block counts and sizes

Random blocks are random bytes with every f16 scale field replaced by a finite random f16 of
modest magnitude (both signs), so the expected values are finite.
Run: /work/venv-ref/bin/python tests/reference/gen_ggml_fixtures.py
"""
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "ggml")
rng = np.random.default_rng(20261125)

# type -> (block size, type size, byte offsets of f16 fields)
TYPES = {
    "F16": (1, 2, [0]),
    "BF16": (1, 2, []),
    "Q4_0": (32, 18, [0]),
    "Q4_1": (32, 20, [0, 2]),
    "Q5_0": (32, 22, [0]),
    "Q5_1": (32, 24, [0, 2]),
    "Q8_0": (32, 34, [0]),
    "Q2_K": (256, 84, [80, 82]),
    "Q3_K": (256, 110, [108]),
    "Q4_K": (256, 144, [0, 2]),
    "Q5_K": (256, 176, [0, 2]),
    "Q6_K": (256, 210, [208]),
}


def rand_f16(n):
    mag = 10.0 ** rng.uniform(-4, 0.5, n)
    sign = rng.choice([-1.0, 1.0], n)
    return (sign * mag).astype(np.float16)


def rand_bf16(n):
    v = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(np.float32)
    return (v.view(np.uint32) >> 16).astype(np.uint16)


def write(name, arr):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(np.ascontiguousarray(arr).tobytes())


def main():
    os.makedirs(OUT, exist_ok=True)
    index = {"dequant": {}, "quant": {}}
    for name, (bs, ts, f16_at) in TYPES.items():
        # Flat types: 512 elements; block types: 48 blocks (K-quants) or 64 blocks.
        nblocks = 512 if bs == 1 else (48 if bs == 256 else 64)
        raw = rng.integers(0, 256, size=(nblocks, ts), dtype=np.uint8)
        if name == "BF16":
            raw = rand_bf16(nblocks).view(np.uint8).reshape(nblocks, ts)
        for off in f16_at:
            raw[:, off:off + 2] = rand_f16(nblocks).view(np.uint8).reshape(nblocks, 2)
        qt = getattr(T, name)
        # Flat types are passed as raw bytes too (gguf-py views them itself).
        deq = quants.dequantize(raw.reshape(-1) if bs == 1 else raw, qt)
        deq = np.asarray(deq, dtype=np.float32).reshape(-1)
        assert deq.size == nblocks * bs, (name, deq.shape)
        assert np.all(np.isfinite(deq)), name
        write(f"deq_{name}.bin", raw)
        write(f"deq_{name}.f32", deq)
        index["dequant"][name] = {"blocks": nblocks, "block_size": bs, "type_size": ts}

    # Quantiser fixtures: rows of 256 (8 blocks of 32), with the edge cases the reference handles.
    rows = rng.standard_normal((24, 256)).astype(np.float32)
    rows[1] = 0.0                                   # all zeros
    rows[2] = 0.0
    rows[2, 37] = 5.0                               # single positive outlier
    rows[3, 100] = -40.0                            # negative max in one block
    rows[4] *= 1e-3                                 # small magnitudes
    rows[5] = np.abs(rows[5])                       # one-signed blocks
    rows[6] = -np.abs(rows[6])
    rows[7] *= 1e4                                  # large magnitudes
    rows[8, :32] = np.linspace(-1, 1, 32)           # exact ties at the rounding points
    rows[9] = np.round(rows[9] * 8) / 8
    for name in ["Q8_0", "Q4_0"]:
        q = quants.quantize(rows, getattr(T, name))
        write(f"q_{name}_in.f32", rows)
        write(f"q_{name}.bin", q)
        index["quant"][name] = {"rows": rows.shape[0], "cols": rows.shape[1]}

    gauss = np.random.default_rng(7).standard_normal(64 * 256).astype(np.float32)
    write("gauss.f32", gauss)
    index["gauss"] = gauss.size

    for name, ts in [("Q4_K", 144), ("Q6_K", 210)]:
        stem = name.lower()
        ours = os.path.join(OUT, f"{stem}_ours.bin")
        if os.path.exists(ours):
            b = np.fromfile(ours, dtype=np.uint8).reshape(-1, ts)
            deq = quants.dequantize(b, getattr(T, name)).astype(np.float32).reshape(-1)
            write(f"{stem}_ours_gguf.f32", deq)
            index[f"{stem}_ours"] = b.shape[0]

    with open(os.path.join(OUT, "index.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()

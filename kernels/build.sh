#!/usr/bin/env bash
# Compiles every kernel in kernels/ with nvcc, warnings as errors, for each supported GPU, and runs
# the host check of their math against the committed fixtures. No GPU needed. CI runs it; so can
# anyone with nvcc (a CUDA toolkit, or the PyPI wheels: see README "CUDA").
#
#   kernels/build.sh [OUT_DIR]     (default target/kernels)
#
# What it makes, in OUT_DIR:
#   <name>.ptx                    compute_80 PTX: what `cargo build --features cuda` embeds (build.rs
#                                 runs the same nvcc command); the driver JIT-compiles it for the GPU
#   <name>.sm_XX.cubin            machine code for sm_80 sm_86 sm_89 sm_90, proving ptxas accepts it
#   host_check                    kernels/host_check.cpp, run against tests/fixtures/
#
# The PTX ISA version must not exceed what the target machines' driver JITs (driver 580 = CUDA 13.0
# = PTX ISA 9.0); a newer nvcc emits a newer ISA, so the check below fails loudly instead.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-target/kernels}"
NVCC="${NVCC:-nvcc}"
MAX_PTX_ISA="${QTUNE_MAX_PTX_ISA:-9.0}"
ARCHS=(80 86 89 90)
FLAGS=(-std=c++17 -O3 -Werror all-warnings)
mkdir -p "$OUT"

"$NVCC" --version | tail -2
for cu in kernels/*.cu; do
    name=$(basename "$cu" .cu)
    "$NVCC" "${FLAGS[@]}" --ptx -arch=compute_80 "$cu" -o "$OUT/$name.ptx"
    isa=$(sed -n 's/^\.version \([0-9.]*\)$/\1/p' "$OUT/$name.ptx" | head -1)
    if ! awk -v a="$isa" -v b="$MAX_PTX_ISA" 'BEGIN { exit !(a + 0 <= b + 0) }'; then
        echo "$name.ptx: PTX ISA $isa is newer than $MAX_PTX_ISA (driver 580 / CUDA 13.0); use nvcc 13.0" >&2
        exit 1
    fi
    for a in "${ARCHS[@]}"; do
        "$NVCC" "${FLAGS[@]}" -cubin -arch="sm_$a" "$cu" -o "$OUT/$name.sm_$a.cubin"
    done
    echo "$name: PTX ISA $isa (compute_80), cubins for sm_${ARCHS[*]}: $(grep -c '^\.visible \.entry' "$OUT/$name.ptx") kernels"
done

# The host check: nvcc's host path (the headers as nvcc sees them, __host__ __device__), linked
# against the toolkit's static runtime; -ffp-contract=off keeps every product and sum rounded
# separately, as the device code does with __fmul_rn/__fadd_rn.
CUDA_LIB="$(dirname "$(dirname "$(command -v "$NVCC")")")/lib"
"$NVCC" "${FLAGS[@]}" -x cu -arch=sm_80 -Xcompiler -ffp-contract=off,-Wall,-Wextra \
    -L"$CUDA_LIB" -L"$CUDA_LIB/../lib64" kernels/host_check.cpp -o "$OUT/host_check"
"$OUT/host_check" "$PWD"

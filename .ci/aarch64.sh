#!/usr/bin/env bash
# The aarch64 kernels (NEON dequantisers, FEAT_BF16 BFDOT matmul) cross-built and run under qemu
# user mode: `-cpu max` (NEON + BF16: the BFDOT kernels) and `-cpu cortex-a72` (NEON, no BF16: the
# f32 fallback). Only the test binaries that reach these kernels (QTUNE_QEMU=1 trims their largest
# case: tests/matmul_bf16.rs). Correctness only: qemu is an
# emulator, its timings say nothing about an Arm CPU.
#
# Usage: .ci/aarch64.sh            (from .ci/run, or by hand; installs what it lacks when it can)
# Exits 0 with "aarch64: SKIPPED: <why>" when the cross toolchain cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu

skip() {
    echo "aarch64: SKIPPED: $*"
    exit 0
}

# qemu-user (7.2 emulates FEAT_BF16 with -cpu max) and a cross linker with arm64 glibc.
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get install -y -q qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 &&
                apt-get install -y -q qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null 2>&1; }) ||
            skip "apt-get could not install qemu-user and gcc-aarch64-linux-gnu"
    else
        skip "no qemu-aarch64 / aarch64-linux-gnu-gcc, and no root apt-get to install them"
    fi
fi
if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    rustup target add "$TARGET" >/dev/null 2>&1 || skip "rustup could not add the $TARGET target"
fi
qemu-aarch64 --version | head -1

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
TESTS=(quant_ggml nf4 matmul_bf16)
TEST_ARGS=()
for t in "${TESTS[@]}"; do TEST_ARGS+=(--test "$t"); done

echo "== aarch64: cross-build ${TESTS[*]}"
time cargo test -q --release --target "$TARGET" --no-run "${TEST_ARGS[@]}"

# Runs the chosen test binaries under `qemu-aarch64 -cpu $1`, with QTUNE_EXPECT_BF16_KERNEL=$2
# (the kernel tests/matmul_bf16.rs must see picked).
run_on() {
    local cpu="$1" expect="$2"
    echo "== aarch64: qemu -cpu $cpu (bf16 kernels expected: $expect)"
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu $cpu -L $SYSROOT"
    time QTUNE_QEMU=1 QTUNE_EXPECT_BF16_KERNEL="$expect" cargo test --release --target "$TARGET" \
        "${TEST_ARGS[@]}" -- --nocapture 2>&1 | grep -E '^(test |test result|bf16 kernels|worst error|skipped)|panicked|FAILED'
}
# pipefail: a failing test run fails the script through the pipelines above.
run_on max neon-bf16
run_on cortex-a72 f32
echo "aarch64: done in ${SECONDS} s"

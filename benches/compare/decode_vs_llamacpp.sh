#!/usr/bin/env bash
# Decode speed, qtune vs llama.cpp, on the 7B-shaped Q4_0 and Q4_K files of tests/generate_bench.rs,
# 3 alternating rounds (qtune, llama.cpp, per type per round). Run on a QUIET machine.
#   bash benches/compare/decode_vs_llamacpp.sh   (from the repository root)
# Env: REPO (default: this repository), PY (a python with llama-cpp-python==0.3.16 and numpy;
# default python3), ROUNDS (3), TOKENS (16 new tokens after an 8-token prompt),
# KEEP=1 keeps the two 3.8 GB files in /tmp afterwards (default: deleted at the end).
set -euo pipefail
REPO=${REPO:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)}
PY=${PY:-python3}
ROUNDS=${ROUNDS:-3}
TOKENS=${TOKENS:-16}
cd "$REPO"
echo "# $(date -u) $(git -C "$REPO" log --oneline -1)"
lscpu | grep -E "Model name|^CPU\(s\)"; grep -o -w -E "avx512_vnni|avx512_bf16|amx_int8" /proc/cpuinfo | sort -u | tr "\n" " "; echo
uptime
df -h / | tail -1
# Build once (no rebuild inside the timed rounds), and write the files if missing.
nice -n 5 cargo test --release --test generate_bench --no-run 2>&1 | tail -1
for q in q4_0 q4_k; do
  f=/tmp/llama7b-$q.gguf
  if [ ! -f "$f" ]; then
    QTUNE_BENCH_QTYPE=$q QTUNE_BENCH_GGUF=$f QTUNE_BENCH_TOKENS=2 QTUNE_BENCH_EXACT=0 \
      cargo test --release --test generate_bench -- --ignored --nocapture 2>&1 | grep -E "wrote|qtune decode"
  fi
done
for r in $(seq 1 "$ROUNDS"); do
  for q in q4_0 q4_k; do
    f=/tmp/llama7b-$q.gguf
    echo "## round $r $q (load $(cut -d' ' -f1-3 /proc/loadavg))"
    QTUNE_BENCH_QTYPE=$q QTUNE_BENCH_GGUF=$f QTUNE_BENCH_TOKENS=$TOKENS QTUNE_BENCH_EXACT=0 \
      cargo test --release --test generate_bench -- --ignored --nocapture 2>&1 \
      | grep -E "loaded|qtune decode" | sed "s/^/$q qtune: /"
    "$PY" tests/reference/check_lora_llamacpp.py --bench "$f" "$TOKENS" 2>&1 \
      | grep "llama.cpp decode" | sed "s/^/$q /"
  done
done
if [ "${KEEP:-0}" != 1 ]; then rm -f /tmp/llama7b-q4_0.gguf /tmp/llama7b-q4_k.gguf; fi

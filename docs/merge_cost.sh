#!/usr/bin/env bash
# What merging an adapter into the embedded default's 4-bit base and requantising costs: trains the
# default (assets/default.toml), merges into each output type, and evaluates every result with
# `qtune eval` on the eval and training sets. Prints a Markdown table. About a minute on 2 cores.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --manifest-path "$root/Cargo.toml" -q
q="$root/target/release/qtune"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$q" train >/dev/null 2>&1
base="$root/assets/model"
adapter="$work/qtune-out/adapter"
for t in f32 bf16 nf4; do "$q" merge --model "$base" --adapter "$adapter" --out "m-$t" --type "$t" >/dev/null; done
for t in q8_0 q4_0; do "$q" merge --model "$base" --adapter "$adapter" --out "m-$t.gguf" --type "$t" >/dev/null; done
loss() { "$q" eval --model "$1" ${2:+--adapter "$2"} --data "$3" --seq-len 64 --json 2>/dev/null | tail -1 |
    python3 -c 'import json,sys; v=json.load(sys.stdin); print("%.4f (ppl %.3f)" % (v["loss"], v["perplexity"]))'; }
row() { echo "| $1 | $(loss "$2" "$3" "$root/assets/eval.jsonl") | $(loss "$2" "$3" "$root/assets/train.jsonl") |"; }
echo "| model | eval.jsonl loss | train.jsonl loss |"
echo "|---|---|---|"
row "NF4 base alone" "$base" ""
row "NF4 base + adapter, unmerged" "$base" "$adapter"
row "merged, f32 safetensors" m-f32 ""
row "merged, bf16 safetensors" m-bf16 ""
row "merged, requantised NF4 (bitsandbytes layout)" m-nf4 ""
row "merged, Q8_0 GGUF" m-q8_0.gguf ""
row "merged, Q4_0 GGUF" m-q4_0.gguf ""

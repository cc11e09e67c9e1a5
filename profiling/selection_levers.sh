#!/usr/bin/env bash
# Lever experiment for the FlexAttention selection branch (profiling/NOTES.md, Levers 1-2): one
# length, several mask layouts / block sizes, stage timings only. The Triton selection kernel is the
# CUDA default now, so every run here names --selection-kernel flex.
# Usage: bash profiling/selection_levers.sh OUT_DIR [LENGTH]
set -uo pipefail
out=${1:?results folder}; T=${2:-16K}
common=(--lengths "$T" --baselines none --trace-lengths none --no-plots --rep-ms 50 --selection-kernel flex)
python3 -m profiling "${common[@]}" --selection both --modes fwd,fwd+bwd --out "$out/default-folded-q128-kv128"
python3 -m profiling "${common[@]}" --selection both --modes fwd,fwd+bwd --layout per_head --out "$out/per_head-q128-kv128"
python3 -m profiling "${common[@]}" --selection both --modes fwd --flex-block-kv 64 --out "$out/folded-q128-kv64-fwd"
python3 -m profiling "${common[@]}" --selection block_shared --modes fwd --layout per_head --flex-block-q 64 --flex-block-kv 64 --out "$out/per_head-q64-kv64-fwd"
for d in "$out"/*/; do echo "== $d"; grep -E "^\| [0-9]" "$d/report.md"; done

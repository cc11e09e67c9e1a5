#!/usr/bin/env bash
# Training throughput, NSA vs dense attention, of the 7B-shaped random Qwen2.5-VL on 2 GPUs (FSDP2).
#   FLEXNSA_COMMIT=<hash> bash scripts/bench_train_7b.sh OUT_DIR [MODE:TOKENS[:STEPS] ...]
# MODE is nsa | dense; the default runs are nsa:32768 dense:32768 nsa:65536 dense:65536, 20 steps each.
# Each run writes OUT_DIR/<mode>-<tokens>/ (results.json, rewritten after every step; metrics.jsonl;
# log.txt; exit_code); then OUT_DIR/report.md merges every run under OUT_DIR, so runs split over
# several calls (same OUT_DIR, or report afterwards: python -m train.bench_report DIR...) merge.
# Environment: ARCHIVE=path.tgz re-packs OUT_DIR there after every run (a call cut short still
# returns the finished runs); RUN_TIMEOUT=seconds stops one run (its results.json keeps the steps
# done); NPROC (default 2); PYTHON (default python3); BENCH_SET="section.key=value ..." extra
# overrides for every run (e.g. "train.compile=false"); CONFIG (default train/configs/bench_7b.toml).
# With BENCH_SET="log.profile_steps=[3]" the rank-0 traces are summarised in OUT_DIR/kernel_time.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/bench_train_7b.sh OUT_DIR [MODE:TOKENS[:STEPS] ...]}
shift
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=(nsa:32768 dense:32768 nsa:65536 dense:65536)
PY=${PYTHON:-python3}
NPROC=${NPROC:-2}
CONFIG=${CONFIG:-train/configs/bench_7b.toml}
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# the GPU hosts' rule: NVLink multicast stays off in NCCL, PyTorch and NVSHMEM
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$out"
extra=()
for kv in ${BENCH_SET:-}; do extra+=(--set "$kv"); done
limit=()
[ -n "${RUN_TIMEOUT:-}" ] && limit=(timeout --signal=TERM --kill-after=30 "$RUN_TIMEOUT")

pack() {
  if [ -n "${ARCHIVE:-}" ]; then
    tar czf "$ARCHIVE.tmp" -C "$(dirname "$out")" "$(basename "$out")" && mv "$ARCHIVE.tmp" "$ARCHIVE"
  fi
}

"$PY" - <<'PY'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.device_count()} x {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}", flush=True)
PY
total_start=$(date +%s)
for run in "${runs[@]}"; do
  IFS=: read -r mode tokens steps <<< "$run"
  steps=${steps:-20}
  dir="$out/$mode-$tokens"
  rm -rf "$dir" && mkdir -p "$dir"
  start=$(date +%s)
  echo "=== $mode, $tokens tokens/sample, $steps steps -> $dir (started $(date -u +%H:%M:%S), $((start - total_start)) s in)"
  ${limit[@]+"${limit[@]}"} "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m train --config "$CONFIG" \
    --set model.attention="$mode" --set data.max_length="$tokens" --set train.steps="$steps" \
    --set train.output_dir="$dir" ${extra[@]+"${extra[@]}"} 2>&1 \
    | tee "$dir/log.txt" | grep --line-buffered -E '^step=|"event"|Error|error:|Traceback|out of memory'
  code=${PIPESTATUS[0]}
  echo "$code" > "$dir/exit_code"
  echo "=== $mode $tokens: exit $code after $(( $(date +%s) - start )) s"
  [ "$code" != 0 ] && tail -n 30 "$dir/log.txt" | cut -c1-400
  "$PY" -m train.bench_report "$out" --out "$out/report.md" > /dev/null 2>&1
  pack
done
"$PY" -m train.bench_report "$out" --out "$out/report.md"
# Runs with log.profile_steps: kernel time by kind and caller, and the step's timeline, of each
# run's rank-0 trace in one file (the traces themselves are tens of MB).
traces=$(ls "$out"/*/profile/*rank0*.pt.trace.json.gz 2>/dev/null)
[ -n "$traces" ] && "$PY" -m train.trace_summary $traces --out "$out/kernel_time.md"
pack
echo "=== all runs: $(( $(date +%s) - total_start )) s"

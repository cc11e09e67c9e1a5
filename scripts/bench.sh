#!/usr/bin/env bash
# pytest-benchmark regression check against the committed baseline of this machine kind.
#   bash scripts/bench.sh compare   # fails if any case's median is >15% slower (THRESHOLD=N to change)
#   bash scripts/bench.sh save      # records a new baseline (commit tests/benchmarks/baselines/<kind>/)
# On a GPU machine (torch with CUDA on python3) it runs the GPU cases; elsewhere the CPU cases in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY=python3; marker=gpu
  kind=$(python3 -c "import torch; n = torch.cuda.get_device_name().upper(); print(next((t.lower() for t in ('H100', 'H200', 'A100', 'B200') if t in n), 'gpu'))")
else
  bash scripts/setup_env.sh >/dev/null; PY=.venv/bin/python; marker="not gpu"; kind=cpu
fi
args=(tests/benchmarks -m "$marker" --benchmark-enable --benchmark-storage="file://tests/benchmarks/baselines/$kind" -p no:cacheprovider -q)
case "${1:-compare}" in
  save) exec "$PY" -m pytest "${args[@]}" --benchmark-save="$kind" ;;
  compare) exec "$PY" -m pytest "${args[@]}" --benchmark-compare --benchmark-compare-fail="median:${THRESHOLD:-15}%" ;;
  *) echo "usage: bash scripts/bench.sh [compare|save]" >&2; exit 2 ;;
esac

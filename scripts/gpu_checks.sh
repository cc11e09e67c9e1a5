#!/usr/bin/env bash
# Everything a GPU session should re-check after changes, in one device call (single GPU):
# the GPU-marked tests (summary lines kept even if the call is cut short), then the 128K sweep
# with the current defaults and all baselines. The GPU benchmark cases (tests/benchmarks, 56 of
# them, first in pytest's order) are left to scripts/bench.sh: with them the suite outran 420 s on
# a cold H100 (session 5). The default pytest limit is 420 s, the sweep 170 s (one 600 s call).
# Usage on the device machine, from the repo root:
#   FLEXNSA_COMMIT=<hash> bash scripts/gpu_checks.sh OUT_DIR [PYTEST_TIMEOUT_S] [SWEEP_TIMEOUT_S]
# fla comes from carried wheels (README "Profiling"); without it the fla baselines are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_checks.sh OUT_DIR [PYTEST_TIMEOUT_S] [SWEEP_TIMEOUT_S]}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# -rfE prints each failure's one-line reason in the summary; -p no:logging keeps DEBUG logs out.
timeout "${2:-420}" python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging --tb=line -rfE tests --ignore=tests/benchmarks \
  > "$out/gpu_tests.log" 2>&1
echo "pytest exit $? (124 = cut by the timeout): $(grep -E '[0-9]+ (passed|failed)' "$out/gpu_tests.log" | tail -1)"
grep -E '^(FAILED|ERROR)' "$out/gpu_tests.log" | head -20
timeout "${3:-170}" python3 -m profiling --lengths 128K --selection both --modes fwd,fwd+bwd \
  --baselines sdpa,fla,fla_cmp --trace-lengths none --no-plots --out "$out/sweep128" 2>&1 | tail -1
grep -E '^\| 128K' "$out/sweep128/report.md" 2>/dev/null

#!/usr/bin/env bash
# Session 12, device call 1 (not committed): new-lever GPU tests, tuning A/Bs, 128K trace, 8K.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD FLEXNSA_COMMIT=$(cat .commit) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
t0=$SECONDS
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging --tb=line -rfE \
  tests/test_triton_compression.py tests/test_triton_scores.py tests/test_triton_selection.py \
  -k "base2 or transposed or several_selection_rows" > $OUT/gpu_tests_new.log 2>&1
echo "tests rc $? in $((SECONDS-t0)) s: $(tail -1 $OUT/gpu_tests_new.log)"; grep -E '^(FAILED|ERROR)' $OUT/gpu_tests_new.log | head
t0=$SECONDS
timeout 170 python3 -m profiling.kernel_tuning --lengths 128K --ops compression:block_shared,scores:block_shared \
  --match "base2|transposed" --out /tmp/t1 2>&1 | grep -E "^T=|best"
cp /tmp/t1/kernel_tuning.json $OUT/tuning_cmp_scores.json; echo "tuning1 $((SECONDS-t0)) s"
t0=$SECONDS
timeout 120 python3 -m profiling.kernel_tuning --lengths 128K --ops selection:per_token --match entries --out /tmp/t2 2>&1 | grep -E "^T=|best"
cp /tmp/t2/kernel_tuning.json $OUT/tuning_l27.json; echo "tuning2 $((SECONDS-t0)) s"
t0=$SECONDS
timeout 90 python3 -m profiling --lengths 128K --selection block_shared --modes fwd+bwd --baselines none --no-stages \
  --trace-lengths 128K --no-plots --out /tmp/tr 2>&1 | tail -2
for f in /tmp/tr/traces/*/*.kernels.txt; do cp "$f" $OUT/trace128K.kernels.txt; done; echo "trace $((SECONDS-t0)) s"
head -45 $OUT/trace128K.kernels.txt | cut -c1-200
t0=$SECONDS
timeout 90 python3 -m profiling --lengths 2K,8K --selection block_shared --modes fwd,fwd+bwd --baselines sdpa \
  --trace-lengths none --no-plots --out /tmp/s8 2>&1 | tail -1
cp /tmp/s8/results.json $OUT/s8k_results.json; cp /tmp/s8/report.md $OUT/s8k_report.md; echo "8K $((SECONDS-t0)) s"
grep -E '^\| (2K|8K)' /tmp/s8/report.md

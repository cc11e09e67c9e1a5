#!/usr/bin/env bash
# Session 18 call 3: the rest of test_flex.py's GPU tests (call 2 was cut at 37 of 44), then the final sweep.
set -uo pipefail
export PYTHONUNBUFFERED=1 FLEXNSA_COMMIT=$C
R=$OUT/call3; mkdir -p $R
pack() { (cd $OUT && tar czf call3.tgz call3); }
timeout 140 python3 -m pytest -v -p no:cacheprovider -p no:logging --tb=line -rfE "tests/test_flex.py::test_flex_forward_backward_gpu[Q7B-T1000-fp32]" "tests/test_flex.py::test_no_recompile_when_selection_changes_gpu[gqa_folded-per_token]" "tests/test_flex.py::test_no_recompile_when_selection_changes_gpu[gqa_folded-block_shared]" "tests/test_flex.py::test_no_recompile_when_selection_changes_gpu[per_head-per_token]" "tests/test_flex.py::test_no_recompile_when_selection_changes_gpu[per_head-block_shared]" "tests/test_flex.py::test_long_context_sampled_rows_gpu[65613]" "tests/test_flex.py::test_long_context_sampled_rows_gpu[131072]"  > $R/gpu_tests.log 2>&1
echo "tests exit $?: $(grep -E '[0-9]+ (passed|failed)' $R/gpu_tests.log | tail -1)"; grep -E '^(FAILED|ERROR)' $R/gpu_tests.log | head
echo "PASSED lines: $(grep -c " PASSED" $R/gpu_tests.log), FAILED lines: $(grep -c " FAILED" $R/gpu_tests.log)"
pack
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
timeout 345 python3 -m profiling --lengths 128K,32K,8K --selection both --modes fwd,fwd+bwd --baselines sdpa,fla,fla_cmp   --trace-lengths none --out $R/sweep > $R/sweep.log 2>&1; echo "sweep exit $?"
grep -E "^\| [0-9]+K" $R/sweep/report.md | cut -d'|' -f1-4,11-14 | head -12; pack

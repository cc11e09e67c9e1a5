#!/usr/bin/env bash
# What a GPU session should re-check after changes, in parts that each fit one 600 s device call
# (single GPU; sessions 12-14 on an H200: kernels ~400 s, op + model ~600 s together, sweep ~250 s;
# session 16: test_flex.py alone ~350 s, the 8K/32K/128K sweep with fla 323 s, >345 s in session 19):
#   kernels  the Triton kernels' GPU tests (compression, scores, selection, window) and CUDA graphs
#            (~530 s in session 21, > 560 s in session 25; the Gluon tests run in the gluon parts instead);
#            in two calls: kernels_a (compression, scores) and kernels_b
#            (selection, window, CUDA graphs)
#   op       the whole op: flex backend, custom ops, fused gates
#   model    token-major spans, no host sync, the hybrid layer, the 7B forward
#   sweep    the 128K sweep with the current defaults and all baselines
#   pending  what the last GPU session left unrun: test_flex.py, the op part's file not yet run with
#            Levers 44-45 the rules (session 22 ran its custom-op and fused-gates files with them)
#   gluon    Levers 47-48 (the Gluon sm_90 compression forward, knob gluon_ws): its GPU tests alone
#            (the ping-pong in a child process under a timeout), then kernel_tuning's forward
#            variants matching "gluon" against the Triton rule at 128K
#   gluon_op the 128K block-shared op (fwd, fwd+bwd, stages included) with the rule and with the
#            persistent Gluon forward (Lever 50, gluon_ws "persistent"), two alternated rounds
#   gluon_rule where the persistent Gluon forward (the rule since session 23) runs inside the op: the
#            custom ops under fullgraph, CUDA graphs, the compression kernels' GPU tests; then the
#            128K block-shared op once
#   fwd_cost the compression forward's per-program fixed cost and stalls (session 23): kernel_tuning's
#            forward variants matching "gluon" (Triton rule, Levers 47-48) at 16K-128K, to fit
#            time = a * programs + b * chunk steps; then Nsight Compute (speed of light, warp
#            states, scheduler) of one 128K launch of each of the three
#   scores   Lever 51 (the scorer's G = 7 as head parts 4 + 2 + 1, no slot padded; a register cap for a
#            third CTA per SM): the scorer's GPU tests, kernel_tuning's scores variants matching
#            split_heads|maxnreg (block-shared at 16K-128K, which also fits the rule's per-program
#            cost; per-token at 128K), then Nsight Compute of the rule's and the split kernel's 128K launches
#   scores_op the 128K block-shared op with the rule and with the split scorer (+ maxnreg 168), two
#            alternated rounds
#   gluon_scores Lever 52 (the persistent warp-specialised Gluon scorer, knob scores.gluon): its GPU
#            tests (child processes under a timeout), kernel_tuning's scores variant "gluon" against
#            the rule at 16K-128K, then the 128K block-shared op with the rule and with it, two
#            alternated rounds
#   pipelined_scores Lever 54 (the Gluon scorer with each consumer's chunks in pairs, knob scores.gluon
#            "pipelined"): the Gluon scorer tests (child processes), kernel_tuning's gluon and convoy
#            variants at 16K-128K, the 128K op with the rule and with it, two alternated rounds
#   one_stage Lever 55 (the selection/window forward and dQ at num_stages 1: no K/V prefetch, 3 CTAs
#            per SM): kernel_tuning at 128K, then, for the variants that beat the rule by 3%, the
#            128K op with the rule and with them, two alternated rounds
#   pipelined_ncu Nsight Compute of the Triton scorer and the Gluon scorer plain and pipelined (kernel_tuning's
#            first two 128K launches each): why Lever 54 lost
#   convoy   the scorer at 3, 2 and 1 CTAs per SM (2, 3 and 6 K~ stages: shared memory sets the count),
#            kernel_tuning at 32K and 128K: whether its MMAs and exponentials run in series across CTAs
#   diagnose where the time goes: cProfile of issuing the op at 8K/32K fwd+bwd (profiling.host_profile),
#            and Nsight Compute sections of every Triton kernel of one 128K fwd+bwd (profiling.op_loop;
#            INPUTS=smooth for video-like inputs)
#   dkv_ncu  Nsight Compute sections of the selection dK/dV at 128K with Lever 43 (the rule) and with
#            the order before it (one group, acq_rel atomics, by FLEXNSA_TUNING): DRAM bytes, L2 hits
#   levers   the A/Bs of Levers 44 and 45 (rules since session 21) against their knobs off: the
#            compression dK~/dV~ with acq_rel atomics as kernel_tuning variants at 128K; then the
#            128K block-shared fwd+bwd op, stages included, for the rule, without Lever 44 and
#            without Lever 45 (the window's dK/dV rows ascending), two alternated rounds
#   compiled_op Lever 56 (the whole op under torch.compile, the profiler's `--forms compiled`): its GPU
#            test (equal to eager, no recompile on new data), then block-shared 8K, 128K, 32K fwd and
#            fwd+bwd, eager and compiled, SDPA in the same run (no stages: the compiled form has none)
#   indices_8k Lever 62 (FlexAttention kv_indices placed by counting): ab_8k against .ab/base, then
#            test_custom_ops.py and test_flex.py's forward_backward / recompile cases, -m gpu
#   compiled_host Lever 57 (the host's cost in each form at 8K): host_profile eager and compiled (cProfile,
#            kernels per call), then 8K fwd and fwd+bwd as eager, compiled and cuda_graphs,
#            SDPA in the same run
#   forms_sweep Lever 58: a process that measures 8K first (eager), then block-shared 128K, 64K, 32K, 16K, 8K
#            fwd and fwd+bwd, eager and compiled, SDPA in the same run (no stages), with plots
#   ab_8k    Lever 59 (the dK/dV lists in the traced backward), or any change, against a base tree in
#            .ab/base (scripts/ab_base.sh COMMIT, carried): host_profile compiled (kernels per call,
#            host ms) for each tree, then 8K fwd+bwd eager and compiled (SDPA in the first run), the
#            trees alternated twice on one machine
#   lists_8k Levers 60-61 (the dK/dV lists' sort on narrow keys; their order counted, no sort): wide-key
#            sort, narrow-key sort and the count as tuning files, on this tree: host_profile compiled 8K (kernels per call),
#            8K fwd+bwd eager and compiled alternated twice (SDPA in the first run), 16K compiled
#            once; then the lists' inductor GPU test
#   backward_ops the GPU tests of every caller of the selection/window backward op (custom ops and the
#            compiled op, fused gates, selection and window kernels): Lever 59's signature change
#   all      kernels, op, model and sweep in a row (machines without a per-call limit)
# The GPU benchmark cases (tests/benchmarks) are left to scripts/bench.sh. Summary lines are kept
# even when a part is cut by its timeout (TIMEOUT_S, default 560).
# Usage on the device machine, from the repo root:
#   FLEXNSA_COMMIT=<hash> bash scripts/gpu_checks.sh OUT_DIR kernels|kernels_a|kernels_b|op|model|sweep|pending|gluon|gluon_op|gluon_rule|fwd_cost|scores|scores_op|gluon_scores|convoy|pipelined_scores|one_stage|pipelined_ncu|diagnose|dkv_ncu|levers|lists_8k|all
# fla comes from carried wheels (README "Profiling"); without it the fla baselines are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS="kernels|kernels_a|kernels_b|op|model|sweep|pending|gluon|gluon_op|gluon_rule|fwd_cost|scores|scores_op|gluon_scores|convoy|pipelined_scores|one_stage|pipelined_ncu|diagnose|dkv_ncu|levers|compiled_op|compiled_host|forms_sweep|ab_8k|lists_8k|backward_ops|all"
usage="usage: bash scripts/gpu_checks.sh OUT_DIR $PARTS"
out=${1:?$usage}
part=${2:?$usage}
limit=${TIMEOUT_S:-560}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
KERNEL_TESTS_A="tests/test_triton_compression.py tests/test_triton_scores.py"
KERNEL_TESTS_B="tests/test_triton_selection.py tests/test_triton_window.py tests/test_cuda_graphs.py"
KERNEL_TESTS="$KERNEL_TESTS_A $KERNEL_TESTS_B"
OP_TESTS="tests/test_flex.py tests/test_custom_ops.py tests/test_fused_gates.py"
MODEL_TESTS="tests/test_token_major.py tests/test_no_host_sync.py tests/test_model_hybrid.py tests/test_model_forward_bench.py"

gpu_tests() {  # name, files...: -rfE prints each failure's one-line reason; -p no:logging keeps DEBUG logs out
  local name=$1; shift
  timeout "$limit" python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging --tb=line -rfE "$@" > "$out/gpu_tests_$name.log" 2>&1
  echo "$name: pytest exit $? (124 = cut by the timeout): $(grep -E '[0-9]+ (passed|failed)' "$out/gpu_tests_$name.log" | tail -1)"
  grep -E '^(FAILED|ERROR)' "$out/gpu_tests_$name.log" | head -20
}

sweep() {
  timeout "$limit" python3 -m profiling --lengths 128K --selection both --modes fwd,fwd+bwd \
    --baselines sdpa,fla,fla_cmp --trace-lengths none --no-plots --out "$out/sweep128" 2>&1 | tail -1
  grep -E '^\| 128K' "$out/sweep128/report.md" 2>/dev/null
}

short_op() {  # name, window kernel, lengths, modes[, tuning file[, inputs]]: the block-shared op alone, stages included
  FLEXNSA_TUNING=${5:-} timeout 150 python3 -m profiling --lengths "$3" --selection block_shared --modes "$4" \
    --window-kernel "$2" --inputs "${6:-random}" --baselines none --trace-lengths none --no-plots --out "$out/$1" > "$out/$1.log" 2>&1
  echo "$1: exit $?"; grep -E '^\| [0-9]+K' "$out/$1/report.md" 2>/dev/null
}

pending() {
  gpu_tests op_flex tests/test_flex.py
}

gluon() {
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging --tb=line -rfE \
    tests/test_triton_compression.py -k gluon > "$out/gpu_tests_gluon.log" 2>&1
  echo "gluon tests: pytest exit $?: $(grep -E '[0-9]+ (passed|failed)' "$out/gpu_tests_gluon.log" | tail -1)"
  grep -E '^(FAILED|ERROR)' "$out/gpu_tests_gluon.log" | head -10
  timeout 200 python3 -m profiling.kernel_tuning --lengths 128K --ops compression:block_shared --kernels fwd --match '^\{"gluon_ws"' \
    --out "$out/kernel_tuning" > "$out/kernel_tuning.log" 2>&1
  echo "kernel_tuning: exit $?"; tail -4 "$out/kernel_tuning.log"
}

ab_op() {  # name, tuning JSON: the 128K block-shared op with the rule and with these knobs, two alternated rounds
  echo "$2" > "$out/$1.json"
  for i in 1 2; do
    short_op "rule_$i" auto 128K fwd,fwd+bwd
    short_op "$1_$i" auto 128K fwd,fwd+bwd "$out/$1.json"
  done
}

gluon_op() {
  ab_op persistent '{"compression": {"fwd": {"gluon_ws": "persistent"}}}'
}

gluon_rule() {
  local limit=360
  gpu_tests gluon_rule tests/test_custom_ops.py tests/test_cuda_graphs.py tests/test_triton_compression.py
  short_op rule_128K auto 128K fwd,fwd+bwd
}

fwd_cost() {
  timeout 240 python3 -m profiling.kernel_tuning --lengths 16K,32K,64K,128K --ops compression:block_shared --kernels fwd \
    --match '^\{"gluon_ws"' --out "$out/lengths" > "$out/lengths.log" 2>&1
  echo "kernel_tuning lengths: exit $?"; grep -E '^T=' "$out/lengths.log" | grep ' fwd ' | cut -c1-140
  local ncu; ncu=$(find_ncu)
  [ -n "$ncu" ] || { echo "ncu: not found"; return; }
  for v in triton:_cmp_fwd_kernel:NONE ws:_cmp_fwd_ws_kernel:gluon_ws...true pingpong:_cmp_fwd_ws_kernel:pingpong; do
    IFS=: read -r name kernel match <<< "$v"
    timeout 120 "$ncu" --clock-control none -k "regex:^${kernel}\$" --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
      --section ComputeWorkloadAnalysis -f -o "$out/ncu_$name" \
      python3 -m profiling.kernel_tuning --lengths 128K --ops compression:block_shared --kernels fwd --match "$match" \
      --out "$out/ncu_tune_$name" > "$out/ncu_$name.log" 2>&1
    echo "ncu $name: exit $?"
    ncu_export "$ncu" "$name" 'Duration|Warp Cycles Per Issued|Issued Warp Per Scheduler|No Eligible|Registers Per|Compute \(SM\) Throughput|L2 Cache Throughput'
  done
}

scores() {
  timeout 220 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging --tb=line -rfE \
    tests/test_triton_scores.py > "$out/gpu_tests_scores.log" 2>&1
  echo "scores tests: pytest exit $?: $(grep -E '[0-9]+ (passed|failed)' "$out/gpu_tests_scores.log" | tail -1)"
  grep -E '^(FAILED|ERROR)' "$out/gpu_tests_scores.log" | head -10
  timeout 150 python3 -m profiling.kernel_tuning --lengths 16K,32K,64K,128K --ops scores:block_shared \
    --match 'split_heads|maxnreg' --out "$out/tune_bs" > "$out/tune_bs.log" 2>&1
  echo "kernel_tuning block-shared: exit $?"; grep -E '^T=' "$out/tune_bs.log" | cut -c1-150
  timeout 100 python3 -m profiling.kernel_tuning --lengths 128K --ops scores:per_token \
    --match 'split_heads|maxnreg' --out "$out/tune_pt" > "$out/tune_pt.log" 2>&1
  echo "kernel_tuning per-token: exit $?"; grep -E '^T=' "$out/tune_pt.log" | cut -c1-150
  local ncu; ncu=$(find_ncu)
  [ -n "$ncu" ] || { echo "ncu: not found"; return; }
  echo '{"scores": {"scores": {"split_heads": true, "maxnreg": 168}}}' > "$out/split.json"
  ncu_scorer "$ncu" rule _group_scores_kernel ""
  ncu_scorer "$ncu" split _split_scores_kernel "$out/split.json"
}

ncu_scorer() {  # ncu, name, kernel, tuning file[, launches to skip]: Nsight Compute of two 128K launches of a scorer
  # (kernel_tuning: its score_and_select runs the Triton scorer's own-lse pass first, two launches; skip 2 for the
  # op's given-lse ones; the Gluon scorer runs only with the lse given)
  local ncu=$1 name=$2 kernel=$3
  FLEXNSA_TUNING=$4 timeout 100 "$ncu" --clock-control none -k "regex:^${kernel}\$" --launch-skip "${5:-0}" --launch-count 2 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
    --section ComputeWorkloadAnalysis --section InstructionStats -f -o "$out/ncu_$name" \
    python3 -m profiling.kernel_tuning --lengths 128K --ops scores:block_shared --match NONE \
    --out "$out/ncu_tune_$name" > "$out/ncu_$name.log" 2>&1
  echo "ncu $name: exit $?"
  ncu_export "$ncu" "$name" 'Duration|Warp Cycles Per Issued|Issued Warp Per Scheduler|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput'
}

pipelined_ncu() {  # why Lever 54 lost: Nsight Compute of the Gluon scorer, plain and pipelined, and the Triton rule
  local ncu; ncu=$(find_ncu)
  [ -n "$ncu" ] || { echo "ncu: not found"; return; }
  echo '{"scores": {"scores": {"gluon": true}}}' > "$out/plain.json"
  echo '{"scores": {"scores": {"gluon": "pipelined"}}}' > "$out/pipelined.json"
  ncu_scorer "$ncu" rule _group_scores_kernel "" 2
  ncu_scorer "$ncu" gluon_plain _scores_persistent_kernel "$out/plain.json"
  ncu_scorer "$ncu" gluon_pipelined _scores_persistent_kernel "$out/pipelined.json"
}

scores_op() {
  ab_op split '{"scores": {"scores": {"split_heads": true, "maxnreg": 168}}}'
}

gluon_scores() {
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging --tb=line -rfE \
    tests/test_triton_scores.py -k gluon > "$out/gpu_tests_gluon_scores.log" 2>&1
  echo "gluon scorer tests: pytest exit $?: $(grep -E '[0-9]+ (passed|failed)' "$out/gpu_tests_gluon_scores.log" | tail -1)"
  grep -E '^(FAILED|ERROR)' "$out/gpu_tests_gluon_scores.log" | head -10
  timeout 120 python3 -m profiling.kernel_tuning --lengths 16K,32K,64K,128K --ops scores:block_shared --match gluon \
    --out "$out/tune" > "$out/tune.log" 2>&1
  echo "kernel_tuning: exit $?"; grep -E '^T=' "$out/tune.log" | cut -c1-150
  ab_op gluon '{"scores": {"scores": {"gluon": true}}}'
}

pipelined_scores() {  # Lever 54 (the Gluon scorer's chunks in pairs, knob scores.gluon "pipelined") and the convoy test
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging --tb=line -rfE \
    tests/test_triton_scores.py -k gluon > "$out/gpu_tests_gluon_scores.log" 2>&1
  echo "gluon scorer tests: pytest exit $?: $(grep -E '[0-9]+ (passed|failed)' "$out/gpu_tests_gluon_scores.log" | tail -1)"
  grep -E '^(FAILED|ERROR)' "$out/gpu_tests_gluon_scores.log" | head -10
  timeout 200 python3 -m profiling.kernel_tuning --lengths 16K,32K,64K,128K --ops scores:block_shared \
    --match '^\{"gluon"|^\{("tma_k": true, )?"num_stages": [36]\}$' --out "$out/tune" > "$out/tune.log" 2>&1
  echo "kernel_tuning: exit $?"; grep -E '^T=' "$out/tune.log" | cut -c1-150
  ab_op pipelined '{"scores": {"scores": {"gluon": "pipelined"}}}'
}

convoy() {  # NOTES session 25, Next 1: the scorer at 3, 2 and 1 CTAs per SM (only its K~ ring's depth changes)
  timeout 150 python3 -m profiling.kernel_tuning --lengths 32K,128K --ops scores:block_shared \
    --match '^\{("tma_k": true, )?"num_stages": [36]\}$' --out "$out/tune" > "$out/tune.log" 2>&1
  echo "kernel_tuning: exit $?"; grep -E '^T=' "$out/tune.log" | cut -c1-150
}

one_stage() {  # Lever 55: the selection/window forward and dQ without K/V prefetch (num_stages 1: 3 CTAs per SM)
  timeout 150 python3 -m profiling.kernel_tuning --lengths 128K --ops selection:block_shared --kernels fwd,dq \
    --match '^\{"num_stages": 1\}$' --out "$out/tune" > "$out/tune.log" 2>&1
  echo "kernel_tuning: exit $?"; grep -E '^T=' "$out/tune.log" | cut -c1-150
  local knobs; knobs=$(python3 -c "import json; print(json.dumps({'selection': json.load(open('$out/tune/best.json')).get('selection', {})}))")
  if [ "$knobs" = '{"selection": {}}' ]; then echo "no variant beat the rule by the margin: no op rounds"; return; fi
  ab_op one_stage "$knobs"
}

ncu_export() {  # ncu, name, grep pattern: ncu_NAME.ncu-rep as details text and raw CSV (the report itself deleted), and the
  # details' lines matching the pattern
  "$1" --import "$out/ncu_$2.ncu-rep" --page details > "$out/ncu_$2_details.txt" 2>&1
  "$1" --import "$out/ncu_$2.ncu-rep" --page raw --csv > "$out/ncu_$2_raw.csv" 2>&1
  rm -f "$out/ncu_$2.ncu-rep"
  grep -E "$3" "$out/ncu_$2_details.txt" | head -12
}

find_ncu() { command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1; }

diagnose() {
  timeout 120 python3 -m profiling.host_profile --lengths 8K,32K --calls 20 --out "$out/host" > "$out/host.log" 2>&1
  echo "host_profile: exit $?"; tail -2 "$out/host.log"
  local ncu; ncu=$(find_ncu)
  [ -n "$ncu" ] || { echo "ncu: not found"; return; }
  timeout 180 "$ncu" --clock-control none --profile-from-start off -k 'regex:_slc_|_cmp_|_group_scores' \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section WarpStateStats --section Occupancy --section LaunchStats -f -o "$out/ncu_128K" \
    python3 -m profiling.op_loop --lengths 128K --calls 1 --inputs "${INPUTS:-random}" > "$out/ncu.log" 2>&1
  echo "ncu: exit $?"; tail -3 "$out/ncu.log"
  "$ncu" --import "$out/ncu_128K.ncu-rep" --page details > "$out/ncu_128K_details.txt" 2>&1
  "$ncu" --import "$out/ncu_128K.ncu-rep" --page raw --csv > "$out/ncu_128K_raw.csv" 2>&1
  grep -E '^  [_a-z]|Duration|L2 Cache Throughput|DRAM Throughput|Compute \(SM\) Throughput|L2 Hit Rate|Achieved Occupancy' \
    "$out/ncu_128K_details.txt" | head -80
}

dkv_ncu() {  # the window's dK/dV is the same kernel (its grid: one item per kv block), profiled too
  local ncu; ncu=$(find_ncu)
  [ -n "$ncu" ] || { echo "ncu: not found"; return; }
  echo '{"selection": {"dkv": {"group": 0, "relaxed": false}}}' > "$out/dkv_before_lever43.json"
  for v in rule before; do
    local tuning=""; [ "$v" = before ] && tuning="$out/dkv_before_lever43.json"
    FLEXNSA_TUNING=$tuning timeout 200 "$ncu" --clock-control none --profile-from-start off -k 'regex:_slc_dkv' \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
      -f -o "$out/ncu_dkv_$v" python3 -m profiling.op_loop --lengths 128K --calls 1 > "$out/ncu_dkv_$v.log" 2>&1
    echo "ncu dkv $v: exit $?"
    "$ncu" --import "$out/ncu_dkv_$v.ncu-rep" --page details > "$out/ncu_dkv_${v}_details.txt" 2>&1
    grep -E '^  [_a-z]|Grid Size|Duration|DRAM Throughput|L2 Hit Rate|Memory Throughput|Achieved Occupancy' "$out/ncu_dkv_${v}_details.txt" | head -30
  done
}

compiled_op() {
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging --tb=line -rfE \
    tests/test_custom_ops.py -k profiled_compiled > "$out/gpu_tests_compiled.log" 2>&1
  echo "compiled op tests: pytest exit $?: $(grep -E '[0-9]+ (passed|failed)' "$out/gpu_tests_compiled.log" | tail -1)"
  grep -E '^(FAILED|ERROR)' "$out/gpu_tests_compiled.log" | head -5
  timeout "$limit" python3 -m profiling --lengths 8K,128K,32K --selection block_shared --modes fwd,fwd+bwd --forms eager,compiled \
    --baselines sdpa --no-stages --trace-lengths none --no-plots --out "$out/forms" > "$out/forms.log" 2>&1
  echo "forms: exit $?"; grep -E '^## |^\| [0-9]+K|x SDPA from' "$out/forms/report.md" 2>/dev/null
}

compiled_host() {
  for form in eager compiled; do
    timeout 150 python3 -m profiling.host_profile --lengths 8K --modes fwd,fwd+bwd --form $form --out "$out/host" \
      >> "$out/host.log" 2>&1
    echo "host_profile $form: exit $?"
  done
  grep -E '^T=' "$out/host.log"
  timeout "$limit" python3 -m profiling --lengths 8K --selection block_shared --modes fwd,fwd+bwd \
    --forms eager,compiled,cuda_graphs --baselines sdpa --no-stages --trace-lengths none --no-plots --out "$out/forms8k" \
    > "$out/forms8k.log" 2>&1
  echo "forms8k: exit $?"; grep -E '^## |^\| [0-9]+K|x SDPA from' "$out/forms8k/report.md" 2>/dev/null
}

forms_sweep() {  # a process whose first length is 8K, then the sweep with 8K last (NOTES Lever 58)
  timeout 120 python3 -m profiling --lengths 8K --selection block_shared --modes fwd,fwd+bwd --baselines none --no-stages \
    --trace-lengths none --no-plots --out "$out/first8k" > "$out/first8k.log" 2>&1
  echo "first8k: exit $?"; grep -E '^\| [0-9]+K' "$out/first8k/report.md" 2>/dev/null
  timeout "$limit" python3 -m profiling --lengths 128K,64K,32K,16K,8K --selection block_shared --modes fwd,fwd+bwd \
    --forms eager,compiled --baselines sdpa --no-stages --trace-lengths none --out "$out/sweep" > "$out/sweep.log" 2>&1
  echo "sweep: exit $?"; grep -E '^## |^### |^\| [0-9]+K|x SDPA from|t\(128K\)' "$out/sweep/report.md" 2>/dev/null
}

as_variant() {  # variant, command...: "new" = this tree; "base" = .ab/base's code, stamped with its commit;
  local v=$1; shift  # any other name = this tree under the tuning file $out/<variant>.json
  case $v in
    new) "$@" ;;
    base) (cd .ab/base && FLEXNSA_COMMIT=$(cat .commit) "$@") ;;
    *) FLEXNSA_TUNING=$out/$v.json "$@" ;;
  esac
}

alternate_8k() {  # variants...: host_profile compiled for each, then 8K fwd+bwd eager and compiled, the variants
  local v round baselines  # alternated twice on this machine (SDPA in the first run)
  for v in "$@"; do
    as_variant "$v" timeout 150 python3 -m profiling.host_profile --lengths 8K --modes fwd+bwd --form compiled \
      --out "$out/host_$v" > "$out/host_$v.log" 2>&1
    echo "host_profile $v: exit $?"; grep -E '^T=' "$out/host_$v.log"
  done
  for round in 1 2; do
    for v in "$@"; do
      baselines=none; [ "$round$v" = "1$1" ] && baselines=sdpa
      as_variant "$v" timeout 150 python3 -m profiling --lengths 8K --selection block_shared --modes fwd+bwd \
        --forms eager,compiled --baselines $baselines --no-stages --trace-lengths none --no-plots --out "$out/forms_${v}_$round" \
        > "$out/forms_${v}_$round.log" 2>&1
      echo "forms $v $round: exit $?"; grep -E '^\| [0-9]+K' "$out/forms_${v}_$round/report.md" 2>/dev/null
    done
  done
}

ab_8k() {
  [ -d .ab/base/flexnsa ] || { echo "ab_8k: no .ab/base (scripts/ab_base.sh COMMIT, carry .ab)"; return; }
  alternate_8k new base
}

indices_8k() {  # Lever 62 (kv_indices counted; this tree) against .ab/base (sorted), then the GPU tests of its callers
  ab_8k
  gpu_tests indices_ops tests/test_custom_ops.py
  gpu_tests indices_flex tests/test_flex.py -k "forward_backward or recompile"
}

lists_8k() {  # (session 29's call 1 named the wide-key file "rule": both knobs were off then)
  local v
  echo '{"selection": {"dkv": {"narrow_keys": false, "order": "sort"}}}' > "$out/wide.json"
  echo '{"selection": {"dkv": {"narrow_keys": true, "order": "sort"}}}' > "$out/narrow.json"
  echo '{"selection": {"dkv": {"order": "count"}}}' > "$out/count.json"
  alternate_8k wide narrow count
  for v in wide narrow count; do
    as_variant "$v" timeout 150 python3 -m profiling --lengths 16K --selection block_shared --modes fwd+bwd \
      --forms compiled --baselines none --no-stages --trace-lengths none --no-plots --out "$out/forms16_$v" \
      > "$out/forms16_$v.log" 2>&1
    echo "forms 16K $v: exit $?"; grep -E '^\| [0-9]+K' "$out/forms16_$v/report.md" 2>/dev/null
  done
  gpu_tests lists tests/test_triton_selection.py -k "inductor"
}

levers() {
  timeout 150 python3 -m profiling.kernel_tuning --lengths 128K --ops compression:block_shared --kernels dkv --match relaxed \
    --out "$out/tune_lever44" > "$out/tune_lever44.log" 2>&1
  echo "kernel_tuning: exit $?"; grep -E '^T=' "$out/tune_lever44.log" | cut -c1-150
  echo '{"compression": {"dkv": {"relaxed": false}}}' > "$out/no_lever44.json"
  echo '{"selection": {"dkv": {"interleave": false}}}' > "$out/no_lever45.json"
  for i in 1 2; do
    short_op "rule_$i" auto 128K fwd+bwd
    short_op "no_lever44_$i" auto 128K fwd+bwd "$out/no_lever44.json"
    short_op "no_lever45_$i" auto 128K fwd+bwd "$out/no_lever45.json"
  done
}

case "$part" in
  kernels) gpu_tests kernels $KERNEL_TESTS -k "not gluon" ;;  # the Gluon forward's tests: the gluon part
  kernels_a) gpu_tests kernels_a $KERNEL_TESTS_A -k "not gluon" ;;
  kernels_b) gpu_tests kernels_b $KERNEL_TESTS_B ;;
  op) gpu_tests op $OP_TESTS ;;
  model) gpu_tests model $MODEL_TESTS ;;
  sweep) sweep ;;
  pending) pending ;;
  diagnose) diagnose ;;
  dkv_ncu) dkv_ncu ;;
  levers) levers ;;
  compiled_op) compiled_op ;;
  compiled_host) compiled_host ;;
  forms_sweep) forms_sweep ;;
  ab_8k) ab_8k ;;
  lists_8k) lists_8k ;;
  indices_8k) indices_8k ;;
  backward_ops) gpu_tests backward_ops tests/test_custom_ops.py tests/test_fused_gates.py tests/test_triton_selection.py \
    tests/test_triton_window.py ;;
  gluon) gluon ;;
  fwd_cost) fwd_cost ;;
  gluon_op) gluon_op ;;
  gluon_rule) gluon_rule ;;
  scores) scores ;;
  scores_op) scores_op ;;
  gluon_scores) gluon_scores ;;
  convoy) convoy ;;
  pipelined_scores) pipelined_scores ;;
  one_stage) one_stage ;;
  pipelined_ncu) pipelined_ncu ;;
  all) gpu_tests kernels $KERNEL_TESTS; gpu_tests op $OP_TESTS; gpu_tests model $MODEL_TESTS; sweep ;;
  *) echo "unknown part '$part' ($PARTS)" >&2; exit 2 ;;
esac

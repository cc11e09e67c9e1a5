"""pytest-benchmark regression checks: the whole NSA op and each stage, at a few lengths.

In the normal test run (``--benchmark-disable``, pyproject) each case runs once as a smoke test.
To time and compare against the saved baseline (README "Benchmark regression check"):
    pytest tests/benchmarks --benchmark-enable --benchmark-storage=tests/benchmarks/baselines \\
        --benchmark-compare --benchmark-compare-fail=median:15%
GPU cases (Q7B shape, bf16, 8K and 32K) are marked ``gpu``; CPU cases are small fp32 forwards.
"""

import pytest
import torch

from flexnsa import NSAConfig, nsa_attention
from profiling.measure import STAGES, Shape, _with_backward, random_inputs, stage_functions

GPU_CASES = [(T, mode, sel) for T in (8192, 32768) for mode in ("fwd", "fwd+bwd") for sel in ("per_token", "block_shared")]
CPU_CASES = [(T, "fwd", "per_token") for T in (256, 512)]


def case_setup(device, T, mode, selection):
    if device == "cuda":
        shape = Shape(1, 28, 4, 128, torch.bfloat16, torch.device("cuda"))
    else:
        shape = Shape(1, 14, 2, 64, torch.float32, torch.device("cpu"))
    config = NSAConfig(selection=selection, check_inputs=False)
    backward = mode == "fwd+bwd"
    q, k, v, g = random_inputs(shape, T, seed=0, requires_grad=backward)
    return shape, config, backward, (q, k, v, g), torch.randn_like(q)


def run_benchmark(benchmark, fn, device, leaves):
    def step():
        for t in leaves:
            t.grad = None
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # compile / autotune outside the measurement
    benchmark.pedantic(step, rounds=10 if device == "cuda" else 3, warmup_rounds=2 if device == "cuda" else 0)


def bench_op(benchmark, device, T, mode, selection):
    shape, config, backward, inputs, grad = case_setup(device, T, mode, selection)
    with torch.set_grad_enabled(backward):
        fn = _with_backward(lambda: nsa_attention(*inputs, config), grad, backward)
        run_benchmark(benchmark, fn, device, inputs)


def bench_stage(benchmark, device, T, mode, selection, stage):
    shape, config, backward, inputs, grad = case_setup(device, T, mode, selection)
    with torch.set_grad_enabled(backward):
        fns, leaves = stage_functions(*inputs, grad, config, backward)
        run_benchmark(benchmark, fns[stage], device, leaves)


def ids(case):
    T, mode, sel = case
    return f"{T // 1024}K-{mode}-{sel}" if T >= 1024 else f"{T}-{mode}-{sel}"


@pytest.mark.parametrize("case", CPU_CASES, ids=[ids(c) for c in CPU_CASES])
def test_op_cpu(benchmark, case):
    with torch.no_grad():
        bench_op(benchmark, "cpu", *case)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", CPU_CASES[:1], ids=[ids(c) for c in CPU_CASES[:1]])
def test_stage_cpu(benchmark, case, stage):
    with torch.no_grad():
        bench_stage(benchmark, "cpu", *case, stage)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[ids(c) for c in GPU_CASES])
def test_op_gpu(benchmark, case):
    bench_op(benchmark, "cuda", *case)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", GPU_CASES, ids=[ids(c) for c in GPU_CASES])
def test_stage_gpu(benchmark, case, stage):
    bench_stage(benchmark, "cuda", *case, stage)

"""Median latency of a callable: CUDA events via triton's do_bench on a GPU, a host clock on CPU."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: int = 25, rep_ms: int = 100, grad_to_none=None) -> float:
    """Median milliseconds of ``fn()`` after warm-up (fn is already compiled by the caller)."""
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")
        )
    fn()  # warm-up
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def host_ms(fn: Callable[[], object], device: torch.device, *, reps: int = 10, grad_to_none=None) -> float | None:
    """Median host milliseconds to issue one call of ``fn`` (the device queue drained before each,
    no wait after): at or above the device time, the call is launch-bound at that size and its
    time depends on the host CPU. None off CUDA (there the host runs the work itself)."""
    if device.type != "cuda":
        return None
    times = []
    for _ in range(reps):
        for x in grad_to_none or []:
            x.grad = None
        synchronize(device)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    synchronize(device)
    return statistics.median(times)


def first_call_s(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one (cold) call, synchronised: compile time + one run."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated device memory (MiB) while ``fn`` runs, inputs included; None on CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Measured dense matmul rate (the FLOP ceiling for the floor), on random data."""
    if device.type != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = median_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12

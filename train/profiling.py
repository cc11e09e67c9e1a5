"""torch.profiler around chosen training steps (``log.profile_steps``), on every rank.

Why: comparing a step of NSA with a step of dense attention kernel by kernel is how the gap between
the op's speedup and the model's shows up (profiling/NOTES.md, training). Each profiled step writes
``profile/step<N>.rank<R>.pt.trace.json.gz`` (open in Perfetto or TensorBoard) and
``profile/step<N>.rank<R>.top.txt``: the operators and kernels with the most self device time
(self CPU time on a CPU run).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

TOP_ROWS = 40


@contextlib.contextmanager
def profiled_step(step: int, steps: list[int], output: Path, rank: int, device: torch.device):
    """Profile this step if it is listed; otherwise a no-op."""
    if step not in steps:
        yield
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    folder = output / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, record_shapes=False) as prof:
        yield
    stem = folder / f"step{step}.rank{rank}"
    prof.export_chrome_trace(str(stem) + ".pt.trace.json.gz")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (Path(str(stem) + ".top.txt")).write_text(prof.key_averages().table(sort_by=sort, row_limit=TOP_ROWS))

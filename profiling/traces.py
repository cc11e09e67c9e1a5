"""torch.profiler traces of the NSA op, readable by TensorBoard (torch-tb-profiler) and Perfetto."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler

from flexnsa import NSAConfig, nsa_attention

from .measure import Shape, random_inputs


def write_trace(shape: Shape, seq_len: int, config: NSAConfig, variant: str, mode: str, out_dir: Path) -> Path:
    """Profile a few steps of the op (after one warm-up step) into ``out_dir``; returns the folder.
    Beside the trace, ``<worker>.kernels.txt``: device time per kernel over the 2 profiled steps,
    so where the op's time goes can be read without opening the trace."""
    backward = mode == "fwd+bwd"
    q, k, v, gates = random_inputs(shape, seq_len, 0, backward)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if shape.device.type == "cuda" else [])
    worker = f"nsa-{variant}-{mode.replace('+', '_')}-T{seq_len}"
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.set_grad_enabled(backward), profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=1, active=2, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(out_dir), worker_name=worker),
        record_shapes=True,
    ) as prof:
        for _ in range(3):
            with record_function(f"nsa_{mode}"):
                out = nsa_attention(q, k, v, gates, config)
                if backward:
                    out.backward(torch.ones_like(out))
            prof.step()
    device_sort = "self_cuda_time_total" if shape.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=device_sort, row_limit=40, max_name_column_width=90)
    (out_dir / f"{worker}.kernels.txt").write_text(table + "\n")
    return out_dir

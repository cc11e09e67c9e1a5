"""torch.profiler traces of the NSA op, readable by TensorBoard (torch-tb-profiler) and Perfetto."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from flexnsa import NSAConfig, nsa_attention

from .measure import Shape, random_inputs


PROFILED_STEPS = 2


def write_trace(shape: Shape, seq_len: int, config: NSAConfig, variant: str, mode: str, out_dir: Path) -> Path:
    """Profile PROFILED_STEPS calls of the op (after one warm-up call, outside the profiler, that
    compiles and tunes) into ``out_dir/<worker>.pt.trace.json``; returns the folder.

    Beside it, ``<worker>.kernels.txt``: time per op and kernel over exactly those calls ("# of
    Calls" counts them). One profiler cycle without a schedule: with a warm-up/active schedule,
    key_averages mixed events across cycles and its kernel rows added up to 1.2-2x their parent
    ops' time (profiling/NOTES.md, Lever 25)."""
    backward = mode == "fwd+bwd"
    q, k, v, gates = random_inputs(shape, seq_len, 0, backward)
    cuda = shape.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    worker = f"nsa-{variant}-{mode.replace('+', '_')}-T{seq_len}"
    out_dir.mkdir(parents=True, exist_ok=True)

    def call():
        for x in (q, k, v, gates):  # as the timed runs do (grad_to_none): no AccumulateGrad adds in the trace
            x.grad = None
        with record_function(f"nsa_{mode}"):
            out = nsa_attention(q, k, v, gates, config)
            if backward:
                out.backward(torch.ones_like(out))

    with torch.set_grad_enabled(backward):
        call()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(PROFILED_STEPS):
                call()
            if cuda:
                torch.cuda.synchronize()
    prof.export_chrome_trace(str(out_dir / f"{worker}.pt.trace.json"))
    device_sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=device_sort, row_limit=40, max_name_column_width=90)
    (out_dir / f"{worker}.kernels.txt").write_text(table + "\n")
    return out_dir

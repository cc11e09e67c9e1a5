"""``results.json``: what one training run measured, written by rank 0 at the end of the run.

Fields (times in seconds, memory in GiB):
- ``mode`` (nsa | dense), ``tokens_per_sample`` (longest sample seen), ``world_size``, ``steps``
  (finished so far: the file is rewritten after every step, ``complete`` once the run ended),
  ``micro_batch_size``, ``global_batch_size``;
- ``step_time_s`` / ``tokens_per_s``: medians over the steps after the first
  ``log.timing_warmup_steps`` (compile and warm-up); tokens/s counts every rank's tokens (the
  global throughput), ``tokens_per_s_per_gpu`` divides it by the world size. ``step_times_s``
  lists every step;
- ``peak_memory_gib``: max over ranks of ``torch.cuda.max_memory_allocated`` (CPU: peak RSS),
  ``peak_reserved_gib`` likewise for the caching allocator's reserved memory, ``peak_memory_gib_per_rank``;
- ``first_step_overhead_s``: first step time minus the median (compile + autotuning + allocator
  and communicator warm-up: the cost of starting, not only compilation);
- ``compile``: rank 0's torch.compile record: ``compile_time_s`` = dynamo's own timers summed
  (``_compile.compile_inner``: every frame's trace + AOT + inductor forward compile, plus
  ``compile_fx.<locals>.bw_compiler``: the backward graphs, compiled lazily at the first
  backward); ``frames_compiled`` (dynamo ``counters["frames"]["ok"]``), ``graphs_compiled``
  (``counters["stats"]["unique_graphs"]``: graph breaks give several per frame),
  ``recompiles`` (compiled frames whose code already had a compiled entry, i.e. records of
  ``torch._dynamo.utils.get_compilation_metrics()`` with a ``recompile_reason``), split by
  function in ``recompiles_by_function`` (flexnsa's compiled ``flex_attention`` legitimately
  has one entry per mask kind and shape; a decoder layer should have none), and the first
  distinct ``recompile_reasons``; ``graph_breaks`` (dynamo ``counters["graph_break"]``, summed);
- ``gpu``, ``torch``, ``transformers``, ``commit`` (env ``FLEXNSA_COMMIT``), ``config`` (all settings).
"""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
import statistics
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

COMPILE_TIMERS = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")
MAX_REASONS = 8


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def compile_stats() -> dict:
    """This process's torch.compile totals (see the module docstring)."""
    try:
        from torch._dynamo.utils import (
            compilation_time_metrics,
            counters,
            get_compilation_metrics,
        )
    except ImportError:  # pragma: no cover - dynamo is part of every supported torch
        return {}
    timers = {key: round(sum(compilation_time_metrics.get(key, [])), 3) for key in COMPILE_TIMERS}
    records = list(get_compilation_metrics())
    recompiled = [r for r in records if getattr(r, "recompile_reason", None)]
    distinct = list(dict.fromkeys(str(r.recompile_reason)[:300] for r in recompiled))
    by_function = Counter(function_name(r) for r in recompiled)
    return {
        "compile_time_s": round(sum(timers.values()), 3),
        "timers_s": timers,
        "frames_compiled": int(counters["frames"]["ok"]),
        "graphs_compiled": int(counters["stats"]["unique_graphs"]),
        "recompiles": len(recompiled),
        "recompiles_by_function": dict(by_function),
        "recompile_reasons": distinct[:MAX_REASONS],
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "records_kept": len(records),  # dynamo keeps a bounded number of records (64 by default)
    }


def function_name(record) -> str:
    filename = getattr(record, "co_filename", None) or "?"
    return f"{getattr(record, 'co_name', '?')} ({Path(filename).name}:{getattr(record, 'co_firstlineno', '?')})"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def peak_memory(device: torch.device) -> tuple[float, float]:
    """(allocated, reserved) peaks in GiB; on CPU both are the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return rss, rss


def gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Collective: every rank's ``values``, indexed [rank][i]."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return [t.tolist() for t in out]


def summarize(step_times: list[float], step_tokens: list[int], warmup: int) -> dict:
    """Medians over the steps after ``warmup`` (all steps when the run is too short to skip any)."""
    if not step_times:
        return {"step_time_s": None, "tokens_per_s": None, "timed_steps": 0, "first_step_overhead_s": None}
    timed = list(zip(step_times, step_tokens))[warmup:] or list(zip(step_times, step_tokens))
    median_time = statistics.median(t for t, _ in timed)
    return {
        "step_time_s": median_time,
        "tokens_per_s": statistics.median(n / t for t, n in timed),
        "timed_steps": len(timed),
        "first_step_overhead_s": step_times[0] - median_time,
    }


def write_results(path: Path, *, config, device, world: int, step_times, step_tokens, tokens_per_sample: int,
                  complete: bool) -> dict | None:
    """Collective (memory is gathered from every rank); rank 0 writes ``path`` and returns the record.

    The trainer calls it after every step (``complete`` false) and at the end, so a run stopped
    early (a time limit) still leaves the numbers of the steps it finished.
    """
    allocated, reserved = peak_memory(device)
    per_rank = gather_floats([allocated, reserved], device)
    if dist.get_rank() != 0:
        return None
    import transformers

    summary = summarize(step_times, step_tokens, config.log.timing_warmup_steps)
    record = {
        "mode": config.model.attention,
        "model": config.model.source,
        "tokens_per_sample": tokens_per_sample,
        "world_size": world,
        "micro_batch_size": config.data.micro_batch_size,
        "global_batch_size": config.data.global_batch_size,
        "steps": len(step_times),
        "complete": complete,
        "warmup_steps": config.log.timing_warmup_steps,
        **summary,
        "tokens_per_s_per_gpu": summary["tokens_per_s"] / world if summary["tokens_per_s"] else None,
        "step_times_s": [round(t, 4) for t in step_times],
        "peak_memory_gib": max(r[0] for r in per_rank),
        "peak_reserved_gib": max(r[1] for r in per_rank),
        "peak_memory_gib_per_rank": [round(r[0], 3) for r in per_rank],
        "compile": compile_stats(),  # also flexnsa's own compiled flex_attention when train.compile is off
        "gpu": device_name(device),
        "device_count": world,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": transformers.__version__,
        "commit": os.environ.get("FLEXNSA_COMMIT") or "unknown",
        "config": config.to_dict(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return record

"""GPU kernel time of a torch.profiler trace, grouped by kind and by the CPU op that launched it,
and the step's timeline: when the GPU ran nothing, and when it only communicated.

Why: comparing a profiled NSA training step with a dense one (``log.profile_steps``) kernel kind by
kernel kind is what located session 5's gap (profiling/NOTES.md); the raw traces are megabytes, so
the repo keeps this summary instead. Session 9 cut 134 ms of compute kernels from NSA's step and the
step did not move: kernel sums do not show what the GPU waited for, the timeline does.

    python -m train.trace_summary STEP.pt.trace.json.gz [...] --out summary.md
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import re
from pathlib import Path

# The Triton kernels' names: compression (_cmp_*), selection and Triton window (_slc_*), scorers.
NSA_KERNELS = ("_cmp_fwd_kernel", "_cmp_dq_kernel", "_cmp_dkv_kernel", "_slc_fwd_kernel", "_slc_dq_kernel", "_slc_dkv_kernel",
               "_group_scores_kernel", "_top_n_kernel")
GPU_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def kernel_kind(name: str) -> str:
    if name.startswith("nvjet") or "gemm" in name.lower() or ("cutlass" in name and "tensorop" in name):
        return "GEMM"
    if "sdpa" in name or "flash" in name.lower() or "fmha" in name:
        return "dense attention (cuDNN/flash)"
    if name in NSA_KERNELS:
        return f"NSA Triton {name}"
    if "flex_attention" in name:
        return "NSA FlexAttention (window)"
    if "nccl" in name.lower():
        return "NCCL"
    if name.startswith("triton_"):
        return f"inductor {name.split('_')[1]}"
    if name.startswith(("Memcpy", "Memset")):
        return name.split(" (")[0]
    return "aten " + re.sub(r"<.*", "", name.replace("void ", ""))[:50]


def _caller_stacks(events):
    """launch correlation id -> names of the CPU ops enclosing the launch, outermost first."""
    ops = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation") and e.get("ph") == "X":
            ops[e["tid"]].append(e)
    for v in ops.values():
        v.sort(key=lambda e: e["ts"])
    starts = {t: [e["ts"] for e in v] for t, v in ops.items()}
    stacks = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            mine = ops.get(e["tid"], [])[: bisect.bisect_right(starts.get(e["tid"], []), e["ts"])]
            enclosing = sorted((o for o in mine if o["ts"] + o["dur"] >= e["ts"]), key=lambda o: (o["ts"], -o["dur"]))
            stacks[e["args"]["correlation"]] = [o["name"] for o in enclosing]
    return stacks


def _union(intervals):
    """Merged [start, end) intervals, sorted."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _length(intervals) -> float:
    return sum(end - start for start, end in intervals)


def timeline(gpu, stacks, top: int = 10, min_gap_us: float = 50.0) -> list[str]:
    """Lines on the span from the first GPU event to the last: time with no GPU work at all (gaps,
    the longest with what was launched after each, i.e. what the GPU waited for) and time when only
    communication (NCCL) ran, i.e. not hidden behind compute."""
    if not gpu:
        return []
    span = (min(e["ts"] for e in gpu), max(e["ts"] + e["dur"] for e in gpu))
    busy = _union((e["ts"], e["ts"] + e["dur"]) for e in gpu)
    compute = _union((e["ts"], e["ts"] + e["dur"]) for e in gpu if kernel_kind(e["name"]) != "NCCL")
    starts = sorted(gpu, key=lambda e: e["ts"])
    start_ts = [e["ts"] for e in starts]
    gaps = []
    for (_, end), (nxt, _) in zip(busy, busy[1:]):
        if nxt - end >= min_gap_us:
            after = starts[bisect.bisect_left(start_ts, nxt)]
            stack = [x for x in stacks.get(after.get("args", {}).get("correlation"), ["?"])
                     if not x.startswith(("ProfilerStep", "Torch-Compiled"))]
            gaps.append((nxt - end, end - span[0], after["name"][:50], " > ".join(stack[-3:])[:110]))
    total = span[1] - span[0]
    idle = total - _length(busy)
    lines = ["", "Timeline (first to last GPU event):", "",
             "| span ms | GPU idle ms | only communication ms | gaps >= %d us (count, ms) |" % min_gap_us, "|---|---|---|---|",
             f"| {total / 1e3:.1f} | {idle / 1e3:.1f} | {(_length(busy) - _length(compute)) / 1e3:.1f} | "
             f"{len(gaps)}, {sum(g[0] for g in gaps) / 1e3:.1f} |",
             "", f"Longest gaps (what was launched after each), top {top}:", "",
             "| gap ms | at ms | next kernel | its CPU ops |", "|---|---|---|---|"]
    lines += [f"| {g / 1e3:.2f} | {at / 1e3:.1f} | `{name}` | `{ops}` |" for g, at, name, ops in sorted(gaps, reverse=True)[:top]]
    by_ops = collections.Counter()
    count = collections.Counter()
    for g, _, _, ops in gaps:
        by_ops[ops] += g
        count[ops] += 1
    lines += ["", f"Gaps summed by the CPU ops of the kernel launched after them, top {top}:", "",
              "| ms | gaps | CPU ops |", "|---|---|---|"]
    lines += [f"| {v / 1e3:.1f} | {count[k]} | `{k}` |" for k, v in by_ops.most_common(top)]
    return lines


def summarize(path: Path, top: int = 25) -> str:
    events = json.load(gzip.open(path) if path.suffix == ".gz" else open(path))["traceEvents"]
    gpu = [e for e in events if e.get("cat") in GPU_EVENTS]
    stacks = _caller_stacks(events)
    kinds, counts, callers = collections.Counter(), collections.Counter(), collections.Counter()
    for e in gpu:
        kind = kernel_kind(e["name"])
        stack = [s for s in stacks.get(e.get("args", {}).get("correlation"), ["?"])
                 if not s.startswith(("FSDP", "Torch-Compiled", "ProfilerStep"))]
        if kind.startswith("NSA Triton"):  # the same kernel names serve both branches: name the op
            op = next((s for s in reversed(stack) if s.startswith("flexnsa::")), None)
            kind += f" ({op})" if op else ""
        kinds[kind] += e["dur"]
        counts[kind] += 1
        if kind.startswith("aten") or kind in ("Memcpy DtoD", "dense attention (cuDNN/flash)"):  # who launched it
            node = next((s.split(": ", 1)[1] for s in stack if s.startswith("autograd::engine")), "forward")
            callers[f"{node[:50]} | {' > '.join(s for s in stack if not s.startswith('autograd::engine'))[:110]}"] += e["dur"]
    lines = [f"## {path.name}", "", f"GPU time {sum(kinds.values()) / 1e6:.3f} s in {len(gpu)} kernels and copies.", "",
             "| kernels | ms | count |", "|---|---|---|"]
    lines += [f"| {k} | {v / 1e3:.1f} | {counts[k]} |" for k, v in kinds.most_common()]
    lines += ["", f"Eager (aten) and dense-attention kernels by caller, top {top} (autograd node | enclosing CPU ops):", "",
              "| ms | caller |", "|---|---|"]
    lines += [f"| {v / 1e3:.1f} | `{k}` |" for k, v in callers.most_common(top)]
    lines += timeline(gpu, stacks)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.trace_summary")
    p.add_argument("traces", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    args.out.write_text("# GPU kernel time by kind and caller, and the timeline\n\n" + "\n".join(summarize(t, args.top) for t in args.traces))


if __name__ == "__main__":
    main()

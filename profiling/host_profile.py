"""Where the host's time to issue the NSA op goes (cProfile), at lengths where the op is
launch-bound: the profiler's ``host ms`` says *that* the host is the limit (8K fwd+bwd: ~5 ms to
issue, against ~4.4 ms of GPU work as CUDA-graph replays); this says *which* Python does it.

After a warm-up that compiles everything, ``--calls`` calls of the op are issued under cProfile,
the device drained after each (so the GPU never holds the host back; cProfile itself slows
Python down, so read the shares, not the absolute times). Writes ``host_profile_T<T>_<mode>.txt``
(the top functions by own time and by cumulative time, and the plain host ms per call without
the profiler) under ``--out``.

    python -m profiling.host_profile --lengths 8K,16K --out DIR        (GPU; CPU runs too, slowly)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from pathlib import Path

import torch

from flexnsa import NSAConfig

from .cli import DTYPES, device_stamp, parse_lengths, pick_device
from .measure import MODES, Shape, op_call
from .timing import host_ms, synchronize


def profile_calls(fn, device: torch.device, calls: int, grads) -> pstats.Stats:
    prof = cProfile.Profile()
    for _ in range(calls):
        for x in grads:
            x.grad = None
        synchronize(device)
        prof.enable()
        fn()
        prof.disable()
    synchronize(device)
    return pstats.Stats(prof)


def report(stats: pstats.Stats, rows: int) -> str:
    text = io.StringIO()
    stats.stream = text
    for key in ("tottime", "cumulative"):
        text.write(f"\n## top {rows} by {key}\n")
        stats.sort_stats(key).print_stats(rows)
    return text.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m profiling.host_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8K")
    p.add_argument("--modes", default="fwd+bwd", help="fwd, fwd+bwd or both (comma list)")
    p.add_argument("--selection", choices=["per_token", "block_shared"], default="block_shared")
    p.add_argument("--window-kernel", default="auto")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        p.error(f"--modes: unknown {sorted(set(modes) - set(MODES))}; choose from {MODES}")
    device = pick_device(args.device)
    shape = Shape(1, 28, 4, 128, DTYPES[args.dtype], device)
    cfg = NSAConfig(selection=args.selection, window_kernel=args.window_kernel, check_inputs=False)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = device_stamp()
    for seq_len in parse_lengths(args.lengths):
        for mode in modes:
            fn, inputs = op_call(shape, seq_len, cfg, mode == "fwd+bwd")
            for _ in range(3):  # compile, autotune, allocator warm-up
                fn()
            plain = host_ms(fn, device, reps=args.calls, grad_to_none=inputs)
            stats = profile_calls(fn, device, args.calls, inputs)
            head = f"# host profile: T={seq_len} {mode}, {args.calls} calls, {stamp}\n# host ms per call without the profiler: {plain}\n"
            path = args.out / f"host_profile_T{seq_len}_{mode.replace('+', '_')}.txt"
            path.write_text(head + report(stats, args.rows))
            print(f"T={seq_len} {mode}: host {plain} ms per call -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

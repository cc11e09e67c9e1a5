"""The NSA op in a loop, for profilers that attach from outside (Nsight Compute, compute-sanitizer).

One warm-up call compiles and tunes everything; then ``--calls`` calls run between
``cudaProfilerStart`` and ``cudaProfilerStop``, so ``ncu --profile-from-start off`` sees only
them (no compile-time launches), e.g. the kernels of one 128K fwd+bwd:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... \\
        python3 -m profiling.op_loop --lengths 128K --calls 1
"""

from __future__ import annotations

import argparse

import torch

from flexnsa import NSAConfig

from .cli import DTYPES, parse_lengths, pick_device
from .measure import INPUTS, MODES, op_call, q7b_shape
from .timing import synchronize


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m profiling.op_loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="128K")
    p.add_argument("--mode", choices=MODES, default="fwd+bwd")
    p.add_argument("--selection", choices=["per_token", "block_shared"], default="block_shared")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--inputs", choices=list(INPUTS), default="random", help="as python -m profiling --inputs")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    cfg = NSAConfig(selection=args.selection, check_inputs=False)
    for seq_len in parse_lengths(args.lengths):
        call, _ = op_call(q7b_shape(DTYPES[args.dtype], device, args.inputs), seq_len, cfg, args.mode == "fwd+bwd")
        call()
        synchronize(device)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.profiler.start()
        for _ in range(args.calls):
            call()
        synchronize(device)
        if cuda:
            torch.cuda.profiler.stop()
        print(f"T={seq_len} {args.mode}: {args.calls} profiled call(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

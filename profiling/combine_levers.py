"""What the combine stage's forward time is made of (NOTES "Next measurements" 1).

The profiler's combine stage times the window's GQA fold of q together with the gated sum; at
128K its forward (6.9 ms) did not move when the sum was compiled (session 5). This times the
pieces apart: the fold, the eager sum, and the compiled sum with dynamic shapes (as the op runs
it) or static ones, fed the model's token-major gates (a permuted view, session 5) or head-major
gates (a contiguous copy, Lever 16).

    python -m profiling.combine_levers --out DIR [--lengths 128K]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flexnsa.backends import flex as stages
from flexnsa.block_masks import QueryLayout

from .cli import device_stamp, parse_lengths
from .measure import q7b_shape, random_inputs
from .timing import median_ms


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m profiling.combine_levers")
    p.add_argument("--lengths", default="128K")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = q7b_shape(dtype, device)
    static_sum = torch.compile(stages.gated_sum, fullgraph=True, dynamic=False)
    rows = []
    for T in parse_lengths(args.lengths):
        q, _, _, gates = random_inputs(shape, T, seed=0, requires_grad=False)  # gates [B, T, Hq, 3]
        cmp, slc, win = (torch.randn_like(q) for _ in range(3))
        layout = QueryLayout("gqa_folded", 7)
        token_major = gates.transpose(1, 2)  # the model's [B, T, Hq, 3] gates seen head-major (session 5's input)
        head_major = token_major.contiguous()
        pieces = {
            "fold": lambda: layout.fold(q),
            "sum_eager": lambda: stages.gated_sum(head_major, cmp, slc, win),
            "sum_compiled_dynamic token-major gates": lambda: stages.compiled_gated_sum(token_major, cmp, slc, win),
            "sum_compiled_static token-major gates": lambda: static_sum(token_major, cmp, slc, win),
            "sum_compiled_dynamic head-major gates": lambda: stages.compiled_gated_sum(head_major, cmp, slc, win),
            "stage (fold + combine)": lambda: (layout.fold(q), stages.combine(gates, cmp, slc, win)),
        }
        for name, fn in pieces.items():
            fn()
            ms = median_ms(fn, device, rep_ms=200)
            rows.append({"seq_len": T, "piece": name, "ms": ms})
            print(f"T={T} {name:40s} {ms:8.3f} ms", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "combine_levers.json").write_text(json.dumps({"meta": device_stamp(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Lever experiment for the selection branch (profiling/NOTES.md, Lever 9): at the Q7B shape, the
selection stage as the op runs it with FlexAttention (BlockMask from the ids) against the Triton
selected-block kernel (its launch tuning: profiling/kernel_tuning.py). Selections come from the
real scorer on random inputs; the Triton output is compared with FlexAttention's.

    python -m profiling.selection_kernel_levers --lengths 32K,128K --out DIR   (GPU only)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flexnsa import NSAConfig
from flexnsa.backends import flex as stages
from .cli import device_stamp, parse_lengths
from .measure import q7b_shape, random_inputs
from .timing import median_ms

VARIANTS = ["flex", "triton"]


def selection_fn(q, k, v, selected, cfg: NSAConfig, grad, backward: bool):
    layout = stages.query_layout(cfg, q.device, q.shape[1] // k.shape[1])
    with torch.no_grad():
        masks = stages.build_masks(selected, q.shape[2], layout, cfg)
    q_rows = layout.fold(q)

    def run():
        out = stages.selection_branch(q, q_rows, k, v, selected, masks, layout, cfg)
        if backward:
            out.backward(grad)
        return out

    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m profiling.selection_kernel_levers")
    p.add_argument("--lengths", default="32K,128K")
    p.add_argument("--selection", default="block_shared,per_token")
    p.add_argument("--skip", default="", help="comma list of selection:variant:mode to skip (e.g. slow flex cases)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    shape = q7b_shape(torch.bfloat16, device)
    skip = set(filter(None, args.skip.split(",")))
    rows = []
    for T in parse_lengths(args.lengths):
        q, k, v, _ = random_inputs(shape, T, seed=0, requires_grad=True)
        grad = torch.randn_like(q)
        for selection in args.selection.split(","):
            cfg = NSAConfig(selection=selection, check_inputs=False)
            with torch.no_grad():
                selected, _ = stages.score_and_select(q, stages.compress(k, v, cfg)[0], cfg)
                reference = None
            for name in VARIANTS:
                vcfg = cfg.replace(selection_kernel=name)
                with torch.no_grad():
                    out = selection_fn(q, k, v, selected, vcfg, None, False)()
                if reference is None:
                    reference = out
                err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
                for mode in ("fwd", "fwd+bwd"):
                    if f"{selection}:{name}:{mode}" in skip:
                        continue
                    backward = mode == "fwd+bwd"
                    with torch.set_grad_enabled(backward):
                        fn = selection_fn(q, k, v, selected, vcfg, grad, backward)
                        fn()
                        ms = median_ms(fn, device, rep_ms=200, grad_to_none=[q, k, v])
                    rows.append({"seq_len": T, "selection": selection, "variant": name, "mode": mode, "ms": ms,
                                 "rel_err_vs_flex": err})
                    print(f"T={T} {selection:12s} {name:16s} {mode:7s} {ms:9.3f} ms  rel.err vs flex {err:.2e}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = device_stamp()
    (args.out / "selection_kernel_levers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

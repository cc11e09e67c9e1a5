"""Do two branch kernels gain from running at once on two CUDA streams? (NOTES session 16)

Nsight Compute says the selection dK/dV is memory-bound (L2 81% busy) while the compression and
window kernels are latency-bound (2 CTAs per SM, L2 31-57%): on one stream they run back to back,
on two their CTAs can share SMs where shared memory and registers leave room. This times, at the
Q7B shape on random inputs, each pair of independent branch passes alone and together:

    python -m profiling.overlap_probe --lengths 128K --out DIR   (GPU only)

A pair's ``gain`` = its time on one stream (a then b) - its time on two: what a two-stream
schedule could take off the op (compare it with ``a_ms + b_ms`` too: NOTES session 16).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flexnsa import NSAConfig
from flexnsa.backends import flex as stages
from flexnsa.triton_fallback.compression_attention import compression_attention_bwd, compression_attention_fwd
from flexnsa.triton_fallback.selection_attention import selection_attention_bwd, selection_attention_fwd, window_rows

from .cli import device_stamp, parse_lengths
from .measure import q7b_shape, random_inputs
from .timing import median_ms


def branch_passes(T: int, cfg: NSAConfig, device: torch.device, dtype=torch.bfloat16) -> dict:
    """The fused-gates path's branch passes at length T as zero-argument callables: forward and
    backward of compression, selection and window, on the inputs the op would give them."""
    shape = q7b_shape(dtype, device)
    q, k, v, _ = random_inputs(shape, T, seed=0, requires_grad=False)
    dy = torch.randn_like(q)
    scale = cfg.softmax_scale(q.shape[-1])
    win_block = stages.WINDOW_KERNEL_BLOCK
    tile = cfg.select_query_tile
    w_rows = window_rows(1, k.shape[1], T, cfg.window, win_block, q.device).contiguous()
    k_cmp, v_cmp = stages.compress(k, v, cfg)
    passes = {
        "cmp_fwd": lambda: compression_attention_fwd(q, k_cmp, v_cmp, cfg.block_size, cfg.stride, scale),
        "slc_fwd": lambda: selection_attention_fwd(q, k, v, rows, cfg.select_block_size, tile, scale),
        "win_fwd": lambda: selection_attention_fwd(q, k, v, w_rows, win_block, win_block, scale, cfg.window),
    }
    cmp, cmp_lse = passes["cmp_fwd"]()
    rows = stages.selection_rows(stages.score_and_select(q, k_cmp, cfg, cmp_lse=cmp_lse)[0], cfg).contiguous()
    (slc, slc_lse), (win, win_lse) = passes["slc_fwd"](), passes["win_fwd"]()
    return passes | {
        "cmp_bwd": lambda: compression_attention_bwd(q, k_cmp, v_cmp, cmp, cmp_lse, dy, cfg.block_size, cfg.stride, scale),
        "slc_bwd": lambda: selection_attention_bwd(q, k, v, rows, slc, slc_lse, dy, cfg.select_block_size, tile, scale),
        "win_bwd": lambda: selection_attention_bwd(q, k, v, w_rows, win, win_lse, dy, win_block, win_block, scale, cfg.window),
    }


def together(a, b, side: torch.cuda.Stream):
    """a on a side stream, b on the current one, joined: the two-stream schedule of a pair."""

    def run():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            a()
        b()
        main.wait_stream(side)

    return run


PAIRS = [("cmp_fwd", "win_fwd"), ("slc_fwd", "win_fwd"), ("cmp_fwd", "slc_fwd"),
         ("cmp_bwd", "slc_bwd"), ("cmp_bwd", "win_bwd"), ("win_bwd", "slc_bwd")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m profiling.overlap_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="128K")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    cfg = NSAConfig(selection="block_shared", check_inputs=False)
    side = torch.cuda.Stream()
    results = []
    for T in parse_lengths(args.lengths):
        fns = branch_passes(T, cfg, device)
        alone = {name: median_ms(fn, device) for name, fn in fns.items()}
        for a, b in PAIRS:
            both = median_ms(together(fns[a], fns[b], side), device)
            serial = median_ms(lambda: (fns[a](), fns[b]()), device)
            row = dict(T=T, a=a, b=b, a_ms=alone[a], b_ms=alone[b], serial_ms=serial, together_ms=both,
                       gain_ms=serial - both)
            results.append(row)
            print(f"T={T} {a} || {b}: alone {alone[a]:.3f} + {alone[b]:.3f}, serial {serial:.3f}, "
                  f"two streams {both:.3f} (gain {serial - both:+.3f} ms)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overlap_probe.json").write_text(json.dumps({"device": device_stamp(), "results": results}, indent=1))


if __name__ == "__main__":
    main()

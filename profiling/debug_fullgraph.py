"""Diagnose compiled (fullgraph, inductor) vs eager differences of the NSA op branch by branch
(GPU). Usage: python -m profiling.debug_fullgraph

Seen on an H200 with torch 2.11 (session 3): selected blocks equal, compression and window
branches exact, selection branch relative error 1.0, in every variant below (Triton or torch
compression kernels, folded or per-head layout, q fold forced to a copy), and unchanged after
building the selection bit table out of place. Hence the op refuses whole-op tracing on CUDA with
``selection_kernel='flex'`` (what this script runs; the Triton selection kernel, the CUDA default
since session 4, compiles whole and equals eager: tests/test_custom_ops.py).
"""

from __future__ import annotations

import torch

from flexnsa import NSAConfig, nsa_attention
from flexnsa.backends import flex as flex_backend
from flexnsa.block_masks import layout as layout_module


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(cfg: NSAConfig, tag: str) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = torch.randn(2, 14, 300, 64, **kw), torch.randn(2, 2, 300, 64, **kw), torch.randn(2, 2, 300, 64, **kw)
    g = torch.rand(2, 300, 14, 3, **kw)
    torch._dynamo.reset()
    fn = lambda *x: nsa_attention(*x, cfg, return_branches=True)  # noqa: E731
    with torch.no_grad():
        eager = fn(q, k, v, g)
        compiled = torch.compile(fn, fullgraph=True)(q, k, v, g)
    same_sel = torch.equal(eager.selected, compiled.selected)
    errs = {n: round(rel(getattr(compiled, n), getattr(eager, n)), 5) for n in ("out", "cmp", "slc", "win")}
    print(f"{tag:32s} selected equal {same_sel}  rel err {errs}", flush=True)


def main() -> None:
    flex_backend.ALLOW_WHOLE_OP_COMPILE_ON_CUDA = True  # this script measures the refused case
    base = NSAConfig(block_size=16, stride=16, select_block_size=16, num_selected=4, window=32,
                     select_query_tile=16, selection_kernel="flex", check_inputs=False)
    compare(base.replace(selection_kernel="triton"), "triton selection (control)")
    compare(base, "triton, gqa_folded")
    compare(base.replace(compression_kernel="torch"), "torch, gqa_folded")
    compare(base.replace(layout="per_head"), "triton, per_head")
    original = layout_module.QueryLayout.fold
    layout_module.QueryLayout.fold = lambda self, x: original(self, x).clone(memory_format=torch.contiguous_format)
    compare(base, "triton, gqa_folded, fold cloned")
    layout_module.QueryLayout.fold = original


if __name__ == "__main__":
    main()

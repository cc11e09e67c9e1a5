"""FlexAttention backend: compression, selection and window as block-sparse flex_attention calls.

Every flex call goes through a module-level ``torch.compile(flex_attention)``. Uncompiled
flex_attention materialises the full score matrix (1.8 TB at 128K), so the call runs with
``fail_on_recompile_limit_hit``: exhausting the recompile budget raises instead of silently
falling back to eager. Each (shape, mask kind) is a cache entry, so the budget is raised to
``RECOMPILE_LIMIT`` for these calls only.

On CPU (torch 2.13) the automatic dynamic-shape recompile of flex emits C++ that does not
compile (``cur_qSplitSize4 was not declared``), so CPU compiles one static graph per shape.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import flex_attention

from ..block_masks import (
    QueryLayout,
    compression_block_mask,
    selection_block_mask,
    window_block_mask,
)
from ..compression import compress_kv
from ..config import FLEX_HEAD_DIMS, NSAConfig
from ..importance import importance_top_n
from ..output import NSAOutput
from ..validation import check_nsa_inputs

RECOMPILE_LIMIT = 64
compiled_flex_attention = torch.compile(flex_attention, fullgraph=True)
compiled_flex_attention_static = torch.compile(flex_attention, fullgraph=True, dynamic=False)


def kernel_options_for(block_mask) -> dict | None:
    """Kernel tiles that divide the mask's blocks, or None (inductor's defaults) for >= 128.

    The flex templates need every tile to divide the BlockMask block: with a 64- or 16-wide
    kv block the default GPU tiles (fwd BLOCK_N 64-128, bwd BLOCK_N1 128) do not, and the
    forward fails to lower / the backward finds no valid config (PITFALLS).
    """
    bq, bk = block_mask.BLOCK_SIZE
    if bq >= 128 and bk >= 128:
        return None
    m, n = min(bq, 64), min(bk, 64)
    return {"fwd_BLOCK_M": m, "fwd_BLOCK_N": n, "bwd_BLOCK_M1": m, "bwd_BLOCK_N1": n, "bwd_BLOCK_M2": m, "bwd_BLOCK_N2": n}


def run_flex(q, k, v, block_mask, scale: float, enable_gqa: bool) -> torch.Tensor:
    """flex_attention through a module-level compiled function (inline when already compiling)."""
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    if q.device.type != "cpu":
        kwargs["kernel_options"] = kernel_options_for(block_mask)
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, **kwargs)
    fn = compiled_flex_attention_static if q.device.type == "cpu" else compiled_flex_attention
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=RECOMPILE_LIMIT):
        return fn(q, k, v, **kwargs)


def _check_flex_support(q, k, v, gates, head_dim: int) -> None:
    if head_dim not in FLEX_HEAD_DIMS:
        raise ValueError(f"backend='flex' supports head_dim in {FLEX_HEAD_DIMS}, got {head_dim}")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, gates)
    ):
        raise RuntimeError(
            "backend='flex' has no backward on CPU (FlexAttention's CPU path is forward-only): "
            "use NSAConfig(backend='reference') to train on CPU, or run under torch.no_grad()"
        )


def nsa_flex(q, k, v, gates, config: NSAConfig, *, compressors=None) -> NSAOutput:
    shape = check_nsa_inputs(q, k, v, gates, config)
    T, D, Hkv = shape.seq_len, shape.head_dim, shape.kv_heads
    _check_flex_support(q, k, v, gates, D)
    n = config.num_selected
    if T == 0:
        empty = q.new_zeros(q.shape)
        selected = torch.full((shape.batch, Hkv, 0, n), -1, dtype=torch.int64, device=q.device)
        return NSAOutput(empty, empty, empty, empty, selected, q.new_zeros(q.shape[:3], dtype=torch.float32))
    scale = config.softmax_scale(D)
    layout = QueryLayout(config.layout, shape.group)
    k_cmp, v_cmp = compress_kv(k, v, config, compressors)
    selected, cmp_lse = importance_top_n(q.detach(), k_cmp.detach(), config)

    q_rows = layout.fold(q)
    if k_cmp.shape[2] > 0:
        cmp_mask = compression_block_mask(T, layout, config, q.device)
        cmp = run_flex(q_rows, k_cmp, v_cmp, cmp_mask, scale, layout.enable_gqa)
    else:  # no whole block yet: nothing is visible, the branch is exactly 0
        cmp = torch.zeros_like(q_rows)
    slc = run_flex(q_rows, k, v, selection_block_mask(selected, layout, config), scale, layout.enable_gqa)
    win = run_flex(q_rows, k, v, window_block_mask(T, layout, config, q.device), scale, layout.enable_gqa)

    g = layout.fold(gates.permute(0, 2, 1, 3))  # [B, Hq, T, 3] -> query rows
    out = g[..., 0:1] * cmp + g[..., 1:2] * slc + g[..., 2:3] * win
    return NSAOutput(
        layout.unfold(out), layout.unfold(cmp), layout.unfold(slc), layout.unfold(win), selected, cmp_lse
    )

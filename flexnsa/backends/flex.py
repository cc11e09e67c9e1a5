"""FlexAttention backend: compression, selection and window as block-sparse flex_attention calls.

The op is a sequence of named stages (``compress``, ``compression_branch``, ``score_and_select``
(which reuses the compression branch's lse), ``build_masks``, the selection and window branches,
``combine``); ``nsa_flex`` runs them in order and the profiler times each one, so
the numbers describe exactly the code that runs.

Every flex call goes through a module-level ``torch.compile(flex_attention)``. Uncompiled
flex_attention materialises the full score matrix (1.8 TB at 128K), so the call runs with
``fail_on_recompile_limit_hit``: exhausting the recompile budget raises instead of silently
falling back to eager. Each (shape, mask kind) is a cache entry, so the budget is raised to
``RECOMPILE_LIMIT`` for these calls only.

On CPU (torch 2.13) the automatic dynamic-shape recompile of flex emits C++ that does not
compile (``cur_qSplitSize4 was not declared``), so CPU compiles one static graph per shape.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..block_masks import (
    QueryLayout,
    compression_block_mask,
    selection_block_mask,
    selection_rows,
    window_block_mask,
)
from ..compression import compress_kv
from ..config import FLEX_HEAD_DIMS, NSAConfig
from ..importance import importance_top_n
from ..output import NSAOutput
from ..reference import prune_selection_by_gates
from ..triton_fallback import use_triton_compression_attention, use_triton_selection, use_triton_window
from ..triton_fallback.tiles import kernel_layout
from ..validation import check_nsa_inputs

RECOMPILE_LIMIT = 64
# The Triton window's block and tile: the selected-block kernels' tuned block (Q7B's l' = 64).
WINDOW_KERNEL_BLOCK = 64
compiled_flex_attention = torch.compile(flex_attention, fullgraph=True)
compiled_flex_attention_static = torch.compile(flex_attention, fullgraph=True, dynamic=False)


def kernel_options_for(block_mask) -> dict | None:
    """Forward tiles that divide the mask's blocks, or None (inductor's defaults) for >= 128.

    The flex forward template needs its tiles to divide the BlockMask block; with 64- or 16-wide
    kv blocks the default GPU tiles do not and the forward fails to lower. The backward is not
    overridden: inductor filters its own config list by divisibility before applying options
    (see ``check_flex_support`` for what that means for training).
    """
    bq, bk = block_mask.BLOCK_SIZE
    if bq >= 128 and bk >= 128:
        return None
    return {"fwd_BLOCK_M": min(bq, 64), "fwd_BLOCK_N": min(bk, 64)}


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


class NSAMasks(NamedTuple):
    selection: BlockMask | None  # None with the Triton selection kernel
    window: BlockMask | None  # None with the Triton window


def check_flex_support(q, k, v, gates, head_dim: int, config: NSAConfig) -> None:
    """Refuse, with the reason, what FlexAttention cannot run (instead of a lowering trace).

    Backward on a GPU in 16-bit: torch 2.11's default backward configs are (64, 128, 128, 64)
    on Hopper and (64, 64, 64, 64) elsewhere, and the backward compiles lazily at the first
    .backward(), so blocks that are not 128-multiples are refused here, at the forward call.
    """
    if head_dim not in FLEX_HEAD_DIMS:
        raise ValueError(f"backend='flex' supports head_dim in {FLEX_HEAD_DIMS}, got {head_dim}")
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, gates))
    if training and q.device.type == "cpu":
        raise RuntimeError(
            "backend='flex' has no backward on CPU (FlexAttention's CPU path is forward-only): "
            "use NSAConfig(backend='reference') to train on CPU, or run under torch.no_grad()"
        )
    small = (config.flex_block_q % 128) or (config.flex_block_kv % 128)
    if training and q.dtype in (torch.float16, torch.bfloat16) and small:
        raise ValueError(
            f"FlexAttention's {q.dtype} backward has no kernel config for BlockMask blocks "
            f"({config.flex_block_q}, {config.flex_block_kv}) (torch {torch.__version__}): "
            "NSAConfig.flex_block_q and flex_block_kv must be multiples of 128 to train; "
            "smaller blocks run forward-only (under torch.no_grad())."
        )


# --- stages ---------------------------------------------------------------------------------

compress = compress_kv  # stage 1a: pooled K~, V~ [B, Hkv, C, D]


def score_and_select(q, k_cmp, config: NSAConfig, gates=None, cmp_lse=None):
    """Stage 2+3: importance + top-n (no grad), then gate-aware pruning when the config asks
    for it. -> selected [B, Hkv, T, n], cmp lse [B, Hq, T]. ``cmp_lse``: the compression
    branch's lse, when its kernel returned one (the scorer's lse pass is then skipped)."""
    cmp_lse = None if cmp_lse is None else cmp_lse.detach()
    selected, lse = importance_top_n(q.detach(), k_cmp.detach(), config, cmp_lse)
    if config.gate_prune_epsilon:
        selected = prune_selection_by_gates(selected, gates, config)
    return selected, lse


@functools.lru_cache(maxsize=16)
def _cached_static_mask(builder, seq_len: int, layout: QueryLayout, config: NSAConfig, device: torch.device) -> BlockMask:
    return builder(seq_len, layout, config, device)


def static_mask(builder, seq_len: int, layout: QueryLayout, config: NSAConfig, device) -> BlockMask:
    """The window and compression masks depend only on (length, layout, config, device), not on
    the data: built once per key and reused (the window mask's build was 1.4 of 8.6 ms at 8K
    fwd+bwd, NOTES Lever 13). Built afresh while tracing, so no graph captures a cached tensor."""
    if torch.compiler.is_compiling():
        return builder(seq_len, layout, config, device)
    return _cached_static_mask(builder, seq_len, layout, config, torch.device(device))


def build_masks(selected, seq_len: int, layout: QueryLayout, config: NSAConfig) -> NSAMasks:
    device = selected.device
    return NSAMasks(
        None if use_triton_selection(config, device) else selection_block_mask(selected, layout, config),
        None if use_triton_window(config, device, seq_len) else static_mask(window_block_mask, seq_len, layout, config, device),
    )


def compression_branch(q, q_rows, k_cmp, v_cmp, layout: QueryLayout, config: NSAConfig):
    """Stage 1b: compressed attention -> (out [B, Hq, T, D], lse [B, Hq, T] or None): the Triton
    kernel (its backward splits the query axis; see ``use_triton_compression_attention``), whose
    lse the scorer reuses, or FlexAttention over query rows with the causal compression mask."""
    scale = config.softmax_scale(q.shape[-1])
    T = q.shape[2]
    if k_cmp.shape[2] and use_triton_compression_attention(config, q.device):
        from ..triton_fallback.compression_attention import compression_attention

        return compression_attention(q, k_cmp, v_cmp, config.block_size, config.stride, scale)
    mask = static_mask(compression_block_mask, T, layout, config, q.device) if k_cmp.shape[2] else None
    return attend(q_rows, k_cmp, v_cmp, mask, layout, scale), None


def selection_branch(q, q_rows, k, v, selected, masks: NSAMasks, layout: QueryLayout, config: NSAConfig):
    """Stage 4b: selected-block attention, [B, Hq, T, D]: the Triton kernel (walks the ids) or
    FlexAttention over query rows with the selection BlockMask (``NSAConfig.selection_kernel``)."""
    scale = config.softmax_scale(q.shape[-1])
    if masks.selection is None:
        from ..triton_fallback.selection_attention import selection_attention

        tile = config.select_query_tile if config.selection == "block_shared" else 1
        return selection_attention(q, k, v, selection_rows(selected, config), config.select_block_size, tile, scale)[0]
    return attend(q_rows, k, v, masks.selection, layout, scale)


def window_branch(q, q_rows, k, v, masks: NSAMasks, layout: QueryLayout, config: NSAConfig):
    """Stage 5: sliding-window attention, [B, Hq, T, D]: the selected-block Triton kernels over
    each tile's window blocks, or FlexAttention over query rows with the window BlockMask
    (``NSAConfig.window_kernel``)."""
    scale = config.softmax_scale(q.shape[-1])
    if masks.window is None:
        from ..triton_fallback.selection_attention import window_attention

        return window_attention(q, k, v, config.window, WINDOW_KERNEL_BLOCK, scale)[0]
    return attend(q_rows, k, v, masks.window, layout, scale)


def attend(q_rows, k, v, block_mask, layout: QueryLayout, scale: float):
    """One branch's FlexAttention over query rows, returned per head [B, Hq, T, D]; a missing mask
    means nothing is visible (0)."""
    if block_mask is None:
        return layout.unfold(torch.zeros_like(q_rows))
    return layout.unfold(run_flex(q_rows, k, v, block_mask, scale, layout.enable_gqa))


def gated_sum(head_gates, cmp, slc, win):
    """o = g_cmp*cmp + g_slc*slc + g_win*win; head_gates [B, Hq, T, 3] (the branches' row order),
    branches [B, Hq, T, D]."""
    return head_gates[..., 0:1] * cmp + head_gates[..., 1:2] * slc + head_gates[..., 2:3] * win


def gated_sum_backward(head_gates, cmp, slc, win, grad):
    """Gradients of :func:`gated_sum` (gates, cmp, slc, win), each in the layout of ``grad``."""
    d_gates = torch.cat([(grad * x).sum(-1, keepdim=True) for x in (cmp, slc, win)], dim=-1)
    return d_gates, grad * head_gates[..., 0:1], grad * head_gates[..., 1:2], grad * head_gates[..., 2:3]


# Eager, the sum is 5 passes forward and ~8 backward over [B, Hq, T, D] tensors (15 ms of 146 at
# 128K fwd+bwd, NOTES Lever 13); inductor fuses each direction into one or two. Dynamic shapes:
# one graph per dtype whatever the span length, so new lengths do not recompile.
compiled_gated_sum = torch.compile(gated_sum, fullgraph=True, dynamic=True)
compiled_gated_sum_backward = torch.compile(gated_sum_backward, fullgraph=True, dynamic=True)


class CompiledGatedSum(torch.autograd.Function):
    """The gated sum with its forward and its backward each one compiled function on plain tensors.

    Why not ``compiled_gated_sum`` under autograd: AOTAutograd makes the incoming gradient
    contiguous (head-major), so with token-major branches each layer's backward paid a full-size
    copy there, and the branches' gradients came back head-major for the kernels' backward to copy
    again (64K training profile, NOTES Lever 24). Here every gradient keeps the layout it came in.
    """

    @staticmethod
    def forward(ctx, head_gates, cmp, slc, win):
        ctx.save_for_backward(head_gates, cmp, slc, win)
        return compiled_gated_sum(head_gates, cmp, slc, win)

    @staticmethod
    def backward(ctx, grad):
        return compiled_gated_sum_backward(*ctx.saved_tensors, grad)


def combine(gates, cmp, slc, win):
    """Stage 6, per head (branches arrive per head [B, Hq, T, D]): the gated sum, compiled on GPUs
    (inlined when the whole op is being compiled), eager on CPU.

    The gates [B, T, Hq, 3] are read in the branches' row order (``gates_like``): with gates in
    another order, the dynamic-shape kernel recovers (h, t) from each flat index by dividing by
    the symbolic length and ran at 5.8 ms forward at 128K (NOTES Lever 16); in the same order only
    the constant head_dim divides, and the sum comes out in the branches' layout."""
    head_gates = gates_like(gates, cmp)
    if cmp.is_cuda and not torch.compiler.is_compiling():
        return CompiledGatedSum.apply(head_gates, cmp, slc, win)
    return gated_sum(head_gates, cmp, slc, win)


def gates_like(gates, branch):
    """gates [B, T, Hq, 3] as [B, Hq, T, 3] in the row order of ``branch`` [B, Hq, T, D]:
    token-major branches (a span of the model's projections) read the gates as they are; head-
    major ones (contiguous inputs) get a head-major copy (22 MB at 128K)."""
    heads_outer = branch.shape[1] > 1 and branch.shape[2] > 1 and branch.stride(1) > branch.stride(2)
    if heads_outer:
        return gates.permute(0, 2, 1, 3).contiguous()
    return gates.contiguous().permute(0, 2, 1, 3)


# Known defect (torch 2.11 + inductor, CUDA): when the *whole* op is traced by torch.compile with
# the FlexAttention selection branch, that branch comes out wrong (relative error 1.0; compression
# and window branches exact; profiling/debug_fullgraph.py): the one mask_mod that captures a
# tensor computed inside the traced graph (the selection bit table). Until that is fixed the op
# refuses to be traced on CUDA with selection_kernel='flex' instead of returning wrong values.
# The Triton selection kernel (the CUDA default) is a custom op and has no such capture.
# tests/test_custom_ops.py flips this to check the numerics (a strict xfail that flags a fix).
ALLOW_WHOLE_OP_COMPILE_ON_CUDA = False


def check_not_traced_on_cuda(q, config: NSAConfig) -> None:
    if (
        q.is_cuda
        and torch.compiler.is_compiling()
        and not use_triton_selection(config, q.device)
        and not ALLOW_WHOLE_OP_COMPILE_ON_CUDA
    ):
        raise RuntimeError(
            "torch.compile of the whole NSA op with selection_kernel='flex' on CUDA is refused: with torch "
            f"{torch.__version__} + inductor its selection branch comes out wrong. Use selection_kernel='auto' "
            "(the Triton selection kernel), or keep nsa_attention / NSAAttention outside the compiled region "
            "(torch.compiler.disable); its FlexAttention calls are compiled on their own."
        )


def query_layout(config: NSAConfig, device: torch.device, group: int) -> QueryLayout:
    """``config.layout`` with ``auto`` resolved: per head once the Triton kernels run both
    compression and selection (the window alone has nothing to share across a group's heads)."""
    name = config.layout
    if name == "auto":
        triton_both = use_triton_compression_attention(config, device) and use_triton_selection(config, device)
        name = "per_head" if triton_both else "gqa_folded"
    return QueryLayout(name, group)


def use_fused_gates(q, k, v, gates, k_cmp, config: NSAConfig, branches: bool) -> bool:
    """``fused_gates.GatedBranches`` instead of autograd through each branch and the gated sum:
    its rule is on, the ungated branches are not wanted back (differentiable), and all three
    branches run on the Triton kernels (with at least one compressed block). Forward-only calls
    take it too: the same kernels, and the gated sum in the window's epilogue (NOTES Lever 40)."""
    from .fused_gates import fused_gates_rule

    T = q.shape[2]
    return (
        fused_gates_rule(q)
        and not branches
        and k_cmp.shape[2] > 0
        and use_triton_compression_attention(config, q.device)
        and use_triton_selection(config, q.device)
        and use_triton_window(config, q.device, T)
    )


def fused_gates_branches(q, k, v, k_cmp, v_cmp, gates, config: NSAConfig):
    """The three Triton branches without autograd, then their gated sum as one autograd node
    (``fused_gates.GatedBranches``). -> (out, cmp, slc, win, selected, cmp_lse); the branches
    are detached."""
    from ..triton_fallback.compression_attention import compression_attention
    from ..triton_fallback.selection_attention import selection_attention, window_rows
    from .fused_gates import GatedBranches

    scale = config.softmax_scale(q.shape[-1])
    B, Hkv, T = k.shape[:3]
    tile = config.select_query_tile if config.selection == "block_shared" else 1
    with torch.no_grad():
        cmp, cmp_lse = compression_attention(q, k_cmp, v_cmp, config.block_size, config.stride, scale)
        selected, cmp_lse = score_and_select(q, k_cmp, config, gates, cmp_lse)
        rows = selection_rows(selected, config).contiguous()
        slc, slc_lse = selection_attention(q, k, v, rows, config.select_block_size, tile, scale)
        win_rows = window_rows(B, Hkv, T, config.window, WINDOW_KERNEL_BLOCK, q.device).contiguous()
    spec = (config.block_size, config.stride, config.select_block_size, tile, config.window, WINDOW_KERNEL_BLOCK, scale)
    out, win = GatedBranches.apply(gates_like(gates, cmp), q, k, v, k_cmp, v_cmp, cmp, cmp_lse, slc, slc_lse, rows, win_rows,
                                   spec)
    return out, cmp, slc, win, selected, cmp_lse


def nsa_flex(q, k, v, gates, config: NSAConfig, *, compressors=None, branches: bool = True) -> NSAOutput:
    """``branches``: the ungated branch outputs are wanted (differentiable) in the result; False
    lets the gated sum's backward run through the branch kernels (``use_fused_gates``)."""
    shape = check_nsa_inputs(q, k, v, gates, config)
    check_not_traced_on_cuda(q, config)
    T, D = shape.seq_len, shape.head_dim
    check_flex_support(q, k, v, gates, D, config)
    if T == 0:
        empty = q.new_zeros(q.shape)
        selected = torch.full((shape.batch, shape.kv_heads, 0, config.num_selected), -1, dtype=torch.int64, device=q.device)
        return NSAOutput(empty, empty, empty, empty, selected, q.new_zeros(q.shape[:3], dtype=torch.float32))
    layout = query_layout(config, q.device, shape.group)
    # The kernels and FlexAttention take any dense layout with unit stride over head_dim: a video
    # span cut from the model's token-major [B, T, H, D] projections runs without a copy, and
    # every branch's output and gradients come back token-major (NOTES Lever 21).
    q, k, v = (kernel_layout(x) for x in (q, k, v))
    k_cmp, v_cmp = compress(k, v, config, compressors)
    if use_fused_gates(q, k, v, gates, k_cmp, config, branches):
        return NSAOutput(*fused_gates_branches(q, k, v, k_cmp, v_cmp, gates, config))
    q_rows = layout.fold(q)
    cmp, cmp_lse = compression_branch(q, q_rows, k_cmp, v_cmp, layout, config)
    selected, cmp_lse = score_and_select(q, k_cmp, config, gates, cmp_lse)
    masks = build_masks(selected, T, layout, config)
    slc = selection_branch(q, q_rows, k, v, selected, masks, layout, config)
    win = window_branch(q, q_rows, k, v, masks, layout, config)
    return NSAOutput(combine(gates, cmp, slc, win), cmp, slc, win, selected, cmp_lse)

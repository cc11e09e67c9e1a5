"""The Triton kernels as ``torch.library`` custom ops, so torch.compile(fullgraph=True) traces
the whole NSA op without a graph break: Dynamo sees an opaque op with a fake (shape-only)
implementation instead of Python that launches kernels, and autograd uses the registered
backward (itself a custom op, so compiled autograd graphs stay whole too).

Ops (namespace ``flexnsa``):
  compression_attention(q, k_cmp, v_cmp, block, stride, scale) -> (out, lse)   differentiable
  compression_attention_backward(...) -> (dq, dk_cmp, dv_cmp, delta = rowsum(grad_out * out))
  selection_attention(q, k, v, rows, select_block, tile, scale, window=0) -> (out, lse)     differentiable
  selection_attention_backward(q, k, v, rows, out, lse, grad_out, items, row_of_entry, ..., dq_in=None)
      -> (dq (+ dq_in), dk, dv, delta); items, row_of_entry = ``dkv_lists`` of the launch, built by
      the caller so a compiled backward fuses them (NOTES Lever 59)
  gated_window_attention(q, k, v, rows, block, window, scale, head_gates, cmp, slc) -> (y, win, win_lse)
      the window's forward, its epilogue writing the gated sum y of the three branches (no autograd:
      ``fused_gates.GatedBranches`` runs it and owns the backward)
  selection_top_n(q, k_cmp, block, n, tile, forced_initial, forced_local, scale, block_c) -> (ids, lse)
  selection_top_n_given_lse(q, k_cmp, lse, block, n, tile, ...) -> ids   (the compression branch's lse)
  compression_group_scores(q, k_cmp, block, stride, scale, t0, t1, tokens_per_sum) -> (scores, lse rows [t0, t1))
  compression_group_scores_given_lse(q, k_cmp, lse, ...) -> scores   (the compression branch's lse)
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from . import compression_attention as cmp_attn
from . import compression_scores, selection_attention as slc_attn, selection_top_n as top_n
from .tiles import kernel_layout as kl


@torch.library.custom_op("flexnsa::compression_attention", mutates_args=())
def compression_attention(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, block_size: int, stride: int, scale: float) -> tuple[Tensor, Tensor]:
    return cmp_attn.compression_attention_fwd(kl(q), kl(k_cmp), kl(v_cmp), block_size, stride, scale)


def fake_attention(q):
    """(out, lse) as the attention kernels allocate them: out in q's kernel layout."""
    return torch.empty_like(kl(q)), q.new_empty(q.shape[:3], dtype=torch.float32)


def fake_grads(q, k, v):
    """(dq, dk, dv, delta) as the backward kernels allocate them: dq in q's kernel layout, dk and
    dv in k's (the kernels index K and V, and dK and dV, with one set of strides), delta [B, Hq, T]
    fp32."""
    dk = torch.empty_like(kl(k))
    return torch.empty_like(kl(q)), dk, torch.empty_like(dk), q.new_empty(q.shape[:3], dtype=torch.float32)


@compression_attention.register_fake
def _(q, k_cmp, v_cmp, block_size, stride, scale):
    return fake_attention(q)


@torch.library.custom_op("flexnsa::compression_attention_backward", mutates_args=())
def compression_attention_backward(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, block_size: int, stride: int, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return cmp_attn.compression_attention_bwd(kl(q), kl(k_cmp), kl(v_cmp), out, lse, grad_out, block_size, stride, scale)


@compression_attention_backward.register_fake
def _(q, k_cmp, v_cmp, out, lse, grad_out, block_size, stride, scale):
    return fake_grads(q, k_cmp, v_cmp)


def register_backward(op, backward_op, num_tensors: int, extra=None) -> None:
    """Autograd for ``op(*tensors, *params) -> (out, lse)`` through ``backward_op(*tensors, out, lse,
    grad_out, *extra(*tensors, *params), *params) -> (dq, dk, dv, delta)``: the grads of the leading
    three tensors (the rest, and the params, get None). ``extra`` builds further backward inputs
    here, in the traced backward, rather than inside the opaque backward op."""

    def save(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:num_tensors], *output)
        ctx.params = inputs[num_tensors:]

    def backward(ctx, grad_out, grad_lse):
        saved = ctx.saved_tensors
        more = extra(*saved[:num_tensors], *ctx.params) if extra else ()
        grads = backward_op(*saved, grad_out, *more, *ctx.params)[:3]
        return (*grads, *[None] * (num_tensors + len(ctx.params) - len(grads)))

    op.register_autograd(backward, setup_context=save)


register_backward(compression_attention, compression_attention_backward, num_tensors=3)


@torch.library.custom_op("flexnsa::selection_attention", mutates_args=())
def selection_attention(
    q: Tensor, k: Tensor, v: Tensor, rows: Tensor, block_size: int, tile: int, scale: float, window: int = 0
) -> tuple[Tensor, Tensor]:
    return slc_attn.selection_attention_fwd(kl(q), kl(k), kl(v), rows.contiguous(), block_size, tile, scale, window)


@selection_attention.register_fake
def _(q, k, v, rows, block_size, tile, scale, window=0):
    return fake_attention(q)


@torch.library.custom_op("flexnsa::selection_attention_backward", mutates_args=())
def selection_attention_backward(
    q: Tensor, k: Tensor, v: Tensor, rows: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, items: Tensor,
    row_of_entry: Tensor, block_size: int, tile: int, scale: float, window: int = 0, dq_in: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (block_size, tile, scale, window, dq_in, (items, row_of_entry))
    return slc_attn.selection_attention_bwd(kl(q), kl(k), kl(v), rows.contiguous(), out, lse, grad_out, *args)


@selection_attention_backward.register_fake
def _(q, k, v, rows, out, lse, grad_out, items, row_of_entry, block_size, tile, scale, window=0, dq_in=None):
    return fake_grads(q, k, v)


def selection_dkv_lists(q, k, v, rows, block_size, tile, scale, window=0):
    """``dkv_lists`` for a ``selection_attention_backward`` call, in ``register_backward``'s ``extra``
    signature (the op's tensors and params; k, v and scale unused)."""
    return slc_attn.dkv_lists(q, rows, block_size, tile, window)


register_backward(selection_attention, selection_attention_backward, num_tensors=4, extra=selection_dkv_lists)  # rows: no grad


@torch.library.custom_op("flexnsa::gated_window_attention", mutates_args=())
def gated_window_attention(
    q: Tensor, k: Tensor, v: Tensor, rows: Tensor, block_size: int, window: int, scale: float,
    head_gates: Tensor, cmp: Tensor, slc: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    win, lse, y = slc_attn.selection_attention_fwd(kl(q), kl(k), kl(v), rows.contiguous(), block_size, block_size, scale,
                                                   window, gated=(head_gates, cmp, slc))
    return y, win, lse


@gated_window_attention.register_fake
def _(q, k, v, rows, block_size, window, scale, head_gates, cmp, slc):
    win, lse = fake_attention(q)
    return torch.empty_like(win, dtype=torch.promote_types(head_gates.dtype, q.dtype)), win, lse


@torch.library.custom_op("flexnsa::selection_top_n", mutates_args=())
def selection_top_n(
    q: Tensor, k_cmp: Tensor, block_size: int, num_selected: int, tile: int,
    forced_initial: int, forced_local: int, scale: float, block_c: int,
) -> tuple[Tensor, Tensor]:
    return top_n.launch(kl(q), kl(k_cmp), block_size, num_selected, tile, forced_initial, forced_local, scale, block_c)


@selection_top_n.register_fake
def _(q, k_cmp, block_size, num_selected, tile, forced_initial, forced_local, scale, block_c):
    B, Hq, T, _ = q.shape
    ids = q.new_empty(B, k_cmp.shape[1], triton.cdiv(T, tile), num_selected, dtype=torch.int64)
    return ids, q.new_empty(B, Hq, T, dtype=torch.float32)


@torch.library.custom_op("flexnsa::selection_top_n_given_lse", mutates_args=())
def selection_top_n_given_lse(
    q: Tensor, k_cmp: Tensor, lse: Tensor, block_size: int, num_selected: int, tile: int,
    forced_initial: int, forced_local: int, scale: float, block_c: int,
) -> Tensor:
    args = (block_size, num_selected, tile, forced_initial, forced_local, scale, block_c)
    return top_n.launch(kl(q), kl(k_cmp), *args, lse=lse.contiguous())[0]


@selection_top_n_given_lse.register_fake
def _(q, k_cmp, lse, block_size, num_selected, tile, forced_initial, forced_local, scale, block_c):
    B, _, T, _ = q.shape
    return q.new_empty(B, k_cmp.shape[1], triton.cdiv(T, tile), num_selected, dtype=torch.int64)


@torch.library.custom_op("flexnsa::compression_group_scores", mutates_args=())
def compression_group_scores(
    q: Tensor, k_cmp: Tensor, block_size: int, stride: int, scale: float, t0: int, t1: int, tokens_per_sum: int = 1
) -> tuple[Tensor, Tensor]:
    q, k_cmp = kl(q), kl(k_cmp)
    return compression_scores.compression_group_scores(q, k_cmp, block_size, stride, scale, t0, t1, tokens_per_sum)


@compression_group_scores.register_fake
def _(q, k_cmp, block_size, stride, scale, t0, t1, tokens_per_sum=1):
    B, Hq = q.shape[:2]
    Hkv, C = k_cmp.shape[1], k_cmp.shape[2]
    rows = triton.cdiv(t1 - t0, tokens_per_sum)
    return q.new_empty(B, Hkv, rows, C, dtype=torch.float32), q.new_empty(B, Hq, t1 - t0, dtype=torch.float32)


@torch.library.custom_op("flexnsa::compression_group_scores_given_lse", mutates_args=())
def compression_group_scores_given_lse(
    q: Tensor, k_cmp: Tensor, lse: Tensor, block_size: int, stride: int, scale: float, t0: int, t1: int, tokens_per_sum: int = 1
) -> Tensor:
    q, k_cmp, lse = kl(q), kl(k_cmp), lse.contiguous()
    return compression_scores.compression_group_scores(q, k_cmp, block_size, stride, scale, t0, t1, tokens_per_sum, lse)[0]


@compression_group_scores_given_lse.register_fake
def _(q, k_cmp, lse, block_size, stride, scale, t0, t1, tokens_per_sum=1):
    return q.new_empty(q.shape[0], k_cmp.shape[1], triton.cdiv(t1 - t0, tokens_per_sum), k_cmp.shape[2], dtype=torch.float32)

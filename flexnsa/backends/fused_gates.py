"""The gated sum's backward through the branch kernels themselves (NOTES Lever 37; rule
``FUSED_GATES``: on, measured -3.9% at 128K fwd+bwd on an H200).

out = sum_b g_b o_b. Autograd through the gated sum writes dO_b = g_b dY for each branch (three
q-sized tensors, 2.4-2.6 ms at 128K) and the branch kernels read them back. With P' = g P, a
branch's softmax backward is dS = P' (dY V^T - delta), dV = P'^T dY, delta = rowsum(dY o_b), and
P' = 2^(s - lse') for lse' = lse - ln g per row. So the branch backward kernels, given dY itself,
lse' and o_b, compute every gradient, and the delta their dQ kernels store *is* the gate gradient
rowsum(dY o_b). Exact, also at g = 0 (lse' = +inf: P' = 0; the gate gradient still comes from o_b).

Used when the three branches all run on the Triton kernels (compression, selection, the window)
and the caller does not want the ungated branches back: the branches' forwards run without
autograd, and one node (``GatedBranches``) holds what their backwards need.
"""

from __future__ import annotations

import torch

from ..triton_fallback.tiles import load_tuning_file, tuning_for

FUSED_GATES = True  # the rule (NOTES Lever 37: 78.7 -> 75.7 ms at 128K fwd+bwd, 15.35 -> 15.01 at 32K, H200)
DQ_IN = True  # the branches' dq summed inside the selection dQ kernels (NOTES Lever 39), else by in-place adds
GATED_WINDOW = True  # the gated sum in the window kernel's epilogue (NOTES Lever 40), else the compiled sum after it
# The knobs at the tuned shape (16-bit, head_dim 128), for an A/B through FLEXNSA_TUNING:
# {"gates": {"combine": {"fused_gates": false, "dq_in": false, "gated_window": false}}}.
TUNING = {"combine": {"fused_gates": None, "dq_in": None, "gated_window": None}}
load_tuning_file("gates", TUNING)


def fused_gates_rule(q: torch.Tensor) -> bool:
    return bool(tuning_for(TUNING, "combine", q).get("fused_gates", FUSED_GATES))


def dq_in_rule(q: torch.Tensor) -> bool:
    return bool(tuning_for(TUNING, "combine", q).get("dq_in", DQ_IN))


def gated_window_rule(q: torch.Tensor) -> bool:
    return bool(tuning_for(TUNING, "combine", q).get("gated_window", GATED_WINDOW))


def window_and_gated_sum(head_gates, q, k, v, cmp, slc, window_rows, window_block: int, window: int, scale: float):
    """(out, win, win_lse): the window branch, run last, and the gated sum of the three branches.
    With ``gated_window_rule`` one kernel: the window's epilogue reads cmp and slc back per row and
    writes out (NOTES Lever 40: the separate sum re-read all three branches and the gates and
    wrote out, 1.44 ms at 128K on an H200); else the window kernel, then the compiled sum."""
    from ..triton_fallback.custom_ops import gated_window_attention, selection_attention
    from .flex import compiled_gated_sum, gated_sum

    if gated_window_rule(q):
        return gated_window_attention(q, k, v, window_rows, window_block, window, scale, head_gates, cmp, slc)
    win, win_lse = selection_attention(q, k, v, window_rows, window_block, window_block, scale, window)
    summed = compiled_gated_sum if q.is_cuda else gated_sum  # as ``flex.combine``: eager on CPU
    return summed(head_gates, cmp, slc, win), win, win_lse


def gated_lse(lse: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """lse - ln g per row ([B, Hq, T] fp32, unit stride over T as the kernels read it): the
    softmax of the branch scaled by its gate. Rows that see nothing keep -inf (-inf - ln 0 would
    be NaN); g = 0 gives +inf, i.e. no probability mass."""
    shifted = lse - torch.log(gate.float())
    return torch.where(lse == float("-inf"), lse, shifted).contiguous()


class GatedBranches(torch.autograd.Function):
    """(out, win): the window branch (``window_and_gated_sum``) and out = g_cmp cmp + g_slc slc +
    g_win win, from the compression and selection outputs computed without autograd; the backward
    calls each branch's backward op on dY with ``gated_lse``. win is not differentiable here.

    Inputs: head_gates [B, Hq, T, 3]; the differentiable q, k, v [B, H, T, D] and pooled k_cmp,
    v_cmp; then the compression and selection outputs and lses, the selection and window rows, and
    ``spec`` (block_size, stride, select_block, tile, window, window_block, scale).
    """

    @staticmethod
    def forward(ctx, head_gates, q, k, v, k_cmp, v_cmp, cmp, cmp_lse, slc, slc_lse, rows, window_rows, spec):
        *_, window, window_block, scale = spec
        out, win, win_lse = window_and_gated_sum(head_gates, q, k, v, cmp, slc, window_rows, window_block, window, scale)
        ctx.save_for_backward(head_gates, q, k, v, k_cmp, v_cmp, cmp, cmp_lse, slc, slc_lse, win, win_lse, rows, window_rows)
        ctx.spec = spec
        ctx.mark_non_differentiable(win)
        ctx.set_materialize_grads(False)  # else autograd hands backward a zero win-sized gradient (896 MiB at 128K)
        return out, win

    @staticmethod
    def backward(ctx, grad, _grad_win):
        from ..triton_fallback.custom_ops import compression_attention_backward, selection_attention_backward
        from ..triton_fallback.selection_attention import dkv_lists

        if grad is None:  # out did not reach the loss
            return (None,) * 13

        head_gates, q, k, v, k_cmp, v_cmp, cmp, cmp_lse, slc, slc_lse, win, win_lse, rows, window_rows = ctx.saved_tensors
        block_size, stride, select_block, tile, window, window_block, scale = ctx.spec
        # Each branch's dq kernel adds the one before it (dq_in, NOTES Lever 39), or in-place adds:
        # either way at most two q-sized gradients live at once (the three summed out of place at
        # the end measured +1.25 GiB of peak at 128K, NOTES Lever 37)
        dq, dk_cmp, dv_cmp, dg_cmp = compression_attention_backward(
            q, k_cmp, v_cmp, cmp, gated_lse(cmp_lse, head_gates[..., 0]), grad, block_size, stride, scale)
        # the dK/dV work lists here, not inside the backward op, so a compiled backward fuses them (NOTES Lever 59)
        slc_lists = dkv_lists(q, rows, select_block, tile)
        win_lists = dkv_lists(q, window_rows, window_block, window_block, window)
        dq, dk, dv, dg_slc = add_dq(dq, selection_attention_backward, q, k, v, rows, slc, gated_lse(slc_lse, head_gates[..., 1]),
                                    grad, *slc_lists, select_block, tile, scale, 0)
        dq, dk_w, dv_w, dg_win = add_dq(dq, selection_attention_backward, q, k, v, window_rows, win,
                                        gated_lse(win_lse, head_gates[..., 2]), grad, *win_lists, window_block, window_block,
                                        scale, window)
        dk.add_(dk_w)
        dv.add_(dv_w)
        d_gates = torch.stack([dg_cmp, dg_slc, dg_win], dim=-1).to(head_gates.dtype)
        return (d_gates, dq, dk, dv, dk_cmp, dv_cmp, *[None] * 7)


def add_dq(dq, backward_op, q, *args):
    """backward_op(q, *args) with ``dq`` added to its dq: inside its dQ kernel (``dq_in``) or in place."""
    if dq_in_rule(q):
        return backward_op(q, *args, dq)
    dq_b, *rest = backward_op(q, *args)
    return dq.add_(dq_b), *rest

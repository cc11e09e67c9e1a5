"""Qwen2.5-VL vision attention with equal-length windows batched into one SDPA call.

Upstream's non-flash path (sdpa, eager) runs one attention call per window: a 64K-token video
(1024 temporal patches of 16 x 16 patches) is 4096 windows of 64 patches in each of the 28
window-attention blocks and 1024 frames in each of the 4 full-attention blocks, ~120K small
calls per forward, so the tower is bound by Python and kernel launches. Consecutive windows of
one length are contiguous rows, so each run of equal lengths is viewed as a batch
``[n, heads, length, head_dim]`` and attended in one call (runs of length 1 are what upstream
does anyway). Same projections, same rotary embedding, same math (non-causal attention inside
each ``cu_seqlens`` segment); only the call pattern changes. Opt in with
``model.vision_attention = "batched"``.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLVisionAttention,
    apply_rotary_pos_emb_vision,
)


def segment_runs(cu_seqlens: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start row, segment count, segment length) for each run of consecutive equal-length segments."""
    bounds = cu_seqlens.tolist()
    runs: list[tuple[int, int, int]] = []
    for start, end in itertools.pairwise(bounds):
        length = end - start
        if length == 0:
            continue
        if runs and runs[-1][2] == length and runs[-1][0] + runs[-1][1] * length == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, length)
        else:
            runs.append((start, 1, length))
    return runs


@torch.compiler.disable  # host-read segment lengths: a compiled vision block calls this eagerly
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Non-causal attention inside each segment; q, k, v and the result are [S, heads, head_dim]."""
    runs = segment_runs(cu_seqlens)
    if len(runs) == 1 and runs[0][0] == 0 and runs[0][1] * runs[0][2] == q.shape[0]:
        return attend_run(q, k, v, runs[0][1], runs[0][2], scale)
    out = torch.zeros_like(q)  # rows outside every segment (none in practice) stay 0
    for start, count, length in runs:
        rows = slice(start, start + count * length)
        out[rows] = attend_run(q[rows], k[rows], v[rows], count, length, scale)
    return out


def attend_run(q, k, v, count: int, length: int, scale: float) -> torch.Tensor:
    H, D = q.shape[1:]
    q, k, v = (x.reshape(count, length, H, D).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(count * length, H, D)


class BatchedQwen2_5_VLVisionAttention(Qwen2_5_VLVisionAttention):
    """Upstream's vision attention (same ``qkv`` / ``proj``), equal windows attended in one call."""

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        seq_length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        out = varlen_attention(q, k, v, cu_seqlens, self.scaling)
        return self.proj(out.reshape(seq_length, -1))


def batch_vision_attention(model: nn.Module) -> int:
    """Switch every vision attention module of ``model`` to the batched one in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is Qwen2_5_VLVisionAttention:
            module.__class__ = BatchedQwen2_5_VLVisionAttention
            count += 1
    return count

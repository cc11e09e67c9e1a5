"""Importance scores and top-n selection in PyTorch, chunked over queries (no [T, C] tensor).

This is the flex backend's scorer until the fused Triton kernel takes over: each chunk
recomputes the compression logits in fp32, takes its own log-sum-exp, sums probabilities over
the G heads of a group, maps them onto selection blocks and picks the top-n. Selection is not
differentiable (as in NSA), so all of it runs under no_grad. The eligibility/forced-block rule
and the block-overlap map are the reference's (one definition of the semantics).
"""

from __future__ import annotations

import torch

from .config import NSAConfig
from .reference import block_overlap, compression_visibility, top_n_blocks

CHUNK_ELEMENTS = 1 << 25  # fp32 logits per chunk (128 MiB): bounds this path's peak memory


def _chunk_tokens(batch: int, q_heads: int, num_cmp: int, tile: int) -> int:
    per_token = max(1, batch * q_heads * max(num_cmp, 1))
    return max(tile, CHUNK_ELEMENTS // per_token // tile * tile)


@torch.no_grad()
def importance_top_n(q: torch.Tensor, k_cmp: torch.Tensor, config: NSAConfig):
    """Selected block ids [B, Hkv, T, n] (per token, ascending, -1 padded) and cmp lse [B, Hq, T].

    q [B, Hq, T, D]; k_cmp [B, Hkv, C, D] pooled keys.
    """
    B, Hq, T, D = q.shape
    Hkv, C = k_cmp.shape[1], k_cmp.shape[2]
    G = Hq // Hkv
    scale = config.softmax_scale(D)
    l_sel = config.select_block_size
    shared = config.selection == "block_shared"
    tile = config.select_query_tile if shared else 1
    overlap = block_overlap(T, config, torch.float32, q.device)
    kc = k_cmp.float()
    selected = torch.empty(B, Hkv, T, config.num_selected, dtype=torch.int64, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    step = _chunk_tokens(B, Hq, C, tile)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        qc = q[:, :, t0:t1].float().view(B, Hkv, G, t1 - t0, D)
        logits = torch.einsum("bhgtd,bhcd->bhgtc", qc, kc) * scale
        visible = compression_visibility(torch.arange(t0, t1, device=q.device), C, config)
        logits = logits.masked_fill(~visible, float("-inf"))
        chunk_lse = torch.logsumexp(logits, dim=-1)
        lse[:, :, t0:t1] = chunk_lse.view(B, Hq, t1 - t0)
        probs = torch.exp(logits - chunk_lse[..., None]).nan_to_num_(0.0)  # rows with nothing visible -> 0
        scores = probs.sum(dim=2) @ overlap  # [B, Hkv, tc, Nsel]
        if shared:
            pad = -(t1 - t0) % tile
            scores = torch.nn.functional.pad(scores, (0, 0, 0, pad)).unflatten(2, (-1, tile)).sum(dim=3)
            first = torch.arange(t0, t1, tile, device=q.device)
            chosen = top_n_blocks(scores, first // l_sel, config).repeat_interleave(tile, dim=2)
            selected[:, :, t0:t1] = chosen[:, :, : t1 - t0]
        else:
            tokens = torch.arange(t0, t1, device=q.device)
            selected[:, :, t0:t1] = top_n_blocks(scores, tokens // l_sel, config)
    return selected, lse

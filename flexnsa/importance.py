"""Importance scores and top-n selection in PyTorch, chunked over queries (no [T, C] tensor).

This is the flex backend's scorer until the fused Triton kernel takes over: each chunk
recomputes the compression logits in fp32, takes its own log-sum-exp, sums probabilities over
the G heads of a group, maps them onto selection blocks and picks the top-n. Selection is not
differentiable (as in NSA), so all of it runs under no_grad. The eligibility/forced-block rule
and the block-overlap map are the reference's (one definition of the semantics).
"""

from __future__ import annotations

import contextlib

import torch

from .config import NSAConfig
from .reference import block_overlap, compression_visibility, top_n_blocks

CHUNK_ELEMENTS = 1 << 25  # fp32 logits per chunk (128 MiB): bounds this path's peak memory


@contextlib.contextmanager
def exact_tf32_for(dtype: torch.dtype):
    """TF32 matmuls for fp32 copies of 16-bit tensors: exact, since bf16/fp16 mantissas fit in
    TF32's 10 bits and accumulation stays fp32, at tensor-core speed. fp32 inputs keep full fp32."""
    if dtype not in (torch.float16, torch.bfloat16) or not torch.cuda.is_available():
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


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
    identity_map = config.block_size == config.stride == l_sel
    overlap = None if identity_map else block_overlap(T, config, torch.float32, q.device)
    kc = k_cmp.float()
    selected = torch.empty(B, Hkv, T, config.num_selected, dtype=torch.int64, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    step = _chunk_tokens(B, Hq, C, tile)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        # Causality bounds the work: blocks visible to the chunk's last token, eligible
        # selection blocks up to its own block (later columns could never be chosen).
        c_vis = min(C, max(0, (t1 - config.block_size) // config.stride + 1))
        n_elig = (t1 - 1) // l_sel + 1
        qc = q[:, :, t0:t1].float().view(B, Hkv, G, t1 - t0, D)
        with exact_tf32_for(q.dtype):
            logits = torch.einsum("bhgtd,bhcd->bhgtc", qc, kc[:, :, :c_vis]) * scale
        visible = compression_visibility(torch.arange(t0, t1, device=q.device), c_vis, config)
        logits = logits.masked_fill(~visible, float("-inf"))
        chunk_lse = torch.logsumexp(logits, dim=-1)
        lse[:, :, t0:t1] = chunk_lse.view(B, Hq, t1 - t0)
        probs = torch.exp(logits - chunk_lse[..., None]).nan_to_num_(0.0)  # rows with nothing visible -> 0
        grouped = probs.sum(dim=2)  # [B, Hkv, tc, c_vis]
        if identity_map:  # l = s = l': compressed block i is selection block i
            scores = torch.nn.functional.pad(grouped, (0, n_elig - c_vis))
        else:
            scores = grouped @ overlap[:c_vis, :n_elig]  # [B, Hkv, tc, n_elig]
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

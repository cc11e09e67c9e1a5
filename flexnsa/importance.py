"""Importance scores and top-n selection, chunked over queries (memory-bounded, no grad).

With ``NSAConfig.fused_top_n``, one Triton kernel computes scores and top-n
(``triton_fallback.selection_top_n``) and no score tensor exists. Otherwise, per chunk of tokens: group scores (compression probabilities summed over the G heads of each kv
group, per compressed block) come from the fused Triton kernel
(``triton_fallback.compression_scores``) or from PyTorch; they are mapped onto selection blocks,
summed over query tiles in block-shared mode, and the top-n is taken. Selection is not
differentiable (as in NSA), so all of it runs under no_grad. The eligibility/forced-block rule and
the block-overlap map are the reference's (one definition of the semantics).
"""

from __future__ import annotations

import contextlib

import torch

from .config import NSAConfig
from .reference import block_overlap, compression_visibility, sum_rows, top_n_blocks
from .triton_fallback import use_triton_scorer

CHUNK_ELEMENTS = 1 << 25  # fp32 scores (or per-head logits) per chunk: 128 MiB bounds the peak


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


def torch_group_scores(q, k_cmp, config: NSAConfig, t0: int, t1: int, lse: torch.Tensor):
    """PyTorch version of the fused kernel: [B, Hkv, t1 - t0, C] group scores, lse rows filled."""
    B, Hq, _, D = q.shape
    Hkv, C = k_cmp.shape[1], k_cmp.shape[2]
    # Causality bounds the work: only blocks visible to the chunk's last token.
    c_vis = min(C, max(0, (t1 - config.block_size) // config.stride + 1))
    qc = q[:, :, t0:t1].float().view(B, Hkv, Hq // Hkv, t1 - t0, D)
    with exact_tf32_for(q.dtype):
        logits = torch.einsum("bhgtd,bhcd->bhgtc", qc, k_cmp[:, :, :c_vis].float()) * config.softmax_scale(D)
    visible = compression_visibility(torch.arange(t0, t1, device=q.device), c_vis, config)
    logits = logits.masked_fill(~visible, float("-inf"))
    chunk_lse = torch.logsumexp(logits, dim=-1)
    lse[:, :, t0:t1] = chunk_lse.view(B, Hq, t1 - t0)
    probs = torch.exp(logits - chunk_lse[..., None]).nan_to_num_(0.0)  # rows with nothing visible -> 0
    return torch.nn.functional.pad(probs.sum(dim=2), (0, C - c_vis))


def _chunk_tokens(per_token_elements: int, tile: int) -> int:
    return max(tile, CHUNK_ELEMENTS // max(1, per_token_elements) // tile * tile)


@torch.no_grad()
def importance_top_n(q: torch.Tensor, k_cmp: torch.Tensor, config: NSAConfig, cmp_lse: torch.Tensor | None = None):
    """Selected block ids [B, Hkv, T, n] (per token, ascending, -1 padded) and cmp lse [B, Hq, T].

    q [B, Hq, T, D]; k_cmp [B, Hkv, C, D] pooled keys. ``cmp_lse``: the compression branch's lse
    [B, Hq, T] fp32 when its forward already ran (same softmax): the Triton scorers then skip their
    lse pass and it is returned as the lse (NOTES Lever 14). The PyTorch scorer computes its own.
    """
    B, Hq, T, D = q.shape
    Hkv, C = k_cmp.shape[1], k_cmp.shape[2]
    l_sel = config.select_block_size
    shared = config.selection == "block_shared"
    tile = config.select_query_tile if shared else 1
    if config.fused_top_n and use_triton_scorer(config, q.device):
        from .triton_fallback.selection_top_n import selection_top_n

        rows, lse = selection_top_n(q, k_cmp, config, lse=cmp_lse)
        return (rows.repeat_interleave(tile, dim=2)[:, :, :T] if tile > 1 else rows), lse
    identity_map = config.block_size == config.stride == l_sel
    overlap = None if identity_map else block_overlap(T, config, torch.float32, q.device)
    selected = torch.empty(B, Hkv, T, config.num_selected, dtype=torch.int64, device=q.device)
    triton_scorer = use_triton_scorer(config, q.device)
    if triton_scorer and cmp_lse is not None:
        lse = cmp_lse
    else:
        lse = torch.full((B, Hq, T), float("-inf"), dtype=torch.float32, device=q.device)
    if triton_scorer:
        from .triton_fallback.compression_scores import partial_rows
        from .triton_fallback.custom_ops import compression_group_scores, compression_group_scores_given_lse

        # block-shared: the kernel returns tile sums and holds only its partials (tokens / in_kernel rows)
        step = _chunk_tokens(-(-B * Hkv * max(C, 1) * partial_rows(q, Hq // Hkv, tile) // tile), tile)
        scale = config.softmax_scale(D)

        def tile_scores(t0, t1):
            args = (config.block_size, config.stride, scale, t0, t1, tile)
            if cmp_lse is not None:
                return compression_group_scores_given_lse(q, k_cmp, cmp_lse, *args)
            scores, lse[:, :, t0:t1] = compression_group_scores(q, k_cmp, *args)
            return scores

    else:
        step = _chunk_tokens(B * Hq * max(C, 1), tile)

        def tile_scores(t0, t1):
            scores = torch_group_scores(q, k_cmp, config, t0, t1, lse)
            return scores if tile == 1 else sum_rows(scores, tile)

    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        grouped = tile_scores(t0, t1)  # [B, Hkv, rows (tiles or tokens), C]: sums commute with the block map
        n_elig = (t1 - 1) // l_sel + 1  # later selection blocks can never be chosen in this chunk
        if identity_map:  # l = s = l': compressed block i is selection block i
            scores = grouped[..., :n_elig] if n_elig <= C else torch.nn.functional.pad(grouped, (0, n_elig - C))
        else:
            scores = grouped @ overlap[:, :n_elig]
        first = torch.arange(t0, t1, tile, device=q.device)  # each row's first token
        chosen = top_n_blocks(scores, first // l_sel, config)
        selected[:, :, t0:t1] = chosen.repeat_interleave(tile, dim=2)[:, :, : t1 - t0] if shared else chosen
    return selected, lse

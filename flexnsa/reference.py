"""Pure-PyTorch NSA reference: the six steps of DESIGN.md, written for clarity, not speed.

Runs in any dtype on any device (tests use float64 on CPU) with autograd, so it is also the
CPU training backend. It materialises [T, T] masks: O(T^2) memory, for short sequences only.
It shares no code with the fast backends except the config and the optional MLP compressors
(which *define* phi in ``compression='mlp'`` mode).

Semantics, for a query token t (0-based) and kv head h with G query heads:

1. Compression. Block i covers [i*s, i*s + l); K~_i = phi(K[block]), V~_i likewise. Block i is
   visible to t iff i*s + l <= t + 1. o_cmp(t) = softmax(q_t K~_vis^T * scale) V~_vis, and 0 with
   lse = -inf when nothing is visible.
2. Importance. p_t = compression probabilities summed over the G heads of group h;
   score_t[j] = sum_i p_t[i] * |block_i ∩ select_block_j| / l.
3. Top-n. Eligible: j <= cur = t // l'. Forced: j < forced_initial and
   cur - forced_local < j <= cur. The rest by score (ties: any). n_eff = min(n, cur + 1).
4. Selection. o_slc(t) = attention over tokens of the selected blocks that are <= t; the G heads
   of a group share the group's selection.
5. Window. o_win(t) = attention over tokens (t - w, t].
6. Output. o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win per query head.

Block-shared selection (``selection='block_shared'``): the query axis is cut into tiles of
``select_query_tile`` tokens starting at token 0 (the last may be partial). Every token of a
tile uses the tile's selection: top-n (step 3) of the tile's summed per-token scores
sum_{t in tile} score_t, with eligibility and forced blocks of the tile's selection block
cur = first_token // l' (the tile never straddles two, since the tile divides l'). Causality is
still per token in step 4. With a tile of 1 token this is exactly per-token selection.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import NSAConfig
from .output import NSAOutput
from .validation import check_nsa_inputs


def reference_compress(k, v, config: NSAConfig, compressors: tuple[nn.Module, nn.Module] | None = None):
    """Pooled keys/values [B, Hkv, C, D]: explicit per-block mean, or the given MLPs."""
    if config.compression == "mlp":
        if compressors is None:
            raise ValueError("NSAConfig.compression='mlp' needs compressors=(key_mlp, value_mlp)")
        return compressors[0](k, config.stride), compressors[1](v, config.stride)
    C = config.num_compressed_blocks(k.shape[2])
    starts = [i * config.stride for i in range(C)]
    pooled = [
        torch.stack([x[:, :, s : s + config.block_size].mean(dim=2) for s in starts], dim=2)
        if C
        else x.new_zeros(x.shape[0], x.shape[1], 0, x.shape[3])
        for x in (k, v)
    ]
    return pooled[0], pooled[1]


def compression_visibility(tokens: torch.Tensor, num_cmp: int, config: NSAConfig) -> torch.Tensor:
    """[len(tokens), C] bool: compressed block i is visible to token t iff i*s + l <= t + 1."""
    i = torch.arange(num_cmp, device=tokens.device)[None, :]
    return i * config.stride + config.block_size <= tokens[:, None] + 1


def block_overlap(seq_len: int, config: NSAConfig, dtype=torch.float64, device=None) -> torch.Tensor:
    """[C, Nsel]: |compressed block i ∩ selection block j| / l (identity when l = s = l')."""
    C, N = config.num_compressed_blocks(seq_len), config.num_select_blocks(seq_len)
    i0 = torch.arange(C, device=device)[:, None] * config.stride
    j0 = torch.arange(N, device=device)[None, :] * config.select_block_size
    lo = torch.maximum(i0, j0)
    hi = torch.minimum(i0 + config.block_size, j0 + config.select_block_size)
    return (hi - lo).clamp(min=0).to(dtype) / config.block_size


def masked_attention(q, k, v, mask, scale):
    """Softmax attention under a boolean mask; rows with no visible key give 0 and lse -inf.

    q [B, Hq, T, D], k/v [B, Hkv, S, D], mask broadcastable to [B, Hkv, T, S] (shared by the
    G query heads of a group). Returns (out [B, Hq, T, D], probs [B, Hq, T, S], lse [B, Hq, T]).
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qg = q.view(B, Hkv, G, T, D)
    logits = torch.einsum("bhgtd,bhsd->bhgts", qg, k) * scale
    mask = mask.expand(B, Hkv, T, S)[:, :, None]
    any_visible = mask.any(dim=-1, keepdim=True)
    # Rows with nothing visible get a uniform softmax times 0: no NaN in forward or backward.
    safe = torch.where(mask | ~any_visible, logits, torch.full_like(logits, float("-inf")))
    probs = torch.softmax(safe, dim=-1) * any_visible
    lse = torch.where(
        any_visible[..., 0],
        torch.logsumexp(safe, dim=-1),
        logits.new_full(logits.shape[:-1], float("-inf")),
    )
    out = torch.einsum("bhgts,bhsd->bhgtd", probs, v)
    return out.reshape(B, Hq, T, D), probs.reshape(B, Hq, T, S), lse.reshape(B, Hq, T)


def importance_scores(cmp_probs, seq_len: int, config: NSAConfig, kv_heads: int) -> torch.Tensor:
    """[B, Hkv, T, Nsel]: compression probabilities summed over each group, mapped to selection blocks."""
    B, Hq, T, C = cmp_probs.shape
    grouped = cmp_probs.reshape(B, kv_heads, Hq // kv_heads, T, C).sum(dim=2)
    return grouped @ block_overlap(seq_len, config, grouped.dtype, grouped.device)


def top_n_blocks(scores, current_block, config: NSAConfig) -> torch.Tensor:
    """Top-n with eligibility and forced blocks (DESIGN.md step 3).

    scores [..., R, Nsel] for R query rows (tokens or tiles); current_block [R] = the selection
    block each row sits in. Returns [..., R, num_selected] int64, ascending, padded with -1.
    """
    N = scores.shape[-1]
    j = torch.arange(N, device=scores.device)
    cur = current_block[:, None]
    eligible = j[None, :] <= cur
    forced = eligible & ((j[None, :] < config.forced_initial) | (j[None, :] > cur - config.forced_local))
    ranked = scores.masked_fill(~eligible, float("-inf")).masked_fill(forced, float("inf"))
    width = min(config.num_selected, N)
    values, idx = ranked.topk(width, dim=-1)
    big = torch.iinfo(torch.int64).max
    idx = torch.where(values > float("-inf"), idx, torch.full_like(idx, big)).sort(dim=-1).values
    idx = torch.where(idx == big, torch.full_like(idx, -1), idx)
    pad = config.num_selected - width
    return torch.nn.functional.pad(idx, (0, pad), value=-1) if pad else idx


def select_blocks(scores, seq_len: int, config: NSAConfig) -> torch.Tensor:
    """Per-token [B, Hkv, T, n] selection from per-token scores, in the configured granularity."""
    l_sel = config.select_block_size
    tokens = torch.arange(seq_len, device=scores.device)
    if config.selection == "per_token":
        return top_n_blocks(scores, tokens // l_sel, config)
    tile = config.select_query_tile
    tile_scores = sum_rows(scores, tile)
    tile_first = torch.arange(tile_scores.shape[2], device=scores.device) * tile
    per_tile = top_n_blocks(tile_scores, tile_first // l_sel, config)
    return per_tile.repeat_interleave(tile, dim=2)[:, :, :seq_len]


def sum_rows(scores, rows: int) -> torch.Tensor:
    """[..., R, N] -> [..., ceil(R / rows), N]: sums of ``rows`` consecutive rows (the last group
    may be short): per-token scores -> per-tile scores for block-shared selection."""
    pad = -scores.shape[-2] % rows
    return torch.nn.functional.pad(scores, (0, 0, 0, pad)).unflatten(-2, (-1, rows)).sum(-2)


def prune_selection_by_gates(selected, gates, config: NSAConfig) -> torch.Tensor:
    """Gate-aware pruning (inference option ``gate_prune_epsilon``): a selection row whose
    selection gates are all below epsilon (every query head of the kv group, every token of the
    block-shared tile) gets no blocks, so the selection branch is 0 there.

    Bound: attention outputs are convex combinations of values, so dropping g_slc * slc changes
    each output element by at most epsilon * max|v|.
    """
    eps = config.gate_prune_epsilon
    if not eps:
        return selected
    B, Hkv, T = selected.shape[:3]
    low = (gates[..., 1] < eps).unflatten(2, (Hkv, -1)).all(-1)  # [B, T, Hkv]
    if config.selection == "block_shared":
        tile = config.select_query_tile
        padded = torch.nn.functional.pad(low, (0, 0, 0, -T % tile), value=True)
        low = padded.unflatten(1, (-1, tile)).all(2).repeat_interleave(tile, dim=1)[:, :T]
    return selected.masked_fill(low.permute(0, 2, 1)[..., None], -1)


def selection_visibility(selected, seq_len: int, config: NSAConfig) -> torch.Tensor:
    """[B, Hkv, T, T] bool: key s is visible to token t iff block(s) is selected for t and s <= t."""
    B, Hkv, T, n = selected.shape
    N = config.num_select_blocks(seq_len)
    chosen = torch.zeros(B, Hkv, T, N + 1, dtype=torch.bool, device=selected.device)
    chosen.scatter_(-1, torch.where(selected < 0, N, selected), True)
    key_block = torch.arange(seq_len, device=selected.device) // config.select_block_size
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=selected.device).tril()
    return chosen[..., key_block] & causal


def window_visibility(seq_len: int, window: int, device=None) -> torch.Tensor:
    """[T, T] bool: key s visible to t iff t - window < s <= t."""
    t = torch.arange(seq_len, device=device)
    diff = t[:, None] - t[None, :]
    return (diff >= 0) & (diff < window)


def nsa_reference(
    q,
    k,
    v,
    gates,
    config: NSAConfig,
    *,
    compressors: tuple[nn.Module, nn.Module] | None = None,
    selected: torch.Tensor | None = None,
) -> NSAOutput:
    """The whole NSA op with every branch; ``selected`` overrides step 3 (for branch tests)."""
    shape = check_nsa_inputs(q, k, v, gates, config)
    B, Hq, Hkv, T, D = shape.batch, shape.q_heads, shape.kv_heads, shape.seq_len, shape.head_dim
    scale = config.softmax_scale(D)
    kc, vc = reference_compress(k, v, config, compressors)
    cmp, cmp_probs, cmp_lse = masked_attention(
        q, kc, vc, compression_visibility(torch.arange(T, device=q.device), kc.shape[2], config), scale
    )
    if selected is None:
        with torch.no_grad():
            scores = importance_scores(cmp_probs.detach(), T, config, Hkv)
            selected = select_blocks(scores, T, config)
    selected = prune_selection_by_gates(selected, gates, config)
    slc, _, _ = masked_attention(q, k, v, selection_visibility(selected, T, config), scale)
    win, _, _ = masked_attention(q, k, v, window_visibility(T, config.window, q.device), scale)
    g = gates.permute(0, 2, 1, 3)  # [B, Hq, T, 3]
    out = g[..., 0:1] * cmp + g[..., 1:2] * slc + g[..., 2:3] * win
    return NSAOutput(out, cmp, slc, win, selected, cmp_lse.float())

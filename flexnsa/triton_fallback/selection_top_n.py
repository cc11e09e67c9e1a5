"""Fused importance scores + top-n: compression logits -> lse -> p -> group (and tile) sums ->
top-n block ids, without writing any score tensor.

Covers the VideoNSA case l = s = l' (compressed block j *is* selection block j) with a
power-of-two selection tile (1 = per-token); other block geometries go through the chunked scorer
in ``flexnsa.importance`` (memory-bounded, same semantics).

One program owns SUB x BLOCK_T consecutive tokens of one kv head (rows = tokens x the G heads of
the group, K~ loaded once for all G heads):

1. per BLOCK_T sub-tile, each row's log-sum-exp over its visible compressed blocks (stored to the
   lse output, which the caller also needs);
2. per chunk of BLOCK_C blocks: p = exp(s - lse) summed over the G heads and over the tile's
   tokens (SEL_ROWS selection rows per program: BLOCK_T / tile, or 1 when the tile spans several
   sub-tiles), then eligibility (j <= current block), forced blocks (+inf) and a running top-n.

Top-n keeps, per selection row, the best BLOCK_C keys sorted descending. A key packs the score's
fp32 bits (order-preserving for scores >= 0; forced blocks get +inf's bits) above the inverted
block id, so one integer sort orders by score and breaks ties towards the lower block. Merging a
chunk: max(best sorted descending, chunk sorted ascending) holds the BLOCK_C largest keys of both
(the half-cleaner step of a bitonic merge), then one sort restores the order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import MAX_SELECTED, fused_top_n_supported
from .tiles import check_given_lse, check_query, load_blocks, row_lse, row_offsets, rows_per_tile, tile_rows, visible, visible_block_end



@triton.jit
def _top_n_kernel(
    Q, K, LSE, SEL,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_c, sl_b, sl_h, ss_b, ss_h, ss_r,
    T, C, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    D: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, SUB: tl.constexpr, SEL_ROWS: tl.constexpr,
    N_TOP: tl.constexpr, FORCED_INITIAL: tl.constexpr, FORCED_LOCAL: tl.constexpr, GIVEN_LSE: tl.constexpr,
):
    pid, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t_base = pid * (SUB * BLOCK_T)
    k_base = b * sk_b + h * sk_h

    # Pass 1 (skipped when the compression branch's forward already gave the lse): lse of every
    # row, stored (pass 2 re-reads it per sub-tile).
    if not GIVEN_LSE:
        for sub in range(SUB):
            t_first = t_base + sub * BLOCK_T
            t, g, row_ok = tile_rows(t_first, T, G, G_PAD, BLOCK_T, BLOCK_T * G_PAD)
            q_off, qh = row_offsets(b, h, t, g, sq_b, sq_h, sq_t, G, D)
            q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
            c_end = visible_block_end(tl.minimum(t_first + BLOCK_T, T) - 1, C, BLOCK, BLOCK)
            lse = row_lse(q, K, b, h, k_base, sk_c, t, row_ok, c_end, C, scale, BLOCK_C, D, BLOCK, BLOCK, False)
            tl.store(LSE + b * sl_b + qh * sl_h + t, lse, mask=row_ok)
        tl.debug_barrier()  # the whole program's lse stores are visible to all its threads

    # Pass 2: tile scores per chunk of blocks, merged into the running top-n.
    sel_row = pid * SEL_ROWS + tl.arange(0, SEL_ROWS)
    first = sel_row * TILE  # first token of each selection row
    cur = first // BLOCK  # its selection block; eligible: j <= cur
    block_end = (tl.minimum(t_base + SUB * BLOCK_T, T) - 1) // BLOCK + 1
    best = tl.full([SEL_ROWS, BLOCK_C], -1, tl.int64)
    for c0 in range(0, block_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        k = load_blocks(K, k_base, c, sk_c, C, D)
        tile_scores = tl.zeros([SEL_ROWS, BLOCK_C], tl.float32)
        for sub in range(SUB):
            t, g, row_ok = tile_rows(t_base + sub * BLOCK_T, T, G, G_PAD, BLOCK_T, BLOCK_T * G_PAD)
            q_off, qh = row_offsets(b, h, t, g, sq_b, sq_h, sq_t, G, D)
            q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + b * sl_b + qh * sl_h + t, mask=row_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634  # log2 units; unseen rows: p = 0 below
            s = tl.dot(q, tl.trans(k)) * (scale * 1.4426950408889634)
            p = tl.where(visible(t, c, C, row_ok, BLOCK, BLOCK), tl.exp2(s - lse[:, None]), 0.0)
            grouped = tl.sum(tl.reshape(p, (BLOCK_T, G_PAD, BLOCK_C)), 1)
            tile_scores += tl.sum(tl.reshape(grouped, (SEL_ROWS, BLOCK_T // SEL_ROWS, BLOCK_C)), 1)
        eligible = (c[None, :] <= cur[:, None]) & (first < T)[:, None]
        forced = eligible & ((c[None, :] < FORCED_INITIAL) | (c[None, :] > cur[:, None] - FORCED_LOCAL))
        bits = tl.where(forced, 0x7F800000, tile_scores.to(tl.int32, bitcast=True)).to(tl.int64)
        key = tl.where(eligible, (bits << 32) | (0x7FFFFFFF - c[None, :]).to(tl.int64), -1)
        best = tl.sort(tl.maximum(best, tl.sort(key, 1)), 1, descending=True)

    col = tl.arange(0, BLOCK_C)
    # Unused slots become 2**31 (after every block id), then -1 once ids are ascending.
    ids = tl.where((best >= 0) & (col[None, :] < N_TOP), 0x7FFFFFFF - (best & 0x7FFFFFFF), 0x80000000)
    ids = tl.sort(ids, 1)
    ids = tl.where(ids == 0x80000000, -1, ids)
    ptr = SEL + b * ss_b + h * ss_h + sel_row[:, None] * ss_r + col[None, :]
    tl.store(ptr, ids, mask=(first < T)[:, None] & (col[None, :] < N_TOP))


def selection_top_n(
    q: torch.Tensor, k_cmp: torch.Tensor, config, block_c: int | None = None, lse: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected block ids per selection row [B, Hkv, ceil(T / tile), n] int64 (ascending, -1
    padded; tile = 1 for per-token selection) and the compression lse [B, Hq, T] fp32, through
    the ``flexnsa::selection_top_n`` custom op (``selection_top_n_given_lse`` when ``lse``, the
    compression branch's, is given: the kernel skips its lse pass and returns that lse).

    q [B, Hq, T, D], k_cmp [B, Hkv, C, D] pooled keys. ``block_c``: blocks per chunk (= top-n
    buffer width, a power of two >= n and >= 16); default 64 on GPUs (one MMA-wide tile), 16
    under the CPU interpreter, whose sort runs elementwise in Python.
    """
    from .custom_ops import selection_top_n as op, selection_top_n_given_lse as op_given

    if not fused_top_n_supported(config):
        raise ValueError(
            "selection_top_n covers block_size == stride == select_block_size, a power-of-two "
            f"select_query_tile and num_selected <= {MAX_SELECTED}; got {config}"
        )
    if block_c is None:
        block_c = 64 if q.is_cuda else 16
    block_c = max(block_c, triton.next_power_of_2(config.num_selected))
    if block_c < 16 or block_c & (block_c - 1):
        raise ValueError(f"block_c must be a power of two >= 16, got {block_c}")
    tile = config.select_query_tile if config.selection == "block_shared" else 1
    args = (config.block_size, config.num_selected, tile, config.forced_initial, config.forced_local,
            config.softmax_scale(q.shape[-1]), block_c)
    if lse is None:
        return op(q, k_cmp, *args)
    return op_given(q, k_cmp, lse, *args), lse


def launch(q, k_cmp, block_size: int, n: int, tile: int, forced_initial: int, forced_local: int, scale: float, block_c: int,
           num_warps: int | None = None, lse: torch.Tensor | None = None):
    """Run the kernel on contiguous q, k_cmp (arguments checked by ``selection_top_n``);
    ``num_warps`` is a tuning lever (profiling/top_n_levers.py). ``lse`` [B, Hq, T] fp32, when
    given, is read instead of computed. -> (ids, lse: the given one or the computed one)."""
    B, Hq, T, D = q.shape
    Hkv = k_cmp.shape[1]
    check_query(q, "selection_top_n")
    given = lse is not None
    if given:
        check_given_lse(lse, q)
    g_pad, block_t = rows_per_tile(Hq // Hkv)
    sub, sel_rows = max(1, tile // block_t), max(1, block_t // tile)
    selected = torch.empty(B, Hkv, triton.cdiv(T, tile), n, device=q.device, dtype=torch.int64)
    if not given:
        lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    if T == 0:
        return selected, lse
    grid = (triton.cdiv(T, sub * block_t), Hkv, B)
    _top_n_kernel[grid](
        q, k_cmp, lse, selected,
        q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        lse.stride(0), lse.stride(1), selected.stride(0), selected.stride(1), selected.stride(2),
        T, k_cmp.shape[2], scale,
        G=Hq // Hkv, G_PAD=g_pad, BLOCK_T=block_t, BLOCK_C=block_c, D=D,
        BLOCK=block_size, TILE=tile, SUB=sub, SEL_ROWS=sel_rows, N_TOP=n,
        FORCED_INITIAL=forced_initial, FORCED_LOCAL=forced_local, GIVEN_LSE=given,
        num_warps=num_warps or (8 if D >= 128 else 4),
    )
    return selected, lse

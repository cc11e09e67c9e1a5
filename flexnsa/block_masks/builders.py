"""BlockMask builders computed on device from block arithmetic and top-n indices.

Nothing here materialises a [T, T] mask: each builder computes per (query block, kv block)
tables of "some key visible" (partial: the mask_mod runs) and "every key visible" (full: the
mask_mod is skipped), [B, H, T/BQ, T/BK] at most, and hands them to ``from_kv_blocks``.
``kv_indices`` rows list the blocks first, then the remaining block ids, so each row has every
kv block exactly once (PITFALLS: torch 2.11 needs the full width with valid, distinct ids).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..config import NSAConfig
from .layout import QueryLayout
from .mask_mods import (
    causal_compression_mask,
    pack_selection_bits,
    selected_blocks_mask,
    sliding_window_mask,
)


# NOTES Lever 62 (lost in session 30: compiled 8K fwd+bwd 75 -> 79 launches, so off): the kv_indices rows
# placed by counting (``blocks_first``) instead of sorted (``sorted_blocks_first``); the same rows.
COUNTED_INDICES = False


def sorted_blocks_first(table: torch.Tensor):
    """(count [..], order [.., nKB]) int32 of a bool table [.., nKB]: each row's set blocks,
    their ids ascending, then the other ids ascending (a stable descending argsort of the row)."""
    count = table.sum(dim=-1, dtype=torch.int32)
    return count, torch.argsort(table.to(torch.uint8), dim=-1, descending=True, stable=True).to(torch.int32)


def blocks_first(table: torch.Tensor):
    """``sorted_blocks_first`` placed by counting instead: a scan, a where and a scatter, which
    inductor fuses, where the argsort is a CUDA radix sort of several launches per call."""
    marks = table.to(torch.int32)
    before = torch.cumsum(marks, -1, dtype=torch.int32) - marks  # set blocks before each block
    count = marks.sum(-1, dtype=torch.int32)
    ids = torch.arange(table.shape[-1], device=table.device, dtype=torch.int32).expand_as(marks)
    place = torch.where(table, before, count[..., None] + ids - before)  # unset ones after the count
    return count, torch.empty_like(marks).scatter_(-1, place.long(), ids)


def block_mask_from_tables(partial, full, block_size, mask_mod, seq_lengths) -> BlockMask:
    """BlockMask from disjoint bool tables [B, H, nQB, nKB] of partial and full blocks."""
    indices = blocks_first if COUNTED_INDICES else sorted_blocks_first
    return BlockMask.from_kv_blocks(
        *indices(partial),
        *indices(full),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=seq_lengths,
    )


def _kv_block_bounds(length: int, block: int, device):
    lo = torch.arange(0, length, block, device=device, dtype=torch.int64)
    return lo, torch.clamp(lo + block, max=length) - 1


def window_block_mask(seq_len: int, layout: QueryLayout, config: NSAConfig, device) -> BlockMask:
    """Sliding window (t - w, t] over the token keys; one mask shared by all batches and heads."""
    bq, bk, w = config.flex_block_q, config.flex_block_kv, config.window
    t_lo, t_hi = (x[:, None] for x in layout.token_ranges(seq_len, bq, device))
    k_lo, k_hi = (x[None, :] for x in _kv_block_bounds(seq_len, bk, device))
    any_visible = (k_lo <= t_hi) & (k_hi > t_lo - w)
    full = (k_hi <= t_lo) & (k_lo > t_hi - w)
    return block_mask_from_tables(
        (any_visible & ~full)[None, None],
        full[None, None],
        (bq, bk),
        sliding_window_mask(w, layout),
        (layout.num_rows(seq_len), seq_len),
    )


def compression_block_mask(seq_len: int, layout: QueryLayout, config: NSAConfig, device) -> BlockMask:
    """Causal visibility of compressed blocks (whole block in the past); keys = C pooled blocks."""
    bq, bk = config.flex_block_q, config.flex_block_kv
    num_cmp = config.num_compressed_blocks(seq_len)
    t_lo, t_hi = (x[:, None] for x in layout.token_ranges(seq_len, bq, device))
    i_lo, i_hi = (x[None, :] for x in _kv_block_bounds(num_cmp, bk, device))
    last_token = config.block_size - 1
    any_visible = i_lo * config.stride + last_token <= t_hi
    full = i_hi * config.stride + last_token <= t_lo
    return block_mask_from_tables(
        (any_visible & ~full)[None, None],
        full[None, None],
        (bq, bk),
        causal_compression_mask(config.block_size, config.stride, layout),
        (layout.num_rows(seq_len), num_cmp),
    )


def _selection_counts(selected, layout: QueryLayout, block_rows: int, num_sel_blocks: int):
    """[B, Hkv, nQB, Nsel]: how many tokens of each query block selected each selection block."""
    B, Hkv, T, n = selected.shape
    rows = layout.num_rows(T)
    num_qb = -(-rows // block_rows)
    token = torch.arange(T, device=selected.device, dtype=torch.int64)
    first_qb = token * layout.rows_per_token // block_rows
    last_qb = (token * layout.rows_per_token + layout.rows_per_token - 1) // block_rows
    ids = torch.where(selected < 0, num_sel_blocks, selected)  # -1 -> a spare column
    counts = torch.zeros(B, Hkv, num_qb * (num_sel_blocks + 1), dtype=torch.int32, device=selected.device)
    ones = torch.ones_like(ids, dtype=torch.int32)
    counts = counts.scatter_add(-1, (first_qb[:, None] * (num_sel_blocks + 1) + ids).flatten(2), ones.flatten(2))
    straddles = (last_qb != first_qb).to(torch.int32)[:, None].expand_as(ids)  # folded rows of one token in 2 blocks
    counts = counts.scatter_add(-1, (last_qb[:, None] * (num_sel_blocks + 1) + ids).flatten(2), straddles.flatten(2))
    return counts.view(B, Hkv, num_qb, num_sel_blocks + 1)[..., :num_sel_blocks]


def _to_kv_blocks(table, sel_block: int, kv_block: int, pad_value: bool, reduce):
    """Map [..., Nsel] per-selection-block flags onto [..., nKB] flex kv blocks."""
    if kv_block <= sel_block:
        return table.repeat_interleave(sel_block // kv_block, dim=-1)
    per_kv = kv_block // sel_block
    pad = -table.shape[-1] % per_kv
    table = torch.nn.functional.pad(table, (0, pad), value=pad_value)
    return reduce(table.unflatten(-1, (-1, per_kv)), dim=-1)


def selection_rows(selected: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Per-token ids [B, Hkv, T, n] -> one row per selection row [B, Hkv, R, n]: each token
    (per-token) or each query tile (block-shared, whose tokens all hold the tile's ids)."""
    return selected[:, :, :: config.select_query_tile] if config.selection == "block_shared" else selected


def selection_block_mask(selected: torch.Tensor, layout: QueryLayout, config: NSAConfig) -> BlockMask:
    """Selected blocks, causal inside the current block, from per-token ids [B, Hkv, T, n].

    A kv block is full for a query block when every token of it selected every selection block
    in the kv block and the kv block lies wholly before the query block's first token.
    """
    B, Hkv, T, _ = selected.shape
    bq, bk, l_sel = config.flex_block_q, config.flex_block_kv, config.select_block_size
    if bk % l_sel and l_sel % bk:
        raise ValueError(
            f"NSAConfig.flex_block_kv ({bk}) and select_block_size ({l_sel}) must divide one another"
        )
    num_sel = config.num_select_blocks(T)
    device = selected.device
    counts = _selection_counts(selected, layout, bq, num_sel)
    t_lo, t_hi = layout.token_ranges(T, bq, device)
    tokens_in_qb = (t_hi - t_lo + 1)[:, None]
    any_sel = _to_kv_blocks(counts > 0, l_sel, bk, False, torch.any)
    all_sel = _to_kv_blocks(counts == tokens_in_qb, l_sel, bk, True, torch.all)
    num_kv = -(-T // bk)
    any_sel, all_sel = any_sel[..., :num_kv], all_sel[..., :num_kv]
    k_lo, k_hi = _kv_block_bounds(T, bk, device)
    full = all_sel & (k_hi[None, :] < t_lo[:, None])
    partial = any_sel & (k_lo[None, :] <= t_hi[:, None]) & ~full  # skip kv blocks wholly in the future
    if not layout.folded:
        partial = partial.repeat_interleave(layout.group, dim=1)
        full = full.repeat_interleave(layout.group, dim=1)
    tokens_per_row = config.select_query_tile if config.selection == "block_shared" else 1
    mask_mod = selected_blocks_mask(pack_selection_bits(selection_rows(selected, config), num_sel), l_sel, tokens_per_row, layout)
    return block_mask_from_tables(partial, full, (bq, bk), mask_mod, (layout.num_rows(T), T))

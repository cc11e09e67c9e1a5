"""mask_mod factories: each states one mask's full semantics (block indices only accelerate it).

On CPU, eager flex_attention ignores block indices and evaluates only the mask_mod, while
compiled flex respects the indices (PITFALLS), so eager == compiled only if the mask_mod is the
whole truth. Closures capture ints fixed by the config and tensors, never changing Python
scalars, so a new mask of equal shapes does not recompile.

Index arithmetic stays in int32 (what flex passes in): every value is below 2^31 at 128K tokens
x 7 heads, and divisions by the captured constants compile to multiply-shifts. The table
lookups index small tensors (no q*kv products), so there is no offset overflow; the 128K
sampled-row GPU test checks it.
"""

from __future__ import annotations

import torch

from .layout import QueryLayout

BITS_PER_WORD = 32


def causal_compression_mask(block_size: int, stride: int, layout: QueryLayout):
    """Compressed block ``kv_idx`` is visible to token t iff kv_idx*stride + block_size <= t + 1."""

    def mask_mod(b, h, q_idx, kv_idx):
        t = layout.token_of_row(q_idx)
        return kv_idx * stride + block_size <= t + 1

    return mask_mod


def sliding_window_mask(window: int, layout: QueryLayout):
    """Key s is visible to token t iff t - window < s <= t."""

    def mask_mod(b, h, q_idx, kv_idx):
        t = layout.token_of_row(q_idx)
        return (kv_idx <= t) & (t - kv_idx < window)

    return mask_mod


def selected_blocks_mask(
    selection_bits: torch.Tensor, select_block_size: int, tokens_per_table_row: int, layout: QueryLayout
):
    """Key s is visible to token t iff its selection block is selected for t and s <= t.

    ``selection_bits`` [B, Hkv, R, W] int32 holds, per (kv head, table row), bit j%32 of word
    j//32 set iff selection block j is selected. Table row = t // tokens_per_table_row: 1 for
    per-token selection (R = T), the query tile for block-shared selection (R = #tiles).
    """

    def mask_mod(b, h, q_idx, kv_idx):
        t = layout.token_of_row(q_idx)
        block = kv_idx // select_block_size
        word = selection_bits[b, layout.kv_head_of_mask_head(h), t // tokens_per_table_row, block // BITS_PER_WORD]
        hit = (word >> (block % BITS_PER_WORD)) & 1
        return (hit != 0) & (kv_idx <= t)

    return mask_mod


def pack_selection_bits(selected: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[B, Hkv, R, n] block ids (-1 = unused) -> [B, Hkv, R, ceil(N/32)] int32 bit table.

    Ids in a row are distinct, so summing their powers of two equals OR-ing them.
    """
    words = -(-num_blocks // BITS_PER_WORD)
    valid = selected >= 0
    ids = selected.clamp(min=0)
    bits = torch.ones_like(ids, dtype=torch.int32) << (ids % BITS_PER_WORD).to(torch.int32)
    bits = torch.where(valid, bits, torch.zeros_like(bits))
    # Out of place: a mask_mod that captures a tensor mutated in place read the unmutated zeros
    # when the whole op was compiled with inductor on a GPU (selection branch all masked).
    table = torch.zeros(*selected.shape[:-1], words, dtype=torch.int32, device=selected.device)
    return table.scatter_add(-1, ids // BITS_PER_WORD, bits)

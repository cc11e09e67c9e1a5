"""FlexAttention masks for NSA: one mask_mod factory per mask, BlockMask builders from indices."""

from .builders import (
    block_mask_from_tables,
    blocks_first,
    compression_block_mask,
    selection_block_mask,
    selection_rows,
    sorted_blocks_first,
    window_block_mask,
)
from .layout import QueryLayout
from .mask_mods import (
    causal_compression_mask,
    pack_selection_bits,
    selected_blocks_mask,
    sliding_window_mask,
)

__all__ = [
    "QueryLayout",
    "block_mask_from_tables",
    "blocks_first",
    "causal_compression_mask",
    "compression_block_mask",
    "pack_selection_bits",
    "selected_blocks_mask",
    "selection_block_mask",
    "selection_rows",
    "sliding_window_mask",
    "sorted_blocks_first",
    "window_block_mask",
]

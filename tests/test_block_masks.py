"""Each mask_mod states the reference's semantics; each BlockMask covers exactly its mask_mod."""

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask, flex_attention

from flexnsa.backends.flex import run_flex
from flexnsa.block_masks import builders
from flexnsa.block_masks import (
    QueryLayout,
    blocks_first,
    sorted_blocks_first,
    causal_compression_mask,
    compression_block_mask,
    pack_selection_bits,
    selected_blocks_mask,
    selection_block_mask,
    sliding_window_mask,
    window_block_mask,
)
from flexnsa.reference import compression_visibility, selection_visibility, window_visibility

from helpers import SMALL, random_inputs

LAYOUTS = [QueryLayout("gqa_folded", 3), QueryLayout("per_head", 3), QueryLayout("gqa_folded", 1)]


def per_row(visibility, layout, kv_heads):
    """Token-level [B?, Hkv?, T, S] visibility -> [B, mask heads, rows, S] for a layout."""
    v = visibility
    while v.dim() < 4:
        v = v[None]
    v = v.expand(v.shape[0], kv_heads if v.shape[1] > 1 else 1, *v.shape[2:])
    if layout.folded:
        return v.repeat_interleave(layout.group, dim=2)
    return v.repeat_interleave(layout.group, dim=1) if v.shape[1] > 1 else v


def random_selection(B, Hkv, T, cfg, seed):
    gen = torch.Generator().manual_seed(seed)
    from flexnsa.reference import select_blocks

    return select_blocks(torch.rand(B, Hkv, T, cfg.num_select_blocks(T), generator=gen, dtype=torch.float64), T, cfg)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.name}-G{l.group}")
def test_mask_mods_equal_reference(layout):
    T, cfg, B, Hkv = 100, SMALL.replace(stride=8), 2, 2
    rows = layout.num_rows(T)
    heads = layout.mask_heads(Hkv)
    win = create_mask(sliding_window_mask(cfg.window, layout), 1, 1, rows, T, device="cpu")
    assert torch.equal(win, per_row(window_visibility(T, cfg.window), layout, Hkv))
    C = cfg.num_compressed_blocks(T)
    cmp = create_mask(causal_compression_mask(cfg.block_size, cfg.stride, layout), 1, 1, rows, C, device="cpu")
    assert torch.equal(cmp, per_row(compression_visibility(torch.arange(T), C, cfg), layout, Hkv))
    sel = random_selection(B, Hkv, T, cfg, seed=0)
    bits = pack_selection_bits(sel, cfg.num_select_blocks(T))
    slc = create_mask(selected_blocks_mask(bits, cfg.select_block_size, 1, layout), B, heads, rows, T, device="cpu")
    assert torch.equal(slc, per_row(selection_visibility(sel, T, cfg), layout, Hkv))


def dense_blocks(num, idx, num_kv_blocks):
    table = torch.zeros(*num.shape, num_kv_blocks + 1, dtype=torch.bool)
    pos = torch.arange(idx.shape[-1])
    ids = torch.where(pos < num[..., None], idx.long(), num_kv_blocks)
    return table.scatter_(-1, ids, True)[..., :num_kv_blocks]


def assert_block_mask_exact(bm, dense):
    """partial ∪ full == blocks with a visible pair; full blocks are entirely visible."""
    bq, bk = bm.BLOCK_SIZE
    R, S = dense.shape[-2:]
    nq, nk = -(-R // bq), -(-S // bk)
    padded = torch.nn.functional.pad(dense, (0, nk * bk - S, 0, nq * bq - R))
    blocks = padded.unflatten(-1, (nk, bk)).unflatten(-3, (nq, bq))  # [B, H, nq, bq, nk, bk]
    any_vis = blocks.any(-1).any(-2)
    valid = torch.nn.functional.pad(torch.ones(R, S, dtype=torch.bool), (0, nk * bk - S, 0, nq * bq - R))
    valid = valid.unflatten(-1, (nk, bk)).unflatten(-3, (nq, bq))
    all_vis = (blocks | ~valid).all(-1).all(-2)
    partial = dense_blocks(bm.kv_num_blocks, bm.kv_indices, nk)
    full = dense_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, nk)
    partial, full = (x.expand_as(any_vis) for x in (partial, full))
    assert not (partial & full).any(), "a block is both partial and full"
    assert torch.equal(partial | full, any_vis), "blocks missing or wasted"
    assert not (full & ~all_vis).any(), "a full block contains masked pairs"
    assert full.any(), "no full block at all: the fast path is never taken"


@pytest.mark.parametrize("counted", [False, True], ids=["sorted-indices", "counted-indices"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.name}-G{l.group}")
@pytest.mark.parametrize("selection", ["per_token", "block_shared"])
def test_block_masks_cover_their_mask_mod(layout, selection, counted, monkeypatch):
    monkeypatch.setattr(builders, "COUNTED_INDICES", counted)  # NOTES Lever 62's knob
    T, B, Hkv = 300, 2, 2
    cfg = SMALL.replace(flex_block_q=16, flex_block_kv=16, window=40, selection=selection)
    rows, heads = layout.num_rows(T), layout.mask_heads(Hkv)
    win = window_block_mask(T, layout, cfg, "cpu")
    assert_block_mask_exact(win, create_mask(win.mask_mod, 1, 1, rows, T, device="cpu"))
    cmp = compression_block_mask(T, layout, cfg, "cpu")
    assert_block_mask_exact(cmp, create_mask(cmp.mask_mod, 1, 1, rows, cfg.num_compressed_blocks(T), device="cpu"))
    # kv block == select block, two select blocks per kv block, half a select block
    for sel_block, kv_block in ((16, 16), (16, 32), (32, 16)):
        c = cfg.replace(select_block_size=sel_block, flex_block_kv=kv_block)
        slc = selection_block_mask(random_selection(B, Hkv, T, c, seed=1), layout, c)
        assert_block_mask_exact(slc, create_mask(slc.mask_mod, B, heads, rows, T, device="cpu"))


def test_blocks_first_orders_as_the_stable_sort():
    # NOTES Lever 62: the kv_indices rows placed by counting equal a stable descending argsort of
    # the 0/1 rows (set blocks ascending, then every other id once): empty, full and random rows.
    gen = torch.Generator().manual_seed(4)
    table = torch.rand(2, 3, 9, 13, generator=gen) < 0.4
    table[0, 0, 0], table[0, 0, 1] = False, True
    count, order = blocks_first(table)
    expected = torch.argsort(table.to(torch.uint8), dim=-1, descending=True, stable=True)
    assert torch.equal(order, expected.to(torch.int32)) and order.dtype == torch.int32
    assert torch.equal(count, table.sum(-1, dtype=torch.int32))
    assert all(torch.equal(a, b) for a, b in zip((count, order), sorted_blocks_first(table)))
    assert torch.equal(order.sort(-1).values, torch.arange(13, dtype=torch.int32).expand(2, 3, 9, 13))


def test_eager_equals_compiled():
    """Eager flex (mask_mod only, ignores indices on CPU) == compiled flex (indices + mask_mod)."""
    layout = QueryLayout("gqa_folded", 2)
    cfg = SMALL.replace(flex_block_q=32, flex_block_kv=32)
    q, k, v, _ = random_inputs(1, 4, 2, 150, 16, seed=3)
    rows = layout.fold(q)
    sel = random_selection(1, 2, 150, cfg, seed=2)
    for bm in (window_block_mask(150, layout, cfg, "cpu"), selection_block_mask(sel, layout, cfg)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eager = flex_attention(rows, k, v, block_mask=bm, scale=0.25)
        torch.testing.assert_close(run_flex(rows, k, v, bm, 0.25, False), eager, rtol=1e-5, atol=1e-5)

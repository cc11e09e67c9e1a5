"""Selected-block attention (NSA's selection branch) in Triton: forward with lse, backward.

q [B, Hq, T, D] attends to the tokens of its selected blocks of k, v [B, Hkv, T, D], causal
inside the current block (DESIGN.md step 4). ``rows`` [B, Hkv, R, n] holds the block ids
(ascending, -1 = unused) of each selection row; a row serves ``tile`` consecutive tokens
(1 = per-token selection, ``select_query_tile`` = block-shared), so token t uses row t // tile.

The same kernels run the sliding window (``window`` > 0): each 64-token tile's rows are the
blocks its window spans (``window_rows``), and a key must also lie within ``window`` tokens of
the query (t - s < window): 320 keys per query where FlexAttention's 128-wide kv blocks compute
384, K/V loads shared by the group's G heads. The window's default on CUDA from 16K tokens on
(NSAConfig.window_kernel; NOTES Levers 25, 33).

Why not FlexAttention here: the selection blocks are 64 tokens, FlexAttention's only bf16 Hopper
backward config needs 128-wide kv blocks, and then every selected 64-block sits in a partial
128-block, so the mask_mod runs everywhere and half the keys are wasted (profiling/NOTES.md,
Lever 2). Here a program walks its row's n blocks directly.

Tiling: a program's rows are ROWS consecutive (token, head) pairs of one selection row's tile,
token-major with G_PAD head slots per token (``_span_rows``), so each selected K/V block is loaded
once for the G heads of a group. Packed (G_PAD = G, the default): a 64-token tile's 448 rows at
G = 7 are exactly 7 programs of 64, tokens split across programs; padded (G_PAD a power of two):
whole tokens per program, one head slot in 8 idle at G = 7 (NOTES Lever 26). The
dK/dV pass walks the reverse lists (which selection rows chose kv block j), per group of
``GROUP_TOKENS`` query tokens (so the programs running at once share one group's q/dO in L2, NOTES
Lever 43) and split into chunks of at most ``CHUNK`` rows so the initial block, chosen by every
row, does not serialise on one program; a block with several items adds them into fp32 buffers
with relaxed atomics. For tiles of 16+
tokens it steps over one head's tokens at a time (q and dO as TMA boxes, logits as [keys, rows]:
NOTES Lever 36); per-token rows keep packed (token, head) rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import (
    LOG2E, add_partial, backward_lse, box_operands, check_query, dkv_from_probs_t, has_tma, head_tile, kernel_layout, load_block, load_delta,
    load_rows, load_tuning_file, row_offsets, softmax_step, store_delta, store_softmax, strides_like, tma_ready, tuning_for,
)

__all__ = ["has_tma", "selection_attention", "window_attention", "reverse_lists", "dkv_lists", "window_rows"]

CHUNK = 16  # selection rows per dK/dV program (block-shared); per-token rows are 1 token each
CHUNK_PER_TOKEN = 128  # with PACK_ENTRIES, per-token (NOTES Lever 27: 114.2 ms at 64, 107.2 at 128)
PACKED = True  # the rule for TUNING's "packed" knob
PACK_ENTRIES = True  # the rule for dK/dV's "entries" knob (NOTES Lever 27: per-token backward 174.0 -> 107.2 ms)
TMA = True  # the rule for the "tma" knob (NOTES Lever 31: block-shared 128K fwd 10.54 -> 9.89 ms, dQ -1.1 ms)
HEAD_MAJOR = True  # the rule for dK/dV's "head_major" knob (NOTES Lever 36)
# dK/dV work order (NOTES Lever 43): items sorted by (kv head, group of GROUP_TOKENS query tokens,
# kv block) instead of (kv head, kv block), so the items resident at once read the q/dO of one group
# (4096 tokens x 7 heads = 14.7 MB at Q7B, which L2 holds) instead of tiles spread over the whole
# sequence; a block's dK/dV is then added once per group that chose it (fp32 atomics). 0 = one group.
# Measured on an H200 at 128K (results/h200/session20-levers): backward pass 30.84 ms -> 29.82 with
# relaxed atomics, 29.00 with 4096-token groups too; per-token 107.0 -> 99.6 -> 98.6; the op's
# fwd+bwd 72.96 / 72.67 -> 70.89 / 70.59 in two alternated pairs. (Programs fetching items from a
# counter instead of a worst-case grid with idle programs lost, +1 ms: built in e3f289d, removed.)
GROUP_TOKENS = 4096
RELAXED = True  # the "relaxed" knob: relaxed (no-return REDG) atomics instead of acq_rel (ATOMG + fences)
# The "interleave" knob (NOTES Lever 45, the rule since session 21): the window's dK/dV items (one per kv
# block j, the 5 tiles j .. j+4 at Q7B) read their tiles in order of tile mod 5 instead of
# ascending, so the ~5 neighbouring items running in step read one tile at once: each tile's q/dO
# (229 KB) is re-read by the 5 items within one step instead of one step apart, when the 264 tiles
# read per step (60 MB) overflow L2 (Nsight Compute, session 15: L2 hit rate 6%, DRAM 69% busy).
# Measured on an H200 at 128K (results/h200/session21-levers): window stage 7.95 / 7.95 -> 7.61 /
# 7.60 ms, the op's fwd+bwd 70.04 / 70.22 -> 68.37 / 69.52 in two alternated rounds.
INTERLEAVE = True
# The "narrow_keys" knob (NOTES Lever 60, the rule since session 29): the lists' stable argsort on
# the narrowest integer type that holds its keys (int16 at 8K, int32 to ~2^31) instead of int64.
# CUDA sorts them by radix passes of 8 bits, 8 for int64 keys. Measured on an H200 (results/h200/
# session29-levers/call1_lists_8k): compiled 8K fwd+bwd 87 -> 75 launches; time within the host's
# noise (compiled 5.48 / 5.24 -> 5.32 / 4.96 ms, alternated). The same order, so the same lists.
NARROW_KEYS = True
# The "order" knob (NOTES Lever 61, rule "compiled" since session 29): how the lists order their
# entries. "sort": the stable argsort above (on CUDA ~14 launches: radix passes, a histogram, a
# scan, memsets). "count": no sort; each entry's place is its bin's start plus its rank in the bin,
# the rank counted from a [rows, blocks + 1] table per (b, kv head, group) by a scan over rows
# (``count_ranks``), which inductor fuses into a few kernels. The table grows as R x blocks
# (quadratic in T), so "count" is taken only while it has at most COUNT_MAX_CELLS cells (block-shared
# to 32K tokens at Q7B); longer inputs sort. "compiled": "count" inside a traced graph
# (torch.compile), "sort" in eager, where each of its ~20 small ops is a dispatch of its own. All
# give the same lists. Measured (same call): compiled 8K fwd+bwd 87 -> 69 launches, time within
# noise (5.18 / 5.18 ms against the rule's 5.48 / 5.24).
ORDER = "compiled"
COUNT_MAX_CELLS = 2**23
# Launch overrides per kernel at the tuned shape (``tiles.tuning_for``; profiling/kernel_tuning.py
# measures them); None = the rule: 64 rows per program at head_dim >= 128 (else 128), 4 warps,
# 2 pipeline stages (1 for 4-byte inputs at head_dim >= 128, whose K/V tiles would overflow shared
# memory), packed rows (PACKED). dK/dV also takes "chunk" (selection rows per program; rule: CHUNK /
# CHUNK_PER_TOKEN) and "entries" (several selection rows per iteration when one row's tile has
# fewer (token, head) rows than a program: per-token rows are 7 at G = 7; rule: PACK_ENTRIES).
# The forward and dQ also take "tma": each selected K/V block as one TMA box (Hopper's bulk copy
# engine, no per-thread addresses; blocks past T or unused ids -1 read as zeros); rule TMA. Used
# where the block is a power of two >= 16 (a box covers it exactly) and K/V are 16-byte aligned,
# else pointer loads (same values). Measured on an H200 (results/h200/session13-levers): block-
# shared 128K forward 10.54 -> 9.89 ms, backward 33.86 -> 32.74 (dQ); per-token forward 65.3 ->
# 61.4, backward 103.5 -> 106.8 (dQ, +3%, kept for one rule).
# Measured at 128K: on an H100 with padded rows (profiling/results/h100/kernel_tuning, NOTES Lever 10)
# no dQ or dK/dV variant beat the rule by 3%; on an H200 with packed rows (results/h200/session11-
# lever26-tuning, Lever 26) 64-row forward programs beat 128-row ones by 8.5% (10.63 vs 11.62 ms).
TUNING = {
    "fwd": {"rows": 64, "num_warps": 4, "num_stages": 2, "packed": None, "tma": None},
    "dq": {"rows": None, "num_warps": None, "num_stages": None, "packed": None, "tma": None},
    "dkv": {"rows": None, "num_warps": None, "num_stages": None, "chunk": None, "packed": None, "entries": None,
            "head_major": None, "tma": None, "group": None, "relaxed": None, "interleave": None, "narrow_keys": None,
            "order": None},
}
load_tuning_file("selection", TUNING)


@triton.jit
def _block_keys(SEL_ROW, i, T, L: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key positions of the i-th selected block of a row, which of them exist, and the block id."""
    blk = tl.load(SEL_ROW + i)
    j = tl.arange(0, BLOCK_N)
    keys = blk * L + j
    return keys, (blk >= 0) & (j < L) & (keys < T), blk


@triton.jit
def _span_rows(tile_first, sub, T, TILE: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr):
    """Rows sub*ROWS .. sub*ROWS + ROWS - 1 of the TILE-token tile starting at ``tile_first``,
    token-major with G_PAD head slots per token: (token, head-in-group, valid, first and last
    token of the program)."""
    f = sub * ROWS + tl.arange(0, ROWS)
    t = tile_first + f // G_PAD
    g = f % G_PAD
    ok = (g < G) & (f < TILE * G_PAD) & (t < T)
    return t, g, ok, tile_first + (sub * ROWS) // G_PAD, tile_first + (sub * ROWS + ROWS - 1) // G_PAD


@triton.jit
def _entry_rows(ROW_OF_ENTRY, e0, hi, T, TILE: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                ROWS: tl.constexpr, PER: tl.constexpr):
    """The rows of entries e0 .. e0 + PER - 1 of a dK/dV work item (their selection rows' tiles,
    TILE tokens x G_PAD head slots each, back to back in one program): (token, head, valid)."""
    f = tl.arange(0, ROWS)
    slot = f // (TILE * G_PAD)
    e = e0 + slot
    ok = (slot < PER) & (e < hi)
    w = f % (TILE * G_PAD)
    t = tl.load(ROW_OF_ENTRY + e, mask=ok, other=0) * TILE + w // G_PAD
    g = w % G_PAD
    return t, g, ok & (g < G) & (t < T)


@triton.jit
def _whole_block(blk, t_first, t_last, T, L: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """Block blk exists, lies inside T, ends at or before token t_first and (with a window)
    starts within the window of token t_last, so every row of a program over tokens t_first ..
    t_last sees all of it: no mask (NOTES Lever 20). Only a row's current block (and -1 slots,
    and a window's first block) need one."""
    whole = (blk >= 0) & ((blk + 1) * L <= tl.minimum(t_first + 1, T))
    if WINDOW > 0:
        whole = whole & (blk * L >= t_last + 1 - WINDOW)
    if BLOCK_N != L:  # padded key lanes always need the mask
        whole = whole & (blk < 0)
    return whole


@triton.jit
def _visible(keys, key_ok, t, row_ok, WINDOW: tl.constexpr, KEYS_FIRST: tl.constexpr = False):
    """[rows, keys] bool ([keys, rows] when KEYS_FIRST): the key exists, is causal for the row's
    token t and (WINDOW > 0) lies within the window: t - WINDOW < s <= t."""
    if KEYS_FIRST:
        s, s_ok, tt, t_ok = keys[:, None], key_ok[:, None], t[None, :], row_ok[None, :]
    else:
        s, s_ok, tt, t_ok = keys[None, :], key_ok[None, :], t[:, None], row_ok[:, None]
    seen = s_ok & (s <= tt) & t_ok
    if WINDOW > 0:
        seen = seen & (tt - s < WINDOW)
    return seen


@triton.jit
def _store_gated_sum(win, o_off, row_ok, CMP, SLC, GATES, Y, gate_off, sg_k):
    """Y = g_cmp cmp + g_slc slc + g_win win on the program's rows (``win`` the window output as
    stored, so Y equals the gated sum of the three stored branches), in fp32 with one rounding,
    as the compiled gated sum computes it; cmp and slc share Y's strides (offsets ``o_off``)."""
    g_cmp = tl.load(GATES + gate_off, mask=row_ok, other=0.0).to(tl.float32)
    g_slc = tl.load(GATES + gate_off + sg_k, mask=row_ok, other=0.0).to(tl.float32)
    g_win = tl.load(GATES + gate_off + 2 * sg_k, mask=row_ok, other=0.0).to(tl.float32)
    cmp = tl.load(CMP + o_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    slc = tl.load(SLC + o_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    y = g_cmp[:, None] * cmp + g_slc[:, None] * slc + g_win[:, None] * win.to(tl.float32)
    tl.store(Y + o_off, y.to(Y.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _slc_fwd_kernel(
    Q, K, V, SEL, O, LSE, CMP, SLC, GATES, Y,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, ss_b, ss_h, ss_r, so_b, so_h, so_t, sl_b, sl_h, sg_b, sg_h, sg_t, sg_k,
    T, qk_scale,
    N_SEL: tl.constexpr, TILE: tl.constexpr, L: tl.constexpr, BLOCK_N: tl.constexpr,
    G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr, SUBS: tl.constexpr, D: tl.constexpr,
    WINDOW: tl.constexpr, TMA: tl.constexpr, GATED: tl.constexpr,
):
    """One program: ROWS (token, head) rows of one selection row's tile over its N_SEL blocks.
    Online softmax in base 2 (qk_scale = scale * log2 e); lse is stored in natural log. GATED
    (the window, run last): the epilogue also writes the NSA output, the gated sum of the three
    branches (``_store_gated_sum``), so no separate pass re-reads all three."""
    pid_t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = pid_t // SUBS
    t, g, row_ok, t_first, t_last = _span_rows(r * TILE, pid_t % SUBS, T, TILE, G, G_PAD, ROWS)
    q_off, qh = row_offsets(b, h, t, g, sq_b, sq_h, sq_t, G, D)
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    sel_row = SEL + b * ss_b + h * ss_h + r * ss_r
    kv_base = b * sk_b + h * sk_h
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    for i in range(N_SEL):
        keys, key_ok, blk = _block_keys(sel_row, i, T, L, BLOCK_N)
        k = load_block(K, kv_base, b, h, blk, keys, key_ok, sk_t, L, D, TMA)
        v = load_block(V, kv_base, b, h, blk, keys, key_ok, sk_t, L, D, TMA)
        qk = tl.dot(q, tl.trans(k))
        if not _whole_block(blk, t_first, t_last, T, L, BLOCK_N, WINDOW):
            qk = tl.where(_visible(keys, key_ok, t, row_ok, WINDOW), qk, float("-inf"))
        m, s_sum, acc = softmax_step(qk, qk_scale, m, s_sum, acc, v)
    out, o_off = store_softmax(m, s_sum, acc, O, LSE, b, h, t, g, qh, row_ok, so_b, so_h, so_t, sl_b, sl_h, G, D)
    if GATED:
        _store_gated_sum(out, o_off, row_ok, CMP, SLC, GATES, Y, b * sg_b + qh * sg_h + t * sg_t, sg_k)


@triton.jit
def _slc_dq_kernel(
    Q, K, V, O, DO, SEL, LSE, DELTA, DQ, DQ_IN,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, ss_b, ss_h, ss_r, sl_b, sl_h,
    T, scale, qk_scale,
    N_SEL: tl.constexpr, TILE: tl.constexpr, L: tl.constexpr, BLOCK_N: tl.constexpr,
    G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr, SUBS: tl.constexpr, D: tl.constexpr,
    WINDOW: tl.constexpr, TMA: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """dQ = scale * sum dS K (+ DQ_IN when ACCUMULATE), dS = P (dP - delta), dP = dO V^T (q, o,
    do, dq, dq_in share strides); stores delta for the dK/dV pass."""
    pid_t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = pid_t // SUBS
    t, g, row_ok, t_first, t_last = _span_rows(r * TILE, pid_t % SUBS, T, TILE, G, G_PAD, ROWS)
    row_off, qh = row_offsets(b, h, t, g, sq_b, sq_h, sq_t, G, D)
    q = tl.load(Q + row_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + row_off, mask=row_ok[:, None], other=0.0)
    lse2 = backward_lse(LSE, b, qh, t, row_ok, sl_b, sl_h)
    delta = store_delta(O, DELTA, row_off, do, b, qh, t, row_ok, sl_b, sl_h)
    sel_row = SEL + b * ss_b + h * ss_h + r * ss_r
    kv_base = b * sk_b + h * sk_h
    dq = tl.zeros([ROWS, D], tl.float32)
    for i in range(N_SEL):
        keys, key_ok, blk = _block_keys(sel_row, i, T, L, BLOCK_N)
        k = load_block(K, kv_base, b, h, blk, keys, key_ok, sk_t, L, D, TMA)
        v = load_block(V, kv_base, b, h, blk, keys, key_ok, sk_t, L, D, TMA)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])  # 0 on idle rows (lse2 +inf)
        if not _whole_block(blk, t_first, t_last, T, L, BLOCK_N, WINDOW):
            p = tl.where(_visible(keys, key_ok, t, row_ok, WINDOW), p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * scale
    if ACCUMULATE:  # another branch's dq, added before the one rounding to q's dtype (NOTES Lever 39)
        dq += tl.load(DQ_IN + row_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DQ + row_off, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _slc_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, ITEMS, ROW_OF_ENTRY,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sl_b, sl_h, sd_b, sd_h, sd_t,
    T, HKV, NUM_BLOCKS, MAX_ITEMS, scale, qk_scale,
    TILE: tl.constexpr, L: tl.constexpr, BLOCK_N: tl.constexpr,
    G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr, SUBS: tl.constexpr, D: tl.constexpr,
    WINDOW: tl.constexpr, PER: tl.constexpr, HEAD_MAJOR: tl.constexpr, TMA: tl.constexpr, RELAXED: tl.constexpr,
):
    """One work item = (kv head, kv block j, a chunk of the selection rows that chose j):
    dV_j += P^T dO, dK_j += scale * dS^T Q over those rows' tokens and the G heads.

    HEAD_MAJOR (a tile of TILE tokens = one program's rows): one flat loop over (entry, head), each
    step one head's TILE consecutive tokens, so q and dO come as one box each (TMA: Q and DO are
    descriptors) and the next step's loads can be issued ahead; logits as [keys, rows] (K Q^T),
    so P^T and dS^T feed the dV and dK products from registers with no transpose through shared
    memory (NOTES Lever 36). Otherwise (per-token rows) packed (token, head) rows as below.
    RELAXED: relaxed atomics (``tiles.add_partial``)."""
    pid = tl.program_id(0)
    owner = tl.load(ITEMS + pid)  # (b * HKV + h) * NUM_BLOCKS + j, or -1 past the last item
    if owner >= 0:
        lo = tl.load(ITEMS + MAX_ITEMS + pid)
        hi = tl.load(ITEMS + 2 * MAX_ITEMS + pid)
        alone = tl.load(ITEMS + 3 * MAX_ITEMS + pid)
        bh = owner // NUM_BLOCKS
        b = bh // HKV
        h = bh % HKV
        j = tl.arange(0, BLOCK_N)
        keys = (owner % NUM_BLOCKS) * L + j
        key_ok = (j < L) & (keys < T)
        kv_base = b * sk_b + h * sk_h
        k = load_rows(K, kv_base, keys, key_ok, sk_t, D)
        v = load_rows(V, kv_base, keys, key_ok, sk_t, D)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        # Masked everywhere: skipping the mask on whole blocks (as the fwd and dQ kernels do) made
        # this kernel 17% slower in the 64K training step (NOTES Lever 20).
        if HEAD_MAJOR:
            for it in range(lo * G, hi * G):  # (tiles.head_tile, tiles.dkv_from_probs_t)
                r = tl.load(ROW_OF_ENTRY + it // G)
                t, row_ok, q, do, lse2, delta = head_tile(Q, DO, LSE, DELTA, b, h * G + it % G, r, T, sq_b, sq_h, sq_t,
                                                          sl_b, sl_h, TILE, D, TMA)
                seen = _visible(keys, key_ok, t, row_ok, WINDOW, True)
                p_t = tl.where(seen, tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :]), 0.0)
                dk, dv = dkv_from_probs_t(p_t, q, do, v, delta, dk, dv)
        else:
            for e in range(lo, hi, PER):
                tile_first = tl.load(ROW_OF_ENTRY + e) * TILE
                for sub in range(SUBS):
                    if PER == 1:  # one entry's tile over SUBS programs' worth of rows
                        t, g, row_ok, _, _ = _span_rows(tile_first, sub, T, TILE, G, G_PAD, ROWS)
                    else:  # PER entries' tiles in one set of rows (SUBS = 1)
                        t, g, row_ok = _entry_rows(ROW_OF_ENTRY, e, hi, T, TILE, G, G_PAD, ROWS, PER)
                    row_off, qh = row_offsets(b, h, t, g, sq_b, sq_h, sq_t, G, D)
                    q = tl.load(Q + row_off, mask=row_ok[:, None], other=0.0)
                    do = tl.load(DO + row_off, mask=row_ok[:, None], other=0.0)
                    lse2 = backward_lse(LSE, b, qh, t, row_ok, sl_b, sl_h)
                    delta = load_delta(DELTA, b, qh, t, row_ok, sl_b, sl_h)
                    seen = _visible(keys, key_ok, t, row_ok, WINDOW)
                    p = tl.where(seen, tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None]), 0.0)
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        out = b * sd_b + h * sd_h + keys[:, None] * sd_t + tl.arange(0, D)[None, :]
        if alone != 0:
            tl.store(DK + out, dk * scale, mask=key_ok[:, None])
            tl.store(DV + out, dv, mask=key_ok[:, None])
        else:
            add_partial(DK + out, dk * scale, key_ok[:, None], RELAXED)
            add_partial(DV + out, dv, key_ok[:, None], RELAXED)


def reverse_lists(rows: torch.Tensor, num_blocks: int, chunk: int, group_rows: int = 0, interleave: int = 0,
                  narrow_keys: bool = False, order: str = "sort"):
    """dK/dV work items from the selection rows [B, Hkv, R, n], with no host sync.

    Returns (items [4, M] int32: owner = (b*Hkv + h)*num_blocks + j or -1, entry range [lo, hi),
    1 if the item is its block's only chunk; row_of_entry [B*Hkv*R*n] int32: the selection row
    of each entry; the valid items come first). Entries are
    sorted by (b, h, group, block) with groups of ``group_rows`` consecutive selection rows (0 =
    one group), so consecutive items read the q/dO of one group's tokens (NOTES Lever 43); a
    block chosen in several groups gets an item (at least) per group. M bounds the item count,
    so the grid is static: the nonzero (group, block) bins, at most min(groups * num_blocks,
    R * n) per (b, h), plus ceil(B*Hkv*R*n / chunk) for the bins split into chunks. The bin
    counts are B*Hkv*groups*(num_blocks + 1) int64, quadratic in T with groups: 2 MB at 128K
    tokens in 4096-token groups of 64-token blocks, 134 MB at 1M. ``interleave`` m > 0: a
    block's entries in order of their row mod m instead of ascending (the window's m = n rows per
    block, NOTES Lever 45), so items of neighbouring blocks, running in step, read the same tile
    at the same step. ``narrow_keys``: sort on the narrowest integer type holding the keys (fewer
    radix passes on CUDA; the same order). ``order``: "sort", "count" or "compiled" (ORDER; the
    same lists).
    """
    B, Hkv, R, n = rows.shape
    BH, per_bh = B * Hkv, R * n
    for name, value in (("group_rows", group_rows), ("interleave", interleave)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"reverse_lists: {name} must be an int >= 0 (0 = off), got {value!r}")
    if order not in ("sort", "count", "compiled"):
        raise ValueError(f"reverse_lists: order must be 'sort', 'count' or 'compiled', got {order!r}")
    groups = -(-R // group_rows) if group_rows else 1
    device = rows.device
    spare = num_blocks + 1  # column num_blocks collects the -1 slots
    ids = torch.where(rows < 0, num_blocks, rows).reshape(BH, R, n)
    # Keys built on [BH, R, n] with the row as its own index: inductor's CPU code for the same on
    # flat entries (row = entry // n, group = row // group_rows) skips the last entries when a group
    # does not divide them (torch 2.13; NOTES Lever 61), so no index here is a quotient of a quotient.
    # (with one group, as the window's, the same launches as before Lever 43: the op is host-bound at 8K)
    key = ids + torch.arange(BH, device=device)[:, None, None] * (groups * spare)
    row = torch.arange(R, device=device)[None, :, None]
    if groups > 1:
        key = key + row // group_rows * spare
    # Not torch.bincount: on CUDA it reads the max id back to the host, a sync per layer's backward.
    counts_all = torch.zeros(BH * groups * spare, dtype=torch.int64, device=device).index_add_(0, key.flatten(), torch.ones_like(key.flatten()))
    starts_all = torch.cumsum(counts_all, 0) - counts_all
    counting = order == "count" or (order == "compiled" and torch.compiler.is_compiling())
    if counting and count_cells(BH, R, n, spare, group_rows) <= COUNT_MAX_CELLS:
        # each entry's place: its bin's start + its rank in the bin, as the stable sort below orders it
        place = (starts_all[key] + count_ranks(ids, spare, group_rows, interleave)).flatten()
        entry_row = row.to(torch.int32).expand(BH, R, n).flatten()
        row_of_entry = torch.empty(BH * per_bh, dtype=torch.int32, device=device).scatter_(0, place, entry_row)
    else:
        # within a bin: entries ascending, or by row mod interleave (stable: rows of one residue ascending)
        sort_key = key * interleave + row % interleave if interleave else key
        if narrow_keys:  # keys < BH * groups * spare * max(interleave, 1), known from the shapes
            sort_key = sort_key.to(narrowest_int(BH * groups * spare * max(interleave, 1)))
        row_of_entry = ((torch.argsort(sort_key.flatten(), stable=True) % per_bh) // n).to(torch.int32)
    starts = starts_all.view(BH * groups, spare)[:, :num_blocks].flatten()
    counts = counts_all.view(BH * groups, spare)[:, :num_blocks].flatten()
    chunks = (counts + chunk - 1) // chunk
    chunk_end = torch.cumsum(chunks, 0)
    alone_block = (chunks.view(BH, groups, num_blocks).sum(1) if groups > 1 else chunks) == 1  # one chunk in all: a plain store
    bins = BH * groups * num_blocks
    max_items = BH * min(groups * num_blocks, per_bh) + -(-BH * per_bh // chunk)
    pid = torch.arange(max_items, device=device)
    bin_ = torch.searchsorted(chunk_end, pid, right=True)
    valid = bin_ < bins
    bin_ = bin_.clamp(max=bins - 1)
    lo = starts[bin_] + (pid - (chunk_end[bin_] - chunks[bin_])) * chunk
    hi = torch.minimum(lo + chunk, starts[bin_] + counts[bin_])
    owner = bin_ // (groups * num_blocks) * num_blocks + bin_ % num_blocks if groups > 1 else bin_  # (b, h, block) of the bin
    items = torch.stack([torch.where(valid, owner, -1), lo, hi, alone_block.flatten()[owner].long()])
    return items.to(torch.int32).contiguous(), row_of_entry


def count_cells(BH: int, R: int, n: int, spare: int, group_rows: int) -> int:
    """Cells of ``count_ranks``' tables: the [rows, blocks + 1] counts per (b, kv head) (rows
    padded to whole groups) and the [rows, n, n] slot comparisons."""
    padded = -(-R // group_rows) * group_rows if group_rows else R
    return BH * (padded * spare + R * n * n)


def count_ranks(ids: torch.Tensor, spare: int, group_rows: int, interleave: int) -> torch.Tensor:
    """[BH, R, n] for ``ids`` [BH, R, n] (block ids; -1 slots as column spare - 1): each entry's
    rank among the entries of its (b*h, group, block) bin in the order of ``reverse_lists``' stable
    sort (rows ascending, or by (row mod interleave, row); then slots), without sorting: the entries
    with that block in the group's earlier rows (an exclusive scan of per-row counts, rows in that
    order) plus the row's earlier slots holding the same block."""
    (BH, R, n), device = ids.shape, ids.device
    gr = group_rows or R
    groups = -(-R // gr)
    r = torch.arange(R, device=device)
    first = r // gr * gr  # the group's first row
    if interleave:  # the row's place in its group by (row mod m, row)
        m = interleave
        last = torch.clamp(first + gr, max=R)
        res = torch.arange(m, device=device)
        first_of_res = first[:, None] + (res[None, :] - first[:, None]) % m  # each residue's first row in the group
        rows_of_res = torch.clamp((last[:, None] - first_of_res + m - 1) // m, min=0)
        before = torch.where(res[None, :] < (r % m)[:, None], rows_of_res, 0).sum(1)
        place = first + before + (r - first_of_res.gather(1, (r % m)[:, None])[:, 0]) // m
    else:
        place = r
    cell = (place[:, None] * spare + ids).view(BH, R * n)  # (the row's place, block) in the [groups * gr, spare] table
    counts = torch.zeros(BH, groups * gr * spare, dtype=torch.int32, device=device)
    counts.scatter_add_(1, cell, torch.ones_like(cell, dtype=torch.int32))
    counts = counts.view(BH, groups, gr, spare)
    earlier_rows = (torch.cumsum(counts, 2, dtype=torch.int32) - counts).view(BH, -1).gather(1, cell)
    earlier = torch.arange(n, device=device)[None, :] < torch.arange(n, device=device)[:, None]  # [slot, earlier slot]
    earlier_slots = ((ids[..., :, None] == ids[..., None, :]) & earlier).sum(-1, dtype=torch.int32)
    return earlier_rows.view(BH, R, n) + earlier_slots


def narrowest_int(bound: int) -> torch.dtype:
    """The narrowest signed integer type that holds 0 .. bound - 1."""
    return next(t for t in (torch.int16, torch.int32, torch.int64) if bound <= torch.iinfo(t).max + 1)


def window_rows(batch: int, kv_heads: int, seq_len: int, window: int, block_size: int, device) -> torch.Tensor:
    """The blocks each ``block_size``-token tile's sliding window spans, as selection rows
    [B, Hkv, R, n] int32 (R = ceil(T / block_size)): tile r (tokens r*l .. r*l + l - 1) needs keys
    from r*l - window + 1 on, so blocks r - n + 1 .. r with n = ceil((window - 1) / l) + 1 (at
    most R), -1 where that is before block 0. Built on the device, no host sync."""
    if window < 1:
        raise ValueError(f"window_rows: window must be >= 1, got {window}")
    num_rows = -(-seq_len // block_size)
    n = min(-(-(window - 1) // block_size) + 1, max(num_rows, 1))
    ids = torch.arange(num_rows, device=device, dtype=torch.int32)[:, None] + torch.arange(1 - n, 1, device=device, dtype=torch.int32)
    return torch.where(ids >= 0, ids, -1).expand(batch, kv_heads, num_rows, n)


def _launch_params(q, k, v, rows, block_size: int, tile: int, kernel: str, window: int = 0):
    """Program shape: ROWS (a power of two, >= 16: the smallest tl.dot) of a tile's (token, head)
    rows; SUBS programs per tile. Packed: G_PAD = G, ROWS up to the target; padded: G_PAD a power
    of two and whole tokens per program (a power of two dividing the tile). ``window`` 0 = none."""
    check_query(q, "selection_attention")
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"selection_attention: window must be an int >= 0 (0 = none), got {window!r}")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape != v.shape or k.shape[2] != T or q.shape[1] % Hkv or rows.shape[:2] != (B, Hkv) or rows.shape[2] != -(-T // tile):
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, rows {tuple(rows.shape)}, tile {tile}")
    G = Hq // Hkv
    tune = tuning_for(TUNING, kernel, q)
    target = tune.get("rows") or (64 if D >= 128 else 128)
    packed = tune.get("packed", PACKED)
    if packed:
        g_pad, rows_per = G, max(16, min(target, triton.next_power_of_2(tile * G)))
    else:
        g_pad, block_t = triton.next_power_of_2(G), 1
        while tile % (2 * block_t) == 0 and 2 * block_t * g_pad <= target:
            block_t *= 2
        g_pad = max(g_pad, 16 // block_t)
        rows_per = block_t * g_pad
    block_n = max(16, triton.next_power_of_2(block_size))
    tma = kernel != "dkv" and bool(tune.get("tma", TMA)) and block_n == block_size and all(map(tma_ready, (k, v)))
    per = 1  # dK/dV: selection rows per iteration
    if kernel == "dkv" and tune.get("entries", PACK_ENTRIES) and 2 * tile * g_pad <= target:
        rows_per = target
        per = target // (tile * g_pad)
    # dK/dV over (entry, head) steps of one head's tile (a power of two of 16 .. target tokens)
    head_major = kernel == "dkv" and per == 1 and tune.get("head_major", HEAD_MAJOR) and 16 <= tile <= target and tile & (tile - 1) == 0
    if head_major:
        g_pad, rows_per = G, tile
        tma = bool(tune.get("tma", TMA)) and tma_ready(q)  # q's (and dO's: same strides) tiles as boxes
    stages = tune.get("num_stages") or (1 if q.element_size() == 4 and D >= 128 else 2)
    consts = dict(TILE=tile, L=block_size, BLOCK_N=block_n,
                  G=G, G_PAD=g_pad, ROWS=rows_per, SUBS=-(-tile * g_pad // rows_per), D=D, WINDOW=window,
                  num_warps=tune.get("num_warps") or 4, num_stages=stages, TMA=tma)
    if kernel != "dkv":
        return consts
    return consts | {"PER": per, "HEAD_MAJOR": head_major, "RELAXED": bool(tune.get("relaxed", RELAXED))}


def dkv_list_params(q, rows, tile: int, window: int) -> dict:
    """``reverse_lists``' chunk, group_rows, interleave, narrow_keys and order for this launch's dK/dV: from
    the tuning and the shapes only (a traced backward calls this on fake tensors)."""
    tune = tuning_for(TUNING, "dkv", q)
    chunk = tune.get("chunk") or (CHUNK if tile > 1 else CHUNK_PER_TOKEN)
    if window > 0:  # one work item per kv block (a block is in at most all R rows): plain stores
        chunk = max(chunk, rows.shape[2])
    group = tune.get("group", GROUP_TOKENS) or 0
    if not isinstance(group, int) or group < 0:
        raise ValueError(f"selection dK/dV: 'group' must be an int >= 0 (query tokens per group, 0 = one group), got {group!r}")
    # the window's plain bf16 stores need one group (one item per block); its rows may interleave
    return {"chunk": chunk, "group_rows": -(-group // tile) if group and window == 0 else 0,
            "interleave": rows.shape[3] if window > 0 and tune.get("interleave", INTERLEAVE) else 0,
            "narrow_keys": bool(tune.get("narrow_keys", NARROW_KEYS)), "order": tune.get("order") or ORDER}


def selection_attention_fwd(q, k, v, rows, block_size: int, tile: int, scale: float, window: int = 0, gated=None):
    """(out [B, Hq, T, D] in q's dtype and layout, lse [B, Hq, T] fp32); inputs in kernel layout
    (``tiles.kernel_layout``).

    ``gated`` = (head_gates [B, Hq, T, 3], cmp, slc [B, Hq, T, D]): this launch is the last
    branch (the window), and its epilogue also computes y = g_cmp cmp + g_slc slc + g_win out,
    returned third: (out, lse, y), y in q's layout and the gates' and q's promoted dtype."""
    v = strides_like(v, k)  # one set of K/V strides
    consts = _launch_params(q, k, v, rows, block_size, tile, "fwd", window)
    rows = rows.to(torch.int32)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    if gated is not None:
        head_gates, cmp, slc = gated
        if head_gates.shape != (B, Hq, T, 3) or cmp.shape != q.shape or slc.shape != q.shape:
            raise ValueError(f"gated: head_gates must be {(B, Hq, T, 3)} and cmp, slc {tuple(q.shape)}; got "
                             f"{tuple(head_gates.shape)}, {tuple(cmp.shape)}, {tuple(slc.shape)}")
        cmp, slc = strides_like(cmp, q), strides_like(slc, q)  # read at out's offsets
        y = torch.empty_like(q, dtype=torch.promote_types(head_gates.dtype, q.dtype))  # as the gated sum's
        gate_args = (cmp, slc, head_gates, y, *head_gates.stride())
    else:
        gate_args = (out, out, lse, out, 0, 0, 0, 0)  # unused (GATED off)
    if T == 0:
        return (out, lse) if gated is None else (out, lse, y)
    _slc_fwd_kernel[(triton.cdiv(T, tile) * consts["SUBS"], Hkv, B)](
        q, *box_operands((k, v), consts["L"], consts), rows, out, lse, *gate_args[:4],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        rows.stride(0), rows.stride(1), rows.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), *gate_args[4:], T, scale * LOG2E, N_SEL=rows.shape[3], GATED=gated is not None,
        **consts,
    )
    return (out, lse) if gated is None else (out, lse, y)


def dkv_lists(q, rows, block_size: int, tile: int, window: int = 0):
    """(items, row_of_entry): ``reverse_lists`` of ``rows`` as this launch's dK/dV kernel reads them.
    Built by the caller of the backward op, not inside it, so a compiled backward traces these ~25
    small PyTorch ops into its graph and fuses them (NOTES Lever 59)."""
    return reverse_lists(rows, -(-q.shape[2] // block_size), **dkv_list_params(q, rows, tile, window))


def selection_attention_bwd(q, k, v, rows, out, lse, grad_out, block_size: int, tile: int, scale: float, window: int = 0,
                            dq_in=None, lists=None):
    """(dq, dk, dv, delta) for selection_attention_fwd, each gradient in its input's layout;
    delta = rowsum(grad_out * out) [B, Hq, T] fp32 (as ``compression_attention_bwd``'s). Inputs in
    kernel layout. ``dq_in``: another branch's gradient of the same q, added inside the dQ kernel
    (dq = dq_in + this branch's): one q-sized read instead of a separate add's two reads and a
    write (NOTES Lever 39). ``lists``: ``dkv_lists`` of this launch, else built here."""
    consts = _launch_params(q, k, v, rows, block_size, tile, "dq", window)
    rows = rows.to(torch.int32)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    grad_out, out, v = strides_like(grad_out, q), strides_like(out, q), strides_like(v, k)  # shared strides
    dq = torch.empty_like(q)
    if dq_in is not None:
        if dq_in.shape != q.shape or dq_in.dtype != q.dtype:
            raise ValueError(f"dq_in must be {tuple(q.shape)} {q.dtype}, got {tuple(dq_in.shape)} {dq_in.dtype}")
        dq_in = strides_like(dq_in, q)
    # fp32 for the atomics of blocks split over several items; k's layout (so dv's too). With one
    # item per block (the window: a block is in n = 5 tiles' rows at Q7B) every item stores alone,
    # so the gradients are written in k's dtype: no 2 x 268 MB fp32 buffers at 128K (NOTES Lever 33).
    dk = torch.zeros_like(k, dtype=k.dtype if window > 0 else torch.float32)
    dv = torch.zeros_like(dk)
    delta = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)  # rowsum(dO * O): the dQ kernel writes it
    if T == 0:
        return dq, dk.to(k.dtype), dv.to(v.dtype), delta
    q_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    _slc_dq_kernel[(triton.cdiv(T, tile) * consts["SUBS"], Hkv, B)](
        q, *box_operands((k, v), consts["L"], consts), out, grad_out, rows, lse, delta, dq,
        dq if dq_in is None else dq_in, *q_strides,
        rows.stride(0), rows.stride(1), rows.stride(2), lse.stride(0), lse.stride(1),
        T, scale, scale * LOG2E, N_SEL=rows.shape[3], ACCUMULATE=dq_in is not None, **consts,
    )
    consts = _launch_params(q, k, v, rows, block_size, tile, "dkv", window)
    consts["TMA"] = consts["TMA"] and tma_ready(grad_out)
    q_in, do_in = box_operands((q, grad_out), consts["TILE"], consts)
    num_blocks = -(-T // block_size)
    items, row_of_entry = dkv_lists(q, rows, block_size, tile, window) if lists is None else lists
    if items.dtype != torch.int32 or items.dim() != 2 or items.shape[0] != 4 or row_of_entry.numel() != rows.numel():
        raise ValueError(f"lists must be dkv_lists of these rows: items [4, M] int32 and row_of_entry of {rows.numel()} "
                         f"entries, got {tuple(items.shape)} {items.dtype} and {row_of_entry.numel()}")
    max_items = items.shape[1]
    _slc_dkv_kernel[(max_items,)](
        q_in, k, v, do_in, lse, delta, dk, dv, items, row_of_entry, *q_strides,
        lse.stride(0), lse.stride(1), dk.stride(0), dk.stride(1), dk.stride(2),
        T, Hkv, num_blocks, max_items, scale, scale * LOG2E, **consts,
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype), delta


def selection_attention(q, k, v, rows, block_size: int, tile: int, scale: float, window: int = 0):
    """Selected-block attention: (out [B, Hq, T, D], lse [B, Hq, T] fp32), differentiable in q,
    k, v, through the ``flexnsa::selection_attention`` custom op. ``rows`` [B, Hkv, ceil(T/tile), n]
    block ids (-1 = unused); ``window`` > 0 also hides keys window or more tokens back."""
    from .custom_ops import selection_attention as op

    return op(kernel_layout(q), kernel_layout(k), kernel_layout(v), rows.contiguous(), block_size, tile, scale, window)


def window_attention(q, k, v, window: int, block_size: int, scale: float):
    """Sliding-window attention (t - window < s <= t) on the selected-block kernels:
    (out [B, Hq, T, D], lse [B, Hq, T] fp32), differentiable in q, k, v."""
    B, Hkv, T = k.shape[0], k.shape[1], k.shape[2]
    rows = window_rows(B, Hkv, T, window, block_size, q.device)
    return selection_attention(q, k, v, rows, block_size, block_size, scale, window)

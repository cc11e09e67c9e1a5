"""Fused importance scores: compression logits -> lse -> probabilities -> sum over the G heads.

One program per (query tile, kv head, batch) holds a tile of BLOCK_T tokens x G heads as rows
(G padded to a power of two in registers, never in memory), loads its group's pooled keys K~ once
for all G heads, and makes two passes over the causally visible compressed blocks: the first
computes each row's log-sum-exp (online max/sum), the second p = exp(s - lse), sums it over the
group's heads and writes one fp32 score per (token, compressed block). Given the lse (the compression branch's
forward computes the same softmax), only the second pass runs. The PyTorch scorer wrote
and re-read the per-head [Hq, T, C] probabilities ~8 times; this writes [Hkv, T, C] once.

Block-shared selection only needs each query tile's sum. ``tokens_per_sum`` sums that many
consecutive tokens: the power of two of them that fits a program is summed in registers before
the store (16x fewer bytes at Q7B's tile of 64), the rest by PyTorch over the much smaller partials.
With the ``packed`` / ``packed_per_token`` knobs (NOTES Levers 30, 32 and 35; both off: measured
slower than the padded tiling on an H200) the rows are the chunk's (token, head) rows back to back,
no head slot padded: tile sums write a partial per power-of-two group of a tile's rows; per-token
scores at G = 7 (12.5% fewer rows than 8 head slots) sum each token's run of G rows, which no
power-of-two reshape groups, by a matmul with a 0/1 token indicator, and add a token split between
two programs atomically. With the ``head_major`` knob (NOTES Lever 38; rule off, measured 43% slower
than padded at 128K on an H200) a power-of-two tile sum of 16-128 tokens is one program per (tile, kv head): its rows
are the tile's tokens of one head at a time ([SUM, D] of q, pointers or a TMA box), the G heads
(any G) looped inside each chunk of compressed blocks, whose K~ is loaded once for them; the whole
sum over tokens and heads stays in registers, one output row per tile, nothing left for PyTorch.

With the ``split_heads`` knob (NOTES Lever 51) a group of G heads that is not a power of two is
not padded at all: the tile's BLOCK_T tokens x G heads are split into power-of-two head parts
(G = 7: 4 + 2 + 1 heads, 64 + 32 + 16 rows), each one MMA of the same K~ chunk (loaded once for
the G heads), their sums added in registers: 112 rows of work instead of 128 at G = 7.

Semantics are the reference's steps 1-2 (compression visibility i*s + l <= t + 1, natural-log
lse, -inf where nothing is visible). Runs natively on GPUs and under TRITON_INTERPRET=1 on CPU
(fp32 only there: the interpreter's bf16 dot is wrong, PITFALLS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import (
    ROWS as TILE_ROWS, backward_lse, box_operands, check_given_lse, check_query, full_chunks_end, load_blocks, load_box,
    load_tuning_file, probs_t, row_lse, row_offsets, rows_per_tile, tile_rows, tma_ready, tuning_for,
    visible_block_end,
)

# Launch overrides at the tuned shape (``tiles.tuning_for``; ``python -m profiling.kernel_tuning
# --ops scores:block_shared`` measures them); None = the rule in ``_launch_params``. Measured at
# 128K on an H100 (results/h100/session5-8K-32K-128K/kernel_tuning, NOTES Lever 12): 2 pipeline
# stages instead of Triton's default 3 took the scores + top-n stage from 11.1 to 9.8 ms. With the
# lse given (one pass, Lever 14; results/h100/session6-8K-32K-128K/kernel_tuning): 32-wide
# compressed tiles and 4 warps, 6.6 -> 5.4 ms.
# Session 12 (H200, results/h200/session12-levers/): with the logits as [blocks, rows] (Lever 29)
# 64-wide compressed tiles, 4 warps, 2 stages: 5.31 -> 3.25 ms.
# "packed" / "packed_per_token": rows packed, no head slot padded (NOTES Levers 30, 32; None = the
# PACKED / PACKED_PER_TOKEN rule): block-shared, two 64-token tiles at G = 7 are exactly 7 programs of 128 rows
# instead of 8 of 16 tokens x 8 head slots; per token, 7 programs per 128 tokens instead of 8, the
# head sum an indicator matmul (tf32x3) onto 32 token columns per program.
# Measured (session 13, 128K scores + top-n stage): packed tile sums 4.00 ms against the padded
# 3.25, packed per-token scores 45.3 against 31.5, so both rules stay off.
# "head_major" (None = the HEAD_MAJOR rule; Lever 38, measured slower: 4.73 ms against the padded
# 3.30 at 128K on an H200, session 15, so the rule stays off): tile sums of a
# power-of-two tokens_per_sum in [16, 128] as one program per tile whose rows are its tokens of one
# head at a time, the G heads looped inside (no head slot padded, one output row per tile, no
# partials for PyTorch to add); takes precedence over "packed". "tma" (None = the TMA rule; used
# only head-major, where the GPU has TMA): each head's q tile as one [SUM, D] TMA box.
# "tma_k" (None = the TMA_K rule; NOTES Lever 42, on since session 19: the 128K op forward -0.26 ms
# over three alternated pairs on an H200): the padded and packed tilings' K~ chunks as one
# [block_c, D] TMA box each, as the compression forward loads them, where the GPU has TMA.
# "split_heads" (None = the SPLIT_HEADS rule; Lever 51): a non-power-of-two G as power-of-two head
# parts of the padded tiling's tokens, one MMA each on the shared K~ chunk (``_split_scores_kernel``;
# sm_90, triton 3.6: 179 registers = 2 CTAs per SM, 168 without a spill under "maxnreg": 168 = 3,
# as the padded kernel's 153).
# "gluon" (None = the GLUON rule; Lever 52): on an sm_90 GPU, the padded tiling's whole-tile sums with
# the lse given (the op's block-shared path) by the persistent warp-specialised Gluon scorer
# (``compression_scores_sm90``: a TMA producer warp, two consumers taking the chunks in turn);
# "pipelined" (Lever 54): the same with each consumer's chunks in pairs, the second's MMA in flight
# under the first's exponentials. Both lost on an H200 at 128K (3.52 / 3.46 ms against the rule's
# 3.05, session 26: the consumers' per-chunk barriers), so the rule stays off.
PACKED = False
PACKED_PER_TOKEN = False
SPLIT_HEADS = False
GLUON = False
HEAD_MAJOR = False
TMA = True
TMA_K = True
TUNING = {"scores": {"rows": 128, "block_c": 64, "num_warps": 4, "num_stages": 2, "packed": None, "packed_per_token": None,
                     "head_major": None, "tma": None, "tma_k": None,
                     "split_heads": None, "maxnreg": None, "gluon": None}}
load_tuning_file("scores", TUNING)


@triton.jit
def _chunk_scores(q, K, SCORES, k_base, sk_c, c0, t, row_ok, row, row_in, seg, shared, lse2, C, qk_scale, b, h, ss_b,
                  ss_h, ss_t, MASKED: tl.constexpr, SEGMENTED: tl.constexpr, ROWS: tl.constexpr,
                  OUT_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr, CMP_BLOCK: tl.constexpr,
                  CMP_STRIDE: tl.constexpr, TMA_K: tl.constexpr):
    """Scores of blocks [c0, c0 + BLOCK_C), the logits as [blocks, rows] (K~ Q^T, ``tiles.probs_t``):
    the sums over a token's heads and the summed tokens run along each thread's own columns
    (shuffles), not across warps as with [rows, blocks] (NOTES Lever 29: 5.31 -> 3.25 ms at 128K);
    exp2 on log2-unit logits and lse (+inf on idle rows and rows that see nothing, so they are 0
    without a mask); the visibility mask only where some row cannot see the whole chunk (MASKED).
    The program's ROWS rows are OUT_ROWS groups of consecutive rows, one output row each;
    SEGMENTED (packed per-token rows, G not a power of two, which no reshape groups), OUT_ROWS
    token columns summed by the 0/1 indicator ``seg`` [ROWS, OUT_ROWS]. TMA_K: the K~ chunk as one
    TMA box (K a descriptor), as the compression forward loads it."""
    c = c0 + tl.arange(0, BLOCK_C)
    k = load_box(K, k_base, b, h, c0, c, c < C, sk_c, BLOCK_C, D, TMA_K)
    p = probs_t(k, q, lse2, t, c, C, row_ok, qk_scale, MASKED, CMP_BLOCK, CMP_STRIDE)
    ptr = SCORES + b * ss_b + h * ss_h + row[None, :] * ss_t + c[:, None]
    out_ok = row_in[None, :] & (c < C)[:, None]
    if SEGMENTED:
        # tf32x3 (p split into two tf32 halves, ~22 mantissa bits; the 0/1 indicator is exact in
        # tf32, so the error is fp32-like): one dot, and fp32 operands the interpreter computes
        # exactly, where a bf16 hi/lo split would need the bf16 dot that is wrong there (PITFALLS)
        grouped = tl.dot(p, seg, input_precision="tf32x3")
        # a token split between two programs gets two partials: atomics onto the zeroed scores,
        # exact in either order (0 + a + b == 0 + b + a); the program's own tokens a plain store
        tl.atomic_add(ptr, grouped, mask=out_ok & shared[None, :])
        tl.store(ptr, grouped, mask=out_ok & ~shared[None, :])
    else:
        tl.store(ptr, _row_sums(p, OUT_ROWS), mask=out_ok)


@triton.jit
def _row_sums(p, OUT_ROWS: tl.constexpr):
    """[blocks, OUT_ROWS] sums of P^T [blocks, rows] over OUT_ROWS groups of consecutive rows
    (along each thread's own columns, Lever 29)."""
    return tl.sum(tl.reshape(p, (p.shape[0], OUT_ROWS, p.shape[1] // OUT_ROWS)), 2)


@triton.jit
def _tile_queries(Q, K, LSE, b, h, t, g, row_ok, t_last, T1, C, T0, scale, sq_b, sq_h, sq_t, sk_b, sk_h, sk_c, sl_b,
                  sl_h, G: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr, CMP_BLOCK: tl.constexpr,
                  CMP_STRIDE: tl.constexpr, GIVEN_LSE: tl.constexpr, TMA_K: tl.constexpr):
    """(q, lse in log2 units, visible block end, K~ base) of rows (token t, head h*G + g) of a tile
    whose last token is t_last: the lse given (the whole sequence's, from the compression
    forward) or pass 1's, stored as rows [T0, ..) of the chunk's buffer; +inf where a row is idle
    or sees nothing, so its probabilities are 0 without a mask."""
    q_off, qh = row_offsets(b, h, t, g, sq_b, sq_h, sq_t, G, D)
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    c_end = visible_block_end(tl.minimum(t_last, T1 - 1), C, CMP_BLOCK, CMP_STRIDE)
    k_base = b * sk_b + h * sk_h
    if GIVEN_LSE:
        lse = tl.load(LSE + b * sl_b + qh * sl_h + t, mask=row_ok, other=float("-inf"))
    else:
        lse = row_lse(q, K, b, h, k_base, sk_c, t, row_ok, c_end, C, scale, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, TMA_K)
        tl.store(LSE + b * sl_b + qh * sl_h + (t - T0), lse, mask=row_ok)
    return q, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), c_end, k_base


@triton.jit
def _group_scores_kernel(
    Q, K, LSE, SCORES,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_c, sl_b, sl_h, ss_b, ss_h, ss_t,
    T0, T1, C, scale, N_OUT,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    D: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SUM: tl.constexpr,
    GIVEN_LSE: tl.constexpr, PACKED: tl.constexpr, ROWS: tl.constexpr, OUT_ROWS: tl.constexpr,
    SEGMENTED: tl.constexpr, TMA_K: tl.constexpr,
):
    pid_t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if PACKED:  # rows pid*ROWS .. of the chunk's (token, head) rows, token-major, G per token;
        # an output row per ROWS // OUT_ROWS of them (a divisor of a sum's rows: one sum each)
        f = pid_t * ROWS + tl.arange(0, ROWS)
        t = T0 + f // G
        g = f % G
        row_ok = t < T1
        t_first = T0 + (pid_t * ROWS) // G
        t_last = T0 + (pid_t * ROWS + ROWS - 1) // G
        if SEGMENTED:  # per token: a column per token the rows touch, u = t - t_first
            u = tl.arange(0, OUT_ROWS)
            row = t_first - T0 + u
            row_in = (u <= t_last - t_first) & (row < T1 - T0)
            seg = (((t - t_first)[:, None] == u[None, :]) & row_ok[:, None]).to(tl.float32)
            # tokens whose G rows [row * G, row * G + G) are not all this program's (first, last)
            shared = (row * G < pid_t * ROWS) | (row * G + G > pid_t * ROWS + ROWS)
        else:
            row = pid_t * OUT_ROWS + tl.arange(0, OUT_ROWS)
            row_in = row < N_OUT
            seg, shared = 0.0, row_in  # unused
    else:  # BLOCK_T whole tokens x G_PAD head slots; a row per SUM tokens
        t_first = T0 + pid_t * BLOCK_T
        t, g, row_ok = tile_rows(t_first, T1, G, G_PAD, BLOCK_T, ROWS)  # ROWS = BLOCK_T * G_PAD
        t_last = t_first + BLOCK_T - 1
        # row of the scores chunk: the sum over tokens T0 + SUM * row + [0, SUM); rows are
        # token-major, so a row's SUM tokens x G_PAD heads are consecutive tile rows
        row = pid_t * (BLOCK_T // SUM) + tl.arange(0, BLOCK_T // SUM)
        row_in = T0 + row * SUM < T1
        seg, shared = 0.0, row_in  # unused
    q, lse2, c_end, k_base = _tile_queries(Q, K, LSE, b, h, t, g, row_ok, t_last, T1, C, T0, scale, sq_b, sq_h, sq_t,
                                           sk_b, sk_h, sk_c, sl_b, sl_h, G, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE,
                                           GIVEN_LSE, TMA_K)
    qk_scale = scale * 1.4426950408889634  # log2 units: exp2
    c_mid = full_chunks_end(t_first, C, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
    for c0 in range(0, c_mid, BLOCK_C):
        _chunk_scores(q, K, SCORES, k_base, sk_c, c0, t, row_ok, row, row_in, seg, shared, lse2, C, qk_scale, b, h,
                      ss_b, ss_h, ss_t, False, SEGMENTED, ROWS, OUT_ROWS, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, TMA_K)
    for c0 in range(c_mid, c_end, BLOCK_C):
        _chunk_scores(q, K, SCORES, k_base, sk_c, c0, t, row_ok, row, row_in, seg, shared, lse2, C, qk_scale, b, h,
                      ss_b, ss_h, ss_t, True, SEGMENTED, ROWS, OUT_ROWS, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, TMA_K)


@triton.jit
def _part_queries(Q, K, LSE, b, h, t_first, T1, C, T0, scale, sq_b, sq_h, sq_t, sk_b, sk_h, sk_c, sl_b, sl_h,
                  G0: tl.constexpr, HEADS: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_C: tl.constexpr, D: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
                  GIVEN_LSE: tl.constexpr, TMA_K: tl.constexpr):
    """One head part of a split tile: its BLOCK_T tokens x heads h*G + G0 .. + HEADS - 1 as
    token-major rows (no slot idle) -> (q, lse in log2 units, token, valid)."""
    t, g, row_ok = tile_rows(t_first, T1, HEADS, HEADS, BLOCK_T, BLOCK_T * HEADS)
    q, lse2, _, _ = _tile_queries(Q, K, LSE, b, h, t, G0 + g, row_ok, t_first + BLOCK_T - 1, T1, C, T0, scale, sq_b,
                                  sq_h, sq_t, sk_b, sk_h, sk_c, sl_b, sl_h, G, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE,
                                  GIVEN_LSE, TMA_K)
    return q, lse2, t, row_ok


@triton.jit
def _split_chunk(K, SCORES, k_base, sk_c, c0, qa, la, ta, oka, qb, lb, tb, okb, qc, lc, tc, okc, row, row_in, C,
                 qk_scale, b, h, ss_b, ss_h, ss_t, MASKED: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr,
                 OUT_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr, CMP_BLOCK: tl.constexpr,
                 CMP_STRIDE: tl.constexpr, TMA_K: tl.constexpr):
    """Scores of blocks [c0, c0 + BLOCK_C) of a split tile: the K~ chunk loaded once, one MMA per
    head part (``probs_t``), the parts' row sums added before the one store."""
    c = c0 + tl.arange(0, BLOCK_C)
    k = load_box(K, k_base, b, h, c0, c, c < C, sk_c, BLOCK_C, D, TMA_K)
    grouped = _row_sums(probs_t(k, qa, la, ta, c, C, oka, qk_scale, MASKED, CMP_BLOCK, CMP_STRIDE), OUT_ROWS)
    if H1 > 0:
        grouped += _row_sums(probs_t(k, qb, lb, tb, c, C, okb, qk_scale, MASKED, CMP_BLOCK, CMP_STRIDE), OUT_ROWS)
    if H2 > 0:
        grouped += _row_sums(probs_t(k, qc, lc, tc, c, C, okc, qk_scale, MASKED, CMP_BLOCK, CMP_STRIDE), OUT_ROWS)
    ptr = SCORES + b * ss_b + h * ss_h + row[None, :] * ss_t + c[:, None]
    tl.store(ptr, grouped, mask=row_in[None, :] & (c < C)[:, None])


@triton.jit
def _split_scores_kernel(
    Q, K, LSE, SCORES,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_c, sl_b, sl_h, ss_b, ss_h, ss_t,
    T0, T1, C, scale,
    G: tl.constexpr, H0: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr, D: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SUM: tl.constexpr,
    OUT_ROWS: tl.constexpr, GIVEN_LSE: tl.constexpr, TMA_K: tl.constexpr,
):
    """Lever 51: the padded tiling's programs (BLOCK_T tokens of one kv head, an output row per SUM
    of them) with the G heads as parts of H0 >= H1 >= H2 heads (powers of two summing to G; 0 =
    absent), each part's q in its own MMA operand: no head slot padded. Own lse: pass 1 per part."""
    pid_t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t_first = T0 + pid_t * BLOCK_T
    c_end = visible_block_end(tl.minimum(t_first + BLOCK_T - 1, T1 - 1), C, CMP_BLOCK, CMP_STRIDE)
    k_base = b * sk_b + h * sk_h
    qa, la, ta, oka = _part_queries(Q, K, LSE, b, h, t_first, T1, C, T0, scale, sq_b, sq_h, sq_t, sk_b, sk_h,
                                    sk_c, sl_b, sl_h, 0, H0, G, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, GIVEN_LSE, TMA_K)
    qb, lb, tb, okb = qa, la, ta, oka  # (read only when H1 > 0)
    if H1 > 0:
        qb, lb, tb, okb = _part_queries(Q, K, LSE, b, h, t_first, T1, C, T0, scale, sq_b, sq_h, sq_t, sk_b,
                                        sk_h, sk_c, sl_b, sl_h, H0, H1, G, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE,
                                        GIVEN_LSE, TMA_K)
    qc, lc, tc, okc = qa, la, ta, oka  # (read only when H2 > 0)
    if H2 > 0:
        qc, lc, tc, okc = _part_queries(Q, K, LSE, b, h, t_first, T1, C, T0, scale, sq_b, sq_h, sq_t, sk_b,
                                        sk_h, sk_c, sl_b, sl_h, H0 + H1, H2, G, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE,
                                        GIVEN_LSE, TMA_K)
    row = pid_t * OUT_ROWS + tl.arange(0, OUT_ROWS)
    row_in = T0 + row * SUM < T1
    qk_scale = scale * 1.4426950408889634  # log2 units: exp2
    c_mid = full_chunks_end(t_first, C, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
    for c0 in range(0, c_mid, BLOCK_C):
        _split_chunk(K, SCORES, k_base, sk_c, c0, qa, la, ta, oka, qb, lb, tb, okb, qc, lc, tc, okc, row, row_in, C,
                     qk_scale, b, h, ss_b, ss_h, ss_t, False, H1, H2, OUT_ROWS, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, TMA_K)
    for c0 in range(c_mid, c_end, BLOCK_C):
        _split_chunk(K, SCORES, k_base, sk_c, c0, qa, la, ta, oka, qb, lb, tb, okb, qc, lc, tc, okc, row, row_in, C,
                     qk_scale, b, h, ss_b, ss_h, ss_t, True, H1, H2, OUT_ROWS, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, TMA_K)


@triton.jit
def _head_major_chunk(Q, K, LSE, out, c0, t_first, t, row_ok, b, h, k_base, sk_c, sq_b, sq_h, sq_t, sl_b, sl_h, LSE_T0, C,
                      qk_scale, MASKED: tl.constexpr, G: tl.constexpr, SUM: tl.constexpr, BLOCK_C: tl.constexpr,
                      D: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, TMA: tl.constexpr):
    """The tile's sums over its SUM tokens and the G heads for blocks [c0, c0 + BLOCK_C): the K~
    chunk loaded once for the G heads, each head's q tile and lse re-read (from L2), the logits
    as [blocks, rows] (summed along each thread's columns, Lever 29), one store."""
    c = c0 + tl.arange(0, BLOCK_C)
    k = load_blocks(K, k_base, c, sk_c, C, D)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for g in range(G):
        qh = h * G + g
        q = load_box(Q, b * sq_b + qh * sq_h, b, qh, t_first, t, row_ok, sq_t, SUM, D, TMA)
        lse2 = backward_lse(LSE, b, qh, t - LSE_T0, row_ok, sl_b, sl_h)  # +inf: idle or sees nothing
        acc += tl.sum(probs_t(k, q, lse2, t, c, C, row_ok, qk_scale, MASKED, CMP_BLOCK, CMP_STRIDE), 1)
    tl.store(out + c, acc, mask=c < C)


@triton.jit
def _head_major_kernel(
    Q, K, LSE, SCORES,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_c, sl_b, sl_h, ss_b, ss_h, ss_t,
    T0, T1, C, scale, LSE_T0,
    G: tl.constexpr, SUM: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr, CMP_BLOCK: tl.constexpr,
    CMP_STRIDE: tl.constexpr, GIVEN_LSE: tl.constexpr, TMA: tl.constexpr,
):
    """Lever 38: one program per tile of SUM tokens T0 + SUM * pid + [0, SUM) (clipped to T1) and
    kv head; rows are the tile's tokens of one head at a time (Q a descriptor with a [SUM, D] box
    when TMA), the G heads looped inside each chunk of compressed blocks, their sum in registers:
    one output row per tile. LSE is indexed at t - LSE_T0 (the whole sequence's when given, else
    this chunk's buffer, which pass 1 fills per head and the score pass re-reads)."""
    pid_t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t_first = T0 + pid_t * SUM
    t = t_first + tl.arange(0, SUM)
    row_ok = t < T1
    c_end = visible_block_end(tl.minimum(t_first + SUM, T1) - 1, C, CMP_BLOCK, CMP_STRIDE)
    c_mid = full_chunks_end(t_first, C, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
    k_base = b * sk_b + h * sk_h
    if not GIVEN_LSE:  # pass 1, a head at a time, stored for the score pass
        for g in range(G):
            qh = h * G + g
            q = load_box(Q, b * sq_b + qh * sq_h, b, qh, t_first, t, row_ok, sq_t, SUM, D, TMA)
            lse = row_lse(q, K, b, h, k_base, sk_c, t, row_ok, c_end, C, scale, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, False)
            tl.store(LSE + b * sl_b + qh * sl_h + (t - LSE_T0), lse, mask=row_ok)
        tl.debug_barrier()  # the score pass reads them back, in other threads
    qk_scale = scale * 1.4426950408889634  # LOG2E
    out = SCORES + b * ss_b + h * ss_h + pid_t * ss_t
    for c0 in range(0, c_mid, BLOCK_C):
        _head_major_chunk(Q, K, LSE, out, c0, t_first, t, row_ok, b, h, k_base, sk_c, sq_b, sq_h, sq_t, sl_b, sl_h, LSE_T0,
                          C, qk_scale, False, G, SUM, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, TMA)
    for c0 in range(c_mid, c_end, BLOCK_C):
        _head_major_chunk(Q, K, LSE, out, c0, t_first, t, row_ok, b, h, k_base, sk_c, sq_b, sq_h, sq_t, sl_b, sl_h, LSE_T0,
                          C, qk_scale, True, G, SUM, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, TMA)


def _launch_params(q, group: int) -> tuple[int, int, dict]:
    """(G_PAD, BLOCK_T, launch constants) of the padded tiling: 128-row tiles, 64 compressed
    blocks per step."""
    tune = tuning_for(TUNING, "scores", q)
    g_pad, block_t = rows_per_tile(group, tune.get("rows") or 128)
    consts = dict(BLOCK_C=tune.get("block_c") or 64, num_warps=tune.get("num_warps") or (8 if q.shape[-1] >= 128 else 4))
    for knob in ("num_stages", "maxnreg"):  # maxnreg: a register cap for one more CTA per SM (Lever 51)
        if tune.get(knob):
            consts[knob] = tune[knob]
    return g_pad, block_t, consts


def _head_major(q, tokens_per_sum: int) -> bool:
    """The head-major tiling (Lever 38): block-shared sums of a power of two of tokens from 16 (the
    dot's minimum) to a 128-row MMA tile (``tiles.ROWS``; more stays on the padded tiling)."""
    n = tokens_per_sum
    return 16 <= n <= TILE_ROWS and n & (n - 1) == 0 and tuning_for(TUNING, "scores", q).get("head_major", HEAD_MAJOR)


def _packed(q, tokens_per_sum: int) -> bool:
    """Packed rows: the chunk's (token, head) rows back to back, no head slot padded (per-token
    scores and tile sums each have their knob: they were measured apart)."""
    if tokens_per_sum == 1:
        return tuning_for(TUNING, "scores", q).get("packed_per_token", PACKED_PER_TOKEN)
    return tuning_for(TUNING, "scores", q).get("packed", PACKED)


def head_parts(group: int, block_t: int) -> tuple[int, int, int] | None:
    """Lever 51: G as power-of-two head counts, largest first, 0-padded to three (7 -> (4, 2, 1)),
    the split tiling's parts; None where it does not apply: G a power of two (one part is the
    padded tiling itself), more than three bits set, or a part's rows (block_t x its heads)
    below the 16 an MMA operand needs."""
    parts = [1 << i for i in reversed(range(group.bit_length())) if group >> i & 1]
    if len(parts) == 1 or len(parts) > 3 or parts[-1] * block_t < 16:
        return None
    return tuple(parts + [0] * (3 - len(parts)))


def _gluon(q, k_cmp, lse, block_t: int, in_kernel_sum: int):
    """The ``gluon`` knob's value (or the GLUON rule's: True, or "pipelined" for Lever 54) where the
    Gluon scorer (Lever 52) supports the call (``compression_scores_sm90.supported``: sm_90,
    16-bit, given lse, whole tiles summed in registers), else False: everything else keeps the
    Triton kernels, which give the same sums."""
    knob = tuning_for(TUNING, "scores", q).get("gluon", GLUON)
    if not (q.is_cuda and knob):
        return False
    from .compression_scores_sm90 import supported
    return knob if supported(q, k_cmp, lse, block_t, in_kernel_sum) else False


def _split_parts(q, group: int) -> tuple[int, int, int] | None:
    """The head parts when the ``split_heads`` knob (or the SPLIT_HEADS rule) is on and applies."""
    if not tuning_for(TUNING, "scores", q).get("split_heads", SPLIT_HEADS):
        return None
    return head_parts(group, _launch_params(q, group)[1])

def _segmented(group: int, tokens_per_sum: int) -> bool:
    """Packed per-token scores whose head sum no power-of-two reshape can group (G = 7): summed by
    the indicator matmul instead. At a power-of-two G packed rows are the padded ones, reshaped."""
    return tokens_per_sum == 1 and group & (group - 1) != 0


def _program_rows(q, group: int) -> int:
    """Rows per program: the padded tiling's BLOCK_T x G_PAD; packed, all of them used."""
    g_pad, block_t, _ = _launch_params(q, group)
    return block_t * g_pad


def _program_tokens(rows: int, group: int) -> int:
    """Segmented: token columns per program, a power of two >= the tokens its rows can touch (rows
    from offset a = pid * rows mod G reach floor((a + rows - 1) / G) + 1 tokens; 20 -> 32 for 128
    rows at G = 7), at least 16 for the dot. rows > G (a power of two above a non-power-of-two G),
    so a token's rows lie in at most two programs."""
    return max(16, triton.next_power_of_2((rows + group - 2) // group + 1))


def _group_rows(q, group: int, tokens_per_sum: int) -> int:
    """Packed: rows per output row, the largest power of two dividing a sum's rows (so every
    group lies in one sum) that fits a program (448 rows of a 64-token tile at G = 7: 64)."""
    n = tokens_per_sum * group
    return min(n & -n, _program_rows(q, group))


def partial_rows(q, group: int, tokens_per_sum: int) -> int:
    """Rows the kernel writes per summed row (PyTorch adds them afterwards): packed, a sum's rows
    over the power-of-two group (segmented per-token sums: 1); padded, tokens_per_sum over the
    power of two of its tokens a program sums (1 = summed wholly in registers); head-major, 1."""
    if _head_major(q, tokens_per_sum):
        return 1
    if _packed(q, tokens_per_sum):
        if _segmented(group, tokens_per_sum):
            return 1
        return tokens_per_sum * group // _group_rows(q, group, tokens_per_sum)
    return tokens_per_sum // min(tokens_per_sum & -tokens_per_sum, _launch_params(q, group)[1])


def compression_group_scores(
    q: torch.Tensor, k_cmp: torch.Tensor, block_size: int, stride: int, scale: float, t0: int = 0, t1: int | None = None,
    tokens_per_sum: int = 1, lse: torch.Tensor | None = None,
):
    """Group scores [B, Hkv, R, C] fp32 of tokens [t0, t1) (sum over the G heads of the
    compression probabilities; 0 where invisible), row r the sum over tokens t0 + tokens_per_sum*r
    + [0, tokens_per_sum) inside [t0, t1), R = ceil((t1 - t0) / tokens_per_sum); and the tokens'
    compression lse [B, Hq, t1 - t0] fp32, or None when ``lse`` was given.

    q [B, Hq, T, D] the whole sequence (visibility uses absolute positions), k_cmp [B, Hkv, C, D].
    ``lse`` [B, Hq, T] fp32: the compression lse of the whole sequence when it is already known
    (the compression branch's forward computes the same softmax); the kernel then skips its
    first pass (NOTES Lever 14).
    """
    B, Hq, T, D = q.shape
    t1 = T if t1 is None else t1
    Hkv, C = k_cmp.shape[1], k_cmp.shape[2]
    G = Hq // Hkv
    if q.stride(-1) != 1 or k_cmp.stride(-1) != 1:
        raise ValueError("compression_group_scores needs q and k_cmp contiguous in head_dim")
    check_query(q, "compression_group_scores")
    if not 0 <= t0 <= t1 <= T:
        raise ValueError(f"token range [{t0}, {t1}) is not inside [0, {T})")
    if tokens_per_sum < 1:
        raise ValueError(f"tokens_per_sum must be >= 1, got {tokens_per_sum}")
    given = lse is not None
    if given:
        check_given_lse(lse, q)
    g_pad, block_t, consts = _launch_params(q, G)
    rest = partial_rows(q, G, tokens_per_sum)  # summed afterwards, over the kernel's partial rows
    rows = triton.cdiv(t1 - t0, tokens_per_sum)
    scores = torch.zeros(B, Hkv, rows * rest, C, device=q.device, dtype=torch.float32)
    if not given:
        lse = torch.full((B, Hq, t1 - t0), float("-inf"), device=q.device, dtype=torch.float32)
    if t1 > t0 and _head_major(q, tokens_per_sum):
        _launch_head_major(q, k_cmp, lse, scores, block_size, stride, scale, t0, t1, tokens_per_sum, given, consts)
    elif t1 > t0:
        if _packed(q, tokens_per_sum):
            per_program = _program_rows(q, G)
            segmented = _segmented(G, tokens_per_sum)
            out_rows = _program_tokens(per_program, G) if segmented else per_program // _group_rows(q, G, tokens_per_sum)
            tiling = dict(G_PAD=G, BLOCK_T=1, SUM=tokens_per_sum, ROWS=per_program, OUT_ROWS=out_rows, PACKED=True,
                          SEGMENTED=segmented, N_OUT=rows * rest)
            grid = (triton.cdiv((t1 - t0) * G, per_program), Hkv, B)
            kernel = _group_scores_kernel
        else:  # padded tiles, or the same tiles split into head parts (no slot padded)
            in_kernel = tokens_per_sum // rest
            parts = _split_parts(q, G)
            grid = (triton.cdiv(t1 - t0, block_t), Hkv, B)
            tiling = dict(BLOCK_T=block_t, SUM=in_kernel, OUT_ROWS=block_t // in_kernel)
            gluon = _gluon(q, k_cmp, lse if given else None, block_t, in_kernel)
            if gluon and not parts:
                from .compression_scores_sm90 import group_scores_sm90
                group_scores_sm90(q, k_cmp, lse, scores, block_size, stride, scale, t0, t1, g_pad, block_t,
                                  pipelined=gluon == "pipelined")
                return (scores.unflatten(2, (rows, rest)).sum(3) if rest > 1 else scores), None
            if parts:
                kernel = _split_scores_kernel
                tiling |= dict(H0=parts[0], H1=parts[1], H2=parts[2])
            else:
                kernel = _group_scores_kernel
                tiling |= dict(G_PAD=g_pad, ROWS=block_t * g_pad, PACKED=False, SEGMENTED=False, N_OUT=rows * rest)
        tma_k = bool(tuning_for(TUNING, "scores", q).get("tma_k", TMA_K)) and tma_ready(k_cmp)
        (k_in,) = box_operands((k_cmp,), consts["BLOCK_C"], {"TMA": tma_k, "D": D})
        kernel[grid](
            q, k_in, lse, scores,
            q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
            lse.stride(0), lse.stride(1), scores.stride(0), scores.stride(1), scores.stride(2),
            t0, t1, C, scale,
            G=G, D=D, CMP_BLOCK=block_size, CMP_STRIDE=stride, GIVEN_LSE=given, TMA_K=tma_k, **tiling, **consts,
        )
    return (scores.unflatten(2, (rows, rest)).sum(3) if rest > 1 else scores), (None if given else lse)


def _launch_head_major(q, k_cmp, lse, scores, block_size, stride, scale, t0, t1, tokens_per_sum, given, consts):
    """The head-major tile sums (``_head_major_kernel``) into ``scores`` [B, Hkv, R, C]; own lse
    (not ``given``) into ``lse`` [B, Hq, t1 - t0]."""
    B, Hq, _, D = q.shape
    Hkv = k_cmp.shape[1]
    consts = dict(consts, D=D, TMA=bool(tuning_for(TUNING, "scores", q).get("tma", TMA)) and tma_ready(q))
    (q_in,) = box_operands((q,), tokens_per_sum, consts)
    _head_major_kernel[(triton.cdiv(t1 - t0, tokens_per_sum), Hkv, B)](
        q_in, k_cmp, lse, scores,
        q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        lse.stride(0), lse.stride(1), scores.stride(0), scores.stride(1), scores.stride(2),
        t0, t1, k_cmp.shape[2], scale, 0 if given else t0,
        G=Hq // Hkv, SUM=tokens_per_sum, CMP_BLOCK=block_size, CMP_STRIDE=stride, GIVEN_LSE=given, **consts,
    )

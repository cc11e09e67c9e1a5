"""Compressed attention (NSA's compression branch) in Triton: forward with lse, backward.

q [B, Hq, T, D] attends to pooled K~, V~ [B, Hkv, C, D]; block i is visible to token t iff
i*s + l <= t + 1; rows with nothing visible give 0 and lse -inf (the reference's step 1).

Tiling is GQA-native: a program's rows are BLOCK_T tokens x the G heads of one kv group, packed
(``tiles.rows_per_tile``: 9 tokens x 7 heads in 64 rows), so K~/V~ of the group are loaded once
for all G heads. Only the chunks a tile's first token cannot see whole are masked. Logits and lse
are in log2 units inside the kernels (exp2; NOTES Lever 28); the lse output is natural.

Why not FlexAttention here: its backward gives dK/dV one program per kv block, and the compressed
key axis is short (C = T/64), so at 32K only 16 programs did all the dK~/dV~ work (H100 trace in
profiling/results/h100). The dK~/dV~ kernel here also splits the query axis (SPLIT_T token tiles
per program) and accumulates with fp32 atomics, which keeps the GPU full at any length; its tiles
are 64 tokens of one head at a time (q and dO as TMA boxes, logits as [blocks, rows]: NOTES Lever 36).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import (
    LOG2E,
    add_partial,
    backward_lse,
    box_operands,
    check_query,
    dkv_from_probs_t,
    full_chunks_end,
    head_tile,
    kernel_layout,
    load_blocks,
    load_box,
    load_delta,
    load_tuning_file,
    probs_t,
    row_offsets,
    rows_per_tile,
    softmax_step,
    store_delta,
    store_softmax,
    strides_like,
    tile_rows,
    tma_ready,
    tuning_for,
    visible,
    visible_block_end,
)

BLOCK_C = 64


@triton.jit
def _load_chunk(K, V, b, h, kv_base, c0, c, sk_c, C, BLOCK_C: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """K~, V~ rows c = c0 .. c0 + BLOCK_C - 1 of kv head h (rows past C read as 0): by TMA (K, V
    descriptors with a [BLOCK_C, D] box: one copy instruction, no per-thread addresses or masks in
    the loop) or by pointers."""
    c_ok = c < C
    return (load_box(K, kv_base, b, h, c0, c, c_ok, sk_c, BLOCK_C, D, TMA),
            load_box(V, kv_base, b, h, c0, c, c_ok, sk_c, BLOCK_C, D, TMA))


@triton.jit
def _fwd_step(q, K, V, b, h, kv_base, sk_c, c0, t, row_ok, C, qk_scale, m, s_sum, acc, MASKED: tl.constexpr,
              BLOCK_C: tl.constexpr, D: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
              TMA: tl.constexpr):
    """Online-softmax step over compressed blocks [c0, c0 + BLOCK_C) in log2 units (qk_scale
    includes log2 e); the visibility mask only where some row of the tile cannot see all of them
    (MASKED)."""
    c = c0 + tl.arange(0, BLOCK_C)
    k, v = _load_chunk(K, V, b, h, kv_base, c0, c, sk_c, C, BLOCK_C, D, TMA)
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(visible(t, c, C, row_ok, CMP_BLOCK, CMP_STRIDE), qk, float("-inf"))
    return softmax_step(qk, qk_scale, m, s_sum, acc, v)


@triton.jit
def _probs(q, k, c, t, row_ok, lse, C, qk_scale, MASKED: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """Backward's recomputed probabilities 2^(s - lse), logits and lse in log2 units (lse +inf on
    idle rows: 0 there), masked only where some row cannot see every block of the chunk (MASKED)."""
    p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(visible(t, c, C, row_ok, CMP_BLOCK, CMP_STRIDE), p, 0.0)
    return p


@triton.jit
def _dq_step(q, do, K, V, b, h, kv_base, sk_c, c0, t, row_ok, lse, delta, C, qk_scale, dq, MASKED: tl.constexpr,
             BLOCK_C: tl.constexpr, D: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
             TMA: tl.constexpr):
    c = c0 + tl.arange(0, BLOCK_C)
    k, v = _load_chunk(K, V, b, h, kv_base, c0, c, sk_c, C, BLOCK_C, D, TMA)
    p = _probs(q, k, c, t, row_ok, lse, C, qk_scale, MASKED, CMP_BLOCK, CMP_STRIDE)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.jit
def _dkv_step(Q, DO, LSE, DELTA, k, v, c, tile, b, h, sq_b, sq_h, sq_t, sl_b, sl_h, T, C, qk_scale, dk, dv,
              MASKED: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
              D: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """dV~ += P^T dO and dK~ += dS^T Q (unscaled) over one token tile."""
    t, g, row_ok = tile_rows(tile * BLOCK_T, T, G, G_PAD, BLOCK_T, ROWS)
    row_off, qh = row_offsets(b, h, t, g, sq_b, sq_h, sq_t, G, D)
    q = tl.load(Q + row_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + row_off, mask=row_ok[:, None], other=0.0)
    lse = backward_lse(LSE, b, qh, t, row_ok, sl_b, sl_h)
    delta = load_delta(DELTA, b, qh, t, row_ok, sl_b, sl_h)
    p = _probs(q, k, c, t, row_ok, lse, C, qk_scale, MASKED, CMP_BLOCK, CMP_STRIDE)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    return dk, dv


@triton.jit
def _dkv_head_step(Q, DO, LSE, DELTA, k, v, c, tile, qh, b, sq_b, sq_h, sq_t, sl_b, sl_h, T, C, qk_scale, dk, dv,
                   MASKED: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr, CMP_BLOCK: tl.constexpr,
                   CMP_STRIDE: tl.constexpr, TMA: tl.constexpr):
    """``_dkv_step`` over one head's BLOCK_T tokens of a token tile, logits as [blocks, rows]
    (K~ Q^T; ``tiles.head_tile``, ``tiles.dkv_from_probs_t``)."""
    t, row_ok, q, do, lse, delta = head_tile(Q, DO, LSE, DELTA, b, qh, tile, T, sq_b, sq_h, sq_t, sl_b, sl_h, BLOCK_T, D, TMA)
    p_t = probs_t(k, q, lse, t, c, C, row_ok, qk_scale, MASKED, CMP_BLOCK, CMP_STRIDE)
    return dkv_from_probs_t(p_t, q, do, v, delta, dk, dv)


@triton.jit
def _cmp_fwd_kernel(
    Q, K, V, O, LSE,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_c, so_b, so_h, so_t, sl_b, sl_h,
    T, C, qk_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    D: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, TMA: tl.constexpr,
):
    pid_t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t_first = pid_t * BLOCK_T
    t, g, row_ok = tile_rows(t_first, T, G, G_PAD, BLOCK_T, ROWS)
    q_off, qh = row_offsets(b, h, t, g, sq_b, sq_h, sq_t, G, D)
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    c_end = visible_block_end(tl.minimum(t_first + BLOCK_T, T) - 1, C, CMP_BLOCK, CMP_STRIDE)
    c_mid = full_chunks_end(t_first, C, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
    kv_base = b * sk_b + h * sk_h
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    for c0 in range(0, c_mid, BLOCK_C):
        m, s_sum, acc = _fwd_step(q, K, V, b, h, kv_base, sk_c, c0, t, row_ok, C, qk_scale, m, s_sum, acc, False,
                                  BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, TMA)
    for c0 in range(c_mid, c_end, BLOCK_C):
        m, s_sum, acc = _fwd_step(q, K, V, b, h, kv_base, sk_c, c0, t, row_ok, C, qk_scale, m, s_sum, acc, True,
                                  BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, TMA)
    store_softmax(m, s_sum, acc, O, LSE, b, h, t, g, qh, row_ok, so_b, so_h, so_t, sl_b, sl_h, G, D)


@triton.jit
def _cmp_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_c, sl_b, sl_h,
    T, C, scale, qk_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    D: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, TMA: tl.constexpr,
):
    """dQ = scale * sum_c dS K~, dS = P (dP - delta), dP = dO V~^T (q, o, do, dq share strides);
    stores delta for the dK~/dV~ pass."""
    pid_t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t_first = pid_t * BLOCK_T
    t, g, row_ok = tile_rows(t_first, T, G, G_PAD, BLOCK_T, ROWS)
    row_off, qh = row_offsets(b, h, t, g, sq_b, sq_h, sq_t, G, D)
    q = tl.load(Q + row_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + row_off, mask=row_ok[:, None], other=0.0)
    lse = backward_lse(LSE, b, qh, t, row_ok, sl_b, sl_h)
    delta = store_delta(O, DELTA, row_off, do, b, qh, t, row_ok, sl_b, sl_h)
    c_end = visible_block_end(tl.minimum(t_first + BLOCK_T, T) - 1, C, CMP_BLOCK, CMP_STRIDE)
    c_mid = full_chunks_end(t_first, C, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
    kv_base = b * sk_b + h * sk_h
    dq = tl.zeros([ROWS, D], tl.float32)
    for c0 in range(0, c_mid, BLOCK_C):
        dq = _dq_step(q, do, K, V, b, h, kv_base, sk_c, c0, t, row_ok, lse, delta, C, qk_scale, dq, False,
                      BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, TMA)
    for c0 in range(c_mid, c_end, BLOCK_C):
        dq = _dq_step(q, do, K, V, b, h, kv_base, sk_c, c0, t, row_ok, lse, delta, C, qk_scale, dq, True,
                      BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, TMA)
    tl.store(DQ + row_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _cmp_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_c, sl_b, sl_h, sd_b, sd_h, sd_c,
    T, C, HKV, TILES_PER_SPLIT, scale, qk_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    D: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, HEAD_MAJOR: tl.constexpr, TMA: tl.constexpr,
    RELAXED: tl.constexpr,
):
    """dV~ += P^T dO and dK~ += scale * dS^T Q over one split of token tiles; the splits of a
    compressed tile add into fp32 buffers with atomics (RELAXED: ``tiles.add_partial``). Token
    tiles that see the whole compressed tile skip the mask. HEAD_MAJOR: a tile is BLOCK_T tokens
    of each of the G heads in turn (``_dkv_head_step``, one flat loop over (tile, head)); else
    packed (token, head) rows."""
    pid_c, pid_bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = pid_bh // HKV
    h = pid_bh % HKV
    c_lo = pid_c * BLOCK_C
    c = c_lo + tl.arange(0, BLOCK_C)
    d = tl.arange(0, D)
    k = load_blocks(K, b * sk_b + h * sk_h, c, sk_c, C, D)
    v = load_blocks(V, b * sk_b + h * sk_h, c, sk_c, C, D)
    # Token tiles of this split that can see the tile's first block (t >= c*s + l - 1) and, from
    # tile_mid on, its last block too (all of it inside C).
    n_tiles = tl.cdiv(T, BLOCK_T)
    first_tile = (c_lo * CMP_STRIDE + CMP_BLOCK - 1) // BLOCK_T
    full_tile = tl.where(c_lo + BLOCK_C <= C, tl.cdiv((c_lo + BLOCK_C - 1) * CMP_STRIDE + CMP_BLOCK - 1, BLOCK_T), n_tiles)
    tile_lo = tl.maximum(pid_s * TILES_PER_SPLIT, first_tile)
    tile_hi = tl.minimum((pid_s + 1) * TILES_PER_SPLIT, n_tiles)
    tile_mid = tl.minimum(tl.maximum(tile_lo, full_tile), tile_hi)
    dk = tl.zeros([BLOCK_C, D], tl.float32)
    dv = tl.zeros([BLOCK_C, D], tl.float32)
    if HEAD_MAJOR:
        for it in range(tile_lo * G, tile_mid * G):
            dk, dv = _dkv_head_step(Q, DO, LSE, DELTA, k, v, c, it // G, h * G + it % G, b, sq_b, sq_h, sq_t, sl_b, sl_h,
                                    T, C, qk_scale, dk, dv, True, BLOCK_T, D, CMP_BLOCK, CMP_STRIDE, TMA)
        for it in range(tile_mid * G, tile_hi * G):
            dk, dv = _dkv_head_step(Q, DO, LSE, DELTA, k, v, c, it // G, h * G + it % G, b, sq_b, sq_h, sq_t, sl_b, sl_h,
                                    T, C, qk_scale, dk, dv, False, BLOCK_T, D, CMP_BLOCK, CMP_STRIDE, TMA)
    else:
        for tile in range(tile_lo, tile_mid):
            dk, dv = _dkv_step(Q, DO, LSE, DELTA, k, v, c, tile, b, h, sq_b, sq_h, sq_t, sl_b, sl_h, T, C, qk_scale, dk, dv,
                               True, G, G_PAD, BLOCK_T, ROWS, D, CMP_BLOCK, CMP_STRIDE)
        for tile in range(tile_mid, tile_hi):
            dk, dv = _dkv_step(Q, DO, LSE, DELTA, k, v, c, tile, b, h, sq_b, sq_h, sq_t, sl_b, sl_h, T, C, qk_scale, dk, dv,
                               False, G, G_PAD, BLOCK_T, ROWS, D, CMP_BLOCK, CMP_STRIDE)
    if tile_hi > tile_lo:
        out = b * sd_b + h * sd_h + c[:, None] * sd_c + d[None, :]
        add_partial(DK + out, dk * scale, (c < C)[:, None], RELAXED)
        add_partial(DV + out, dv, (c < C)[:, None], RELAXED)


DKV_PROGRAMS = 1024  # at least this many dK~/dV~ programs (splits of the token axis)
# Launch overrides per kernel at the tuned shape (``tiles.tuning_for``; profiling/kernel_tuning.py
# measures them); None = the rule in ``_launch_params``. dK~/dV~ also takes "programs".
# Measured winners at 128K on an H100 (profiling/results/h100/kernel_tuning, NOTES Lever 10): 64-row
# tiles, 4 warps and 2 stages everywhere; 32-wide compressed tiles for fwd/dQ, 64 for dK~/dV~.
# Session 6 (after Lever 15, results/h100/session6-8K-32K-128K/kernel_tuning): splitting the token
# axis into >= 4096 dK~/dV~ programs took the backward from 21.1 to 19.3 ms.
# "packed": tiles of whole tokens x G heads, no power-of-two head padding (Lever 19; False = padded).
# Session 9 (H200, results/h200/session9-compression/kernel_tuning): with packed tiles and the mask
# split the forward's best is 128 rows, 64-wide, 8 warps, 3 stages (6.87 ms; 64/32/4/2 packed 8.47,
# padded 7.15); packing took the backward from 17.0 to 16.4 ms.
# Session 12 (H200, results/h200/session12-levers/): exp2 on log2-unit logits and lse took the
# forward from 6.81 to 4.98 ms and the backward from 16.55 to ~15.5 ms (NOTES Lever 28).
# Session 17 (H200, results/h200/session17-levers/): K~/V~ chunks by TMA ("tma", rule TMA) took the
# forward from 4.92 to 4.57 ms and the backward from 14.06 to 13.78 (dQ); with TMA the dQ's 64-wide
# chunks beat 32-wide in two calls (13.47 / 13.55 against 13.78 / 13.82 ms), so dQ's block_c is 64.
TUNING = {
    "fwd": {"rows": 128, "block_c": 64, "num_warps": 8, "num_stages": 3, "packed": True, "tma": None, "gluon_ws": None},
    "dq": {"rows": 64, "block_c": 64, "num_warps": 4, "num_stages": 2, "packed": True, "tma": None},
    "dkv": {"rows": 64, "block_c": 64, "num_warps": 4, "num_stages": 2, "programs": 4096, "packed": True,
            "head_major": None, "tma": None, "relaxed": None},
}
HEAD_MAJOR = True  # the rule for dK~/dV~'s "head_major" knob: tiles of one head's tokens (NOTES Lever 36)
TMA = True  # the rule for the "tma" knobs: K~/V~ chunks as TMA boxes in fwd / dQ, q / dO tiles in dK~/dV~ (head-major only)
# The rule for dK~/dV~'s "relaxed" knob: relaxed atomics (REDG, no fences) for the splits' partial
# sums; 4096 programs flush 64 KB each. Measured on an H200 at 128K (NOTES Lever 44, session 21):
# the backward kernels 13.49 -> 13.30 ms (8192 programs: 13.31); the op's fwd+bwd within its spread.
RELAXED = True
# The rule for the forward's "gluon_ws" knob: on an sm_90 GPU with 16-bit inputs at head_dim 64 or
# 128, a Gluon forward (``compression_forward_sm90``) instead of ``_cmp_fwd_kernel``, which every
# other input keeps (fp32, other head dims, CPU; the same outputs bit for bit at 128K). Values:
# True, the warp-specialised forward (Lever 47); "pingpong", its consumers taking turns at their
# MMAs (Lever 48); "persistent", one program per SM over all tiles with the next tile's q and
# chunks loaded under the current one (Lever 50). Measured on an H200 at 128K (session 23, one
# process, all with the coalesced epilogue): Triton 4.564, True 4.544, "pingpong" 4.501,
# "persistent" 4.235 ms; the op's forward 20.19 / 19.84 (rule then) against 19.72 / 19.60.
GLUON_WS = "persistent"
load_tuning_file("compression", TUNING)


def _launch_params(q, k_cmp, kernel: str):
    """Tile constants of one kernel. Default rule: at head_dim >= 128 the first H100 run needed
    248-262 KB of shared memory (limit 227 KB) with 64-wide compressed tiles and 3 pipeline
    stages: 32-wide tiles and one stage there, and 64-row tiles for fp32 (twice the bytes per
    element)."""
    B, Hq, T, D = q.shape
    Hkv = k_cmp.shape[1]
    G = Hq // Hkv
    big = D >= 128
    tune = tuning_for(TUNING, kernel, q)
    rows = tune.get("rows") or (64 if big and q.element_size() == 4 else 128)
    head_major = kernel == "dkv" and tune.get("head_major", HEAD_MAJOR)
    if head_major:  # a tile is `rows` tokens of one head at a time
        g_pad, block_t = G, rows
    else:
        g_pad, block_t = rows_per_tile(G, rows, packed=tune.get("packed", True))
        rows = triton.next_power_of_2(block_t * g_pad)  # rows_per_tile may return fewer than asked (G > rows)
    consts = dict(G=G, G_PAD=g_pad, BLOCK_T=block_t, ROWS=rows, BLOCK_C=tune.get("block_c") or (32 if big else BLOCK_C), D=D,
                  num_warps=tune.get("num_warps") or (8 if big else 4), num_stages=tune.get("num_stages") or (1 if big else 2))
    tma = bool(tune.get("tma", TMA))
    if kernel == "dkv":
        consts |= dict(HEAD_MAJOR=head_major, TMA=head_major and tma and tma_ready(q), RELAXED=bool(tune.get("relaxed", RELAXED)))
    else:
        consts["TMA"] = tma and tma_ready(k_cmp)
    return B, Hq, Hkv, T, D, block_t, consts


def _check(q, k_cmp, v_cmp):
    check_query(q, "compression_attention")
    if k_cmp.shape != v_cmp.shape or q.shape[1] % k_cmp.shape[1]:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k_cmp {tuple(k_cmp.shape)}, v_cmp {tuple(v_cmp.shape)}")


def compression_attention_fwd(q, k_cmp, v_cmp, block_size: int, stride: int, scale: float):
    """(out [B, Hq, T, D] in q's dtype and layout, lse [B, Hq, T] fp32); inputs in kernel layout
    (``tiles.kernel_layout``)."""
    v_cmp = strides_like(v_cmp, k_cmp)  # one set of K/V strides
    _check(q, k_cmp, v_cmp)
    gluon = tuning_for(TUNING, "fwd", q).get("gluon_ws", GLUON_WS)
    if gluon and q.is_cuda:
        from . import compression_forward_sm90 as sm90

        if sm90.supported(q, k_cmp, gluon == "persistent"):
            return sm90.compression_attention_fwd_sm90(q, k_cmp, v_cmp, block_size, stride, scale,
                                                       tuning={"pingpong": gluon == "pingpong",
                                                               "persistent": gluon == "persistent"})
    B, Hq, Hkv, T, D, block_t, consts = _launch_params(q, k_cmp, "fwd")
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    if T == 0:
        return out, lse
    _cmp_fwd_kernel[(triton.cdiv(T, block_t), Hkv, B)](
        q, *box_operands((k_cmp, v_cmp), consts["BLOCK_C"], consts), out, lse,
        q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        T, k_cmp.shape[2], scale * LOG2E, CMP_BLOCK=block_size, CMP_STRIDE=stride, **consts,
    )
    return out, lse


def compression_attention_bwd(q, k_cmp, v_cmp, out, lse, grad_out, block_size: int, stride: int, scale: float):
    """(dq, dk_cmp, dv_cmp, delta) for compression_attention_fwd, each gradient in its input's
    layout; delta = rowsum(grad_out * out) [B, Hq, T] fp32 (the softmax backward's correction, and
    the gate gradient of a gated sum: NOTES Lever 37). Inputs in kernel layout."""
    (B, Hq, T, _), (Hkv, C) = q.shape, k_cmp.shape[1:3]
    grad_out, out, v_cmp = strides_like(grad_out, q), strides_like(out, q), strides_like(v_cmp, k_cmp)  # shared strides
    delta = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)  # rowsum(dO * O): the dQ kernel writes it
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k_cmp, dtype=torch.float32)  # fp32 for the atomics; k_cmp's layout (so dv's too)
    dv = torch.zeros_like(dk)
    if T == 0 or C == 0:  # nothing visible: out = 0
        return dq.zero_(), dk.to(k_cmp.dtype), dv.to(v_cmp.dtype), delta.zero_()
    strides = (q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2), lse.stride(0), lse.stride(1))
    *_, block_t, consts = _launch_params(q, k_cmp, "dq")
    _cmp_dq_kernel[(triton.cdiv(T, block_t), Hkv, B)](
        q, *box_operands((k_cmp, v_cmp), consts["BLOCK_C"], consts), out, grad_out, lse, delta, dq, *strides,
        T, C, scale, scale * LOG2E, CMP_BLOCK=block_size, CMP_STRIDE=stride, **consts,
    )
    # Split the token axis so the short compressed axis still fills the GPU (>= DKV_PROGRAMS).
    *_, block_t, consts = _launch_params(q, k_cmp, "dkv")
    block_c = consts["BLOCK_C"]
    tiles = triton.cdiv(T, block_t)
    per_split = triton.cdiv(C, block_c) * B * Hkv
    programs = tuning_for(TUNING, "dkv", q).get("programs") or DKV_PROGRAMS
    splits = max(1, min(tiles, triton.cdiv(programs, per_split)))
    tiles_per_split = triton.cdiv(tiles, splits)
    consts["TMA"] = consts["TMA"] and tma_ready(grad_out)
    q_in, do_in = box_operands((q, grad_out), block_t, consts)
    _cmp_dkv_kernel[(triton.cdiv(C, block_c), B * Hkv, triton.cdiv(tiles, tiles_per_split))](
        q_in, k_cmp, v_cmp, do_in, lse, delta, dk, dv, *strides, dk.stride(0), dk.stride(1), dk.stride(2),
        T, C, Hkv, tiles_per_split, scale, scale * LOG2E, CMP_BLOCK=block_size, CMP_STRIDE=stride, **consts,
    )
    return dq, dk.to(k_cmp.dtype), dv.to(v_cmp.dtype), delta


def compression_attention(q, k_cmp, v_cmp, block_size: int, stride: int, scale: float):
    """Causal compressed attention: (out [B, Hq, T, D], lse [B, Hq, T] fp32), differentiable in
    q, k_cmp, v_cmp (and through them in the pooling or MLP that made k_cmp / v_cmp), through the
    ``flexnsa::compression_attention`` custom op."""
    from .custom_ops import compression_attention as op

    _check(q, k_cmp, v_cmp)
    return op(kernel_layout(q), kernel_layout(k_cmp), kernel_layout(v_cmp), block_size, stride, scale)

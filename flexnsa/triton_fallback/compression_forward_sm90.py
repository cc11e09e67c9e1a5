"""The compression branch's forward for Hopper (sm_90) in Gluon, warp-specialised (NOTES Levers 46-50).

Why: every Triton forward here is latency-bound because each QK~^T is waited on before its softmax
and the softmax before the next MMA (sm_90 SASS, NOTES sessions 16-17), and at one CTA per SM
nothing overlaps a program's prologue (q, the first K~/V~ boxes) and epilogue with another's
chunks: ~4.5 of a 21 us program at 128K (Lever 49). Here the warpgroups are separate partitions
(``gl.warp_specialize``): a TMA producer warp fills a 3-deep K~/V~ ring, and two consumer
warpgroups of 64 rows each run QK~^T -> online softmax -> P V~ on their own rows, coupled only by
the ring's mbarriers. The rule (``compression_attention.GLUON_WS = "persistent"``, Lever 50) runs
one program per SM over all tiles: the producer's ring runs across tile boundaries and each
consumer copies the next tile's q rows by cp.async under the current tile, so only the epilogue
stays exposed (4.235 against Triton's 4.564 ms at 128K on an H200, session 23). The one-tile-per-
program variants stay as knob values: ``True`` (Lever 47, the consumers in step, 4.544 ms) and
``"pingpong"`` (Lever 48: they take turns at their MMA blocks through two mbarriers, FA3's
ping-pong; 4.501 ms, the per-chunk cost unchanged). ``python -m profiling.sm90_sass
[--pingpong | --persistent]`` shows their sm_90 code.

Same tiling and semantics as ``compression_attention._cmp_fwd_kernel``: 128 rows = BLOCK_T
tokens x the G heads of kv head h, packed (row r = token t_first + r // G, head h*G + r % G);
block c is visible to token t iff c*s + l <= t + 1; rows that see nothing give 0 and lse -inf;
logits in log2 units (exp2), the max taken before scaling, lse natural. The K~/V~ boxes come from
a contiguous [B * Hkv * C, D] view: rows past this head's C belong to the next head (or read as 0
past the end) and are masked, like every chunk the tile's first token cannot see whole.

GPU-only (the interpreter does not run Gluon): the CPU tests run the Triton kernel, and the GPU
tests (``tests/test_triton_compression.py``) check this one against the float64 reference.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

LN2 = gl.constexpr(0.6931471805599453)
LOG2E = 1.4426950408889634
# a barrier over the calling partition's warps (``thread_barrier`` in triton 3.6, ``barrier`` in 3.7)
_partition_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# Gluon kernels cannot call @triton.jit helpers, so the visibility bounds (``tiles.visible_block_end``,
# ``tiles.full_chunks_end``) and the online softmax (``tiles.online_max_sum``) are written again
# below: a change to those rules changes them here too.


@gluon.jit
def _online_softmax(s, m, l, c0, c_mid, t, C, qk_scale, mma: gl.constexpr, BLOCK_C: gl.constexpr, CMP_BLOCK: gl.constexpr,
                    CMP_STRIDE: gl.constexpr):
    """One online-softmax step over chunk [c0, c0 + BLOCK_C) of raw logits s (masked from c_mid on,
    where some row cannot see the whole chunk): (p, rescale of the old state, max, sum) in log2
    units, the max taken before scaling (as ``tiles.online_max_sum``)."""
    if c0 >= c_mid:
        c = c0 + gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, mma))
        seen = (c[None, :] * CMP_STRIDE + CMP_BLOCK <= t[:, None] + 1) & (c < C)[None, :]
        s = gl.where(seen, s, float("-inf"))
    m_new = gl.maximum(m, gl.max(s, 1) * qk_scale)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m - m_safe)
    p = gl.exp2(s * qk_scale - m_safe[:, None])
    return p, alpha, m_new, l * alpha + gl.sum(p, 1)


@gluon.jit
def _wait_turn(turn, k, HALF: gl.constexpr):
    """Ping-pong: block k of consumer HALF may issue its MMAs once the other consumer's block k - 1
    (HALF 0) or k (HALF 1) has retired; turn[HALF] completes a phase per such block (fresh barriers
    read as phase 1 complete, so consumer 0's block 0 goes at once)."""
    if HALF == 0:
        mbarrier.wait(turn.index(0), (k & 1) ^ 1)
    else:
        mbarrier.wait(turn.index(1), k & 1)


@gluon.jit
def _store_rows(acc, m, l, O, LSE, b, h, t_first, T, so_b, so_h, so_t, sl_b, sl_h, HALF: gl.constexpr, G: gl.constexpr,
                BLOCK_T: gl.constexpr, D: gl.constexpr):
    """A consumer's 64 rows of output (normalised, in O's dtype) and lse (natural log; rows that
    see nothing: 0 and -inf). The output goes through shared memory into a row-contiguous layout
    first, so each warp stores whole 128-byte row segments in 16-byte vectors; stored from the
    wgmma layout, each thread's 4-byte pairs left every sector half written (Lever 50)."""
    io: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    seen = l > 0
    lse = gl.where(seen, (m + gl.log2(gl.where(seen, l, 1.0))) * LN2, float("-inf"))
    inv = gl.where(seen, 1.0 / gl.where(seen, l, 1.0), 0.0)
    out = gl.convert_layout((acc * inv[:, None]).to(O.dtype.element_ty), io)
    r = HALF * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, io))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, io))
    t = t_first + r // G
    ok = (r < BLOCK_T * G) & (t < T)
    gl.store(O + b * so_b + (h * G + r % G)[:, None] * so_h + t[:, None] * so_t + d[None, :], out, mask=ok[:, None])
    lse = gl.convert_layout(lse, gl.SliceLayout(1, io))
    gl.store(LSE + b * sl_b + (h * G + r % G) * sl_h + t, lse, mask=ok)


@gluon.jit
def _plain_chunks(q, k_smem, v_smem, full_k, full_v, empty, it, n, c_mid, t, C, qk_scale, m, l, acc, zero, mma: gl.constexpr,
                  STAGES: gl.constexpr, BLOCK_C: gl.constexpr, CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr):
    """A consumer's n chunks of one tile, each QK~^T -> online softmax -> P V~ waited on in turn,
    the ring slot released once its P V~ retired; ``it`` counts the ring's chunks before this tile
    (0 with one tile per program), as the producer counts them. Returns (max, sum, acc)."""
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    for j in range(n):
        slot = (it + j) % STAGES
        ph = ((it + j) // STAGES) & 1
        mbarrier.wait(full_k.index(slot), ph)
        s = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        p, alpha, m, l = _online_softmax(s, m, l, j * BLOCK_C, c_mid, t, C, qk_scale, mma, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
        acc = acc * alpha[:, None]
        mbarrier.wait(full_v.index(slot), ph)
        p16 = gl.convert_layout(p.to(k_smem.dtype), p_layout)
        acc = warpgroup_mma(p16, v_smem.index(slot), acc, is_async=True)
        acc, p16 = warpgroup_mma_wait(0, deps=(acc, p16))
        mbarrier.arrive(empty.index(slot), count=1)
    return m, l, acc


@gluon.jit
def _consume(a, HALF: gl.constexpr, G: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr,
             CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    """Rows HALF * 64 .. + 63 of the tile, per chunk: QK~^T -> online softmax -> P V~, each MMA waited
    on (ptxas serialises them with the softmax anyway, Lever 46), the chunk's ring slot released by
    one arrive once its P V~ retired; then the rows' output and lse stored.
    PINGPONG (NOTES Lever 48): block j issues chunk j's QK~^T and chunk j-1's P V~ back to back,
    and the consumers take turns at these blocks (``_wait_turn``), so each one's softmax runs while
    the other's MMAs do (FlashAttention-3's ping-pong); acc_j = (acc_{j-1} + P_{j-1} V~_{j-1}) * alpha_j."""
    (q_smem, k_smem, v_smem, full_k, full_v, empty, turn, K, V, O, LSE, so_b, so_h, so_t, sl_b, sl_h, b, h, t_first, T, C,
     n, c_mid, qk_scale, row0) = a
    HROWS: gl.constexpr = 64
    dtype: gl.constexpr = K.dtype
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, mma)
    q = q_smem.slice(HALF * HROWS, HROWS, dim=0)
    r = HALF * HROWS + gl.arange(0, HROWS, layout=row_l)
    t = t_first + r // G
    zero = gl.zeros([HROWS, BLOCK_C], gl.float32, mma)
    m = gl.full([HROWS], float("-inf"), gl.float32, row_l)
    l = gl.zeros([HROWS], gl.float32, row_l)
    acc = gl.zeros([HROWS, D], gl.float32, mma)
    if PINGPONG:
        _wait_turn(turn, 0, HALF)
        mbarrier.wait(full_k.index(0), 0)
        s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        mbarrier.arrive(turn.index(1 - HALF), count=1)
        p, alpha, m, l = _online_softmax(s, m, l, 0, c_mid, t, C, qk_scale, mma, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
        p16 = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(1, n):
            _wait_turn(turn, j, HALF)
            slot = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(full_k.index(slot), (j // STAGES) & 1)
            mbarrier.wait(full_v.index(prev), ((j - 1) // STAGES) & 1)
            s = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
            acc = warpgroup_mma(p16, v_smem.index(prev), acc, is_async=True)
            s, acc, p16 = warpgroup_mma_wait(0, deps=(s, acc, p16))
            mbarrier.arrive(empty.index(prev), count=1)
            mbarrier.arrive(turn.index(1 - HALF), count=1)
            p, alpha, m, l = _online_softmax(s, m, l, j * BLOCK_C, c_mid, t, C, qk_scale, mma, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
            acc = acc * alpha[:, None]
            p16 = gl.convert_layout(p.to(dtype), p_layout)
        _wait_turn(turn, n, HALF)
        last = (n - 1) % STAGES
        mbarrier.wait(full_v.index(last), ((n - 1) // STAGES) & 1)
        acc = warpgroup_mma(p16, v_smem.index(last), acc, is_async=True)
        acc, p16 = warpgroup_mma_wait(0, deps=(acc, p16))
        mbarrier.arrive(empty.index(last), count=1)
        mbarrier.arrive(turn.index(1 - HALF), count=1)
    else:
        m, l, acc = _plain_chunks(q, k_smem, v_smem, full_k, full_v, empty, 0, n, c_mid, t, C, qk_scale, m, l, acc, zero, mma,
                                  STAGES, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
    _store_rows(acc, m, l, O, LSE, b, h, t_first, T, so_b, so_h, so_t, sl_b, sl_h, HALF, G, BLOCK_T, D)


@gluon.jit
def _consumer_low(a, G: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr, CMP_BLOCK: gl.constexpr,
                  CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    _consume(a, 0, G, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES, PINGPONG)


@gluon.jit
def _consumer_high(a, G: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr, CMP_BLOCK: gl.constexpr,
                   CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    _consume(a, 1, G, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES, PINGPONG)


@gluon.jit
def _producer(a, G: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr, CMP_BLOCK: gl.constexpr,
              CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    """One warp: chunk i's K~ and V~ boxes into ring slot i % STAGES once both consumers released
    its previous chunk, each box arriving on its own barrier (the QK~^T need not wait for V~)."""
    (q_smem, k_smem, v_smem, full_k, full_v, empty, turn, K, V, O, LSE, so_b, so_h, so_t, sl_b, sl_h, b, h, t_first, T, C,
     n, c_mid, qk_scale, row0) = a
    for i in range(n):
        slot = i % STAGES
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)  # fresh barriers read as phase 1 complete
        mbarrier.expect(full_k.index(slot), K.block_type.nbytes)
        tma.async_copy_global_to_shared(K, [row0 + i * BLOCK_C, 0], full_k.index(slot), k_smem.index(slot))
        mbarrier.expect(full_v.index(slot), V.block_type.nbytes)
        tma.async_copy_global_to_shared(V, [row0 + i * BLOCK_C, 0], full_v.index(slot), v_smem.index(slot))


@gluon.jit
def _cmp_fwd_ws_kernel(
    Q, K, V, O, LSE,
    sq_b, sq_h, sq_t, so_b, so_h, so_t, sl_b, sl_h,
    T, C, HKV, qk_scale,
    G: gl.constexpr, BLOCK_T: gl.constexpr, ROWS: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr,
    CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
    num_warps: gl.constexpr,
):
    pid_t, h, b = gl.program_id(0), gl.program_id(1), gl.program_id(2)
    dtype: gl.constexpr = K.dtype
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    t_first = pid_t * BLOCK_T
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, io_layout))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, io_layout))
    t_io = t_first + r // G
    ok_io = (r < BLOCK_T * G) & (t_io < T)
    q = gl.load(Q + b * sq_b + (h * G + r % G)[:, None] * sq_h + t_io[:, None] * sq_t + d[None, :], mask=ok_io[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(dtype, [ROWS, D], gl.NVMMASharedLayout.get_default_for([ROWS, D], dtype), q)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_C, D], K.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_C, D], V.layout)
    full_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    full_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # ping-pong: consumer i may issue
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(full_k.index(i), count=1)
        mbarrier.init(full_v.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumers release a slot
    fence_async_shared()
    t_last = gl.minimum(t_first + BLOCK_T, T) - 1
    c_end = gl.minimum(gl.where(t_last + 1 >= CMP_BLOCK, (t_last + 1 - CMP_BLOCK) // CMP_STRIDE + 1, 0), C)
    n = gl.maximum(gl.cdiv(c_end, BLOCK_C), 1)
    c_first = gl.minimum(gl.where(t_first + 1 >= CMP_BLOCK, (t_first + 1 - CMP_BLOCK) // CMP_STRIDE + 1, 0), C)
    c_mid = c_first // BLOCK_C * BLOCK_C
    row0 = (b * HKV + h) * C
    a = (q_smem, k_smem, v_smem, full_k, full_v, empty, turn, K, V, O, LSE, so_b, so_h, so_t, sl_b, sl_h, b, h, t_first, T, C, n,
         c_mid, qk_scale, row0)
    # the default partition (this program's 4 warps) takes rows 0-63; workers: 4 warps for rows 64-127
    # (152 registers), 1 producer warp (24). Constexprs go as their own arguments (a tuple would
    # turn them into values).
    gl.warp_specialize([(_consumer_low, (a, G, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES, PINGPONG)),
                        (_consumer_high, (a, G, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES, PINGPONG)),
                        (_producer, (a, G, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES, PINGPONG))], [4, 1], [152, 24])


@gluon.jit
def _tile_bounds(tile, n_t, HKV, B, T0, T, C, BLOCK_T: gl.constexpr, BLOCK_C: gl.constexpr, CMP_BLOCK: gl.constexpr,
                 CMP_STRIDE: gl.constexpr):
    """Persistent kernels: tile index -> (batch, kv head, first token, chunks (at least 1), first
    masked chunk, first K~/V~ row of the [B * Hkv * C, D] view) for the n_t tiles of tokens
    [T0, T) (the forward: T0 = 0), as ``_cmp_fwd_ws_kernel`` computes them per program. Token
    tiles run last first (they see the most blocks), so each program's round-robin share ends on
    short tiles and no long one straggles."""
    bh = tile % (HKV * B)
    b = bh // HKV
    h = bh % HKV
    t_first = T0 + (n_t - 1 - tile // (HKV * B)) * BLOCK_T
    t_last = gl.minimum(t_first + BLOCK_T, T) - 1
    c_end = gl.minimum(gl.where(t_last + 1 >= CMP_BLOCK, (t_last + 1 - CMP_BLOCK) // CMP_STRIDE + 1, 0), C)
    n = gl.maximum(gl.cdiv(c_end, BLOCK_C), 1)
    c_first = gl.minimum(gl.where(t_first + 1 >= CMP_BLOCK, (t_first + 1 - CMP_BLOCK) // CMP_STRIDE + 1, 0), C)
    return b, h, t_first, n, c_first // BLOCK_C * BLOCK_C, (b * HKV + h) * C


@gluon.jit
def _copy_q_rows(Q, dst, b, h, t_first, T, sq_b, sq_h, sq_t, ROW0: gl.constexpr, NROWS: gl.constexpr, G: gl.constexpr,
                 SLOTS: gl.constexpr, BLOCK_T: gl.constexpr, D: gl.constexpr):
    """Rows ROW0 .. + NROWS - 1 of a tile's q into ``dst`` by cp.async (no registers held: the copy
    runs under the current tile's chunks). Row r is token t_first + r // SLOTS, head h*G + r % SLOTS
    (SLOTS = G: packed, as ``_cmp_fwd_ws_kernel`` loads them; a power of two >= G: the scorer's
    padded head slots); idle slots, rows outside the tile or past T read as 0."""
    io: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    r = ROW0 + gl.arange(0, NROWS, layout=gl.SliceLayout(1, io))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, io))
    t = t_first + r // SLOTS
    g = r % SLOTS
    ok = (r < BLOCK_T * SLOTS) & (g < G) & (t < T)
    ptr = Q + b * sq_b + (h * G + g)[:, None] * sq_h + t[:, None] * sq_t + d[None, :]
    async_copy.async_copy_global_to_shared(dst, ptr, mask=ok[:, None])


@gluon.jit
def _consume_tiles(a, HALF: gl.constexpr, G: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr,
                   CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr):
    """Persistent consumer (NOTES Lever 50): ``_consume``'s plain chunk loop over this program's
    tiles, its q rows double-buffered (the next tile's copied while this one runs), the ring's
    slots and phases counted over all its chunks as the producer counts them."""
    (q_smem, k_smem, v_smem, full_k, full_v, empty, Q, K, V, O, LSE, sq_b, sq_h, sq_t, so_b, so_h, so_t, sl_b, sl_h,
     T, C, HKV, B, n_t, qk_scale) = a
    HROWS: gl.constexpr = 64
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    row_l: gl.constexpr = gl.SliceLayout(1, mma)
    r = HALF * HROWS + gl.arange(0, HROWS, layout=row_l)
    zero = gl.zeros([HROWS, BLOCK_C], gl.float32, mma)
    n_tiles = n_t * HKV * B
    first = gl.program_id(0)
    step = gl.num_programs(0)
    b, h, t_first, n, c_mid, row0 = _tile_bounds(first, n_t, HKV, B, 0, T, C, BLOCK_T, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
    _copy_q_rows(Q, q_smem.index(0).slice(HALF * HROWS, HROWS, dim=0), b, h, t_first, T, sq_b, sq_h, sq_t, HALF * HROWS,
                 HROWS, G, G, BLOCK_T, D)
    async_copy.commit_group()
    it = 0
    k = 0
    for tile in range(first, n_tiles, step):
        b, h, t_first, n, c_mid, row0 = _tile_bounds(tile, n_t, HKV, B, 0, T, C, BLOCK_T, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
        async_copy.wait_group(0)  # this tile's q rows (this thread's copies), then everyone's
        fence_async_shared()
        _partition_barrier()
        q = q_smem.index(k % 2).slice(HALF * HROWS, HROWS, dim=0)
        if tile + step < n_tiles:  # the other buffer's last reader (tile k - 1) retired before the barrier
            nb, nh, nt_first, _, _, _ = _tile_bounds(tile + step, n_t, HKV, B, 0, T, C, BLOCK_T, BLOCK_C, CMP_BLOCK,
                                                     CMP_STRIDE)
            _copy_q_rows(Q, q_smem.index((k + 1) % 2).slice(HALF * HROWS, HROWS, dim=0), nb, nh, nt_first, T,
                         sq_b, sq_h, sq_t, HALF * HROWS, HROWS, G, G, BLOCK_T, D)
        async_copy.commit_group()
        t = t_first + r // G
        m = gl.full([HROWS], float("-inf"), gl.float32, row_l)
        l = gl.zeros([HROWS], gl.float32, row_l)
        acc = gl.zeros([HROWS, D], gl.float32, mma)
        m, l, acc = _plain_chunks(q, k_smem, v_smem, full_k, full_v, empty, it, n, c_mid, t, C, qk_scale, m, l, acc, zero, mma,
                                  STAGES, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
        _store_rows(acc, m, l, O, LSE, b, h, t_first, T, so_b, so_h, so_t, sl_b, sl_h, HALF, G, BLOCK_T, D)
        it += n
        k += 1


@gluon.jit
def _consumer_tiles_low(a, G: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr,
                        CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr):
    _consume_tiles(a, 0, G, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES)


@gluon.jit
def _consumer_tiles_high(a, G: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr,
                         CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr):
    _consume_tiles(a, 1, G, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES)


@gluon.jit
def _produce_tiles(a, G: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr, CMP_BLOCK: gl.constexpr,
                   CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr):
    """``_producer`` over this program's tiles in the consumers' order: the next tile's first
    chunks are in flight while the consumers finish the current one."""
    (q_smem, k_smem, v_smem, full_k, full_v, empty, Q, K, V, O, LSE, sq_b, sq_h, sq_t, so_b, so_h, so_t, sl_b, sl_h,
     T, C, HKV, B, n_t, qk_scale) = a
    n_tiles = n_t * HKV * B
    it = 0
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        b, h, t_first, n, c_mid, row0 = _tile_bounds(tile, n_t, HKV, B, 0, T, C, BLOCK_T, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
        for i in range(n):
            slot = it % STAGES
            mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)  # fresh barriers read as phase 1 complete
            mbarrier.expect(full_k.index(slot), K.block_type.nbytes)
            tma.async_copy_global_to_shared(K, [row0 + i * BLOCK_C, 0], full_k.index(slot), k_smem.index(slot))
            mbarrier.expect(full_v.index(slot), V.block_type.nbytes)
            tma.async_copy_global_to_shared(V, [row0 + i * BLOCK_C, 0], full_v.index(slot), v_smem.index(slot))
            it += 1


@gluon.jit
def _cmp_fwd_persistent_kernel(
    Q, K, V, O, LSE,
    sq_b, sq_h, sq_t, so_b, so_h, so_t, sl_b, sl_h,
    T, C, HKV, B, qk_scale,
    G: gl.constexpr, BLOCK_T: gl.constexpr, ROWS: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr,
    CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    """Lever 50: ``_cmp_fwd_ws_kernel`` with one program per SM looping over the tiles, so a tile's
    q copy and first K~/V~ boxes overlap the previous tile's chunks (the fixed cost per program
    measured at ~4.5-5.7 SM-us of a 21 us program at 128K, NOTES Lever 49)."""
    dtype: gl.constexpr = K.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, D], gl.NVMMASharedLayout.get_default_for([ROWS, D], dtype))
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_C, D], K.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_C, D], V.layout)
    full_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    full_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full_k.index(i), count=1)
        mbarrier.init(full_v.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumers release a slot
    fence_async_shared()
    a = (q_smem, k_smem, v_smem, full_k, full_v, empty, Q, K, V, O, LSE, sq_b, sq_h, sq_t, so_b, so_h, so_t, sl_b, sl_h,
         T, C, HKV, B, gl.cdiv(T, BLOCK_T), qk_scale)
    gl.warp_specialize([(_consumer_tiles_low, (a, G, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES)),
                        (_consumer_tiles_high, (a, G, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES)),
                        (_produce_tiles, (a, G, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES))], [4, 1], [152, 24])


# 128 rows = two 64-row consumer warpgroups; 64-block chunks; a 3-deep ring (131 KB, 1 CTA/SM);
# registers capped at 168 so 12 warps (4 + 4 + 1, rounded up to warpgroups) fit an SM's 64K
# "pingpong": the consumers take turns at their MMAs (Lever 48; measured in session 23: 4.71 against
# the plain 4.74 and Triton's 4.56 ms at 128K on an H200). "persistent": one program per SM looping
# over the tiles, q double-buffered (Lever 50; plain chunk loop, 164 KB of shared memory)
TUNING = {"rows": 128, "block_c": 64, "num_warps": 4, "stages": 3, "maxnreg": 168, "pingpong": False, "persistent": False}


def supported(q, k_cmp, persistent: bool = False) -> bool:
    """Where this forward runs: an sm_90 GPU (wgmma, setmaxnreg), 16-bit inputs (the Triton
    kernel keeps fp32), head_dim 64 or 128 (whole 64-wide wgmma tiles; at 256 the fp32 accumulator alone
    would need 128 of a consumer's 152 registers), a non-empty compressed axis; persistent: q's
    rows 16-byte aligned too (its cp.async copies move 16 bytes)."""
    aligned = q.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in q.stride()[:-1])
    return (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9 and q.dtype in (torch.bfloat16, torch.float16)
            and k_cmp.dtype == q.dtype and q.shape[-1] in (64, 128) and k_cmp.shape[2] > 0 and q.stride(-1) == 1
            and (aligned or not persistent))


def _descriptor(x2d, block_c: int):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    layout = gl.NVMMASharedLayout.get_default_for([block_c, x2d.shape[1]], gl.bfloat16 if x2d.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor.from_tensor(x2d, [block_c, x2d.shape[1]], layout)


def compression_attention_fwd_sm90(q, k_cmp, v_cmp, block_size: int, stride: int, scale: float, tuning: dict | None = None):
    """(out [B, Hq, T, D] in q's dtype and layout, lse [B, Hq, T] fp32), as
    ``compression_attention.compression_attention_fwd``; ``supported(q, k_cmp)`` must hold."""
    tune = dict(TUNING, **(tuning or {}))
    if not supported(q, k_cmp, tune["persistent"]):
        raise ValueError(f"compression_attention_fwd_sm90 needs an sm_90 GPU, 16-bit q/k~, head_dim 64 or 128 and a "
                         f"non-empty compressed axis (persistent: 16-byte aligned q rows): q {tuple(q.shape)} {q.dtype} on {q.device}, k~ {tuple(k_cmp.shape)}")
    B, Hq, T, D = q.shape
    Hkv, C = k_cmp.shape[1], k_cmp.shape[2]
    G = Hq // Hkv
    rows, block_c = tune["rows"], tune["block_c"]
    if rows != 128 or G > rows:
        raise ValueError(f"the warp-specialised forward takes 128-row tiles (two 64-row consumers) and G <= 128, got {rows}, G = {G}")
    block_t = rows // G
    # one [B * Hkv * C, D] row space for the TMA boxes (K~ is T/64 rows per head: a copy is ~us)
    k2 = k_cmp.contiguous().view(B * Hkv * C, D)
    v2 = v_cmp.contiguous().view(B * Hkv * C, D)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    if T == 0:
        return out, lse
    operands = (q, _descriptor(k2, block_c), _descriptor(v2, block_c), out, lse,
                q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1))
    consts = dict(G=G, BLOCK_T=block_t, ROWS=rows, BLOCK_C=block_c, D=D, CMP_BLOCK=block_size, CMP_STRIDE=stride,
                  STAGES=tune["stages"], num_warps=tune["num_warps"], maxnreg=tune["maxnreg"])
    if tune["persistent"]:
        tiles = triton.cdiv(T, block_t) * Hkv * B
        programs = min(tiles, torch.cuda.get_device_properties(q.device).multi_processor_count)
        _cmp_fwd_persistent_kernel[(programs,)](*operands, T, C, Hkv, B, scale * LOG2E, **consts)
    else:
        _cmp_fwd_ws_kernel[(triton.cdiv(T, block_t), Hkv, B)](*operands, T, C, Hkv, scale * LOG2E,
                                                             PINGPONG=bool(tune["pingpong"]), **consts)
    return out, lse

"""The block-shared group scorer for Hopper (sm_90) in Gluon, persistent and warp-specialised (NOTES Lever 52).

Why: the Triton scorer (``compression_scores._group_scores_kernel``) waits on each chunk's
K~ Q^T before its exponentials and on those before the next MMA, so a program's tensor-core and
MUFU phases run in turn; with three CTAs per SM they should interleave, but Nsight Compute reads
the tensor pipe at ~45% and the MUFU (XU) pipe at ~45% of the kernel's time, nearly disjoint
(session 24). Here one program per SM holds a TMA producer warp that fills a K~ ring and two
consumer warpgroups that take the tile's chunks in turn (chunk i to consumer i % 2), each with
its own double-buffered copy of the tile's q: while one consumer's exponentials run, the other's
MMA does, and the tiles' prologues (q by cp.async, the first K~ boxes) run under the previous
tile's chunks, as in the persistent compression forward (Lever 50).
Measured on an H200 at 128K it loses to the Triton scorer (3.52 ms plain, 3.46 with Lever 54's
pairs, against 3.05; session 26): every chunk of a consumer pays three barriers over its
warpgroup that Triton 3.6 inserts around the ring's mbarrier wait and its one-thread arrive
(Nsight Compute's top stall), which three Triton CTAs per SM hide and one CTA cannot. So the
``gluon`` knob stays off (NOTES, session 26).

Same tiling and semantics as the padded Triton scorer with the whole tile summed in registers
(SUM = BLOCK_T): 128 rows = BLOCK_T tokens x G_PAD head slots of kv head h (row r: token
t_first + r // G_PAD, head h*G + r % G_PAD, idle slots read as 0 with lse +inf), the logits as
[blocks, rows] (K~ Q^T), p = 2^(s * scale * log2 e - lse * log2 e) from the compression forward's
lse (given, never computed here), block c visible to token t iff c*s + l <= t + 1, one fp32 sum
over the tile's rows per (tile, block) stored at scores row (t_first - T0) // BLOCK_T. The K~
boxes come from a contiguous [B * Hkv * C, D] view: rows past this head's C belong to the next
head (or read as 0 past the end) and are masked with every chunk the tile's first token cannot
see whole.

GPU-only (the interpreter does not run Gluon): the CPU tests run the Triton scorer, and the GPU
tests (``tests/test_triton_scores.py``) check this one against the float64 reference.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .compression_forward_sm90 import LOG2E, _copy_q_rows, _descriptor, _partition_barrier, _tile_bounds

# 128-row tiles; 64-block chunks; a 4-deep K~ ring (even, so each consumer keeps its own two slots).
# The launch holds 168 registers x 384 threads (4 + 4 + 1 warps, rounded up to warpgroups: at most
# 170 fit 64K); setmaxnreg then moves them: the second consumer takes worker_regs, the producer
# warpgroup 24, the first consumer the rest (Triton's AllocateWarpGroups: 168 + (168 - w) + (168 - 24),
# at most 256). Plain: 152 and 256. Pipelined (two [64, 128] fp32 accumulators per consumer thread,
# 128 registers of them): 240 and 240 = the whole pool (128 x (240 + 240 + 24) = 168 x 384).
TUNING = {"rows": 128, "block_c": 64, "stages": 4, "maxnreg": 168, "worker_regs": 152}
PIPELINED_WORKER_REGS = 240


def register_budget(pipelined: bool) -> tuple[int, int]:
    """(maxnreg of the launch, the second consumer partition's registers)."""
    return TUNING["maxnreg"], PIPELINED_WORKER_REGS if pipelined else TUNING["worker_regs"]


@gluon.jit
def _chunk_sums(s, j, t_first, c_mid, C, out, lse2, qk_scale, mma: gl.constexpr, G_PAD: gl.constexpr, ROWS: gl.constexpr,
                BLOCK_C: gl.constexpr, CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr):
    """Chunk j's 2^(s - lse) summed over the tile's rows and stored (masked from c_mid on, where
    some row cannot see the whole chunk)."""
    p = gl.exp2(s * qk_scale - lse2[None, :])
    c = j * BLOCK_C + gl.arange(0, BLOCK_C, layout=gl.SliceLayout(1, mma))
    if j * BLOCK_C >= c_mid:
        t = t_first + gl.arange(0, ROWS, layout=gl.SliceLayout(0, mma)) // G_PAD
        seen = (c[:, None] * CMP_STRIDE + CMP_BLOCK <= t[None, :] + 1) & (c < C)[:, None]
        p = gl.where(seen, p, 0.0)
    gl.store(out + c, gl.sum(p, 1), mask=c < C)


@gluon.jit
def _score_chunks(q, lse2, t_first, k_smem, full, empty, it, n, c_mid, C, out, qk_scale, HALF: gl.constexpr,
                  mma: gl.constexpr, G_PAD: gl.constexpr, ROWS: gl.constexpr, STAGES: gl.constexpr, BLOCK_C: gl.constexpr,
                  CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr, PIPELINED: gl.constexpr):
    """This consumer's chunks of one tile (ring chunk it + j for j = HALF - it mod 2, + 2, ..):
    K~ Q^T, its ring slot released once the MMA retired, then ``_chunk_sums``. PIPELINED (NOTES
    Lever 54): the chunks in pairs, both MMAs issued before the first's exponentials, which run
    while the second's MMA does (two accumulators, 240 registers); else each MMA is waited on
    right away. The pairs drain inside each iteration: with the second MMA still in flight across
    the loop's back edge, ptxas serialises every wgmma (C7514, sm_90 SASS, triton 3.6.0)."""
    zero = gl.zeros([BLOCK_C, ROWS], gl.float32, mma)
    qt = q.permute((1, 0))
    first = (HALF + it) % 2
    if PIPELINED:  # pairs of this consumer's chunks (j, j + 2): both MMAs issued, the first's sums under the second
        for j in range(first, n, 4):
            slot = (it + j) % STAGES
            mbarrier.wait(full.index(slot), ((it + j) // STAGES) & 1)
            s_a = warpgroup_mma(k_smem.index(slot), qt, zero, use_acc=False, is_async=True)
            if j + 2 < n:
                slot_b = (it + j + 2) % STAGES
                mbarrier.wait(full.index(slot_b), ((it + j + 2) // STAGES) & 1)
                s_b = warpgroup_mma(k_smem.index(slot_b), qt, zero, use_acc=False, is_async=True)
                done_a = warpgroup_mma_wait(1, deps=(s_a, ))  # the first retired, the second in flight
                mbarrier.arrive(empty.index(slot), count=1)
                _chunk_sums(done_a, j, t_first, c_mid, C, out, lse2, qk_scale, mma, G_PAD, ROWS, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
                done_b = warpgroup_mma_wait(0, deps=(s_b, ))
                mbarrier.arrive(empty.index(slot_b), count=1)
                _chunk_sums(done_b, j + 2, t_first, c_mid, C, out, lse2, qk_scale, mma, G_PAD, ROWS, BLOCK_C, CMP_BLOCK,
                            CMP_STRIDE)
            else:
                done_a = warpgroup_mma_wait(0, deps=(s_a, ))
                mbarrier.arrive(empty.index(slot), count=1)
                _chunk_sums(done_a, j, t_first, c_mid, C, out, lse2, qk_scale, mma, G_PAD, ROWS, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
    else:
        for j in range(first, n, 2):
            slot = (it + j) % STAGES
            mbarrier.wait(full.index(slot), ((it + j) // STAGES) & 1)
            s = warpgroup_mma(k_smem.index(slot), qt, zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s, ))
            mbarrier.arrive(empty.index(slot), count=1)
            _chunk_sums(s, j, t_first, c_mid, C, out, lse2, qk_scale, mma, G_PAD, ROWS, BLOCK_C, CMP_BLOCK, CMP_STRIDE)


@gluon.jit
def _score_tiles(a, HALF: gl.constexpr, G: gl.constexpr, G_PAD: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_C: gl.constexpr,
                 D: gl.constexpr, CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr,
                 PIPELINED: gl.constexpr):
    """A consumer over this program's tiles: its own copy of each tile's q (the next tile's copied
    by cp.async under this one's chunks), the rows' lse in log2 units (+inf on idle rows and rows
    that see nothing, so they add 0), then its share of the tile's chunks."""
    (q_smem, k_smem, full, empty, Q, K, LSE, SCORES, sq_b, sq_h, sq_t, sl_b, sl_h, ss_b, ss_h, ss_t, T0, T, C, HKV, B, n_t,
     qk_scale) = a
    ROWS: gl.constexpr = BLOCK_T * G_PAD
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, ROWS, 16])
    row_l: gl.constexpr = gl.SliceLayout(0, mma)
    r = gl.arange(0, ROWS, layout=row_l)
    n_tiles = n_t * HKV * B
    first = gl.program_id(0)
    step = gl.num_programs(0)
    b, h, t_first, n, c_mid, row0 = _tile_bounds(first, n_t, HKV, B, T0, T, C, BLOCK_T, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
    _copy_q_rows(Q, q_smem.index(2 * HALF), b, h, t_first, T, sq_b, sq_h, sq_t, 0, ROWS, G, G_PAD, BLOCK_T, D)
    async_copy.commit_group()
    it = 0
    k = 0
    for tile in range(first, n_tiles, step):
        b, h, t_first, n, c_mid, row0 = _tile_bounds(tile, n_t, HKV, B, T0, T, C, BLOCK_T, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
        async_copy.wait_group(0)  # this tile's q rows (this thread's copies), then the whole consumer's
        fence_async_shared()
        _partition_barrier()
        q = q_smem.index(2 * HALF + k % 2)
        if tile + step < n_tiles:  # the other buffer's last reader (tile k - 1) retired before the barrier
            nb, nh, nt_first, _, _, _ = _tile_bounds(tile + step, n_t, HKV, B, T0, T, C, BLOCK_T, BLOCK_C, CMP_BLOCK,
                                                     CMP_STRIDE)
            _copy_q_rows(Q, q_smem.index(2 * HALF + (k + 1) % 2), nb, nh, nt_first, T, sq_b, sq_h, sq_t, 0, ROWS, G, G_PAD,
                         BLOCK_T, D)
        async_copy.commit_group()
        t = t_first + r // G_PAD
        g = r % G_PAD
        lse = gl.load(LSE + b * sl_b + (h * G + g) * sl_h + t, mask=(g < G) & (t < T), other=float("-inf"))
        lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # LOG2E
        out = SCORES + b * ss_b + h * ss_h + ((t_first - T0) // BLOCK_T) * ss_t
        _score_chunks(q, lse2, t_first, k_smem, full, empty, it, n, c_mid, C, out, qk_scale, HALF, mma, G_PAD, ROWS,
                      STAGES, BLOCK_C, CMP_BLOCK, CMP_STRIDE, PIPELINED)
        it += n
        k += 1


@gluon.jit
def _scorer_low(a, G: gl.constexpr, G_PAD: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr,
                CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr, PIPELINED: gl.constexpr):
    _score_tiles(a, 0, G, G_PAD, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES, PIPELINED)


@gluon.jit
def _scorer_high(a, G: gl.constexpr, G_PAD: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr,
                 CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr, PIPELINED: gl.constexpr):
    _score_tiles(a, 1, G, G_PAD, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES, PIPELINED)


@gluon.jit
def _produce_k_tiles(a, G: gl.constexpr, G_PAD: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr,
                     CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr):
    """One warp: every chunk's K~ box of this program's tiles, in the consumers' order, into ring
    slot it % STAGES once the consumer of the slot's previous chunk released it."""
    (q_smem, k_smem, full, empty, Q, K, LSE, SCORES, sq_b, sq_h, sq_t, sl_b, sl_h, ss_b, ss_h, ss_t, T0, T, C, HKV, B, n_t,
     qk_scale) = a
    n_tiles = n_t * HKV * B
    it = 0
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        b, h, t_first, n, c_mid, row0 = _tile_bounds(tile, n_t, HKV, B, T0, T, C, BLOCK_T, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
        for i in range(n):
            slot = it % STAGES
            mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)  # fresh barriers read as phase 1 complete
            mbarrier.expect(full.index(slot), K.block_type.nbytes)
            tma.async_copy_global_to_shared(K, [row0 + i * BLOCK_C, 0], full.index(slot), k_smem.index(slot))
            it += 1


@gluon.jit
def _scores_persistent_kernel(
    Q, K, LSE, SCORES,
    sq_b, sq_h, sq_t, sl_b, sl_h, ss_b, ss_h, ss_t,
    T0, T, C, HKV, B, qk_scale,
    G: gl.constexpr, G_PAD: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr,
    CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr, PIPELINED: gl.constexpr,
    WORKER_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    """Lever 52: tile sums of tokens [T0, T) over one program per SM; tiles longest first.
    PIPELINED: each consumer keeps two chunks' MMAs in flight (``_score_chunks``)."""
    dtype: gl.constexpr = K.dtype
    ROWS: gl.constexpr = BLOCK_T * G_PAD
    q_smem = gl.allocate_shared_memory(dtype, [4, ROWS, D], gl.NVMMASharedLayout.get_default_for([ROWS, D], dtype))  # 2 per consumer
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_C, D], K.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)  # the slot's consumer releases it
    fence_async_shared()
    a = (q_smem, k_smem, full, empty, Q, K, LSE, SCORES, sq_b, sq_h, sq_t, sl_b, sl_h, ss_b, ss_h, ss_t, T0, T, C, HKV, B,
         gl.cdiv(T - T0, BLOCK_T), qk_scale)
    gl.warp_specialize([(_scorer_low, (a, G, G_PAD, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES, PIPELINED)),
                        (_scorer_high, (a, G, G_PAD, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES, PIPELINED)),
                        (_produce_k_tiles, (a, G, G_PAD, BLOCK_T, BLOCK_C, D, CMP_BLOCK, CMP_STRIDE, STAGES))],
                       [4, 1], [WORKER_REGS, 24])


def supported(q, k_cmp, lse, block_t: int, in_kernel_sum: int) -> bool:
    """Where this scorer runs: an sm_90 GPU, 16-bit q and K~, head_dim 64 or 128, a non-empty
    compressed axis, the compression forward's lse given, 16-byte aligned q rows (cp.async), and
    the whole tile summed in registers (block-shared sums of a multiple of its tokens)."""
    aligned = q.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in q.stride()[:-1])
    return (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9 and q.dtype in (torch.bfloat16, torch.float16)
            and k_cmp.dtype == q.dtype and q.shape[-1] in (64, 128) and k_cmp.shape[2] > 0 and q.stride(-1) == 1
            and lse is not None and aligned and in_kernel_sum == block_t)


def group_scores_sm90(q, k_cmp, lse, scores, block_size: int, stride: int, scale: float, t0: int, t1: int,
                      g_pad: int, block_t: int, pipelined: bool = False) -> None:
    """Tile sums of tokens [t0, t1) into ``scores`` [B, Hkv, R, C] (row = tile), as the padded
    Triton scorer writes them with SUM = BLOCK_T; ``supported`` must hold. ``pipelined``: two
    chunks' MMAs in flight per consumer (``_score_chunks``)."""
    B, Hq, _, D = q.shape
    Hkv, C = k_cmp.shape[1], k_cmp.shape[2]
    if g_pad * block_t != TUNING["rows"]:
        raise ValueError(f"the Gluon scorer takes {TUNING['rows']}-row tiles, got {block_t} tokens x {g_pad} head slots")
    k2 = k_cmp.contiguous().view(B * Hkv * C, D)
    tiles = triton.cdiv(t1 - t0, block_t) * Hkv * B
    programs = min(tiles, torch.cuda.get_device_properties(q.device).multi_processor_count)
    maxnreg, worker_regs = register_budget(pipelined)
    _scores_persistent_kernel[(programs,)](
        q, _descriptor(k2, TUNING["block_c"]), lse, scores,
        q.stride(0), q.stride(1), q.stride(2), lse.stride(0), lse.stride(1), scores.stride(0), scores.stride(1), scores.stride(2),
        t0, t1, C, Hkv, B, scale * LOG2E,
        G=Hq // Hkv, G_PAD=g_pad, BLOCK_T=block_t, BLOCK_C=TUNING["block_c"], D=D, CMP_BLOCK=block_size, CMP_STRIDE=stride,
        STAGES=TUNING["stages"], PIPELINED=pipelined, WORKER_REGS=worker_regs, num_warps=4, maxnreg=maxnreg,
    )

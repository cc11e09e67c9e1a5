"""The compression branch's forward for Hopper (sm_90) in Gluon, with the softmax overlapped with
the next chunk's QK~^T (NOTES Lever 46).

Why a second forward: the Triton kernel (``compression_attention._cmp_fwd_kernel``) waits on every
QK~^T before its softmax (sm_90 SASS: ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` after each, NOTES
session 17), so per 64-block step ~1,000 tensor-core clocks and ~600 issue clocks of softmax add
up instead of overlapping; Triton 3.6's sm_90 lowering offers no way to defer that wait. Gluon
(Triton's lower-level dialect, same compiler) exposes ``warpgroup_mma(..., is_async=True)`` and
``warpgroup_mma_wait(n)``, so each step here issues chunk j+1's QK~^T, runs chunk j's softmax while
the tensor cores work, then issues chunk j's P V~ (FlashAttention-3's intra-warpgroup pipelining).

Same tiling and semantics as the Triton forward: a program's ROWS rows are BLOCK_T tokens x the G
heads of kv head h, packed (row r = token t_first + r // G, head h*G + r % G); block c is visible
to token t iff c*s + l <= t + 1; rows that see nothing give 0 and lse -inf; logits in log2 units
(exp2), lse natural. K~/V~ chunks come by TMA into a STAGES-deep ring (mbarriers), from a
contiguous [B * Hkv * C, D] view: rows past this head's C belong to the next head (or read as 0
past the end) and are masked, like every chunk a tile's first token cannot see whole.

GPU-only (no interpreter for Gluon): the CPU tests run the Triton kernel; ``tests/test_triton_compression.py``
checks this one against the float64 reference on the GPU (bf16 and fp16; fp32 stays on the Triton kernel).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)

LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _load_chunk(K, V, k_smem, v_smem, bar_k, bar_v, row0, i, n, BLOCK_C: gl.constexpr, STAGES: gl.constexpr):
    """TMA copies of chunk i's K~ and V~ rows into ring slot i % STAGES (skipped past the last
    chunk), each arriving on its own barrier so the QK~^T need not wait for V~."""
    slot = i % STAGES
    ok = i < n
    mbarrier.expect(bar_k.index(slot), K.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(K, [row0 + i * BLOCK_C, 0], bar_k.index(slot), k_smem.index(slot), pred=ok)
    mbarrier.expect(bar_v.index(slot), V.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(V, [row0 + i * BLOCK_C, 0], bar_v.index(slot), v_smem.index(slot), pred=ok)


@gluon.jit
def _qk(q_smem, k_smem, bar_k, i, zero, STAGES: gl.constexpr):
    """Issue chunk i's logits Q K~^T (async) once its K~ has landed."""
    slot = i % STAGES
    mbarrier.wait(bar_k.index(slot), (i // STAGES) & 1)
    return warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)


@gluon.jit
def _softmax(s, m, l, c0, c_mid, t, C, qk_scale, s_layout: gl.constexpr, BLOCK_C: gl.constexpr,
             CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr):
    """Online softmax over chunk [c0, c0 + BLOCK_C) of raw logits s (the mask only from c_mid on,
    where some row cannot see the whole chunk): (p, rescale of the old state, max, sum), log2 units,
    the max taken before scaling (as ``tiles.online_max_sum``)."""
    if c0 >= c_mid:
        c = c0 + gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, s_layout))
        seen = (c[None, :] * CMP_STRIDE + CMP_BLOCK <= t[:, None] + 1) & (c < C)[None, :]
        s = gl.where(seen, s, float("-inf"))
    m_new = gl.maximum(m, gl.max(s, 1) * qk_scale)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m - m_safe)
    p = gl.exp2(s * qk_scale - m_safe[:, None])
    return p, alpha, m_new, l * alpha + gl.sum(p, 1)


@gluon.jit
def _cmp_fwd_sm90_kernel(
    Q, K, V, O, LSE,
    sq_b, sq_h, sq_t, so_b, so_h, so_t, sl_b, sl_h,
    T, C, HKV, qk_scale,
    G: gl.constexpr, BLOCK_T: gl.constexpr, ROWS: gl.constexpr, BLOCK_C: gl.constexpr, D: gl.constexpr,
    CMP_BLOCK: gl.constexpr, CMP_STRIDE: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    pid_t, h, b = gl.program_id(0), gl.program_id(1), gl.program_id(2)
    dtype: gl.constexpr = K.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_C, 16])
    o_layout: gl.constexpr = s_layout  # one MMA layout (N = BLOCK_C per wgmma): the row vectors need no conversion
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])  # 16-byte rows pieces

    # q rows (token, head) of the tile, by pointers (G heads of a token: no power-of-two TMA box)
    t_first = pid_t * BLOCK_T
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, io_layout))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, io_layout))
    t_io = t_first + r // G
    ok_io = (r < BLOCK_T * G) & (t_io < T)
    qh_io = h * G + r % G
    q = gl.load(Q + b * sq_b + qh_io[:, None] * sq_h + t_io[:, None] * sq_t + d[None, :], mask=ok_io[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(dtype, [ROWS, D], gl.NVMMASharedLayout.get_default_for([ROWS, D], dtype), q)

    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_C, D], K.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_C, D], V.layout)
    bar_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    bar_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bar_k.index(i), count=1)
        mbarrier.init(bar_v.index(i), count=1)
    fence_async_shared()  # q's store and the barriers' init, before the async proxy (TMA, wgmma) reads

    # chunks: every block the tile's last token sees (at least one, all masked, for tiles that see
    # nothing: output 0, lse -inf); unmasked below c_mid (blocks the first token sees whole)
    t_last = gl.minimum(t_first + BLOCK_T, T) - 1
    c_end = gl.minimum(gl.where(t_last + 1 >= CMP_BLOCK, (t_last + 1 - CMP_BLOCK) // CMP_STRIDE + 1, 0), C)
    n = gl.maximum(gl.cdiv(c_end, BLOCK_C), 1)
    c_first = gl.minimum(gl.where(t_first + 1 >= CMP_BLOCK, (t_first + 1 - CMP_BLOCK) // CMP_STRIDE + 1, 0), C)
    c_mid = c_first // BLOCK_C * BLOCK_C
    row0 = (b * HKV + h) * C
    for i in gl.static_range(STAGES):  # the ring full; step j refills chunk j-1's slot with chunk j-1 + STAGES
        _load_chunk(K, V, k_smem, v_smem, bar_k, bar_v, row0, i, n, BLOCK_C, STAGES)

    t_s = t_first + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout)) // G
    zero = gl.zeros([ROWS, BLOCK_C], gl.float32, s_layout)
    m = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([ROWS, D], gl.float32, o_layout)
    s = warpgroup_mma_wait(0, deps=(_qk(q_smem, k_smem, bar_k, 0, zero, STAGES), ))
    p, alpha, m, l = _softmax(s, m, l, 0, c_mid, t_s, C, qk_scale, s_layout, BLOCK_C, CMP_BLOCK, CMP_STRIDE)
    p = gl.convert_layout(p.to(dtype), p_layout)
    for j in range(1, n):
        # chunk j's QK~^T and chunk j-1's P V~ issued back to back; once the first retires, chunk
        # j's softmax runs on the CUDA cores while the tensor cores do the second. Nothing reads
        # the accumulator while its MMA is in flight (ptxas would serialise every wgmma, C7514).
        qk = _qk(q_smem, k_smem, bar_k, j, zero, STAGES)
        prev = (j - 1) % STAGES
        mbarrier.wait(bar_v.index(prev), ((j - 1) // STAGES) & 1)
        acc = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(qk, ))
        p_new, alpha, m, l = _softmax(s, m, l, j * BLOCK_C, c_mid, t_s, C, qk_scale, s_layout, BLOCK_C, CMP_BLOCK,
                                      CMP_STRIDE)
        p_new = gl.convert_layout(p_new.to(dtype), p_layout)
        # the softmax's results pass through the wait, so no scheduler sinks them below it
        acc, p, p_new, alpha, m, l = warpgroup_mma_wait(0, deps=(acc, p, p_new, alpha, m, l))
        # chunk j-1's slot is free (its QK~^T and P V~ retired): chunk j-1 + STAGES goes there
        _load_chunk(K, V, k_smem, v_smem, bar_k, bar_v, row0, j - 1 + STAGES, n, BLOCK_C, STAGES)
        acc = acc * alpha[:, None]  # (acc + P V~ of chunk j-1) x alpha_j
        p = p_new
    last = (n - 1) % STAGES
    mbarrier.wait(bar_v.index(last), ((n - 1) // STAGES) & 1)
    acc = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
    acc, p = warpgroup_mma_wait(0, deps=(acc, p))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bar_k.index(i))
        mbarrier.invalidate(bar_v.index(i))

    # epilogue: out = acc / l (0 where nothing was seen), natural lse; coalesced row stores
    seen = l > 0
    lse = gl.where(seen, (m + gl.log2(gl.where(seen, l, 1.0))) * LN2, float("-inf"))
    inv = gl.where(seen, 1.0 / gl.where(seen, l, 1.0), 0.0)
    out = gl.convert_layout((acc * inv[:, None]).to(dtype), io_layout)
    gl.store(O + b * so_b + qh_io[:, None] * so_h + t_io[:, None] * so_t + d[None, :], out, mask=ok_io[:, None])
    r_s = gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    ok_s = (r_s < BLOCK_T * G) & (t_s < T)
    gl.store(LSE + b * sl_b + (h * G + r_s % G) * sl_h + t_s, lse, mask=ok_s)


TUNING = {"rows": 128, "block_c": 64, "num_warps": 8, "stages": 3}


def supported(q, k_cmp) -> bool:
    """Where this forward runs: an sm_90 GPU (wgmma; sm_100's tensor cores take other
    instructions), 16-bit inputs (fp32 logits would need TF32 operands: the Triton kernel keeps
    them), head_dim 64, 128 or 256 (whole 64-wide wgmma N tiles of the one MMA layout), and a non-empty compressed axis."""
    return (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9 and q.dtype in (torch.bfloat16, torch.float16)
            and k_cmp.dtype == q.dtype and q.shape[-1] in (64, 128, 256) and k_cmp.shape[2] > 0
            and q.stride(-1) == 1)


def _descriptor(x2d, block_c: int):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = gl.NVMMASharedLayout.get_default_for([block_c, x2d.shape[1]], gl.bfloat16 if x2d.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor.from_tensor(x2d, [block_c, x2d.shape[1]], layout)


def compression_attention_fwd_sm90(q, k_cmp, v_cmp, block_size: int, stride: int, scale: float, tuning: dict | None = None):
    """(out [B, Hq, T, D] in q's dtype and layout, lse [B, Hq, T] fp32), as
    ``compression_attention.compression_attention_fwd``; ``supported(q, k_cmp)`` must hold."""
    if not supported(q, k_cmp):
        raise ValueError(f"compression_attention_fwd_sm90 needs an sm_90 GPU, 16-bit q/k~ and a non-empty compressed axis: "
                         f"q {tuple(q.shape)} {q.dtype} on {q.device}, k~ {tuple(k_cmp.shape)} {k_cmp.dtype}")
    tune = dict(TUNING, **(tuning or {}))
    B, Hq, T, D = q.shape
    Hkv, C = k_cmp.shape[1], k_cmp.shape[2]
    G = Hq // Hkv
    rows, block_c = tune["rows"], tune["block_c"]
    if G > rows:
        raise ValueError(f"a kv group of {G} heads does not fit a {rows}-row tile")
    block_t = rows // G
    # one [B * Hkv * C, D] row space for the TMA boxes (K~ is T/64 rows per head: a copy is ~us)
    k2 = k_cmp.contiguous().view(B * Hkv * C, D)
    v2 = v_cmp.contiguous().view(B * Hkv * C, D)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    if T == 0:
        return out, lse
    _cmp_fwd_sm90_kernel[(triton.cdiv(T, block_t), Hkv, B)](
        q, _descriptor(k2, block_c), _descriptor(v2, block_c), out, lse,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        T, C, Hkv, scale * 1.4426950408889634,
        G=G, BLOCK_T=block_t, ROWS=rows, BLOCK_C=block_c, D=D, CMP_BLOCK=block_size, CMP_STRIDE=stride,
        STAGES=tune["stages"], num_warps=tune["num_warps"],
    )
    return out, lse

"""Fused importance scores: compression logits -> lse -> probabilities -> sum over the G heads.

One program per (query tile, kv head, batch) holds a tile of BLOCK_T tokens x G heads as rows
(G padded to a power of two in registers, never in memory), loads its group's pooled keys K~ once
for all G heads, and makes two passes over the causally visible compressed blocks: the first
computes each row's log-sum-exp (online max/sum), the second p = exp(s - lse), sums it over the
group's heads and writes one fp32 score per (token, compressed block). The PyTorch scorer wrote
and re-read the per-head [Hq, T, C] probabilities ~8 times; this writes [Hkv, T, C] once.

Semantics are the reference's steps 1-2 (compression visibility i*s + l <= t + 1, natural-log
lse, -inf where nothing is visible). Runs natively on GPUs and under TRITON_INTERPRET=1 on CPU
(fp32 only there: the interpreter's bf16 dot is wrong, PITFALLS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 128  # rows (tokens x padded heads) per program: one 128-row MMA tile


@triton.jit
def _group_scores_kernel(
    Q, K, LSE, SCORES,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_c, sl_b, sl_h, ss_b, ss_h, ss_t,
    T0, T1, C, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    D: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    R: tl.constexpr = BLOCK_T * G_PAD
    r = tl.arange(0, R)
    t = T0 + pid_t * BLOCK_T + r // G_PAD
    g = r % G_PAD
    row_ok = (t < T1) & (g < G)
    d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + (h * G + g)[:, None] * sq_h + t[:, None] * sq_t + d[None, :], mask=row_ok[:, None], other=0.0)

    # Compressed blocks visible to the tile's last token (C semantics: keep the division non-negative).
    t_last = tl.minimum(T0 + pid_t * BLOCK_T + BLOCK_T - 1, T1 - 1)
    c_end = tl.where(t_last + 1 >= CMP_BLOCK, (t_last + 1 - CMP_BLOCK) // CMP_STRIDE + 1, 0)
    c_end = tl.minimum(c_end, C)

    m = tl.full([R], float("-inf"), tl.float32)
    s_sum = tl.zeros([R], tl.float32)
    for c0 in range(0, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        k = tl.load(K + b * sk_b + h * sk_h + c[:, None] * sk_c + d[None, :], mask=(c < C)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        visible = (c[None, :] * CMP_STRIDE + CMP_BLOCK <= t[:, None] + 1) & (c < C)[None, :] & row_ok[:, None]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_sum = s_sum * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new
    lse = tl.where(s_sum > 0, m + tl.log(s_sum), float("-inf"))
    tl.store(LSE + b * sl_b + (h * G + g) * sl_h + t, lse, mask=row_ok)

    lse_safe = tl.where(s_sum > 0, lse, 0.0)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # row of the scores chunk (token T0 + tok)
    for c0 in range(0, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        k = tl.load(K + b * sk_b + h * sk_h + c[:, None] * sk_c + d[None, :], mask=(c < C)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        visible = (c[None, :] * CMP_STRIDE + CMP_BLOCK <= t[:, None] + 1) & (c < C)[None, :] & row_ok[:, None]
        p = tl.where(visible, tl.exp(s - lse_safe[:, None]), 0.0)
        grouped = tl.sum(tl.reshape(p, (BLOCK_T, G_PAD, BLOCK_C)), 1)
        ptr = SCORES + b * ss_b + h * ss_h + tok[:, None] * ss_t + c[None, :]
        tl.store(ptr, grouped, mask=(T0 + tok < T1)[:, None] & (c < C)[None, :])


def compression_group_scores(
    q: torch.Tensor, k_cmp: torch.Tensor, block_size: int, stride: int, scale: float,
    t0: int = 0, t1: int | None = None, lse: torch.Tensor | None = None,
):
    """Group scores [B, Hkv, t1 - t0, C] fp32 of tokens [t0, t1) (sum over the G heads of the
    compression probabilities; 0 where invisible), and the compression lse [B, Hq, T] fp32
    (rows [t0, t1) written; pass ``lse`` to fill a caller's buffer chunk by chunk).

    q [B, Hq, T, D] the whole sequence (visibility uses absolute positions), k_cmp [B, Hkv, C, D].
    """
    B, Hq, T, D = q.shape
    t1 = T if t1 is None else t1
    Hkv, C = k_cmp.shape[1], k_cmp.shape[2]
    G = Hq // Hkv
    if q.stride(-1) != 1 or k_cmp.stride(-1) != 1:
        raise ValueError("compression_group_scores needs q and k_cmp contiguous in head_dim")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"compression_group_scores supports head_dim in 16..256 (powers of two), got {D}")
    g_pad = triton.next_power_of_2(G)
    block_t = max(1, ROWS // g_pad)
    scores = torch.zeros(B, Hkv, t1 - t0, C, device=q.device, dtype=torch.float32)
    if lse is None:
        lse = torch.full((B, Hq, T), float("-inf"), device=q.device, dtype=torch.float32)
    if t1 <= t0:
        return scores, lse
    grid = (triton.cdiv(t1 - t0, block_t), Hkv, B)
    _group_scores_kernel[grid](
        q, k_cmp, lse, scores,
        q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        lse.stride(0), lse.stride(1), scores.stride(0), scores.stride(1), scores.stride(2),
        t0, t1, C, scale,
        G=G, G_PAD=g_pad, BLOCK_T=block_t, BLOCK_C=64, D=D, CMP_BLOCK=block_size, CMP_STRIDE=stride,
        num_warps=8 if D >= 128 else 4,
    )
    return scores, lse

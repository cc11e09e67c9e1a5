"""Tile arithmetic shared by the compression-branch kernels (one definition of rows and visibility).

A program's ROWS rows (a power of two) are BLOCK_T consecutive tokens x G_PAD head slots of one kv
group: row r is token ``t_first + r // G_PAD``, head ``h * G + r % G_PAD``; slots >= G and rows
>= BLOCK_T * G_PAD are idle. Padded tiles (G_PAD the power of two >= G, ROWS = BLOCK_T * G_PAD)
keep BLOCK_T a power of two, which the selection kernels' tiles need; packed tiles (G_PAD = G,
BLOCK_T = ROWS // G) idle 2 of 128 rows for G = 7 instead of 16 (``rows_per_tile``). Compressed
block c is visible to token t iff c*s + l <= t + 1 (DESIGN.md).
"""

from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl

ROWS = 128  # rows (tokens x padded heads) per program: one 128-row MMA tile
LOG2E = 1.4426950408889634  # logits times this are in log2 units (exp2, the GPU's native exponential)
HEAD_DIMS = (16, 32, 64, 128, 256)  # power-of-two head dims the kernels are written for


def tuning_for(table: dict, kernel: str, q) -> dict:
    """A kernel's measured launch overrides (``table[kernel]``, None = keep the rule) for the shape
    they were measured at, 16-bit inputs at head_dim 128 (Q7B); other shapes keep each kernel's
    rule, since their shared-memory and register budgets differ."""
    if q.element_size() == 2 and q.shape[-1] == 128:
        return {k: v for k, v in table[kernel].items() if v is not None}
    return {}


def load_tuning_file(family: str, table: dict) -> None:
    """Overrides from the JSON file named by FLEXNSA_TUNING ({family: {kernel: {knob: value}}}),
    as written by ``python -m profiling.kernel_tuning``; unknown kernels or knobs are errors."""
    path = os.environ.get("FLEXNSA_TUNING")
    if not path:
        return
    with open(path) as f:
        wanted = json.load(f).get(family, {})
    for kernel, knobs in wanted.items():
        if kernel not in table or set(knobs) - set(table[kernel]):
            raise ValueError(f"FLEXNSA_TUNING {path}: unknown {family} kernel or knob in {kernel}: {knobs}")
        table[kernel].update(knobs)


def check_query(q, kernel: str) -> None:
    """Head dims the kernels are written for, and sizes their 32-bit element offsets can address
    (q, and its outputs, are the largest tensors a kernel indexes; an element offset >= 2^31
    would wrap silently)."""
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{kernel} supports head_dim in {HEAD_DIMS}, got {q.shape[-1]}")
    span = max(max_offset(q) + 1, q.numel())  # q's reach, and that of the outputs shaped like it
    if span > 2**31:
        raise ValueError(
            f"{kernel}: q {tuple(q.shape)} (strides {q.stride()}) spans {span} elements, beyond the kernels' "
            "32-bit offsets (2^31); split the batch"
        )


def max_offset(x: torch.Tensor) -> int:
    """The largest element offset a kernel computes into x (from its data pointer)."""
    return sum((n - 1) * s for n, s in zip(x.shape, x.stride()) if n > 0)


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels can index it, copied only when it must be: unit stride over head_dim and
    no gaps, the other dims in any order. A token-major [B, T, H, D] buffer seen as [B, H, T, D]
    (the model's q/k/v projections) runs as it is: the kernels take every other stride, and their
    outputs and gradients come back in that layout (no copies in or out, NOTES Lever 21)."""
    return x if x.stride(-1) == 1 and is_dense(x) else x.contiguous()


def is_dense(x: torch.Tensor) -> bool:
    """Some order of x's dims is contiguous (no gaps, no overlap)."""
    expected = 1
    for s, n in sorted((s, n) for n, s in zip(x.shape, x.stride()) if n > 1):
        if s != expected:
            return False
        expected *= n
    return True


def strides_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x with ref's strides (a copy only when they differ on a dim of size > 1): a kernel that
    indexes two tensors with one set of strides (q, o, dO, dQ; K and V) gets them that way."""
    if all(s == r for n, s, r in zip(x.shape, x.stride(), ref.stride()) if n > 1):
        return x
    return torch.empty_like(ref, dtype=x.dtype).copy_(x)


def check_given_lse(lse, q) -> None:
    """An lse handed to a scorer instead of computed (the compression branch's): [B, Hq, T] fp32
    with unit stride over tokens, as the kernels index it."""
    B, Hq, T = q.shape[:3]
    if lse.shape != (B, Hq, T) or lse.dtype != torch.float32 or lse.stride(-1) != 1:
        raise ValueError(f"lse must be [B, Hq, T] = {(B, Hq, T)} fp32 with unit stride, got {tuple(lse.shape)} {lse.dtype}")


def rows_per_tile(group: int, rows: int = ROWS, packed: bool = False) -> tuple[int, int]:
    """(G_PAD, BLOCK_T) for a kv group of ``group`` query heads in tiles of ``rows`` rows: padded
    (G_PAD a power of two) or packed (G_PAD = group, as many whole tokens as fit: NOTES Lever 19)."""
    g_pad = group if packed and group <= rows else triton.next_power_of_2(group)
    return g_pad, max(1, rows // g_pad)


def tma_ready(x) -> bool:
    """A [B, H, T, D] descriptor can cover x: a device with TMA, no empty dim (a descriptor's
    shape is positive), 16-byte aligned base and strides."""
    return has_tma(x.device) and x.numel() > 0 and x.data_ptr() % 16 == 0 and all(s * x.element_size() % 16 == 0 for s in x.stride()[:-1])


def has_tma(device: torch.device) -> bool:
    """TMA (the tensor memory accelerator) exists from Hopper (sm_90) on; before it a descriptor
    load does not compile, so those GPUs keep pointer loads. The CPU interpreter emulates it."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def box_operands(tensors, rows: int, consts: dict):
    """[B, H, T, D] tensors as the kernels take them: TMA descriptors whose box is ``rows``
    consecutive tokens of one head (a selected K/V block; one head's q/dO tile), or the tensors."""
    if not consts["TMA"]:
        return tuple(tensors)
    from triton.tools.tensor_descriptor import TensorDescriptor

    box = [1, 1, rows, consts["D"]]
    return tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), box) for x in tensors)


@triton.jit
def tile_rows(t_first, T, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr):
    """(token, head-in-group, valid) of each of the ROWS rows of the tile starting at ``t_first``."""
    r = tl.arange(0, ROWS)
    t = t_first + r // G_PAD
    g = r % G_PAD
    return t, g, (r < BLOCK_T * G_PAD) & (t < T) & (g < G)


@triton.jit
def row_offsets(b, h, t, g, s_b, s_h, s_t, G: tl.constexpr, D: tl.constexpr):
    """Element offsets [R, D] of each row (token t, head h*G + g) in a [B, Hq, T, D] tensor."""
    qh = h * G + g
    return b * s_b + qh[:, None] * s_h + t[:, None] * s_t + tl.arange(0, D)[None, :], qh


@triton.jit
def load_blocks(PTR, base, c, s_c, C, D: tl.constexpr):
    """Rows c of a [B, Hkv, C, D] tensor of pooled blocks (from ``base``, the (b, h) offset);
    rows past C read as 0."""
    return load_rows(PTR, base, c, c < C, s_c, D)


@triton.jit
def load_rows(PTR, base, rows, row_ok, s_t, D: tl.constexpr):
    """Rows ``rows`` of one head of a [B, H, T, D] tensor (from ``base``, the (b, h) offset);
    rows not ``row_ok`` read as 0."""
    return tl.load(PTR + base + rows[:, None] * s_t + tl.arange(0, D)[None, :], mask=row_ok[:, None], other=0.0)


@triton.jit
def load_block(X, base, b, h, blk, rows, row_ok, s_t, L: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """Rows blk*L .. blk*L + L - 1 of head h of a [B, H, T, D] tensor (a selected K/V block, one
    head's q or dO tile), [L, D]: ``load_box`` from row blk*L (rows outside [0, T) read as 0 by
    TMA, which covers blk = -1)."""
    return load_box(X, base, b, h, blk * L, rows, row_ok, s_t, L, D, TMA)


@triton.jit
def load_box(X, base, b, h, start, rows, row_ok, s_t, L: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """Rows start .. start + L - 1 of head h of a [B, H, T, D] tensor, [L, D]: by TMA (X a
    descriptor with an [L, D] box; rows outside [0, T) read as 0) or by pointers (X a pointer;
    ``rows`` = those positions, masked by ``row_ok``)."""
    if TMA:
        x = tl.reshape(X.load([b, h, start, 0]), (L, D))
    else:  # (not an early return: the code after one is compiled for descriptors too)
        x = load_rows(X, base, rows, row_ok, s_t, D)
    return x


@triton.jit
def visible_block_end(t_last, C, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """Number of compressed blocks visible to token ``t_last`` (C-style division kept >= 0)."""
    return tl.minimum(tl.where(t_last + 1 >= CMP_BLOCK, (t_last + 1 - CMP_BLOCK) // CMP_STRIDE + 1, 0), C)


@triton.jit
def full_chunks_end(t_first, C, BLOCK_C: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """End of the chunks of BLOCK_C blocks that every token >= t_first sees whole (no mask): the
    compression kernels and the scorer mask only the chunks after it."""
    c_full = visible_block_end(t_first, C, CMP_BLOCK, CMP_STRIDE)
    return c_full - c_full % BLOCK_C


@triton.jit
def visible(t, c, C, row_ok, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, BLOCKS_FIRST: tl.constexpr = False):
    """[rows, blocks] bool ([blocks, rows] when BLOCKS_FIRST): block c exists and is visible to
    the row's token t."""
    if BLOCKS_FIRST:  # (one return: Triton compiles every return of a constexpr branch, NOTES Lever 36)
        seen = (c[:, None] * CMP_STRIDE + CMP_BLOCK <= t[None, :] + 1) & (c < C)[:, None] & row_ok[None, :]
    else:
        seen = (c[None, :] * CMP_STRIDE + CMP_BLOCK <= t[:, None] + 1) & (c < C)[None, :] & row_ok[:, None]
    return seen


@triton.jit
def row_lse(q, K, b, h, k_base, sk_c, t, row_ok, c_end, C, scale,
            BLOCK_C: tl.constexpr, D: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, TMA: tl.constexpr):
    """Natural-log log-sum-exp of each row's visible compression logits (-inf where none),
    accumulated in log2 units by ``online_max_sum``, as ``softmax_step`` does (NOTES Lever 28).
    K~ chunks of kv head h by TMA (K a descriptor with a [BLOCK_C, D] box) or pointers."""
    m = tl.full([q.shape[0]], float("-inf"), tl.float32)
    s_sum = tl.zeros([q.shape[0]], tl.float32)
    qk_scale = scale * 1.4426950408889634  # LOG2E
    for c0 in range(0, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        k = load_box(K, k_base, b, h, c0, c, c < C, sk_c, BLOCK_C, D, TMA)
        qk = tl.where(visible(t, c, C, row_ok, CMP_BLOCK, CMP_STRIDE), tl.dot(q, tl.trans(k)), float("-inf"))
        m, s_sum, _, _ = online_max_sum(qk, qk_scale, m, s_sum)
    return tl.where(s_sum > 0, (m + tl.log2(s_sum)) * 0.6931471805599453, float("-inf"))


@triton.jit
def probs_t(k, q, lse2, t, c, C, row_ok, qk_scale, MASKED: tl.constexpr, CMP_BLOCK: tl.constexpr,
            CMP_STRIDE: tl.constexpr):
    """P^T [blocks, rows] = 2^(K~ Q^T * qk_scale - lse2) of compressed blocks c and the rows'
    tokens t (log2 units; lse2 +inf on rows that see nothing or are idle, as ``backward_lse``
    gives it, so those rows are 0 without a mask); the visibility mask only where some row
    cannot see the whole chunk (MASKED)."""
    p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
    if MASKED:
        p_t = tl.where(visible(t, c, C, row_ok, CMP_BLOCK, CMP_STRIDE, True), p_t, 0.0)
    return p_t


@triton.jit
def backward_lse(LSE, b, qh, t, row_ok, sl_b, sl_h):
    """Each row's forward lse (stored natural) in log2 units, as the kernels' logits are (scaled by
    log2 e for exp2); +inf where the row saw nothing, so 2^(s - lse) = 0 there."""
    lse = tl.load(LSE + b * sl_b + qh * sl_h + t, mask=row_ok, other=float("-inf"))
    lse = lse * 1.4426950408889634  # LOG2E (a jit function reads no Python globals)
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def head_tile(Q, DO, LSE, DELTA, b, qh, tile, T, sq_b, sq_h, sq_t, sl_b, sl_h,
              ROWS: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """What a head-major dK/dV step reads (NOTES Lever 36): tokens tile*ROWS .. + ROWS - 1 of
    head qh, their q and dO as one box each (TMA: Q and DO are descriptors), lse in log2 units
    (+inf on rows past T) and delta. -> (t, row_ok, q, dO, lse, delta)."""
    t = tile * ROWS + tl.arange(0, ROWS)
    row_ok = t < T
    base = b * sq_b + qh * sq_h
    q = load_block(Q, base, b, qh, tile, t, row_ok, sq_t, ROWS, D, TMA)
    do = load_block(DO, base, b, qh, tile, t, row_ok, sq_t, ROWS, D, TMA)
    return t, row_ok, q, do, backward_lse(LSE, b, qh, t, row_ok, sl_b, sl_h), load_delta(DELTA, b, qh, t, row_ok, sl_b, sl_h)


@triton.jit
def dkv_from_probs_t(p_t, q, do, v, delta, dk, dv):
    """dV += P^T dO and dK += dS^T Q (unscaled), dS = P (dO V^T - delta), from P^T [keys, rows]:
    P^T and dS^T are MMA accumulators fed to the next products from registers (no transpose
    through shared memory, NOTES Lever 36)."""
    dv += tl.dot(p_t.to(do.dtype), do)
    ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def add_partial(ptr, x, mask, RELAXED: tl.constexpr):
    """Atomically add a program's partial dK/dV into fp32 buffers that are read only after the
    kernel: RELAXED needs no ordering, so no fences and no returned value (sm_90: REDG, not
    ATOMG; NOTES Lever 43); else Triton's default acq_rel."""
    if RELAXED:
        tl.atomic_add(ptr, x, mask=mask, sem="relaxed")
    else:
        tl.atomic_add(ptr, x, mask=mask)


@triton.jit
def store_delta(O, DELTA, row_off, do, b, qh, t, row_ok, sl_b, sl_h):
    """delta = rowsum(dO * O) of the tile's rows (the softmax backward's correction), computed
    from the dO tile already in registers and stored for the dK/dV pass. O shares dO's strides.
    In PyTorch this was 4 fp32 passes over [B, Hq, T, D] per branch (NOTES Lever 15)."""
    o = tl.load(O + row_off, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + b * sl_b + qh * sl_h + t, delta, mask=row_ok)
    return delta


@triton.jit
def load_delta(DELTA, b, qh, t, row_ok, sl_b, sl_h):
    return tl.load(DELTA + b * sl_b + qh * sl_h + t, mask=row_ok, other=0.0)


@triton.jit
def online_max_sum(qk, qk_scale, m, s_sum):
    """The running (max, sum of 2^(s - max)) of each row after a tile of raw logits ``qk`` (-inf =
    hidden; s = qk * qk_scale in log2 units), with the rescale factor of the old state and the
    tile's 2^(s - max). The max is taken before scaling (scale > 0 and rounding is monotonic, so
    max(qk) * scale == max(qk * scale) bit for bit) and the scale folds into the exponent's FMA:
    one multiply per logit fewer (NOTES session 17). exp2 is the bare flush-to-zero ex2 (NOTES
    Lever 28: the compression forward 6.8 -> 5.0 ms against tl.exp)."""
    m_new = tl.maximum(m, tl.max(qk, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(qk * qk_scale - m_safe[:, None])
    return m_new, s_sum * alpha + tl.sum(p, 1), alpha, p


@triton.jit
def softmax_step(qk, qk_scale, m, s_sum, acc, v):
    """One online-softmax step over a tile of raw logits ``qk`` (-inf = hidden; qk_scale = scale *
    log2 e, so the softmax runs in log2 units) and its values ``v``: rescale the running (max, sum,
    accumulator) and add the tile."""
    m_new, s_sum, alpha, p = online_max_sum(qk, qk_scale, m, s_sum)
    return m_new, s_sum, acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def softmax_finish(m, s_sum, acc):
    """(output, natural-log lse) of the rows from ``softmax_step``'s log2-unit state; rows that saw
    nothing give 0 and -inf."""
    seen = s_sum > 0
    safe_sum = tl.where(seen, s_sum, 1.0)
    out = tl.where(seen[:, None], acc / safe_sum[:, None], 0.0)
    lse = (m + tl.log2(safe_sum)) * 0.6931471805599453  # log2 units -> natural log
    return out, tl.where(seen, lse, float("-inf"))


@triton.jit
def store_softmax(m, s_sum, acc, O, LSE, b, h, t, g, qh, row_ok, so_b, so_h, so_t, sl_b, sl_h,
                  G: tl.constexpr, D: tl.constexpr):
    """The forwards' epilogue: ``softmax_finish``'s output in O's dtype at each row's (token t,
    head h*G + g) and its natural lse at (qh, t); rows not ``row_ok`` are not written. Returns the
    stored (rounded) output and its offsets, for an epilogue that reads it on."""
    out, lse = softmax_finish(m, s_sum, acc)
    o_off, _ = row_offsets(b, h, t, g, so_b, so_h, so_t, G, D)
    out = out.to(O.dtype.element_ty)
    tl.store(O + o_off, out, mask=row_ok[:, None])
    tl.store(LSE + b * sl_b + qh * sl_h + t, lse, mask=row_ok)
    return out, o_off

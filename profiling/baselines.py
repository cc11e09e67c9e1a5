"""Same-run baselines: dense causal SDPA with GQA (flash backend), fla's parallel_nsa, and fla's
compression branch + top-n alone (``fla_cmp``: the work of our compression + scores_topk stages)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .measure import Shape, _with_backward, random_inputs
from .timing import first_call_s, median_ms, peak_memory_mb


def sdpa_causal(q, k, v):
    """Dense causal GQA attention; flash on CUDA (PyTorch picks the CPU kernel on CPU)."""
    if q.device.type == "cuda":
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def measure_sdpa(shape: Shape, seq_len: int, mode: str, *, seed: int = 0, warmup_ms=25, rep_ms=100) -> dict:
    backward = mode == "fwd+bwd"
    q, k, v, _ = random_inputs(shape, seq_len, seed, backward)
    grad_out = torch.randn_like(q)
    with torch.set_grad_enabled(backward):
        fn = _with_backward(lambda: sdpa_causal(q, k, v), grad_out, backward)
        first_call_s(fn, shape.device)
        ms = median_ms(fn, shape.device, grad_to_none=[q, k, v], warmup_ms=warmup_ms, rep_ms=rep_ms)
        peak = peak_memory_mb(fn, shape.device)
    return {"name": "sdpa", "mode": mode, "seq_len": seq_len, "total_ms": ms, "peak_mb": peak}


def fla_version() -> str | None:
    try:
        import fla

        return getattr(fla, "__version__", "unknown")
    except Exception:
        return None


FLA_GROUP = 16  # fla needs a power-of-two group >= 16: each kv group's heads are padded to 16


def pad_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, T, Hkv*G, ...] -> [B, T, Hkv*16, ...]: each group's heads first, zeros after."""
    B, T, H = x.shape[:3]
    grouped = x.reshape(B, T, kv_heads, H // kv_heads, *x.shape[3:])
    padded = x.new_zeros(B, T, kv_heads, FLA_GROUP, *x.shape[3:])
    padded[:, :, :, : H // kv_heads] = grouped
    return padded.flatten(2, 3)


def fla_nsa(q, k, v, gates, block_size: int, num_selected: int):
    """fla ``parallel_nsa`` as VideoNSA runs it (cmp + top-n + selection, no window), with the
    heads padded *per group* (zero queries and gates in the padding; a zero query adds the same
    mass to every visible block, so it does not change any group's top-n).
    q [B, Hq, T, D], k/v [B, Hkv, T, D], gates [B, T, Hq, 3] -> [B, Hq, T, D]."""
    from fla.ops.nsa import parallel_nsa

    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g_cmp, g_slc = pad_groups(gates[..., :2], Hkv).unbind(-1)
    out = parallel_nsa(
        pad_groups(q.transpose(1, 2), Hkv), k.transpose(1, 2), v.transpose(1, 2), g_cmp=g_cmp, g_slc=g_slc,
        block_indices=None, block_counts=num_selected, block_size=block_size, window_size=0, scale=D**-0.5,
    )
    return out.unflatten(2, (Hkv, FLA_GROUP))[:, :, :, : Hq // Hkv].flatten(2, 3).transpose(1, 2)


def fla_compression_top_n(q, k, v, block_size: int, num_selected: int):
    """fla's compression branch and block selection as ``parallel_nsa`` runs them: mean pooling,
    ``parallel_nsa_compression`` (output + lse), ``parallel_nsa_topk`` (its 1 initial + 2 local
    forced blocks). Heads padded per group as in ``fla_nsa``; returns the compressed-attention
    output [B, Hq, T, D] (the indices are computed, not returned: top-n has no gradient)."""
    from fla.ops.nsa.compression import parallel_nsa_compression
    from fla.ops.nsa.parallel import parallel_nsa_topk
    from fla.ops.utils.pooling import mean_pooling

    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    q_pad = pad_groups(q.transpose(1, 2), Hkv)
    k_cmp, v_cmp = (mean_pooling(x.transpose(1, 2), block_size) for x in (k, v))
    out, lse = parallel_nsa_compression(q_pad, k_cmp, v_cmp, TK=T, block_size=block_size, scale=D**-0.5)
    parallel_nsa_topk(q_pad, k_cmp, TK=T, lse=lse, block_counts=num_selected, block_size=block_size, scale=D**-0.5)
    return out.unflatten(2, (Hkv, FLA_GROUP))[:, :, :, : Hq // Hkv].flatten(2, 3).transpose(1, 2)


FLA_FUNCTIONS = {"fla": fla_nsa, "fla_cmp": fla_compression_top_n}


def measure_fla(shape: Shape, seq_len: int, mode: str, block_size: int, num_selected: int, *, name: str = "fla", seed: int = 0, warmup_ms=25, rep_ms=100) -> dict:
    """``name``: "fla" (the whole parallel_nsa) or "fla_cmp" (its compression + top-n only)."""
    backward = mode == "fwd+bwd"
    q, k, v, gates = random_inputs(shape, seq_len, seed, backward)
    grad_out = torch.randn_like(q)
    run = FLA_FUNCTIONS[name]
    forward = (lambda: run(q, k, v, gates, block_size, num_selected)) if name == "fla" else (lambda: run(q, k, v, block_size, num_selected))
    with torch.set_grad_enabled(backward):
        fn = _with_backward(forward, grad_out, backward)
        first_call_s(fn, shape.device)  # autotuning happens here
        ms = median_ms(fn, shape.device, grad_to_none=[q, k, v, gates], warmup_ms=warmup_ms, rep_ms=rep_ms)
        peak = peak_memory_mb(fn, shape.device)
    return {"name": name, "mode": mode, "seq_len": seq_len, "total_ms": ms, "peak_mb": peak}

"""Input checks shared by every backend: clear errors naming the parameter at fault."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import NSAConfig


@dataclass(frozen=True)
class NSAShape:
    batch: int
    q_heads: int
    kv_heads: int
    seq_len: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads


def check_nsa_inputs(q, k, v, gates, config: NSAConfig) -> NSAShape:
    """Validate shapes, dtypes and devices (always) and values (when ``config.check_inputs``).

    NaN/inf policy: with ``check_inputs`` (default) non-finite q/k/v/gates raise ValueError;
    without it they propagate to the output as in any attention kernel.
    """
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be a flexnsa.NSAConfig, got {type(config).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v), ("gates", gates)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, T, D], got {tuple(t.shape)}")
    B, Hq, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B or Tk != T or Dk != D:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, seq_len or head_dim"
        )
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if gates.shape != (B, T, Hq, 3):
        raise ValueError(f"gates must have shape [B, T, Hq, 3] = {(B, T, Hq, 3)}, got {tuple(gates.shape)}")
    for name, t in (("k", k), ("v", v), ("gates", gates)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not q.is_floating_point():
        raise ValueError(f"q/k/v/gates must be floating point, got {q.dtype}")
    if D == 0 or B == 0 or Hq == 0:
        raise ValueError(f"q has an empty dimension: shape {tuple(q.shape)}")
    if config.gate_prune_epsilon and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, gates)):
        raise ValueError(
            "NSAConfig.gate_prune_epsilon is an inference option: pruning drops the selection branch "
            "where its gates are small, and with it that branch's gradient; run under torch.no_grad() "
            "or set it to 0 for training"
        )
    if config.check_inputs and T > 0:
        with torch.no_grad():
            for name, t in (("q", q), ("k", k), ("v", v), ("gates", gates)):
                if not torch.isfinite(t).all():
                    raise ValueError(f"{name} contains NaN or inf")
            if gates.min() < 0 or gates.max() > 1:
                raise ValueError(
                    "gates must lie in [0, 1] (apply the sigmoid gate first; NSAAttention does)"
                )
    return NSAShape(B, Hq, Hkv, T, D)

"""FLOP counts and the time floors they imply (METHOD.md: count before you measure).

Attention on S keys costs 4*D FLOPs per (query head, key) forward (QK^T and PV, 2 each);
backward does 2.5x that (dQ, dK, dV, and the recomputed QK^T), so fwd+bwd = 3.5x forward.
"""

from __future__ import annotations

import numpy as np

from flexnsa import NSAConfig

BACKWARD_FLOP_RATIO = 2.5


def nsa_keys_per_query(seq_len: int, config: NSAConfig) -> dict[str, float]:
    """Average keys attended per query token in each branch (exact for the config's rules)."""
    t = np.arange(seq_len, dtype=np.int64)
    cmp = np.clip((t + 1 - config.block_size) // config.stride + 1, 0, None)
    cur = t // config.select_block_size
    n_eff = np.minimum(config.num_selected, cur + 1)
    # n_eff blocks of l' tokens, minus the future part of the current block.
    slc = n_eff * config.select_block_size - (config.select_block_size - 1 - t % config.select_block_size)
    win = np.minimum(config.window, t + 1)
    return {"cmp": float(cmp.mean()), "slc": float(slc.mean()), "win": float(win.mean())}


def nsa_forward_flops(seq_len: int, q_heads: int, head_dim: int, config: NSAConfig, batch: int = 1) -> float:
    keys = sum(nsa_keys_per_query(seq_len, config).values())
    return 4.0 * head_dim * q_heads * seq_len * keys * batch


def dense_causal_forward_flops(seq_len: int, q_heads: int, head_dim: int, batch: int = 1) -> float:
    return 4.0 * head_dim * q_heads * seq_len * (seq_len + 1) / 2 * batch


def floor_ms(flops: float, tflops: float | None) -> float | None:
    return None if not tflops else flops / (tflops * 1e12) * 1e3


def mode_flops(forward_flops: float, mode: str) -> float:
    return forward_flops * (1 + BACKWARD_FLOP_RATIO) if mode == "fwd+bwd" else forward_flops

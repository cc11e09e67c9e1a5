"""The functional NSA op: one entry point, the backend chosen by the config."""

from __future__ import annotations

import torch
from torch import nn

from .config import NSAConfig
from .output import NSAOutput


def nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    config: NSAConfig | None = None,
    *,
    compressors: tuple[nn.Module, nn.Module] | None = None,
    return_branches: bool = False,
) -> torch.Tensor | NSAOutput:
    """Native Sparse Attention over one causal sequence (a video span).

    q [B, Hq, T, D]; k, v [B, Hkv, T, D] (after RoPE); gates [B, T, Hq, 3] in [0, 1], order
    (cmp, slc, win). Returns [B, Hq, T, D], or an :class:`NSAOutput` with every branch, the
    selected blocks and the compression lse when ``return_branches``. ``compressors`` are the
    (key, value) MLPs for ``compression='mlp'``.
    """
    config = NSAConfig() if config is None else config
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be a flexnsa.NSAConfig, got {type(config).__name__}")
    if config.backend == "reference":
        from .reference import nsa_reference

        result = nsa_reference(q, k, v, gates, config, compressors=compressors)
    else:
        from .backends.flex import nsa_flex

        result = nsa_flex(q, k, v, gates, config, compressors=compressors, branches=return_branches)
    return result if return_branches else result.out

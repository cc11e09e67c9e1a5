"""What an NSA backend returns when asked for its branches."""

from __future__ import annotations

from typing import NamedTuple

import torch


class NSAOutput(NamedTuple):
    """Gated output plus every intermediate a backend must agree on.

    out, cmp, slc, win: [B, Hq, T, D] (cmp/slc/win ungated).
    selected: [B, Hkv, T, num_selected] int64 selection-block ids per token, ascending, padded
        with -1 (block-shared mode repeats a tile's selection on each of its tokens).
    cmp_lse: [B, Hq, T] float32 natural-log log-sum-exp of the compression scores (-inf where
        no compressed block is visible yet).
    """

    out: torch.Tensor
    cmp: torch.Tensor
    slc: torch.Tensor
    win: torch.Tensor
    selected: torch.Tensor
    cmp_lse: torch.Tensor

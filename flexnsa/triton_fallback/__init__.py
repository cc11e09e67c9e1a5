"""Triton kernels for the compression branch (compressed attention with lse and backward;
fused importance scores), GQA-native, and the switch that picks them.

Kernels run natively on GPUs and under TRITON_INTERPRET=1 on CPU (fp32 there: the interpreter's
bf16 dot is wrong). A per-token selection kernel is planned (issue 7 lever).
"""

from __future__ import annotations

import os

import torch


def _triton_allowed(config, device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "NSAConfig.compression_kernel='triton' on CPU needs the Triton interpreter "
            "(TRITON_INTERPRET=1 set before flexnsa is imported); use 'torch' or 'auto'"
        )
    return True


def use_triton_scorer(config, device: torch.device) -> bool:
    """Fused importance scores: 'auto' on CUDA and 'triton' anywhere (interpreter on CPU)."""
    kind = config.compression_kernel
    if kind == "torch" or (kind == "auto" and device.type != "cuda"):
        return False
    return _triton_allowed(config, device)


def use_triton_compression_attention(config, device: torch.device) -> bool:
    """Triton compressed attention: only with compression_kernel='triton' for now. It is
    GPU-validated for head_dim <= 32; at head_dim 128 its first H100 run exceeded shared memory
    (fixed by one pipeline stage and 32-wide tiles, not yet re-run on a GPU), so 'auto' keeps
    FlexAttention for this branch."""
    return config.compression_kernel == "triton" and _triton_allowed(config, device)

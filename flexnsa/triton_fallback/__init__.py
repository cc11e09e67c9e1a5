"""Triton kernels for the compression branch (compressed attention with lse and backward;
fused importance scores), GQA-native, and the switch that picks them.

Kernels run natively on GPUs and under TRITON_INTERPRET=1 on CPU (fp32 there: the interpreter's
bf16 dot is wrong). A per-token selection kernel is planned (issue 7 lever).
"""

from __future__ import annotations

import os

import torch


def use_triton_kernels(config, device: torch.device) -> bool:
    """NSAConfig.compression_kernel resolved for a device; never a silent switch."""
    if config.compression_kernel == "torch" or (config.compression_kernel == "auto" and device.type != "cuda"):
        return False
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "NSAConfig.compression_kernel='triton' on CPU needs the Triton interpreter "
            "(TRITON_INTERPRET=1 set before flexnsa is imported); use 'torch' or 'auto'"
        )
    return True

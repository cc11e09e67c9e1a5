"""Triton kernels for the compression branch (compressed attention with lse and backward;
fused importance scores) and the selection branch, GQA-native, and the switches that pick them.

Kernels run natively on GPUs and under TRITON_INTERPRET=1 on CPU (fp32 there: the interpreter's
bf16 dot is wrong). Modules: ``tiles`` (shared row/visibility arithmetic), ``compression_scores``
(group scores for the chunked scorer), ``selection_top_n`` (fused scores + top-n),
``compression_attention`` (forward with lse, backward), ``selection_attention`` (the selection
branch: selected-block attention, forward with lse, backward over reverse block lists).
"""

from __future__ import annotations

import os

import torch


def _wants_triton(config, field: str, other: str, device: torch.device) -> bool:
    """``config.<field>``: 'triton' anywhere (the interpreter on CPU), 'auto' on CUDA, ``other`` never."""
    kind = getattr(config, field)
    if kind == other or (kind == "auto" and device.type != "cuda"):
        return False
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"NSAConfig.{field}='triton' on CPU needs the Triton interpreter "
            f"(TRITON_INTERPRET=1 set before flexnsa is imported); use 'auto' or '{other}'"
        )
    return True


def use_triton_scorer(config, device: torch.device) -> bool:
    """Fused importance scores: 'auto' on CUDA and 'triton' anywhere (interpreter on CPU)."""
    return _wants_triton(config, "compression_kernel", "torch", device)


def use_triton_compression_attention(config, device: torch.device) -> bool:
    """Triton compressed attention: 'auto' on CUDA and 'triton' anywhere. FlexAttention's
    backward starves on the short compressed key axis (one program per kv block), which the
    Triton backward's split query axis avoids (profiling/NOTES.md)."""
    return use_triton_scorer(config, device)


def use_triton_selection(config, device: torch.device) -> bool:
    """Triton selected-block attention: 'auto' on CUDA and 'triton' anywhere (interpreter on CPU)."""
    return _wants_triton(config, "selection_kernel", "flex", device)


# 'auto' runs the window on the Triton kernels from this length on (NOTES Lever 33): at 128K its
# stage is 16% faster than FlexAttention's, at 32K the op is even; at 8K the eager op is launch-
# bound and the Triton window's host work (two custom-op calls, the window's reverse lists, six
# TMA descriptors) measured 2.95 ms per fwd+bwd against FlexAttention's 0.73 ms.
WINDOW_TRITON_FROM = 16384


def use_triton_window(config, device: torch.device, seq_len: int) -> bool:
    """The window on the Triton selected-block kernels: 'triton' anywhere (interpreter on CPU),
    'auto' on CUDA from WINDOW_TRITON_FROM tokens on; FlexAttention otherwise (NSAConfig.window_kernel)."""
    if config.window_kernel == "auto" and seq_len < WINDOW_TRITON_FROM:
        return False
    return _wants_triton(config, "window_kernel", "flex", device)


MAX_SELECTED = 128  # the fused top-n keeps a power of two >= n keys per row


def fused_top_n_supported(config) -> bool:
    """The geometry the fused scores + top-n kernel covers (VideoNSA's): l = s = l', a
    power-of-two selection tile (1 per token), n <= MAX_SELECTED."""
    tile = config.select_query_tile if config.selection == "block_shared" else 1
    return (
        config.block_size == config.stride == config.select_block_size
        and tile & (tile - 1) == 0
        and config.num_selected <= MAX_SELECTED
    )

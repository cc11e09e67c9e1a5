"""The compression function phi: pooled keys/values of (possibly overlapping) token blocks.

Block i covers tokens [i*stride, i*stride + block_size); only whole blocks are pooled.
``mean`` is what VideoNSA and fla use; ``mlp`` is the NSA paper's learnable phi (an MLP over the
flattened block plus an intra-block position embedding), shared across heads.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import NSAConfig
from .init_rules import COMPRESSOR_POS_STD
from .triton_fallback.tiles import is_dense


def block_view(x: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, C, block_size, D], a strided view (no copy)."""
    return x.unfold(2, block_size, stride).transpose(-1, -2)


def mean_pool(x: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, C, D]: mean of each whole block (fp32 accumulation).

    Non-overlapping blocks use a reshape (its backward is a broadcast); unfold's backward is a
    generic scatter, ~30x the forward on an H200 at 16K tokens.
    """
    B, H, T, D = x.shape
    if T < block_size:
        return x.new_zeros(B, H, 0, D)
    if stride == block_size:
        return BlockMean.apply(x, block_size)
    return block_view(x, block_size, stride).mean(dim=-2, dtype=torch.float32).to(x.dtype)


class BlockMean(torch.autograd.Function):
    """Mean of each whole non-overlapping block, [B, H, T, D] -> [B, H, T // l, D], whose backward
    writes dx in one pass, in x's layout. Autograd's mean backward divided a full-size fp32
    broadcast and then copied it to x's dtype: two passes (pooling fwd+bwd of k and v at 128K on an
    H200: 0.63 -> 0.50 ms, NOTES session 16). Same values: each row of dx is the block's grad / l
    rounded to x's dtype."""

    @staticmethod
    def forward(ctx, x, block_size):
        C = x.shape[2] // block_size
        ctx.x_meta = (x.shape, x.stride() if is_dense(x) else None, x.dtype)  # dx in x's layout where it is dense
        ctx.block_size = block_size
        blocks = x[:, :, : C * block_size].unflatten(2, (C, block_size))
        return blocks.mean(dim=-2, dtype=torch.float32).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        shape, stride, dtype = ctx.x_meta
        l, C = ctx.block_size, grad.shape[2]
        dx = grad.new_empty(shape, dtype=dtype) if stride is None else torch.empty_strided(shape, stride, dtype=dtype, device=grad.device)
        per_row = (grad.float() / l).to(dtype)
        dx[:, :, : C * l].unflatten(2, (C, l)).copy_(per_row.unsqueeze(3).expand(*per_row.shape[:3], l, per_row.shape[3]))
        dx[:, :, C * l :].zero_()  # tokens after the last whole block
        return dx, None


class MLPCompressor(nn.Module):
    """phi(block) = W2 GELU(W1 flatten(block + pos)), one per tensor (keys or values)."""

    def __init__(self, block_size: int, head_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or head_dim
        self.block_size = block_size
        self.pos = nn.Parameter(torch.randn(block_size, head_dim) * COMPRESSOR_POS_STD)
        self.fc1 = nn.Linear(block_size * head_dim, hidden)
        self.fc2 = nn.Linear(hidden, head_dim)

    def forward(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        if x.shape[-1] != self.pos.shape[-1]:
            raise ValueError(
                f"MLPCompressor built for head_dim {self.pos.shape[-1]}, got {x.shape[-1]}"
            )
        B, H, T, D = x.shape
        if T < self.block_size:
            return x.new_zeros(B, H, 0, D)
        blocks = block_view(x, self.block_size, stride) + self.pos.to(x.dtype)
        flat = blocks.reshape(B, H, blocks.shape[2], self.block_size * D)
        return self.fc2(nn.functional.gelu(self.fc1(flat)))


def compress_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    config: NSAConfig,
    compressors: tuple[nn.Module, nn.Module] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled keys and values [B, Hkv, C, D] according to ``config.compression``."""
    if config.compression == "mean":
        if compressors is not None:
            raise ValueError("compressors were given but NSAConfig.compression is 'mean'")
        return mean_pool(k, config.block_size, config.stride), mean_pool(
            v, config.block_size, config.stride
        )
    if compressors is None:
        raise ValueError(
            "NSAConfig.compression='mlp' needs compressors=(key_mlp, value_mlp) "
            "(flexnsa.MLPCompressor modules, held by flexnsa.NSAAttention)"
        )
    compress_k, compress_v = compressors
    return compress_k(k, config.stride), compress_v(v, config.stride)

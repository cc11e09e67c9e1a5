"""nn.Module side: the VideoNSA gate MLP and NSAAttention (gates + optional MLP phi + the op)."""

from __future__ import annotations

import torch
from torch import nn

from .compression import MLPCompressor
from .config import NSAConfig
from .init_rules import apply_rules, gate_projection_rules
from .ops import nsa_attention


def gate_values(hidden_states: torch.Tensor, g_proj_1: nn.Module, g_proj_2: nn.Module, num_heads: int, temperature: float):
    """The VideoNSA gate: sigmoid(g_proj_2(GELU(g_proj_1(x))) / temperature) as [B, T, Hq, 3]."""
    B, T, _ = hidden_states.shape
    logits = g_proj_2(nn.functional.gelu(g_proj_1(hidden_states)))
    return torch.sigmoid(logits.view(B, T, num_heads, 3) / temperature)


class NSAGates(nn.Module):
    """g = sigmoid(g_proj_2(GELU(g_proj_1(x))) / temperature), viewed [B, T, Hq, 3].

    Parameter names match the VideoNSA release (``g_proj_1``, ``g_proj_2``) for checkpoint
    compatibility. g_proj_2 starts at zero so every gate starts at exactly 0.5.
    """

    def __init__(self, hidden_size: int, num_heads: int, temperature: float = 0.3):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = temperature
        self.g_proj_1 = nn.Linear(hidden_size, hidden_size)
        self.g_proj_2 = nn.Linear(hidden_size, 3 * num_heads)
        for name in ("g_proj_1", "g_proj_2"):
            apply_rules(getattr(self, name), gate_projection_rules(name, getattr(self, name)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gate_values(hidden_states, self.g_proj_1, self.g_proj_2, self.num_heads, self.temperature)


class NSAAttention(nn.Module):
    """Gate MLP (+ MLP compressors when ``compression='mlp'``) around :func:`nsa_attention`.

    forward(hidden_states [B, T, hidden], q [B, Hq, T, D], k, v [B, Hkv, T, D]) -> [B, Hq, T, D].
    The q/k/v/o projections and RoPE stay with the host model (e.g. Qwen2.5-VL's attention).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, config: NSAConfig):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.config = config
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.gates = NSAGates(hidden_size, num_heads, config.gate_temperature)
        if config.compression == "mlp":
            hidden = config.compression_mlp_hidden
            self.compress_k = MLPCompressor(config.block_size, head_dim, hidden)
            self.compress_v = MLPCompressor(config.block_size, head_dim, hidden)

    @property
    def compressors(self):
        return (self.compress_k, self.compress_v) if self.config.compression == "mlp" else None

    def forward(self, hidden_states, q, k, v, *, return_branches: bool = False):
        if q.shape[1] != self.num_heads or k.shape[1] != self.num_kv_heads or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"NSAAttention built for {self.num_heads} q heads, {self.num_kv_heads} kv heads, "
                f"head_dim {self.head_dim}; got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        gates = self.gates(hidden_states).to(q.dtype)
        return nsa_attention(
            q, k, v, gates, self.config, compressors=self.compressors, return_branches=return_branches
        )

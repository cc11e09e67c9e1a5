"""How the parameters flexnsa adds start, stated once as data.

The modules apply these rules when they are built, and ``train/init.py`` applies the same rules
shard by shard to a model built on the meta device, so the two cannot drift apart. A rule is
``("uniform", bound)``, ``("normal", std)`` or ``("fill", value)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

COMPRESSOR_POS_STD = 0.02  # MLPCompressor's intra-block position embedding


def linear_default_rules(linear: nn.Linear) -> dict[str, tuple[str, float]]:
    """nn.Linear's own init: weight and bias ~ U(+-1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(linear.in_features)
    return {"weight": ("uniform", bound), "bias": ("uniform", bound)}


def gate_projection_rules(name: str, linear: nn.Linear) -> dict[str, tuple[str, float]]:
    """VideoNSA's gate MLP: ``g_proj_1`` nn.Linear's default weight and a zero bias; ``g_proj_2``
    all zero, so every gate starts at sigmoid(0) = 0.5."""
    if name == "g_proj_2":
        return {"weight": ("fill", 0.0), "bias": ("fill", 0.0)}
    if name == "g_proj_1":
        return {"weight": linear_default_rules(linear)["weight"], "bias": ("fill", 0.0)}
    raise ValueError(f"not a gate projection: {name!r}")


@torch.no_grad()
def fill_by_rule(tensor: torch.Tensor, kind: str, value: float, generator: torch.Generator | None = None) -> None:
    """Fill ``tensor`` in place by one rule (train/init.py calls it on each rank's local shard)."""
    if kind == "uniform":
        tensor.uniform_(-value, value, generator=generator)
    elif kind == "normal":
        tensor.normal_(0.0, value, generator=generator)
    elif kind == "fill":
        tensor.fill_(value)
    else:
        raise ValueError(f"unknown init rule {kind!r}")


def apply_rules(module: nn.Module, rules: dict[str, tuple[str, float]]) -> None:
    """Fill ``module``'s own parameters in place by their rules."""
    for key, (kind, value) in rules.items():
        fill_by_rule(getattr(module, key), kind, value)

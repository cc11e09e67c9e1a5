"""Random weights for a model built on the meta device, initialised shard by shard after FSDP2.

``model.init_device = "meta"`` builds the model with no storage (an 8B-parameter model costs no
host memory), ``fully_shard`` splits it, ``to_empty`` gives each rank storage for its own shards
only, and :func:`init_weights` fills them in place. Each rank draws its shards from its own
generator (seed, rank), so values depend on the world size; the distributions are the model's:

- ``nn.Linear`` / ``nn.Conv3d`` weights ~ N(0, initializer_range), biases 0 (Hugging Face's
  ``_init_weights``; the vision tower uses ``vision_config.initializer_range``);
- ``nn.Embedding`` ~ N(0, initializer_range), the padding row 0;
- RMSNorm / LayerNorm weights 1 (biases 0);
- NSA gates as :class:`flexnsa.NSAGates` builds them: ``g_proj_1`` nn.Linear's default
  U(+-1/sqrt(fan_in)) weight and zero bias, ``g_proj_2`` all zero (every gate starts at 0.5);
  MLP compressors as :class:`flexnsa.MLPCompressor` (``pos`` ~ N(0, 0.02), nn.Linear defaults);
- rotary ``inv_freq`` buffers (non-persistent, so never in a checkpoint and lost on meta) are
  recomputed by building a fresh rotary module of the same class from its config.

Any parameter or buffer no rule covers is an error: nothing is left as uninitialised memory.
"""

from __future__ import annotations


import torch
from torch import nn

from flexnsa.init_rules import COMPRESSOR_POS_STD, fill_by_rule, gate_projection_rules, linear_default_rules

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # older layouts
    from torch.distributed._tensor import DTensor

ROTARY_BUFFERS = ("inv_freq", "original_inv_freq")


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The storage this rank owns: a DTensor's local shard (in place under no_grad), else itself."""
    return param.to_local() if isinstance(param, DTensor) else param


def local_row_offset(param: torch.Tensor) -> int:
    """Global index of this rank's first row (FSDP2 shards dim 0 like ``torch.chunk``)."""
    if not isinstance(param, DTensor):
        return 0
    mesh = param.device_mesh
    if mesh.ndim != 1 or not param.placements[0].is_shard(0):
        raise ValueError(f"expected a dim-0 sharded DTensor on a 1-D mesh, got {param.placements}")
    rows = param.shape[0]
    chunk = -(-rows // mesh.size())
    return min(chunk * mesh.get_local_rank(), rows)


def parameter_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return local_tensor(p).device
    raise ValueError("the model has no parameters")


def is_vision(name: str) -> bool:
    return ".visual." in f".{name}."


def is_norm(module: nn.Module) -> bool:
    kind = type(module).__name__
    return "RMSNorm" in kind or "LayerNorm" in kind or isinstance(module, nn.LayerNorm)


def init_plan(model: nn.Module) -> list[tuple[str, torch.Tensor, str, float, nn.Module]]:
    """(parameter name, parameter, rule, scale, owner) for every parameter; raises naming any without a rule.

    Rules: ``normal`` (std = scale), ``uniform`` (bound = scale), ``fill`` (value = scale),
    ``embedding`` (normal, padding row 0). Needs no storage: it runs on a meta-device model.
    """
    config = model.config
    text_std = config.text_config.initializer_range
    vision_std = config.vision_config.initializer_range
    plan, seen = [], set()
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        std = vision_std if is_vision(name) else text_std
        last = name.rsplit(".", 1)[-1]
        if ".self_attn." in f".{name}" and last in ("g_proj_1", "g_proj_2"):  # the library's gate rules
            rules = gate_projection_rules(last, module)
        elif ".compress_" in name and isinstance(module, nn.Linear):  # MLPCompressor fc1/fc2: nn.Linear defaults
            rules = linear_default_rules(module)
        elif type(module).__name__ == "MLPCompressor":
            rules = {"pos": ("normal", COMPRESSOR_POS_STD)}
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            rules = {"weight": ("normal", std), "bias": ("fill", 0.0)}
        elif isinstance(module, nn.Embedding):
            rules = {"weight": ("embedding", std)}
        elif is_norm(module):
            rules = {"weight": ("fill", 1.0), "bias": ("fill", 0.0)}
        else:
            rules = {}
        for key, param in own.items():
            if key not in rules:
                raise TypeError(f"init_weights has no rule for {name}.{key} ({type(module).__name__})")
            kind, scale = rules[key]
            plan.append((f"{name}.{key}" if name else key, param, kind, scale, module))
            seen.add(id(param))
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]
    if missing:
        raise TypeError(f"init_weights left parameters uninitialised: {missing[:5]}")
    return plan


@torch.no_grad()
def init_weights(model: nn.Module, *, seed: int, rank: int = 0) -> None:
    """Initialise every parameter (local shards) and rotary buffer of a materialised model in place."""
    device = parameter_device(model)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank)
    for _, param, kind, scale, module in init_plan(model):
        local = local_tensor(param)
        fill_by_rule(local, "normal" if kind == "embedding" else kind, scale, generator)
        if kind == "embedding" and module.padding_idx is not None:
            row = module.padding_idx - local_row_offset(param)
            if 0 <= row < local.shape[0]:
                local[row].zero_()
    init_rotary_buffers(model, device)


@torch.no_grad()
def init_rotary_buffers(model: nn.Module, device) -> None:
    """Recompute ``inv_freq`` / ``original_inv_freq``: a fresh module of the same class, built on the CPU."""
    done = set()
    for module in model.modules():
        if not hasattr(module, "inv_freq") or not hasattr(module, "config"):
            continue
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for name in ROTARY_BUFFERS:
            if hasattr(module, name):
                value = getattr(fresh, name).to(device=device)
                buffer = getattr(module, name)
                if buffer.shape != value.shape or buffer.device != value.device:
                    setattr(module, name, value)  # still on meta (to_empty skipped it) or resized
                else:
                    buffer.copy_(value)
                done.add(id(getattr(module, name)))
    left = [n for n, b in model.named_buffers() if id(b) not in done]
    if left:
        raise TypeError(f"init_weights has no rule for buffers {left[:5]}")


def materialize(model: nn.Module, device: torch.device, *, seed: int, rank: int) -> None:
    """Storage for this rank's shards on ``device`` (``to_empty``), then :func:`init_weights`."""
    model.to_empty(device=device)
    init_weights(model, seed=seed, rank=rank)

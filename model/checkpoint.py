"""Save/load of converted models and VideoNSA-layout gate weights.

``save_pretrained`` of a converted model already writes everything: the gate weights are ordinary
parameters and the NSA settings live in ``config.text_config.nsa``. Loading needs one more step,
because ``from_pretrained`` builds upstream's attention and drops the gate weights as unexpected:
:func:`load_nsa_model` loads, converts with the stored settings, then loads the gate weights.

Key layouts: in memory (transformers 5.x) the text layers are ``model.language_model.layers.{i}``
and the vision tower ``model.visual``; on disk transformers 5.23 writes the original Qwen2.5-VL
layout (``model.layers.{i}``, ``visual``), which is also the VideoNSA release's layout
(``model.layers.{i}.self_attn.g_proj_1.weight``). Both are accepted.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from .convert import convert_to_nsa, nsa_settings

NSA_PARAMETER = re.compile(r"\.self_attn\.(g_proj_[12]|compress_[kv])\.")
_ON_DISK_TO_MODULE = (
    (re.compile(r"^visual\."), "model.visual."),
    (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."),
)


def module_key(key: str) -> str:
    """A state-dict key of either layout (on disk / VideoNSA, or in memory) in the in-memory one."""
    for pattern, replacement in _ON_DISK_TO_MODULE:
        key = pattern.sub(replacement, key)
    return key


def is_nsa_parameter(key: str) -> bool:
    return NSA_PARAMETER.search(key) is not None


def load_nsa_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load a (partial or full) state dict of either layout; every NSA parameter must be in it.

    Unknown keys, shape mismatches (e.g. gates for another head count) and missing gate weights
    raise ValueError naming the keys. Returns the loaded keys (in-memory layout).
    """
    own = model.state_dict()
    renamed = {module_key(k): v for k, v in state_dict.items()}
    unknown = sorted(k for k in renamed if k not in own)
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) are not parameters of this model, e.g. {unknown[:3]}")
    wrong = [
        f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in renamed.items() if v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(f"shape mismatch for {len(wrong)} key(s): {wrong[:3]}")
    missing = sorted(k for k in own if is_nsa_parameter(k) and k not in renamed)
    if missing:
        raise ValueError(f"{len(missing)} NSA parameter(s) missing from the state dict, e.g. {missing[:3]}")
    model.load_state_dict(renamed, strict=False)
    return sorted(renamed)


def read_checkpoint_tensors(path: str | Path, keep=lambda key: True) -> dict[str, torch.Tensor]:
    """Tensors of a save_pretrained directory (one or sharded safetensors) whose key ``keep`` accepts."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    tensors = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if keep(module_key(k))})
    return tensors


def load_nsa_model(path: str | Path, **from_pretrained_kwargs) -> Qwen2_5_VLForConditionalGeneration:
    """Rebuild a converted model saved with ``save_pretrained``: load, convert, load the gates."""
    settings = nsa_settings(Qwen2_5_VLConfig.from_pretrained(path))
    if settings is None:
        raise ValueError(f"{path} holds no NSA settings (config.text_config.nsa): not a converted model")
    nsa_config, images_as_video = settings
    with _gate_keys_expected(Qwen2_5_VLForConditionalGeneration):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **from_pretrained_kwargs)
    convert_to_nsa(model, nsa_config, images_as_video=images_as_video)
    load_nsa_state_dict(model, read_checkpoint_tensors(path, is_nsa_parameter))
    return model


@contextlib.contextmanager
def _gate_keys_expected(model_class):
    """Keep from_pretrained's load report from calling the gate weights unexpected: they load next."""
    name = "_keys_to_ignore_on_load_unexpected"
    own = name in model_class.__dict__
    saved = getattr(model_class, name)
    setattr(model_class, name, [*(saved or []), NSA_PARAMETER.pattern])
    try:
        yield
    finally:
        if own:
            setattr(model_class, name, saved)
        else:
            delattr(model_class, name)

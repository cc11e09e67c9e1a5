"""The model a config asks for, converted to NSA, with the chosen parameters trainable."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model import convert_to_nsa, load_nsa_model, random_model, tiny_qwen2_5_vl_config
from model.checkpoint import is_nsa_parameter
from model.convert import nsa_settings

log = logging.getLogger(__name__)


def build_model(config):
    """tiny: random weights; a path: a save_pretrained directory (converted ones keep their NSA settings)."""
    source = config.model.source
    if source == "tiny":
        return convert_to_nsa(random_model(tiny_qwen2_5_vl_config(), seed=config.model.seed, dtype=torch.float32), config.nsa_config())
    if source == "7b":
        raise NotImplementedError(
            "model.source = '7b' (random 7B weights) needs meta-device init + sharded weight init, which is "
            "not implemented; point model.source at a local Qwen2.5-VL-7B save_pretrained directory instead"
        )
    path = Path(source)
    if not path.is_dir():
        raise ValueError(f"model.source must be 'tiny', '7b' or a model directory; {source!r} is none of them")
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if nsa_settings(Qwen2_5_VLConfig.from_pretrained(path)) is not None:
        if config.nsa:
            log.warning("%s is already converted: its stored NSA settings are used, [nsa] is ignored", path)
        return load_nsa_model(path, dtype=torch.float32)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return convert_to_nsa(model, config.nsa_config())


def select_trainable(model, trainable: str) -> int:
    """Freeze all but ``all`` | ``language_model`` (text model + lm_head) | ``gates`` (NSA parameters)."""
    keep = {
        "all": lambda name: True,
        "language_model": lambda name: ".visual." not in f".{name}",
        "gates": is_nsa_parameter,
    }[trainable]
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(keep(name))
        count += param.numel() if param.requires_grad else 0
    return count

"""The model a config asks for (NSA-converted or dense, on the CPU or the meta device), with the chosen parameters trainable."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model import (
    convert_to_nsa,
    load_nsa_model,
    qwen2_5_vl_7b_config,
    random_model,
    tiny_qwen2_5_vl_config,
)
from model.checkpoint import is_nsa_parameter
from model.convert import nsa_settings

from .vision_attention import batch_vision_attention

log = logging.getLogger(__name__)


def init_on_meta(model_section) -> bool:
    """``auto``: the 7B shape is built on the meta device (no 8B-parameter host copy), tiny on the CPU."""
    if model_section.init_device == "auto":
        return model_section.source == "7b"
    return model_section.init_device == "meta"


def build_model(config):
    """tiny / 7b: random weights; a path: a save_pretrained directory (converted ones keep their NSA settings).

    ``model.attention = "dense"`` leaves the model unconverted (upstream's sdpa attention, no gates),
    the baseline of the same run. On the meta device the parameters have no storage yet:
    :func:`train.init.materialize` gives them storage and values after sharding.
    """
    model_section = config.model
    meta = init_on_meta(model_section)
    model = build_base_model(model_section, meta)
    if model_section.vision_attention == "batched":
        batch_vision_attention(model)
    if model_section.attention == "dense":
        if nsa_settings(model.config) is not None:
            raise ValueError(f"model.attention = 'dense' but {model_section.source} is an NSA-converted model")
        return model
    if nsa_settings(model.config) is not None:  # a converted directory: load_nsa_model already converted it
        if config.nsa:
            log.warning("%s is already converted: its stored NSA settings are used, [nsa] is ignored", model_section.source)
        return model
    return convert_to_nsa(model, config.nsa_config())


def build_base_model(model_section, meta: bool):
    source = model_section.source
    if source in ("tiny", "7b"):
        hf_config = tiny_qwen2_5_vl_config() if source == "tiny" else qwen2_5_vl_7b_config()
        if not meta:
            return random_model(hf_config, seed=model_section.seed, dtype=torch.float32)
        from transformers import Qwen2_5_VLForConditionalGeneration

        with torch.device("meta"):
            return Qwen2_5_VLForConditionalGeneration(hf_config).eval()
    path = Path(source)
    if not path.is_dir():
        raise ValueError(f"model.source must be 'tiny', '7b' or a model directory; {source!r} is none of them")
    if meta:
        raise ValueError("model.init_device = 'meta' builds random weights: it needs model.source 'tiny' or '7b'")
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if nsa_settings(Qwen2_5_VLConfig.from_pretrained(path)) is not None:
        return load_nsa_model(path, dtype=torch.float32)
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)


def is_on_meta(model) -> bool:
    return any(p.is_meta for p in model.parameters())


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

"""Turn a loaded or config-built Qwen2.5-VL into its NSA version, in place.

Every text decoder layer's ``self_attn`` becomes :class:`NSAQwen2_5_VLAttention` (same q/k/v/o
weights, new gate MLP); the vision tower is not touched. The NSA settings are written into
``config.text_config.nsa`` so that ``save_pretrained`` records them and
:func:`model.checkpoint.load_nsa_model` can rebuild the same model.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from flexnsa import NSAConfig
from flexnsa.config import FLEX_HEAD_DIMS

from .attention import NSAQwen2_5_VLAttention
from .routing import SpanRouter

NSA_CONFIG_KEY = "nsa"  # config.text_config.nsa = {"nsa_config": {...}, "images_as_video": bool}
HOST_ATTENTION = ("sdpa", "eager")  # implementations whose 4-D masks the hybrid layer reads


def vl_model_of(model: nn.Module):
    """The ``Qwen2_5_VLModel`` (vision tower + text model) of a ForConditionalGeneration or itself."""
    inner = getattr(model, "model", model)
    if not (hasattr(inner, "visual") and hasattr(inner, "language_model")):
        raise TypeError(
            "expected a Qwen2.5-VL model (Qwen2_5_VLForConditionalGeneration or Qwen2_5_VLModel), "
            f"got {type(model).__name__}"
        )
    return inner


def check_nsa_compatible(text_config, nsa_config: NSAConfig) -> None:
    """Refuse, naming the field, an NSA config this text model cannot run."""
    if not isinstance(nsa_config, NSAConfig):
        raise TypeError(f"nsa_config must be a flexnsa.NSAConfig, got {type(nsa_config).__name__}")
    hidden, heads, kv_heads = text_config.hidden_size, text_config.num_attention_heads, text_config.num_key_value_heads
    if hidden % heads:
        raise ValueError(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
    if kv_heads <= 0 or heads % kv_heads:
        raise ValueError(
            f"NSA shares each kv head's block selection across its query heads: num_attention_heads "
            f"({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    head_dim = hidden // heads
    if nsa_config.backend == "flex" and head_dim not in FLEX_HEAD_DIMS:
        raise ValueError(
            f"NSAConfig.backend='flex' supports head_dim in {FLEX_HEAD_DIMS}; this model's head_dim is "
            f"{head_dim} (hidden_size {hidden} / {heads} heads): use backend='reference'"
        )
    implementation = text_config._attn_implementation or "sdpa"
    if implementation not in HOST_ATTENTION:
        raise ValueError(
            f"the NSA hybrid layer runs on text attn_implementation {HOST_ATTENTION}, got {implementation!r}"
        )


def convert_to_nsa(model: nn.Module, nsa_config: NSAConfig | None = None, *, images_as_video: bool = False):
    """Swap every text layer's attention for the NSA hybrid one; returns ``model`` (changed in place)."""
    nsa_config = NSAConfig() if nsa_config is None else nsa_config
    vl = vl_model_of(model)
    if getattr(vl, "nsa_router", None) is not None:
        raise ValueError("this model is already converted to NSA")
    check_nsa_compatible(vl.language_model.config, nsa_config)
    for layer in vl.language_model.layers:
        layer.self_attn = NSAQwen2_5_VLAttention.from_dense(layer.self_attn, nsa_config)
    settings = {"nsa_config": dataclasses.asdict(nsa_config), "images_as_video": images_as_video}
    for config in {id(c): c for c in (vl.config.text_config, vl.language_model.config)}.values():
        setattr(config, NSA_CONFIG_KEY, settings)
    vl.nsa_router = SpanRouter(vl, nsa_config, images_as_video)
    return model


def nsa_settings(config) -> tuple[NSAConfig, bool] | None:
    """(NSAConfig, images_as_video) stored in a (top-level or text) config, or None."""
    text_config = getattr(config, "text_config", config)
    settings = getattr(text_config, NSA_CONFIG_KEY, None)
    if settings is None:
        return None
    return NSAConfig(**settings["nsa_config"]), bool(settings.get("images_as_video", False))


def set_nsa_enabled(model: nn.Module, enabled: bool) -> None:
    """Off: every layer runs upstream's dense attention (the gates are kept but unused)."""
    router = getattr(vl_model_of(model), "nsa_router", None)
    if router is None:
        raise ValueError("set_nsa_enabled needs a model converted with convert_to_nsa")
    router.enabled = bool(enabled)

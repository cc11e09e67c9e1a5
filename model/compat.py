"""transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache`
(the old argument name is deprecated until 5.40). The GPU machines run 5.17, CI the newest 5.x:
this module is the one place that knows both names."""

from __future__ import annotations

import inspect

from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

CACHE_NAMES = ("cache", "past_key_values")
# the name the installed transformers' forwards take (inspect follows the deprecation wrapper)
CACHE_ARG = next(n for n in CACHE_NAMES if n in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters)


def cache_of(kwargs: dict):
    """The KV cache a caller passed under either name (None if none)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def pop_cache(kwargs: dict):
    """Removes both names from ``kwargs`` and returns the cache, so it can be passed on positionally
    (the 4th argument of upstream's attention and model forwards under either version)."""
    found = cache_of(kwargs)
    for name in CACHE_NAMES:
        kwargs.pop(name, None)
    return found


def output_cache(output):
    """The cache a model output returned (`output.cache` from 5.24 on, `past_key_values` before)."""
    for name in CACHE_NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None

"""Qwen2.5-VL with VideoNSA's hybrid attention: NSA over video spans, dense text, flexnsa inside.

```python
from flexnsa import NSAConfig
from model import convert_to_nsa, load_nsa_model, mm_token_type_ids, set_nsa_enabled

model = convert_to_nsa(qwen_vl_model, NSAConfig(selection="block_shared"))  # in place; vision untouched
out = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid,
            mm_token_type_ids=mm_token_type_ids(ids, image_token_id, video_token_id))
set_nsa_enabled(model, False)              # upstream's dense attention, same weights
model.save_pretrained(path); model = load_nsa_model(path)   # gates + NSA settings round-trip
```

Modules: ``configs`` (tiny and 7B-shaped configs), ``spans`` (where the video spans are),
``routing`` (hands the spans to the layers), ``attention`` (the hybrid layer), ``convert``
(the swap, the on/off switch), ``checkpoint`` (save/load, VideoNSA-layout weights),
``synthetic`` (inputs with videos without a processor).
"""

from .attention import NSAQwen2_5_VLAttention
from .checkpoint import load_nsa_model, load_nsa_state_dict
from .configs import qwen2_5_vl_7b_config, tiny_nsa_config, tiny_qwen2_5_vl_config
from .convert import check_nsa_compatible, convert_to_nsa, nsa_settings, set_nsa_enabled
from .spans import SpanPlan, find_spans, mm_token_type_ids
from .synthetic import random_model, synthetic_batch

__all__ = [
    "NSAQwen2_5_VLAttention",
    "SpanPlan",
    "check_nsa_compatible",
    "convert_to_nsa",
    "find_spans",
    "load_nsa_model",
    "load_nsa_state_dict",
    "mm_token_type_ids",
    "nsa_settings",
    "qwen2_5_vl_7b_config",
    "random_model",
    "set_nsa_enabled",
    "synthetic_batch",
    "tiny_nsa_config",
    "tiny_qwen2_5_vl_config",
]

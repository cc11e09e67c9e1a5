"""Model inputs with videos, built without a processor (torchvision is unusable on the CPU machines).

A sample is a list of segments: an int is that many random text tokens, a tuple ``(t, h, w)`` is
one video of that grid (in patches: t temporal patches of 2 frames, h x w patches of 14 px), laid
out as the chat template does: ``<|vision_start|>`` + t*h*w/4 video tokens + ``<|vision_end|>``;
a pair ``(h, w)`` is one image (grid (1, h, w), h*w/4 image tokens).
Pixels are random; tests and benchmarks need shapes and ids, not content.
"""

from __future__ import annotations

import torch

from .spans import mm_token_type_ids

FIRST_TEXT_ID = 3  # 0 pad, 1 bos, 2 eos


def synthetic_batch(config, samples, *, padding_side: str = "right", seed: int = 0, dtype=torch.float32) -> dict:
    """input_ids, attention_mask, mm_token_type_ids and the pixels + grids of the videos/images."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    gen = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    merge, patch_dim = vision.spatial_merge_size, vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    specials = (config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id)
    last_text_id = min(specials)
    rows = []
    media = {"video": ([], []), "image": ([], [])}  # grids, pixels
    for segments in samples:
        ids = []
        for segment in segments:
            if isinstance(segment, int):
                ids += torch.randint(FIRST_TEXT_ID, last_text_id, (segment,), generator=gen).tolist()
                continue
            kind, grid = ("video", tuple(segment)) if len(segment) == 3 else ("image", (1, *segment))
            t, h, w = grid
            if h % merge or w % merge:
                raise ValueError(f"{kind} grid {segment}: h and w must be multiples of spatial_merge_size {merge}")
            token = config.video_token_id if kind == "video" else config.image_token_id
            ids += [config.vision_start_token_id] + [token] * (t * h * w // merge**2) + [config.vision_end_token_id]
            media[kind][0].append(grid)
            media[kind][1].append(torch.randn(t * h * w, patch_dim, generator=gen, dtype=dtype))
        rows.append(ids)
    width = max(len(r) for r in rows)
    pad = config.text_config.pad_token_id or 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, ids in enumerate(rows):
        cols = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[b, cols] = torch.tensor(ids)
        attention_mask[b, cols] = 1
    batch = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_token_type_ids(input_ids, config.image_token_id, config.video_token_id),
    )
    for kind, pixel_key in (("video", "pixel_values_videos"), ("image", "pixel_values")):
        grids, pixels = media[kind]
        if grids:
            batch[pixel_key] = torch.cat(pixels)
            batch[f"{kind}_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    return batch


def random_model(config, *, seed: int = 0, dtype=torch.float64):
    """A Qwen2.5-VL with random weights from ``config`` (eval mode; float64 for tight test tolerances)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()

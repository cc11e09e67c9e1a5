"""Video file -> ``pixel_values_videos`` rows and ``video_grid_thw``, following Qwen2-VL's processor.

torchvision is unusable on the CPU machines, so the processor cannot run; this reproduces its
steps: frames sampled at ``fps`` (PyAV decode), an even frame count (the last frame repeated),
``smart_resize`` (sides multiples of patch*merge, pixel count in [min_pixels, max_pixels]),
bicubic resize, rescale to [0, 1], CLIP mean/std normalisation, and the patch layout of
``Qwen2VLVideoProcessor.patchify`` (rows grouped by 2x2 merge window, columns
channel x temporal x patch x patch).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VideoError(RuntimeError):
    """A missing, unreadable or empty video file."""


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' ``qwen2_vl`` smart_resize: sides multiples of ``factor``, area in range, aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise VideoError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def read_frames(path: str | Path, fps: float, max_frames: int) -> torch.Tensor:
    """uint8 frames (T, 3, H, W) at ``fps`` (nearest earlier decoded frame), at most ``max_frames``."""
    import av

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"no video stream in {path}")
            picked, start, previous = [], None, None
            for index, frame in enumerate(container.decode(video=0)):
                time = float(frame.time) if frame.time is not None else index / fps
                start = time if start is None else start
                # frame k of the output is the last decoded frame at or before start + k / fps
                while previous is not None and len(picked) < max_frames and start + len(picked) / fps < time:
                    picked.append(previous)
                if len(picked) >= max_frames:
                    break
                previous, previous_time = frame.to_ndarray(format="rgb24"), time
            if previous is not None and len(picked) < max_frames and start + len(picked) / fps <= previous_time:
                picked.append(previous)
    except VideoError:
        raise
    except Exception as e:  # noqa: BLE001 (PyAV raises its own error family for corrupt files)
        raise VideoError(f"cannot decode {path}: {type(e).__name__}: {e}") from None
    if not picked:
        raise VideoError(f"no frames decoded from {path}")
    return torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2).contiguous()


def patchify(video: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int):
    """(T, C, H, W) normalised float -> (grid_t*grid_h*grid_w, C*tp*p*p) rows and (t, h, w)."""
    if pad := -video.shape[0] % temporal_patch_size:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    frames, channel, height, width = video.shape
    grid_t, grid_h, grid_w = frames // temporal_patch_size, height // patch_size, width // patch_size
    patches = video.view(
        grid_t, temporal_patch_size, channel,
        grid_h // merge_size, merge_size, patch_size,
        grid_w // merge_size, merge_size, patch_size,
    )
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = patches.reshape(grid_t * grid_h * grid_w, channel * temporal_patch_size * patch_size * patch_size)
    return rows, (grid_t, grid_h, grid_w)


def video_to_pixels(frames: torch.Tensor, vision_config, min_pixels: int, max_pixels: int):
    """uint8 (T, 3, H, W) -> (pixel rows float32, grid (t, h, w)) as the Qwen video processor makes them."""
    patch, merge = vision_config.patch_size, vision_config.spatial_merge_size
    height, width = frames.shape[-2:]
    new_h, new_w = smart_resize(height, width, patch * merge, min_pixels, max_pixels)
    video = frames.float()
    if (new_h, new_w) != (height, width):
        video = F.interpolate(video, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        video = video.clamp(0, 255).round()
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    video = (video / 255.0 - mean) / std
    return patchify(video, patch, merge, vision_config.temporal_patch_size)

"""Small video files with moving patterns, written with PyAV, for tests and smoke runs.

No dataset can be downloaded; these give the decode -> resize -> patchify path real files (mp4 or
mkv, h264 or mpeg4) whose frames differ over time, so temporal sampling is observable.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def moving_pattern(frame: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 frame: a bright square moving diagonally over a seeded colour gradient."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), np.full_like(x, (seed * 53) % 256)], -1)
    size = max(4, min(height, width) // 4)
    top, left = (frame * 3 + seed * 7) % (height - size), (frame * 5 + seed * 11) % (width - size)
    rgb[top : top + size, left : left + size] = 255
    return rgb.astype(np.uint8)


def write_video(path: str | Path, *, frames: int = 8, fps: int = 4, height: int = 64, width: int = 64, seed: int = 0, codec: str | None = None) -> Path:
    """Write ``frames`` frames at ``fps`` to ``path`` (container from the suffix: .mp4, .mkv)."""
    import av

    path = Path(path)
    codec = codec or "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(moving_pattern(i, height, width, seed), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_llava_dataset(root: str | Path, count: int, *, suffix: str = ".mp4", **video_kwargs) -> Path:
    """``count`` videos plus a LLaVA-Video-style ``annotations.json`` referencing them; returns the JSON path."""
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        name = f"videos/clip{i}{suffix}"
        write_video(root / name, seed=i, **video_kwargs)
        entries.append(
            {
                "video": name,
                "conversations": [
                    {"from": "human", "value": f"<video>\nWhere is square {i}?"},
                    {"from": "gpt", "value": f"Square {i} moves right."},
                ],
            }
        )
    annotation = root / "annotations.json"
    annotation.write_text(json.dumps(entries, indent=1))
    return annotation

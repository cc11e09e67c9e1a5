"""Training samples: LLaVA-Video-style JSON with local videos, or synthetic ones; and their batches.

A sample is a dict of ``input_ids`` and ``labels`` (1-D, labels -100 except on answer tokens),
``pixel_values_videos`` rows and ``video_grid_thw`` (one row per video). Text is laid out in
Qwen's ChatML (``<|im_start|>user ... <|im_end|>``) with ``<video>`` replaced by
``<|vision_start|>`` + t*h*w/merge^2 video tokens + ``<|vision_end|>``.
Problems with one sample raise :class:`SampleError`; :mod:`train.sampler` decides what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.spans import mm_token_type_ids
from model.synthetic import synthetic_batch

from .video import VideoError, read_frames, video_to_pixels

VIDEO_PLACEHOLDER = "<video>"
ROLES = {"human": "user", "gpt": "assistant"}


class SampleError(RuntimeError):
    """One sample cannot be used; ``kind`` is how it is counted ("bad_video", "too_long")."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class LlavaVideoDataset:
    """``[{"video": relative path, "conversations": [{"from": "human"|"gpt", "value": ...}]}]``."""

    def __init__(self, annotation, model_config, tokenizer, *, video_root="", fps=2.0, max_frames=32,
                 min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28, max_length=4096):
        annotation = Path(annotation)
        self.entries = json.loads(annotation.read_text())
        if not isinstance(self.entries, list):
            raise ValueError(f"{annotation}: expected a JSON list of samples")
        self.root = Path(video_root) if video_root else annotation.parent
        self.vision = model_config.vision_config
        self.tokenizer = tokenizer
        self.fps, self.max_frames = fps, max_frames
        self.min_pixels, self.max_pixels, self.max_length = min_pixels, max_pixels, max_length

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        try:
            frames = read_frames(self.root / entry["video"], self.fps, self.max_frames)
            pixels, grid = video_to_pixels(frames, self.vision, self.min_pixels, self.max_pixels)
        except VideoError as e:
            raise SampleError("bad_video", f"sample {index}: {e}") from None
        video_tokens = grid[0] * grid[1] * grid[2] // self.vision.spatial_merge_size**2
        input_ids, labels = chat_tokens(entry["conversations"], self.tokenizer, video_tokens)
        return finish_sample(index, input_ids, labels, pixels, [grid], self.max_length)


def chat_tokens(conversations: list[dict], tokenizer, video_tokens: int) -> tuple[list[int], list[int]]:
    """ChatML ids of the turns, the video expanded in place; labels = the assistant answers + end."""
    special = tokenizer.special
    input_ids, labels = [], []
    videos_seen = 0
    for turn in conversations:
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"unknown conversation role {turn['from']!r}; expected one of {sorted(ROLES)}")
        header = tokenizer.encode(f"<|im_start|>{role}\n")
        if role == "user":
            body = []
            for i, part in enumerate(turn["value"].split(VIDEO_PLACEHOLDER)):
                if i:
                    videos_seen += 1
                    body += [special.vision_start] + [special.video] * video_tokens + [special.vision_end]
                body += tokenizer.encode(part)
            ids = header + body + tokenizer.encode("\n") + [special.eos] + tokenizer.encode("\n")
            input_ids += ids
            labels += [-100] * len(ids)
        else:
            answer = tokenizer.encode(turn["value"]) + [special.eos]
            input_ids += header + answer + tokenizer.encode("\n")
            labels += [-100] * len(header) + answer + [-100] * len(tokenizer.encode("\n"))
    if videos_seen != 1:
        raise ValueError(f"expected exactly one {VIDEO_PLACEHOLDER} in the conversation, found {videos_seen}")
    return input_ids, labels


def finish_sample(index, input_ids, labels, pixels, grids, max_length) -> dict:
    if len(input_ids) > max_length:
        raise SampleError("too_long", f"sample {index}: {len(input_ids)} tokens > max_length {max_length}")
    return dict(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        pixel_values_videos=pixels,
        video_grid_thw=torch.tensor(grids, dtype=torch.long),
    )


class SyntheticDataset:
    """``count`` fixed random samples (text + one video + labelled text) from ``model.synthetic_batch``.

    Samples depend only on their index, so a run can memorise them: the loss must fall.
    """

    def __init__(self, model_config, *, count=8, text_after=12, grid=(2, 4, 4), max_length=4096):
        self.config, self.count, self.text_after, self.grid = model_config, count, text_after, tuple(grid)
        self.max_length = max_length

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        batch = synthetic_batch(self.config, [[3, self.grid, self.text_after]], seed=index)
        input_ids = batch["input_ids"][0]
        labels = torch.full_like(input_ids, -100)
        labels[-self.text_after :] = input_ids[-self.text_after :]
        return finish_sample(index, input_ids.tolist(), labels.tolist(), batch["pixel_values_videos"],
                             batch["video_grid_thw"].tolist(), self.max_length)


def collate(samples: list[dict], model_config, pad_id: int) -> dict:
    """Right-padded batch with attention_mask, mm_token_type_ids and the concatenated videos."""
    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros(len(samples), width, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = s["input_ids"], s["labels"], 1
    return dict(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_token_type_ids(input_ids, model_config.image_token_id, model_config.video_token_id),
        pixel_values_videos=torch.cat([s["pixel_values_videos"] for s in samples]),
        video_grid_thw=torch.cat([s["video_grid_thw"] for s in samples]),
    )


def build_dataset(data, model_config, tokenizer):
    """The dataset a ``[data]`` config section names."""
    if data.source == "synthetic":
        return SyntheticDataset(model_config, count=data.synthetic_samples, text_after=data.synthetic_text,
                                grid=data.synthetic_video_grid, max_length=data.max_length)
    if not data.annotation:
        raise ValueError("data.source = 'llava' needs data.annotation (the JSON file)")
    return LlavaVideoDataset(data.annotation, model_config, tokenizer, video_root=data.video_root, fps=data.fps,
                             max_frames=data.max_frames, min_pixels=data.min_pixels, max_pixels=data.max_pixels,
                             max_length=data.max_length)

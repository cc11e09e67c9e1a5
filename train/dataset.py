"""Training samples: LLaVA-Video-style JSON with local videos, or synthetic ones; and their batches.

``synthetic_tensor`` (benchmarks only) makes samples of exactly ``data.max_length`` tokens in memory.

A sample is a dict of ``input_ids`` and ``labels`` (1-D, labels -100 except on answer tokens),
``pixel_values_videos`` rows and ``video_grid_thw`` (one row per video). Text is laid out in
Qwen's ChatML (``<|im_start|>user ... <|im_end|>``) with ``<video>`` replaced by
``<|vision_start|>`` + t*h*w/merge^2 video tokens + ``<|vision_end|>``.
Problems with one sample raise :class:`SampleError`; :mod:`train.sampler` decides what to do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from model.spans import mm_token_type_ids
from model.synthetic import FIRST_TEXT_ID, synthetic_batch

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
            raise ValueError(f"{annotation}: expected a JSON list of samples")  # noqa: TRY004 (bad file content)
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
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "pixel_values_videos": pixels,
        "video_grid_thw": torch.tensor(grids, dtype=torch.long),
    }


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


class SyntheticTensorDataset:
    """Benchmark-only: samples of exactly ``sample_tokens`` (``data.max_length``) tokens made in memory.

    Layout (one video, answer at the end, like a QA turn): ``prompt`` text tokens,
    ``<|vision_start|>``, the video's tokens, ``<|vision_end|>``, question text, then
    ``answer_tokens`` labelled tokens. The video has ``frame_patches`` (h, w) patches per frame
    (16 x 16 = 224 x 224 px, 64 tokens per temporal patch of 2 frames) and as many temporal
    patches as fit, its token count rounded down to a multiple of ``video_multiple`` (the
    benchmark uses 128, FlexAttention's block); the question absorbs the remainder so the length
    is exact. Pixels are random (``randn``), ids random text ids. Each sample is made once (seeded
    by its index) and kept, so a step does not pay for generating 10^8+ random pixels (pinned
    when CUDA is there). Why not video files: writing and decoding a 64K-token video (2,000+
    frames at 224 x 224) through PyAV takes far longer than a training step on CPU, and PyAV is
    not installed on the GPU machines.
    What this measures is speed and memory at a given length, not learning.
    """

    PROMPT_TOKENS = 16
    MIN_QUESTION_TOKENS = 8

    def __init__(self, model_config, *, sample_tokens: int, answer_tokens: int, frame_patches=(16, 16), count=8,
                 video_multiple: int = 1):
        vision = model_config.vision_config
        self.config, self.count = model_config, count
        h, w = frame_patches
        merge = vision.spatial_merge_size
        if h % merge or w % merge:
            raise ValueError(f"data.synthetic_frame_patches {list(frame_patches)}: h and w must be multiples of {merge}")
        self.frame_patches = (h, w)
        self.tokens_per_frame = h * w // merge**2
        fixed = self.PROMPT_TOKENS + 2 + self.MIN_QUESTION_TOKENS + answer_tokens
        step = math.lcm(self.tokens_per_frame, video_multiple) // self.tokens_per_frame  # frames per step
        self.frames = (sample_tokens - fixed) // self.tokens_per_frame // step * step
        if answer_tokens < 1 or self.frames < 1:
            raise ValueError(
                f"a sample of {sample_tokens} tokens (data.max_length) leaves no room for one temporal patch of "
                f"{self.tokens_per_frame} video tokens plus {fixed} text tokens ({answer_tokens} answer tokens)"
            )
        self.video_tokens = self.frames * self.tokens_per_frame
        self.question_tokens = sample_tokens - self.PROMPT_TOKENS - 2 - self.video_tokens - answer_tokens
        self.sample_tokens, self.answer_tokens = sample_tokens, answer_tokens
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        if index not in self._cache:
            self._cache[index] = self.make(index)
        return self._cache[index]

    def make(self, index: int) -> dict:
        config, vision = self.config, self.config.vision_config
        gen = torch.Generator().manual_seed(index)
        top = min(config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id)

        def text(n):
            return torch.randint(FIRST_TEXT_ID, top, (n,), generator=gen)

        video = torch.full((self.video_tokens,), config.video_token_id)
        input_ids = torch.cat([
            text(self.PROMPT_TOKENS), torch.tensor([config.vision_start_token_id]), video,
            torch.tensor([config.vision_end_token_id]), text(self.question_tokens), text(self.answer_tokens),
        ])
        labels = torch.full_like(input_ids, -100)
        labels[-self.answer_tokens :] = input_ids[-self.answer_tokens :]
        h, w = self.frame_patches
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.randn(self.frames * h * w, patch_dim, generator=gen)
        if torch.cuda.is_available():
            pixels = pixels.pin_memory()
        return {"input_ids": input_ids, "labels": labels, "pixel_values_videos": pixels,
                    "video_grid_thw": torch.tensor([[self.frames, h, w]], dtype=torch.long)}


def collate(samples: list[dict], model_config, pad_id: int) -> dict:
    """Right-padded batch with attention_mask, mm_token_type_ids and the concatenated videos."""
    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros(len(samples), width, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = s["input_ids"], s["labels"], 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "mm_token_type_ids": mm_token_type_ids(input_ids, model_config.image_token_id, model_config.video_token_id),
        "pixel_values_videos": torch.cat([s["pixel_values_videos"] for s in samples]),
        "video_grid_thw": torch.cat([s["video_grid_thw"] for s in samples]),
    }


def build_dataset(data, model_config, tokenizer):
    """The dataset a ``[data]`` config section names."""
    if data.source == "synthetic":
        return SyntheticDataset(model_config, count=data.synthetic_samples, text_after=data.synthetic_text,
                                grid=data.synthetic_video_grid, max_length=data.max_length)
    if data.source == "synthetic_tensor":
        return SyntheticTensorDataset(model_config, sample_tokens=data.max_length, answer_tokens=data.answer_tokens,
                                      frame_patches=data.synthetic_frame_patches, count=data.synthetic_samples,
                                      video_multiple=data.synthetic_video_multiple)
    if not data.annotation:
        raise ValueError("data.source = 'llava' needs data.annotation (the JSON file)")
    return LlavaVideoDataset(data.annotation, model_config, tokenizer, video_root=data.video_root, fps=data.fps,
                             max_frames=data.max_frames, min_pixels=data.min_pixels, max_pixels=data.max_pixels,
                             max_length=data.max_length)

"""The training run's settings: one dataclass per TOML section, loaded with stdlib ``tomllib``.

Every key is checked against the dataclasses, so a typo (``optim.lrr``) is an error naming the key
instead of a silently ignored setting. ``--set section.key=value`` overrides are parsed as TOML
values (``3``, ``1e-4``, ``true``, ``[0.9, 0.95]``); anything that is not valid TOML is a string.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from flexnsa import NSAConfig


class ConfigError(ValueError):
    """A config file or override that does not match the dataclasses below."""


@dataclass
class ModelSection:
    source: str = "tiny"  # tiny | 7b | path of a save_pretrained directory (converted or not)
    seed: int = 0  # seed of the random weights of tiny/7b
    attention: str = "nsa"  # nsa (converted: NSA over video spans) | dense (upstream sdpa model, not converted)
    init_device: str = "auto"  # auto (meta for 7b, cpu otherwise) | meta (shard, then init on device) | cpu
    vision_attention: str = "sdpa"  # sdpa (upstream: one call per window) | batched (equal windows in one sdpa call)


@dataclass
class DataSection:
    source: str = "synthetic"  # synthetic | llava | synthetic_tensor (benchmarks: random in-memory samples of max_length tokens)
    annotation: str = ""  # llava: JSON list of {"video", "conversations"}
    video_root: str = ""  # llava: directory the "video" paths are relative to (default: the JSON's)
    tokenizer: str = "byte"  # byte (tiny vocab, tests) | path of a local Hugging Face tokenizer directory
    fps: float = 2.0
    max_frames: int = 32
    min_pixels: int = 128 * 28 * 28  # per frame, Qwen2-VL video processor defaults
    max_pixels: int = 768 * 28 * 28
    max_length: int = 4096  # longer samples are skipped (and counted); synthetic_tensor: the exact sample length
    on_bad_video: str = "skip"  # skip (logged, counted) | error
    global_batch_size: int = 2  # samples per optimizer step over all ranks
    micro_batch_size: int = 1  # samples per forward on one rank
    prefetch: int = 2  # micro-batches collated (pinned on GPUs) ahead by a background thread; 0 = in the step (train/prefetch.py)
    shuffle: bool = True
    synthetic_samples: int = 8  # synthetic: the distinct samples cycled through (learnable by memorising)
    synthetic_text: int = 12  # synthetic: text tokens after the video (the labelled ones)
    synthetic_video_grid: list[int] = field(default_factory=lambda: [2, 4, 4])  # (t, h, w) in patches
    synthetic_frame_patches: list[int] = field(default_factory=lambda: [16, 16])  # synthetic_tensor: (h, w) patches per frame
    answer_tokens: int = 256  # synthetic_tensor: labelled tokens at the end of each sample
    synthetic_video_multiple: int = 1  # synthetic_tensor: video tokens rounded down to a multiple of this

    def __post_init__(self) -> None:
        if self.prefetch < 0:
            raise ConfigError(f"data.prefetch counts micro-batches read ahead (>= 0), got {self.prefetch}")


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.0  # lr at the last step, as a fraction of lr
    clip_norm: float = 1.0  # 0 disables clipping
    # fused: one kernel per step over all parameters; for-loop: ~10 kernels per parameter, each
    # launched through DTensor dispatch (the 7B step left the GPU idle ~0.26 s on it, NOTES Lever 23)
    implementation: str = "fused"  # fused | foreach | for-loop


@dataclass
class TrainSection:
    steps: int = 100
    seed: int = 0
    output_dir: str = "runs/train"
    mixed_precision: str = "none"  # none | bf16 (FSDP2 MixedPrecisionPolicy: bf16 compute, fp32 reduce)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer
    trainable: str = "all"  # all | language_model | gates
    device: str = "auto"  # auto (cuda if available) | cpu | cuda


@dataclass
class CheckpointSection:
    interval: int = 0  # save every N steps (0: only at the end if enabled)
    at_end: bool = False
    resume: bool = True  # resume from the newest complete checkpoint of output_dir, if any
    resume_from: str = ""  # an explicit checkpoint directory (overrides resume)
    export_dir: str = ""  # at the end, save_pretrained here (load_nsa_model reads it)


@dataclass
class LogSection:
    every: int = 1
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = False
    timing_warmup_steps: int = 3  # results.json: steps left out of the medians (compile, warm-up)
    profile_steps: list[int] = field(default_factory=list)  # torch.profiler traces of these steps (train/profiling.py)

    def __post_init__(self) -> None:
        if any(s < 1 for s in self.profile_steps):
            raise ConfigError(f"log.profile_steps holds step numbers (>= 1), got {self.profile_steps}")


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    nsa: dict = field(default_factory=dict)  # NSAConfig fields; checked by NSAConfig itself
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def nsa_config(self) -> NSAConfig:
        return NSAConfig(**self.nsa)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    ("model", "attention"): ("nsa", "dense"),
    ("model", "init_device"): ("auto", "meta", "cpu"),
    ("model", "vision_attention"): ("sdpa", "batched"),
    ("data", "source"): ("synthetic", "llava", "synthetic_tensor"),
    ("data", "on_bad_video"): ("skip", "error"),
    ("optim", "decay"): ("cosine", "linear", "constant"),
    ("optim", "implementation"): ("fused", "foreach", "for-loop"),
    ("train", "mixed_precision"): ("none", "bf16"),
    ("train", "trainable"): ("all", "language_model", "gates"),
    ("train", "device"): ("auto", "cpu", "cuda"),
}
NSA_FIELDS = {f.name: f for f in dataclasses.fields(NSAConfig)}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The file's settings (or the defaults) with ``section.key=value`` overrides applied, validated."""
    raw: dict = {}
    if path is not None:
        with open(path, "rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: invalid TOML: {e}") from None
    for override in overrides:
        key, value = parse_override(override)
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"override {override!r}: expected section.key=value")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"override {override!r}: [{section}] is not a section")
        raw[section][name] = value
    return build_config(raw)


def parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare string such as a path
    return key.strip(), parsed


def build_config(raw: dict) -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown config section [{name}]; known: {sorted(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table of settings, got {values!r}")
        if name == "nsa":
            unknown = sorted(set(values) - set(NSA_FIELDS))
            if unknown:
                raise ConfigError(f"unknown config key nsa.{unknown[0]}; NSAConfig fields: {sorted(NSA_FIELDS)}")
            kwargs[name] = dict(values)
            continue
        kwargs[name] = build_section(name, sections[name].default_factory, values)
    config = Config(**kwargs)
    try:
        config.nsa_config()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[nsa]: {e}") from None
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key} must be one of {allowed}, got {value!r}")
    return config


def build_section(section: str, cls, values: dict):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {section}.{key}; known keys of [{section}]: {sorted(fields)}")
        out[key] = check_type(f"{section}.{key}", value, hints[key])
    return cls(**out)


def check_type(name: str, value, hint):
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}")
    return value

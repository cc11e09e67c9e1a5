"""Per-step metrics on rank 0: a JSON-lines file (what tests read), a tqdm bar, TensorBoard scalars.

TensorBoard is optional: asking for it without the package installed is an error at startup,
not a silently missing log.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


def tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError(
            "log.tensorboard = true but tensorboard is not importable: pip install tensorboard "
            "(or the 'train' extra), or set log.tensorboard = false"
        ) from None
    return SummaryWriter(log_dir=str(log_dir))


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


class MetricsLogger:
    def __init__(self, output_dir, *, rank: int, total_steps: int, start_step: int, progress: bool, tensorboard: bool):
        self.active = rank == 0
        self.bar = self.tb = self.file = None
        if not self.active:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            self.tb = tensorboard_writer(output_dir / "tensorboard")
        self.file = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the run, closed in close())
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", file=sys.stderr, dynamic_ncols=True)

    def step(self, record: dict) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
        message = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}")
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def event(self, record: dict) -> None:
        if self.active:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            print(json.dumps(record), file=sys.stderr, flush=True)

    def close(self) -> None:
        for thing in (self.bar, self.tb, self.file):
            if thing is not None:
                thing.close()

"""Resumable distributed checkpoints (torch.distributed.checkpoint) and the final export.

Layout of ``<output_dir>/checkpoints/step_00000042/``: ``dcp/`` (model + optimizer, sharded, any
rank count can write it), ``rank{r}.pt`` (that rank's RNG states and data position: ranks read
different samples) and ``trainer.pt`` (step, scheduler, world size), written last. Everything is
written to ``step_N.tmp`` first and renamed when every rank has finished, so an interrupted save
leaves a ``.tmp`` directory that resuming ignores, never a half-written ``step_N``.
Export gathers the full state dict and writes a ``save_pretrained`` directory for
:func:`model.load_nsa_model`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "trainer.pt"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``.tmp`` and unmarked directories ignored)."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [
        (int(m.group(1)), path)
        for path in root.iterdir()
        if (m := STEP_DIR.match(path.name)) and (path / COMPLETE_MARKER).is_file()
    ]
    return max(found)[1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root, step: int, model, optimizer, scheduler, stream) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    rank, world = dist.get_rank(), dist.get_world_size()
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save interrupted earlier
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
    torch.save({"rng": rng_state(), "data": stream.state_dict()}, tmp / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "world_size": world}, tmp / COMPLETE_MARKER)
        old = final.with_name(final.name + ".old")
        if final.exists():  # saving the same step again: keep the old one until the new one is in place
            final.rename(old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path, model, optimizer, scheduler, stream) -> int:
    """Collective: restore everything saved by :func:`save_checkpoint`; returns the step reached."""
    path = Path(path)
    trainer = torch.load(path / COMPLETE_MARKER, weights_only=False)
    world = dist.get_world_size()
    if trainer["world_size"] != world:
        raise ValueError(
            f"{path} was saved by {trainer['world_size']} ranks and each rank's data position is its own: "
            f"resume with {trainer['world_size']} ranks, not {world}"
        )
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(trainer["scheduler"])
    own = torch.load(path / f"rank{dist.get_rank()}.pt", weights_only=False)
    set_rng_state(own["rng"])
    stream.load_state_dict(own["data"])
    return trainer["step"]


def export_pretrained(model, path) -> None:
    """Collective: gather the full weights; rank 0 writes a directory ``load_nsa_model`` reads."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from model.convert import convert_to_nsa, nsa_settings

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = {key.replace("._orig_mod", ""): value for key, value in state.items()}  # torch.compile'd layers
    if dist.get_rank() == 0:
        config = model.config
        plain = Qwen2_5_VLForConditionalGeneration(config)
        settings = nsa_settings(config)
        if settings is not None:  # model.attention = "dense" trains the unconverted model
            nsa_config, images_as_video = settings
            convert_to_nsa(plain, nsa_config, images_as_video=images_as_video)
        plain.load_state_dict(state, strict=True)
        plain.save_pretrained(path)
    dist.barrier()

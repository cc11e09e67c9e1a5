"""The training loop: build, parallelize (then materialise meta-built weights), (resume), step, log,
checkpoint, export, and ``results.json`` (train/bench.py) at the end."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .bench import write_results
from .build import build_model, is_on_meta, select_trainable
from .checkpoint import (
    export_pretrained,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .config import Config, ConfigError
from .dataset import build_dataset, collate
from .distributed import all_reduce_max, all_reduce_sum, init_distributed
from .init import materialize
from .loss import model_loss
from .metrics import MetricsLogger, peak_memory_gib
from .optim import build_optimizer, build_scheduler
from .parallelize import parallelize
from .prefetch import BatchPrefetcher
from .profiling import profiled_step
from .sampler import SampleStream
from .tokenizer import load_tokenizer

log = logging.getLogger("train")


def grad_accumulation(data, world_size: int) -> int:
    """Micro-batches per rank per step; the global batch must split evenly over ranks and micro-batches."""
    per_step = data.micro_batch_size * world_size
    if data.global_batch_size <= 0 or data.micro_batch_size <= 0 or data.global_batch_size % per_step:
        raise ConfigError(
            f"data.global_batch_size ({data.global_batch_size}) must be a positive multiple of "
            f"data.micro_batch_size ({data.micro_batch_size}) x world size ({world_size}) = {per_step}"
        )
    return data.global_batch_size // per_step


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(config: Config) -> None:
    device = init_distributed(config.train.device)
    try:
        run(config, device)
    finally:
        dist.destroy_process_group()


def run(config: Config, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    accum = grad_accumulation(config.data, world)
    output = Path(config.train.output_dir)
    torch.manual_seed(config.train.seed)

    model = build_model(config)
    meta = is_on_meta(model)
    trainable = select_trainable(model, config.train.trainable)
    tokenizer = load_tokenizer(config.data.tokenizer, model.config)
    dataset = build_dataset(config.data, model.config, tokenizer)
    stream = SampleStream(dataset, rank=rank, world_size=world, seed=config.train.seed,
                          shuffle=config.data.shuffle, on_bad_video=config.data.on_bad_video)
    if not meta:
        model.to(device)
    parallelize(model, activation_checkpointing=config.train.activation_checkpointing,
                compile=config.train.compile, mixed_precision=config.train.mixed_precision)
    if meta:  # built without storage: each rank allocates and initialises its own shards only
        materialize(model, device, seed=config.model.seed, rank=rank)
    model.train()
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.train.steps)

    checkpoints = output / "checkpoints"
    resume = Path(config.checkpoint.resume_from) if config.checkpoint.resume_from else None
    if resume is None and config.checkpoint.resume:
        resume = latest_checkpoint(checkpoints)
    step = load_checkpoint(resume, model, optimizer, scheduler, stream) if resume else 0
    if resume and rank == 0:
        log.info("resumed from %s at step %d", resume, step)

    batches = BatchPrefetcher(stream, config.data.micro_batch_size, batch_builder(model.config, tokenizer.special.pad, device),
                              config.data.prefetch)  # after the resume: it reads on from the restored position
    logger = MetricsLogger(output, rank=rank, total_steps=config.train.steps, start_step=step,
                           progress=config.log.progress, tensorboard=config.log.tensorboard)
    if step == 0:
        logger.event({"event": "start", "world_size": world, "grad_accumulation": accum, "trainable_parameters": trainable,
                      "attention": config.model.attention, "init_device": "meta" if meta else "cpu"})
    step_times, step_tokens, longest = [], [], 0
    try:
        while step < config.train.steps:
            step += 1
            with profiled_step(step, config.log.profile_steps, output, rank, device):
                record = train_step(model, optimizer, scheduler, batches, accum, device, config.optim.clip_norm)
            step_times.append(record["step_time_s"])
            step_tokens.append(record.pop("tokens"))
            longest = max(longest, record.pop("longest_sample"))
            if step % config.log.every == 0 or step == config.train.steps:
                logger.step({"step": step, **record, "peak_memory_gib": peak_memory_gib(device)})
            write_results(output / "results.json", config=config, device=device, world=world, step_times=step_times,
                          step_tokens=step_tokens, tokens_per_sample=longest, complete=False)
            interval = config.checkpoint.interval
            if (interval and step % interval == 0) or (config.checkpoint.at_end and step == config.train.steps):
                save_checkpoint(checkpoints, step, model, optimizer, scheduler, batches)
        skipped = {}
        for kind in ("bad_video", "too_long"):
            (skipped[kind],) = all_reduce_sum([batches.skipped.get(kind, 0)], device)
        logger.event({"event": "end", "step": step, "skipped": {k: int(v) for k, v in skipped.items()}})
        write_results(output / "results.json", config=config, device=device, world=world, step_times=step_times,
                      step_tokens=step_tokens, tokens_per_sample=longest, complete=True)
        if config.checkpoint.export_dir:
            export_pretrained(model, config.checkpoint.export_dir)
    finally:
        batches.close()
        logger.close()


def batch_builder(model_config, pad: int, device):
    """samples -> collated micro-batch, in pinned memory when it goes to a GPU (so the copy in the
    step is asynchronous); runs in the prefetch thread."""

    def build(samples):
        batch = collate(samples, model_config, pad)
        return {k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch

    return build


def train_step(model, optimizer, scheduler, batches, accum, device, clip_norm: float) -> dict:
    """One optimizer step over ``accum`` micro-batches; loss averaged over micro-batches and ranks.
    ``data_time_s`` is the time spent waiting for micro-batches (0 when the prefetch kept up)."""
    start = time.perf_counter()
    losses, tokens, longest, data_time = [], 0, 0, 0.0
    for _ in range(accum):
        data_start = time.perf_counter()
        host_batch = batches.next()
        batch = to_device(host_batch, device)
        data_time += time.perf_counter() - data_start
        lengths = host_batch["attention_mask"].sum(-1)  # on the host: no wait for the GPU mid-step
        tokens += int(lengths.sum())
        longest = max(longest, int(lengths.max()))
        del host_batch
        loss = model_loss(model, batch)  # logits only where a label follows (train/loss.py)
        batch.pop("pixel_values_videos", None)  # 1.2 GB at 64K tokens; autograd keeps what it needs
        (loss / accum).backward()
        losses.append(loss.detach().float())
    (longest,) = all_reduce_max([longest], device)
    grad_norm = 0.0
    if clip_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss_sum, token_sum = all_reduce_sum([float(torch.stack(losses).sum()), tokens], device)
    world = dist.get_world_size()
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum / (accum * world), "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": token_sum / elapsed, "step_time_s": elapsed, "data_time_s": data_time,
            "tokens": int(token_sum), "longest_sample": int(longest)}

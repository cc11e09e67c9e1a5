"""Training of the NSA Qwen2.5-VL: ``torchrun --nproc-per-node N -m train --config cfg.toml``.

Modules: ``config`` (TOML sections + ``--set`` overrides, typo errors), ``parallelize`` (AC ->
compile -> FSDP2, torchtitan style), ``build`` (model source, trainable parameters), ``tokenizer``
(local HF or byte-level), ``video`` (PyAV decode + Qwen's resize/patch layout), ``dataset``
(LLaVA-Video JSON, synthetic samples, collate), ``sampler`` (per-rank resumable order, skips),
``optim`` (AdamW, warmup + decay), ``checkpoint`` (DCP save/resume with atomic rename, export),
``metrics`` (JSON lines, tqdm, TensorBoard), ``trainer`` (the loop), ``synthetic_videos``
(test videos), ``init`` (meta-device build: shard-local weight init), ``loss`` (logits only before
labelled tokens), ``vision_attention`` (equal vision windows in one SDPA call), ``bench``
(``results.json``), ``bench_report`` (merged markdown table). CPU runs use
``NSAConfig(backend="reference")`` and gloo; GPUs use nccl.
"""

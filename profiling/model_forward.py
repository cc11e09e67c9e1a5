"""`python -m profiling.model_forward`: whole-model forward of Qwen2.5-VL, dense vs NSA, over long videos.

One process, one set of random weights: the model is built from a config (no download), timed
dense (upstream sdpa attention) at every requested video length, then converted in place with
``convert_to_nsa`` and timed again at the same lengths on the same inputs. Each sample is one
video of N tokens between two short random text prompts; frames are square, ``--frame-size`` px,
so one temporal patch (2 frames) gives (frame/28)^2 tokens (64 at 224 px) and N must be a
multiple of that. The forward runs under ``torch.no_grad`` with ``use_cache=False`` and
``logits_to_keep=1`` (the 152K-vocab logits of every token would take 20+ GB at 64K). The
vision tower alone is also timed (it is the same in both models), so the language-model part
is visible as total - vision.

``--model 7b`` (default with a GPU): the Qwen2.5-VL-7B shape, random bf16 weights built directly
on the GPU. ``--model tiny`` (default on CPU): the tiny test config, a smoke run in seconds.

Writes results.json (after every measurement) and report.md into ``--out``. Exit codes: 0 done;
2 bad arguments; 3 a measurement ran out of memory or failed (recorded, the rest still ran).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from flexnsa import NSAConfig
from flexnsa.config import COMPRESSION_KERNELS, SELECTION_KERNELS, SELECTION_MODES, WINDOW_KERNELS

from . import report
from .cli import UsageError, device_name, device_slug, git_state, parse_length, pick_device
from .timing import first_call_s, synchronize

MODELS = ("7b", "tiny")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GPU_DEFAULTS = {"model": "7b", "video_tokens": ["32K", "64K"], "dtype": "bf16"}
CPU_DEFAULTS = {"model": "tiny", "video_tokens": ["128"], "dtype": "fp32"}
FRAME_SIZE = {"7b": 224, "tiny": 56}  # tiny: 2x2 merged patches per temporal patch -> 4 tokens
REFERENCE_MAX_TOKENS = 8192  # the reference backend materialises T x T scores per layer


def log(message: str) -> None:
    print(message, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m profiling.model_forward", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--model", choices=MODELS, help="7b (default on a GPU) or tiny (default on CPU)")
    p.add_argument("--layers", type=int, help="override num_hidden_layers of the text model (e.g. 2 for a quick check)")
    p.add_argument("--video-tokens", nargs="+", metavar="N",
                   help="video tokens per sample, e.g. 32K 64K (default on a GPU) or 4096")
    p.add_argument("--frame-size", type=int, help="square frame side in px, a multiple of 28 (default 224; tiny 56)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="random text tokens before and after the video")
    p.add_argument("--dtype", choices=list(DTYPES), help="bf16 (default on a GPU) or fp32 (default on CPU)")
    p.add_argument("--selection", choices=list(SELECTION_MODES), default="block_shared")
    p.add_argument("--backend", choices=["flex", "reference"], default="flex",
                   help=f"NSA backend; reference is O(T^2) and refused above {REFERENCE_MAX_TOKENS} video tokens")
    p.add_argument("--compression-kernel", choices=list(COMPRESSION_KERNELS), default="auto")
    p.add_argument("--selection-kernel", choices=list(SELECTION_KERNELS), default="auto")
    p.add_argument("--window-kernel", choices=list(WINDOW_KERNELS), default="auto")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (compiling) call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls; the median is reported")
    p.add_argument("--no-vision", action="store_true", help="do not time the vision tower alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="results folder (default profiling/runs/<time>-model-<device>)")
    return p


def resolve(args) -> dict:
    """Validate the arguments against the machine; UsageError with a clear message otherwise."""
    device = pick_device(args.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    model_name = args.model or defaults["model"]
    dtype = DTYPES[args.dtype or defaults["dtype"]]
    frame = args.frame_size or FRAME_SIZE[model_name]
    if frame <= 0 or frame % 28:
        raise UsageError(f"--frame-size {frame}: must be a positive multiple of 28 (14-px patches merged 2x2)")
    if args.repeats < 1:
        raise UsageError("--repeats must be >= 1")
    for name in ("warmup", "prompt_tokens"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    if args.layers is not None and args.layers < 1:
        raise UsageError("--layers must be >= 1")
    if model_name == "7b" and device.type == "cpu":
        raise UsageError("--model 7b needs a CUDA GPU (8B parameters); use --model tiny on CPU")
    nsa = nsa_config_for(model_name, args)
    per_patch = (frame // 28) ** 2  # tokens of one temporal patch (2 frames)
    lengths = []
    for text in args.video_tokens or defaults["video_tokens"]:
        n = parse_length(text)
        if n % per_patch:
            lo, hi = n // per_patch * per_patch, -(-n // per_patch) * per_patch
            raise UsageError(
                f"--video-tokens {text}: {n} video tokens cannot be laid out as frames of {frame}x{frame} px "
                f"({per_patch} tokens per 2 frames); use a multiple of {per_patch}, e.g. {lo or hi} or {hi}"
            )
        if n < nsa.block_size:
            raise UsageError(f"--video-tokens {text}: shorter than one NSA block ({nsa.block_size} tokens)")
        if args.backend == "reference" and n > REFERENCE_MAX_TOKENS:
            raise UsageError(
                f"--video-tokens {text}: the reference backend materialises T x T scores; "
                f"use --backend flex above {REFERENCE_MAX_TOKENS} tokens"
            )
        lengths.append(n)
    return {"device": device, "model": model_name, "dtype": dtype, "frame": frame, "per_patch": per_patch,
            "lengths": lengths, "nsa": nsa}


def nsa_config_for(model_name: str, args) -> NSAConfig:
    """VideoNSA's hyper-parameters for the 7B shape; the tiny test NSA (4-token blocks) for tiny."""
    choices = {"selection": args.selection, "backend": args.backend, "compression_kernel": args.compression_kernel,
               "selection_kernel": args.selection_kernel, "window_kernel": args.window_kernel,
               "check_inputs": False}
    if model_name == "7b":
        return NSAConfig(**choices)
    from model.configs import tiny_nsa_config

    return tiny_nsa_config(flex_block_q=16, flex_block_kv=16, **choices)


def model_config(model_name: str, layers: int | None):
    from model.configs import qwen2_5_vl_7b_config, tiny_qwen2_5_vl_config

    if model_name == "7b":
        config = qwen2_5_vl_7b_config(**({} if layers is None else {"num_hidden_layers": layers}))
    else:
        config = tiny_qwen2_5_vl_config(**({} if layers is None else {"num_layers": layers}))
    config._attn_implementation = "sdpa"  # text and vision: upstream's dense attention
    return config


def build_model(config, device: torch.device, dtype: torch.dtype, seed: int):
    """Random weights created directly on ``device`` in ``dtype`` (no fp32 copy, no CPU detour).

    Parameters follow the default dtype while the modules are built; the rotary ``inv_freq``
    buffers are computed in float32 explicitly by transformers, so they stay exact.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def video_batch(config, video_tokens: int, frame: int, prompt_tokens: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """One sample: prompt, <|vision_start|>, ``video_tokens`` video tokens, <|vision_end|>, prompt.

    Pixels are random (``pixel_values_videos`` as the processor lays them out: one row of
    C * 2 * 14 * 14 values per patch), made on ``device``.
    """
    from model.spans import mm_token_type_ids
    from model.synthetic import FIRST_TEXT_ID

    vision = config.vision_config
    merge, patch = vision.spatial_merge_size, vision.patch_size
    grid = (video_tokens * merge**2 // (frame // patch) ** 2, frame // patch, frame // patch)
    assert grid[0] * grid[1] * grid[2] // merge**2 == video_tokens
    gen = torch.Generator(device=device).manual_seed(seed)
    last_text = min(config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id)
    text = torch.randint(FIRST_TEXT_ID, last_text, (2, prompt_tokens), generator=gen, device=device)
    ids = torch.cat([
        text[0],
        torch.tensor([config.vision_start_token_id], device=device),
        torch.full((video_tokens,), config.video_token_id, device=device),
        torch.tensor([config.vision_end_token_id], device=device),
        text[1],
    ])[None]
    patch_dim = vision.in_channels * vision.temporal_patch_size * patch**2
    pixels = torch.randn(grid[0] * grid[1] * grid[2], patch_dim, generator=gen, device=device, dtype=dtype)
    return {
        "input_ids": ids,
        "mm_token_type_ids": mm_token_type_ids(ids, config.image_token_id, config.video_token_id),
        "pixel_values_videos": pixels,
        "video_grid_thw": torch.tensor([grid], dtype=torch.long, device=device),
    }


def measure(fn, device: torch.device, warmup: int, repeats: int) -> dict:
    """First (compiling) call, ``warmup`` more, then ``repeats`` timed calls; peak memory of the timed ones."""
    cuda = device.type == "cuda"
    first = first_call_s(fn, device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    start_mb = torch.cuda.memory_allocated(device) / 2**20 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, out = [], None
    for _ in range(repeats):
        out = None
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1000)
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    row = {
        "status": "ok", "median_ms": statistics.median(times), "times_ms": times, "first_call_s": first,
        "start_mb": start_mb, "peak_mb": peak_mb, "peak_over_start_mb": None if peak_mb is None else peak_mb - start_mb,
    }
    if isinstance(out, torch.Tensor):
        row["finite"] = bool(torch.isfinite(out).all())
    return row


def guarded(what: str, fn, device: torch.device, warmup: int, repeats: int, errors: list) -> dict:
    """``measure`` that records out-of-memory and other failures instead of raising."""
    failure = None
    try:
        row = measure(fn, device, warmup, repeats)
    except torch.cuda.OutOfMemoryError as e:
        failure = {"status": "oom", "error": str(e).splitlines()[0] if str(e) else "out of memory"}
    except Exception as e:  # noqa: BLE001 - recorded, printed, and the run goes on
        traceback.print_exc()
        failure = {"status": "error", "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    if failure is not None:
        row = failure
        errors.append(f"{what}: {failure['status']}: {failure['error']}")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def model_summary(model, name: str, dtype: torch.dtype) -> dict:
    text, vision = model.config.text_config, model.config.vision_config
    return {
        "name": name, "dtype": str(dtype).replace("torch.", ""), "attn_implementation": "sdpa",
        "params": sum(p.numel() for p in model.parameters()),
        "text_layers": text.num_hidden_layers, "hidden_size": text.hidden_size,
        "q_heads": text.num_attention_heads, "kv_heads": text.num_key_value_heads,
        "vision_depth": vision.depth, "vision_hidden_size": vision.hidden_size,
    }


def metadata(device: torch.device, argv: list[str]) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = git_state()
    commit = os.environ.get("FLEXNSA_COMMIT") or commit
    return {
        "device_name": device_name(device), "torch": torch.__version__, "transformers": transformers.__version__,
        "triton": triton_version, "commit": commit, "dirty": dirty,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "argv": argv,
        "timing": "median of --repeats whole forwards, host perf_counter between device synchronisations, "
                  "after one first (compiling) call and --warmup more; peak = max_memory_allocated over the timed calls",
    }


def summarise(row: dict) -> None:
    """Speedups and language-model-only times of one length, where both sides ran."""
    dense, nsa, vision = row.get("dense", {}), row.get("nsa", {}), row.get("vision", {})
    if dense.get("status") == "ok" and nsa.get("status") == "ok":
        row["speedup"] = dense["median_ms"] / nsa["median_ms"]
        if vision.get("status") == "ok":
            lm_dense, lm_nsa = dense["median_ms"] - vision["median_ms"], nsa["median_ms"] - vision["median_ms"]
            row["lm_dense_ms"], row["lm_nsa_ms"] = lm_dense, lm_nsa
            row["lm_speedup"] = lm_dense / lm_nsa if lm_dense > 0 and lm_nsa > 0 else None  # None: timing noise


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _fmt(x, digits=1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _cell(side: dict, key: str, scale: float = 1.0, digits: int = 1) -> str:
    if not side:
        return "–"
    if side.get("status") != "ok":
        return side.get("status", "?").upper()
    value = side.get(key)
    return _fmt(None if value is None else value / scale, digits)


def write_markdown(results: dict, out_dir: Path) -> Path:
    meta, m = results["meta"], results["model"]
    lines = [
        f"# Qwen2.5-VL forward, dense vs NSA: {meta['device_name']}",
        "",
        f"- date {meta['date']}, commit `{meta['commit']}`{' (dirty tree)' if meta.get('dirty') else ''}",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}",
        (f"- model `{m['name']}` random weights, {_count(m['params'])} params, {m['dtype']}, {m['text_layers']} text "
         f"layers (hidden {m['hidden_size']}, {m['q_heads']}q/{m['kv_heads']}kv heads), vision depth {m['vision_depth']}; "
         f"dense = upstream sdpa, NSA = the same weights after `convert_to_nsa`"),
        (f"- input: {results['inputs']['prompt_tokens']} text tokens + one video ({results['inputs']['frame_size']}px "
         f"frames) + {results['inputs']['prompt_tokens']} text tokens; batch 1; no_grad, use_cache=False, logits_to_keep=1"),
        f"- timing: {meta['timing']}",
        "",
        "NSA config:",
        "",
        "```",
        ", ".join(f"{k}={v}" for k, v in results["nsa_config"].items()),
        "```",
        "",
        ("Times in ms; LM = whole forward minus the vision tower alone; memory in GiB (peak = weights + inputs + "
         "activations; act. = peak minus what was allocated before the call)."),
        "",
        ("| video tokens | frames | seq len | vision ms | dense ms | NSA ms | speedup | LM dense ms | LM NSA ms "
         "| LM speedup | dense peak | NSA peak | dense act. | NSA act. |"),
        "|" + "---:|" * 14,
    ]
    gib = 1024.0
    for row in results["lengths"]:
        dense, nsa, vision = row.get("dense", {}), row.get("nsa", {}), row.get("vision", {})
        lines.append("| " + " | ".join([
            str(row["video_tokens"]), str(row["frames"]), str(row["seq_len"]),
            _cell(vision, "median_ms"), _cell(dense, "median_ms"), _cell(nsa, "median_ms"),
            _fmt(row.get("speedup"), 2), _fmt(row.get("lm_dense_ms")), _fmt(row.get("lm_nsa_ms")),
            _fmt(row.get("lm_speedup"), 2),
            _cell(dense, "peak_mb", gib, 2), _cell(nsa, "peak_mb", gib, 2),
            _cell(dense, "peak_over_start_mb", gib, 2), _cell(nsa, "peak_over_start_mb", gib, 2),
        ]) + " |")
    first = [f"{r['video_tokens']}: dense {_cell(r.get('dense', {}), 'first_call_s', 1, 1)} s, NSA "
             f"{_cell(r.get('nsa', {}), 'first_call_s', 1, 1)} s" for r in results["lengths"]]
    lines += ["", (f"First calls (incl. compilation): {'; '.join(first)}. Model init {results['init_s']:.1f} s, "
               f"conversion {_fmt(results.get('convert_s'), 2)} s.")]
    if results["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in results["errors"]]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(resolved: dict, args, argv: list[str], out_dir: Path) -> int:
    from model.convert import convert_to_nsa, vl_model_of

    device, dtype = resolved["device"], resolved["dtype"]
    meta = metadata(device, argv)
    log(f"model forward benchmark on {meta['device_name']} -> {out_dir}")
    config = model_config(resolved["model"], args.layers)
    t0 = time.perf_counter()
    model = build_model(config, device, dtype, args.seed)
    synchronize(device)
    init_s = time.perf_counter() - t0
    summary = model_summary(model, resolved["model"], dtype)
    log(f"built {resolved['model']} ({_count(summary['params'])} params, {summary['dtype']}) in {init_s:.1f} s")
    frame, per_patch = resolved["frame"], resolved["per_patch"]
    results = {
        "meta": meta, "model": summary, "nsa_config": dataclasses.asdict(resolved["nsa"]),
        "inputs": {"frame_size": frame, "tokens_per_2_frames": per_patch, "prompt_tokens": args.prompt_tokens},
        "init_s": init_s, "convert_s": None, "errors": [],
        "lengths": [
            {"video_tokens": n, "frames": 2 * n // per_patch, "seq_len": n + 2 + 2 * args.prompt_tokens}
            for n in resolved["lengths"]
        ],
    }
    report.write_json(results, out_dir)
    timing = {"device": device, "warmup": args.warmup, "repeats": args.repeats, "errors": results["errors"]}
    def batch_of(n):
        return video_batch(config, n, frame, args.prompt_tokens, device, dtype, args.seed)

    def forward(batch):
        return lambda: model(**batch, use_cache=False, logits_to_keep=1).logits

    def vision(batch):
        return lambda: vl.visual(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"])

    vl = vl_model_of(model)
    with torch.no_grad():
        for row in results["lengths"]:
            n = row["video_tokens"]
            batch = batch_of(n)
            if not args.no_vision:
                log(f"[{n} video tokens] vision tower alone ...")
                row["vision"] = guarded(f"{n} vision", vision(batch), **timing)
                log(f"[{n} video tokens] vision {_cell(row['vision'], 'median_ms')} ms")
            log(f"[{n} video tokens] dense forward ...")
            row["dense"] = guarded(f"{n} dense", forward(batch), **timing)
            log(f"[{n} video tokens] dense {_cell(row['dense'], 'median_ms')} ms, peak "
                f"{_cell(row['dense'], 'peak_mb', 1024, 2)} GiB")
            del batch
            report.write_json(results, out_dir)
        t0 = time.perf_counter()
        convert_to_nsa(model, resolved["nsa"])
        synchronize(device)
        results["convert_s"] = time.perf_counter() - t0
        log(f"converted to NSA ({resolved['nsa'].selection}, {resolved['nsa'].backend}) in {results['convert_s']:.2f} s")
        for row in results["lengths"]:
            n = row["video_tokens"]
            batch = batch_of(n)
            log(f"[{n} video tokens] NSA forward (first call compiles) ...")
            row["nsa"] = guarded(f"{n} nsa", forward(batch), **timing)
            del batch
            summarise(row)
            log(f"[{n} video tokens] NSA {_cell(row['nsa'], 'median_ms')} ms, peak {_cell(row['nsa'], 'peak_mb', 1024, 2)} "
                f"GiB, speedup {_fmt(row.get('speedup'), 2)} (LM only {_fmt(row.get('lm_speedup'), 2)})")
            report.write_json(results, out_dir)
    report.write_json(results, out_dir)
    log(f"report: {write_markdown(results, out_dir)}")
    return 3 if results["errors"] else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        resolved = resolve(args)
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    slug = device_slug(device_name(resolved["device"]))
    out_dir = args.out or Path("profiling/runs") / f"{dt.datetime.now():%Y%m%d-%H%M%S}-model-{slug}"
    return run(resolved, args, argv, out_dir)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m profiling`: per-branch latency / memory sweep of the NSA op over context length.

With no arguments it runs anywhere: the full Q7B sweep (1K-128K, bf16, both selection modes,
fwd and fwd+bwd, SDPA + fla baselines) on a GPU; a small fp32 forward sweep on CPU (~1 min).
Exit codes: 0 done; 2 bad arguments; 3 a length did not fit in memory or a run failed (the
results gathered so far are still written).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from flexnsa import NSAConfig
from flexnsa.backends import flex as stages
from flexnsa.config import COMPRESSION_KERNELS, LAYOUTS, SELECTION_KERNELS, WINDOW_KERNELS

from . import report
from .baselines import fla_version, measure_fla, measure_sdpa
from .measure import FORMS, INPUTS, MODES, Shape, measure_nsa
from .timing import matmul_tflops
from .traces import write_trace

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASELINES = ("sdpa", "fla", "fla_cmp")
GPU_DEFAULTS = dict(lengths="1K-128K", dtype="bf16", selection="both", modes="fwd,fwd+bwd", baselines="sdpa,fla,fla_cmp", trace_lengths="32K")
CPU_DEFAULTS = dict(lengths="512,1K", dtype="fp32", selection="per_token", modes="fwd", baselines="sdpa", trace_lengths="512")


class UsageError(Exception):
    """Bad input to the CLI: message + exit code 2."""


def parse_length(text: str) -> int:
    text = text.strip().upper()
    mult = 1024 if text.endswith("K") else 1
    try:
        value = int(text[:-1] if mult > 1 else text) * mult
    except ValueError:
        raise UsageError(f"not a length: {text!r} (use e.g. 4096 or 4K)") from None
    if value <= 0:
        raise UsageError(f"lengths must be positive, got {text!r}")
    return value


def parse_lengths(text: str) -> list[int]:
    """'1K,2K,8K' or a doubling range '1K-128K'."""
    if "-" in text and "," not in text:
        lo, hi = (parse_length(x) for x in text.split("-", 1))
        if hi < lo:
            raise UsageError(f"empty length range {text!r}")
        out = [lo]
        while out[-1] * 2 <= hi:
            out.append(out[-1] * 2)
        return out
    return [parse_length(x) for x in text.split(",") if x.strip()]


def parse_choices(text: str, allowed, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if items == ["none"]:
        return []
    bad = [x for x in items if x not in allowed]
    if bad:
        raise UsageError(f"unknown {what} {bad}; choose from {list(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m profiling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--lengths", help="e.g. 1K-128K (doubling) or 4K,8K,16K")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES))
    p.add_argument("--inputs", choices=list(INPUTS), default="random",
                   help="random: i.i.d. normal q/k/v (unrelated selections per tile, the default); smooth: q and k "
                        "drift slowly along the tokens as video frames do (neighbouring tiles select overlapping blocks)")
    p.add_argument("--backend", choices=["flex", "reference"], default="flex", help="NSA backend (reference is O(T^2): short T only)")
    p.add_argument("--selection", choices=["per_token", "block_shared", "both"])
    p.add_argument("--layout", choices=list(LAYOUTS), default="auto")
    p.add_argument("--compression-kernel", choices=list(COMPRESSION_KERNELS), default="auto",
                   help="compression branch: Triton kernels or FlexAttention + PyTorch scorer")
    p.add_argument("--selection-kernel", choices=list(SELECTION_KERNELS), default="auto",
                   help="selection branch: Triton selected-block kernel or FlexAttention BlockMask")
    p.add_argument("--window-kernel", choices=list(WINDOW_KERNELS), default="auto",
                   help="window branch: the Triton selected-block kernels or FlexAttention BlockMask (auto: Triton on CUDA from 16K tokens)")
    for name, default in (("block-size", 64), ("stride", 64), ("select-block-size", 64), ("num-selected", 32),
                          ("window", 256), ("select-query-tile", 64), ("flex-block-q", 128), ("flex-block-kv", 128)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--modes", help="fwd,fwd+bwd")
    p.add_argument("--baselines", help="any of sdpa,fla,fla_cmp (fla's compression + top-n alone), or none")
    p.add_argument("--no-stages", action="store_true", help="time only the whole op")
    p.add_argument("--forms", default="eager",
                   help="how the op is called, any of eager (the default; stages timed), compiled (the whole op under "
                        "torch.compile(fullgraph=True); GPU only, no stages), cuda_graphs (CUDA-graph replays, "
                        "flexnsa.cuda_graphs; GPU only, no stages); variants other than eager are named <selection>+<form>")
    p.add_argument("--cuda-graphs", action="store_true", help="the same as --forms cuda_graphs")
    p.add_argument("--keep-compiles", action="store_true",
                   help="do not reset torch.compile between lengths: what a variable-length run sees "
                        "(kernels recompiled for a symbolic length); default: each length compiled on its own")
    p.add_argument("--trace-lengths", help="lengths to write torch.profiler traces for ('none' for none)")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--out", type=Path, help="results folder (default profiling/runs/<time>-<device>)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--report-from", type=Path, nargs="+", metavar="DIR",
                   help="measure nothing: merge these runs' results.json into --out and write its report and plots")
    return p


def pick_device(choice: str) -> torch.device:
    """--device auto|cpu|cuda -> the device; cuda without a GPU is a UsageError."""
    has_gpu = torch.cuda.is_available()
    if choice == "cuda" and not has_gpu:
        raise UsageError("--device cuda given but no CUDA GPU is available")
    return torch.device("cuda" if (choice == "cuda" or (choice == "auto" and has_gpu)) else "cpu")


def resolve(args) -> dict:
    """Validate arguments against the machine; raise UsageError with a clear message."""
    device = pick_device(args.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name]  # noqa: E731
    lengths = parse_lengths(pick("lengths"))
    modes = parse_choices(pick("modes"), MODES, "mode")
    baselines = parse_choices(pick("baselines"), BASELINES, "baseline")
    traces = [] if pick("trace_lengths") == "none" else parse_lengths(pick("trace_lengths"))
    fla_baselines = [b for b in baselines if b.startswith("fla")]
    if device.type == "cpu":
        if fla_baselines:
            raise UsageError("the fla baselines need a CUDA GPU (their kernels are Triton GPU kernels)")
        if "fwd+bwd" in modes and args.backend == "flex":
            raise UsageError("fwd+bwd with backend flex needs a GPU (FlexAttention on CPU is forward-only); "
                             "use --modes fwd or --backend reference")
    if fla_baselines and fla_version() is None:
        if args.baselines is not None:
            raise UsageError(f"--baselines {','.join(fla_baselines)} given but fla is not importable (pip install fla-core)")
        for name in fla_baselines:  # default sweep: fla only where installed (recorded in the report)
            baselines.remove(name)
    for name in ("batch", "q_heads", "kv_heads", "head_dim"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.q_heads % args.kv_heads:
        raise UsageError(f"--q-heads ({args.q_heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    selections = ["per_token", "block_shared"] if pick("selection") == "both" else [pick("selection")]
    try:
        variants = {
            s: NSAConfig(block_size=args.block_size, stride=args.stride, select_block_size=args.select_block_size,
                         num_selected=args.num_selected, window=args.window, select_query_tile=args.select_query_tile,
                         flex_block_q=args.flex_block_q, flex_block_kv=args.flex_block_kv, selection=s,
                         layout=args.layout, backend=args.backend, compression_kernel=args.compression_kernel,
                         selection_kernel=args.selection_kernel, window_kernel=args.window_kernel, check_inputs=False)
            for s in selections
        }
    except ValueError as e:
        raise UsageError(str(e)) from None
    forms = ["cuda_graphs"] if args.cuda_graphs else parse_choices(args.forms, FORMS, "forms")
    if not forms:
        raise UsageError("--forms needs at least one of " + ", ".join(FORMS))
    if device.type != "cuda" and forms != ["eager"]:
        # compiled: inductor's CPU lowering of the FlexAttention branches fails (torch 2.13); both are GPU measurements
        raise UsageError(f"--forms {','.join(f for f in forms if f != 'eager')} needs a CUDA GPU")
    named = {(name if form == "eager" else f"{name}+{form}"): (config, form) for form in forms for name, config in variants.items()}
    shape = Shape(args.batch, args.q_heads, args.kv_heads, args.head_dim, DTYPES[pick("dtype")], device, args.inputs)
    return dict(device=device, lengths=lengths, modes=modes, baselines=baselines, traces=traces, shape=shape,
                variants={name: config for name, (config, _) in named.items()},
                forms={name: form for name, (_, form) in named.items()})


def estimated_bytes(shape: Shape, seq_len: int, mode: str) -> int:
    """Rough peak of one NSA measurement: inputs, grads, 3 branch outputs + folded copies, scorer chunk."""
    elem = torch.finfo(shape.dtype).bits // 8
    tokens = shape.batch * seq_len
    inputs = tokens * ((shape.q_heads + 2 * shape.kv_heads) * shape.head_dim + 3 * shape.q_heads) * elem
    per_q = tokens * shape.q_heads * shape.head_dim * elem
    return inputs * (2 if mode == "fwd+bwd" else 1) + 10 * per_q + (1 << 30)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_slug(name: str) -> str:
    for tag in ("H100", "H200", "A100", "B200"):
        if tag in name.upper():
            return tag.lower()
    return "cpu" if name.startswith("CPU") else name.split()[-1].lower()


def git_state() -> tuple[str, bool]:
    """(commit, dirty). FLEXNSA_COMMIT, when set, wins: the GPU machine's copy of the tree can
    carry a stale .git (its HEAD was the session's first commit, "dirty" with later ones)."""
    if os.environ.get("FLEXNSA_COMMIT"):
        return os.environ["FLEXNSA_COMMIT"], False
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def device_stamp() -> dict:
    """GPU, torch, triton and commit: the stamp of every lever script's results file."""
    import triton

    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "commit": git_state()[0], "tuning_file": tuning_file()}


def tuning_file() -> dict | None:
    """The launch overrides of FLEXNSA_TUNING, if set: a run under them is not the commit's defaults."""
    path = os.environ.get("FLEXNSA_TUNING")
    return json.loads(Path(path).read_text()) if path else None


def metadata(run: dict, args_list: list[str]) -> dict:
    import triton

    device = run["device"]
    commit, dirty = git_state()
    tflops = matmul_tflops(device, run["shape"].dtype)
    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": fla_version(),
        "commit": commit,
        "dirty": dirty,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": args_list,
        "matmul_tflops": tflops,
        "tuning_file": tuning_file(),
        "timing": "triton.testing.do_bench median (CUDA events)" if device.type == "cuda" else "host perf_counter median (CPU)",
    }


def run_sweep(run: dict, results: dict, out_dir: Path, args) -> int:
    from tqdm import tqdm

    shape, shape_dict = run["shape"], results["shape"]
    timing = dict(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    tasks = [(T, m) for T in run["lengths"] for m in run["modes"]]
    bar = tqdm(total=len(tasks) * (len(run["variants"]) + len(run["baselines"])), desc="profiling", unit="run", file=sys.stderr)
    for i, (T, mode) in enumerate(tasks):
        if not args.keep_compiles and (i == 0 or tasks[i - 1][0] != T):
            # Each length compiled on its own, as a fixed-length run sees it: after a second length
            # dynamo recompiles the window's flex_attention with a symbolic T. Session 9 (NOTES): the
            # window stage at 128K fwd+bwd took 14.1 ms after 8K and 32K, 10.2 ms in a 128K-only run.
            torch._dynamo.reset()
        need, free = estimated_bytes(shape, T, mode), free_bytes(shape.device)
        if need > free:
            msg = f"T={T} ({mode}) does not fit in memory: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
            results["errors"].append(msg)
            bar.close()
            print(f"error: {msg}; results so far are in {out_dir}", file=sys.stderr)
            return 3
        jobs = [("nsa", v) for v in run["variants"]] + [("baseline", b) for b in run["baselines"]]
        for kind, name in jobs:
            bar.set_postfix_str(f"T={T} {mode} {name}")
            try:
                if kind == "nsa":
                    config, form = run["variants"][name], run["forms"][name]
                    stages = not args.no_stages and config.backend == "flex"
                    row = measure_nsa(shape, T, config, mode, stages=stages, form=form, **timing)
                    row["variant"] = name
                    report.annotate_flops(row, shape_dict, config)
                    results["nsa"].append(row)
                elif name == "sdpa":
                    results["baselines"].append(measure_sdpa(shape, T, mode, **timing))
                else:
                    cfg = next(iter(run["variants"].values()))
                    results["baselines"].append(measure_fla(shape, T, mode, cfg.select_block_size, cfg.num_selected, name=name, **timing))
            except torch.cuda.OutOfMemoryError:
                msg = f"T={T} ({mode}) {name}: out of GPU memory"
                results["errors"].append(msg)
                report.write_json(results, out_dir)
                bar.close()
                print(f"error: {msg}; results so far are in {out_dir}", file=sys.stderr)
                return 3
            finally:
                if kind == "nsa" and run["forms"][name] == "cuda_graphs":  # a capture's autograd.Function holds its graphs in a reference cycle:
                    gc.collect()  # free their memory pool before the next measurement (baselines' peaks)
                if shape.device.type == "cuda":
                    torch.cuda.empty_cache()
            report.write_json(results, out_dir)
            bar.update()
    bar.close()
    return 0


def merge_runs(folders: list[Path]) -> dict:
    """One results dict from several runs of the same shape (e.g. a sweep split across calls)."""
    import json

    runs = []
    for folder in folders:
        path = folder / "results.json"
        if not path.is_file():
            raise UsageError(f"no results.json in {folder}")
        runs.append(json.loads(path.read_text()))
    merged = runs[0]
    for other in runs[1:]:
        if other["shape"] != merged["shape"]:
            raise UsageError(f"cannot merge runs of different shapes: {merged['shape']} vs {other['shape']}")
        merged["variants"].update(other["variants"])
        for key in ("nsa", "baselines", "errors", "traces"):
            merged[key] += other[key]
        if other["meta"]["commit"] != merged["meta"]["commit"]:
            merged["errors"].append(f"merged runs come from commits {merged['meta']['commit']} and {other['meta']['commit']}")
    merged["nsa"].sort(key=lambda r: (r["variant"], r["mode"], r["seq_len"]))
    merged["baselines"].sort(key=lambda r: (r["name"], r["mode"], r["seq_len"]))
    return merged


def report_only(args) -> int:
    if args.out is None:
        print("error: --report-from needs --out", file=sys.stderr)
        return 2
    try:
        results = merge_runs(args.report_from)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report.write_json(results, args.out)
    if not args.no_plots and results["nsa"]:
        report.write_plots(results, args.out)
    print(f"report: {report.write_markdown(results, args.out)}", file=sys.stderr)
    return 0


def variant_record(config: NSAConfig, shape: Shape) -> dict:
    """The config as given, plus the layout that ``auto`` resolved to on this device."""
    layout = stages.query_layout(config, shape.device, shape.q_heads // shape.kv_heads)
    return {**dataclasses.asdict(config), "resolved_layout": layout.name}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.report_from:
        return report_only(args)
    try:
        run = resolve(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = metadata(run, argv)
    out_dir = args.out or Path("profiling/runs") / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{device_slug(meta['device_name'])}"
    shape = run["shape"]
    results = {
        "meta": meta,
        "shape": {"batch": shape.batch, "q_heads": shape.q_heads, "kv_heads": shape.kv_heads,
                  "head_dim": shape.head_dim, "dtype": str(shape.dtype).replace("torch.", ""), "device": shape.device.type,
                  "inputs": shape.inputs},
        "variants": {k: {**variant_record(v, shape), "form": run["forms"][k]} for k, v in run["variants"].items()},
        "nsa": [], "baselines": [], "errors": [], "traces": [],
    }
    if fla_version() is None and shape.device.type == "cuda":
        results["errors"].append("fla baseline skipped: fla is not importable here")
    print(f"profiling on {meta['device_name']} -> {out_dir}", file=sys.stderr)
    status = run_sweep(run, results, out_dir, args)
    if status == 0:
        for T in run["traces"]:
            for name, config in run["variants"].items():
                if run["forms"][name] != "eager":  # the trace profiles the eager op's pieces
                    continue
                mode = run["modes"][-1]
                results["traces"].append(str(write_trace(shape, T, config, name, mode, out_dir / "traces")))
    report.write_json(results, out_dir)
    if not args.no_plots and results["nsa"]:
        report.write_plots(results, out_dir)
    path = report.write_markdown(results, out_dir)
    print(f"report: {path}", file=sys.stderr)
    return status

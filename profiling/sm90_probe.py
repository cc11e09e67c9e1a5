"""The Gluon sm_90 compression forward (NOTES Lever 46) against the Triton forward: correctness
against the float64 reference on small shapes, then both timed at the Q7B shape in alternated
rounds (do_bench medians in one process). Variant modules are files with the same
``compression_attention_fwd_sm90`` entry point (scratch copies of the kernel with another schedule).

    python -m profiling.sm90_probe --out DIR [--variants a.py,b.py] [--tunings JSON]   (sm_90 GPU only)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from flexnsa import NSAConfig
from flexnsa.compression import compress_kv
from flexnsa.reference import compression_visibility, masked_attention
from flexnsa.triton_fallback import compression_attention as cmp_kernels
from flexnsa.triton_fallback import compression_forward_sm90

from .cli import device_stamp, parse_lengths
from .kernel_tuning import rel
from .measure import q7b_shape, random_inputs
from .timing import median_ms

# (Hq, Hkv, T, D, block, stride): G = 7 and 1, T not a multiple of 64, T < block, tiles that see nothing
CHECKS = [(28, 4, 5000, 128, 64, 64), (7, 1, 3000, 64, 32, 16)]  # (head_dim 64-256 only: ``supported``)


def load_variant(path: str):
    if path == "rule":
        return compression_forward_sm90
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(fwd, dtype) -> dict:
    """Max relative error (out) and max abs lse error over CHECKS against the float64 reference."""
    worst = {"out": 0.0, "lse": 0.0, "lse_inf_mismatch": 0}
    for Hq, Hkv, T, D, block, stride in CHECKS:
        cfg = NSAConfig(block_size=block, stride=stride, select_block_size=block, select_query_tile=block, num_selected=4)
        g = torch.Generator(device="cuda").manual_seed(T)
        q = torch.randn(1, Hq, T, D, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(1, Hkv, T, D, device="cuda", dtype=dtype, generator=g)
        v = torch.randn(1, Hkv, T, D, device="cuda", dtype=dtype, generator=g)
        kc, vc = compress_kv(k, v, cfg)
        out, lse = fwd(q, kc, vc, block, stride, D**-0.5)
        visible = compression_visibility(torch.arange(T), kc.shape[2], cfg)
        ref, _, ref_lse = masked_attention(*(x.double().cpu() for x in (q, kc, vc)), visible, D**-0.5)
        worst["out"] = max(worst["out"], rel(out.cpu(), ref))
        finite = torch.isfinite(ref_lse)
        worst["lse_inf_mismatch"] += int((torch.isfinite(lse.cpu()) != finite).sum())
        worst["lse"] = max(worst["lse"], (lse.cpu()[finite].double() - ref_lse[finite]).abs().max().item())
    return worst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m profiling.sm90_probe")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lengths", default="128K")
    p.add_argument("--variants", default="rule", help="comma list: 'rule' (the package's kernel) or module files")
    p.add_argument("--tunings", default='[{}]', help="JSON list of tuning dicts, each tried with every variant")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    shape = q7b_shape(torch.bfloat16, device)
    cfg = NSAConfig(check_inputs=False)
    runs = [(path, tune) for path in args.variants.split(",") for tune in json.loads(args.tunings)]
    result = {"device": device_stamp(), "variants": []}
    for path, tune in runs:
        mod = load_variant(path)
        entry = {"variant": path, "tuning": tune}
        try:
            entry["check_bf16"] = check(lambda *a: mod.compression_attention_fwd_sm90(*a, tuning=tune), torch.bfloat16)
        except Exception as e:  # a variant that does not compile or launch is recorded, not fatal
            entry["error"] = f"{type(e).__name__}: {e}"[:2000]
        result["variants"].append(entry)
        print(json.dumps(entry), flush=True)
        (args.out / "sm90_probe.json").write_text(json.dumps(result, indent=1))  # kept as it goes: a cut run still reports
    timings = []
    for T in parse_lengths(args.lengths):
        q, k, v, _ = random_inputs(shape, T, seed=0, requires_grad=False)
        kc, vc = (x.contiguous() for x in compress_kv(k, v, cfg))
        scale = cfg.softmax_scale(q.shape[-1])
        ref_out, ref_lse = cmp_kernels.compression_attention_fwd(q, kc, vc, cfg.block_size, cfg.stride, scale)
        calls = {"triton": lambda: cmp_kernels.compression_attention_fwd(q, kc, vc, cfg.block_size, cfg.stride, scale)}
        for (path, tune), entry in zip(runs, result["variants"]):
            if "error" in entry:
                continue
            mod = load_variant(path)
            name = f"{Path(path).stem}:{json.dumps(tune, sort_keys=True)}"
            fn = (lambda m, t: lambda: m.compression_attention_fwd_sm90(q, kc, vc, cfg.block_size, cfg.stride, scale, tuning=t))(mod, tune)
            out, lse = fn()
            entry.setdefault("vs_triton", {})[T] = {"out": rel(out, ref_out), "lse": rel(lse, ref_lse)}
            calls[name] = fn
        for r in range(args.rounds):
            for name, fn in calls.items():
                ms = median_ms(fn, device)
                timings.append({"T": T, "round": r, "kernel": name, "ms": ms})
                print(f"T={T} round {r} {name}: {ms:.3f} ms", flush=True)
                result["timings"] = timings
                (args.out / "sm90_probe.json").write_text(json.dumps(result, indent=1))
    result["timings"] = timings
    (args.out / "sm90_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

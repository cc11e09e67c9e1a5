"""Launch tuning of the Triton kernels at the Q7B shape (profiling/NOTES.md, Levers 10, 12):
each kernel's tile knobs changed one kernel at a time, the pass it belongs to timed (forward, or
the whole backward; the group-score kernel as the whole scores + top-n stage), and its outputs
compared with the default's so a broken variant shows.

    python -m profiling.kernel_tuning --lengths 128K --out DIR   (GPU only)

Variants that do not fit (shared memory, registers) are recorded as failed, not fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from pathlib import Path

import torch

from flexnsa import NSAConfig
from flexnsa.backends import flex as stages
from flexnsa.block_masks import selection_rows
from flexnsa.compression import compress_kv
from flexnsa.importance import importance_top_n
from flexnsa.triton_fallback import compression_attention as cmp_kernels
from flexnsa.triton_fallback import compression_scores as score_kernels
from flexnsa.triton_fallback import selection_attention as slc_kernels

from .cli import device_stamp, parse_lengths
from .measure import Shape, q7b_shape, random_inputs
from .timing import median_ms

PADDED = {"packed": False}  # Lever 19's A/B: tiles padded to 8 head slots per token
CMP_VARIANTS = {  # knobs for one compression kernel (rows, block_c, warps, stages)
    # session 17: K~/V~ chunks by TMA ("tma", the rule) take the forward's registers from 232 to 175
    # (sm_90 SASS); 64 rows x 4 warps x 2 stages then fit 2 CTAs per SM (83 KB, 174 registers)
    # the Triton forward's knobs apply where the Gluon rule does not run ("gluon_ws": false on sm_90)
    "fwd": [dict(rows=r, block_c=c, num_warps=w, num_stages=s, gluon_ws=False) for r, c, w, s in
            [(128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 4), (64, 64, 4, 2), (64, 64, 4, 3), (128, 128, 8, 2),
             (64, 32, 4, 2)]]
           + [{"tma": False, "gluon_ws": False}, dict(PADDED, gluon_ws=False)]
           # Levers 47-48, 50 (sm_90; "persistent" the rule since session 23): the Triton forward and each
           # Gluon variant against the rule, --match '^\{"gluon_ws"'
           + [{"gluon_ws": False}, {"gluon_ws": True}, {"gluon_ws": "pingpong"}, {"gluon_ws": "persistent"}],
    "dq": [dict(rows=r, block_c=c, num_warps=w, num_stages=s) for r, c, w, s in
           [(128, 64, 8, 2), (128, 32, 8, 2), (128, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3)]]
          + [{"tma": False}, PADDED],
    # Lever 36 (head-major tiles, q/dO by TMA): rows = tokens of one head per step
    "dkv": [dict(rows=r, block_c=c, num_warps=w, num_stages=s) for r, c, w, s in
            [(128, 64, 8, 2), (64, 128, 8, 2), (64, 32, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2)]]
           + [{"programs": 1024}, {"programs": 8192}, {"head_major": False}, {"tma": False}]  # programs: the split floor of the token axis
           + [{"relaxed": False}],  # Lever 44 (the rule since session 21): the splits' partial sums by acq_rel atomics
}
# PADDED for selection: Lever 26's A/B (whole tokens x 8 head slots per program instead of packed rows).
# TMA: Lever 31's A/B (K/V blocks by descriptor loads), alone and with the tile shapes it may favour.
TMA_VARIANTS = [{"tma": True}, {"tma": True, "num_stages": 3}, {"tma": True, "rows": 128, "num_warps": 8},
                {"tma": True, "rows": 128, "num_warps": 8, "num_stages": 3}]
# Lever 43 (relaxed atomics and 4096-token groups the rule since session 20; --match 'group|relaxed'):
# the order before it, each half of it, other group sizes
LEVER43_VARIANTS = [{"group": 0}, {"group": 0, "relaxed": False}, {"relaxed": False}]
SLC_VARIANTS = {
    "fwd": [dict(rows=r, num_warps=w, num_stages=s) for r, w, s in
            [(128, 4, 2), (128, 8, 2), (128, 4, 3), (128, 8, 3), (128, 8, 4), (64, 4, 2), (64, 4, 3), (32, 4, 2), (64, 2, 2), (64, 8, 2)]]
           + [PADDED] + TMA_VARIANTS + [{"num_stages": 1}],  # Lever 55: no K/V prefetch, 3 CTAs per SM (49 KB)
    "dq": [dict(rows=r, num_warps=w, num_stages=s) for r, w, s in
           [(128, 4, 2), (128, 8, 2), (32, 4, 2), (64, 4, 3), (64, 4, 1), (64, 2, 2), (32, 2, 2), (64, 8, 2)]]
          + [PADDED] + TMA_VARIANTS + [{"num_stages": 1}],
    # Lever 36 (block-shared: one head's 64-token tile per step, q/dO by TMA; "rows" does not apply)
    "dkv": [dict(num_warps=w, num_stages=s) for w, s in [(4, 3), (4, 4), (8, 2), (8, 3), (2, 2)]]
           + [{"chunk": 8}, {"chunk": 32}, {"head_major": False}, {"tma": False}]
           + LEVER43_VARIANTS + [{"group": g} for g in (2048, 8192, 16384)],
}

SCORE_VARIANTS = {
    "scores": [dict(rows=r, block_c=c, num_warps=w, num_stages=s) for r, c, w, s in
               [(128, 64, 8, 2), (128, 64, 4, 2), (128, 32, 4, 2), (64, 64, 4, 2), (128, 128, 8, 2), (128, 64, 8, 3),
                (256, 64, 8, 2), (64, 32, 4, 3), (128, 32, 4, 2)]]
              # Lever 30: packed rows (no head slot padded), block-shared tile sums
              + [{"packed": True}, {"packed": True, "rows": 64}, {"packed": True, "num_warps": 8}]
              # Lever 32: packed per-token scores (--ops scores:per_token; head sum by an indicator matmul at G = 7)
              + [{"packed_per_token": True}, {"packed_per_token": True, "num_warps": 8}, {"packed_per_token": True, "block_c": 32}]
              # Lever 38: head-major tile sums (one head's 64 tokens at a time, the G heads looped inside, one row per
              # tile; q by TMA boxes unless "tma": False), --ops scores:block_shared --match head_major
              + [{"head_major": True, **change} for change in
                 [{}, {"block_c": 32}, {"block_c": 128}, {"block_c": 128, "num_warps": 8}, {"num_warps": 8}, {"num_stages": 3},
                  {"tma": False}, {"tma": False, "num_stages": 3}, {"tma": False, "block_c": 32}]]
              # Lever 42 (the rule since session 19: K~ chunks by TMA): the pointer loads against it, and
              # deeper or wider chunks by TMA, --match tma_k
              + [{"tma_k": False}] + [{"tma_k": True, **change} for change in [{"num_stages": 3}, {"block_c": 128, "num_warps": 8}]]
              # Lever 51: G = 7 as head parts 4 + 2 + 1 (no slot padded), at 2 CTAs per SM (179 registers) and capped
              # to 3 (168), --match split_heads
              + [{"split_heads": True, **change} for change in
                 [{}, {"maxnreg": 168}, {"num_stages": 3}, {"num_stages": 3, "maxnreg": 168}, {"block_c": 32, "maxnreg": 168}]]
              + [{"split_heads": False, "maxnreg": 168}]
              # Lever 52: the persistent warp-specialised Gluon scorer (sm_90, given lse, whole tiles), --match gluon
              + [{"gluon": True}, {"gluon": "pipelined"}]  # Lever 54: each consumer's chunks in pairs, --match gluon
              # the convoy test (NOTES session 25, Next 1): deeper K~ rings only to lower the CTAs per SM
              # (sm_90 shared memory: 2 stages 66 KB = 3 CTAs, 3 stages 83 KB = 2, 6 stages 132 KB = 1),
              # --match '^\{("tma_k": true, )?"num_stages": [36]\}$' (the 3-stage one is Lever 42's variant)
              + [{"num_stages": 6}],
}

# Per-token programs are one token's G heads in 16 rows whatever "rows" says (only warps, stages,
# chunk), except dK/dV with "entries" (the default), which packs several tokens' rows into "rows".
SLC_PER_TOKEN_VARIANTS = {
    "fwd": [dict(num_warps=w, num_stages=s) for w, s in [(2, 2), (8, 2), (4, 3), (4, 4), (4, 1)]] + TMA_VARIANTS[:2],
    "dq": [dict(num_warps=w, num_stages=s) for w, s in [(2, 2), (8, 2), (4, 3), (4, 1)]] + TMA_VARIANTS[:2],
    "dkv": [dict(num_warps=w, num_stages=s) for w, s in [(2, 2), (8, 2), (4, 3), (4, 1)]]
           + [{"chunk": 64}, {"chunk": 256}, {"rows": 128}]
           # Lever 27's A/B: one token's 7 rows in 16 per dK/dV iteration instead of 9 tokens' in 64
           + [{"entries": False}, {"entries": False, "chunk": 64}]
           + LEVER43_VARIANTS + [{"group": g} for g in (1024, 16384)],
}


@contextlib.contextmanager
def tuned(module, kernel: str, changes: dict):
    """Temporarily change one kernel's knobs."""
    saved = dict(module.TUNING[kernel])
    module.TUNING[kernel].update(changes)
    try:
        yield
    finally:
        module.TUNING[kernel].clear()
        module.TUNING[kernel].update(saved)


def best_overrides(rows: list[dict], margin: float = 0.97) -> dict:
    """{family: {kernel: knobs}}: per kernel, the fastest block-shared variant when it takes less
    than ``margin`` of the default pass's time (3% faster by default; the FLEXNSA_TUNING file format),
    both at the longest length measured (the shape the defaults are tuned at; a shorter length's
    variant against the longest one's default would always "win")."""
    best: dict = {}
    longest = max((r["seq_len"] for r in rows), default=0)
    for family in ("compression", "selection", "scores"):
        mine = [r for r in rows if r["op"] == family and r["selection"] == "block_shared" and "ms" in r
                and r["seq_len"] == longest]
        default = {r["pass"]: r["ms"] for r in mine if r["kernel"] == "default"}
        for kernel in ("fwd", "dq", "dkv", "scores"):
            tried = [r for r in mine if r["kernel"] == kernel]
            if tried and default:
                fastest = min(tried, key=lambda r: r["ms"])
                if fastest["ms"] < margin * default[fastest["pass"]]:
                    best.setdefault(family, {})[kernel] = fastest["change"]
    return best


def rel(a, b) -> float:
    """Relative L2 difference over the finite entries (an lse is -inf where nothing is visible)."""
    a, b = a.float(), b.float()
    keep = torch.isfinite(b)
    return ((a[keep] - b[keep]).norm() / b[keep].norm().clamp_min(1e-30)).item()


def passes(op: str, q, k, v, cfg: NSAConfig, selected):
    """(forward, backward or None) callables of one kernel family on fixed inputs."""
    scale = cfg.softmax_scale(q.shape[-1])
    if op == "scores":
        kc, vc = (x.contiguous() for x in compress_kv(k, v, cfg))
        lse = cmp_kernels.compression_attention_fwd(q, kc, vc, cfg.block_size, cfg.stride, scale)[1]
        return (lambda: importance_top_n(q, kc, cfg, lse)), None  # with the compression lse, as the op runs it
    if op == "compression":
        kc, vc = (x.contiguous() for x in compress_kv(k, v, cfg))
        fwd = lambda: cmp_kernels.compression_attention_fwd(q, kc, vc, cfg.block_size, cfg.stride, scale)  # noqa: E731
        out, lse = fwd()
        grad = torch.randn_like(out)
        bwd = lambda: cmp_kernels.compression_attention_bwd(q, kc, vc, out, lse, grad, cfg.block_size, cfg.stride, scale)  # noqa: E731
    else:
        rows = selection_rows(selected, cfg).contiguous()
        tile = cfg.select_query_tile if cfg.selection == "block_shared" else 1
        fwd = lambda: slc_kernels.selection_attention_fwd(q, k, v, rows, cfg.select_block_size, tile, scale)  # noqa: E731
        out, lse = fwd()
        grad = torch.randn_like(out)
        bwd = lambda: slc_kernels.selection_attention_bwd(q, k, v, rows, out, lse, grad, cfg.select_block_size, tile, scale)  # noqa: E731
    return fwd, bwd


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m profiling.kernel_tuning")
    p.add_argument("--lengths", default="128K")
    p.add_argument("--ops", default="compression:block_shared,selection:block_shared,selection:per_token")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="a tiny fp32 shape with 16-token blocks (checks the script on CPU)")
    p.add_argument("--match", default=None, help="only the variants whose knobs (as JSON) match this regex; the defaults always run")
    p.add_argument("--kernels", default=None, help="only these kernels' variants (comma list of fwd,dq,dkv,scores)")
    p.add_argument("--best-margin", type=float, default=0.97,
                   help="best.json keeps a kernel's fastest variant when it takes less than this fraction of the default's time")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = Shape(1, 7, 1, 16, torch.float32, device) if args.tiny else q7b_shape(torch.bfloat16, device)
    small = dict(block_size=16, stride=16, select_block_size=16, select_query_tile=16, num_selected=4) if args.tiny else {}
    rows = []
    for T in parse_lengths(args.lengths):
        q, k, v, _ = random_inputs(shape, T, seed=0, requires_grad=False)
        for spec in args.ops.split(","):
            op, selection = spec.split(":")
            cfg = NSAConfig(selection=selection, check_inputs=False, compression_kernel="triton", **small)
            with torch.no_grad():
                selected, _ = stages.score_and_select(q, stages.compress(k, v, cfg)[0], cfg)
            module, variants = {"compression": (cmp_kernels, CMP_VARIANTS), "selection": (slc_kernels, SLC_VARIANTS),
                                "scores": (score_kernels, SCORE_VARIANTS)}[op]
            if op == "selection" and selection == "per_token":
                variants = SLC_PER_TOKEN_VARIANTS
            fwd, bwd = passes(op, q, k, v, cfg, selected)
            base = {"fwd": fwd(), "bwd": bwd() if bwd else None}
            runs = [("default", "fwd", {})] + ([("default", "bwd", {})] if bwd else [])
            runs += [(kernel, "bwd" if kernel in ("dq", "dkv") else "fwd", change) for kernel, knobs in variants.items() for change in knobs
                     if (args.match is None or re.search(args.match, json.dumps(change)))
                     and (args.kernels is None or kernel in args.kernels.split(","))]
            for kernel, which, change in runs:
                fn = fwd if which == "fwd" else bwd
                record = {"seq_len": T, "op": op, "selection": selection, "kernel": kernel, "change": change, "pass": which}
                try:
                    with tuned(module, kernel if kernel != "default" else next(iter(module.TUNING)), change):
                        res = fn()
                        record["rel_diff_vs_default"] = max(rel(a, b) for a, b in zip(res, base[which]) if a.is_floating_point())
                        if op == "scores":  # selections may differ only at near-ties
                            record["same_ids"] = (res[0] == base[which][0]).float().mean().item()
                        record["ms"] = median_ms(fn, device, rep_ms=150)
                except Exception as e:  # a variant that does not compile or fit is data, not a crash
                    record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                rows.append(record)
                shown = f"{record['ms']:8.3f} ms (diff {record['rel_diff_vs_default']:.1e})" if "ms" in record else record["error"]
                print(f"T={T} {op:11s} {selection:12s} {kernel:7s} {which} {json.dumps(change):60s} {shown}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    defaults = {"compression": cmp_kernels.TUNING, "selection": slc_kernels.TUNING, "scores": score_kernels.TUNING}
    meta = device_stamp() | {"defaults": defaults}
    (args.out / "kernel_tuning.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    best = best_overrides(rows, args.best_margin)
    (args.out / "best.json").write_text(json.dumps(best, indent=1))
    print("best (FLEXNSA_TUNING file):", json.dumps(best), flush=True)


if __name__ == "__main__":
    main()

"""Lever experiment for importance + top-n (profiling/NOTES.md, Lever 7): at the Q7B shape, the
fused scores + top-n kernel (4 or 8 warps) against the chunked path (Triton group-score kernel
writing [Hkv, T_chunk, C] fp32 + PyTorch top-n) and against the group-score kernel alone (the
fused kernel's work minus its top-n merge, plus one score write).

``--given-lse`` times instead the path the op runs (the compression branch's lse handed to the
scorer), padded against packed rows at several ``importance.CHUNK_ELEMENTS`` (NOTES Lever 35:
packed tile sums write 7 partial rows per tile instead of 4, so the same bound cuts 128K into 4
scorer launches instead of 2).

    python -m profiling.top_n_levers --lengths 32K,128K --out DIR   (GPU only)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import torch

from flexnsa import NSAConfig, importance
from flexnsa.compression import compress_kv
from flexnsa.triton_fallback import compression_scores, selection_top_n
from flexnsa.triton_fallback.compression_attention import compression_attention_fwd

from .cli import device_stamp, parse_lengths
from .timing import median_ms


def variants(q, k_cmp, cfg: NSAConfig) -> dict:
    tile = cfg.select_query_tile if cfg.selection == "block_shared" else 1
    scale = cfg.softmax_scale(q.shape[-1])
    fused = lambda warps: lambda: selection_top_n.launch(  # noqa: E731
        q, k_cmp, cfg.block_size, cfg.num_selected, tile, cfg.forced_initial, cfg.forced_local, scale, 64, num_warps=warps)

    def chunked():
        return importance.importance_top_n(q, k_cmp, cfg)

    def group_scores_only():
        step = importance._chunk_tokens(q.shape[0] * k_cmp.shape[1] * k_cmp.shape[2], tile)
        for t0 in range(0, q.shape[2], step):
            compression_scores.compression_group_scores(q, k_cmp, cfg.block_size, cfg.stride, scale, t0, min(q.shape[2], t0 + step))

    return {"fused_4warps": fused(4), "fused_8warps": fused(8), "chunked": chunked, "group_scores_only": group_scores_only}


def given_lse_variants(q, k_cmp, cfg: NSAConfig) -> dict:
    """The op's scores + top-n stage (the compression lse given), per (rows, chunk bound)."""
    lse = compression_attention_fwd(q, k_cmp, k_cmp, cfg.block_size, cfg.stride, cfg.softmax_scale(q.shape[-1]))[1]

    def stage(packed, chunk):
        def run():
            with mock.patch.object(compression_scores, "PACKED", packed), mock.patch.object(importance, "CHUNK_ELEMENTS", chunk):
                return importance.importance_top_n(q, k_cmp, cfg, lse)
        return run

    packings = (False, True) if cfg.selection == "block_shared" else (False,)  # PACKED is the tile sums' rule
    return {f"{'packed' if packed else 'padded'}_chunk2^{chunk.bit_length() - 1}": stage(packed, chunk)
            for packed in packings for chunk in (1 << 25, 1 << 26, 1 << 27)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m profiling.top_n_levers")
    p.add_argument("--lengths", default="32K,128K")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--given-lse", action="store_true", help="the op's path: padded vs packed rows, chunk bounds")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    rows = []
    for T in parse_lengths(args.lengths):
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, 28, T, 128, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, 4, T, 128, device=device, dtype=torch.bfloat16, generator=gen)
        for selection in ("block_shared", "per_token"):
            cfg = NSAConfig(selection=selection, check_inputs=False)
            k_cmp, _ = compress_kv(k, k, cfg)
            with torch.no_grad():
                table = given_lse_variants(q, k_cmp, cfg) if args.given_lse else variants(q, k_cmp, cfg)
                for name, fn in table.items():
                    fn()
                    ms = median_ms(fn, device, rep_ms=200)
                    rows.append({"seq_len": T, "selection": selection, "variant": name, "ms": ms})
                    print(f"T={T} {selection:12s} {name:18s} {ms:9.3f} ms", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = device_stamp()
    (args.out / ("top_n_given_lse.json" if args.given_lse else "top_n_levers.json")).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

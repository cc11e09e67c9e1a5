"""The Gluon compression forward's, the Triton scorer's and the selection forward's sm_90 machine
code, compiled on any machine (no GPU needed).

Why: whether the Hopper kernels overlap the softmax with the tensor cores is decided by ptxas,
not by the source (NOTES Levers 46-48). This script compiles ``compression_forward_sm90`` for
sm_90 with the installed triton and its bundled ptxas / nvdisasm, then reports what decides that
overlap: registers, spills, ptxas's wgmma serialisation warning (C7514), and the order of the
MMA issues (HGMMA), their waits (WARPGROUP.DEPBAR), mbarrier arrives and softmax exponentials
(MUFU.EX2) in program order, and per-opcode counts (``opcode_counts``: how variants of one kernel
differ, NOTES Lever 53). ``tests/test_sm90_sass.py`` holds the ping-pong's order to it.

    python -m profiling.sm90_sass [--pingpong | --persistent] [--rows 128 --block-c 64 --head-dim 128 --group 7 --stages 3]
    python -m profiling.sm90_sass --scorer | --selection [--window 256]   # the Triton scorer, selection / window forward
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

EVENTS = {"HGMMA": "mma", "WARPGROUP.DEPBAR": "wait", "SYNCS.ARRIVE": "arrive", "MUFU.EX2": "exp",
          "SYNCS.PHASECHK": "mbarrier_wait"}


def compile_forward(rows=128, block_c=64, head_dim=128, group=7, stages=3, pingpong=False, maxnreg=168,
                    persistent=False) -> dict:
    """{"registers", "spill_bytes", "threads", "setmaxnreg", "shared_bytes", "serialised" (ptxas C7514),
    "ptxas_log", "sass"} of the warp-specialised forward at these constants (bf16, l = s = 64)."""
    from triton.experimental.gluon import language as gl

    from flexnsa.triton_fallback import compression_forward_sm90 as sm90

    layout = gl.NVMMASharedLayout.get_default_for([block_c, head_dim], gl.bfloat16)
    desc = f"tensordesc<bf16[{block_c}, {head_dim}],{layout!r}>"
    signature = {"Q": "*bf16", "K": desc, "V": desc, "O": "*bf16", "LSE": "*fp32"}
    ints = ("sq_b", "sq_h", "sq_t", "so_b", "so_h", "so_t", "sl_b", "sl_h", "T", "C", "HKV") + (("B",) if persistent else ())
    signature |= {name: "i32" for name in ints}
    signature["qk_scale"] = "fp32"
    constants = dict(G=group, BLOCK_T=rows // group, ROWS=rows, BLOCK_C=block_c, D=head_dim, CMP_BLOCK=64, CMP_STRIDE=64,
                     STAGES=stages, num_warps=4)
    if not persistent:
        constants["PINGPONG"] = pingpong
    fn = sm90._cmp_fwd_persistent_kernel if persistent else sm90._cmp_fwd_ws_kernel
    aligned = ("Q", "O", "LSE", "sq_b", "sq_h", "sq_t", "so_b", "so_h", "so_t", "sl_b", "sl_h")
    return _compile(fn, signature, constants, aligned, {"num_warps": 4, "maxnreg": maxnreg}, gluon=True)


def _compile(fn, signature: dict, constants: dict, aligned, options: dict, gluon: bool) -> dict:
    """``_compiled_report`` of ``fn`` (a Gluon or Triton kernel) compiled for sm_90 with these
    argument types and constants (added to the signature as constexprs); ``aligned``: the
    arguments the launcher's specialisation proves 16-byte aligned at the Q7B shape."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    signature = signature | {name: "constexpr" for name in constants}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = (GluonASTSource if gluon else ASTSource)(fn, signature, constants, attrs)
    return _compiled_report(triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options))


def _compiled_report(kernel) -> dict:
    """registers, spills, shared bytes, ptxas's wgmma serialisation warning and the SASS of a
    compiled kernel (ptxas re-run with -v for its resource log)."""
    from triton.backends.nvidia.compiler import get_ptxas

    bin_dir = os.path.dirname(get_ptxas(90).path)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        log = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "v.cubin")],
                             capture_output=True, text=True).stderr
        sass = subprocess.run([os.path.join(bin_dir, "nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    threads = kernel.metadata.num_warps * 32  # warp-specialised: all partitions, rounded up to warpgroups
    return {"registers": int(registers.group(1)) if registers else None, "spill_bytes": int(spills.group(1)) if spills else None,
            "threads": threads, "shared_bytes": kernel.metadata.shared, "serialised": "C7514" in log, "ptxas_log": log,
            "sass": sass, "setmaxnreg": sorted({int(n) for n in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+);",
                                                                          kernel.asm["ptx"])})}


def compile_scorer(block_c=64, head_dim=128, group=7, stages=2) -> dict:
    """``compile_forward``'s report for the Triton scorer ``_group_scores_kernel`` as the op runs it
    at Q7B (padded 16 tokens x 8 head slots, lse given, whole-tile sums, K~ by TMA, bf16)."""
    from flexnsa.triton_fallback import compression_scores as scores

    g_pad = 1 << (group - 1).bit_length()
    block_t = 128 // g_pad
    signature = {"Q": "*bf16", "K": f"tensordesc<bf16[1, 1, {block_c}, {head_dim}]>", "LSE": "*fp32", "SCORES": "*fp32"}
    ints = ("sq_b", "sq_h", "sq_t", "sk_b", "sk_h", "sk_c", "sl_b", "sl_h", "ss_b", "ss_h", "ss_t", "T0", "T1", "C")
    signature |= {name: "i32" for name in ints} | {"scale": "fp32", "N_OUT": "i32"}
    constants = dict(G=group, G_PAD=g_pad, BLOCK_T=block_t, BLOCK_C=block_c, D=head_dim, CMP_BLOCK=64, CMP_STRIDE=64,
                     SUM=block_t, GIVEN_LSE=True, PACKED=False, ROWS=128, OUT_ROWS=1, SEGMENTED=False, TMA_K=True)
    aligned = ("Q", "LSE", "SCORES", "sq_b", "sq_h", "sq_t", "sl_b", "sl_h", "ss_b", "ss_h", "ss_t")
    return _compile(scores._group_scores_kernel, signature, constants, aligned, {"num_warps": 4, "num_stages": stages},
                    gluon=False)


def compile_gluon_scorer(pipelined=False, head_dim=128, group=7) -> dict:
    """``compile_forward``'s report for the Gluon scorer ``_scores_persistent_kernel`` (NOTES Lever
    52; ``pipelined``: two chunks' MMAs in flight per consumer) at Q7B tiles (16 tokens x 8 head
    slots, 64-block chunks, bf16)."""
    from triton.experimental.gluon import language as gl

    from flexnsa.triton_fallback import compression_scores_sm90 as sm90

    block_c = sm90.TUNING["block_c"]
    layout = gl.NVMMASharedLayout.get_default_for([block_c, head_dim], gl.bfloat16)
    signature = {"Q": "*bf16", "K": f"tensordesc<bf16[{block_c}, {head_dim}],{layout!r}>", "LSE": "*fp32", "SCORES": "*fp32"}
    ints = ("sq_b", "sq_h", "sq_t", "sl_b", "sl_h", "ss_b", "ss_h", "ss_t", "T0", "T", "C", "HKV", "B")
    signature |= {name: "i32" for name in ints} | {"qk_scale": "fp32"}
    g_pad = 1 << (group - 1).bit_length()
    maxnreg, worker_regs = sm90.register_budget(pipelined)
    constants = dict(G=group, G_PAD=g_pad, BLOCK_T=sm90.TUNING["rows"] // g_pad, BLOCK_C=block_c, D=head_dim, CMP_BLOCK=64,
                     CMP_STRIDE=64, STAGES=sm90.TUNING["stages"], PIPELINED=pipelined, WORKER_REGS=worker_regs, num_warps=4)
    aligned = ("Q", "LSE", "SCORES", "sq_b", "sq_h", "sq_t", "sl_b", "sl_h", "ss_b", "ss_h", "ss_t")
    return _compile(sm90._scores_persistent_kernel, signature, constants, aligned, {"num_warps": 4, "maxnreg": maxnreg},
                    gluon=True)


def compile_selection_forward(window=0, n_sel=32, head_dim=128, group=7, stages=2) -> dict:
    """``compile_forward``'s report for the Triton selection forward ``_slc_fwd_kernel`` as the op
    runs it at Q7B (64 packed (token, head) rows, 64-key blocks by TMA, bf16, 4 warps): the
    selection (window 0, 32 blocks) or the window (its blocks, gated epilogue)."""
    from flexnsa.triton_fallback import selection_attention as sel

    gated = window > 0
    desc = f"tensordesc<bf16[1, 1, 64, {head_dim}]>"
    signature = {"Q": "*bf16", "K": desc, "V": desc, "SEL": "*i32", "O": "*bf16", "LSE": "*fp32", "CMP": "*bf16",
                 "SLC": "*bf16", "GATES": "*bf16" if gated else "*fp32", "Y": "*bf16"}
    ints = ("sq_b", "sq_h", "sq_t", "sk_b", "sk_h", "sk_t", "ss_b", "ss_h", "ss_r", "so_b", "so_h", "so_t", "sl_b", "sl_h",
            "sg_b", "sg_h", "sg_t", "sg_k", "T")
    signature |= {name: "i32" for name in ints} | {"qk_scale": "fp32"}
    constants = dict(N_SEL=-(-(window - 1) // 64) + 1 if gated else n_sel, TILE=64, L=64, BLOCK_N=64, G=group, G_PAD=group,
                     ROWS=64, SUBS=group, D=head_dim, WINDOW=window, TMA=True, GATED=gated)
    aligned = ("Q", "SEL", "O", "LSE", "CMP", "SLC", "GATES", "Y", "sq_b", "sq_h", "sq_t", "ss_b", "ss_h", "ss_r", "so_b",
               "so_h", "so_t", "sl_b", "sl_h")
    return _compile(sel._slc_fwd_kernel, signature, constants, aligned, {"num_warps": 4, "num_stages": stages}, gluon=False)


def opcode_counts(sass: str, opcodes=("MUFU.EX2", "FFMA", "HGMMA", "STS", "LDS", "BAR.SYNC", "SHFL")) -> dict:
    """How many SASS instructions start with each opcode (``MUFU.EX2``, ``FFMA``...): static counts
    over the whole kernel, to compare variants of one kernel."""
    counts = dict.fromkeys(opcodes, 0)
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            for op in opcodes:
                if m.group(1) == op or m.group(1).startswith(op + "."):
                    counts[op] += 1
    return counts


def events(sass: str) -> list[str]:
    """The kernel's ``EVENTS`` in program (address) order, repeats collapsed, e.g. ``mma wait arrive
    exp``: where the softmax's exponentials sit against the MMA waits and the mbarrier arrives.
    The spin loops of mbarrier waits that ptxas places out of line show as ``mbarrier_wait``."""
    found = []
    for line in sass.splitlines():
        name = next((v for k, v in EVENTS.items() if k in line), None)
        if name and (not found or found[-1] != name):
            found.append(name)
    return found


def contains_in_order(seq: list[str], pattern: list[str]) -> bool:
    """``pattern`` occurs in ``seq`` as consecutive entries."""
    return any(seq[i:i + len(pattern)] == pattern for i in range(len(seq) - len(pattern) + 1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m profiling.sm90_sass")
    p.add_argument("--pingpong", action="store_true")
    p.add_argument("--persistent", action="store_true", help="the persistent forward (Lever 50)")
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--block-c", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--group", type=int, default=7)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--scorer", action="store_true", help="the Triton scorer instead")
    p.add_argument("--selection", action="store_true", help="the Triton selection forward instead, --window W for the window's")
    p.add_argument("--gluon-scorer", choices=["plain", "pipelined"], help="the Gluon scorer instead (Levers 52, 54)")
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON line: registers, spills, shared, serialised, events, opcodes")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: under the interpreter kernels are not compiled")
    if args.scorer:
        out = compile_scorer(args.block_c, args.head_dim, args.group, stages=2)
    elif args.gluon_scorer:
        out = compile_gluon_scorer(args.gluon_scorer == "pipelined", args.head_dim, args.group)
    elif args.selection:
        out = compile_selection_forward(args.window, head_dim=args.head_dim, group=args.group)
    else:
        out = compile_forward(args.rows, args.block_c, args.head_dim, args.group, args.stages, args.pingpong,
                              persistent=args.persistent)
    counts = opcode_counts(out["sass"])
    if args.json:
        print(json.dumps({k: out[k] for k in ("registers", "spill_bytes", "threads", "setmaxnreg", "shared_bytes", "serialised")}
                         | {"events": events(out["sass"]), "opcodes": counts, "ptxas_log": out["ptxas_log"]}))
        return
    print(f"registers {out['registers']}, spill bytes {out['spill_bytes']}, shared {out['shared_bytes']} B, "
          f"wgmma serialised by ptxas (C7514): {out['serialised']}")
    print("events:", " ".join(events(out["sass"])))
    print("opcodes:", counts)


if __name__ == "__main__":
    main()

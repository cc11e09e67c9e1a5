"""The Gluon compression forward's sm_90 machine code, compiled on any machine (no GPU needed).

Why: whether the Hopper kernels overlap the softmax with the tensor cores is decided by ptxas,
not by the source (NOTES Levers 46-48). This script compiles ``compression_forward_sm90`` for
sm_90 with the installed triton and its bundled ptxas / nvdisasm, then reports what decides that
overlap: registers, spills, ptxas's wgmma serialisation warning (C7514), and the order of the
MMA issues (HGMMA), their waits (WARPGROUP.DEPBAR), mbarrier arrives and softmax exponentials
(MUFU.EX2) in program order. ``tests/test_sm90_sass.py`` holds the ping-pong's order to it.

    python -m profiling.sm90_sass [--pingpong | --persistent] [--rows 128 --block-c 64 --head-dim 128 --group 7 --stages 3]
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
    """{"registers", "spill_bytes", "shared_bytes", "serialised" (ptxas C7514), "ptxas_log", "sass"}
    of the warp-specialised forward at these constants (bf16, l = s = 64)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

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
    signature |= {name: "constexpr" for name in constants}
    fn = sm90._cmp_fwd_persistent_kernel if persistent else sm90._cmp_fwd_ws_kernel
    # what the launcher's specialisation proves at the Q7B shape: 16-byte aligned pointers and strides
    aligned = ("Q", "O", "LSE", "sq_b", "sq_h", "sq_t", "so_b", "so_h", "so_t", "sl_b", "sl_h")
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    kernel = triton.compile(GluonASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4, "maxnreg": maxnreg})
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
    return {"registers": int(registers.group(1)) if registers else None, "spill_bytes": int(spills.group(1)) if spills else None,
            "shared_bytes": kernel.metadata.shared, "serialised": "C7514" in log, "ptxas_log": log, "sass": sass}


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
    p.add_argument("--json", action="store_true", help="one JSON line: registers, spills, shared, serialised, events")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: under the interpreter Gluon kernels are not compiled")
    out = compile_forward(args.rows, args.block_c, args.head_dim, args.group, args.stages, args.pingpong,
                          persistent=args.persistent)
    if args.json:
        print(json.dumps({k: out[k] for k in ("registers", "spill_bytes", "shared_bytes", "serialised")}
                         | {"events": events(out["sass"]), "ptxas_log": out["ptxas_log"]}))
        return
    print(f"registers {out['registers']}, spill bytes {out['spill_bytes']}, shared {out['shared_bytes']} B, "
          f"wgmma serialised by ptxas (C7514): {out['serialised']}")
    print("events:", " ".join(events(out["sass"])))


if __name__ == "__main__":
    main()

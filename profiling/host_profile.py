"""Where the host's time to issue the NSA op goes (cProfile), at lengths where the op is
launch-bound: the profiler's ``host ms`` says *that* the host is the limit (8K fwd+bwd: ~5 ms to
issue, against ~4.4 ms of GPU work as CUDA-graph replays); this says *which* Python does it.

After a warm-up that compiles everything, ``--calls`` calls of the op are issued under cProfile,
the device drained after each (so the GPU never holds the host back; cProfile itself slows
Python down, so read the shares, not the absolute times). Writes ``host_profile_T<T>_<mode>.txt``
(the top functions by own time and by cumulative time, the plain host ms per call without the
profiler, and on CUDA the device kernels (and memsets) per call, counted by torch.profiler) under
``--out``. ``--form compiled``: the whole op under torch.compile (``profiling.measure.called_as``).

    python -m profiling.host_profile --lengths 8K,16K --out DIR        (GPU; CPU runs too, slowly)

``--dispatch`` also times, per length, the host cost of a torch.library custom op call against
calling its implementation directly (the compression and selection forwards, no grad): what the
dispatcher, fake-kernel machinery and alias checks add per call (``dispatch_T<T>.json``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
from collections import Counter
from pathlib import Path

import torch

from flexnsa import NSAConfig

from .cli import DTYPES, device_stamp, parse_lengths, pick_device
from .measure import MODES, Shape, op_call, q7b_shape, random_inputs
from .timing import host_ms, synchronize


def profile_calls(fn, device: torch.device, calls: int, grads) -> pstats.Stats:
    prof = cProfile.Profile()
    for _ in range(calls):
        for x in grads:
            x.grad = None
        synchronize(device)
        prof.enable()
        fn()
        prof.disable()
    synchronize(device)
    return pstats.Stats(prof)


def kernels_per_call(fn, calls: int, grads) -> Counter:
    """Device activities per call by name (torch.profiler's CUDA events over ``calls`` calls:
    kernels, and memsets/copies where the op makes them): with the host ms, what each launch costs
    the host, and which launches a change could fuse away."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            for x in grads:
                x.grad = None
            fn()
        torch.cuda.synchronize()
    names = Counter(e.name for e in prof.events() if e.device_type == DeviceType.CUDA)
    return Counter({name: n / calls for name, n in names.items()})


def kernel_table(per_call: Counter, width: int = 110) -> str:
    """The launches per call, most frequent first (names cut to ``width``)."""
    rows = [f"{n:6g}  {name[:width]}" for name, n in sorted(per_call.items(), key=lambda kv: (-kv[1], kv[0]))]
    return f"\n## device kernels per call, by name ({sum(per_call.values()):g} in all)\n" + "\n".join(rows) + "\n"


def dispatch_costs(shape: Shape, seq_len: int, cfg: NSAConfig, calls: int) -> dict:
    """Host ms per call of each forward custom op, through torch.library and direct."""
    from flexnsa.compression import compress_kv
    from flexnsa.importance import importance_top_n
    from flexnsa.backends.flex import selection_rows
    from flexnsa.triton_fallback import custom_ops
    from flexnsa.triton_fallback.compression_attention import compression_attention_fwd
    from flexnsa.triton_fallback.selection_attention import selection_attention_fwd

    q, k, v, _ = random_inputs(shape, seq_len, 0, False)
    k_cmp, v_cmp = compress_kv(k, v, cfg)
    scale = cfg.softmax_scale(q.shape[-1])
    rows = selection_rows(importance_top_n(q, k_cmp, cfg)[0], cfg).contiguous()
    cmp_args = (q, k_cmp, v_cmp, cfg.block_size, cfg.stride, scale)
    slc_args = (q, k, v, rows, cfg.select_block_size, cfg.select_query_tile, scale)
    pairs = {"compression_attention": (custom_ops.compression_attention, compression_attention_fwd, cmp_args),
             "selection_attention": (custom_ops.selection_attention, selection_attention_fwd, slc_args)}
    out = {}
    with torch.no_grad():
        for name, (op, direct, args) in pairs.items():
            for fn in (op, direct):
                fn(*args)
            out[name] = {"custom_op_host_ms": host_ms(lambda: op(*args), shape.device, reps=calls),
                         "direct_host_ms": host_ms(lambda: direct(*args), shape.device, reps=calls)}
    return out


def report(stats: pstats.Stats, rows: int) -> str:
    text = io.StringIO()
    stats.stream = text
    for key in ("tottime", "cumulative"):
        text.write(f"\n## top {rows} by {key}\n")
        stats.sort_stats(key).print_stats(rows)
    return text.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m profiling.host_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8K")
    p.add_argument("--modes", default="fwd+bwd", help="fwd, fwd+bwd or both (comma list)")
    p.add_argument("--selection", choices=["per_token", "block_shared"], default="block_shared")
    p.add_argument("--window-kernel", default="auto")
    p.add_argument("--form", choices=["eager", "compiled"], default="eager")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dispatch", action="store_true", help="also time custom-op dispatch against direct calls")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        p.error(f"--modes: unknown {sorted(set(modes) - set(MODES))}; choose from {MODES}")
    device = pick_device(args.device)
    if args.form == "compiled" and device.type != "cuda":
        p.error("--form compiled needs a CUDA GPU (inductor's CPU lowering of the FlexAttention branches fails)")
    shape = q7b_shape(DTYPES[args.dtype], device)
    cfg = NSAConfig(selection=args.selection, window_kernel=args.window_kernel, check_inputs=False)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = device_stamp()
    for seq_len in parse_lengths(args.lengths):
        for mode in modes:
            fn, inputs = op_call(shape, seq_len, cfg, mode == "fwd+bwd", form=args.form)
            for _ in range(3):  # compile, autotune, allocator warm-up
                fn()
            plain = host_ms(fn, device, reps=args.calls, grad_to_none=inputs)
            stats = profile_calls(fn, device, args.calls, inputs)
            by_name = kernels_per_call(fn, args.calls, inputs) if device.type == "cuda" else None
            kernels = sum(by_name.values()) if by_name is not None else None
            head = (f"# host profile: T={seq_len} {mode} {args.form}, {args.calls} calls, {stamp}\n"
                    f"# host ms per call without the profiler: {plain}\n# device kernels per call: {kernels}\n")
            path = args.out / f"host_profile_T{seq_len}_{mode.replace('+', '_')}_{args.form}.txt"
            path.write_text(head + report(stats, args.rows) + (kernel_table(by_name) if by_name is not None else ""))
            print(f"T={seq_len} {mode} {args.form}: host {plain} ms, {kernels} kernels per call -> {path}")
        if args.dispatch:
            costs = dispatch_costs(shape, seq_len, cfg, args.calls)
            (args.out / f"dispatch_T{seq_len}.json").write_text(json.dumps({"stamp": stamp, "seq_len": seq_len, **costs}, indent=1))
            print(f"T={seq_len} dispatch (host ms, custom op vs direct): {costs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

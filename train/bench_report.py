"""Merge training benchmark runs into one markdown table: ``python -m train.bench_report DIR... [--out report.md]``.

Every ``results.json`` under the given directories (train/bench.py writes one per run) is a row;
a run directory with an ``exit_code`` file and no ``results.json`` (a failed run, e.g. out of
memory; ``scripts/bench_train_7b.sh`` writes the file) is a row saying so. For each sample length
with both modes the NSA / dense tokens/s ratio follows the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ("run", "mode", "tokens/sample", "GPUs", "steps (timed)", "step s (median)", "tokens/s", "tokens/s/GPU",
           "peak GiB (max rank)", "reserved GiB", "first-step overhead s", "compile s", "recompiles", "graph breaks")


def find_runs(paths) -> tuple[list[tuple[Path, dict]], list[tuple[Path, str]]]:
    """(results.json path, record) for each finished run; (run dir, exit code) for each failed one."""
    done, failed, seen = [], [], set()
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(root.rglob("results.json"))
        for path in files:
            done.append((path, json.loads(path.read_text())))
            seen.add(path.parent.resolve())
        if root.is_dir():
            for code_file in sorted(root.rglob("exit_code")):
                run = code_file.parent
                code = code_file.read_text().strip()
                if run.resolve() not in seen and not (run / "results.json").exists() and code != "0":
                    failed.append((run, code))
    return done, failed


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def row(path: Path, r: dict) -> list[str]:
    compile_info = r.get("compile") or {}
    return [
        path.parent.name, r["mode"], fmt(r["tokens_per_sample"]), fmt(r["world_size"]),
        f"{r['steps']} ({r.get('timed_steps', '-')})" + ("" if r.get("complete", True) else ", partial"), fmt(r["step_time_s"], 3), fmt(r["tokens_per_s"], 0),
        fmt(r.get("tokens_per_s_per_gpu"), 0), fmt(r["peak_memory_gib"], 1), fmt(r.get("peak_reserved_gib"), 1),
        fmt(r.get("first_step_overhead_s"), 1), fmt(compile_info.get("compile_time_s"), 1),
        fmt(compile_info.get("recompiles")), fmt(compile_info.get("graph_breaks")),
    ]


def ratios(records: list[dict]) -> list[tuple[int, float, float, float]]:
    """(tokens/sample, nsa tokens/s, dense tokens/s, ratio) for each length run in both modes (best of each)."""
    best: dict[tuple[int, str], float] = {}
    for r in records:
        if r.get("tokens_per_s"):
            key = (r["tokens_per_sample"], r["mode"])
            best[key] = max(best.get(key, 0.0), r["tokens_per_s"])
    out = []
    for tokens in sorted({t for t, _ in best}):
        nsa, dense = best.get((tokens, "nsa")), best.get((tokens, "dense"))
        if nsa and dense:
            out.append((tokens, nsa, dense, nsa / dense))
    return out


def render(done, failed) -> str:
    done = sorted(done, key=lambda item: (item[1]["tokens_per_sample"], item[1]["mode"] != "nsa", str(item[0])))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(path, r)) + " |" for path, r in done]
    for run, code in failed:
        lines.append("| " + " | ".join([run.name, f"failed (exit {code})"] + ["-"] * (len(COLUMNS) - 2)) + " |")
    out = ["# Training throughput: NSA vs dense attention", ""]
    if done:
        first = done[0][1]
        commits = sorted({r.get("commit", "unknown") for _, r in done})
        header = (f"GPU: {first.get('gpu')} x {first.get('world_size')}; torch {first.get('torch')}, "
                  f"triton {first.get('triton', 'not recorded')}, transformers {first.get('transformers')}; commit {', '.join(commits)}. Medians over the steps "
                  f"after the first {first.get('warmup_steps')} (tokens/s counts all ranks). Compile s: dynamo's "
                  "frame + backward compile timers on rank 0; first-step overhead: first step minus the median.")
        out += [header, ""]
    out += lines
    pairs = ratios([r for _, r in done])
    if pairs:
        out += ["", "| tokens/sample | NSA tokens/s | dense tokens/s | NSA / dense |", "|---|---|---|---|"]
        out += [f"| {t:,} | {n:,.0f} | {d:,.0f} | {ratio:.2f}x |" for t, n, d, ratio in pairs]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.bench_report", description=__doc__)
    parser.add_argument("paths", nargs="+", help="run directories (searched recursively) or results.json files")
    parser.add_argument("--out", help="write the markdown here (default: stdout only)")
    args = parser.parse_args(argv)
    done, failed = find_runs(args.paths)
    if not done and not failed:
        print(f"no results.json under {args.paths}", file=sys.stderr)
        return 1
    text = render(done, failed)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

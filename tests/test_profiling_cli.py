"""The profiling CLI: a tiny run writes its folder; bad input exits non-zero with a message,
keeping what was measured."""

import json

import pytest

from profiling.cli import main, parse_lengths

TINY = ["--q-heads", "2", "--kv-heads", "1", "--head-dim", "16", "--block-size", "16", "--stride", "16",
        "--select-block-size", "16", "--select-query-tile", "16", "--num-selected", "4", "--window", "32",
        "--rep-ms", "5", "--warmup-ms", "1", "--no-plots"]


def test_tiny_cpu_run_writes_results(tmp_path):
    out = tmp_path / "run"
    assert main(TINY + ["--lengths", "128,256", "--trace-lengths", "128", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["seq_len"] for r in results["nsa"]} == {128, 256}
    assert all(r["total_ms"] > 0 and set(r["stages_ms"]) >= {"compression", "selection", "window"} for r in results["nsa"])
    assert {b["name"] for b in results["baselines"]} == {"sdpa"}
    assert results["meta"]["torch"] and results["meta"]["commit"] and results["variants"]["per_token"]["window"] == 32
    report = (out / "report.md").read_text()
    assert "| 256 |" in report and "stage sum" in report and "host ms" in report
    assert all(r["host_ms"] is None for r in results["nsa"])  # CPU: the host runs the work itself
    assert list((out / "traces").glob("*.pt.trace.json"))
    kernels = (out / "traces" / "nsa-per_token-fwd-T128.kernels.txt").read_text()
    op_row = next(line for line in kernels.splitlines() if line.strip().startswith("nsa_fwd "))
    assert op_row.split()[-1] == "2", op_row  # exactly the profiled calls, no warm-up or other cycle


@pytest.mark.parametrize(
    "args,message",
    [
        (["--modes", "fwd,backward"], "unknown mode"),
        (["--baselines", "sdpa,flash"], "unknown baseline"),
        (["--baselines", "fla"], "need a CUDA GPU"),
        (["--modes", "fwd+bwd"], "needs a GPU"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--window", "0"], "window"),
        (["--lengths", "4Q"], "not a length"),
        (["--q-heads", "3", "--kv-heads", "2"], "multiple of --kv-heads"),
        (["--cuda-graphs"], "--forms cuda_graphs needs a CUDA GPU"),
        (["--forms", "eager,compiled"], "--forms compiled needs a CUDA GPU"),
        (["--forms", "jit"], "unknown forms"),
        (["--forms", "none"], "--forms needs at least one"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message, capsys, tmp_path):
    assert main(TINY + ["--lengths", "128", "--out", str(tmp_path / "x")] + args) == 2
    assert message in capsys.readouterr().err


def test_length_that_does_not_fit_exits_3_and_keeps_results(tmp_path, capsys):
    out = tmp_path / "run"
    huge = str(1 << 40)  # ~10^12 tokens: the memory estimate refuses it before allocating
    assert main(TINY + ["--lengths", f"128,{huge}", "--trace-lengths", "none", "--out", str(out)]) == 3
    assert "does not fit in memory" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert [r["seq_len"] for r in results["nsa"]] == [128] and results["errors"]
    assert "does not fit" in (out / "report.md").read_text()


def test_lengths_parse():
    assert parse_lengths("1K-8K") == [1024, 2048, 4096, 8192]
    assert parse_lengths("512,1K") == [512, 1024]


def test_each_length_starts_from_fresh_compiles(tmp_path, monkeypatch):
    """Per-length numbers must not depend on the order: dynamo is reset before each length, so no
    length runs a kernel recompiled with a symbolic T because another length ran first."""
    import torch

    resets = []
    real_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(1), real_reset())[1])
    out = tmp_path / "run"
    assert main(TINY + ["--lengths", "128,256", "--modes", "fwd", "--trace-lengths", "none", "--out", str(out)]) == 0
    assert len(resets) == 2
    assert main(TINY + ["--lengths", "128,256", "--modes", "fwd", "--trace-lengths", "none", "--keep-compiles",
                        "--out", str(tmp_path / "kept")]) == 0
    assert len(resets) == 2  # --keep-compiles: the variable-length regime, no reset


def test_host_profile_kernel_table_sorts_launches_by_count():
    from collections import Counter

    from profiling.host_profile import kernel_table

    text = kernel_table(Counter({"triton_poi_fused_add_0": 2.0, "_slc_dkv_kernel": 1.0, "Memset (Device)": 3.0}))
    lines = text.strip().splitlines()
    assert "(6 in all)" in lines[0]
    assert [line.split(None, 1) for line in lines[1:]] == [["3", "Memset (Device)"], ["2", "triton_poi_fused_add_0"],
                                                          ["1", "_slc_dkv_kernel"]]


def test_host_profile_and_op_loop_run_the_op(tmp_path, capsys):
    from profiling import host_profile, op_loop

    assert host_profile.main(["--lengths", "128", "--modes", "fwd", "--dtype", "fp32", "--calls", "1", "--rows", "5", "--dispatch",
                              "--device", "cpu", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "host_profile_T128_fwd_eager.txt").read_text()
    assert "top 5 by tottime" in text and "top 5 by cumulative" in text and "nsa_flex" in text
    dispatch = json.loads((tmp_path / "dispatch_T128.json").read_text())
    assert set(dispatch) >= {"compression_attention", "selection_attention"}  # host ms are None on CPU
    with pytest.raises(SystemExit):
        host_profile.main(["--form", "compiled", "--device", "cpu", "--out", str(tmp_path)])
    assert "--form compiled needs a CUDA GPU" in capsys.readouterr().err
    assert op_loop.main(["--lengths", "128", "--mode", "fwd", "--dtype", "fp32", "--device", "cpu"]) == 0
    assert "T=128 fwd: 1 profiled call(s)" in capsys.readouterr().out


def test_smooth_inputs_are_recorded(tmp_path):
    out = tmp_path / "run"
    assert main(TINY + ["--lengths", "128", "--inputs", "smooth", "--trace-lengths", "none", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["shape"]["inputs"] == "smooth"
    assert "float32, smooth inputs" in (out / "report.md").read_text()


def test_smooth_inputs_make_neighbouring_tiles_select_alike():
    """What --inputs smooth is for: consecutive query tiles pick overlapping blocks (as video
    frames would), where i.i.d. inputs share little beyond the forced blocks."""
    import torch

    from flexnsa import NSAConfig
    from flexnsa.compression import compress_kv
    from flexnsa.importance import importance_top_n
    from profiling.measure import Shape, random_inputs

    cfg = NSAConfig(selection="block_shared", num_selected=8, compression_kernel="torch")
    overlap = {}
    for kind in ("random", "smooth"):
        q, k, v, _ = random_inputs(Shape(1, 7, 1, 64, torch.float32, torch.device("cpu"), kind), 4096, 0, False)
        assert q.std() > 0.5 and k.std() > 0.5  # never (near) zeros
        rows = importance_top_n(q, compress_kv(k, v, cfg)[0], cfg)[0][0, 0, ::cfg.select_query_tile]
        shared = [len(set(a.tolist()) & set(b.tolist())) / cfg.num_selected for a, b in zip(rows[20:-1], rows[21:])]
        overlap[kind] = sum(shared) / len(shared)
    assert overlap["smooth"] > overlap["random"] + 0.25, overlap


def test_target_lines_measure_shares_against_the_op_total():
    # Issue 7 / DESIGN.md name shares "of the op": the total, not the stage sum (which differs).
    from profiling.report import _target_lines

    stages = {"compression": 18.0, "scores_topk": 3.0, "mask_build": 0.7, "selection": 40.0, "window": 8.0, "combine": 4.0}
    nsa = [dict(variant="block_shared", mode="fwd+bwd", seq_len=T, total_ms=ms, stage_sum_ms=ms + 3.7, stages_ms=stages,
                peak_mb=9000.0) for T, ms in ((32768, 14.0), (131072, 70.0))]
    baselines = [dict(name="sdpa", mode="fwd+bwd", seq_len=131072, total_ms=1330.0, peak_mb=10706.0),
                 dict(name="fla", mode="fwd+bwd", seq_len=131072, total_ms=672.0)]
    lines = "\n".join(_target_lines({"nsa": nsa, "baselines": baselines, "meta": {"device_name": "GPU"}}, "block_shared", "fwd+bwd"))
    for expected in ("total 70.00 ms", "19.0x faster than dense SDPA", "9.60x faster than fla", "<= 56.0 ms here",
                     "t(128K) / t(32K) = 5.00", "compression share 25.7% of the op's total", "scores + top-n 30.0%",
                     "mask building share 1.0% of the op's total", "peak memory 9000 MiB vs SDPA 10706 MiB"):
        assert expected in lines, (expected, lines)
    assert "block-shared mode" not in lines
    nsa.append(dict(nsa[-1], variant="per_token", total_ms=217.0))
    per_token = "\n".join(_target_lines({"nsa": nsa, "baselines": baselines, "meta": {"device_name": "GPU"}}, "per_token", "fwd+bwd"))
    assert "3.10x the block-shared mode's time (target <= 2x)" in per_token, per_token
    # each form against its own block-shared run, and the 8K-up line lists every length with SDPA
    nsa += [dict(r, variant=r["variant"] + "+compiled", total_ms=r["total_ms"] / 2) for r in nsa]
    nsa.append(dict(nsa[0], variant="block_shared", seq_len=8192, total_ms=8.0))
    baselines += [dict(name="sdpa", mode="fwd+bwd", seq_len=8192, total_ms=6.0, peak_mb=700.0)]
    results = {"nsa": nsa, "baselines": baselines, "meta": {"device_name": "GPU"}}
    compiled = "\n".join(_target_lines(results, "per_token+compiled", "fwd+bwd"))
    assert "3.10x the block-shared mode's time" in compiled and "total 108.50 ms" in compiled, compiled
    shared = "\n".join(_target_lines(results, "block_shared", "fwd+bwd"))
    assert "x SDPA from 8K up: 8K 0.75x, 128K 19.00x (target > 1x at each)" in shared, shared


def test_best_overrides_compares_variants_at_the_longest_length_only():
    """A 16K variant (0.8 ms) must not beat the 128K default (3.0 ms): session 26's best.json
    named a variant that was slower at 128K."""
    from profiling.kernel_tuning import best_overrides

    def row(T, kernel, change, ms):
        return {"seq_len": T, "op": "scores", "selection": "block_shared", "kernel": kernel, "change": change,
                "pass": "fwd", "ms": ms}

    rows = [row(16384, "default", {}, 0.77), row(16384, "scores", {"num_stages": 3}, 0.83),
            row(131072, "default", {}, 3.05), row(131072, "scores", {"num_stages": 3}, 3.24)]
    assert best_overrides(rows) == {}
    rows.append(row(131072, "scores", {"num_stages": 6}, 2.5))
    assert best_overrides(rows) == {"scores": {"scores": {"num_stages": 6}}}


def test_plot_names_are_plain_for_every_form(tmp_path):
    # the device tool brings back only files named in letters, digits, '.', '_' and '-'
    import re

    from profiling.report import write_plots

    nsa = [dict(variant=v, mode=m, seq_len=T, total_ms=1.0, stage_sum_ms=None, stages_ms={}, peak_mb=1.0)
           for v in ("block_shared", "block_shared+compiled") for m in ("fwd", "fwd+bwd") for T in (128, 256)]
    results = {"nsa": nsa, "baselines": [], "variants": {"block_shared": {}, "block_shared+compiled": {}},
               "meta": {"device_name": "CPU"}}
    names = sorted(p.name for p in write_plots(results, tmp_path))
    assert "latency_block_shared_compiled_fwd_bwd.png" in names and len(names) == 5, names
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names

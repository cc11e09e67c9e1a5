"""The Gluon compression forward's (and the Triton scorer's, Lever 53) sm_90 code, compiled on the CPU (triton's bundled ptxas and
nvdisasm; no GPU): no spill, no wgmma serialisation, and in the ping-pong (NOTES Lever 48) each
consumer hands its turn over after its MMAs retire and before its softmax, the order its overlap
rests on. The plain warp-specialised loop (Lever 47) and the persistent one (Lever 50) run their
softmax right after the QK~^T wait.
Compiled in a child process without TRITON_INTERPRET (set for the CPU tests, under which Gluon
kernels are not compiled)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from profiling.sm90_sass import contains_in_order

ROOT = pathlib.Path(__file__).resolve().parents[1]


def compiled(*flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "profiling.sm90_sass", "--json", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["pingpong", "plain", "persistent"])
def test_forward_compiles_for_sm90_without_spills_or_serialised_wgmma(variant):
    pingpong = variant == "pingpong"
    out = compiled(*({"pingpong": ["--pingpong"], "persistent": ["--persistent"]}.get(variant, [])))
    assert out["spill_bytes"] == 0, out["ptxas_log"]
    assert not out["serialised"], out["ptxas_log"]
    assert out["shared_bytes"] <= 227 * 1024
    order = out["events"]
    if pingpong:
        assert contains_in_order(order, ["mma", "wait", "arrive", "exp"]), order
        assert not contains_in_order(order, ["mma", "wait", "exp"]), order
    else:
        assert contains_in_order(order, ["mma", "wait", "exp"]), order


def test_scorer_fma_exp_moves_exponentials_off_mufu_in_registers():
    """Lever 53 in the scorer's sm_90 code: with 1 / 4 of the exponentials on the FMA pipe a
    quarter of the MUFU.EX2 go (the column split is register renaming: the shared-memory and
    barrier traffic is the rule's), about 5 FFMA each come in (the polynomial), and the kernel
    stays at <= 168 registers without a spill (3 CTAs of 128 threads per SM)."""
    rule, fma = compiled("--scorer"), compiled("--scorer", "--fma-parts", "4")
    for out in (rule, fma):
        assert out["spill_bytes"] == 0 and out["registers"] <= 168, out["ptxas_log"]
    r, f = rule["opcodes"], fma["opcodes"]
    assert r["MUFU.EX2"] > 0 and 4 * f["MUFU.EX2"] == 3 * r["MUFU.EX2"], (r, f)
    assert f["FFMA"] - r["FFMA"] >= 5 * (r["MUFU.EX2"] - f["MUFU.EX2"]), (r, f)
    assert all(f[op] == r[op] for op in ("STS", "LDS", "BAR.SYNC", "HGMMA")), (r, f)


@pytest.mark.parametrize("window", [0, 512], ids=["selection", "window"])
def test_selection_forward_fma_exp_in_registers(window):
    """Lever 53 in the selection and window forwards: a quarter of the tile's 32 exponentials per
    thread leave the MUFU (the rescale factor's stay), with no shared-memory round trip added."""
    rule = compiled("--selection", "--window", str(window))
    fma = compiled("--selection", "--window", str(window), "--fma-parts", "4")
    for out in (rule, fma):
        assert out["spill_bytes"] == 0, out["ptxas_log"]
    r, f = rule["opcodes"], fma["opcodes"]
    assert r["MUFU.EX2"] - f["MUFU.EX2"] == 8, (r, f)
    assert all(f[op] == r[op] for op in ("STS", "LDS", "BAR.SYNC", "HGMMA")), (r, f)


def test_contains_in_order():
    assert contains_in_order(["a", "b", "c"], ["b", "c"])
    assert not contains_in_order(["a", "b", "c"], ["a", "c"])

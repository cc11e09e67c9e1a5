"""Kernels' sm_90 code compiled on the CPU (triton's bundled ptxas and nvdisasm; no GPU). The Gluon
compression forward: no spill, no wgmma serialisation, and in the ping-pong (NOTES Lever 48) each
consumer hands its turn over after its MMAs retire and before its softmax, the order its overlap
rests on. The plain warp-specialised loop (Lever 47) and the persistent one (Lever 50) run their
softmax right after the QK~^T wait. The Triton scorer and selection forward: the occupancy their
measured rules rest on.
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


def launches(out) -> bool:
    """The CTA's registers at launch (before any setmaxnreg) fit an SM's 64K: what the driver
    checks (Triton's OutOfResources "threads"; Lever 54's first GPU run failed on it)."""
    return out["registers"] * out["threads"] <= 65536


@pytest.mark.parametrize("variant", ["pingpong", "plain", "persistent"])
def test_forward_compiles_for_sm90_without_spills_or_serialised_wgmma(variant):
    pingpong = variant == "pingpong"
    out = compiled(*({"pingpong": ["--pingpong"], "persistent": ["--persistent"]}.get(variant, [])))
    assert out["spill_bytes"] == 0 and launches(out), out["ptxas_log"]
    assert not out["serialised"], out["ptxas_log"]
    assert out["shared_bytes"] <= 227 * 1024
    order = out["events"]
    if pingpong:
        assert contains_in_order(order, ["mma", "wait", "arrive", "exp"]), order
        assert not contains_in_order(order, ["mma", "wait", "exp"]), order
    else:
        assert contains_in_order(order, ["mma", "wait", "exp"]), order


def test_scorer_keeps_three_ctas_per_sm():
    """The Triton scorer as the op runs it at Q7B: <= 168 registers without a spill, so three CTAs
    of 128 threads share an SM (NOTES Lever 51: what its speed against the unpadded scorers rests
    on), and its exponentials on the MUFU (128 per thread over its two chunk loops)."""
    out = compiled("--scorer")
    assert out["spill_bytes"] == 0 and out["registers"] <= 168 and launches(out), out["ptxas_log"]
    assert out["opcodes"]["MUFU.EX2"] == 128 and out["opcodes"]["HGMMA"] > 0, out["opcodes"]


@pytest.mark.parametrize("window", [0, 256], ids=["selection", "window"])
def test_selection_forward_compiles_without_spills(window):
    out = compiled("--selection", "--window", str(window))
    assert out["spill_bytes"] == 0 and out["registers"] <= 255, out["ptxas_log"]
    assert out["opcodes"]["HGMMA"] > 0, out["opcodes"]


def test_pipelined_gluon_scorer_keeps_two_mmas_in_flight():
    """Lever 54: each consumer issues its second chunk's MMA before the first's exponentials (and
    waits for it after them), without a spill and without ptxas serialising the wgmmas; the plain
    Gluon scorer (Lever 52) waits on each MMA before its exponentials."""
    plain, pipelined = compiled("--gluon-scorer", "plain"), compiled("--gluon-scorer", "pipelined")
    for out in (plain, pipelined):
        assert out["spill_bytes"] == 0 and not out["serialised"], out["ptxas_log"]
        assert launches(out), (out["registers"], out["threads"])
    assert 240 in pipelined["setmaxnreg"] and 152 in plain["setmaxnreg"], (plain["setmaxnreg"], pipelined["setmaxnreg"])
    assert contains_in_order(pipelined["events"], ["mma", "mbarrier_wait", "mma", "wait", "exp"]), pipelined["events"]
    assert not contains_in_order(plain["events"], ["mma", "mbarrier_wait", "mma"]), plain["events"]


def test_contains_in_order():
    assert contains_in_order(["a", "b", "c"], ["b", "c"])
    assert not contains_in_order(["a", "b", "c"], ["a", "c"])

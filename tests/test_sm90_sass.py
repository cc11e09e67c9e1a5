"""The Gluon compression forward's sm_90 code, compiled on the CPU (triton's bundled ptxas and
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


def test_contains_in_order():
    assert contains_in_order(["a", "b", "c"], ["b", "c"])
    assert not contains_in_order(["a", "b", "c"], ["a", "c"])

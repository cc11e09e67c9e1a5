"""`torchrun --nproc-per-node 2 -m train` on CPU (gloo, FSDP2, reference NSA backend, tiny model).

Run A trains 6 steps (checkpoint at 3 and 6, export at the end); run B resumes A's step-3
checkpoint and must reproduce A's losses for steps 4-6 bit for bit; run C uses LLaVA-style
video files (one missing, one corrupt), activation checkpointing, bf16 and gates-only training.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.checkpoint import latest_checkpoint
from train.synthetic_videos import write_llava_dataset

ROOT = Path(__file__).resolve().parents[1]
NSA = {"block_size": 4, "stride": 4, "select_block_size": 4, "num_selected": 3, "window": 4, "forced_initial": 1,
       "forced_local": 1, "select_query_tile": 4, "backend": "reference"}
CONFIG = "\n".join(["[nsa]", *(f"{k} = {json.dumps(v)}" for k, v in NSA.items()),
                    "[optim]", "lr = 3e-3", "warmup_steps = 1",
                    "[data]", "global_batch_size = 4", "[log]", "progress = false"])


def torchrun(tmp_path, *overrides, timeout=90):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "train", "--config", str(cfg)]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # own session, so a timeout kills torchrun's workers too, never leaving them behind
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        proc.stdout_text, proc.stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def metrics(output_dir):
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}, [r for r in records if "event" in r]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run_a")
    torchrun(tmp, "train.steps=6", f"train.output_dir={tmp / 'out'}", "checkpoint.interval=3",
             f"checkpoint.export_dir={tmp / 'export'}", "log.profile_steps=[2]")
    return tmp


def test_loss_decreases(run_a):
    steps, events = metrics(run_a / "out")
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    losses = [steps[s]["loss"] for s in sorted(steps)]
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(steps[s]["tokens_per_s"] > 0 and steps[s]["peak_memory_gib"] > 0 for s in steps)
    assert events[0]["world_size"] == 2 and events[0]["grad_accumulation"] == 2
    assert events[-1]["skipped"] == {"bad_video": 0, "too_long": 0}


def test_profiled_step_writes_trace_and_top_table_per_rank(run_a):
    folder = run_a / "out" / "profile"
    assert sorted(p.name for p in folder.iterdir()) == [
        f"step2.rank{r}.{kind}" for r in (0, 1) for kind in ("pt.trace.json.gz", "top.txt")
    ]
    assert "Self CPU" in (folder / "step2.rank0.top.txt").read_text()


def test_resume_reproduces_losses_exactly(run_a, tmp_path):
    checkpoint = run_a / "out" / "checkpoints" / "step_00000003"
    assert latest_checkpoint(run_a / "out" / "checkpoints").name == "step_00000006"
    torchrun(tmp_path, "train.steps=6", f"train.output_dir={tmp_path / 'out'}", f"checkpoint.resume_from={checkpoint}")
    full, _ = metrics(run_a / "out")
    resumed, _ = metrics(tmp_path / "out")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == full[step]["loss"], step
        assert resumed[step]["lr"] == full[step]["lr"]


def test_export_loads_with_load_nsa_model(run_a):
    from model import load_nsa_model, random_model, tiny_qwen2_5_vl_config

    model = load_nsa_model(run_a / "export")
    gate = "model.language_model.layers.0.self_attn.g_proj_1.weight"
    state = model.state_dict()
    assert gate in state
    initial = random_model(tiny_qwen2_5_vl_config(), seed=0, dtype=torch.float32).state_dict()
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[key], initial[key])  # trained weights, not the initial ones


def test_interrupted_save_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / "trainer.pt").write_bytes(b"x")
    (root / "step_00000004.tmp").mkdir()
    (root / "step_00000004.tmp" / "trainer.pt").write_bytes(b"x")
    (root / "step_00000006").mkdir()  # no completion marker
    assert latest_checkpoint(root).name == "step_00000002"
    assert latest_checkpoint(tmp_path / "none") is None


def test_video_data_with_bad_files_ac_bf16_gates(tmp_path):
    annotation = write_llava_dataset(tmp_path / "data", 6, frames=8, fps=4)
    entries = json.loads(annotation.read_text())
    entries[1]["video"] = "videos/missing.mp4"
    (tmp_path / "data" / "videos" / "clip2.mp4").write_bytes(b"corrupt" * 50)
    annotation.write_text(json.dumps(entries))
    out = tmp_path / "out"
    torchrun(tmp_path, "train.steps=2", f"train.output_dir={out}", "data.source=llava",
             f"data.annotation={annotation}", "data.min_pixels=3136", "data.max_pixels=3136",
             "data.global_batch_size=2", "train.activation_checkpointing=true", "train.mixed_precision=bf16",
             "train.trainable=gates", "data.shuffle=false", f"checkpoint.export_dir={tmp_path / 'export'}")
    steps, events = metrics(out)
    assert sorted(steps) == [1, 2] and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps.values())
    # rank 0 reads clips 0, 2, 4 (2 corrupt); rank 1 reads 1, 3, 5 (1 missing)
    assert events[-1]["skipped"] == {"bad_video": 2, "too_long": 0}
    from model import load_nsa_model, random_model, tiny_qwen2_5_vl_config

    trained = load_nsa_model(tmp_path / "export").state_dict()
    initial = random_model(tiny_qwen2_5_vl_config(), seed=0, dtype=torch.float32).state_dict()
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(trained[q], initial[q])  # frozen: only the gates train
    assert not torch.equal(trained["model.language_model.layers.0.self_attn.g_proj_1.weight"],
                           load_gate_init(tmp_path))


def load_gate_init(tmp_path):
    """The gate weights convert_to_nsa gives the tiny model (what gates-only training starts from)."""
    from flexnsa import NSAConfig
    from model import convert_to_nsa, random_model, tiny_qwen2_5_vl_config

    torch.manual_seed(0)
    model = convert_to_nsa(random_model(tiny_qwen2_5_vl_config(), seed=0, dtype=torch.float32), NSAConfig(**NSA))
    return model.state_dict()["model.language_model.layers.0.self_attn.g_proj_1.weight"]

"""The 7B training benchmark's pieces on CPU: meta-device build + shard-local init, the dense flag,
the labelled-positions loss, batched vision attention, the in-memory synthetic samples, results.json
and the merged report, and scripts/bench_train_7b.sh end to end (2 ranks, gloo, tiny model).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_fsdp import CONFIG, NSA, metrics, torchrun

from model import tiny_qwen2_5_vl_config
from train.bench_report import find_runs, ratios, render
from train.bench_report import main as report_main
from train.build import build_model, is_on_meta, select_trainable
from train.config import load_config
from train.dataset import SyntheticTensorDataset, collate
from train.init import init_plan, materialize
from train.loss import model_loss, predicting_positions
from train.vision_attention import batch_vision_attention, segment_runs

ROOT = Path(__file__).resolve().parents[1]
NSA_SET = [f"nsa.{k}={json.dumps(v)}" for k, v in NSA.items()]
TINY_DATA = ["data.source=synthetic_tensor", "data.answer_tokens=16", "data.synthetic_frame_patches=[4,4]",
             "data.synthetic_samples=2", "data.global_batch_size=2"]
TINY_TENSOR_DATA = [*TINY_DATA, "data.max_length=200"]


def tiny_config(*overrides):
    return load_config(None, [*NSA_SET, *TINY_TENSOR_DATA, *overrides])


def tiny_batch(model_config, lengths=(200, 180), answers=(16, 5)):
    """Two right-padded samples whose labelled spans end at different positions."""
    samples = [SyntheticTensorDataset(model_config, sample_tokens=n, answer_tokens=a, frame_patches=(4, 4), count=1)[0]
               for n, a in zip(lengths, answers)]
    return collate(samples, model_config, pad_id=0)


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_labelled_positions_loss_equals_hf_loss(attention):
    model = build_model(tiny_config(f"model.attention={attention}", "model.init_device=cpu")).train()
    batch = tiny_batch(model.config)
    ours = model_loss(model, batch)
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference = model(**batch, use_cache=False).loss
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert predicting_positions(batch["labels"]).numel() == 16 + 5  # logits only before the two answers
    assert (hasattr(model.model.language_model.layers[0].self_attn, "g_proj_1")) == (attention == "nsa")


def test_predicting_positions():
    labels = torch.full((2, 8), -100)
    labels[0, 3:5] = 7
    labels[1, 6] = 9
    assert predicting_positions(labels).tolist() == [2, 3, 5]


def test_meta_build_and_shard_local_init():
    config = tiny_config("model.init_device=meta", "model.vision_attention=batched")
    model = build_model(config)
    assert is_on_meta(model)
    materialize(model, torch.device("cpu"), seed=0, rank=0)
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    for name, p in params.items():
        if name.endswith(("q_proj.weight", "mlp.gate_proj.weight")) or name == "lm_head.weight":
            assert abs(p.std().item() - 0.02) < 0.003, name
        if "norm" in name or "ln_q" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        if name.endswith(("g_proj_2.weight", "g_proj_2.bias")) or name.endswith(".bias") and "g_proj" not in name:
            assert not p.any(), name
    assert not params["model.language_model.embed_tokens.weight"][0].any()  # padding row
    bound = 1 / 64**0.5
    g1 = params["model.language_model.layers.0.self_attn.g_proj_1.weight"]
    assert g1.abs().max() <= bound and g1.std() > bound / 2
    fresh = build_model(tiny_config("model.init_device=cpu"))
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, dict(fresh.named_buffers())[name], msg=name)
    loss = model_loss(model.train(), tiny_batch(model.config))
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_init_plan_covers_the_7b_model_on_meta(attention):
    config = load_config(ROOT / "train/configs/bench_7b.toml", [f"model.attention={attention}"])
    model = build_model(config)
    assert is_on_meta(model)
    plan = {name: (kind, scale) for name, _, kind, scale, _ in init_plan(model)}
    assert len(plan) == len(list(model.named_parameters()))
    assert plan["model.language_model.layers.3.mlp.down_proj.weight"] == ("normal", 0.02)
    assert plan["model.visual.blocks.0.norm1.weight"] == ("fill", 1.0)
    assert plan["model.visual.patch_embed.proj.weight"] == ("normal", 0.02)
    assert plan["model.language_model.embed_tokens.weight"] == ("embedding", 0.02)
    gate = "model.language_model.layers.27.self_attn.g_proj_2.weight"
    assert plan.get(gate) == (("fill", 0.0) if attention == "nsa" else None)
    assert sum(p.numel() for p in model.parameters()) > 8e9


@pytest.mark.parametrize("grid", [(2, 16, 16), (2, 6, 10), (3, 4, 8)])
def test_batched_vision_attention_matches_upstream(grid):
    config = tiny_qwen2_5_vl_config()
    from model import random_model

    upstream = random_model(config, dtype=torch.float64).model.visual
    batched = random_model(config, dtype=torch.float64).model.visual
    assert batch_vision_attention(batched) == config.vision_config.depth
    t, h, w = grid
    pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, dtype=torch.float64)
    thw = torch.tensor([grid])
    expected = upstream(pixels, grid_thw=thw).pooler_output
    torch.testing.assert_close(batched(pixels, grid_thw=thw).pooler_output, expected)


def test_segment_runs():
    assert segment_runs(torch.tensor([0, 64, 128, 192, 240, 240, 288])) == [(0, 3, 64), (192, 2, 48)]
    assert segment_runs(torch.tensor([0, 4, 6])) == [(0, 1, 4), (4, 1, 2)]


def test_frozen_vision_tower_keeps_no_graph():
    model = build_model(tiny_config("model.init_device=cpu")).train()
    select_trainable(model, "language_model")
    batch = tiny_batch(model.config)
    out = model.model.visual(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"]).pooler_output
    assert out.grad_fn is None and not out.requires_grad
    assert not any(p.requires_grad for p in model.model.visual.parameters())


def test_synthetic_tensor_samples():
    config = load_config(ROOT / "train/configs/bench_7b.toml", ["data.max_length=65536"])
    from model import qwen2_5_vl_7b_config
    from model.spans import SparseModality, find_spans, tokens_per_item

    model_config = qwen2_5_vl_7b_config()
    data = config.data
    dataset = SyntheticTensorDataset(model_config, sample_tokens=data.max_length, answer_tokens=data.answer_tokens,
                                     frame_patches=data.synthetic_frame_patches, count=2,
                                     video_multiple=data.synthetic_video_multiple)
    sample = dataset[1]
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids.shape == (65536,) and dataset[1] is sample  # made once
    assert (labels != -100).sum() == 256 and (labels[-256:] == ids[-256:]).all()
    video = int((ids == model_config.video_token_id).sum())
    assert video % 128 == 0 and video == 65152
    t, h, w = sample["video_grid_thw"][0].tolist()
    assert (h, w) == (16, 16) and t * h * w // 4 == video
    assert sample["pixel_values_videos"].shape == (t * h * w, 1176)
    plan = find_spans(ids[None], [SparseModality("video", model_config.video_token_id,
                                                  tokens_per_item(sample["video_grid_thw"], 2))])
    assert plan.spans == (((17, 17 + video),),)
    with pytest.raises(ValueError, match="no room"):
        SyntheticTensorDataset(model_config, sample_tokens=300, answer_tokens=256)


def fake_result(tmp_path, mode, tokens, tokens_per_s, **extra):
    run = tmp_path / f"{mode}-{tokens}"
    run.mkdir(parents=True)
    record = {"mode": mode, "tokens_per_sample": tokens, "world_size": 2, "steps": 20, "timed_steps": 17,
              "step_time_s": 2 * tokens / tokens_per_s, "tokens_per_s": tokens_per_s,
              "tokens_per_s_per_gpu": tokens_per_s / 2, "peak_memory_gib": 80.5, "peak_reserved_gib": 90.0,
              "first_step_overhead_s": 60.0, "compile": {"compile_time_s": 50.0, "recompiles": 0, "graph_breaks": 3},
              "gpu": "NVIDIA H200", "torch": "2.11.0", "transformers": "5.17.0", "commit": "abc", "warmup_steps": 3,
              "complete": True, **extra}
    (run / "results.json").write_text(json.dumps(record))
    (run / "exit_code").write_text("0\n")
    return run


def test_report_merges_runs_with_ratios(tmp_path, capsys):
    fake_result(tmp_path, "nsa", 32768, 6000.0)
    fake_result(tmp_path, "dense", 32768, 8000.0)
    fake_result(tmp_path, "nsa", 65536, 9000.0, complete=False)
    fake_result(tmp_path, "dense", 65536, 6000.0)
    failed = tmp_path / "nsa-131072"
    failed.mkdir()
    (failed / "exit_code").write_text("1\n")
    done, fails = find_runs([tmp_path])
    assert len(done) == 4 and [(r.name, c) for r, c in fails] == [("nsa-131072", "1")]
    assert [(t, round(x, 2)) for t, _, _, x in ratios([r for _, r in done])] == [(32768, 0.75), (65536, 1.5)]
    text = render(done, fails)
    assert "| 65,536 | 9,000 | 6,000 | 1.50x |" in text and "failed (exit 1)" in text and "20 (17), partial" in text
    assert report_main([str(tmp_path), "--out", str(tmp_path / "report.md")]) == 0
    assert (tmp_path / "report.md").read_text() == text


RESULT_FIELDS = {"mode", "tokens_per_sample", "world_size", "steps", "step_time_s", "tokens_per_s", "peak_memory_gib",
                 "first_step_overhead_s", "compile", "gpu", "torch", "triton", "commit", "step_times_s", "complete"}


def test_meta_nsa_compiled_run(tmp_path):
    """tiny built on meta, sharded, initialised per rank; NSA layers compiled (then AC), bf16, frozen vision."""
    out = tmp_path / "out"
    torchrun(tmp_path, *TINY_TENSOR_DATA, "model.init_device=meta", "model.vision_attention=batched",
             "train.steps=4", f"train.output_dir={out}", "train.compile=true", "train.activation_checkpointing=true",
             "train.mixed_precision=bf16", "train.trainable=language_model", "optim.decay=constant",
             f"checkpoint.export_dir={tmp_path / 'export'}", timeout=120)
    steps, events = metrics(out)
    losses = [steps[s]["loss"] for s in sorted(steps)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.3, losses
    assert events[0]["init_device"] == "meta" and events[0]["attention"] == "nsa"
    results = json.loads((out / "results.json").read_text())
    assert RESULT_FIELDS <= set(results) and results["complete"] and results["mode"] == "nsa"
    assert results["tokens_per_sample"] == 200 and results["steps"] == 4 and results["world_size"] == 2
    assert results["compile"]["frames_compiled"] > 0 and results["compile"]["graphs_compiled"] > 0
    assert results["compile"]["recompiles"] == 0, results["compile"]
    from model import load_nsa_model

    state = load_nsa_model(tmp_path / "export").state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    frozen = state["model.visual.blocks.0.mlp.gate_proj.weight"]  # not trained: exactly the init
    assert abs(frozen.std().item() - 0.02) < 0.004 and abs(frozen.mean().item()) < 0.004
    half = frozen.shape[0] // 2
    assert not torch.equal(frozen[:half], frozen[half:])  # the two ranks drew different shards
    assert torch.equal(state["model.visual.blocks.0.norm1.weight"], torch.ones(32))
    assert not state["model.language_model.embed_tokens.weight"][0].any()  # padding row: zero, never updated
    assert state["model.language_model.layers.0.self_attn.g_proj_2.weight"].abs().max() > 0  # trained from 0


def test_bench_script_dense_run(tmp_path):
    """scripts/bench_train_7b.sh with the tiny CPU config: the dense flag, results.json, report, the
    profiled step's kernel summary, archive."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "bench"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHON=sys.executable, CONFIG=str(cfg),
               ARCHIVE=str(tmp_path / "bench.tgz"), FLEXNSA_COMMIT="cafe",
               BENCH_SET=" ".join(TINY_DATA + ["model.init_device=meta", "train.device=cpu", "log.profile_steps=[2]"]))
    proc = subprocess.run(["bash", "scripts/bench_train_7b.sh", str(out), "dense:160:3"], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "=== dense 160: exit 0" in proc.stdout
    results = json.loads((out / "dense-160" / "results.json").read_text())
    assert results["mode"] == "dense" and results["tokens_per_sample"] == 160 and results["commit"] == "cafe"
    assert results["steps"] == 3 and results["complete"]
    steps, events = metrics(out / "dense-160")
    assert events[0]["attention"] == "dense" and len(steps) == 3
    assert "| dense-160 | dense | 160 |" in (out / "report.md").read_text()
    # the profiled step's rank-0 trace is summarised (a CPU trace: no GPU kernels, the file is still written)
    assert "## step2.rank0.pt.trace.json.gz" in (out / "kernel_time.md").read_text()
    import tarfile

    with tarfile.open(tmp_path / "bench.tgz") as tar:
        assert "bench/dense-160/results.json" in tar.getnames()

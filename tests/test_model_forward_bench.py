"""`python -m profiling.model_forward`: whole-model forward, dense vs NSA, results.json and report.md."""

import json

import pytest
import torch

from profiling import model_forward
from profiling.model_forward import main


def read_results(out):
    return json.loads((out / "results.json").read_text())


def test_tiny_cpu_run_writes_dense_and_nsa(tmp_path, capsys):
    """Tiny model on CPU, a 64-token video: both models timed, finite, written with versions."""
    out = tmp_path / "run"
    # reference backend: the CPU flex compile alone takes 10-30 s; flex runs in the GPU test below
    argv = ["--device", "cpu", "--model", "tiny", "--video-tokens", "64", "--backend", "reference",
            "--repeats", "2", "--warmup", "0", "--prompt-tokens", "5", "--out", str(out)]
    assert main(argv) == 0
    results = read_results(out)
    (row,) = results["lengths"]
    assert (row["video_tokens"], row["frames"], row["seq_len"]) == (64, 32, 64 + 2 + 10)
    for side in ("vision", "dense", "nsa"):
        assert row[side]["status"] == "ok" and row[side]["median_ms"] > 0 and len(row[side]["times_ms"]) == 2
    assert row["dense"]["finite"] and row["nsa"]["finite"]
    assert row["speedup"] == pytest.approx(row["dense"]["median_ms"] / row["nsa"]["median_ms"])
    assert results["nsa_config"]["selection"] == "block_shared" and results["nsa_config"]["backend"] == "reference"
    meta = results["meta"]
    assert meta["torch"] == torch.__version__ and meta["transformers"] and meta["commit"]
    assert results["model"]["name"] == "tiny" and results["errors"] == []
    report = (out / "report.md").read_text()
    assert "| 64 | 32 | 76 |" in report
    assert "dense forward" in capsys.readouterr().out  # progress goes to stdout


def test_commit_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXNSA_COMMIT", "abc123def456")
    meta = model_forward.metadata(torch.device("cpu"), [])
    assert meta["commit"] == "abc123def456"


def test_video_tokens_that_are_not_whole_frames_are_refused(tmp_path, capsys):
    """At 224 px one temporal patch (2 frames) is 64 tokens: 1000 cannot be laid out."""
    out = tmp_path / "bad"
    status = main(["--device", "cpu", "--model", "tiny", "--frame-size", "224", "--video-tokens", "1000", "--out", str(out)])
    assert status == 2
    err = capsys.readouterr().err
    assert "--video-tokens 1000" in err and "multiple of 64" in err and "960 or 1024" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--frame-size", "100"], "multiple of 28"),
        (["--backend", "reference", "--video-tokens", "16K", "--frame-size", "224"], "reference backend"),
        (["--model", "7b"], "needs a CUDA GPU"),
        (["--repeats", "0"], "--repeats"),
        (["--video-tokens", "4K2"], "not a length"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    assert main(["--device", "cpu", "--out", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_batch_layout_matches_grid():
    """The built batch: video tokens between vision_start/end, a grid giving exactly N tokens."""
    config = model_forward.model_config("tiny", None)
    batch = model_forward.video_batch(config, 96, 56, 3, torch.device("cpu"), torch.float32, seed=0)
    ids = batch["input_ids"][0]
    assert ids.shape == (3 + 1 + 96 + 1 + 3,)
    assert (ids[4:100] == config.video_token_id).all() and ids[3] == config.vision_start_token_id
    # grid in patches: 24 temporal patches (48 frames) of 4 x 4 patches, merged 2 x 2 -> 24 * 4 tokens
    assert batch["video_grid_thw"].tolist() == [[24, 4, 4]] and batch["pixel_values_videos"].shape == (24 * 16, 1176)
    assert (batch["mm_token_type_ids"][0] == 2).sum() == 96


@pytest.mark.gpu
def test_7b_shape_two_layers_4k_on_gpu(tmp_path):
    """The 7B shape cut to 2 text layers, a 4K-token video: dense and NSA (flex) both finite."""
    out = tmp_path / "gpu"
    argv = ["--model", "7b", "--layers", "2", "--video-tokens", "4K", "--repeats", "1", "--warmup", "0",
            "--out", str(out)]
    assert main(argv) == 0
    (row,) = read_results(out)["lengths"]
    for side in ("dense", "nsa"):
        assert row[side]["status"] == "ok" and row[side]["finite"], row[side]
        assert row[side]["peak_mb"] > row[side]["start_mb"] > 0
    assert row["frames"] == 128 and read_results(out)["nsa_config"]["backend"] == "flex"

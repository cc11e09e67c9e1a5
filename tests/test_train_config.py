"""train.config: TOML + --set overrides, and the startup errors a typo or a bad batch size gives."""

import pytest

from train.__main__ import main
from train.config import ConfigError, load_config
from train.trainer import grad_accumulation


def write(tmp_path, text):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_file_and_overrides(tmp_path):
    path = write(tmp_path, '[optim]\nlr = 1e-3\nbetas = [0.8, 0.9]\n[nsa]\nbackend = "reference"\nblock_size = 4\nstride = 4\n')
    config = load_config(path, ["optim.lr=2", "train.output_dir=/tmp/x y", "data.synthetic_video_grid=[2, 2, 2]", "train.compile=true"])
    assert config.optim.lr == 2.0 and isinstance(config.optim.lr, float)
    assert config.optim.betas == [0.8, 0.9]
    assert config.train.output_dir == "/tmp/x y"
    assert config.data.synthetic_video_grid == [2, 2, 2]
    assert config.train.compile is True
    assert config.nsa_config().block_size == 4 and config.nsa_config().backend == "reference"


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("[optim]\nlrr = 1\n", [], "optim.lrr"),
        ("[optimizer]\nlr = 1\n", [], "[optimizer]"),
        ("", ["nsa.blok_size=4"], "nsa.blok_size"),
        ("", ["train.steps=ten"], "train.steps must be int"),
        ("", ["train.steps=true"], "train.steps must be int"),
        ("", ["train.trainable=vision"], "train.trainable must be one of"),
        ("", ["nsa.stride=128"], "stride"),
        ("", ["optim.lr"], "expected section.key=value"),
        ("[train\n", [], "invalid TOML"),
        ("", ["log.profile_steps=[0]"], "log.profile_steps holds step numbers"),
        ("", ["log.profile_steps=3"], "log.profile_steps must be a list"),
        ("", ["data.prefetch=-1"], "data.prefetch counts micro-batches"),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(write(tmp_path, text), overrides)


def test_cli_reports_config_errors(tmp_path, capsys):
    assert main(["--config", str(write(tmp_path, "[data]\nglobal_batch_sise = 4\n"))]) == 2
    assert "data.global_batch_sise" in capsys.readouterr().err


def test_global_batch_must_split_over_ranks():
    data = load_config(None, ["data.global_batch_size=6", "data.micro_batch_size=1"]).data
    assert grad_accumulation(data, 2) == 3
    with pytest.raises(ConfigError, match="world size \\(4\\)"):
        grad_accumulation(data, 4)


def test_tensorboard_requested_without_package(tmp_path, monkeypatch):
    import sys

    from train.metrics import MetricsLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match="pip install tensorboard"):
        MetricsLogger(tmp_path, rank=0, total_steps=1, start_step=0, progress=False, tensorboard=True)


@pytest.mark.parametrize("implementation, fused, foreach", [("fused", True, None), ("foreach", None, True), ("for-loop", None, False)])
def test_optimizer_implementation(implementation, fused, foreach):
    import torch

    from train.optim import build_optimizer

    optim = load_config(overrides=[f"optim.implementation={implementation}"]).optim
    opt = build_optimizer(torch.nn.Linear(3, 2), optim)
    assert (opt.defaults["fused"], opt.defaults["foreach"]) == (fused, foreach)
    with pytest.raises(ConfigError, match="implementation"):
        load_config(overrides=["optim.implementation=fast"])

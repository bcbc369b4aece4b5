"""The command line end to end, in subprocesses, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnlab.checkpoint import load_checkpoint
from tests.helpers import TINY, TINY_MLP, TINY_TRAINER, not_blank, read_scalars, write_mnist


def cnnlab(*args: str, cwd: Path, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}  # keep errors short
    return subprocess.run([sys.executable, *flags, "-m", "cnnlab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def imported_torch(result: subprocess.CompletedProcess) -> bool:
    """With -X importtime every imported module is listed on stderr as '... | name'."""
    return any(line.rstrip().endswith("| torch") for line in result.stderr.splitlines())


def test_console_script_help_lists_the_commands(tmp_path):
    script = Path(sys.executable).parent / "cnnlab"
    result = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "train" in result.stdout and "usage: cnnlab COMMAND" in result.stdout
    assert cnnlab(cwd=tmp_path).returncode == 2
    unknown = cnnlab("trian", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown command 'trian'" in unknown.stderr and "train" in unknown.stderr


def test_train_help_lists_every_group_fast_and_without_torch(tmp_path):
    result = cnnlab("train", "--help", cwd=tmp_path, importtime=True)
    assert result.returncode == 0
    for text in ("cnnlab train", "activation: celu, elu, gelu", "dataset: cifar10, fake, fashion_mnist, imagefolder, mnist",
                 "model: convnet, mlp", "optimizer: adam, adamw, rmsprop, sgd", "scheduler: cosine, none, onecycle, step",
                 "log_every"):
        assert text in result.stdout, text
    assert not imported_torch(result)


def test_cfg_job_prints_the_composed_config_without_torch(tmp_path):
    result = cnnlab("train", "model=convnet", "activation=elu", "--cfg", "job", cwd=tmp_path, importtime=True)
    assert result.returncode == 0
    assert "name: convnet" in result.stdout and "alpha: 1.0" in result.stdout and "epochs: 5" in result.stdout
    assert not imported_torch(result)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("activation=swish", ["activation/swish", "leaky_relu", "selu"]),
        ("model=resnet", ["model/resnet", "convnet", "mlp"]),
        ("trainer.epoch=3", ["trainer.epoch"]),
        ("+trainer.epoch=3", ["trainer.epoch", "epochs", "batch_size"]),
        ("optimizer.lr=abc", ["optimizer.lr", "abc"]),
        ("optimizer.lr=0", ["optimizer.lr", "> 0"]),
        ("trainer.epochs=0", ["trainer.epochs", "at least 1"]),
        ("dataset.val_fraction=1.5", ["dataset.val_fraction"]),
        ("model.dropout=1", ["model.dropout", "[0, 1)"]),
        ("trainer.device=gpu", ["trainer.device", "auto, cpu, cuda, cuda:N"]),
    ],
)
def test_a_bad_override_is_one_clear_error_exit_2_and_no_traceback(tmp_path, override, expected):
    result = cnnlab("train", override, cwd=tmp_path, importtime=True)
    assert result.returncode == 2
    message = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    for text in expected:
        assert text in message, (text, message)
    assert "Traceback" not in message
    assert not imported_torch(result)  # answered before the heavy imports


def test_train_end_to_end_writes_a_complete_run_directory(tmp_path):
    result = cnnlab("train", *TINY, "trainer.epochs=2", "trainer.log_every=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "outputs").glob("*/*")  # outputs/DATE/TIME: the default layout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2 and metrics["steps"] == 2 * (270 // 32)
    for key in ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "seconds", "device", "parameters"):
        assert metrics[key] is not None, key
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert "trainer.epochs=2" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    scalars = read_scalars(run_dir)
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "test/acc", "lr", "grad_norm/total"} <= set(scalars)
    assert scalars["dead_fraction/all"][0][0] == 0  # probes are on by default, from step 0
    assert set(metrics["dead_fraction"]) == {"act01_fc", "all"}
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == metrics["steps"]
    assert "epoch 2/2" in result.stdout and "cnnlab run: completed" in result.stdout


def test_multirun_names_jobs_by_the_overrides_that_differ(tmp_path):
    write_mnist(tmp_path / "my data", train=60, test=20)
    shared = [f"dataset.root={tmp_path / 'my data'}", "dataset.download=false", *TINY_MLP, *TINY_TRAINER]
    result = cnnlab("train", "-m", "activation=relu,elu", *shared, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = sorted(path.name for path in (tmp_path / "sweep").iterdir() if path.is_dir())
    assert jobs == ["activation=elu", "activation=relu"]  # no shared override, no nested folders
    for job in jobs:
        assert json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["status"] == "completed"
        assert "val/acc" in read_scalars(tmp_path / "sweep" / job)
    assert (tmp_path / "sweep" / "multirun.yaml").is_file()


def test_a_sweep_with_a_bad_job_runs_the_others_and_exits_non_zero(tmp_path):
    result = cnnlab("train", "-m", "optimizer.lr=0,0.01", *TINY, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 2
    assert "optimizer.lr" in result.stderr and "Traceback" not in result.stderr
    status = {job: json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["status"]
              for job in ("optimizer.lr=0", "optimizer.lr=0.01")}
    assert status == {"optimizer.lr=0": "invalid", "optimizer.lr=0.01": "completed"}


def test_config_dir_adds_a_users_own_options(tmp_path):
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "wide_mlp.yaml").write_text(
        "name: mlp\nhidden: [1024, 1024]\nbatchnorm: true\ndropout: 0.1\ninit: kaiming\n")
    result = cnnlab("train", "--config-dir", "mine", "model=wide_mlp", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "- 1024" in result.stdout and "init: kaiming" in result.stdout


def test_activations_command_lists_every_activation_and_plots_them(tmp_path):
    from cnnlab.models import ACTIVATIONS

    result = cnnlab("activations", "--plot", "acts.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ACTIVATIONS:
        assert name in result.stdout
    assert not_blank(tmp_path / "acts.png")

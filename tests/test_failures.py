"""Bad input, divergence and unsafe checkpoints: a clear error, a documented exit code, no
traceback, nothing lost. The command line runs in this process (`cnnlab.cli.main`), as a user's
shell would run it, only without paying torch's import time for every case. The messages of data
and device errors are tested where they are made (test_data.py, test_trainer.py); here, what the
command line does with such an error."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from cnnlab import cli
from cnnlab.checkpoint import load_checkpoint
from cnnlab.trainer import train_step
from tests.helpers import TINY, TINY_CONVNET, TINY_DATA, TINY_MLP, TINY_TRAINER, write_image_folder


@pytest.fixture
def run_cli(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit:
            cli.main(list(args))
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return exit.value.code, out, err

    return run


def test_an_error_in_a_run_is_one_line_on_stderr_and_exit_1(run_cli):
    # Missing dataset files stand for every error that a run finds once it has started.
    code, _, err = run_cli("train", "dataset.root=missing", "dataset.download=false", "trainer.device=cpu")
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "train-images-idx3-ubyte" in err and "dataset.download=true" in err


def test_warnings_during_a_run_are_kept_in_its_train_log(run_cli, tmp_path):
    root = write_image_folder(tmp_path / "pets", per_class=10, size=8)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")  # skipped with a warning
    code, _, _ = run_cli("train", "dataset=imagefolder", "dataset.path=pets", "dataset.image_size=8", *TINY_MLP,
                         *TINY_TRAINER, "trainer.batch_size=4", "probes.batch_size=4", "hydra.run.dir=run")
    assert code == 0
    assert "broken.jpg" in (tmp_path / "run" / "train.log").read_text()


def test_an_output_directory_that_cannot_be_written(run_cli, tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should go")
    code, _, err = run_cli("train", *TINY, "hydra.run.dir=blocker/run")
    assert code == 2 and "hydra.run.dir" in err and "is a file" in err
    code, _, err = run_cli("train", "-m", "activation=relu,elu", *TINY, "hydra.sweep.dir=blocker/sweep")
    assert code == 2 and "hydra.sweep.dir" in err


def test_a_new_run_never_overwrites_an_old_one(run_cli, tmp_path):
    assert run_cli("train", *TINY, "hydra.run.dir=run")[0] == 0
    before = (tmp_path / "run" / "metrics.json").read_text()
    code, _, err = run_cli("train", *TINY, "activation=elu", "hydra.run.dir=run")
    assert code == 2 and "already holds a run" in err and "resume=run" in err
    assert (tmp_path / "run" / "metrics.json").read_text() == before
    assert "relu" in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()


def test_resume_refuses_what_is_not_a_run_or_not_this_run(run_cli, tmp_path):
    code, _, err = run_cli("train", "resume=nowhere")
    assert code == 2 and "not a run directory" in err
    assert run_cli("train", *TINY, "hydra.run.dir=mlp")[0] == 0
    assert run_cli("train", *TINY_DATA, *TINY_CONVNET, *TINY_TRAINER, "hydra.run.dir=cnn")[0] == 0
    before = (tmp_path / "mlp" / "metrics.json").read_text()

    code, _, err = run_cli("train", "resume=mlp", "optimizer.lr=0.5")  # a setting that makes another run
    assert code == 2 and "optimizer.lr cannot change" in err

    shutil.copy(tmp_path / "cnn" / "checkpoints" / "last.pt", tmp_path / "mlp" / "checkpoints" / "last.pt")
    code, _, err = run_cli("train", "resume=mlp")  # a checkpoint of a different model
    assert code == 1 and "different configuration" in err and "model" in err

    checkpoint = tmp_path / "mlp" / "checkpoints" / "last.pt"
    checkpoint.write_bytes((tmp_path / "cnn" / "checkpoints" / "last.pt").read_bytes()[:300])  # truncated
    code, _, err = run_cli("train", "resume=mlp")
    assert code == 1 and "Cannot read checkpoint" in err
    assert (tmp_path / "mlp" / "metrics.json").read_text() == before  # nothing lost on the way


class Payload:
    """Unpickling this would create a file: a stand-in for any code a crafted checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(run_cli, tmp_path):
    assert run_cli("train", *TINY, "hydra.run.dir=run")[0] == 0
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(checkpoint)
    state["model"] = Payload(marker)
    torch.save(state, checkpoint)

    code, _, err = run_cli("train", "resume=run")
    assert code == 1 and "Refused to load" in err and "weights_only" in err
    assert not marker.exists()
    torch.load(checkpoint, weights_only=False)  # what an unsafe loader would have done
    assert marker.exists()


def test_divergence_stops_at_that_step_keeps_the_last_good_checkpoint_and_exits_3(run_cli, tmp_path):
    # 18 steps of 30 per epoch: the run diverges in the middle of the first one.
    code, _, err = run_cli("train", *TINY, "dataset.train_size=600", "trainer.batch_size=30", "optimizer=sgd",
                           "optimizer.lr=1e4", "optimizer.momentum=0.9", "scheduler=onecycle", "trainer.epochs=4",
                           "trainer.checkpoint_every=5", "hydra.run.dir=run")
    assert code == 3
    assert "non-finite" in err and "last good checkpoint" in err and len(err.strip().splitlines()) == 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["diverged_step"] == 8
    kept = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert kept["step"] == 5 and all(torch.isfinite(v).all() for v in kept["model"].values())


def test_a_diverging_job_does_not_stop_a_sweep(run_cli, tmp_path):
    code, _, err = run_cli("train", "-m", "optimizer.lr=10000.0,0.01", "optimizer=sgd", "scheduler=onecycle",
                           *TINY, "trainer.epochs=3", "hydra.sweep.dir=sweep")
    assert code == 1
    statuses = {job: json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["status"]
                for job in ("optimizer.lr=10000.0", "optimizer.lr=0.01")}
    assert statuses == {"optimizer.lr=10000.0": "diverged", "optimizer.lr=0.01": "completed"}
    assert "optimizer.lr=10000.0 (diverged)" in err


def test_skip_mode_drops_a_non_finite_step_and_keeps_the_weights(tiny_state):
    state = tiny_state("trainer.on_nonfinite=skip", "optimizer=sgd", "optimizer.lr=0.1")
    images, labels = next(iter(state.data.train))
    before = [p.detach().clone() for p in state.parameters]
    _, finite = train_step(state, torch.full_like(images, float("nan")), labels)
    assert not finite and state.log.window.count == 0
    assert all(torch.equal(b, p) for b, p in zip(before, state.parameters))
    _, finite = train_step(state, images, labels)
    assert finite and state.log.window.count == len(labels)
    assert not all(torch.equal(b, p) for b, p in zip(before, state.parameters))

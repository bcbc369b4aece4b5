"""Runs that survive: exact resume after SIGKILL, requeued sweep jobs, refused resumes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cnnlab.train.checkpoint import load_checkpoint
from cnnlab.config import validate
from cnnlab.train.loop import train
from tests.helpers import compose_config, read_scalars

# Every source of randomness in play: shuffling, augmentation, dropout, RReLU, BatchNorm, probes. 720
# training images in batches of 40: 18 steps an epoch, 72 in all. No density figures: drawing them took
# half of each run, and they hold nothing a resume could get wrong that the scalars would not show.
RUN = ["dataset=fake", "dataset.train_size=800", "dataset.test_size=100", "dataset.image_size=16",
       "dataset.augment=true", "model=convnet", "model.channels=[8,16]", "model.fc_hidden=32", "model.batchnorm=true",
       "model.dropout=0.3", "activation=rrelu", "trainer.batch_size=40", "trainer.epochs=4", "trainer.device=cpu",
       "trainer.deterministic=true", "trainer.checkpoint_every=7", "trainer.log_every=5", "probes.every=9",
       "probes.batch_size=32", "probes.density=false", "scheduler=cosine"]


def cnnlab(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "cnnlab", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    run_dir = tmp_path_factory.mktemp("reference")
    cfg = compose_config(*RUN)
    assert train(validate(cfg), run_dir).error is None
    return run_dir


def checkpoint_step(run_dir: Path) -> int:
    try:
        return load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    except Exception:  # not written yet
        return -1


def kill_after(process: subprocess.Popen, run_dir: Path, step: int) -> None:
    """SIGKILL the run as soon as a checkpoint at or after `step` exists: wherever it is then."""
    deadline = time.monotonic() + 120
    while checkpoint_step(run_dir) < step:
        assert process.poll() is None, f"the run ended before step {step}: {process.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


def assert_same_run(run_dir: Path, reference: Path) -> None:
    ours, theirs = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (run_dir, reference))
    assert ours["step"] == theirs["step"]
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"]), "weights differ"
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    for key in ("status", "epochs", "steps", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                "best_val_acc", "dead_fraction"):
        assert ours[key] == theirs[key], key
    ours, theirs = read_scalars(run_dir), read_scalars(reference)
    for tag in ("train/loss", "val/acc", "lr", "dead_fraction/all", "grad_norm/layer01_conv"):
        assert ours[tag] == theirs[tag], tag  # every step once: nothing missing, nothing twice


@pytest.mark.parametrize("kill_at", [25, 36])  # mid-epoch 2, just after epoch 2 closed (early in epoch 1: the sweep-job test below)
def test_sigkill_at_any_moment_then_resume_gives_the_same_run(tmp_path, reference, kill_at):
    process = cnnlab("train", *RUN, "hydra.run.dir=run", cwd=tmp_path)
    kill_after(process, tmp_path / "run", kill_at)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "running"
    resumed = subprocess.run([sys.executable, "-m", "cnnlab", "train", "resume=run"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch" in resumed.stdout
    assert_same_run(tmp_path / "run", reference)


def test_a_sweep_job_run_again_in_its_folder_resumes_itself(tmp_path, reference):
    # What a cluster does with a preempted job: run the same job again, in the same folder.
    args = ["train", "-m", *RUN, "hydra.sweep.dir=sweep"]
    job = tmp_path / "sweep" / "job0"  # a one-job sweep: no override differs between jobs
    process = cnnlab(*args, cwd=tmp_path)
    kill_after(process, job, 12)
    again = subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming at epoch" in again.stdout
    assert_same_run(job, reference)
    # Once more: a completed job is left as it is.
    third = subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0 and "already ended (completed)" in third.stdout
    assert_same_run(job, reference)


def test_best_checkpoint_holds_the_best_validation_epoch(reference):
    best = load_checkpoint(reference / "checkpoints" / "best.pt")
    metrics = json.loads((reference / "metrics.json").read_text())
    assert best["val_acc"] == metrics["best_val_acc"] and best["epoch"] == metrics["best_epoch"]
    assert set(best["model"]) == set(load_checkpoint(reference / "checkpoints" / "last.pt")["model"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_finish_the_step_checkpoint_and_exit_130(tmp_path, reference, signum):
    process = cnnlab("train", *RUN, "hydra.run.dir=run", cwd=tmp_path)
    run_dir = tmp_path / "run"
    deadline = time.monotonic() + 120
    while checkpoint_step(run_dir) < 10:  # well inside the training loop
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"stopped by {signal.Signals(signum).name}" in err and "resume=" in err and "Traceback" not in err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert str(stopped_at) in err  # the checkpoint is at the step the run stopped after
    # TensorBoard was flushed: everything logged up to the stop is on disk already.
    logged = read_scalars(run_dir)["train/loss"]
    assert logged == [point for point in read_scalars(reference)["train/loss"] if point[0] <= stopped_at]

    resumed = subprocess.run([sys.executable, "-m", "cnnlab", "train", "resume=run"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, reference)


def test_a_resume_under_a_float64_default_dtype_completes_and_keeps_float32(tiny_run):
    first = tiny_run()
    torch.set_default_dtype(torch.float64)  # set elsewhere in the process (another library, a notebook)
    try:
        resumed = tiny_run("trainer.epochs=2", resume=True)
    finally:
        assert torch.get_default_dtype() == torch.float64  # the process's own setting is given back
        torch.set_default_dtype(torch.float32)
    assert first.metrics["status"] == "completed" and resumed.result.error is None
    assert resumed.metrics["status"] == "completed" and resumed.metrics["epochs"] == 2
    assert resumed.metrics["test_acc"] is not None

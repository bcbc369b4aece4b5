"""Bad input, divergence and unsafe checkpoints: a clear error, a documented exit code, no
traceback, nothing lost. The command line runs in this process (`cnnlab.cli.main`), as a user's
shell would run it, only without paying torch's import time for every case. The messages of data
and device errors are tested where they are made (test_data.py, test_trainer.py); here, what the
command line does with such an error."""

import errno
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from cnnlab.cli.train_command import train_command
from cnnlab.train.checkpoint import load_checkpoint
from cnnlab.errors import UserError
from cnnlab.rundir import run_lock
from cnnlab.status import Status
from cnnlab.train.loop import Interrupted, reported, train_step
from cnnlab.train.stops import StopRequest
from tests.helpers import (
    TINY,
    TINY_CONVNET,
    TINY_DATA,
    TINY_MLP,
    TINY_TRAINER,
    read_scalars,
    write_image_folder,
)


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

    # The run completed its epoch; trainer.epochs=2 asks it to go on, which needs its checkpoint.
    shutil.copy(tmp_path / "cnn" / "checkpoints" / "last.pt", tmp_path / "mlp" / "checkpoints" / "last.pt")
    code, _, err = run_cli("train", "resume=mlp", "trainer.epochs=2")  # a checkpoint of a different model
    assert code == 1 and "different configuration" in err and "model.name" in err

    checkpoint = tmp_path / "mlp" / "checkpoints" / "last.pt"
    checkpoint.write_bytes((tmp_path / "cnn" / "checkpoints" / "last.pt").read_bytes()[:300])  # truncated
    code, _, err = run_cli("train", "resume=mlp", "trainer.epochs=2")
    assert code == 1 and "Cannot read checkpoint" in err and "truncated" in err
    checkpoint.write_bytes(bytes(range(256)) * 8)  # random bytes
    code, _, err = run_cli("train", "resume=mlp", "trainer.epochs=2")
    assert code == 1 and "not a checkpoint" in err and "run code" not in err
    assert (tmp_path / "mlp" / "metrics.json").read_text() == before  # nothing lost on the way
    assert "epochs: 1" in (tmp_path / "mlp" / ".hydra" / "config.yaml").read_text()  # nor its config rewritten


def test_a_corrupt_last_checkpoint_is_refused_with_exit_1_and_the_one_before_it_resumes(run_cli, tmp_path):
    assert run_cli("train", *TINY, "trainer.checkpoint_every=4", "hydra.run.dir=run")[0] == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    before = (tmp_path / "run" / "metrics.json").read_text()
    data = bytearray((checkpoints / "last.pt").read_bytes())
    middle = len(data) // 2
    data[middle - 2500:middle + 2500] = bytes(5000)  # a failing disk (issue 20, D6)
    (checkpoints / "last.pt").write_bytes(bytes(data))

    code, _, err = run_cli("train", "resume=run", "trainer.epochs=2")
    assert code == 1 and f"{checkpoints / 'last.pt'} is corrupt (checksum mismatch" in err
    assert f"{checkpoints / 'last.prev.pt'}, the checkpoint written before it" in err
    assert f"cp {checkpoints / 'last.prev.pt'} {checkpoints / 'last.pt'}" in err
    assert (tmp_path / "run" / "metrics.json").read_text() == before  # a refused resume changes nothing

    shutil.copy(checkpoints / "last.prev.pt", checkpoints / "last.pt")
    code, out, err = run_cli("train", "resume=run", "trainer.epochs=2")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 2


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

    code, _, err = run_cli("train", "resume=run", "trainer.epochs=2")  # on from the completed epoch
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
    assert "lr=10000 (diverged)" in err
    diverged = tmp_path / "sweep" / "optimizer.lr=10000.0"
    assert not (diverged / "checkpoints" / "last.pt").exists()  # it diverged before its first checkpoint
    before = (diverged / "metrics.json").read_text()
    code, out, _ = run_cli("train", "-m", "optimizer.lr=10000.0,0.01", "optimizer=sgd", "scheduler=onecycle",
                           *TINY, "trainer.epochs=3", "hydra.sweep.dir=sweep")  # the sweep run again
    assert code == 1 and out.count("already ended") == 2 and (diverged / "metrics.json").read_text() == before


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


def test_a_run_whose_event_writer_dies_fails_with_one_message_and_keeps_its_results(run_cli, tmp_path, monkeypatch):
    from tensorboard.summary.writer.record_writer import RecordWriter

    write = RecordWriter.write

    def fails_on_test_metrics(self, data):  # as `ulimit -n 8` fails TensorBoard's writer thread
        if threading.current_thread() is not threading.main_thread() and b"test/acc" in data:
            raise OSError(errno.EMFILE, "Too many open files")
        return write(self, data)

    monkeypatch.setattr(RecordWriter, "write", fails_on_test_metrics)
    code, _, err = run_cli("train", *TINY, "hydra.run.dir=run")  # run_cli: no traceback, the thread's neither
    assert code == 1 and "TensorBoard's event writer failed ([Errno 24] Too many open files)" in err, err
    assert "resume=" in err and err.count("Too many open files") == 2  # the cause, and what to do
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "TensorBoard" in metrics["error"] and metrics["epochs"] == 1
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == metrics["steps"]


def test_too_many_open_files_in_the_run_is_one_message_naming_the_limit_and_the_resume():
    error = reported(OSError(errno.EMFILE, "Too many open files"), Path("runs/x"))
    assert isinstance(error, UserError) and "may open only" in str(error) and "ulimit -n" in str(error)
    assert "resume=runs/x" in str(error)


# --- one writer per run folder --------------------------------------------------------------------
def test_a_second_run_cannot_write_into_the_folder_of_a_live_one(run_cli, tmp_path):
    with run_lock(tmp_path / "run"):  # what a live run holds until its process ends
        code, _, err = run_cli("train", *TINY, "hydra.run.dir=run")
        assert code == 2 and "still going" in err
        assert not (tmp_path / "run" / ".hydra").exists()  # refused before Hydra wrote anything there
    assert run_cli("train", *TINY, "trainer.epochs=2", "trainer.checkpoint_every=3", "hydra.run.dir=run")[0] == 0
    before = (tmp_path / "run" / "metrics.json").read_text()
    with run_lock(tmp_path / "run"):
        code, _, err = run_cli("train", "resume=run", "trainer.epochs=3")
        assert code == 2 and "still going" in err
    assert (tmp_path / "run" / "metrics.json").read_text() == before


def test_a_run_folder_given_through_a_variable_is_checked_like_one_typed(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_RUN", str(tmp_path / "run"))
    assert run_cli("train", *TINY, "hydra.run.dir=run", "trainer.checkpoint_every=3")[0] == 0
    record = {path: path.read_bytes() for path in (tmp_path / "run" / ".hydra").iterdir()}
    code, _, err = run_cli("train", *TINY, "trainer.seed=5", "hydra.run.dir=${oc.env:CNNLAB_RUN}")
    assert code == 2 and "already holds a run" in err
    with run_lock(tmp_path / "run"):  # a live run there
        code, _, err = run_cli("train", *TINY, "trainer.seed=5", "hydra.run.dir=${oc.env:CNNLAB_RUN}")
        assert code == 2 and "still going" in err
    assert {path: path.read_bytes() for path in record} == record  # its record of its config untouched
    assert run_cli("train", "resume=${oc.env:CNNLAB_RUN}", "trainer.epochs=2")[0] == 0  # and it resumes
    assert "epochs: 2" in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()


def test_a_sweep_run_again_keeps_the_record_of_the_config_of_its_jobs_that_ended(run_cli, tmp_path):
    sweep = ["-m", "optimizer.lr=10000.0,0.01", "optimizer=sgd", *TINY, "hydra.sweep.dir=sweep"]
    assert run_cli("train", *sweep)[0] == 1  # one diverged, one completed
    records = {path: path.read_bytes() for path in (tmp_path / "sweep").glob("*/.hydra/*.yaml")}
    assert len(records) == 6
    code, out, _ = run_cli("train", *sweep, "trainer.log_every=3")  # a different config for each job
    assert code == 1 and out.count("already ended") == 2
    assert {path: path.read_bytes() for path in records} == records  # compare still reads what ran


def test_a_folder_left_by_a_run_killed_before_its_first_checkpoint_is_reused_cleanly(run_cli, tmp_path):
    stale = tmp_path / "run"
    stale.mkdir()
    (stale / ".cnnlab.lock").write_text("999")  # the killed run held the folder: its files are cnnlab's
    (stale / "events.out.tfevents.0.stale").write_bytes(b"")
    (stale / "metrics.json").write_text('{"status": "running"}')
    assert run_cli("train", *TINY, "hydra.run.dir=run")[0] == 0
    assert not (stale / "events.out.tfevents.0.stale").exists()
    assert json.loads((stale / "metrics.json").read_text())["status"] == "completed"
    assert [step for step, _ in read_scalars(stale)["val/acc"]] == [8]  # one run's events, not two


# --- settings and checkpoints of resumed runs -----------------------------------------------------
def test_a_refused_resume_leaves_the_runs_config_as_it_was(run_cli, tmp_path):
    assert run_cli("train", *TINY, "hydra.run.dir=run")[0] == 0
    saved = tmp_path / "run" / ".hydra" / "config.yaml"
    before = saved.read_text()
    assert run_cli("train", "resume=run", "trainer.epochs=2", "trainer.log_every=abc")[0] == 2
    assert run_cli("train", "resume=run", "trainer.epochs=2", "trainer.device=cuda:7")[0] == 1
    assert saved.read_text() == before
    code, _, err = run_cli("train", "resume=run", "trainer.epochs=0")
    assert code == 2 and saved.read_text() == before
    assert run_cli("train", "resume=run", "trainer.epochs=2")[0] == 0  # accepted: the record follows
    assert "epochs: 2" in saved.read_text() and json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 2


def test_a_resume_may_not_make_a_run_shorter_than_it_already_is(run_cli, tmp_path):
    assert run_cli("train", *TINY, "trainer.epochs=2", "hydra.run.dir=run")[0] == 0
    code, _, err = run_cli("train", "resume=run", "trainer.epochs=1")
    assert code == 2 and "fewer than the 2 epochs" in err
    assert "epochs: 2" in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()


def test_resuming_a_completed_run_has_nothing_to_do_and_changes_nothing(run_cli, tmp_path):
    assert run_cli("train", *TINY, "hydra.run.dir=run")[0] == 0
    files = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()}
    code, out, _ = run_cli("train", "resume=run")
    assert code == 0 and "nothing to do" in out
    assert {path: path.read_bytes() for path in files} == files
    assert {p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.suffix != ".log"} == {
        p for p in files if p.suffix != ".log"}


def test_an_interrupted_run_says_how_far_it_got_and_its_resume_adds_to_its_time(tiny_run, tmp_path):
    run = tiny_run("trainer.epochs=2", stop=StopRequest(at_step=3))  # as a cluster preempting the job would
    assert run.result.status == Status.INTERRUPTED and isinstance(run.result.error, Interrupted)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["steps"] == 3 and metrics["epochs"] == 0
    spent = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["metrics"]["seconds"]
    assert spent > 0

    metrics = tiny_run("trainer.epochs=2", resume=True).metrics
    assert metrics["status"] == "completed" and metrics["steps"] == 16
    assert metrics["seconds"] > spent  # the time before the interrupt, and this process's


# --- stop requests outside the training steps ------------------------------------------------------
def test_a_stop_request_while_the_run_starts_ends_it_cleanly_with_nothing_to_resume(tiny_run, tmp_path):
    run = tiny_run(stop=StopRequest(during="setup"))  # preempted while it loads its data
    assert run.result.status == Status.INTERRUPTED and "after step 0" in str(run.result.error)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "interrupted"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_stop_request_during_the_final_test_lets_the_finished_run_complete(tiny_run, tmp_path):
    run = tiny_run(stop=StopRequest(during="test"))
    assert run.result.status == Status.COMPLETED and run.result.error is None
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["test_acc"] is not None


# --- divergence the loss cannot see, disks that fill, machines too small -----------------------------
def test_a_last_step_that_breaks_the_model_is_caught_although_its_loss_was_finite(run_cli, tmp_path):
    # 270 images, batches of 100: two steps; the second makes the weights so large that the
    # validation logits overflow, while its own training loss was still finite.
    code, _, err = run_cli("train", *TINY, "optimizer=sgd", "optimizer.lr=1e10", "trainer.batch_size=100",
                           "hydra.run.dir=run")
    assert code == 3 and "validation loss became non-finite" in err
    assert "before its first checkpoint" in err and "checkpoints" not in err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text(),
                         parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))
    assert metrics["status"] == "diverged" and metrics["diverged_step"] == 2
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_full_disk_keeps_the_last_good_checkpoint_leaves_no_temporaries_and_says_so(tiny_run, monkeypatch, tmp_path):
    save, calls = torch.save, []

    def disk_fills_after_the_first_epoch(obj, file):
        calls.append(1)
        if len(calls) > 2:  # best.pt and last.pt of epoch 1 fit
            file.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, file)

    monkeypatch.setattr(torch, "save", disk_fills_after_the_first_epoch)
    error = tiny_run("trainer.epochs=3", "optimizer.lr=0.01").result.error
    assert isinstance(error, UserError)
    assert re.search("No space left on device.*last checkpoint written before it is kept", str(error))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"
    assert not list((tmp_path / "run").rglob("*.tmp"))
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1


class FileThatFills:
    """A file whose writes fail with `code` after `room` bytes, as a full disk's or a size limit's do."""

    def __init__(self, file, room: int, code: int):
        self.file, self.room, self.code = file, room, code

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(self.code, os.strerror(self.code))
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EPERM])
def test_a_write_error_inside_torchs_zip_writer_names_the_checkpoint_and_keeps_the_one_before(tiny_run, monkeypatch,
                                                                                             tmp_path, code):
    save, calls = torch.save, []

    def fails_after_the_first_epoch(obj, file):
        calls.append(1)
        save(obj, FileThatFills(file, 1000, code) if len(calls) > 2 else file)  # torch's zip writer gets the error

    monkeypatch.setattr(torch, "save", fails_after_the_first_epoch)
    error = tiny_run("trainer.epochs=3", "optimizer.lr=0.01").result.error
    assert isinstance(error, UserError), error
    checkpoints = tmp_path / "run" / "checkpoints"
    assert f"[Errno {code}] {os.strerror(code)}: '{checkpoints}/" in str(error)
    assert "last checkpoint written before it is kept" in str(error)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"
    assert not list((tmp_path / "run").rglob("*.tmp"))
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == 1


def test_a_disk_full_before_the_first_checkpoint_says_there_is_nothing_to_resume(tiny_run, monkeypatch, tmp_path):
    def full(obj, file):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    error = str(tiny_run().result.error)
    assert "before its first checkpoint, so there is nothing to resume" in error and "is kept" not in error
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_a_model_too_large_for_memory_is_one_clear_error(run_cli):
    code, _, err = run_cli("train", *TINY_DATA, "model.hidden=[100000000000]", *TINY_TRAINER, "hydra.run.dir=run")
    assert code == 1 and "does not fit in memory" in err and "model.hidden" in err


def test_an_output_folder_that_cannot_be_written_is_refused_before_hydra_starts(run_cli, monkeypatch, tmp_path):
    code, _, err = run_cli("train", *TINY, "hydra.run.dir=/proc/cnnlab-run")
    assert code == 2 and "hydra.run.dir" in err and "cannot be" in err
    assert run_cli("train", *TINY, "hydra.run.dir=run")[0] == 0

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    code, _, err = run_cli("train", "resume=run", "trainer.epochs=2")
    assert code == 2 and "Read-only file system" in err


def test_a_runs_config_that_is_not_valid_yaml_is_named_on_resume(run_cli, tmp_path):
    assert run_cli("train", *TINY, "hydra.run.dir=run")[0] == 0
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("trainer: {epochs: [1\n")
    code, _, err = run_cli("train", "resume=run", "trainer.epochs=2")
    assert code == 2 and "cannot read the run's config" in err and "config.yaml" in err


def test_a_resume_whose_overrides_cannot_resolve_is_refused_and_changes_nothing(run_cli, tmp_path, monkeypatch):
    monkeypatch.delenv("CNNLAB_UNSET_VARIABLE", raising=False)
    assert run_cli("train", *TINY, "hydra.run.dir=run")[0] == 0
    before = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()}
    code, _, err = run_cli("train", "resume=run", "trainer.epochs=2", "trainer.device=${oc.env:CNNLAB_UNSET_VARIABLE}")
    assert code == 2 and "environment variable CNNLAB_UNSET_VARIABLE, which is not set" in err
    code, _, err = run_cli("train", "resume=run", "trainer.epochs=2", "trainer.threads=${trainer.log_every}",
                           "trainer.log_every=${trainer.threads}")
    assert code == 2 and "(an interpolation loop)" in err
    assert {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()} == before


def test_a_metrics_file_holding_a_list_or_a_lock_that_is_a_folder_is_one_message(run_cli, tmp_path):
    assert run_cli("train", *TINY, "hydra.run.dir=run")[0] == 0
    shutil.copytree(tmp_path / "run", tmp_path / "listed")
    (tmp_path / "listed" / "metrics.json").write_text("[1, 2]")
    code, _, err = run_cli("train", "resume=listed", "trainer.epochs=2")
    assert code == 2 and "listed/metrics.json holds a JSON list, not the object of results a run writes" in err
    code, _, err = run_cli("inspect", "listed")
    assert code != 0 and "metrics.json holds a JSON list" in err
    (tmp_path / "run" / ".cnnlab.lock").unlink(missing_ok=True)
    (tmp_path / "run" / ".cnnlab.lock").mkdir()
    code, _, err = run_cli("train", "resume=run", "trainer.epochs=2")
    assert code == 1 and ".cnnlab.lock is a folder, not the lock file cnnlab keeps there; remove it" in err


def test_a_best_checkpoint_copied_over_the_last_one_is_refused_naming_what_it_lacks(run_cli, tmp_path):
    assert run_cli("train", *TINY, "hydra.run.dir=run")[0] == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copy(checkpoints / "best.pt", checkpoints / "last.pt")
    code, _, err = run_cli("train", "resume=run", "trainer.epochs=2")
    assert code == 1 and "not a complete cnnlab checkpoint" in err and "optimizer" in err


def test_sigterm_while_hydra_starts_a_single_run_ends_it_with_a_message_and_130(capsys, monkeypatch, tmp_path):
    def preempted_at_start(cfg):
        os.kill(os.getpid(), signal.SIGTERM)  # before the trainer's own handler exists
        raise AssertionError("SIGTERM should have interrupted the command")

    monkeypatch.chdir(tmp_path)
    code = train_command([*TINY, "hydra.run.dir=run"], job=preempted_at_start)
    assert code == 130 and "stopped at once by a signal" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the command's handler is gone again


def test_sigterm_during_the_pre_check_says_nothing_was_started_and_exits_130(capsys, monkeypatch, tmp_path):
    import importlib

    command = importlib.import_module("cnnlab.cli.train_command")  # the module, not the function cnnlab.cli exports
    def preempted_while_checking(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM should have interrupted the check")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(command, "check_config_before_hydra", preempted_while_checking)
    code = train_command(["-m", *TINY, "trainer.seed=range(0,1000)"])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted during the pre-check" in err and "nothing was started" in err
    assert not list(tmp_path.iterdir())
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from cnnlab.errors import UserError
from cnnlab.rundir import (
    LOCK_FILE,
    clear_unfinished,
    foreign_files,
    keep_as,
    last_checkpoint,
    locked_by,
    read_metrics,
    replace_atomically,
    run_lock,
    write_metrics,
)


def test_a_held_run_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    assert locked_by(tmp_path) is None
    with run_lock(tmp_path):
        assert locked_by(tmp_path) is not None
        with pytest.raises(UserError, match="in use by another cnnlab process"):
            with run_lock(tmp_path):
                pass
    assert locked_by(tmp_path) is None
    with run_lock(tmp_path):  # released: the next run may take it
        pass


def test_a_live_run_holds_its_folder_even_when_its_lock_file_is_removed(tmp_path):
    with run_lock(tmp_path / "run"):
        (tmp_path / "run" / LOCK_FILE).unlink()  # `rm RUN/.cnnlab.lock` while the run writes
        assert locked_by(tmp_path / "run") == "unknown"
        with pytest.raises(UserError, match=r"in use by another cnnlab process \(pid unknown\)"), run_lock(tmp_path / "run"):
            pass
        assert not (tmp_path / "run" / LOCK_FILE).exists()  # the refused one made none
    assert locked_by(tmp_path / "run") is None
    with run_lock(tmp_path / "run"):  # released with the run
        assert (tmp_path / "run" / LOCK_FILE).read_text() == str(os.getpid())


def test_the_operating_system_releases_the_lock_of_a_killed_run(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cnnlab.rundir import run_lock\n"
                               f"with run_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert locked_by(tmp_path) == str(holder.pid)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert locked_by(tmp_path) is None


def test_metrics_json_is_strict_json_with_null_for_nan_and_infinity(tmp_path):
    write_metrics(tmp_path, {"val_loss": float("nan"), "dead_fraction": {"all": float("inf")}, "epochs": 1})
    text = (tmp_path / "metrics.json").read_text()
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.json")) == {
        "val_loss": None, "dead_fraction": {"all": None}, "epochs": 1}
    assert read_metrics(tmp_path)["val_loss"] is None


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"the last good one")

    def fill_the_disk(file):
        file.write(b"half of it")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        replace_atomically(path, fill_the_disk)
    assert path.read_bytes() == b"the last good one"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_kept_file_stays_as_it_was_when_the_original_is_replaced_atomically(tmp_path):
    original, kept = tmp_path / "last.pt", tmp_path / "last.prev.pt"
    original.write_bytes(b"old")
    keep_as(original, kept)
    replace_atomically(original, lambda file: file.write(b"new"))
    assert kept.read_bytes() == b"old" and original.read_bytes() == b"new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]  # no temporary left


def test_a_file_is_kept_as_a_copy_where_the_filesystem_has_no_hard_links(tmp_path, monkeypatch):
    def no_hard_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    original, kept = tmp_path / "last.pt", tmp_path / "last.prev.pt"
    original.write_bytes(b"old")
    keep_as(original, kept)
    replace_atomically(original, lambda file: file.write(b"new"))
    assert kept.read_bytes() == b"old"


def a_run_killed_before_its_first_checkpoint(folder):
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("trainer: {}\n")
    (folder / ".cnnlab.lock").write_text("123")  # its run held the folder
    (folder / "events.out.tfevents.1.host").write_bytes(b"stale")
    write_metrics(folder, {"status": "running"})
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "best.pt").write_bytes(b"best of a run that never finished")
    (folder / ".events.out.tfevents.0000000000.hparams.tmp").write_bytes(b"killed while writing it")


def test_what_a_run_left_before_its_first_checkpoint_is_cleared(tmp_path):
    a_run_killed_before_its_first_checkpoint(tmp_path)
    assert sorted(clear_unfinished(tmp_path)) == ["checkpoints/best.pt", "events.out.tfevents.1.host", "metrics.json"]
    # Hydra's record of this run's config stays, and the lock file
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cnnlab.lock", ".events.out.tfevents.0000000000.hparams.tmp",
                                                          ".hydra"]


@pytest.mark.parametrize("theirs", ["notes.txt", "checkpoints/epoch10.pt.bak", "checkpoints/resnet/final.pt",
                                    ".hydra/notes.md", "density/plot.jpg"])
def test_a_folder_with_a_file_cnnlab_did_not_make_is_never_cleared(tmp_path, theirs):
    a_run_killed_before_its_first_checkpoint(tmp_path)
    (tmp_path / theirs).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / theirs).write_text("someone else's")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=f"holds files cnnlab did not make .*{theirs}"):
        clear_unfinished(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_cnnlabs_own_names_are_another_tools_where_no_cnnlab_run_has_been(tmp_path):
    (tmp_path / "metrics.json").write_text('{"loss": 0.1}')
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch10.pt").write_bytes(b"weights")
    assert {p.name for p in foreign_files(tmp_path, most=10)} == {"metrics.json", "checkpoints", "epoch10.pt"}
    (tmp_path / ".cnnlab.lock").write_text("123")  # once a cnnlab run has held it, they are cnnlab's
    assert foreign_files(tmp_path) == []
    assert foreign_files(tmp_path / "missing") == []


def test_a_folder_with_a_checkpoint_is_never_cleared(tmp_path):
    last_checkpoint(tmp_path).parent.mkdir()
    last_checkpoint(tmp_path).write_bytes(b"resume me")
    with pytest.raises(ValueError):
        clear_unfinished(tmp_path)
    assert last_checkpoint(tmp_path).read_bytes() == b"resume me"

"""`cnnlab compare` end to end: a real four-job sweep, compared by the command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cnnlab.analysis.figures import FIGURES
from cnnlab.analysis.folders import find_runs
from cnnlab.errors import UserError
from tests.fake_runs import write_run
from tests.helpers import TINY, not_blank

# What a run without sharpness estimates (probes.sharpness_every=0, the default) gets, without --tune.
DRAWN_WITHOUT_SHARPNESS = [figure for figure in FIGURES if figure not in ("sharpness.png", "tuning.png")]


def cnnlab(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A finished four-job sweep: two activations x two seeds."""
    from cnnlab.cli.train_command import train_command

    sweep = tmp_path_factory.mktemp("sweep") / "sweep"
    assert train_command(["-m", "activation=relu,tanh", "trainer.seed=0,1", *TINY, "trainer.epochs=2", "probes.every=2",
                          "probes.density=false", f"hydra.sweep.dir={sweep}"]) == 0
    return sweep


def test_compare_accepts_globs_of_run_directories(sweep, tmp_path):
    runs = find_runs([str(sweep / "activation=relu*")])
    assert [r.name for r in runs] == ["seed=0", "seed=1"]
    with pytest.raises(UserError, match="No run directories"):
        find_runs([str(tmp_path)])


def test_compare_refuses_runs_it_cannot_read_and_an_out_that_is_a_file(tmp_path, run_cli):
    write_run(tmp_path / "broken" / "a", metrics="[]")
    code, _, err = run_cli("compare", "broken")
    assert code == 2 and "No readable run" in err and "metrics.json holds a JSON list" in err

    write_run(tmp_path / "sweep" / "a")
    (tmp_path / "taken").write_text("a file")
    code, _, err = run_cli("compare", "sweep", "--out", "taken")
    assert code == 2 and "--out='taken'" in err and "is a file, not a folder" in err
    assert (tmp_path / "taken").read_text() == "a file" and not (tmp_path / "sweep" / "summary.csv").exists()


def test_compare_of_a_running_sweep_lists_the_jobs_not_started_as_missing(sweep, tmp_path, run_cli):
    partial = tmp_path / "partial"
    shutil.copytree(sweep, partial)
    shutil.rmtree(partial / "activation=tanh,trainer.seed=1")  # a job that has not started
    (partial / "activation=tanh,trainer.seed=0" / "metrics.json").unlink()  # one that is starting
    running = partial / "activation=relu,trainer.seed=1" / "metrics.json"
    running.write_text(json.dumps({**json.loads(running.read_text()), "status": "running", "test_acc": None}))
    code, out, err = run_cli("compare", "partial")
    assert code == 0, err
    summary = json.loads((partial / "summary.json").read_text())
    assert [(row["name"], row["status"]) for row in summary["runs"]] == [
        ("activation=relu, seed=0", "completed"), ("activation=relu, seed=1", "running"),
        ("activation=tanh, seed=0", "missing"), ("activation=tanh, seed=1", "missing")]
    assert "activation=tanh, seed=1" in out and out.count("missing") >= 2
    assert all(not_blank(partial / figure) for figure in DRAWN_WITHOUT_SHARPNESS)


def test_a_sweep_summary_is_written_with_one_row_per_job(sweep):
    summary = json.loads((sweep / "summary.json").read_text())
    assert [row["name"] for row in summary["runs"]] == ["activation=relu, seed=0", "activation=relu, seed=1",
                                                        "activation=tanh, seed=0", "activation=tanh, seed=1"]
    assert all(row["status"] == "completed" for row in summary["runs"]) and summary["not_completed"] == []
    relu = summary["groups"]["activation=relu"]
    assert relu["completed"] == 2 and relu["vs_best"]["verdict"] in ("best", "not distinguishable", "worse", "cannot tell")
    values = [row["val_acc"] for row in summary["runs"] if row["name"].startswith("activation=relu")]
    assert relu["val_acc"]["mean"] == pytest.approx(sum(values) / 2) and relu["val_acc"]["values"] == values
    assert summary["fixed"]["dataset"] == "fake" and summary["fixed"]["epochs"] == "2"
    lines = (sweep / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("kind,name,group,activation,trainer.seed,") and len(lines) == 1 + 4 + 2  # runs, groups


def test_compare_writes_every_figure_the_summary_and_tensorboard_images(sweep, tmp_path, run_cli):
    code, out, err = run_cli("compare", str(sweep), "--out", "out")
    assert code == 0, err
    for figure in DRAWN_WITHOUT_SHARPNESS:
        assert not_blank(tmp_path / "out" / figure), figure
    assert not (tmp_path / "out" / "sharpness.png").exists() and "sharpness.png" not in out
    assert (tmp_path / "out" / "summary.csv").is_file()
    assert out.count("│ completed ") == 4  # the table: one row per job
    assert "grouped over trainer.seed: mean ± 95% confidence interval" in out
    assert not list((tmp_path / "out").rglob("events.out.tfevents.*"))  # no run of figures in TensorBoard's list

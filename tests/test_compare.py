import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnlab.compare import FIGURES, Run, find_runs, name_runs, seed_groups, spread
from cnnlab.errors import UserError
from tests.helpers import TINY, not_blank


def cnnlab(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A finished four-job sweep: two activations x two seeds."""
    cwd = tmp_path_factory.mktemp("sweep")
    result = cnnlab("train", "-m", "activation=relu,tanh", "trainer.seed=0,1", *TINY, "trainer.epochs=2", "probes.every=2",
                    "hydra.sweep.dir=sweep", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "sweep"


def run(name, seed, status="completed", val_acc=None, test_acc=None):
    metrics = {"status": status, "val_acc": val_acc, "test_acc": test_acc, "dead_fraction": {"all": 0.5}}
    return Run(Path(f"/runs/{name}-{seed}"), {"activation": name, "trainer.seed": str(seed), "dataset.root": "/d"}, metrics)


def test_runs_are_named_by_what_differs_and_grouped_over_seeds():
    runs = [run("relu", 0), run("relu", 1), run("elu", 0)]
    name_runs(runs)
    assert [r.name for r in runs] == ["activation=relu,trainer.seed=0", "activation=relu,trainer.seed=1",
                                      "activation=elu,trainer.seed=0"]
    assert [r.group for r in runs] == ["activation=relu", "activation=relu", "activation=elu"]


def test_seed_groups_give_mean_and_sample_std_of_completed_runs():
    runs = [run("relu", 0, val_acc=0.90, test_acc=0.80), run("relu", 1, val_acc=0.94, test_acc=0.84),
            run("relu", 2, status="failed"), run("elu", 0, val_acc=0.5, test_acc=0.6)]
    name_runs(runs)
    groups = seed_groups(runs)
    relu = groups["activation=relu"]
    assert (relu["runs"], relu["completed"]) == (3, 2)
    assert relu["val_acc"].mean == pytest.approx(0.92) and relu["val_acc"].std == pytest.approx(np.std([0.9, 0.94], ddof=1))
    assert relu["test_acc"].mean == pytest.approx(0.82)
    assert groups["activation=elu"]["val_acc"].std == 0.0 and groups["activation=elu"]["val_acc"].count == 1
    assert spread([None, float("nan")]).mean is None


def test_a_sweep_summary_is_written_with_one_row_per_job(sweep):
    summary = json.loads((sweep / "summary.json").read_text())
    names = sorted(row["name"] for row in summary["runs"])
    assert names == ["activation=relu,trainer.seed=0", "activation=relu,trainer.seed=1",
                     "activation=tanh,trainer.seed=0", "activation=tanh,trainer.seed=1"]
    assert all(row["status"] == "completed" for row in summary["runs"]) and summary["not_completed"] == []
    assert summary["groups"]["activation=relu"]["completed"] == 2
    relu = [row["val_acc"] for row in summary["runs"] if row["name"].startswith("activation=relu")]
    assert summary["groups"]["activation=relu"]["val_acc"]["mean"] == pytest.approx(sum(relu) / 2)
    lines = (sweep / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("name,status,") and len(lines) == 5


def test_compare_writes_every_figure_the_summary_and_tensorboard_images(sweep, tmp_path):
    result = cnnlab("compare", str(sweep), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for figure in FIGURES:
        assert not_blank(tmp_path / "out" / figure), figure
    assert (tmp_path / "out" / "summary.csv").is_file()
    assert result.stdout.count("│ completed ") == 4  # the table: one row per job

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "out" / "figures"))
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(f"compare/{f.removesuffix('.png')}" for f in FIGURES)


def test_compare_works_on_a_partial_sweep(sweep, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(sweep, partial)
    (partial / "activation=tanh,trainer.seed=1" / "metrics.json").unlink()  # a job that has not started
    running = partial / "activation=relu,trainer.seed=1" / "metrics.json"
    running.write_text(json.dumps({**json.loads(running.read_text()), "status": "running", "test_acc": None}))
    runs = find_runs([str(partial)])
    assert sorted(r.status for r in runs) == ["completed", "completed", "missing", "running"]
    result = cnnlab("compare", str(partial), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "missing" in result.stdout and "running" in result.stdout
    assert all(not_blank(partial / figure) for figure in FIGURES)
    summary = json.loads((partial / "summary.json").read_text())
    assert len(summary["not_completed"]) == 2


def test_compare_accepts_globs_of_run_directories(sweep, tmp_path):
    runs = find_runs([str(sweep / "activation=relu*")])
    assert [r.name for r in runs] == ["trainer.seed=0", "trainer.seed=1"]
    with pytest.raises(UserError, match="No run directories"):
        find_runs([str(tmp_path)])


def write_run(path: Path, overrides="- activation=relu\n", metrics='{"status": "completed", "val_acc": 0.5}') -> Path:
    """A run directory as a run leaves it, without training: .hydra/overrides.yaml and metrics.json."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(overrides)
    (path / "metrics.json").write_text(metrics)
    return path


@pytest.mark.parametrize("file, text, problem", [
    ("metrics.json", "[1, 2]", "holds a JSON list"),
    ("metrics.json", '"done"', "holds a JSON str"),
    ("metrics.json", '{"status": "compl', "cannot be read"),
    ("overrides.yaml", "- a=1\n  - b: [", "cannot be read"),
    ("overrides.yaml", "activation: relu\n", "holds a dict"),
])
def test_a_run_with_malformed_files_is_skipped_with_a_warning_naming_the_file(tmp_path, file, text, problem):
    write_run(tmp_path / "sweep" / "good")
    bad = write_run(tmp_path / "sweep" / "bad", overrides="- activation=elu\n")
    (bad / ".hydra" / file if file == "overrides.yaml" else bad / file).write_text(text)
    warnings = []
    runs = find_runs([str(tmp_path / "sweep")], warn=warnings.append)
    assert [run.path.name for run in runs] == ["good"]
    (warning,) = warnings
    assert f"{bad.name}" in warning and file in warning and problem in warning


def test_compare_refuses_runs_it_cannot_read_and_an_out_that_is_a_file(tmp_path, capsys, monkeypatch):
    from cnnlab import cli

    monkeypatch.chdir(tmp_path)

    def compare(*args):
        with pytest.raises(SystemExit) as exit:
            cli.main(["compare", *args])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return exit.value.code, err

    write_run(tmp_path / "broken" / "a", metrics="[]")
    code, err = compare("broken")
    assert code == 2 and "No readable run" in err and "metrics.json holds a JSON list" in err

    write_run(tmp_path / "sweep" / "a")
    (tmp_path / "taken").write_text("a file")
    code, err = compare("sweep", "--out", "taken")
    assert code == 2 and "--out='taken'" in err and "is a file, not a folder" in err
    assert (tmp_path / "taken").read_text() == "a file" and not (tmp_path / "sweep" / "summary.csv").exists()

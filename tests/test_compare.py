import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from cnnlab.compare import FIGURES, Run, by_group, find_runs, make_figures, name_runs, read_scalars, seed_groups, spread
from cnnlab.errors import UserError
from tests.helpers import TINY, not_blank

# What a run without sharpness estimates (probes.sharpness_every=0, the default) gets.
DRAWN_WITHOUT_SHARPNESS = [figure for figure in FIGURES if figure != "sharpness.png"]


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
    for figure in DRAWN_WITHOUT_SHARPNESS:
        assert not_blank(tmp_path / "out" / figure), figure
    assert not (tmp_path / "out" / "sharpness.png").exists() and "sharpness.png" not in result.stdout
    assert (tmp_path / "out" / "summary.csv").is_file()
    assert result.stdout.count("│ completed ") == 4  # the table: one row per job

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "out" / "figures"))
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(f"compare/{f.removesuffix('.png')}" for f in DRAWN_WITHOUT_SHARPNESS)


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
    assert all(not_blank(partial / figure) for figure in DRAWN_WITHOUT_SHARPNESS)
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


def write_events(path: Path, lr: str, scalars: dict[str, list[float]]) -> Path:
    """A run directory with TensorBoard scalars (tag -> values at steps 0, 10, 20, ...), as a run writes them."""
    from torch.utils.tensorboard import SummaryWriter

    write_run(path, overrides=f"- optimizer.lr={lr}\n")
    with SummaryWriter(str(path)) as writer:
        for tag, values in scalars.items():
            for i, value in enumerate(values):
                writer.add_scalar(tag, value, global_step=10 * i)
    return path


def depth_scalars(rank_start: float, rank_end: float) -> dict[str, list[float]]:
    layers = ("act01_fc", "act02_fc", "act03_fc")
    return {**{f"act_mean/{a}": [0.5, 0.4] for a in layers}, **{f"act_std/{a}": [1.0, 0.9] for a in layers},
            **{f"effective_rank/{a}": [rank_start / (i + 1), rank_end] for i, a in enumerate(layers)}}


def test_activation_depth_gains_an_effective_rank_panel_when_runs_log_it(tmp_path):
    runs = find_runs([str(write_events(tmp_path / "sweep" / "a", "0.1", depth_scalars(30.0, 20.0)).parent)])
    scalars = {run.path: read_scalars(run, ("act_mean/", "act_std/", "effective_rank/")) for run in runs}
    figure = FIGURES["activation_depth.png"](by_group(runs), scalars, {"all": "C0"})
    plt.close(figure)
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == ["activation mean by depth", "activation std by depth",
                      "effective rank of the activations by depth"]
    start, end = figure.axes[2].get_lines()  # the first probe dashed, the last solid, layer by layer
    assert (start.get_linestyle(), end.get_linestyle()) == ("--", "-")
    assert list(start.get_xdata()) == [1, 2, 3] and list(start.get_ydata()) == pytest.approx([30, 15, 10])
    assert list(end.get_ydata()) == pytest.approx([20, 20, 20])

    scalars = {path: {tag: s for tag, s in series.items() if "rank" not in tag} for path, series in scalars.items()}
    older = FIGURES["activation_depth.png"](by_group(runs), scalars, {"all": "C0"})  # runs from before the rank probe
    plt.close(older)
    assert len(older.axes) == 2


def test_sharpness_figure_is_drawn_only_when_some_run_estimated_sharpness(tmp_path):
    sweep = tmp_path / "sweep"
    write_events(sweep / "lr=0.01", "0.01", {"val/acc": [0.5], "sharpness/top_eigenvalue": [5.0, 50.0, 190.0],
                                             "sharpness/stability_limit": [200.0, 200.0, 200.0]})
    write_events(sweep / "lr=0.04", "0.04", {"val/acc": [0.5], "sharpness/top_eigenvalue": [5.0, 45.0, 52.0]})
    written = make_figures(find_runs([str(sweep)]), tmp_path / "with")
    assert [path.name for path in written] == list(FIGURES) and not_blank(tmp_path / "with" / "sharpness.png")

    write_events(tmp_path / "plain" / "a", "0.1", {"val/acc": [0.5, 0.6]})
    written = make_figures(find_runs([str(tmp_path / "plain")]), tmp_path / "without")
    assert [path.name for path in written] == DRAWN_WITHOUT_SHARPNESS
    assert not (tmp_path / "without" / "sharpness.png").exists()


def test_sharpness_figure_draws_the_eigenvalue_solid_and_the_stability_limit_dashed_in_one_colour(tmp_path):
    sweep = tmp_path / "sweep"
    write_events(sweep / "sgd", "0.01", {"sharpness/top_eigenvalue": [5.0, 50.0, 190.0],
                                         "sharpness/stability_limit": [200.0, 200.0, 200.0]})
    write_events(sweep / "adam", "0.001", {"sharpness/top_eigenvalue": [3.0, 4.0, 5.0]})  # no limit: not SGD
    runs = find_runs([str(sweep)])
    scalars = {run.path: read_scalars(run, ("sharpness/",)) for run in runs}
    colours = {name: f"C{i}" for i, name in enumerate(by_group(runs))}
    figure = FIGURES["sharpness.png"](by_group(runs), scalars, colours)
    plt.close(figure)
    (axis,) = figure.axes
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert sorted(lines) == ["optimizer.lr=0.001", "optimizer.lr=0.01", "optimizer.lr=0.01: 2 / lr"]
    eigenvalue, limit = lines["optimizer.lr=0.01"], lines["optimizer.lr=0.01: 2 / lr"]
    assert (eigenvalue.get_linestyle(), limit.get_linestyle()) == ("-", "--")
    assert eigenvalue.get_color() == limit.get_color()
    assert list(eigenvalue.get_xdata()) == [0, 10, 20] and list(limit.get_ydata()) == [200, 200, 200]
    assert axis.get_yscale() == "log"


def test_each_runs_warning_kinds_reach_the_tables_and_seed_groups_count_them(tmp_path):
    import io

    from rich.console import Console

    from cnnlab.compare import SEED_KEY, print_summary, rows

    def run(seed, kinds):
        findings = [{"kind": kind, "severity": "warning"} for kind in kinds] + [{"kind": "dying_units", "severity": "info"}]
        return Run(tmp_path / f"s{seed}", {"activation": "relu", SEED_KEY: str(seed)},
                   {"status": "completed", "findings": findings})

    runs = [run(0, ["dead_at_init", "vanishing_gradients"]), run(1, ["dead_at_init"]), run(2, [])]
    name_runs(runs)
    assert [row["warnings"] for row in rows(runs)] == ["dead_at_init,vanishing_gradients", "dead_at_init", ""]
    group = next(iter(seed_groups(runs).values()))
    assert group["warnings"] == {"dead_at_init": 2, "vanishing_gradients": 1}  # info findings do not count
    console = Console(file=io.StringIO(), width=200)
    print_summary(console, runs, title="t")
    assert "dead_at_init (2/3)" in console.file.getvalue() and "warnings" in console.file.getvalue()
    quiet = Console(file=io.StringIO(), width=200)
    print_summary(quiet, [run(3, [])], title="t")
    assert "warnings" not in quiet.file.getvalue()  # no column when no run has any

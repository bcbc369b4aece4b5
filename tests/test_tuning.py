"""`cnnlab compare --tune KEY`: each configuration at its best value of KEY by validation accuracy."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from cnnlab.analysis.folders import find_runs
from cnnlab.analysis.runs import Run
from cnnlab.analysis.summary import print_summary, write_summary
from cnnlab.analysis.tuning import edge_warning, tune
from tests.fake_runs import configured


def tuning_runs(tmp_path: Path) -> list[Run]:
    """relu and elu at lr 0.01 and 0.1, three seeds each: relu validates best at 0.1, elu at 0.01."""
    validation = {("relu", "0.01"): 0.80, ("relu", "0.1"): 0.90, ("elu", "0.01"): 0.85, ("elu", "0.1"): 0.70}
    for (activation, lr), val in validation.items():
        for seed in range(3):
            configured(tmp_path / "sweep" / f"{activation},{lr},{seed}", f"activation={activation}",
                       f"optimizer.lr={lr}", f"trainer.seed={seed}", val_acc=val + 0.01 * seed,
                       test_acc=val - 0.05 + 0.01 * seed)
    return find_runs([str(tmp_path / "sweep")])


def test_tune_picks_per_configuration_the_value_with_the_best_mean_validation_accuracy(tmp_path):
    runs = tuning_runs(tmp_path)
    tuned = tune(runs, "lr")
    assert tuned["key"] == "optimizer.lr"
    relu, elu = tuned["configurations"]["activation=relu"], tuned["configurations"]["activation=elu"]
    assert (relu["chosen"], elu["chosen"]) == ("0.1", "0.01") and relu["tried"] == ["0.01", "0.1"]
    assert relu["val_acc"].mean == pytest.approx(0.91) and relu["test_acc"].mean == pytest.approx(0.86)
    assert relu["test_acc"].ci95 == pytest.approx(4.302653 * 0.01 / math.sqrt(3), abs=1e-6)
    assert elu["test_acc"].mean == pytest.approx(0.81)
    assert relu["vs_best"]["verdict"] == "best" and elu["vs_best"]["verdict"] == "worse"  # 0.86 vs 0.81, s = 0.01

    write_summary(tmp_path / "out", runs, tuned)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tuned"]["configurations"]["activation=elu"]["chosen"] == "0.01"
    assert summary["tuned"]["configurations"]["activation=elu"]["test_acc"]["mean"] == pytest.approx(0.81)
    assert summary["groups"]["activation=relu, lr=0.1"]["test_acc"]["ci95"] == pytest.approx(0.02484, abs=1e-5)
    console = Console(file=io.StringIO(), width=300)
    print_summary(console, runs, title="t", tuned=tuned)
    output = console.file.getvalue()
    assert "tuned over optimizer.lr" in output and "0.8600 ± 0.0248" in output and "worse (p=" in output


def test_tune_refuses_a_setting_that_does_not_differ_naming_those_that_do(tmp_path, run_cli):
    tuning_runs(tmp_path)
    code, _, err = run_cli("compare", "sweep", "--tune", "optimizer.momentum")
    assert code == 2 and "--tune optimizer.momentum: optimizer.momentum has one value" in err
    assert "settings that differ: activation, optimizer.lr." in err
    code, _, err = run_cli("compare", "sweep", "--tune", "trainer.seed")
    assert code == 2 and "luckiest seed" in err
    assert not (tmp_path / "sweep" / "summary.json").exists()


def test_a_value_chosen_at_the_edge_of_the_grid_is_warned_about_in_the_table_and_summary(tmp_path):
    runs = tuning_runs(tmp_path)
    tuned = tune(runs, "lr")
    assert tuned["warnings"] == [
        "the best optimizer.lr for activation=elu is the smallest value tried (0.01): extend the grid",
        "the best optimizer.lr for activation=relu is the largest value tried (0.1): extend the grid"]
    write_summary(tmp_path / "out", runs, tuned)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tuned"]["warnings"] == tuned["warnings"]
    assert summary["tuned"]["configurations"]["activation=relu"]["warning"].endswith("extend the grid")
    console = Console(file=io.StringIO(), width=300)
    print_summary(console, runs, title="t", tuned=tuned)
    assert "warning: the best optimizer.lr for activation=elu is the smallest value tried" in console.file.getvalue()

    for seed in range(3):  # relu at 1.0 too, worse than at 0.1: 0.1 is inside the grid now
        configured(tmp_path / "more" / str(seed), "activation=relu", "optimizer.lr=1.0", f"trainer.seed={seed}",
                   val_acc=0.3)
    runs = find_runs([str(tmp_path / "sweep"), str(tmp_path / "more")])
    assert [w for w in tune(runs, "lr")["warnings"] if "relu" in w] == []


def test_compare_tune_writes_the_tuning_figure_and_prints_the_edge_warnings(tmp_path, run_cli):
    tuning_runs(tmp_path)
    code, out, err = run_cli("compare", "sweep", "--tune", "lr")
    assert code == 0, err
    assert (tmp_path / "sweep" / "tuning.png").is_file() and "tuning.png" in out
    assert "the best optimizer.lr for activation=relu is the largest value tried (0.1): extend the grid" in out


def test_edge_warning_needs_two_numbers_and_a_value_at_an_edge_better_than_its_neighbour():
    assert edge_warning("optimizer.lr", "x", "0.1", {"0.1": 0.9}) is None
    assert edge_warning("activation", "x", "elu", {"relu": 0.8, "elu": 0.9}) is None  # not numbers: no edge
    assert edge_warning("optimizer.lr", "x", "0.01", {"0.001": 0.8, "0.01": 0.9, "0.1": 0.7}) is None
    assert "largest value tried (1e-2)" in edge_warning("optimizer.lr", "x", "1e-2", {"1e-3": 0.8, "1e-2": 0.9})
    assert "smallest value tried (0.001)" in edge_warning("optimizer.lr", "x", "0.001",
                                                          {"0.001": 0.9, "0.01": 0.8, "0.1": 0.95 - 0.1})
    # tied with the value next to it (an easy task: 1.0 everywhere): the grid is not what limits it
    assert edge_warning("optimizer.lr", "x", "0.001", {"0.001": 1.0, "0.01": 1.0}) is None


def test_tuning_figure_draws_accuracy_against_the_tuned_value_per_configuration_and_marks_the_choice(tmp_path):
    import matplotlib.pyplot as plt

    from cnnlab.analysis.figures import FIGURES, drawing

    runs = tuning_runs(tmp_path)
    tuned = tune(runs, "lr")
    d = drawing(runs, {run.path: {"val/acc": ([10], [0.5])} for run in runs}, tuned)
    figure = FIGURES["tuning.png"](d)
    plt.close(figure)
    (axis,) = figure.axes
    assert axis.get_xscale() == "log" and axis.get_xlabel() == "optimizer.lr (log scale)"
    stars = [line for line in axis.get_lines() if line.get_marker() == "*"]
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in stars] == [(0.01, pytest.approx(0.86)),
                                                                           (0.1, pytest.approx(0.91))]
    assert "extend the grid" in figure.get_suptitle()
    assert FIGURES["tuning.png"](drawing(runs, {run.path: {"val/acc": ([10], [0.5])} for run in runs})) is None
    # the other figures: one colour per configuration, one line style per value of the tuned key
    relu = [name for name in d.groups if name.startswith("activation=relu")]
    assert len({str(d.colours[name]) for name in relu}) == 1 and len({str(d.styles[name]) for name in relu}) == 2
    assert d.colours["activation=relu, lr=0.1"] != d.colours["activation=elu, lr=0.1"]
    assert d.styles["activation=relu, lr=0.1"] == d.styles["activation=elu, lr=0.1"]

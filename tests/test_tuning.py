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
from cnnlab.analysis.tuning import tune
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

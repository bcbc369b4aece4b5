"""The summary tables and files: one row per run, warnings by kind, seed groups counting them."""

from __future__ import annotations

import io

from rich.console import Console

from cnnlab.analysis.names import SEED_KEY, name_runs
from cnnlab.analysis.runs import Run
from cnnlab.analysis.stats import seed_groups
from cnnlab.analysis.summary import print_summary, rows


def test_each_runs_warning_kinds_reach_the_tables_and_seed_groups_count_them(tmp_path):
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


def test_summary_csv_is_tidy_a_row_per_run_and_per_seed_group_with_a_column_per_setting(tmp_path):
    import csv
    import json

    import pytest

    from cnnlab.analysis.folders import find_runs
    from cnnlab.analysis.summary import write_summary
    from tests.fake_runs import configured

    accuracies = {("relu", 0): 0.80, ("relu", 1): 0.82, ("elu", 0): 0.70, ("elu", 1): 0.74}
    for (activation, seed), accuracy in accuracies.items():
        configured(tmp_path / "sweep" / f"{activation},{seed}", f"activation={activation}", f"trainer.seed={seed}",
                   test_acc=accuracy)
    csv_path, json_path = write_summary(tmp_path / "out", find_runs([str(tmp_path / "sweep")]))
    with open(csv_path, newline="") as file:
        table = list(csv.DictReader(file))
    header = list(table[0])
    assert header[:5] == ["kind", "name", "group", "activation", "trainer.seed"]  # what names runs first
    assert {"optimizer.lr", "model.hidden", "dataset", "status", "test_acc", "test_acc_ci95", "n", "path"} <= set(header)
    assert [row["kind"] for row in table] == ["run"] * 4 + ["group"] * 2
    elu_run = table[0]
    assert (elu_run["activation"], elu_run["trainer.seed"], elu_run["optimizer.lr"]) == ("elu", "0", "0.001")
    assert elu_run["activation.alpha"] == "1" and table[2]["activation.alpha"] == ""  # relu has no alpha
    assert elu_run["test_acc"] == "0.7" and elu_run["test_acc_ci95"] == "" and elu_run["status"] == "completed"
    relu = next(row for row in table if row["kind"] == "group" and row["activation"] == "relu")
    assert relu["name"] == "activation=relu" and relu["trainer.seed"] == "" and relu["n"] == "2"
    assert float(relu["test_acc"]) == pytest.approx(0.81)
    assert float(relu["test_acc_ci95"]) == pytest.approx(12.7062 * 0.01, rel=1e-4)  # t(0.975, 1) s / sqrt(2), s = 0.01 sqrt(2)
    assert relu["vs_best"] == "best" and relu["model.hidden"] == "[32]"  # shared settings filled in
    rows_json = json.loads(json_path.read_text())["rows"]
    assert all(list(row) == header for row in rows_json)  # the same fields, null where the CSV is empty
    assert [row["kind"] for row in rows_json] == [row["kind"] for row in table]
    assert rows_json[4]["test_acc"] == pytest.approx(0.72)  # numbers stay numbers in JSON

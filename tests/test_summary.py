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

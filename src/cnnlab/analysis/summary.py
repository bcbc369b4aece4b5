"""The summary of a comparison: the table of runs, of seed groups and of a tuned setting in the
terminal, and summary.csv / summary.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cnnlab.analysis.names import SEED_KEY, fixed_settings
from cnnlab.analysis.runs import Run
from cnnlab.analysis.stats import CONFIDENCE, SIGNIFICANCE, Spread, seed_groups
from cnnlab.status import Status

ROW_FIELDS = ("name", "status", "epochs", "steps", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc",
              "dead_fraction", "warnings", "seconds", "path")  # summary.csv's columns, and summary.json's runs
IN_TITLES = (f"mean ± {CONFIDENCE:.0%} confidence interval (Student t) of the completed seeds, - for one; vs best: "
             f"Welch's t-test on test accuracy, two-sided, {SIGNIFICANCE:.0%}")
METHODS = (f"mean ± half-width of the {CONFIDENCE:.0%} confidence interval of the mean over the completed "
           f"seeds (Student t: t(0.975, n-1) s / sqrt(n)); vs best: Welch's t-test on test accuracy, two-sided, "
           f"{SIGNIFICANCE:.0%} level")  # summary.json's `statistics`: how its numbers were computed


def format_number(value: Any, digits: int = 4) -> str:
    """A table cell: '-' for missing, `digits` decimals for floats (as the training summary shows them)."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def rows(runs: list[Run]) -> list[dict[str, Any]]:
    return [
        {"name": run.name, "status": run.status, "path": str(run.path),
         **{key: run.metric(key) for key in ROW_FIELDS if key not in ("name", "status", "path")}}
        for run in runs
    ]


def _plain(value: Any) -> Any:
    """Spreads as dicts, for JSON."""
    if isinstance(value, Spread):
        return value.__dict__
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def write_summary(directory: Path, runs: list[Run], tuned: dict[str, Any] | None = None) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = directory / "summary.csv", directory / "summary.json"
    table = rows(runs)
    with open(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows(table)
    summary = {"runs": table, "groups": _plain(seed_groups(runs)),
               "not_completed": [run.name for run in runs if run.status != Status.COMPLETED],
               "fixed": fixed_settings(runs), "statistics": METHODS}
    if tuned is not None:
        summary["tuned"] = _plain(tuned)
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return csv_path, json_path


def print_summary(console: Console, runs: list[Run], title: str, tuned: dict[str, Any] | None = None) -> None:
    """The table of runs; of seed groups when some configuration has several seeds; of `tuned`."""
    table = Table(title=title, title_justify="left")
    table.add_column("run", overflow="fold", min_width=min(24, max((len(run.name) for run in runs), default=0)))
    warned = any(run.metric("warnings") for run in runs)  # the column only when there is something in it
    for column in ("status", "val acc", "test acc", "dead fraction", "seconds", *(["warnings"] if warned else [])):
        table.add_column(column, justify="left" if column in ("status", "warnings") else "right",
                         no_wrap=column != "warnings", overflow="fold")
    styles = {Status.COMPLETED: "green", Status.INVALID: "yellow"}
    for run in runs:
        warnings = [escape(run.metric("warnings") or "-")] if warned else []
        table.add_row(escape(run.name), f"[{styles.get(run.status, 'red')}]{run.status}[/]",
                      format_number(run.metric("val_acc")), format_number(run.metric("test_acc")),
                      format_number(run.metric("dead_fraction")), format_number(run.metric("seconds"), 1),
                      *warnings)
    console.print(table)
    groups = seed_groups(runs)
    if any(group["runs"] > 1 for group in groups.values()):
        console.print(_group_table(groups))
    elif len(groups) > 1:
        console.print("One run per configuration: no confidence intervals, and no test can tell configurations "
                      "apart. Run several seeds (trainer.seed=0,1,2) for that.", style="dim", highlight=False)
    if tuned is not None:
        console.print(_tuned_table(tuned))
        for warning in tuned["warnings"]:
            console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)


def _group_table(groups: dict[str, dict[str, Any]]) -> Table:
    table = Table(title=f"grouped over {SEED_KEY}: {IN_TITLES}", title_justify="left")
    table.add_column("configuration", overflow="fold")
    for column in ("completed", "val acc", "test acc", "vs best", "dead fraction", "warnings (seeds)"):
        table.add_column(column, justify="right", no_wrap=column not in ("vs best", "warnings (seeds)"),
                         overflow="fold")
    for name, group in groups.items():
        warnings = ", ".join(f"{kind} ({count}/{group['runs']})" for kind, count in group["warnings"].items())
        table.add_row(escape(name), f"{group['completed']}/{group['runs']}", group["val_acc"].text(),
                      group["test_acc"].text(), _verdict_text(group["vs_best"]), group["dead_fraction"].text(),
                      escape(warnings or "-"))
    return table


def _tuned_table(tuned: dict[str, Any]) -> Table:
    key = tuned["key"]
    table = Table(title=f"tuned over {key}: each configuration at the value with the best mean validation "
                        f"accuracy; {IN_TITLES}", title_justify="left")
    table.add_column("configuration", overflow="fold")
    for column in (f"{key} (best val)", "tried", "val acc", "test acc", "vs best"):
        table.add_column(column, justify="right", overflow="fold")
    for name, entry in tuned["configurations"].items():
        table.add_row(escape(name), escape(entry["chosen"] or "-"), escape(", ".join(entry["tried"])),
                      entry["val_acc"].text(), entry["test_acc"].text(), _verdict_text(entry["vs_best"]))
    return table


def _verdict_text(verdict: dict[str, Any]) -> str:
    if verdict["p"] is None:
        return {"best": "best", "no result": "-"}.get(verdict["verdict"], f"cannot tell ({verdict.get('why')})")
    return f"{'≈ best' if verdict['verdict'] == 'not distinguishable' else 'worse'} (p={verdict['p']:.2g})"

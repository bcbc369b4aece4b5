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

from cnnlab.analysis.names import SEED_KEY, fixed_settings, name_keys
from cnnlab.analysis.runs import Run
from cnnlab.analysis.stats import CONFIDENCE, GROUP_METRICS, SIGNIFICANCE, Spread, seed_groups
from cnnlab.status import Status

METRIC_FIELDS = ("epochs", "steps", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "dead_fraction",
                 "warnings", "seconds")  # a run's metrics, in summary.csv's columns and summary.json's runs
GROUP_FIELDS = ("n", "vs_best", "p")  # a seed group's: completed seeds, and its test accuracy against the best's
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


def setting_keys(runs: list[Run]) -> list[str]:
    """The settings that summary.csv has a column for: those that name runs first (the seed last),
    then every other setting of the runs, flattened (`optimizer.lr`), sorted."""
    named = name_keys(runs)
    return [*named, *sorted({key for run in runs for key in run.settings} - set(named))]


def fields(runs: list[Run]) -> list[str]:
    """summary.csv's columns: kind (run or group), name, group, one per setting, status, the metrics
    with a `_ci95` column beside each a seed group averages, the group's fields, the run's folder."""
    metrics = [column for metric in METRIC_FIELDS
               for column in ([metric, f"{metric}_ci95"] if metric in GROUP_METRICS else [metric])]
    return ["kind", "name", "group", *setting_keys(runs), "status", *metrics, *GROUP_FIELDS, "path"]


def rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per run: its name and group, every setting, status, metrics and folder."""
    keys = setting_keys(runs)
    return [{"kind": "run", "name": run.name, "group": run.group, **{key: run.settings.get(key) for key in keys},
             "status": run.status, **{metric: run.metric(metric) for metric in METRIC_FIELDS}, "path": str(run.path)}
            for run in runs]


def group_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per seed group: the settings its runs share (the seed blank), each averaged metric's mean
    and confidence half-width over the completed seeds, n (how many), and its test accuracy against
    the best group's (vs_best, p)."""
    keys = setting_keys(runs)
    table = []
    for name, group in seed_groups(runs).items():
        members = [run for run in runs if run.group == name]
        shared = {key: values.pop() if len(values := {run.settings.get(key) for run in members}) == 1 else None
                  for key in keys}
        spreads = {metric: group[metric] for metric in GROUP_METRICS}
        table.append({"kind": "group", "name": name, "group": name, **shared,
                      **{metric: spread.mean for metric, spread in spreads.items()},
                      **{f"{metric}_ci95": spread.ci95 for metric, spread in spreads.items()},
                      "n": group["completed"], "vs_best": group["vs_best"]["verdict"], "p": group["vs_best"]["p"]})
    return table


def _plain(value: Any) -> Any:
    """Spreads as dicts, for JSON."""
    if isinstance(value, Spread):
        return value.__dict__
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def write_summary(directory: Path, runs: list[Run], tuned: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """summary.csv: one row per run and per seed group (`kind`), a column per setting and per metric;
    summary.json: the same rows (`rows`), the runs' alone (`runs`), each group in detail (`groups`)."""
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = directory / "summary.csv", directory / "summary.json"
    columns = fields(runs)
    table = [{column: row.get(column) for column in columns} for row in rows(runs)]  # every row every field
    tidy = [*table, *({column: row.get(column) for column in columns} for row in group_rows(runs))]
    with open(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(tidy)
    summary = {"rows": tidy, "runs": table, "groups": _plain(seed_groups(runs)),
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

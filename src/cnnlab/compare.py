"""Sweep summaries: find run directories, name them by what differs, group seeds, tables and files.

Reads only what runs leave on disk (metrics.json, .hydra/overrides.yaml), so it works for every
launcher, for finished and partial sweeps alike, and without importing torch. Figures: one small
function per figure in FIGURES, drawn and written by make_figures.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cnnlab.errors import UserError, one_line
from cnnlab.progress import format_number
from cnnlab.rundir import METRICS_FILE, read_run_metrics

SEED_KEY = "trainer.seed"
FAILED_STATUSES = ("failed", "diverged", "interrupted", "missing", "running")


@dataclass
class Run:
    path: Path
    overrides: dict[str, str]  # from .hydra/overrides.yaml: key -> value as typed
    metrics: dict[str, Any] | None  # None while metrics.json does not exist
    name: str = ""  # the overrides that differ between the runs compared
    group: str = ""  # the same without trainer.seed

    @property
    def status(self) -> str:
        return "missing" if self.metrics is None else str(self.metrics.get("status", "missing"))

    def metric(self, key: str) -> Any:
        if self.metrics is None:
            return None
        value = self.metrics.get(key)
        if key == "dead_fraction" and isinstance(value, dict):
            return value.get("all")
        if key == "warnings":  # the kinds of the run's warning findings, e.g. "dying_units,saturation"
            findings = value if isinstance(value, list) else self.metrics.get("findings") or []
            kinds = [f.get("kind") for f in findings if isinstance(f, dict) and f.get("severity") == "warning"]
            return ",".join(dict.fromkeys(str(kind) for kind in kinds))
        return value


def _is_run_dir(path: Path) -> bool:
    return (path / ".hydra").is_dir() or (path / METRICS_FILE).is_file()


def _read_overrides(path: Path) -> dict[str, str]:
    """key -> value of the run's command-line overrides; UserError if the file cannot be read."""
    file = path / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return {}
    try:
        lines = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UserError(f"{file} cannot be read: {one_line(error, 200)}") from None
    if lines is not None and not isinstance(lines, list):
        raise UserError(f"{file} holds a {type(lines).__name__}, not the list of overrides Hydra writes")
    overrides = {}
    for line in lines or []:
        key, _, value = str(line).partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def _warn(message: str) -> None:
    Console(stderr=True).print(f"cnnlab: warning: {message}", style="yellow", markup=False, highlight=False,
                               soft_wrap=True)


def find_runs(paths: list[str], warn: Callable[[str], None] = _warn) -> list[Run]:
    """Run directories named by `paths`: run directories, sweep directories (their job folders),
    or glob patterns of either. A run whose files cannot be read is left out, with a warning."""
    found: list[Path] = []
    for pattern in paths:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()))) or [pattern]
        for match in map(Path, matches):
            if not match.is_dir():
                raise UserError(f"{match} is not a directory: pass run directories or sweep directories.")
            if _is_run_dir(match):
                found.append(match)
            else:
                found.extend(sorted(child for child in match.iterdir() if child.is_dir() and _is_run_dir(child)))
    unique = list(dict.fromkeys(path.resolve() for path in found))
    if not unique:
        raise UserError(f"No run directories in {', '.join(paths)} (a run directory has .hydra/ or metrics.json).")
    # No metrics yet: not started, still starting, or the job died before writing them.
    runs, unreadable = [], []
    for path in unique:
        try:
            runs.append(Run(path, _read_overrides(path), read_run_metrics(path)))
        except UserError as error:
            unreadable.append(str(error))
    if not runs:
        raise UserError(f"No readable run in {', '.join(paths)}: {'; '.join(unreadable)}.")
    for problem in unreadable:
        warn(f"skipped a run: {problem}.")
    name_runs(runs)
    return runs


def name_runs(runs: list[Run]) -> None:
    """Name each run by the overrides whose values differ between the runs; group by all but the seed."""
    keys = sorted({key for run in runs for key in run.overrides})
    differing = [key for key in keys if len({run.overrides.get(key) for run in runs}) > 1]
    for run in runs:
        parts = [f"{key}={run.overrides.get(key, '(default)')}" for key in differing]
        run.name = ",".join(parts) or run.path.name
        run.group = ",".join(part for key, part in zip(differing, parts) if key != SEED_KEY) or "all"


@dataclass
class Spread:
    mean: float | None
    std: float | None
    count: int
    values: list[float] = field(default_factory=list)

    def text(self, digits: int = 4) -> str:
        if self.mean is None:
            return "-"
        if self.count == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def spread(values: list[Any]) -> Spread:
    """Mean and sample standard deviation of the finite numbers among `values`."""
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not numbers:
        return Spread(None, None, 0)
    std = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
    return Spread(statistics.fmean(numbers), std, len(numbers), numbers)


GROUP_METRICS = ("val_acc", "test_acc", "val_loss", "test_loss", "dead_fraction")


def by_group(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs that differ only by trainer.seed, under their group name, in the order first seen."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


def seed_groups(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Each group of runs, with mean and std of its completed runs' metrics."""
    summary = {}
    for name, members in by_group(runs).items():
        completed = [run for run in members if run.status == "completed"]
        summary[name] = {
            "runs": len(members),
            "completed": len(completed),
            "seeds": [run.overrides.get(SEED_KEY) for run in members],
            **{metric: spread([run.metric(metric) for run in completed]) for metric in GROUP_METRICS},
            "warnings": warning_counts(members),
        }
    return summary


def warning_counts(runs: list[Run]) -> dict[str, int]:
    """For each kind of warning finding: how many of the runs (seeds) have it."""
    counts: dict[str, int] = {}
    for run in runs:
        for kind in filter(None, (run.metric("warnings") or "").split(",")):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


ROW_FIELDS = ("name", "status", "epochs", "steps", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc",
              "dead_fraction", "warnings", "seconds", "path")


def rows(runs: list[Run]) -> list[dict[str, Any]]:
    return [
        {"name": run.name, "status": run.status, "path": str(run.path),
         **{key: run.metric(key) for key in ROW_FIELDS if key not in ("name", "status", "path")}}
        for run in runs
    ]


def write_summary(directory: Path, runs: list[Run]) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = directory / "summary.csv", directory / "summary.json"
    table = rows(runs)
    with open(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows(table)
    groups = {
        name: {key: (value.__dict__ if isinstance(value, Spread) else value) for key, value in group.items()}
        for name, group in seed_groups(runs).items()
    }
    failed = [run.name for run in runs if run.status != "completed"]
    json_path.write_text(json.dumps({"runs": table, "groups": groups, "not_completed": failed}, indent=2) + "\n")
    return csv_path, json_path


def print_summary(console: Console, runs: list[Run], title: str) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("run", overflow="fold", min_width=min(24, max(len(run.name) for run in runs)))
    warned = any(run.metric("warnings") for run in runs)  # the column only when there is something in it
    for column in ("status", "val acc", "test acc", "dead fraction", "seconds", *(["warnings"] if warned else [])):
        table.add_column(column, justify="left" if column in ("status", "warnings") else "right",
                         no_wrap=column != "warnings", overflow="fold")
    styles = {"completed": "green", "invalid": "yellow"}
    for run in runs:
        warnings = [escape(run.metric("warnings") or "-")] if warned else []
        table.add_row(escape(run.name), f"[{styles.get(run.status, 'red')}]{run.status}[/]",
                      format_number(run.metric("val_acc")), format_number(run.metric("test_acc")),
                      format_number(run.metric("dead_fraction")), format_number(run.metric("seconds"), 1),
                      *warnings)
    console.print(table)
    groups = seed_groups(runs)
    if any(group["runs"] > 1 for group in groups.values()) and any(SEED_KEY in run.overrides for run in runs):
        table = Table(title="grouped over trainer.seed: mean ± standard deviation of the completed runs",
                      title_justify="left")
        table.add_column("configuration", overflow="fold")
        for column in ("completed", "val acc", "test acc", "dead fraction", "warnings (seeds)"):
            table.add_column(column, justify="right", no_wrap=column != "warnings (seeds)", overflow="fold")
        for name, group in groups.items():
            warnings = ", ".join(f"{kind} ({count}/{group['runs']})" for kind, count in group["warnings"].items())
            table.add_row(escape(name), f"{group['completed']}/{group['runs']}", group["val_acc"].text(),
                          group["test_acc"].text(), group["dead_fraction"].text(), escape(warnings or "-"))
        console.print(table)


# --- figures -------------------------------------------------------------------------------------
Series = dict[str, tuple[list[int], list[float]]]  # tag -> (steps, values)


def read_scalars(run: Run, prefixes: tuple[str, ...]) -> Series:
    """Scalar series of a run whose tag starts with one of `prefixes`, read by TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.path), size_guidance={"scalars": 0})
    events.Reload()
    series = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith(prefixes):
            points = events.Scalars(tag)
            series[tag] = ([p.step for p in points], [p.value for p in points])
    return series


def _label(name: str, members: list[Run]) -> str:
    statuses = sorted({run.status for run in members if run.status != "completed"})
    seeds = f" ({len(members)} seeds)" if len(members) > 1 else ""
    return f"{name}{seeds}" + (f" [{', '.join(statuses)}]" if statuses else "")


def _mean_band(series: list[tuple[list[int], list[float]]]):
    """Mean and min/max over the runs of a group, at the steps every run reached."""
    import numpy as np

    length = min(len(steps) for steps, _ in series)
    values = np.array([vals[:length] for _, vals in series], dtype=float)
    return series[0][0][:length], values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def _layer_index(tag: str) -> int:
    return int(tag.split("/", 1)[1][3:5])  # act07_conv -> 7


def _val_curves(groups: dict[str, list[Run]], scalars: dict[Path, Series], colours: dict[str, Any]):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, members in groups.items():
        for axis, tag in zip(axes, ("val/loss", "val/acc")):
            series = [scalars[run.path][tag] for run in members if tag in scalars[run.path]]
            if not series:
                continue
            steps, mean, low, high = _mean_band(series)
            axis.plot(steps, mean, marker="o", color=colours[name], label=_label(name, members))
            if len(series) > 1:
                axis.fill_between(steps, low, high, color=colours[name], alpha=0.2)
    for axis, title in zip(axes, ("validation loss (log scale)", "validation accuracy")):
        axis.set(title=title, xlabel="step")
        axis.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize="small")
    return figure


def _test_accuracy(groups: dict[str, list[Run]], scalars: dict[Path, Series], colours: dict[str, Any]):
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4.5))
    for i, (name, members) in enumerate(groups.items()):
        accuracy = spread([run.metric("test_acc") for run in members if run.status == "completed"])
        if accuracy.mean is not None:
            axis.bar(i, accuracy.mean, yerr=accuracy.std if accuracy.count > 1 else None, color=colours[name],
                     alpha=0.7, capsize=4)
            axis.scatter([i] * accuracy.count, accuracy.values, color="black", s=12, zorder=3)
        else:
            axis.text(i, 0.02, "no result", rotation=90, ha="center", va="bottom")
    axis.set_xticks(range(len(groups)), [_label(name, members) for name, members in groups.items()],
                    rotation=30, ha="right", fontsize="small")
    axis.set(title="final test accuracy (mean, standard deviation, seeds)", ylabel="test accuracy", ylim=(0, 1))
    axis.grid(axis="y", alpha=0.3)
    return figure


def _dead_fraction(groups: dict[str, list[Run]], scalars: dict[Path, Series], colours: dict[str, Any]):
    import matplotlib.pyplot as plt

    columns = min(3, len(groups))
    rows_ = math.ceil(len(groups) / columns)
    figure, grid = plt.subplots(rows_, columns, figsize=(5 * columns, 3.6 * rows_), squeeze=False, sharey=True)
    for axis, (name, members) in zip(grid.flat, groups.items()):
        tags = sorted({tag for run in members for tag in scalars[run.path] if tag.startswith("dead_fraction/act")})
        for tag in tags:
            series = [scalars[run.path][tag] for run in members if tag in scalars[run.path]]
            steps, mean, _, _ = _mean_band(series)
            axis.plot(steps, mean, label=tag.split("/", 1)[1])
        axis.set(title=_label(name, members), xlabel="step", ylim=(-0.02, 1.02))
        axis.grid(alpha=0.3)
        if tags:
            axis.legend(fontsize="x-small")
    for axis in list(grid.flat)[len(groups):]:
        axis.set_visible(False)
    grid[0][0].set_ylabel("dead fraction")
    figure.suptitle("dead units per layer")
    return figure


def _depth_lines(axis, prefix: str, name: str, members: list[Run], scalars: dict[Path, Series], colour) -> None:
    """One statistic against depth for one group: at the first probe (step 0, dashed) and the last (solid)."""
    tags = sorted((tag for tag in scalars[members[0].path] if tag.startswith(prefix)), key=_layer_index)
    if not tags:
        return
    depth = [_layer_index(tag) for tag in tags]
    for moment, style in ((0, "--"), (-1, "-")):
        values = [statistics.fmean(scalars[run.path][tag][1][moment] for run in members if tag in scalars[run.path])
                  for tag in tags]
        axis.plot(depth, values, style, marker="o", color=colour, label=f"{name} ({'start' if moment == 0 else 'end'})")


def _activation_depth(groups: dict[str, list[Run]], scalars: dict[Path, Series], colours: dict[str, Any]):
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = {"act_mean/": "activation mean by depth", "act_std/": "activation std by depth"}
    if any(tag.startswith("effective_rank/") for series in scalars.values() for tag in series):
        panels["effective_rank/"] = "effective rank of the activations by depth"
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for axis, (prefix, title) in zip(axes, panels.items()):
        for name, members in groups.items():
            _depth_lines(axis, prefix, name, members, scalars, colours[name])
        axis.set(title=title, xlabel="activation layer (input side first)")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    if axes[-1].get_lines():
        axes[-1].legend(fontsize="x-small")
    return figure


def _sharpness(groups: dict[str, list[Run]], scalars: dict[Path, Series], colours: dict[str, Any]):
    """Top Hessian eigenvalue against step, and 2 / lr dashed where logged (SGD); None without sharpness."""
    import matplotlib.pyplot as plt

    if not any("sharpness/top_eigenvalue" in series for series in scalars.values()):
        return None
    figure, axis = plt.subplots(figsize=(8, 4.5))
    drawn = []
    for name, members in groups.items():
        for tag, style, label in (("sharpness/top_eigenvalue", "-", _label(name, members)),
                                  ("sharpness/stability_limit", "--", f"{name}: 2 / lr")):
            series = [scalars[run.path][tag] for run in members if tag in scalars[run.path]]
            if series:
                steps, mean, _, _ = _mean_band(series)
                axis.plot(steps, mean, style, marker="." if style == "-" else None, color=colours[name], label=label)
                drawn.extend(mean)
    axis.set(title="sharpness: top eigenvalue of the loss Hessian (mean over seeds)", xlabel="step",
             ylabel="top eigenvalue")
    if min(drawn) > 0:  # a negative estimate (possible early on) rules the log scale out
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="x-small")
    return figure


# One row per figure file: adding a figure is adding a row. Each draws from the groups of runs, their
# scalar series (by run path) and one colour per group; one that returns None (sharpness.png, when no
# run measured sharpness) is not written.
FIGURES = {
    "val_curves.png": _val_curves,
    "test_accuracy.png": _test_accuracy,
    "dead_fraction.png": _dead_fraction,
    "activation_depth.png": _activation_depth,
    "sharpness.png": _sharpness,
}
# The series the figures read.
SCALAR_PREFIXES = ("val/", "dead_fraction/act", "act_mean/", "act_std/", "effective_rank/", "sharpness/")


def make_figures(runs: list[Run], out: Path) -> list[Path]:
    """The comparison figures as PNG files in `out`, also written to TensorBoard (out/figures); the
    files written, in FIGURES order (a figure with nothing to draw is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    groups = by_group(runs)
    scalars = {run.path: read_scalars(run, SCALAR_PREFIXES) for run in runs}
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(groups)}
    written = []
    with SummaryWriter(str(out / "figures")) as writer:
        for filename, draw in FIGURES.items():
            figure = draw(groups, scalars, colours)
            if figure is None:
                continue
            figure.tight_layout()
            figure.savefig(out / filename, dpi=100)
            writer.add_figure(f"compare/{filename.removesuffix('.png')}", figure, global_step=0, close=True)
            written.append(out / filename)
    return written

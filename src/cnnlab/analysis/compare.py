"""Sweep summaries: find run directories, name them by what differs, group seeds, statistics, tables, figures.

Reads only what runs leave on disk (metrics.json, .hydra/config.yaml and overrides.yaml, event
files), so it works for every launcher, for finished and partial sweeps alike, and without importing
torch until it draws. Figures: one small function per figure in FIGURES, drawn and written by make_figures.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import statistics
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cnnlab.errors import UserError, one_line
from cnnlab.cli.console import format_number
from cnnlab.rundir import METRICS_FILE, read_run_metrics

SEED_KEY = "trainer.seed"
FAILED_STATUSES = ("failed", "diverged", "interrupted", "missing", "running")
# Settings that do not change what a run computes: left out of run names unless nothing else differs.
NOT_IN_NAMES = ("resume", "dataset.download", "dataset.num_workers", "trainer.threads", "trainer.device",
                "trainer.checkpoint_every", "trainer.log_every", "trainer.eval_batch_size", "probes.", "findings.")
# The settings a figure's subtitle names when every run shares them, so that a shared PNG keeps its context.
FIXED_IN_FIGURES = ("dataset", "model", "model.hidden", "model.channels", "activation", "optimizer", "optimizer.lr",
                    "scheduler", "trainer.epochs", "trainer.batch_size")
CONFIDENCE = 0.95  # of the intervals of a mean over seeds
SIGNIFICANCE = 0.05  # of Welch's test against the best configuration


@dataclass
class Run:
    path: Path
    overrides: dict[str, str]  # from .hydra/overrides.yaml: key -> value as typed
    metrics: dict[str, Any] | None  # None while metrics.json does not exist
    settings: dict[str, str] = field(default_factory=dict)  # every setting as text: settings_of()
    composed: bool = False  # whether settings come from the composed config (else from the overrides alone)
    name: str = ""  # the settings that differ between the runs compared
    group: str = ""  # the same without trainer.seed
    rerun: str = ""  # the folder that tells a rerun of the same config and seed from the others

    def __post_init__(self) -> None:
        if not self.settings:
            self.settings = settings_of(None, self.overrides)

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


# --- reading runs --------------------------------------------------------------------------------
def _is_run_dir(path: Path) -> bool:
    return (path / ".hydra").is_dir() or (path / METRICS_FILE).is_file()


def _read_yaml(file: Path, kind: type, what: str) -> Any:
    """The YAML in `file` (None without the file); UserError naming the file when it is not a `kind`."""
    if not file.is_file():
        return None
    try:
        value = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UserError(f"{file} cannot be read: {one_line(error, 200)}") from None
    if value is not None and not isinstance(value, kind):
        raise UserError(f"{file} holds a {type(value).__name__}, not {what} Hydra writes")
    return value


def _read_overrides(path: Path) -> dict[str, str]:
    """key -> value of the run's command-line overrides; UserError if the file cannot be read."""
    lines = _read_yaml(path / ".hydra" / "overrides.yaml", list, "the list of overrides")
    overrides = {}
    for line in lines or []:
        key, _, value = str(line).partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def _parse(text: str) -> Any:
    """An override's value as a config holds it: 0.01, true, [32, 32], relu."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)  # 1e-3, which YAML 1.1 reads as a string
        except ValueError:
            pass
    return value


def _text(value: Any) -> str:
    """A setting as names show it: true/false, 0.01 (not 0.010000), [32,32], null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_text, value)) + "]"
    return str(value)


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_of(config: dict | None, overrides: dict[str, str]) -> dict[str, str]:
    """Every setting of a run as text, flattened (`optimizer.lr`), a group's choice under the group's
    name (`activation` for activation.name); from the composed config, and for what it does not hold
    (`preset`, or everything for a job not started yet) from the overrides."""
    flat = _flatten(config or {})
    for key in [key for key in flat if key.count(".") == 1 and key.endswith(".name")]:
        flat[key.removesuffix(".name")] = flat.pop(key)
    for key, value in overrides.items():
        flat.setdefault(key, _parse(value))
    return {key: _text(value) for key, value in flat.items()}


def read_run(path: Path) -> Run:
    """The run in `path`; UserError naming the file if one of its files cannot be read."""
    overrides = _read_overrides(path)
    config = _read_yaml(path / ".hydra" / "config.yaml", dict, "the config")
    return Run(path, overrides, read_run_metrics(path), settings_of(config, overrides), composed=config is not None)


def _warn(message: str) -> None:
    Console(stderr=True).print(f"cnnlab: warning: {message}", style="yellow", markup=False, highlight=False,
                               soft_wrap=True)


def _matched_folders(paths: list[str]) -> list[Path]:
    folders = []
    for pattern in paths:
        for match in map(Path, sorted(glob.glob(str(Path(pattern).expanduser()))) or [pattern]):
            if not match.is_dir():
                raise UserError(f"{match} is not a directory: pass run directories or sweep directories.")
            folders.append(match)
    return folders


def _below(folder: Path) -> Iterator[Path]:
    """`folder` and every folder below it, not looking inside run directories or hidden folders."""
    yield folder
    if _is_run_dir(folder):
        return
    try:
        children = sorted(child for child in folder.iterdir() if child.is_dir() and not child.is_symlink())
    except OSError:
        return
    for child in children:
        if not child.name.startswith("."):
            yield from _below(child)


def sweep_dirs(paths: list[str]) -> list[Path]:
    """The sweep folders (with Hydra's multirun.yaml) in or below `paths`."""
    return [folder for match in _matched_folders(paths) for folder in _below(match)
            if (folder / "multirun.yaml").is_file()]


def find_runs(paths: list[str], warn: Callable[[str], None] = _warn,
              jobs: list[tuple[Path, dict[str, str]]] = ()) -> list[Run]:
    """Run directories in or below `paths` (run or sweep directories, or glob patterns of them), and
    the `jobs` of sweeps (folder, overrides) that have no folder yet, as `missing`, in the sweeps'
    order. A run whose files cannot be read is left out, with a warning."""
    found = [folder for match in _matched_folders(paths) for folder in _below(match) if _is_run_dir(folder)]
    unique = list(dict.fromkeys(path.resolve() for path in found))
    if not unique and not jobs:
        raise UserError(f"No run directories in or below {', '.join(paths)} (a run directory has .hydra/ or "
                        f"metrics.json).")
    runs, unreadable = [], []
    for path in unique:
        try:
            runs.append(read_run(path))
        except UserError as error:
            unreadable.append(str(error))
    runs += [Run(folder, overrides, None) for folder, overrides in jobs if folder not in unique]
    if not runs:
        raise UserError(f"No readable run in {', '.join(paths)}: {'; '.join(unreadable)}.")
    for problem in unreadable:
        warn(f"skipped a run: {problem}.")
    order = {folder: num for num, (folder, _) in enumerate(jobs)}
    runs = [run for _, run in sorted(enumerate(runs), key=lambda item: (order.get(item[1].path, len(order)), item[0]))]
    name_runs(runs)
    return runs


# --- names ---------------------------------------------------------------------------------------
def differing(runs: list[Run]) -> list[str]:
    """The settings with more than one value among the runs that have them, and those that only some
    runs have but one set on its command line (leaky_relu's negative_slope=0.2 beside relu runs)."""
    keys = dict.fromkeys(key for run in runs for key in run.settings)
    typed = {key for run in runs for key in run.overrides}
    return [key for key in keys if len({run.settings[key] for run in runs if key in run.settings}) > 1
            or (key in typed and any(key not in run.settings for run in runs))]


def _not_in_names(key: str) -> bool:
    return any(key == entry or (entry.endswith(".") and key.startswith(entry)) for entry in NOT_IN_NAMES)


def _follows(runs: list[Run], key: str, choice: str) -> bool:
    """Whether each run's value of `key` is the one every run with its value of `choice` has."""
    seen: dict[str, str] = {}
    pairs = [(run.settings[choice], run.settings[key]) for run in runs if key in run.settings and choice in run.settings]
    return bool(pairs) and all(seen.setdefault(chosen, value) == value for chosen, value in pairs)


def name_keys(runs: list[Run]) -> list[str]:
    """The settings that name runs: those that differ, less bookkeeping (NOT_IN_NAMES, unless nothing
    else differs), less those that follow from a group choice made on the command line (the option's
    own values: momentum with optimizer=sgd) unless set there too; sorted, the seed last."""
    keys = differing(runs)
    keys = [key for key in keys if not _not_in_names(key)] or keys
    typed = {key for run in runs for key in run.overrides}
    chosen = [key for key in keys if "." not in key and key in typed]
    kept = [key for key in keys if key in typed or key == SEED_KEY or not any(_follows(runs, key, c) for c in chosen)]
    return sorted(kept, key=lambda key: (key == SEED_KEY, key))


def short_keys(keys: list[str]) -> dict[str, str]:
    """`lr` for optimizer.lr when no other key ends so. Dataset settings keep their prefix
    (`dataset.root`: root alone would not say it is about the data)."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: key if key.startswith("dataset.") or last.count(end) > 1 else end for key, end in zip(keys, last)}


def _folder_labels(paths: list[Path]) -> dict[Path, str]:
    """Each path by as many of its last folders as tell it from the others."""
    for depth in range(1, max(len(path.parts) for path in paths) + 1):
        labels = {path: "/".join(path.parts[-depth:]) for path in paths}
        if len(set(labels.values())) == len(labels):
            return labels
    return {path: str(path) for path in paths}


def name_runs(runs: list[Run]) -> None:
    """Name each run by the settings that differ (name_keys), and group by all of them but the seed.
    Runs alike in all of them (reruns of one config and seed) are separate configurations, told
    apart by their folders."""
    keys = name_keys(runs)
    short = short_keys(keys)
    for run in runs:
        parts = {key: f"{short[key]}={run.settings[key]}" for key in keys if key in run.settings}
        run.rerun = ""
        run.name = ", ".join(parts.values())
        run.group = ", ".join(part for key, part in parts.items() if key != SEED_KEY)
    counts = Counter(run.name for run in runs)
    alike = [run for run in runs if counts[run.name] > 1 or not run.name]
    folders = _folder_labels([run.path for run in alike]) if alike else {}
    for run in alike:
        run.rerun = folders[run.path]
        run.name = f"{run.name} ({run.rerun})" if run.name else run.rerun
        run.group = f"{run.group} ({run.rerun})" if run.group else run.rerun
    for run in runs:
        run.group = run.group or "all"  # only the seed differs


def fixed_settings(runs: list[Run]) -> dict[str, str]:
    """The settings of FIXED_IN_FIGURES that every run with a composed config has, with one value."""
    composed = [run for run in runs if run.composed] or runs
    varied = differing(runs)
    fixed = {}
    for key in FIXED_IN_FIGURES:
        values = {run.settings.get(key) for run in composed}
        if len(values) == 1 and None not in values and key not in varied:
            fixed[key.rsplit(".", 1)[-1]] = values.pop()
    return fixed


# --- statistics ----------------------------------------------------------------------------------
@dataclass
class Spread:
    mean: float | None
    std: float | None  # sample standard deviation; None for fewer than two values
    ci95: float | None  # half-width of the 95% confidence interval of the mean (Student t); None likewise
    count: int
    values: list[float] = field(default_factory=list)

    def text(self, digits: int = 4) -> str:
        """`mean ± CI half-width`, `mean ± -` for one value (no interval), `-` for none."""
        if self.mean is None:
            return "-"
        return f"{self.mean:.{digits}f} ± " + ("-" if self.ci95 is None else f"{self.ci95:.{digits}f}")


def spread(values: list[Any]) -> Spread:
    """Mean, sample standard deviation and Student t 95% confidence interval of the finite numbers
    among `values`: mean ± t(0.975, n-1) s / sqrt(n) (Student 1908)."""
    from scipy import stats

    numbers = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not numbers:
        return Spread(None, None, None, 0)
    if len(numbers) == 1:
        return Spread(numbers[0], None, None, 1, numbers)
    std = statistics.stdev(numbers)
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, len(numbers) - 1)) * std / math.sqrt(len(numbers))
    return Spread(statistics.fmean(numbers), std, half, len(numbers), numbers)


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (Welch 1947) that a and b have the same mean; None when it
    cannot tell: fewer than two values on either side, or no spread on both."""
    import warnings

    from scipy import stats

    if len(a) < 2 or len(b) < 2 or (statistics.stdev(a) == 0 and statistics.stdev(b) == 0):
        return None
    with warnings.catch_warnings():  # "precision loss" for nearly equal seeds: the p-value is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def versus_best(accuracies: dict[str, Spread]) -> dict[str, dict[str, Any]]:
    """For each configuration, how its test accuracy compares with the best mean's: `best`,
    `not distinguishable` (Welch p >= 5%), `worse`, `cannot tell` (fewer than 2 seeds on a side, or
    no spread on both) or `no result`."""
    scored = {name: accuracy for name, accuracy in accuracies.items() if accuracy.mean is not None}
    best = max(scored, key=lambda name: scored[name].mean) if scored else None
    verdicts = {}
    for name, accuracy in accuracies.items():
        if name not in scored:
            verdicts[name] = {"verdict": "no result", "p": None}
        elif name == best:
            verdicts[name] = {"verdict": "best", "p": None}
        elif (p := welch_p(scored[best].values, accuracy.values)) is None:
            few = min(accuracy.count, scored[best].count) < 2
            verdicts[name] = {"verdict": "cannot tell", "p": None, "why": "fewer than 2 seeds" if few else "no spread"}
        else:
            verdicts[name] = {"verdict": "not distinguishable" if p >= SIGNIFICANCE else "worse", "p": p}
    return verdicts


def _verdict_text(verdict: dict[str, Any]) -> str:
    if verdict["p"] is None:
        return {"best": "best", "no result": "-"}.get(verdict["verdict"], f"cannot tell ({verdict.get('why')})")
    return f"{'≈ best' if verdict['verdict'] == 'not distinguishable' else 'worse'} (p={verdict['p']:.2g})"


# --- seed groups and tuning ----------------------------------------------------------------------
GROUP_METRICS = ("val_acc", "test_acc", "val_loss", "test_loss", "dead_fraction")


def by_group(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs that differ only by trainer.seed, under their group name, in the order first seen."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


def _completed(runs: list[Run], metric: str) -> Spread:
    return spread([run.metric(metric) for run in runs if run.status == "completed"])


def seed_groups(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Each group of runs: its metrics over its completed runs (Spread), its warnings, and its test
    accuracy against the best group's (versus_best)."""
    summary = {}
    for name, members in by_group(runs).items():
        summary[name] = {
            "runs": len(members),
            "completed": sum(run.status == "completed" for run in members),
            "seeds": [run.settings.get(SEED_KEY) for run in members],
            **{metric: _completed(members, metric) for metric in GROUP_METRICS},
            "warnings": warning_counts(members),
        }
    for name, verdict in versus_best({name: group["test_acc"] for name, group in summary.items()}).items():
        summary[name]["vs_best"] = verdict
    return summary


def warning_counts(runs: list[Run]) -> dict[str, int]:
    """For each kind of warning finding: how many of the runs (seeds) have it."""
    counts: dict[str, int] = {}
    for run in runs:
        for kind in filter(None, (run.metric("warnings") or "").split(",")):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _tuned_key(runs: list[Run], key: str) -> str:
    """The setting `key` names (in full, or by its last part), if it differs; else UserError naming those that do."""
    keys = [k for k in differing(runs) if k != SEED_KEY]
    matches = [k for k in keys if k == key] or [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1 and key != SEED_KEY:
        return matches[0]
    named = [k for k in name_keys(runs) if k != SEED_KEY]
    why = ("picking the luckiest seed is not a fair comparison" if key == SEED_KEY else
           f"{key} could be {' or '.join(matches)}" if matches else
           f"{key} has one value in these runs (or none), so there is nothing to tune")
    settings = f"settings that differ: {', '.join(named)}" if named else "no setting differs between these runs"
    raise UserError(f"--tune {key}: {why}; {settings}.")


def tune(runs: list[Run], key: str) -> dict[str, Any]:
    """For each configuration (the runs alike in every named setting but `key` and the seed): the
    value of `key` with the best mean validation accuracy over its completed seeds, that value's
    validation and test accuracy, and the test accuracy against the best configuration's."""
    key = _tuned_key(runs, key)
    keys = [k for k in name_keys(runs) if k not in (key, SEED_KEY)]
    short = short_keys(name_keys(runs))
    configurations: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        name = ", ".join(f"{short[k]}={run.settings[k]}" for k in keys if k in run.settings) or "all"
        name = f"{name} ({run.rerun})" if run.rerun else name
        configurations.setdefault(name, {}).setdefault(run.settings.get(key, "-"), []).append(run)
    tuned = {}
    for name, candidates in configurations.items():
        validation = {value: _completed(members, "val_acc") for value, members in candidates.items()}
        scored = [value for value, accuracy in validation.items() if accuracy.mean is not None]
        chosen = max(scored, key=lambda value: validation[value].mean) if scored else None
        tuned[name] = {"chosen": chosen, "tried": list(candidates),
                       "val_acc": validation[chosen] if chosen is not None else spread([]),
                       "test_acc": _completed(candidates.get(chosen, []), "test_acc")}
    for name, verdict in versus_best({name: entry["test_acc"] for name, entry in tuned.items()}).items():
        tuned[name]["vs_best"] = verdict
    return {"key": key, "configurations": tuned}


# --- tables and files ----------------------------------------------------------------------------
ROW_FIELDS = ("name", "status", "epochs", "steps", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc",
              "dead_fraction", "warnings", "seconds", "path")
IN_TITLES = (f"mean ± {CONFIDENCE:.0%} confidence interval (Student t) of the completed seeds, - for one; vs best: "
             f"Welch's t-test on test accuracy, two-sided, {SIGNIFICANCE:.0%}")
STATISTICS = (f"mean ± half-width of the {CONFIDENCE:.0%} confidence interval of the mean over the completed "
              f"seeds (Student t: t(0.975, n-1) s / sqrt(n)); vs best: Welch's t-test on test accuracy, two-sided, "
              f"{SIGNIFICANCE:.0%} level")


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
               "not_completed": [run.name for run in runs if run.status != "completed"],
               "fixed": fixed_settings(runs), "statistics": STATISTICS}
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
    styles = {"completed": "green", "invalid": "yellow"}
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


def _group_table(groups: dict[str, dict[str, Any]]) -> Table:
    table = Table(title=f"grouped over trainer.seed: {IN_TITLES}", title_justify="left")
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


# --- figures -------------------------------------------------------------------------------------
Series = dict[str, tuple[list[int], list[float]]]  # tag -> (steps, values)
MAX_INCHES = 16.0  # the most either side of a figure grows to, however many configurations
DPI = 100  # so a PNG is at most 1600 x 1600 pixels
LABEL_CHARS = 48  # legend and tick labels wrap at this many characters, onto two lines at most


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


@dataclass
class Drawing:
    """What every figure draws from: the runs drawn, by configuration, their scalar series (by run
    path), a colour and a legend label per configuration, and the settings every run shares."""
    groups: dict[str, list[Run]]
    scalars: dict[Path, Series]
    colours: dict[str, Any]
    labels: dict[str, str]
    fixed: str


def _label(name: str, members: list[Run]) -> str:
    statuses = sorted({run.status for run in members if run.status != "completed"})
    seeds = f" ({len(members)} seeds)" if len(members) > 1 else ""
    text = f"{name}{seeds}" + (f" [{', '.join(statuses)}]" if statuses else "")
    return "\n".join(textwrap.wrap(text, LABEL_CHARS, max_lines=2, placeholder=" …"))


def _palette(count: int) -> list:
    """tab10 for up to 10 colours; then tab20's dark shades, its light ones, tab20b and tab20c (60)."""
    import matplotlib

    if count <= 10:
        return list(matplotlib.colormaps["tab10"].colors)
    tab20 = matplotlib.colormaps["tab20"].colors
    return [*tab20[0::2], *tab20[1::2], *matplotlib.colormaps["tab20b"].colors, *matplotlib.colormaps["tab20c"].colors]


def drawing(runs: list[Run], scalars: dict[Path, Series]) -> Drawing:
    """The Drawing of the runs that have something to draw: not those that never started training
    (a rejected config) or failed before their first probe, which have no series."""
    drawn = [run for run in runs if run.status != "invalid" and scalars.get(run.path)]
    groups = by_group(drawn)
    palette = _palette(len(groups))
    fixed = ", ".join(f"{key}={value}" for key, value in fixed_settings(runs).items())
    return Drawing(groups, scalars, {name: palette[i % len(palette)] for i, name in enumerate(groups)},
                   {name: _label(name, members) for name, members in groups.items()}, fixed)


def _wrap(text: str, inches: float, points: float = 10.0, lines: int | None = None) -> str:
    """`text` in lines that fit `inches` at `points` (an average glyph is about 0.6 em wide)."""
    width = max(8, int(inches * 72 / (points * 0.6)))
    return "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder=" …"))


def _entries(d: Drawing, names: list[str] | None = None) -> list[tuple[str, Any]]:
    """One legend entry per configuration: (label, colour)."""
    return [(d.labels[name], d.colours[name]) for name in (d.groups if names is None else names)]


def _figure(d: Drawing, rows: int, cols: int, panel: tuple[float, float], title: str,
            legend: list[tuple[str, Any]], **subplots):
    """rows x cols panels of about `panel` inches, the figure capped at MAX_INCHES a side, the title
    and the fixed settings above and `legend` (label, colour) below, in as many columns as fit."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    width = min(MAX_INCHES, cols * panel[0])
    headline = _wrap(title, width) + (f"\n{_wrap('fixed: ' + d.fixed, width)}" if d.fixed else "")
    lines = [line for label, _ in legend for line in label.split("\n")]
    longest = max(map(len, lines), default=0)
    columns = max(1, min(len(legend), int((width - 0.3) / (0.6 + longest * 8.3 * 0.6 / 72)))) if legend else 1
    legend_height = 0.19 * math.ceil(len(legend) / columns) * len(lines) / max(1, len(legend))
    height = min(MAX_INCHES, rows * panel[1] + 0.25 * (headline.count("\n") + 1) + legend_height + 0.3)
    figure, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False, layout="constrained", **subplots)
    figure.suptitle(headline, fontsize="medium")
    if legend:
        handles = [Line2D([], [], color=colour, linewidth=2) for _, colour in legend]
        figure.legend(handles, [label for label, _ in legend], loc="outside lower center", ncols=columns,
                      fontsize="small", frameon=False)
    return figure, axes


def _mean_ci(series: list[tuple[list[int], list[float]]]):
    """The steps every run reached, the mean over the runs there, and the half-width of its 95%
    confidence interval (None for one run)."""
    import numpy as np
    from scipy import stats

    points = [dict(zip(steps, values)) for steps, values in series]
    steps = sorted(set.intersection(*(set(p) for p in points)))
    values = np.array([[p[step] for step in steps] for p in points], dtype=float).reshape(len(points), len(steps))
    if len(points) < 2:
        return steps, values[0], None
    half = stats.t.ppf((1 + CONFIDENCE) / 2, len(points) - 1) * values.std(axis=0, ddof=1) / math.sqrt(len(points))
    return steps, values.mean(axis=0), half


def _mean_line(axis, series, colour, marker: str | None = None, bounds=(-math.inf, math.inf)) -> None:
    """The mean over the runs, with its confidence band (cut to `bounds`, as [0, 1] for an accuracy)."""
    import numpy as np

    steps, mean, half = _mean_ci(series)
    axis.plot(steps, mean, color=colour, marker=marker, markersize=3)
    if half is not None:
        axis.fill_between(steps, np.clip(mean - half, *bounds), np.clip(mean + half, *bounds), color=colour,
                          alpha=0.2, linewidth=0)


def _layer_index(tag: str) -> int:
    return int(tag.split("/", 1)[1][3:5])  # act07_conv -> 7


def _series(d: Drawing, members: list[Run], tag: str) -> list[tuple[list[int], list[float]]]:
    return [d.scalars[run.path][tag] for run in members if tag in d.scalars[run.path]]


def _val_curves(d: Drawing):
    """Training loss per log step (when logged), validation loss and accuracy per epoch; None without any."""
    import matplotlib.ticker

    panels = {"train/loss": "training loss (log scale), every trainer.log_every steps",
              "val/loss": "validation loss (log scale), one point per epoch",
              "val/acc": "validation accuracy, one point per epoch"}
    panels = {tag: title for tag, title in panels.items() if any(tag in series for series in d.scalars.values())}
    if not panels or not d.groups:
        return None
    figure, axes = _figure(d, 1, len(panels), (5.4, 3.8), "loss and accuracy against step: mean over seeds, band = "
                           f"{CONFIDENCE:.0%} confidence interval of the mean (Student t)", _entries(d))
    for axis, (tag, title) in zip(axes[0], panels.items()):
        for name, members in d.groups.items():
            if series := _series(d, members, tag):
                _mean_line(axis, series, d.colours[name], marker="o" if tag.startswith("val/") else None,
                           bounds=(0, 1) if tag.endswith("acc") else (-math.inf, math.inf))
        axis.set_title(_wrap(title, figure.get_figwidth() / len(panels), 9), fontsize="small")
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # steps are whole
        axis.set_yscale("log" if tag.endswith("loss") else "linear")
        axis.grid(alpha=0.3)
    return figure


def _test_accuracy(d: Drawing):
    """Horizontal bars, one per configuration, so that long names fit beside them."""
    if not d.groups:
        return None
    names = list(d.groups)
    longest = max(len(line) for name in names for line in d.labels[name].split("\n"))
    title = (f"final test accuracy: bar = mean over completed seeds, whisker = {CONFIDENCE:.0%} confidence interval "
             f"(Student t), dots = seeds")
    figure, axes = _figure(d, 1, 1, (5 + 0.075 * longest, 1.2 + 0.36 * len(names)), title, [])
    axis = axes[0][0]
    for i, name in enumerate(names):
        accuracy = _completed(d.groups[name], "test_acc")
        if accuracy.mean is None:
            axis.text(0.01, i, "no result", va="center", fontsize="small")
            continue
        axis.barh(i, accuracy.mean, xerr=accuracy.ci95, color=d.colours[name], alpha=0.7, capsize=3)
        axis.scatter(accuracy.values, [i] * accuracy.count, color="black", s=10, zorder=3)
    axis.set_yticks(range(len(names)), [d.labels[name] for name in names], fontsize="small")
    axis.set(xlim=(0, 1), ylim=(len(names) - 0.5, -0.5), xlabel="test accuracy")
    axis.grid(axis="x", alpha=0.3)
    return figure


def _dead_fraction(d: Drawing):
    """One panel per configuration, one line per layer (one legend for all); None without dead fractions."""
    import matplotlib
    import matplotlib.ticker

    tags = sorted({tag for series in d.scalars.values() for tag in series if tag.startswith("dead_fraction/act")},
                  key=lambda tag: (_layer_index(tag), tag))
    if not tags or not d.groups:
        return None
    colours = {tag: matplotlib.colormaps["viridis"](i / max(1, len(tags) - 1)) for i, tag in enumerate(tags)}
    cols = min(len(d.groups), math.ceil(math.sqrt(len(d.groups))))
    rows_ = math.ceil(len(d.groups) / cols)
    legend = [(tag.split("/", 1)[1], colour) for tag, colour in colours.items()]
    figure, grid = _figure(d, rows_, cols, (3.4, 2.8), "dead fraction of each activation layer against step "
                           "(mean over seeds), one panel per configuration", legend, sharey=True)
    for axis, (name, members) in zip(grid.flat, d.groups.items()):
        for tag in tags:
            if series := _series(d, members, tag):
                steps, mean, _ = _mean_ci(series)
                axis.plot(steps, mean, color=colours[tag])
        title = d.labels[name].replace("\n", " ")
        axis.set_title(_wrap(title, figure.get_figwidth() / cols, 8, lines=3), fontsize="small")
        axis.set_ylim(-0.02, 1.02)
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
        axis.tick_params(labelsize="small")
        axis.grid(alpha=0.3)
    for axis in list(grid.flat)[len(d.groups):]:
        figure.delaxes(axis)
    grid[0][0].set_ylabel("dead fraction")
    return figure


def _depth_lines(axis, prefix: str, members: list[Run], scalars: dict[Path, Series], colour) -> None:
    """One statistic against depth for one group: at the first probe (step 0, dashed) and the last (solid)."""
    tags = sorted((tag for tag in scalars[members[0].path] if tag.startswith(prefix)), key=_layer_index)
    if not tags:
        return
    depth = [_layer_index(tag) for tag in tags]
    for moment, style in ((0, "--"), (-1, "-")):
        values = [statistics.fmean(scalars[run.path][tag][1][moment] for run in members if tag in scalars[run.path])
                  for tag in tags]
        axis.plot(depth, values, style, marker="o", markersize=3, color=colour)


def _activation_depth(d: Drawing):
    """Activation mean, std and (when logged) effective rank against depth; None without them."""
    import matplotlib.ticker

    panels = {"act_mean/": "activation mean by depth", "act_std/": "activation std by depth",
              "effective_rank/": "effective rank of the activations by depth"}
    panels = {prefix: title for prefix, title in panels.items()
              if any(tag.startswith(prefix) for series in d.scalars.values() for tag in series)}
    if not panels or not d.groups:
        return None
    figure, axes = _figure(d, 1, len(panels), (5.0, 3.8), "activations against depth, mean over seeds: dashed = "
                           "first probe (step 0), solid = last probe", _entries(d))
    for axis, (prefix, title) in zip(axes[0], panels.items()):
        for name, members in d.groups.items():
            _depth_lines(axis, prefix, members, d.scalars, d.colours[name])
        axis.set_title(title, fontsize="small")
        axis.set_xlabel("activation layer (input side first)")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))  # one layer too
        axis.grid(alpha=0.3)
    return figure


def _sharpness(d: Drawing):
    """Top Hessian eigenvalue against step, and 2 / lr dashed where logged (SGD); None without sharpness."""
    names = [name for name, members in d.groups.items() if _series(d, members, "sharpness/top_eigenvalue")]
    if not names:
        return None
    figure, axes = _figure(d, 1, 1, (12, 4.2), "sharpness: top eigenvalue of the loss Hessian against step, mean over "
                           "seeds; dashed: the stability limit 2(1+momentum)/lr (SGD)", _entries(d, names))
    axis = axes[0][0]
    drawn = []
    for name in names:
        for tag, style in (("sharpness/top_eigenvalue", "-"), ("sharpness/stability_limit", "--")):
            if series := _series(d, d.groups[name], tag):
                steps, mean, _ = _mean_ci(series)
                axis.plot(steps, mean, style, marker="." if style == "-" else None, color=d.colours[name])
                drawn.extend(mean)
    axis.set(xlabel="step", ylabel="top eigenvalue")
    if min(drawn) > 0:  # a negative estimate (possible early on) rules the log scale out
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    return figure


# One row per figure file: adding a figure is adding a row. Each draws from a Drawing; one that
# returns None (nothing to draw, as sharpness.png when no run measured sharpness) is not written.
FIGURES = {
    "val_curves.png": _val_curves,
    "test_accuracy.png": _test_accuracy,
    "dead_fraction.png": _dead_fraction,
    "activation_depth.png": _activation_depth,
    "sharpness.png": _sharpness,
}
# The series the figures read.
SCALAR_PREFIXES = ("train/loss", "val/", "dead_fraction/act", "act_mean/", "act_std/", "effective_rank/",
                   "sharpness/")


def make_figures(runs: list[Run], out: Path) -> list[Path]:
    """The comparison figures as PNG files in `out`, also written to TensorBoard (out/figures); the
    files written, in FIGURES order (a figure with nothing to draw is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    from torch.utils.tensorboard import SummaryWriter

    scalars = {run.path: read_scalars(run, SCALAR_PREFIXES) for run in runs if run.path.is_dir()}
    d = drawing(runs, scalars)
    written = []
    with SummaryWriter(str(out / "figures")) as writer:
        for filename, draw in FIGURES.items():
            figure = draw(d)
            if figure is None:
                continue
            figure.savefig(out / filename, dpi=DPI)
            writer.add_figure(f"compare/{filename.removesuffix('.png')}", figure, global_step=0, close=True)
            written.append(out / filename)
    return written

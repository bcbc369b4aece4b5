"""`cnnlab inspect RUN_DIR`: one run's story from what it left on disk: its status, each layer at
step 0 and at the last probe, and the findings (cnnlab.analysis.findings) recomputed from its event files.

Reads only files (event files with TensorBoard's reader, metrics.json, .hydra/config.yaml), so it
works the same for completed, running, failed and older runs, and without importing torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cnnlab import statistics
from cnnlab.analysis.findings import Finding, RunFacts, diagnose, run_facts
from cnnlab.analysis.runs import event_files, readable_events, skipped_events_note
from cnnlab.config import FindingsConfig, with_todays_defaults
from cnnlab.datasets import DATASETS
from cnnlab.errors import UserError, one_line
from cnnlab.rundir import METRICS_FILE, json_safe, locked_by, read_run_metrics
from cnnlab.status import Status

Series = dict[str, list[tuple[int, float]]]  # tag -> (step, value) in step order, as cnnlab.analysis.findings takes it


@dataclass
class Inspection:
    path: Path
    status: str  # metrics.json's status; "unknown" without one
    writer_pid: str | None  # the live process writing the run, if any
    metrics: dict[str, Any]
    config: dict[str, Any]  # .hydra/config.yaml; {} without one
    series: Series
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was missing or guessed


# --- reading the run ---------------------------------------------------------------------------------
def check_run_dir(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path} does not exist: pass a run directory (outputs/DATE/TIME).")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory: pass a run directory (outputs/DATE/TIME).")
    if not event_files(path)[0] and not (path / METRICS_FILE).is_file():
        raise UserError(f"{path} is not a run directory: it has no TensorBoard event files and no {METRICS_FILE}.")


def read_series(path: Path) -> Series:
    """Every scalar of the run's event files, read by TensorBoard's own reader (no torch)."""
    if not event_files(path)[0]:
        return {}
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # its reader logs each file it opens (INFO): printed wherever Hydra's logging, once set up, prints
    logging.getLogger("tensorboard").setLevel(logging.WARNING)

    # Keep every scalar; the histograms and images are skipped as far as the reader allows.
    guidance = {"scalars": 0, "histograms": 1, "images": 1, "tensors": 1, "audio": 1, "compressedHistograms": 1}
    try:
        with readable_events(path) as folder:
            events = EventAccumulator(str(folder), size_guidance=guidance)
            events.Reload()
        return {tag: [(point.step, point.value) for point in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    except Exception as error:  # a damaged file: tensorboard raises many kinds
        raise UserError(f"the event files in {path} cannot be read: {one_line(error, 200)}") from None


def read_config(path: Path, notes: list[str]) -> dict[str, Any]:
    file = path / ".hydra" / "config.yaml"
    if not file.is_file():
        notes.append(f"no {file.relative_to(path)}: the findings that need the run's settings are skipped")
        return {}
    try:
        config = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        notes.append(f"{file} cannot be read ({one_line(error, 120)}): findings skipped")
        return {}
    return config if isinstance(config, dict) else {}


def read_run(path: Path) -> Inspection:
    """The run in `path`; UserError when it is not one."""
    path = Path(path).expanduser()
    check_run_dir(path)
    notes: list[str] = []
    metrics = read_run_metrics(path) or {}
    config = read_config(path, notes)
    special = event_files(path)[1]
    if special:
        notes.append(skipped_events_note(special))
    series = read_series(path)
    if not series:
        notes.append("no scalars in the event files yet")
    return Inspection(path, str(metrics.get("status", "unknown")), locked_by(path), metrics, config, series,
                      notes=notes)


# --- what the findings need --------------------------------------------------------------------------
def _num_classes(dataset: dict[str, Any], notes: list[str]) -> int:
    name = dataset.get("name")
    if name in DATASETS and DATASETS[name].classes is not None:
        return DATASETS[name].classes
    if name == "fake" and isinstance(dataset.get("num_classes"), int):
        return dataset["num_classes"]
    if name == "imagefolder" and dataset.get("path"):
        root = Path(str(dataset["path"])).expanduser()
        folder = root / "train" if (root / "train").is_dir() else root
        try:
            classes = [entry for entry in os.scandir(folder) if entry.is_dir()]
        except OSError:
            classes = []
        if classes:
            return len(classes)
    notes.append(f"the number of classes of dataset {name!r} is unknown here: assumed 10")
    return 10


def _steps_per_epoch(inspection: Inspection) -> int:
    metrics = inspection.metrics
    if isinstance(metrics.get("epochs"), int) and metrics["epochs"] > 0 and isinstance(metrics.get("steps"), int):
        return max(1, metrics["steps"] // metrics["epochs"])
    for step, epoch in inspection.series.get("epoch", []):  # written at each epoch end
        if epoch > 0:
            return max(1, round(step / epoch))
    # Not one epoch done yet: past the last step, so that rules judging "after the first epoch" say nothing.
    inspection.notes.append("no epoch finished yet: steps per epoch unknown, taken as the steps so far")
    return 1 + max((points[-1][0] for points in inspection.series.values() if points), default=0)


def facts_of(inspection: Inspection) -> RunFacts:
    """The run's RunFacts, as the trainer builds them, from its config and metrics.json."""
    return run_facts(inspection.config, num_classes=_num_classes(inspection.config.get("dataset") or {},
                                                                 inspection.notes),
                     steps_per_epoch=_steps_per_epoch(inspection), metrics=inspection.metrics)


def _todays_findings(run_findings: Any) -> FindingsConfig:
    """`run_findings` over the findings defaults of today's configs/train.yaml, typed."""
    cfg = with_todays_defaults(OmegaConf.create({"findings": run_findings or {}}), sections=("findings",))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FindingsConfig), cfg.findings))


def findings_config(run_config: dict[str, Any], notes: list[str]) -> FindingsConfig:
    """The run's own `findings` settings over today's defaults. An older run has none, or some this
    version does not know: it gets today's defaults, and a note says so."""
    if "findings" not in run_config:
        notes.append("the run's config has no findings section: today's defaults are used")
        return _todays_findings({})
    try:
        return _todays_findings(run_config["findings"])
    except Exception as error:  # a key this version does not know, a value of the wrong type
        notes.append(f"the run's findings settings do not fit this version ({one_line(error, 120)}): "
                     f"today's defaults are used")
        return _todays_findings({})


def diagnose_run(inspection: Inspection) -> list[Finding]:
    """The findings recomputed from the event files (not metrics.json's `findings`): a running run
    and a run older than the findings get them too, by today's rules."""
    if not inspection.config or not inspection.series:
        return []
    return diagnose(inspection.series, facts_of(inspection), findings_config(inspection.config, inspection.notes))


def inspect_run(path: Path) -> Inspection:
    inspection = read_run(path)
    inspection.findings = diagnose_run(inspection)
    return inspection


# --- layers --------------------------------------------------------------------------------------------
def layer_values(series: Series, level: str) -> dict[str, dict[str, dict]]:
    """layer -> statistic -> first and last point, for the layers of `level` (statistics.ACTIVATION or
    WEIGHT) and the statistics that have an inspect column, in depth order."""
    prefixes = statistics.prefixes(level, column=True)
    layers: dict[str, dict[str, dict]] = {}
    for tag, points in series.items():
        prefix, layer = statistics.split_tag(tag)
        if prefix in prefixes and layer.startswith(statistics.LAYER_START[level]) and points:
            (first_step, first), (last_step, last) = points[0], points[-1]
            layers.setdefault(layer, {})[prefix] = {"first": first, "last": last, "first_step": first_step,
                                                    "last_step": last_step}
    return {layer: layers[layer] for layer in sorted(layers, key=lambda name: (statistics.layer_depth(name), name))}


def activation_layers(series: Series) -> dict[str, dict[str, dict]]:
    return layer_values(series, statistics.ACTIVATION)


def weight_layers(series: Series) -> dict[str, dict[str, dict]]:
    return layer_values(series, statistics.WEIGHT)


def _number(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if math.isfinite(value) else str(value)


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def _cell(stats: dict[str, dict], key: str, spec: str) -> str:
    point = stats.get(key)
    if point is None:
        return "-"
    if point["first_step"] == point["last_step"]:  # measured once (an update's statistics miss step 0): no change to show
        return f"{_number(point['last'], spec)} (step {point['last_step']})"
    return f"{_number(point['first'], spec)} → {_number(point['last'], spec)}"


def _steps(layers: dict[str, dict[str, dict]]) -> str:
    points = [point for stats in layers.values() for point in stats.values()]
    if not points:
        return ""
    return f"step {min(p['first_step'] for p in points)} → {max(p['last_step'] for p in points)}"


def layer_table(title: str, layers: dict[str, dict[str, dict]], columns) -> Table:
    table = Table(title=f"{title}, {_steps(layers)}: first → last", title_justify="left")
    table.add_column("layer", no_wrap=True)
    for _, header, _ in columns:
        table.add_column(header, justify="right")  # a narrow terminal wraps a cell at its arrow
    for layer, stats in layers.items():
        table.add_row(escape(layer), *(_cell(stats, key, spec) for key, _, spec in columns))
    return table


# --- output ----------------------------------------------------------------------------------------
def _last(series: Series, tag: str) -> float | None:
    points = series.get(tag)
    return points[-1][1] if points else None


def header(inspection: Inspection) -> dict[str, Any]:
    """Status, progress and results, from metrics.json, else from the event files."""
    metrics, series = inspection.metrics, inspection.series
    last_step = max((points[-1][0] for points in series.values() if points), default=None)
    epoch = _last(series, "epoch")
    return {
        "run": str(inspection.path),
        "status": inspection.status,
        "writer_pid": inspection.writer_pid,
        "epochs": metrics.get("epochs", int(epoch) if epoch is not None else None),
        "steps": metrics.get("steps", last_step),
        "val_acc": metrics.get("val_acc", _last(series, "val/acc")),
        "test_acc": metrics.get("test_acc", _last(series, "test/acc")),
    }


def to_json(inspection: Inspection) -> dict[str, Any]:
    layers = {**activation_layers(inspection.series), **weight_layers(inspection.series)}
    return json_safe({**header(inspection), "layers": layers,
                       "findings": [finding.to_dict() for finding in inspection.findings],
                       "notes": inspection.notes})


def print_report(console: Console, inspection: Inspection) -> None:
    top = header(inspection)
    styles = {Status.COMPLETED: "green", Status.RUNNING: "yellow"}
    status = f"[{styles.get(top['status'], 'red')}]{escape(top['status'])}[/]"
    if top["status"] == Status.RUNNING:
        status += f" (process {top['writer_pid']})" if top["writer_pid"] else " (no process is writing it: killed?)"
    console.print(f"[bold]run[/] {escape(top['run'])}", highlight=False, soft_wrap=True)
    console.print(f"status {status}   epochs {_text(top['epochs'])}   steps {_text(top['steps'])}"
                  f"   val acc {_number(top['val_acc'], '.4f')}   test acc {_number(top['test_acc'], '.4f')}",
                  highlight=False, soft_wrap=True)
    activations, weights = activation_layers(inspection.series), weight_layers(inspection.series)
    if activations:
        console.print(layer_table("activation layers", activations, statistics.columns(statistics.ACTIVATION)))
    if weights:
        console.print(layer_table("weight layers", weights, statistics.columns(statistics.WEIGHT)))
    print_findings(console, inspection.findings)
    for note in inspection.notes:
        console.print(f"note: {note}", style="dim", markup=False, highlight=False, soft_wrap=True)


def print_findings(console: Console, findings: list[Finding]) -> None:
    if not findings:
        console.print("findings: none", highlight=False)
        return
    console.print(f"[bold]findings[/] ({len(findings)})", highlight=False)
    for finding in findings:
        where = " ".join(part for part in (finding.layer or "", f"step {finding.step}" if finding.step is not None
                                           else "") if part)
        console.print(f"  {escape(f'[{finding.severity}]')} {escape(str(finding.kind))}"
                      f"{' (' + escape(where) + ')' if where else ''}: {escape(str(finding.message))}",
                      highlight=False, soft_wrap=True)
        if finding.advice:
            console.print(f"      → {escape(str(finding.advice))}", highlight=False, soft_wrap=True)

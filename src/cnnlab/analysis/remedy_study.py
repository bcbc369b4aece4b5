"""`cnnlab remedy`'s study, without torch: which remedies a run's warnings propose, the option files that
let one Hydra sweep run them beside a rerun of the run itself (the baseline), and what the sweep's
jobs say: warnings cleared, remaining and new, validation accuracy against the baseline (Welch's test),
the recommended remedy, remedy.json and remedy.png.

Each remedy is one option of a config group `remedy` written into the study folder (`+remedy=NAME`,
found through hydra.search_path): a sweep of bundles of settings, which Hydra's sweepers only run as
config-group options. A setting a remedy changes is taken off the run's command line (the command
line wins over any file) and written into every option file instead, at the run's value."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cnnlab.analysis.findings import WARNING, Finding
from cnnlab.analysis.remedies import Remedy, remedy_name
from cnnlab.analysis.runs import Run, setting_text
from cnnlab.analysis.stats import SIGNIFICANCE, Spread, spread, welch_p
from cnnlab.rundir import STUDY_DIR
from cnnlab.status import Status

OPTIONS_DIR = "options"  # ... where its option files are, as the config group `remedy`
GROUP = "remedy"
BASELINE = "baseline"  # the option that changes nothing: the run itself, at the study's budget
GROUPS = ("activation",)  # the config groups a remedy may choose (REMEDIES'); the rest are settings
STUDY_FILE = "study.json"  # the budget the study's jobs ran with: a rerun must keep it


@dataclass
class Plan:
    warnings: list[str]  # the kinds of the run's warning findings
    remedies: dict[str, Remedy]  # by option name, in the order proposed, at most --max-remedies
    options: dict[str, str] = field(default_factory=dict)  # option name -> YAML text (BASELINE too)
    command_line: list[str] = field(default_factory=list)  # the run's overrides, less what the options set


def propose(findings: list[Finding], most: int) -> tuple[list[str], dict[str, Remedy]]:
    """(the kinds of the warnings, their remedies): the union over the warnings, each once, in the
    order the warnings come, at most `most`."""
    warnings = list(dict.fromkeys(f.kind for f in findings if f.severity == WARNING))
    remedies: dict[str, Remedy] = {}
    for finding in (f for f in findings if f.severity == WARNING):
        for remedy in finding.remedies:
            remedies.setdefault(remedy_name(remedy), remedy)
    return warnings, dict(list(remedies.items())[:most])


def _key(line: str) -> str:
    return line.partition("=")[0].lstrip("+~")


def _covered(key: str, settings: set[str]) -> str | None:
    """The setting of `settings` that `key` is or lies under (`activation.negative_slope`: activation)."""
    return next((s for s in settings if key == s or key.startswith(s + ".")), None)


def plan_study(findings: list[Finding], overrides: list[str], config: dict[str, Any], choices: dict[str, Any],
               most: int) -> Plan:
    """The plan for a run with these findings, command-line `overrides` (.hydra/overrides.yaml), composed
    `config` and group `choices` (hydra.runtime.choices). The run's lines for trainer.seed,
    trainer.epochs and resume are left out: the study sets them."""
    warnings, remedies = propose(findings, most)
    changed = {key for remedy in remedies.values() for key in remedy}
    kept, lifted = [], {}
    for line in overrides:
        key = _key(line)
        if key in ("trainer.seed", "trainer.epochs", "resume"):
            continue
        if _covered(key, changed) is None:
            kept.append(line)
        elif key in GROUPS:
            lifted[key] = choices.get(key)
        else:
            lifted[key] = OmegaConf.select(OmegaConf.create(config), key, default=None)
    options = {BASELINE: option_file({}, lifted)}
    options.update({name: option_file(remedy, lifted) for name, remedy in remedies.items()})
    return Plan(warnings, remedies, options, kept)


def option_file(remedy: Remedy, lifted: dict[str, Any]) -> str:
    """The YAML of one option: the run's lifted settings (less those under a group the remedy changes),
    then the remedy's own; groups as overrides of the defaults list."""
    settings = {key: value for key, value in lifted.items()
                if not any(key.startswith(group + ".") for group in remedy if group in GROUPS)}
    settings.update(remedy)
    node = OmegaConf.create({})
    groups = [{f"override /{key}": value} for key, value in settings.items() if key in GROUPS]
    if groups:
        node.defaults = groups + ["_self_"]
    for key, value in settings.items():
        if key not in GROUPS:
            OmegaConf.update(node, key, value, force_add=True)
    return "# @package _global_\n" + (OmegaConf.to_yaml(node) if len(node) else "")


def applied(remedy: Remedy, config: dict[str, Any], choices: dict[str, Any]) -> list[str]:
    """The remedy's settings a composed job config does not hold (empty: it was applied)."""
    node = OmegaConf.create(config)
    return [f"{key}={value}" for key, value in remedy.items()
            if (choices.get(key) if key in GROUPS else OmegaConf.select(node, key, default=None)) != value]


# --- the results ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    name: str
    remedy: Remedy
    runs: list[Run]
    warnings: list[str]  # the kinds of warning any of its seeds has
    val_acc: Spread
    seconds: Spread

    @property
    def statuses(self) -> list[str]:
        return [run.status for run in self.runs]


def recorded_warnings(run: Run) -> list[str]:
    """The kinds of the warnings in the run's metrics.json (as its rules were when it ended)."""
    return [kind for kind in (run.metric("warnings") or "").split(",") if kind]


def outcomes(runs: list[Run], plan: Plan, warnings_of: Callable[[Run], list[str]] = recorded_warnings) -> dict[str, Outcome]:
    """The study's jobs by option (BASELINE first), each with its warnings and results."""
    found = {}
    for name in [BASELINE, *plan.remedies]:
        members = [run for run in runs if run.overrides.get(GROUP) == name]
        kinds = [kind for run in members for kind in warnings_of(run)]
        done = [run for run in members if run.status in (Status.COMPLETED, Status.DIVERGED)]
        found[name] = Outcome(name, plan.remedies.get(name, {}), members, list(dict.fromkeys(kinds)),
                              spread([run.metric("val_acc") for run in done]),
                              spread([run.metric("seconds") for run in done]))
    return found


def is_lower(delta: float, p: float | None) -> bool:
    """Whether a remedy's val accuracy is lower than the baseline's: a lower mean, significantly so
    (Welch p < SIGNIFICANCE) where the test can tell; any lower mean where it cannot (one seed)."""
    return delta < 0 and (p is None or p < SIGNIFICANCE)


def compare_to_baseline(found: dict[str, Outcome]) -> list[dict[str, Any]]:
    """Each remedy's row: its overrides, cleared / remaining / new warnings, val accuracy, its change
    against the baseline and Welch's p, seconds."""
    base = found[BASELINE]
    rows = []
    for name, outcome in found.items():
        if name == BASELINE:
            continue
        scored = bool(outcome.val_acc.count) and base.val_acc.count > 0
        delta = outcome.val_acc.mean - base.val_acc.mean if scored else None
        p = welch_p(outcome.val_acc.values, base.val_acc.values) if scored else None
        ended = bool(outcome.runs) and all(run.metrics is not None for run in outcome.runs)  # a job not run clears nothing
        rows.append({
            "name": name, "overrides": outcome.remedy, "statuses": outcome.statuses,
            "cleared": [kind for kind in base.warnings if kind not in outcome.warnings] if ended else [],
            "remaining": [kind for kind in base.warnings if kind in outcome.warnings or not ended],
            "new": [kind for kind in outcome.warnings if kind not in base.warnings],
            "val_acc": outcome.val_acc.mean, "val_acc_ci95": outcome.val_acc.ci95, "val_acc_seeds": outcome.val_acc.values,
            "delta": delta, "p": p,
            # no accuracy is lower than any; an accuracy where the baseline has none (it diverged first) is not
            "lower": not outcome.val_acc.count or (scored and is_lower(delta, p)),
            "seconds": outcome.seconds.mean})
    return rows


def recommend(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, bool]:
    """(the recommended row, whether it clears every warning): the fewest changed settings that clear
    every warning, add none and do not lower val accuracy (ties: the higher accuracy); else the one of
    those not lowering it that clears the most (less its new ones), then fewest settings; else None."""
    fair = [row for row in rows if not row["lower"]]
    cures = [row for row in fair if not row["remaining"] and not row["new"]]
    if cures:
        return min(cures, key=lambda row: (len(row["overrides"]), -row["val_acc"])), True
    partial = [row for row in fair if row["cleared"]]
    if not partial:
        return None, False
    return min(partial, key=lambda row: (len(row["new"]) - len(row["cleared"]), len(row["overrides"]),
                                         -row["val_acc"])), False


def verdict(best: dict[str, Any] | None, cures_all: bool, warnings: list[str]) -> str:
    if not warnings:
        return "the baseline rerun has no warning at this budget: nothing to cure (the run's warnings may need its full length)"
    if best is None:
        return "no remedy cleared a warning without lowering the validation accuracy"
    settings = settings_text(best["overrides"])
    if cures_all:
        return f"{settings} clears every warning ({', '.join(best['cleared'])}) without lowering the validation accuracy"
    return (f"no remedy clears every warning; {settings} clears {', '.join(best['cleared'])}, and "
            f"{', '.join(best['remaining'] + best['new'])} remain{'s' if len(best['remaining'] + best['new']) == 1 else ''}")


def settings_text(remedy: Remedy) -> str:
    """`model.batchnorm=true optimizer.lr=0.001`: the remedy as overrides."""
    return " ".join(f"{key}={setting_text(value)}" for key, value in remedy.items())


def study_json(run_dir: Path, plan: Plan, found: dict[str, Outcome], rows: list[dict[str, Any]],
               budget: dict[str, Any], original: dict[str, str]) -> dict[str, Any]:
    """remedy.json's object (`cnnlab remedy --json` prints it)."""
    best, cures_all = recommend(rows)
    base = found[BASELINE]
    return _finite({
        "run": str(run_dir), "study": str(run_dir / STUDY_DIR), **budget, "run_warnings": plan.warnings,
        "baseline": {"overrides": original, "warnings": base.warnings, "val_acc": base.val_acc.mean,
                     "val_acc_ci95": base.val_acc.ci95, "val_acc_seeds": base.val_acc.values,
                     "statuses": base.statuses, "seconds": base.seconds.mean},
        "remedies": rows,
        "recommended": best["overrides"] if best else None, "cures_all": cures_all,
        "verdict": verdict(best, cures_all, base.warnings)})


def _finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def write_json(path: Path, study: dict[str, Any]) -> None:
    from cnnlab.rundir import replace_atomically

    text = json.dumps(study, indent=2, allow_nan=False) + "\n"
    replace_atomically(path, lambda file: file.write(text.encode()))


def draw_study(study: dict[str, Any], path: Path) -> Path:
    """remedy.png: each remedy's validation accuracy (seeds as open dots, the mean with its 95% interval)
    against the baseline's (dashed line, grey band), coloured by the warnings it clears; the recommended
    one starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, rows = study["baseline"], study["remedies"]
    labels = ["baseline (the run)"] + [settings_text(row["overrides"]) for row in rows]
    colours = ["black"] + [CLEARS_ALL if not row["remaining"] and not row["new"] else
                           CLEARS_SOME if row["cleared"] else CLEARS_NONE for row in rows]
    figure, axis = plt.subplots(figsize=(10, 1.8 + 0.6 * len(labels)), layout="constrained")
    entries = [base, *rows]
    for y, (entry, colour) in enumerate(zip(entries, colours)):
        seeds = entry["val_acc_seeds"]
        axis.scatter(seeds, [y] * len(seeds), facecolors="none", edgecolors=colour, s=24, zorder=3)
        if entry["val_acc"] is not None:
            axis.errorbar(entry["val_acc"], y, xerr=entry["val_acc_ci95"], fmt="o", color=colour, markersize=7,
                          capsize=4, zorder=4)
    if base["val_acc"] is not None:
        axis.axvline(base["val_acc"], color="black", linestyle="--", linewidth=1, zorder=1)
        if base["val_acc_ci95"]:
            axis.axvspan(base["val_acc"] - base["val_acc_ci95"], base["val_acc"] + base["val_acc_ci95"], color="0.9", zorder=0)
    for y, row in enumerate(rows, start=1):
        if row["overrides"] == study["recommended"]:
            axis.scatter([row["val_acc"]], [y], marker="*", s=260, color="gold", edgecolors="black", zorder=5)
        labels[y] += "\n" + _cleared_text(row, base["warnings"])
    axis.set_yticks(range(len(labels)), labels, fontsize="small")
    for tick, colour in zip(axis.get_yticklabels(), colours):
        tick.set_color(colour)
    axis.set(ylim=(len(labels) - 0.5, -0.5), xlabel="validation accuracy (final epoch)")
    axis.grid(axis="x", alpha=0.3)
    seeds = len(study["seeds"])
    low = axis.get_xlim()[0]
    for y, entry in enumerate(entries):
        if entry["val_acc"] is None:
            statuses = ", ".join(dict.fromkeys(entry.get("statuses") or [])) or "not run"
            axis.text(low, y, f"  no accuracy ({statuses})", va="center", fontsize="small", color=colours[y])
    figure.suptitle(f"cnnlab remedy: validation accuracy against the baseline's ({study['epochs']} epochs, "
                    f"{seeds} seed{'s' * (seeds != 1)})\ngreen: clears every warning, orange: some, grey: none; "
                    f"star: recommended; open dots: seeds; whiskers: 95% intervals",
                    x=0.01, ha="left", fontsize="medium")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


CLEARS_ALL, CLEARS_SOME, CLEARS_NONE = "tab:green", "tab:orange", "tab:gray"


def _cleared_text(row: dict[str, Any], warnings: list[str]) -> str:
    parts = [f"clears {len(row['cleared'])}/{len(warnings)}"]
    if row["remaining"]:
        parts.append("left: " + ", ".join(row["remaining"]))
    if row["new"]:
        parts.append("new: " + ", ".join(row["new"]))
    return "; ".join(parts)

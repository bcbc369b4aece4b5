"""`cnnlab remedy RUN_DIR`: rerun a run with each candidate remedy of its warnings, beside a rerun of the run
itself, as one Hydra sweep in RUN_DIR/remedies/, and say which remedy cures it (analysis/remedy_study.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from cnnlab.analysis.folders import warn
from cnnlab.cli.console import print_error
from cnnlab.cli.folders import quoted
from cnnlab.cli.train_command import Task, train_command
from cnnlab.errors import UserError, one_line
from cnnlab.status import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Status

MOST_REMEDIES = 6


def parse(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cnnlab remedy",
        description="Rerun a run with each candidate remedy of its warnings (and once as it was, the baseline) "
                    "as one sweep in RUN_DIR/remedies/, then say which remedy clears the warnings without "
                    "lowering the validation accuracy. Running it again finishes or reuses that sweep.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory that trained (completed, diverged, ...)")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="Hydra overrides for the sweep, the same for every job: hydra/launcher=joblib, "
                             "trainer.device=cuda")
    parser.add_argument("--seeds", type=int, default=1, metavar="K",
                        help="seeds per remedy: the run's seed and the K-1 after it (default 1; 2 or more give "
                             "95%% intervals and Welch's test)")
    parser.add_argument("--epochs", type=int, metavar="N", help="epochs of every job (default: the run's)")
    parser.add_argument("--max-remedies", type=int, default=MOST_REMEDIES, metavar="M",
                        help=f"at most this many remedies, in the order the warnings propose them (default {MOST_REMEDIES})")
    parser.add_argument("--json", action="store_true", help="print remedy.json's object instead of the table")
    options = parser.parse_intermixed_args(args)  # flags may follow the overrides
    for flag, value in (("--seeds", options.seeds), ("--epochs", options.epochs), ("--max-remedies", options.max_remedies)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: it must be a whole number of at least 1.")
    return options


def remedy_command(args: list[str], job: Task | None = None) -> int:
    """`cnnlab remedy ARGS`; `job` runs each job of the sweep (train_command's)."""
    from cnnlab.analysis.remedy_study import STUDY_DIR

    try:
        options = parse(args)
        run = read_the_run(Path(options.run_dir).expanduser())
        budget = {"epochs": options.epochs or int(run["config"]["trainer"]["epochs"]),
                  "seeds": [int(run["config"]["trainer"]["seed"]) + k for k in range(options.seeds)]}
        plan = plan_the_study(run, options.max_remedies)
        if not plan.remedies:
            return nothing_to_remedy(run, plan, options.json)
        study_dir = run["path"] / STUDY_DIR
        keep_the_budget(study_dir, budget)
    except UserError as error:
        print_error(str(error))
        return EXIT_USAGE
    with contextlib.redirect_stdout(sys.stderr) if options.json else contextlib.nullcontext():
        code = train_command(sweep_arguments(run, plan, study_dir, budget, options.overrides), job)
    if code == EXIT_INTERRUPTED:
        print_error(f"the remedy study was interrupted: run the same command again to finish it (ended jobs are "
                    f"kept, stopped ones continue from their checkpoints). {study_dir}")
        return code
    if not (study_dir / "multirun.yaml").is_file():
        return code  # the sweep was refused before any job: train_command said why
    return report(run, plan, study_dir, budget, options.json)


def read_the_run(path: Path) -> dict[str, Any]:
    """The run's findings, config, group choices, overrides and --config-dir; UserError when it is not a
    run that trained and ended, or cannot be rerun."""
    from cnnlab.analysis.inspection import check_run_dir, inspect_run

    if (path / "multirun.yaml").is_file():
        raise UserError(f"{path} is a sweep folder: remedy one of its runs (cnnlab remedy {path}/JOB), "
                        f"and see `cnnlab compare {path}` for the sweep.")
    check_run_dir(path)
    record = {name: path / ".hydra" / f"{name}.yaml" for name in ("config", "hydra", "overrides")}
    missing = [str(file) for file in record.values() if not file.is_file()]
    if missing:
        raise UserError(f"{path} has no record of its config ({', '.join(missing)}): cnnlab cannot rerun it.")
    inspection = inspect_run(path)
    if inspection.writer_pid is not None:
        raise UserError(f"{path} is still running (process {inspection.writer_pid}): remedy it once it has ended.")
    if inspection.status in (Status.INVALID, Status.MISSING, "unknown") or not inspection.series:
        raise UserError(f"{path} never trained (status {inspection.status}, no statistics): there is nothing to remedy.")
    trainer = inspection.config.get("trainer")
    if not isinstance(trainer, dict) or not {"epochs", "seed"} <= set(trainer):
        raise UserError(f"{record['config']} has no trainer.epochs and trainer.seed: cnnlab cannot rerun the run.")
    try:
        hydra_node = (yaml.safe_load(record["hydra"].read_text()) or {}).get("hydra", {})
        overrides = [str(line) for line in yaml.safe_load(record["overrides"].read_text()) or []]
    except (OSError, yaml.YAMLError, AttributeError) as error:
        raise UserError(f"{path}/.hydra cannot be read: {one_line(error, 200)}") from None
    runtime = hydra_node.get("runtime") or {}
    user_dirs = [source["path"] for source in runtime.get("config_sources") or []
                 if source.get("provider") == "command-line" and source.get("schema") == "file"]
    return {"path": path.resolve(), "findings": inspection.findings, "config": inspection.config,
            "choices": runtime.get("choices") or {}, "overrides": overrides, "config_dir": user_dirs[0] if user_dirs else None}


def plan_the_study(run: dict[str, Any], most: int):
    """The study's plan, its option files written and each composed as the sweep will compose it: a
    remedy this run's config does not take (a preset choosing the activation, say) is left out with a
    warning. Nothing is written when there is no remedy to run."""
    from cnnlab.analysis.remedy_study import BASELINE, STUDY_DIR, plan_study

    plan = plan_study(run["findings"], run["overrides"], run["config"], run["choices"], most)
    if not plan.remedies:
        return plan
    options_dir = write_options(run["path"] / STUDY_DIR, plan.options)
    for name in [BASELINE, *plan.remedies]:
        problem = compose_problem(run, plan.command_line, options_dir, name, plan.remedies.get(name, {}))
        if problem and name == BASELINE:
            raise UserError(f"the run's own config cannot be composed again: {problem}")
        if problem:
            warn(f"left out the remedy {name}: {problem}")
            del plan.remedies[name]
    return plan


def write_options(study_dir: Path, options: dict[str, str]) -> Path:
    from cnnlab.analysis.remedy_study import GROUP, OPTIONS_DIR
    from cnnlab.rundir import replace_atomically

    folder = study_dir / OPTIONS_DIR
    for name, text in options.items():
        replace_atomically(folder / GROUP / f"{name}.yaml", lambda file, text=text: file.write(text.encode()))
    return folder


def compose_problem(run: dict[str, Any], command_line: list[str], options_dir: Path, name: str,
                    remedy: dict[str, Any]) -> str | None:
    """Why the job `+remedy=name` would not run with the remedy's settings; None when it would."""
    from hydra import version
    from hydra.core.utils import setup_globals
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from cnnlab.analysis.remedy_study import GROUP, applied
    from cnnlab.cli.hydra_api import config_loader
    from cnnlab.config import config_dir

    version.setbase(None)
    setup_globals()
    loader = config_loader(str(config_dir()), [run["config_dir"]] if run["config_dir"] else [])
    try:
        cfg = loader.load_configuration("train", [*command_line, f"+{GROUP}={name}", searchpath(options_dir)],
                                        RunMode.RUN)
    except Exception as error:  # Hydra's composition errors are of many kinds
        return one_line(error, 300)
    config = OmegaConf.to_container(cfg)
    choices = config.pop("hydra")["runtime"]["choices"]
    missing = applied(remedy, config, choices)
    return f"the composed config does not hold {', '.join(missing)} (a file of the run sets it)" if missing else None


def searchpath(options_dir: Path) -> str:
    return f"hydra.searchpath=[{quoted('file://' + str(options_dir))}]"


def keep_the_budget(study_dir: Path, budget: dict[str, Any]) -> None:
    """A study folder keeps the epochs its jobs ran for: another --epochs would mix budgets."""
    from cnnlab.analysis.remedy_study import STUDY_FILE
    from cnnlab.rundir import replace_atomically

    file = study_dir / STUDY_FILE
    try:
        earlier = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError) as error:
        raise UserError(f"{file} cannot be read ({one_line(error, 120)}): move {study_dir} away to start anew.") from None
    if earlier.get("epochs", budget["epochs"]) != budget["epochs"]:
        raise UserError(f"{study_dir} holds a study of {earlier['epochs']} epochs a job: run it with --epochs "
                        f"{earlier['epochs']} to finish or extend it, or move that folder away for --epochs {budget['epochs']}.")
    text = json.dumps({"epochs": budget["epochs"]}) + "\n"
    replace_atomically(file, lambda handle: handle.write(text.encode()))


def sweep_arguments(run: dict[str, Any], plan, study_dir: Path, budget: dict[str, Any], extra: list[str]) -> list[str]:
    """`cnnlab train`'s arguments for the study: the run's overrides (less what the options set), the
    options, seeds and epochs, the study folder, then the user's own overrides."""
    from cnnlab.analysis.remedy_study import BASELINE, GROUP, OPTIONS_DIR

    return [*(["--config-dir", run["config_dir"]] if run["config_dir"] else []), "-m", *plan.command_line,
            f"+{GROUP}={','.join([BASELINE, *plan.remedies])}",
            f"trainer.seed={','.join(map(str, budget['seeds']))}", f"trainer.epochs={budget['epochs']}",
            searchpath(study_dir / OPTIONS_DIR), f"hydra.sweep.dir={quoted(str(study_dir))}",
            "hydra.sweeper.params=null",  # an experiment file's sweep (the run's own values are on the line)
            *extra]


def nothing_to_remedy(run: dict[str, Any], plan, as_json: bool) -> int:
    warnings = plan.warnings
    why = ("nothing to remedy: the run has no warning" if not warnings else
           f"nothing to remedy: its warnings ({', '.join(warnings)}) propose no setting this run does not have already")
    if as_json:
        print(json.dumps({"run": str(run["path"]), "run_warnings": warnings, "baseline": None, "remedies": [],
                          "recommended": None, "cures_all": False, "verdict": why}, indent=2))
    else:
        print(f"{run['path']}: {why}.")
    return EXIT_OK


def report(run: dict[str, Any], plan, study_dir: Path, budget: dict[str, Any], as_json: bool) -> int:
    """The study's table (or JSON), remedy.json and remedy.png; EXIT_OK when every job ended."""
    from cnnlab.analysis.folders import find_runs
    from cnnlab.analysis.remedy_study import (
        compare_to_baseline,
        draw_study,
        outcomes,
        study_json,
        write_json,
    )
    from cnnlab.analysis.runs import read_overrides
    from cnnlab.cli.sweeps import sweep_jobs

    jobs = sweep_jobs(study_dir)
    folders = {folder for folder, _ in jobs}
    runs = [r for r in find_runs([str(study_dir)], warn=warn, jobs=jobs) if r.path.resolve() in folders]
    for name, missing in not_applied(runs, plan).items():
        warn(f"left out the remedy {name}: its jobs ran without {', '.join(missing)}")
        del plan.remedies[name]
    found = outcomes(runs, plan, todays_warnings)
    study = study_json(run["path"], plan, found, compare_to_baseline(found), budget, read_overrides(run["path"]))
    write_json(study_dir / "remedy.json", study)
    draw_study(study, study_dir / "remedy.png")
    if as_json:
        print(json.dumps(study, indent=2))
    else:
        print_study(study, study_dir)
    ended = all(status in (Status.COMPLETED, Status.DIVERGED) for r in runs for status in [r.status])
    return EXIT_OK if ended else EXIT_FAILED


def not_applied(runs: list, plan) -> dict[str, list[str]]:
    """The remedies whose jobs' recorded configs lack some of their settings (something of the sweep
    overrode them), with those settings."""
    from cnnlab.analysis.remedy_study import GROUP, applied

    found = {}
    for run in runs:
        remedy, record = plan.remedies.get(run.overrides.get(GROUP)), run.path / ".hydra"
        if not remedy or not (record / "config.yaml").is_file():
            continue
        try:
            config = yaml.safe_load((record / "config.yaml").read_text())
            choices = yaml.safe_load((record / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            continue  # a record it cannot read: its results stand as they are
        missing = applied(remedy, config, choices)
        if missing:
            found.setdefault(run.overrides[GROUP], missing)
    return found


def todays_warnings(run) -> list[str]:
    """The kinds of a job's warnings by today's rules, as `cnnlab inspect` finds them (the run itself is
    judged so too); a job not started has none."""
    from cnnlab.analysis.findings import WARNING
    from cnnlab.analysis.inspection import inspect_run
    from cnnlab.analysis.remedy_study import recorded_warnings

    if run.metrics is None:
        return []
    try:
        return list(dict.fromkeys(f.kind for f in inspect_run(run.path).findings if f.severity == WARNING))
    except UserError:  # its files cannot be read: what metrics.json says
        return recorded_warnings(run)


def print_study(study: dict[str, Any], study_dir: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    from cnnlab.analysis.remedy_study import settings_text
    from cnnlab.cli.console import console

    def acc(value: float | None, half: float | None) -> str:
        return "-" if value is None else f"{value:.4f}" + (f" ± {half:.4f}" if half is not None else "")

    base = study["baseline"]
    table = Table(title=f"remedies of {study['run']} ({study['epochs']} epochs, seeds "
                        f"{', '.join(map(str, study['seeds']))})", title_justify="left")
    for column in ("remedy", "cleared", "remaining", "new", "val acc", "Δ vs baseline", "p (Welch)", "s / run"):
        table.add_column(column)  # wrapped between words on a narrow terminal
    table.add_row("baseline (the run as it was)", "", ", ".join(base["warnings"]) or "none", "",
                  acc(base["val_acc"], base["val_acc_ci95"]), "", "", _number(base["seconds"], ".1f"), style="bold")
    for row in study["remedies"]:
        settings = settings_text(row["overrides"])
        star = " ★" if row["overrides"] == study["recommended"] else ""
        table.add_row(escape(settings) + star, ", ".join(row["cleared"]) or "-", ", ".join(row["remaining"]) or "-",
                      ", ".join(row["new"]) or "-", acc(row["val_acc"], row["val_acc_ci95"]),
                      _number(row["delta"], "+.4f"), _number(row["p"], ".3f"), _number(row["seconds"], ".1f"))
    output = console()
    output.print(table)
    output.print(f"recommended: {study['verdict']}", highlight=False, markup=False, soft_wrap=True)
    output.print(f"wrote {study_dir / 'remedy.json'}, {study_dir / 'remedy.png'}", highlight=False, markup=False,
                 soft_wrap=True)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)

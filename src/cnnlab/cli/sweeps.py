"""A sweep as a whole: its jobs (started or not) as Hydra's basic sweeper expands them, the summary
at its end, and the command's exit code for several jobs' statuses."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from omegaconf import OmegaConf

from cnnlab.cli.console import print_error
from cnnlab.cli.hydra_api import overrides_dirname
from cnnlab.errors import UserError
from cnnlab.status import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Status, exit_code


def sweep_lines(overrides: list) -> dict[str, list[str]]:
    """Each key's `key=value` overrides, one per value a job takes, in the order Hydra's basic sweeper
    applies them (a key given twice takes its last value); a sweep's jobs are their product, in
    Hydra's order. As BasicSweeper.split_arguments, with Hydra's public Override API. A sweep the
    basic sweeper cannot run (an interval) raises ValueError."""
    lines: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            lines[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            lines[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise ValueError(f"{override.input_line}: the basic sweeper runs lists and ranges, not intervals")
    return lines


def sweep_jobs(sweep_dir: Path) -> list[tuple[Path, dict[str, str]]]:
    """Every job of the sweep in sweep_dir, started or not: its folder and its overrides, as Hydra's
    basic sweeper expands multirun.yaml and names the folders. Empty when that cannot be read.
    hydra.sweep.subdir uses ${cnnlab_job_dir:...}, registered by cnnlab.cli.folders (which the
    package imports)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.utils import setup_globals

    try:
        cfg = OmegaConf.load(sweep_dir / "multirun.yaml")
        setup_globals()  # the ${now:...} resolver, should a folder name use it
        parser = OverridesParser.create()
        params = [f"{key}={value}" for key, value in (cfg.hydra.sweeper.params or {}).items()]
        lines = sweep_lines(parser.parse_overrides([*params, *OmegaConf.to_container(cfg.hydra.overrides.task)]))
        naming = cfg.hydra.job.config.override_dirname
        jobs = []
        for num, overrides in enumerate(itertools.product(*lines.values())):
            cfg.hydra.job.num = num
            cfg.hydra.job.override_dirname = overrides_dirname(
                parser.parse_overrides(list(overrides)), list(naming.exclude_keys), naming.item_sep, naming.kv_sep)
            folder = (sweep_dir / str(cfg.hydra.sweep.subdir)).resolve()
            jobs.append((folder, {key.lstrip("+~"): value for key, _, value in (o.partition("=") for o in overrides)}))
        return jobs
    except Exception:  # not a sweep of Hydra's basic sweeper: its job folders are all there is to show
        return []


def summarise_sweep(sweep_dir: Path) -> int:
    """The table of every job (`missing`: never started), summary.csv and summary.json in the sweep
    directory; the exit code."""
    from cnnlab.analysis.folders import find_runs
    from cnnlab.analysis.summary import print_summary, write_summary
    from cnnlab.cli.console import console

    try:  # every job, as the command line listed them; those not started as `missing`
        runs = find_runs([str(sweep_dir)], jobs=sweep_jobs(sweep_dir))
    except UserError:  # neither a job folder nor a job list to read
        runs = []
    print_summary(console(), runs, title=f"sweep {sweep_dir}: {len(runs)} jobs")
    write_summary(sweep_dir, runs)
    not_completed = [f"{run.name} ({run.status})" for run in runs if run.status != Status.COMPLETED]
    if not_completed:
        print_error(f"{len(not_completed)} of {len(runs)} jobs did not complete: {'; '.join(not_completed)}.")
    return exit_code_of([run.status for run in runs])


def launcher_worker_died(error: Exception) -> bool:
    """Whether the joblib launcher stopped because one of its worker processes died (killed, out of
    memory): loky then kills the other workers and cancels every job not yet started."""
    try:
        from joblib.externals.loky.process_executor import TerminatedWorkerError
    except ImportError:  # no joblib launcher installed
        return False
    return isinstance(error, TerminatedWorkerError)


def worker_death_message(error: Exception, sweep_dir: Path) -> str:
    """What a sweep whose joblib worker died says after its summary: which jobs stopped, which never
    started, and the command that finishes them. hydra-joblib-launcher hands the jobs to one
    joblib.Parallel call, which ends at the first worker's death: no job can go on past it, and which
    of the running jobs was the dead worker's is not known (all of them were killed the same way)."""
    from cnnlab.analysis.folders import find_runs

    codes = re.search(r"exit codes of the workers are (\{[^}]*\})", str(error))
    try:
        runs = find_runs([str(sweep_dir)], warn=lambda message: None, jobs=sweep_jobs(sweep_dir))
    except UserError:
        runs = []
    stopped = [run.name for run in runs if run.status == Status.RUNNING]
    missing = [run.name for run in runs if run.status == Status.MISSING]
    return (f"a worker process of the joblib launcher died (exit code {codes.group(1) if codes else 'unknown'}: "
            f"killed, or out of memory), and joblib stops the whole sweep with it: "
            f"{'; '.join(stopped) or 'no job'} {'was' if len(stopped) == 1 else 'were'} running and stopped "
            f"(the dead worker's job among them), {len(missing)} job{'' if len(missing) == 1 else 's'} never started. "
            f"Run the same sweep command again to finish it: completed and diverged jobs are kept, stopped ones "
            f"continue from their last checkpoint, the others start.")


def exit_code_of(statuses: list[Status | str]) -> int:
    """One run: its own code. Several: 0 if all completed, 2 if the rest were all rejected configs,
    130 if interrupted, else 1."""
    if len(statuses) == 1:
        known = statuses[0] in {status.value for status in Status}  # metrics.json may say anything
        return exit_code(statuses[0]) if known else EXIT_FAILED
    if Status.INTERRUPTED in statuses:
        return EXIT_INTERRUPTED
    if any(status not in (Status.COMPLETED, Status.INVALID) for status in statuses):
        return EXIT_FAILED
    return EXIT_USAGE if Status.INVALID in statuses else EXIT_OK

"""`cnnlab train`: cnnlab's own --help, the config check before Hydra, the run or sweep folder, then
Hydra runs each job while SIGINT and SIGTERM stop it cleanly; the exit code says how it went."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from cnnlab.cli.console import print_error
from cnnlab.cli.folders import (expand_home, fix_sweep_dir, name_jobs_by_swept_overrides, place_single_run,
                                record_config_after_lock)
from cnnlab.cli.hydra_api import parse_arguments
from cnnlab.cli.job import run_job
from cnnlab.cli.precheck import check_config_before_hydra
from cnnlab.cli.sweeps import exit_code_of, launcher_worker_died, summarise_sweep, worker_death_message
from cnnlab.config import config_dir
from cnnlab.errors import MissingTool, UserError, one_line
from cnnlab.status import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Status
from cnnlab.train.stops import SweepStop, sigterm_as_interrupt, stoppable

Task = Callable[[DictConfig], Any]  # what Hydra runs for each job


def train_command(args: list[str], job: Task | None = None) -> int:
    """`cnnlab train ARGS`; `job` runs each job (by default run_job, given the configs the check
    before Hydra has validated)."""
    args = expand_home(args)
    parsed = parse_arguments(args)
    if parsed.help:  # cnnlab's own: the settings with their comments (--hydra-help is Hydra's)
        return show_help(parsed.config_dir)
    sweep_dir, record_subdir = None, None
    try:
        with sigterm_as_interrupt():  # a long sweep's check may be stopped like the run it precedes
            validated = check_config_before_hydra(args)
            if parsed.multirun:
                args = name_jobs_by_swept_overrides(args)
                args, sweep_dir = fix_sweep_dir(args)
            elif not (parsed.cfg or parsed.info or parsed.hydra_help):
                args = place_single_run(args, parsed.overrides)
            if not (parsed.cfg or parsed.info or parsed.hydra_help or parsed.shell_completion):
                check_torch_loads()  # before Hydra makes a folder
        if not (parsed.cfg or parsed.info or parsed.hydra_help):
            args, record_subdir = record_config_after_lock(args)
    except UserError as error:
        print_error(str(error))
        return EXIT_FAILED if isinstance(error, MissingTool) else EXIT_USAGE
    except KeyboardInterrupt:
        print_error("interrupted during the pre-check (the config check before Hydra starts); nothing was started.")
        return EXIT_INTERRUPTED
    statuses: list[Status] = []  # of the jobs run in this process: a single run's exit code
    task = recording_statuses(statuses, job or (lambda cfg: run_job(cfg, validated, record_subdir)))
    code = run_hydra(args, task, sweep_dir, statuses)
    if code is not None:
        return code
    return exit_code_of(statuses)


def check_torch_loads() -> None:
    """torch, imported now rather than in the first job: a machine where it cannot load (an address-space
    limit too low for its libraries, a broken install) is one message before anything starts."""
    import resource

    try:
        import torch  # noqa: F401
    except (ImportError, OSError) as error:
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        hint = (f" The address-space limit (ulimit -v) is {limit / 2**20:,.0f} MB, too little for torch's libraries: "
                f"raise it (ulimit -v unlimited)." if limit != resource.RLIM_INFINITY else "")
        raise MissingTool(f"torch cannot be loaded: {one_line(error, 200)}.{hint} Nothing has run.") from None


def show_help(user_config_dir: str | None) -> int:
    """`cnnlab train --help`: every setting with its default and comment, from the YAML files."""
    from cnnlab.cli.trainhelp import print_train_help

    try:
        print_train_help([*([Path(user_config_dir)] if user_config_dir else []), config_dir()])
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`, or a pager closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def recording_statuses(statuses: list[Status], job: Task) -> Task:
    """job for Hydra, noting each job's status in `statuses` (raised or returned) for the exit code."""
    def recorded(cfg: DictConfig) -> Any:
        try:
            status = job(cfg)
        except Exception:
            statuses.append(Status.FAILED)
            raise
        except BaseException:
            statuses.append(Status.INTERRUPTED)
            raise
        statuses.append(status)
        return status

    return recorded


def run_hydra(args: list[str], task: Task, sweep_dir: Path | None, statuses: list[Status]) -> int | None:
    """Hydra's run of `task` with these arguments: a sweep (sweep_dir) ends with its summary, and stops
    job by job on SIGINT or SIGTERM (SweepStop); a single run stops by itself (the trainer's
    StopRequest), and a signal while Hydra starts ends the command like Ctrl-C. The exit code, or None
    where the jobs' statuses say it."""
    import hydra

    saved_argv, saved_full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = ["cnnlab train", *args]  # Hydra reads its arguments from sys.argv
    if sweep_dir is not None:  # an error of the launcher (a joblib worker killed) reaches us, not Hydra's traceback
        os.environ["HYDRA_FULL_ERROR"] = "1"
    stop = SweepStop(sweep_dir) if sweep_dir is not None else None
    try:
        with stop or sigterm_as_interrupt():
            hydra.main(version_base=None, config_path=str(config_dir()), config_name="train")(
                stoppable(task, stop.stop_file) if stop else task)()
    except Exception as error:  # in a sweep: the launcher (or Hydra) failed, and the sweep stopped
        if stop is None:
            raise  # a single run under the user's own HYDRA_FULL_ERROR: the traceback asked for
        return sweep_stopped_by(error, sweep_dir, stop, statuses)
    except KeyboardInterrupt:
        if sweep_dir is not None and sweep_dir.is_dir():
            summarise_sweep(sweep_dir)
        elif sweep_dir is None:
            print_error("stopped at once by a signal (while the run was starting, or a second Ctrl-C); the "
                        "last checkpoint, if there is one, is kept.")
        else:
            print_error("stopped by a signal while Hydra was starting the sweep; no job was started.")
        return EXIT_INTERRUPTED
    except SystemExit as exit:
        if exit.code not in (0, None) and not statuses and not (sweep_dir and sweep_dir.is_dir()):
            return EXIT_USAGE  # Hydra rejected the arguments or the config before any job ran
        if exit.code not in (0, None) and sweep_dir is None:
            return EXIT_FAILED
    finally:
        sys.argv = saved_argv
        restore_environment("HYDRA_FULL_ERROR", saved_full_error)
        if sweep_dir is not None:
            release_joblib_workers()
    if sweep_dir is not None and sweep_dir.is_dir():
        code = summarise_sweep(sweep_dir)
        return EXIT_INTERRUPTED if stop.signum is not None and code != EXIT_OK else code
    return None


def sweep_stopped_by(error: Exception, sweep_dir: Path, stop: SweepStop, statuses: list[Status]) -> int:
    """A sweep whose launcher failed: the summary of its jobs, what happened and what to do, in place
    of Hydra's traceback; the exit code."""
    from hydra.errors import CompactHydraException

    if stop.signum is not None:  # stopped by a signal, which ended joblib's workers: no error of its own
        summarise_sweep(sweep_dir)
        return EXIT_INTERRUPTED
    if isinstance(error, CompactHydraException):  # as Hydra reports it: a message, no traceback
        print_error(one_line(error, 1000))
    elif launcher_worker_died(error):
        summarise_sweep(sweep_dir)
        print_error(worker_death_message(error, sweep_dir))
        return EXIT_FAILED
    else:
        traceback.print_exception(error)
    return EXIT_FAILED if statuses or sweep_dir.is_dir() else EXIT_USAGE


def release_joblib_workers() -> None:
    """Stop the worker processes joblib keeps for its next call, if this process started any. A later
    sweep in the same process (`cnnlab remedy` after a sweep, a notebook, the tests) would otherwise get
    them back: each still in the folder it started in, where Hydra makes a relative job folder absolute,
    so its jobs would land in an earlier sweep's working folder."""
    loky = sys.modules.get("joblib.externals.loky")
    if loky is not None:
        loky.get_reusable_executor().shutdown(wait=True)


def restore_environment(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value

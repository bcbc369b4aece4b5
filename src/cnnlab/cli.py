"""The command line, `cnnlab train | compare | activations`: the only module that knows about Hydra.

Nothing here imports torch: `--help`, `--cfg job` and config mistakes answer before it is loaded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnnlab import __version__
from cnnlab.errors import UserError

# 0: every run completed; 1: a run failed (bad data, no device, a crash), or a sweep job did not
# complete; 2: the command line or the config was rejected before training started; 3: the loss or
# the gradients became non-finite; 130: stopped by SIGINT or SIGTERM, with a checkpoint to resume from.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

USAGE = f"""\
cnnlab {__version__}: train small classifiers from YAML configs and see why they train well or badly.

usage: cnnlab COMMAND [ARGS...]

commands:
  train        train a classifier; everything after `train` is Hydra's (overrides, -m, --cfg job, --help)
  compare      compare runs or sweeps: table, summary.csv/json, PNG figures (`cnnlab compare --help`)
  activations  the available activations, with --plot FILE to draw them and their derivatives

examples:
  cnnlab train model=convnet activation=leaky_relu
  cnnlab train -m activation=relu,leaky_relu,elu,selu,gelu trainer.seed=0,1,2
  cnnlab train -m experiment=relu_variants
  cnnlab compare outputs/multirun/2026-11-22/10-31-07-123456
  cnnlab train --help
  tensorboard --logdir outputs
"""


def config_dir() -> Path:
    """configs/ inside an installed wheel, or at the top of a source checkout (editable install)."""
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs"


def _job_dir(override_dirname: str, job_num: Any) -> str:
    return override_dirname or f"job{job_num}"


OmegaConf.register_new_resolver("cnnlab_job_dir", _job_dir, replace=True)


def _hydra_arguments(args: list[str]):
    from hydra._internal.utils import get_args_parser

    parsed, _ = get_args_parser().parse_known_args(args)
    return parsed


def name_jobs_by_swept_overrides(args: list[str]) -> list[str]:
    """In a multirun, keep overrides shared by every job out of the job directory names.

    Hydra names a job by all of its overrides (`hydra.job.override_dirname`); a shared
    `dataset.root=/data/x` would make every name long and, with its slashes, nest folders.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = _hydra_arguments(args).overrides
    if any(a.startswith("hydra.job.config.override_dirname") for a in overrides):
        return args
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra reports malformed overrides itself, with its own message
        return args
    shared = [o.get_key_element() for o in parsed if not o.is_sweep_override() and not o.is_hydra_override()]
    if not shared:
        return args
    quoted = ",".join("'" + key.replace("'", "\\'") + "'" for key in shared)
    return [*args, f"hydra.job.config.override_dirname.exclude_keys=[{quoted}]"]


def _default_dir(kind: str) -> str:
    """hydra.run.dir or hydra.sweep.dir as train.yaml's template gives it now."""
    from hydra.core.utils import setup_globals

    setup_globals()  # registers Hydra's ${now:...} resolver
    template = OmegaConf.to_container(OmegaConf.load(config_dir() / "train.yaml").hydra[kind])["dir"]
    return str(OmegaConf.create({"dir": template}).dir)


def check_writable(setting: str, directory: Path) -> None:
    """Fail before Hydra does (with a traceback) when the output directory cannot be created."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{setting}={str(directory)!r} cannot be created: {existing} is a file, not a folder. "
                        f"Choose another folder with {setting}=PATH.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{setting}={str(directory)!r} cannot be created: {existing} is not writable. "
                        f"Choose another folder with {setting}=PATH.")


def fix_sweep_dir(args: list[str]) -> tuple[list[str], Path]:
    """The sweep directory, decided here (from hydra.sweep.dir on the command line, else from the
    template in train.yaml) and passed to Hydra, so that the CLI can summarise the sweep afterwards
    whichever launcher ran the jobs."""
    given = [arg.partition("=")[2] for arg in _hydra_arguments(args).overrides if arg.startswith("hydra.sweep.dir=")]
    sweep_dir = Path(given[-1]) if given else Path(_default_dir("sweep"))
    check_writable("hydra.sweep.dir", sweep_dir)
    return (args if given else [*args, f"hydra.sweep.dir={sweep_dir}"]), sweep_dir


def place_single_run(args: list[str], overrides: list[str]) -> list[str]:
    """`resume=DIR` runs in DIR itself, and Hydra must not rewrite DIR/.hydra (the record of the
    run's config). A new run must not land in a folder that already holds one, nor where it cannot
    be written."""
    from cnnlab.rundir import last_checkpoint

    values = dict(arg.partition("=")[::2] for arg in overrides if "=" in arg)
    if values.get("resume") not in (None, "", "null"):
        run_dir = Path(values["resume"]).expanduser()
        if not last_checkpoint(run_dir).is_file() or not (run_dir / ".hydra").is_dir():
            raise UserError(
                f"resume={values['resume']!r} is not a run directory with a checkpoint (looked for "
                f"{last_checkpoint(run_dir)} and {run_dir / '.hydra'}). Pass the folder of a "
                f"run, e.g. resume=outputs/2026-11-22/10-31-07-123456.")
        return [*args, f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]
    given = values.get("hydra.run.dir")
    run_dir = Path(given) if given else Path(_default_dir("run"))
    if last_checkpoint(run_dir).is_file():
        raise UserError(
            f"hydra.run.dir={str(run_dir)!r} already holds a run; its results are kept. Continue it with "
            f"resume={run_dir}, or choose another directory.")
    check_writable("hydra.run.dir", run_dir)
    return args if given else [*args, f"hydra.run.dir={run_dir}"]


def threads_per_job(n_jobs: int, cores: int) -> int:
    """CPU threads per job when joblib runs n_jobs at once (joblib's -1 = all cores, -2 = all but one)."""
    parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
    return max(1, cores // parallel)


def _print_error(message: str, job: str = "") -> None:
    from rich.console import Console

    prefix = f"cnnlab: job {job} failed: " if job else "cnnlab: error: "
    Console(stderr=True).print(prefix + message, style="red", markup=False, highlight=False, soft_wrap=True)


# Settings a resumed run may change: where and how fast it runs, and for how long (without a
# schedule planned for the original length). Anything else would make it a different run.
RESUMABLE = ("trainer.epochs", "trainer.device", "trainer.threads", "trainer.log_every", "trainer.checkpoint_every")


def resumed_config(run_dir: Path, task_overrides: list[str]) -> DictConfig:
    """The composed config of the run in run_dir, with the command line's allowed overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"resume={str(run_dir)!r} is not a cnnlab run directory: {saved} is missing.")
    cfg = OmegaConf.load(saved)
    for override in OverridesParser.create().parse_overrides(list(task_overrides)):
        key = override.key_or_group
        if key == "resume":
            continue
        if key not in RESUMABLE:
            raise UserError(
                f"resume: {key} cannot change when a run is resumed (it would make it a different run). "
                f"Settings a resumed run may change: {', '.join(RESUMABLE)}.")
        if key == "trainer.epochs" and cfg.scheduler.name != "none":
            raise UserError(
                f"resume: trainer.epochs cannot change for a run with scheduler={cfg.scheduler.name}: its "
                f"schedule was planned for {cfg.trainer.epochs} epochs.")
        OmegaConf.update(cfg, key, override.value())
    cfg.resume = None
    if cfg != OmegaConf.load(saved):  # keep the record of the run's config true (a longer run, say)
        OmegaConf.save(cfg, saved)
    return cfg


def prepare_job(cfg: DictConfig, run_dir: Path, task_overrides: list[str]) -> tuple[DictConfig, bool, str | None]:
    """(the config to run, whether it resumes, the status when there is nothing to run): `resume=DIR`,
    or the same job run again in its own folder (a requeued cluster job, or a sweep rerun)."""
    from cnnlab.rundir import last_checkpoint, read_metrics_or_none

    if cfg.get("resume"):
        return resumed_config(Path(cfg.resume), task_overrides), True, None
    if last_checkpoint(run_dir).is_file():
        status = (read_metrics_or_none(run_dir) or {}).get("status")
        if status in ("completed", "diverged"):
            print(f"cnnlab: {run_dir} already ended ({status}); its results are kept.")
            return cfg, False, status
        return cfg, True, None
    return cfg, False, None


def run_job(cfg: DictConfig) -> str:
    """One Hydra job: validate the config, then train; returns the job's status. A user mistake is
    reported, not raised; in a sweep, so is any other failure, so that the remaining jobs still run."""
    import traceback

    from hydra.core.hydra_config import HydraConfig

    from cnnlab.config import validate
    from cnnlab.rundir import CHECKPOINT_DIR, write_metrics

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode.name == "MULTIRUN"
    job = f"#{hydra_cfg.job.num} ({','.join(hydra_cfg.overrides.task)})" if multirun else ""
    resume = False
    try:
        cfg, resume, ended = prepare_job(cfg, run_dir, list(hydra_cfg.overrides.task))
        if ended is not None:
            return ended
        run = validate(cfg)
    except UserError as error:
        _print_error(str(error), job)
        if not resume and not (run_dir / CHECKPOINT_DIR).exists():
            write_metrics(run_dir, {"status": "invalid", "error": str(error)})
        return "invalid"
    n_jobs = (hydra_cfg.get("launcher") or {}).get("n_jobs")
    if run.trainer.threads is None and isinstance(n_jobs, int):
        run.trainer.threads = threads_per_job(n_jobs, os.cpu_count() or 1)
    from cnnlab.trainer import Diverged, Interrupted, train  # torch: only once the config is known to be good

    try:
        return train(run, run_dir, OmegaConf.to_container(cfg, resolve=True), resume=resume)["status"]
    except UserError as error:  # bad data or device: the trainer has recorded it in metrics.json
        _print_error(str(error), job)
        return "failed"
    except Diverged as error:
        _print_error(f"{error}. The last good checkpoint is kept in {run_dir / CHECKPOINT_DIR}; try a lower "
                     f"optimizer.lr, trainer.grad_clip, or trainer.on_nonfinite=skip.", job)
        return "diverged"
    except Interrupted as error:
        _print_error(f"{error}, with a checkpoint; continue with: cnnlab train resume={run_dir}", job)
        if multirun:
            raise KeyboardInterrupt from None  # stopping one job stops the sweep
        return "interrupted"
    except Exception as error:
        if not multirun:
            raise
        # One job's crash must not end the sweep: one line now, the traceback in the job's folder.
        (run_dir / "traceback.txt").write_text(traceback.format_exc())
        _print_error(f"{type(error).__name__}: {error} (traceback in {run_dir / 'traceback.txt'})", job)
        return "failed"


def recording_statuses(statuses: list[str]):
    """run_job for Hydra, noting each job's status in `statuses` (raised or returned) for the exit code."""
    def job(cfg: DictConfig) -> str:
        try:
            status = run_job(cfg)
        except Exception:
            statuses.append("failed")
            raise
        except BaseException:
            statuses.append("interrupted")
            raise
        statuses.append(status)
        return status

    return job


def _exit_code(statuses: list[str]) -> int:
    """One run: its own code. Several: 0 if all completed, 2 if the rest were all rejected configs,
    130 if interrupted, else 1."""
    codes = {"completed": EXIT_OK, "invalid": EXIT_USAGE, "diverged": EXIT_DIVERGED, "interrupted": EXIT_INTERRUPTED}
    if len(statuses) == 1:
        return codes.get(statuses[0], EXIT_FAILED)
    if "interrupted" in statuses:
        return EXIT_INTERRUPTED
    if any(status not in ("completed", "invalid") for status in statuses):
        return EXIT_FAILED
    return EXIT_USAGE if "invalid" in statuses else EXIT_OK


def summarise_sweep(sweep_dir: Path) -> int:
    """The table of every job, summary.csv and summary.json in the sweep directory; the exit code."""
    from rich.console import Console

    from cnnlab.compare import find_runs, print_summary, write_summary

    runs = find_runs([str(sweep_dir)])
    print_summary(Console(), runs, title=f"sweep {sweep_dir}: {len(runs)} jobs")
    write_summary(sweep_dir, runs)
    not_completed = [f"{run.name} ({run.status})" for run in runs if run.status != "completed"]
    if not_completed:
        _print_error(f"{len(not_completed)} of {len(runs)} jobs did not complete: {'; '.join(not_completed)}.")
    return _exit_code([run.status for run in runs])


def train_command(args: list[str]) -> int:
    import hydra

    sweep_dir = None
    parsed = _hydra_arguments(args)
    try:
        if parsed.multirun:
            args = name_jobs_by_swept_overrides(args)
            args, sweep_dir = fix_sweep_dir(args)
        elif not (parsed.help or parsed.cfg or parsed.info or parsed.hydra_help):
            args = place_single_run(args, parsed.overrides)
    except UserError as error:
        _print_error(str(error))
        return EXIT_USAGE
    saved_argv = sys.argv
    sys.argv = ["cnnlab train", *args]  # Hydra reads its arguments from sys.argv
    statuses: list[str] = []  # of the jobs run in this process: a single run's exit code
    try:
        hydra.main(version_base=None, config_path=str(config_dir()), config_name="train")(recording_statuses(statuses))()
    except KeyboardInterrupt:
        if sweep_dir is not None and sweep_dir.is_dir():
            summarise_sweep(sweep_dir)
        return EXIT_INTERRUPTED
    except SystemExit as exit:
        if exit.code not in (0, None) and not statuses and not (sweep_dir and sweep_dir.is_dir()):
            return EXIT_USAGE  # Hydra rejected the arguments or the config before any job ran
        if exit.code not in (0, None) and sweep_dir is None:
            return EXIT_FAILED
    finally:
        sys.argv = saved_argv
    if sweep_dir is not None and sweep_dir.is_dir():
        return summarise_sweep(sweep_dir)
    return _exit_code(statuses)


def compare_command(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="cnnlab compare",
        description="Compare runs: a table, summary.csv and summary.json, and PNG figures (also in TensorBoard).")
    parser.add_argument("paths", nargs="+", help="sweep directories, run directories, or glob patterns of them")
    parser.add_argument("--out", help="where to write the summary and figures (default: the sweep directory "
                                      "when one is given, else ./comparison)")
    options = parser.parse_args(args)
    from rich.console import Console

    from cnnlab.compare import find_runs, make_figures, print_summary, write_summary

    try:
        runs = find_runs(options.paths)
    except UserError as error:
        _print_error(str(error))
        return EXIT_USAGE
    single = Path(options.paths[0])
    default_out = single if len(options.paths) == 1 and single.is_dir() and not (single / ".hydra").is_dir() else Path("comparison")
    out = Path(options.out) if options.out else default_out
    console = Console()
    print_summary(console, runs, title=f"{len(runs)} runs")
    written = [*write_summary(out, runs), *make_figures(runs, out)]
    console.print("wrote " + ", ".join(str(path) for path in written), highlight=False, markup=False, soft_wrap=True)
    return EXIT_OK


def activations_command(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="cnnlab activations",
                                     description="The activations cnnlab offers: a table, and optionally a plot.")
    parser.add_argument("--plot", metavar="FILE", help="draw each function and its derivative on [-5, 5] into FILE (PNG)")
    options = parser.parse_args(args)
    from rich.console import Console
    from rich.table import Table

    from cnnlab.models import ACTIVATIONS

    table = Table(title="activation=NAME", title_justify="left")
    for column in ("name", "formula", "range", "settings (default)", "typical use"):
        table.add_column(column, overflow="fold")
    for name, row in ACTIVATIONS.items():
        table.add_row(name, row.formula, row.output_range, row.settings, row.typical_use)
    Console().print(table)
    if options.plot:
        from cnnlab.models import plot_activations

        plot_activations(Path(options.plot))
        print(f"wrote {options.plot}")
    return EXIT_OK


COMMANDS = {"train": train_command, "compare": compare_command, "activations": activations_command}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        sys.exit(EXIT_OK if argv else EXIT_USAGE)
    if argv[0] == "--version":
        print(f"cnnlab {__version__}")
        sys.exit(EXIT_OK)
    command = COMMANDS.get(argv[0])
    if command is None:
        _print_error(f"unknown command '{argv[0]}'. Valid commands: {', '.join(COMMANDS)}. See `cnnlab --help`.")
        sys.exit(EXIT_USAGE)
    sys.exit(command(argv[1:]))

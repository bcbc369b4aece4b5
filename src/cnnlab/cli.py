"""The command line, `cnnlab train [OVERRIDES]`: the only module that knows about Hydra.

Nothing here imports torch: `--help`, `--cfg job` and config mistakes answer before it is loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnnlab import __version__
from cnnlab.errors import UserError

# 0: every run completed; 1: a run failed (bad data, no device, a crash);
# 2: the command line or the config was rejected before any training started.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

USAGE = f"""\
cnnlab {__version__}: train small classifiers from YAML configs and see why they train well or badly.

usage: cnnlab COMMAND [ARGS...]

commands:
  train     train a classifier; everything after `train` is Hydra's (overrides, -m, --cfg job, --help)

examples:
  cnnlab train model=convnet activation=leaky_relu
  cnnlab train -m activation=relu,leaky_relu,elu,selu,gelu
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


def name_jobs_by_swept_overrides(args: list[str]) -> list[str]:
    """In a multirun, keep overrides shared by every job out of the job directory names.

    Hydra names a job by all of its overrides (`hydra.job.override_dirname`); a shared
    `dataset.root=/data/x` would make every name long and, with its slashes, nest folders.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed, _ = get_args_parser().parse_known_args(args)
    if not parsed.multirun or any(a.startswith("hydra.job.config.override_dirname") for a in parsed.overrides):
        return args
    try:
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except Exception:  # Hydra reports malformed overrides itself, with its own message
        return args
    shared = [o.get_key_element() for o in overrides if not o.is_sweep_override() and not o.is_hydra_override()]
    if not shared:
        return args
    quoted = ",".join("'" + key.replace("'", "\\'") + "'" for key in shared)
    return [*args, f"hydra.job.config.override_dirname.exclude_keys=[{quoted}]"]


# Outcomes of the jobs run in this process, for the exit code.
_outcomes: list[str] = []


def _print_error(message: str, job: str = "") -> None:
    from rich.console import Console

    prefix = f"cnnlab: error in job {job}: " if job else "cnnlab: error: "
    Console(stderr=True).print(prefix + message, style="red", markup=False, highlight=False, soft_wrap=True)


def run_job(cfg: DictConfig) -> str:
    """One Hydra job: validate the config, then train. A user mistake is reported, not raised."""
    from hydra.core.hydra_config import HydraConfig

    from cnnlab.config import validate
    from cnnlab.rundir import write_metrics

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    job = ",".join(hydra_cfg.overrides.task) if hydra_cfg.mode.name == "MULTIRUN" else ""
    try:
        run = validate(cfg)
    except UserError as error:
        _print_error(str(error), job)
        write_metrics(run_dir, {"status": "invalid", "error": str(error)})
        _outcomes.append("invalid")
        return "invalid"
    try:
        from cnnlab.trainer import train  # torch is imported only once the config is known to be good

        status = train(run, run_dir, OmegaConf.to_container(cfg, resolve=True))["status"]
    except UserError as error:  # bad data or device: the trainer has recorded it in metrics.json
        _print_error(str(error), job)
        status = "failed"
    except BaseException:
        _outcomes.append("failed")
        raise
    _outcomes.append(status)
    return status


def train_command(args: list[str]) -> int:
    import hydra

    args = name_jobs_by_swept_overrides(args)
    saved_argv = sys.argv
    sys.argv = ["cnnlab train", *args]  # Hydra reads its arguments from sys.argv
    _outcomes.clear()
    try:
        hydra.main(version_base=None, config_path=str(config_dir()), config_name="train")(run_job)()
    except SystemExit as exit:
        if exit.code not in (0, None) and not _outcomes:
            return EXIT_USAGE  # Hydra rejected the arguments or the config before any job ran
        if exit.code not in (0, None):
            return EXIT_FAILED
    finally:
        sys.argv = saved_argv
    if any(status not in ("completed", "invalid") for status in _outcomes):
        return EXIT_FAILED
    return EXIT_USAGE if "invalid" in _outcomes else EXIT_OK


COMMANDS = {"train": train_command}


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

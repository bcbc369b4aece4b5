"""What a config file may set in Hydra's own node (`hydra.*`), and what the command line may. Config
files, experiment files and `--config-dir` folders may come from someone else: they choose among
what cnnlab offers and nothing else. Hydra acts on its node before any job starts (log files, the
launcher's shell commands, where runs and their .hydra/ records go), so a file may set only the
settings of FILE_SETTINGS, each with its rule; every other Hydra setting keeps the value cnnlab's
configs/ and Hydra's own options give it, unless the user's own command line changes it. No torch here."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnlab.errors import UserError

NOTHING_RAN = "Nothing has run and no folder was made."
PLAIN = re.compile(r"[\w.,:@%+|&=-]*")  # a word for sbatch or joblib: no spaces, quotes, `$` or new lines
# What a file's path may hold that resolves only in a running job: a job's number or id, and the job
# folder name train.yaml uses (cnnlab_job_dir makes it one safe component). Any other `${...}` that
# cannot resolve before the job runs (`${hydra:runtime.cwd}`) is refused: its value is unknown here.
IN_A_JOB = re.compile(r"\$\{(hydra\.job\.(num|id)|cnnlab_job_dir:\$\{hydra\.job\.override_dirname\},\$\{hydra\.job\.num\})\}")


def _under_outputs(value: Any) -> bool:
    parts = PurePosixPath(str(value)).parts
    return isinstance(value, str) and len(parts) > 1 and parts[0] == "outputs" and ".." not in parts \
        and "${" not in value


def _inside(value: Any) -> bool:
    """A relative path that stays inside its parent folder."""
    path = PurePosixPath(str(value))
    return isinstance(value, str) and value.strip() not in ("", ".") and not path.is_absolute() \
        and ".." not in path.parts and not value.startswith("~") and "${" not in value


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and PLAIN.fullmatch(value))


def _name(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"\w[\w.-]*", value) is not None


def _swept_settings(value: Any) -> bool:
    """hydra.sweeper.params: each key becomes an override of every job; none may reach Hydra's node."""
    return value is None or (isinstance(value, dict) and not any(
        str(key).strip().lstrip("+~").strip().startswith("hydra") for key in value))


# The launchers' resources (hydra/launcher=joblib, submitit_local, submitit_slurm): numbers and words.
# Their commands and paths (setup, srun_args, additional_parameters, submitit_folder, temp_folder,
# pre_dispatch) only from the command line.
LAUNCHER_RESOURCES = ("n_jobs", "prefer", "verbose", "timeout", "batch_size", "timeout_min", "nodes",
                      "tasks_per_node", "cpus_per_task", "gpus_per_node", "mem_gb", "partition", "qos",
                      "constraint", "gres", "account", "cpus_per_gpu", "gpus_per_task", "mem_per_gpu",
                      "mem_per_cpu", "array_parallelism", "max_num_timeout", "signal_delay_s", "stderr_to_stdout")
# What a config file may set in `hydra`: the setting, what it must be, and the rule (on its resolved value).
FILE_SETTINGS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "hydra.run.dir": ("a folder under outputs/ (no ..)", _under_outputs),
    "hydra.sweep.dir": ("a folder under outputs/ (no ..)", _under_outputs),
    "hydra.sweep.subdir": ("a relative path inside the sweep folder (no ..)", _inside),
    "hydra.job.name": ("a plain name (letters, digits, _ . -)", _name),
    "hydra.job.chdir": ("true or false", lambda value: value is None or isinstance(value, bool)),
    "hydra.sweeper.params": ("settings to sweep, none of them under hydra", _swept_settings),
    **{f"hydra.launcher.{key}": ("a number or a word without spaces", _plain) for key in LAUNCHER_RESOURCES},
}
# Set by Hydra's config loader itself whatever the files say.
LOADER_SET = ("hydra.runtime", "hydra.overrides", "hydra.job.override_dirname", "hydra.job.config_name")


def file_settings_text() -> str:
    """The allowlist, for messages: `hydra.run.dir, hydra.sweep.dir, ..., hydra.launcher.RESOURCE`."""
    own = [key for key in FILE_SETTINGS if not key.startswith("hydra.launcher.")]
    return f"{', '.join(own)} and the launcher's resources ({', '.join(LAUNCHER_RESOURCES)})"


def hydra_choices(cfg: DictConfig) -> list[str]:
    """The options of Hydra's own groups the composition chose (`hydra/launcher=joblib`), as overrides."""
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    return [f"{group}={option}" for group, option in choices.items() if group.startswith("hydra/") and option]


def refuse_foreign_hydra_options(choices: list[str], job: str = "") -> None:
    """Options of Hydra's groups (hydra/launcher=mine) that Hydra does not have: a config folder's file."""
    if choices:
        raise UserError(f"{' '.join(choices)}{job}: Hydra's groups (hydra/launcher, hydra/job_logging, ...) take "
                        f"Hydra's own options only, never a config folder's file. {NOTHING_RAN}")


def refuse_overrides_from_files(cfg: DictConfig, given: list[str], job: str = "",
                                file: Callable[[str], str | None] = lambda key: None) -> None:
    """hydra.overrides holds the overrides cfg was composed with (`given`), which Hydra adds to what the
    files hold there: a file's own would be applied to every job of a sweep, as if typed."""
    overrides = OmegaConf.to_container(cfg.hydra.overrides, resolve=False)  # as typed: `${oc.env:...}` unresolved
    recorded = [*overrides["hydra"], *overrides["task"]]
    if sorted(recorded) != sorted(given):
        added = [line for line in recorded if line not in given]
        raise UserError(f"hydra.overrides={added!r}{job} comes from {file('hydra.overrides') or 'a config file'}; "
                        f"overrides come only from the command line. {NOTHING_RAN}")


def refuse_hydra_settings_from_files(cfg: DictConfig, reference: DictConfig, job: str = "",
                                     file: Callable[[str], str | None] = lambda key: None) -> None:
    """Every setting of cfg's Hydra node that differs from the reference (the composition with cnnlab's
    configs/, Hydra's own options chosen as in cfg and the command line's Hydra overrides, without the
    user's files) must be one a file may set, with a value its rule accepts. file(key): the file that
    sets it, for the message."""
    ours, theirs = _leaves(cfg.hydra, "hydra"), _leaves(reference.hydra, "hydra")
    checked = set()
    for key in sorted(set(ours) | set(theirs)):
        if key.startswith(LOADER_SET) or ours.get(key, ...) == theirs.get(key, ...):
            continue
        entry = next((setting for setting in FILE_SETTINGS if key == setting or key.startswith(f"{setting}.")), None)
        if entry is None:
            shown, where = ours.get(key, "(removed)"), file(key) or "a config file"
            raise UserError(f"{key}={shown!r}{job} comes from {where}; a config file may set in hydra only "
                            f"{file_settings_text()}. Hydra's logging, the launcher's commands and paths, "
                            f"output_subdir and the rest of Hydra's settings come from cnnlab's configs, "
                            f"Hydra's own options or your command line. {NOTHING_RAN}")
        if entry not in checked:
            checked.add(entry)
            _check_file_setting(cfg, entry, job, file)


def _check_file_setting(cfg: DictConfig, key: str, job: str, file: Callable[[str], str | None]) -> None:
    what, rule = FILE_SETTINGS[key]
    value = resolved(cfg, key)
    if not rule(value):
        where = file(key) or "a config file"
        raise UserError(f"{key}={value!r}{job}, set in {where}, must be {what}. {NOTHING_RAN}")


def resolved(cfg: DictConfig, key: str) -> Any:
    """The setting's value as plain data, resolved where it can be before a job runs (else as written,
    with what IN_A_JOB allows as `job`)."""
    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=True)
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
    except Exception:  # ${hydra:...}, ${hydra.job.num} resolve only in a running job
        raw = _raw(cfg, key)
        return IN_A_JOB.sub("job", raw) if isinstance(raw, str) else raw


def _raw(cfg: DictConfig, key: str) -> Any:
    """The setting as written (a section as plain data, unresolved)."""
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or name not in parent:
        return None
    node = parent._get_node(name)
    return OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node._value()


def _leaves(node: DictConfig, path: str) -> dict[str, Any]:
    """Every setting under node, unresolved, by dotted key; lists and empty sections are one value each."""
    return _flat(OmegaConf.to_container(node, resolve=False), path)


def _flat(values: dict, path: str) -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        where = f"{path}.{key}"
        if isinstance(value, dict) and value:
            flat.update(_flat(value, where))
        else:
            flat[where] = value
    return flat


def refuse_unsafe_command_line(overrides: list, experimental_rerun: Any) -> None:
    """What the command line may not do either: unpickle a file, put a run's .hydra/ record outside it,
    or put a sweep's job outside the sweep folder."""
    if experimental_rerun is not None:
        raise UserError(f"--experimental-rerun {experimental_rerun} is refused: it unpickles the file, which can run "
                        f"any code. Run the command again instead (a sweep job continues from its checkpoint, a run "
                        f"with resume=DIR). {NOTHING_RAN}")
    for override in overrides:
        key, value = override.key_or_group, override.value() if not override.is_delete() else None
        value = IN_A_JOB.sub("job", value) if isinstance(value, str) else value
        if key == "hydra.output_subdir" and value is not None and not _inside(value):
            raise UserError(f"{override.input_line}: hydra.output_subdir must be a relative folder inside the run "
                            f"folder (no ..), e.g. .hydra, which `resume=DIR` reads. {NOTHING_RAN}")
        if key == "hydra.sweep.subdir" and not (isinstance(value, str) and _inside(value)):
            raise UserError(f"{override.input_line}: hydra.sweep.subdir must be a relative path inside the sweep "
                            f"folder (no ..). {NOTHING_RAN}")

"""Where runs and sweeps land: `~` in paths, the run folder (new, resumed, or refused because a run
holds it), the sweep folder decided before Hydra starts, sweep jobs' folder names, and the CPU
threads of parallel jobs. No torch here."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cnnlab.cli.hydra_api import parse_arguments
from cnnlab.config import config_dir
from cnnlab.errors import UserError, one_line

# A sweep job's folder is named by its swept overrides; at most this many bytes (file systems allow 255).
JOB_DIR_BYTES = 150


def job_dir(override_dirname: str, job_num: Any) -> str:
    """A sweep job's folder name: its swept overrides (`activation=elu,trainer.seed=1`) as one safe
    path component. A name that had to change (a `/` of a path value, a leading `.`, control
    characters, too long) ends with a hash of the whole name, so that two jobs never share a folder."""
    name = str(override_dirname or f"job{job_num}")
    safe = re.sub(r"[/\\\x00-\x1f\x7f]", "_", name)
    safe = "_" + safe[1:] if safe.startswith(".") else safe
    if safe == name and len(name.encode()) <= JOB_DIR_BYTES:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    cut = safe.encode()[:JOB_DIR_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{cut}-{digest}"


# train.yaml's hydra.sweep.subdir is ${cnnlab_job_dir:...}: registered whenever cnnlab.cli is imported
# (the package imports this module), in the command's process and in each joblib worker.
OmegaConf.register_new_resolver("cnnlab_job_dir", job_dir, replace=True)


def expand_home(args: list[str]) -> list[str]:
    """`~` and `~user` at the start of an override's value, or of an item of a swept or listed value
    (`dataset.path=~/pets`, `dataset.path=~/a,~/b`, `resume=~/runs/x`), expanded as a shell expands a
    word that starts with one: no shell does after `key=`, and Hydra's grammar cannot read `~` in a
    value, so this never changes the meaning of an override Hydra could read. Quoted text is kept."""
    overrides = set(parse_arguments(args).overrides)
    return [_expand_home_in_value(arg) if arg in overrides else arg for arg in args]


def _expand_home_in_value(override: str) -> str:
    key, equals, value = override.partition("=")
    if not equals or "~" not in value:
        return override
    out, quote, item_starts, i = [], "", True, 0
    while i < len(value):
        char = value[i]
        if quote:  # inside '...' or "...": Hydra's, kept as it is
            step = 2 if char == "\\" else 1
            quote = "" if char == quote else quote
            out.append(value[i:i + step])
            i += step
            continue
        if item_starts and char == "~":
            end = min((j for j in (value.find(stop, i) for stop in ",])}") if j >= 0), default=len(value))
            head, slash, rest = value[i:end].partition("/")
            if re.fullmatch(r"~[\w.-]*", head):
                out.append(os.path.expanduser(head) + slash + rest)
                i, item_starts = end, False
                continue
        quote = char if char in "'\"" else ""
        item_starts = char in ",[(" or (item_starts and char.isspace())
        out.append(char)
        i += 1
    return f"{key}={''.join(out)}"


def name_jobs_by_swept_overrides(args: list[str]) -> list[str]:
    """In a multirun, keep overrides shared by every job out of the job directory names.

    Hydra names a job by all of its overrides (`hydra.job.override_dirname`); a shared
    `dataset.root=/data/x` would make every name long and, with its slashes, nest folders.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = parse_arguments(args).overrides
    if any(a.startswith("hydra.job.config.override_dirname") for a in overrides):
        return args
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra reports malformed overrides itself, with its own message
        return args
    # Hydra compares key_or_group (`preset` of `+preset=x`) with the excluded keys.
    shared = [o.key_or_group for o in parsed if not o.is_sweep_override() and not o.is_hydra_override()]
    if not shared:
        return args
    quoted = ",".join("'" + key.replace("'", "\\'") + "'" for key in shared)
    return [*args, f"hydra.job.config.override_dirname.exclude_keys=[{quoted}]"]


def default_dir(kind: str) -> str:
    """hydra.run.dir or hydra.sweep.dir (kind: run or sweep) as train.yaml's template gives it now."""
    from hydra.core.utils import setup_globals

    setup_globals()  # registers Hydra's ${now:...} resolver
    template = OmegaConf.to_container(OmegaConf.load(config_dir() / "train.yaml").hydra[kind])["dir"]
    return str(OmegaConf.create({"dir": template}).dir)


def check_writable(setting: str, directory: Path) -> None:
    """Fail before Hydra does (with a traceback) when the output directory cannot be created. The
    folders made to find out are removed again: a command refused later leaves none behind."""
    existing, missing = directory, []
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{setting}={str(directory)!r} cannot be created: {existing} is a file, not a folder. "
                        f"Choose another folder with {setting}=PATH.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{setting}={str(directory)!r} cannot be created: {existing} is not writable. "
                        f"Choose another folder with {setting}=PATH.")
    created = []
    try:  # what access() cannot tell: /proc, a read-only mount, a full disk, a name too long
        for folder in reversed(missing):
            with contextlib.suppress(FileExistsError):  # made meanwhile by another process: not ours to remove
                folder.mkdir()
                created.append(folder)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as error:
        raise UserError(f"{setting}={str(directory)!r} cannot be written: {one_line(error, 200)}. "
                        f"Choose another folder with {setting}=PATH.") from None
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):  # no longer empty: another process writes there now
                folder.rmdir()


def fix_sweep_dir(args: list[str]) -> tuple[list[str], Path]:
    """The sweep directory, decided here (from hydra.sweep.dir on the command line, else from the
    template in train.yaml) and passed to Hydra, so that the CLI can summarise the sweep afterwards
    whichever launcher ran the jobs."""
    given = [arg.partition("=")[2] for arg in parse_arguments(args).overrides if arg.startswith("hydra.sweep.dir=")]
    sweep_dir = Path(given[-1]) if given else Path(default_dir("sweep"))
    check_writable("hydra.sweep.dir", sweep_dir)
    return (args if given else [*args, f"hydra.sweep.dir={sweep_dir}"]), sweep_dir


def place_single_run(args: list[str], overrides: list[str]) -> list[str]:
    """`resume=DIR` runs in DIR itself, and Hydra must not rewrite DIR/.hydra (the record of the
    run's config). A new run must not land in a folder that already holds one, nor where it cannot
    be written."""
    from cnnlab.rundir import last_checkpoint, locked_by, refuse_foreign_files

    values = {key: resolved(value) for key, value in (arg.partition("=")[::2] for arg in overrides if "=" in arg)}
    resume = values.get("resume") not in (None, "", "null")
    if "hydra.run.dir" in values and values["hydra.run.dir"].strip() in ("", ".", "./", "null"):
        raise UserError(f"hydra.run.dir={values['hydra.run.dir']!r} would be the current folder (an unset "
                        f"variable?): a run writes its own folder. Give one, e.g. hydra.run.dir=outputs/mine, or "
                        f"leave the setting out for outputs/DATE/TIME. Nothing has run.")
    run_dir = Path(values["resume"] if resume else values.get("hydra.run.dir") or default_dir("run") + named_by(overrides))
    run_dir = run_dir.expanduser()
    holder = locked_by(run_dir)
    if holder is not None:  # checked before Hydra writes its .hydra/ files into the folder
        raise UserError(f"{run_dir} belongs to a run that is still going (pid {holder}); a second one must not "
                        f"write into it. Wait for it to end, or choose another folder.")
    if resume:
        if not last_checkpoint(run_dir).is_file() or not (run_dir / ".hydra").is_dir():
            raise UserError(
                f"resume={values['resume']!r} is not a run directory with a checkpoint (looked for "
                f"{last_checkpoint(run_dir)} and {run_dir / '.hydra'}). Pass the folder of a "
                f"run, e.g. resume=outputs/2026-11-22/10-31-07-123456.")
        check_writable("resume", run_dir)
        return [*args, f"hydra.run.dir={quoted(str(run_dir))}"]
    if last_checkpoint(run_dir).is_file():
        raise UserError(
            f"hydra.run.dir={str(run_dir)!r} already holds a run; its results are kept. Continue it with "
            f"resume={run_dir}, or choose another directory.")
    refuse_foreign_files(run_dir, "hydra.run.dir: the folder")  # before Hydra writes .hydra/ into it
    check_writable("hydra.run.dir", run_dir)
    # The folder checked is the folder Hydra uses: `${now:...}` resolved twice would be two folders.
    return [*args, f"hydra.run.dir={quoted(str(run_dir))}"]


def quoted(value: str) -> str:
    """`value` as one quoted Hydra override value: a folder named by settings holds `=` and `,`, which
    Hydra's grammar would read as a sweep or a syntax error."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return "'" + value.replace("'", "\\'") + "'"


def named_by(overrides: list[str]) -> str:
    """What a new run's default folder (outputs/DATE/TIME) gains after its time: its settings typed on
    the command line, as `key-value` joined by `+` (`_activation-elu+model-convnet`), so that runs tell
    themselves apart in TensorBoard's runs list; "" when none were typed. Only characters Hydra reads
    in a plain override value (no `=`, `,`, brackets or spaces: those become `_`), so that `resume=`
    takes the folder as it is typed."""
    from cnnlab.config import role

    typed = [arg.lstrip("+") for arg in overrides if "=" in arg and not arg.startswith("~")]
    typed = [arg for arg in typed if not arg.startswith(("hydra.", "resume="))]
    # Settings that name runs first (a long name is cut at its end), paths and devices last.
    typed.sort(key=lambda arg: (not role(arg.partition("=")[0]).names_runs, arg))
    parts = ["-".join(re.sub(r"[^A-Za-z0-9._@%-]", "_", side) for side in arg.split("=", 1)) for arg in typed]
    return "_" + job_dir("+".join(parts), 0) if parts else ""


def resolved(value: str) -> str:
    """An override's value as Hydra will resolve it, where that is known before Hydra starts
    (`${oc.env:RUNS}/mine`, `${now:%H-%M}`), so that the folder checked is the folder used; else as
    typed (a value only the running job knows)."""
    if "${" not in value:
        return value
    from hydra.core.utils import setup_globals
    from omegaconf.errors import OmegaConfBaseException

    setup_globals()  # registers Hydra's ${now:...} resolver
    try:
        return str(OmegaConf.create({"value": value}).value)
    except OmegaConfBaseException:  # an unset variable, a key of Hydra's: Hydra resolves it, or says why not
        return value


def record_config_after_lock(args: list[str]) -> tuple[list[str], str | None]:
    """(the arguments for Hydra, the folder in a run directory where the run's record of its config
    goes: .hydra, or None for none). Hydra writes .hydra/config.yaml, overrides.yaml and hydra.yaml as a
    job starts, before cnnlab holds the run folder's lock or knows whether the run there may continue:
    into a live run's folder, or over the record of a completed one that a rerun keeps. So Hydra is
    told to write none (hydra.output_subdir=null) and the job writes them itself once the folder is its
    own (cli.job.config_record, train.loop.train)."""
    given = [arg.partition("=")[2] for arg in parse_arguments(args).overrides if arg.startswith("hydra.output_subdir=")]
    subdir = given[-1] if given else ".hydra"  # Hydra's default; only the command line may change it
    return [*args, "hydra.output_subdir=null"], None if subdir in ("null", "") else subdir


def threads_per_job(n_jobs: int, cores: int) -> int:
    """CPU threads per job when joblib runs n_jobs at once (joblib's -1 = all cores, -2 = all but one)."""
    parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
    return max(1, cores // parallel)

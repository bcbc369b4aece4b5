"""The command line, `cnnlab train | compare | activations | inspect`: the only module that knows about Hydra.

Nothing here imports torch: `--help`, `--cfg job` and config mistakes answer before it is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnnlab import __version__
from cnnlab.config import config_dir
from cnnlab.errors import UserError, one_line
from cnnlab.train.resume import prepare_job
from cnnlab.train.stops import SweepStop, sigterm_as_interrupt, stoppable

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
  inspect      one run: status, each layer at step 0 and at the last probe, findings (--json for JSON)

examples:
  cnnlab train model=convnet activation=leaky_relu
  cnnlab train -m activation=relu,leaky_relu,elu,selu,gelu trainer.seed=0,1,2
  cnnlab train -m experiment=relu_variants
  cnnlab compare outputs/multirun/2026-11-22/10-31-07-123456
  cnnlab train --help
  tensorboard --logdir outputs
"""




# --- what a config may not do: checked before Hydra, which acts on the config before any job starts --
# Hydra instantiates `_target_` classes (hydra.callbacks, the launcher, the sweeper) and hands
# hydra.job_logging / hydra.hydra_logging to logging.config.dictConfig (which imports and calls what
# `()` and `class` name) before validate() could see the config. cnnlab's configs name no Python
# classes; the only class paths allowed are those of Hydra's own launchers and sweeper.
ALLOWED_TARGETS = {
    "hydra.launcher._target_": (
        "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
        "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    ),
    "hydra.sweeper._target_": ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper",),
}
LOGGING_SECTIONS = ("hydra.job_logging.", "hydra.hydra_logging.")
LOGGING_CLASSES = ("logging.StreamHandler", "logging.FileHandler", "logging.NullHandler", "logging.Formatter",
                   "logging.handlers.RotatingFileHandler", "logging.handlers.TimedRotatingFileHandler",
                   "logging.handlers.WatchedFileHandler")
LOGGING_STREAMS = ("ext://sys.stdout", "ext://sys.stderr")
REFUSED = "Configs may not run code; nothing has run."


def check_config_before_hydra(args: list[str]) -> None:
    """Compose the config as Hydra will (in a sweep, once for every swept value) and refuse, each with
    one message: an override Hydra's grammar cannot read, a setting or an option that does not exist,
    what would run code, a YAML file that does not parse, a sweep whose jobs would share a folder, and
    a config that validate() rejects (a single run's, or every job's of a sweep for the same reason).
    Other composition errors are left to Hydra, which reports them with its own message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    parsed = _hydra_arguments(args)
    overrides = read_overrides(parsed.overrides)
    loader = _config_loader(parsed)
    if loader is None:
        return
    for override in overrides:
        key = override.key_or_group.replace("/", ".")
        if "_target_" in key or key == "hydra.callbacks" or key.startswith("hydra.callbacks."):
            raise UserError(f"{override.input_line}: {key} names code for Hydra to run. {REFUSED}")
    config_name = parsed.config_name or "train"
    cfg = _compose(loader, config_name, parsed.overrides, RunMode.MULTIRUN if parsed.multirun else RunMode.RUN)
    if cfg is None:
        return
    _refuse_code(cfg)
    runs = not (parsed.help or parsed.hydra_help or parsed.cfg or parsed.info or parsed.shell_completion
                or parsed.experimental_rerun) and cfg.get("resume") in (None, "")  # resumed: checked by run_job
    if not parsed.multirun:
        if runs:
            _validate(cfg)
        return
    parser = OverridesParser.create(config_loader=loader)
    hydra_overrides = list(cfg.hydra.overrides.hydra)
    swept = _swept_values(parser, cfg)
    for job_overrides in _sweep_samples(swept):
        named = _swept_only(swept, job_overrides)
        job = _compose(loader, config_name, [*hydra_overrides, *job_overrides], RunMode.RUN, named)
        if job is not None:
            _refuse_code(job, f" (in the sweep's job with {' '.join(named)})")
    if runs:
        _refuse_a_sweep_of_invalid_jobs(loader, config_name, hydra_overrides, swept)


def read_overrides(lines: list[str]) -> list:
    """Hydra's reading of each override; one its grammar cannot read is a UserError naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    overrides = []
    for line in lines:
        try:
            overrides += parser.parse_overrides([line])
        except OverrideParseException as error:
            raise UserError(_unreadable_override(line, error.message)) from None
    return overrides


def _unreadable_override(line: str, hydra_message: str) -> str:
    """Where Hydra's grammar stopped reading the override, and the quoting that works."""
    lexer = "LexerNoViableAltException: "
    reasons = [text for text in hydra_message.splitlines()
               if text.strip() and not text.startswith(("Error parsing override", "See https://", lexer))
               and text.strip() != "^"]
    if hydra_message.startswith(lexer) and "^" in hydra_message:
        at = hydra_message.splitlines()[1].index("^") - len(lexer)
        where = f": it cannot read {line[at:at + 1]!r} at character {at + 1}" if 0 <= at < len(line) else ""
    else:
        where = f" ({reasons[0].split(' expecting {')[0]})" if reasons else ""
    return (f"Hydra cannot read the override {line!r}{where}. Write KEY=VALUE; a value with spaces at its ends or "
            f"with characters such as ~ # ! & ; = ' \" ( ) [ ] {{ }} , needs quotes that reach Hydra, inside the "
            f"shell's own: 'key=\"value with spaces\"' (a ~ that starts a path is expanded: dataset.path=~/pets).")


def _validate(cfg: DictConfig) -> None:
    """validate() of a composed config, before Hydra makes its folder: a rejected run leaves nothing."""
    from cnnlab.config import validate

    run = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    if "${hydra" in OmegaConf.to_yaml(run):
        return  # resolves only in a running job: run_job validates it there
    validate(run)


# A sweep whose first job is invalid is checked job by job, up to this many jobs (one composition each).
MAX_JOBS_CHECKED = 32


def _refuse_a_sweep_of_invalid_jobs(loader, config_name: str, hydra_overrides: list[str],
                                    swept: dict[str, list[str]] | None) -> None:
    """A sweep whose every job would be rejected for one reason is refused before any job runs; one
    with some valid jobs runs, and its invalid jobs are listed in the summary (status invalid)."""
    import itertools

    from hydra.types import RunMode

    if swept is None:
        return
    lines = [[f"{key}={value}" for value in values] for key, values in swept.items()]
    jobs = itertools.product(*lines)
    reasons = set()
    for count, job_overrides in enumerate(jobs):
        if count == MAX_JOBS_CHECKED:
            return
        job = _compose(loader, config_name, [*hydra_overrides, *job_overrides], RunMode.RUN,
                       _swept_only(swept, job_overrides))
        if job is None:
            return
        try:
            _validate(job)
            return
        except UserError as error:
            reasons.add(str(error))
        if len(reasons) > 1:
            return
    if reasons:
        raise UserError(f"{reasons.pop()} Every job of the sweep would be rejected for this reason; none has run.")


def _config_loader(parsed):
    """Hydra's config loader with the search path hydra.main builds (configs/, then --config-dir)."""
    from hydra import version
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.utils import setup_globals

    version.setbase(None)  # as hydra.main(version_base=None) does
    setup_globals()  # Hydra's resolvers (${now:...}), so that settings resolve as they will
    search_path = create_automatic_config_search_path(__file__, __name__, parsed.config_path or str(config_dir()))
    if parsed.config_dir is not None:
        if not os.path.isdir(parsed.config_dir):
            return None  # Hydra says so itself
        search_path.prepend(provider="command-line", path=f"file://{os.path.abspath(parsed.config_dir)}",
                            anchor=SearchPathQuery(provider="schema"))
    return ConfigLoaderImpl(config_search_path=search_path)


def _compose(loader, config_name: str, overrides: list[str], run_mode,
             job: list[str] | None = None) -> DictConfig | None:
    """The composed config with Hydra's own node; None where Hydra would refuse it (and say why). A
    YAML file that does not parse, a setting or an option that does not exist: a UserError (for the
    sweep's job with the overrides `job`)."""
    import yaml
    from hydra.errors import HydraException

    try:
        return loader.load_configuration(config_name=config_name, overrides=list(overrides), run_mode=run_mode)
    except Exception as error:
        causes, cause = [], error
        for _ in range(20):  # the YAML or OmegaConf error, possibly wrapped by Hydra
            if cause is None:
                break
            causes.append(cause)
            cause = cause.__cause__ or cause.__context__
        message = next((_yaml_error_message(c) for c in causes if isinstance(c, yaml.YAMLError)), None)
        message = message or _unknown_choice_message(error) or _unknown_setting_message(
            causes, loader, config_name, overrides, run_mode)
        if message is None and not isinstance(error, HydraException):  # Hydra would print a traceback
            message = f"The overrides {' '.join(overrides)} cannot be applied to the config: {one_line(error, 200)}."
            if "invalid literal for int" in str(error):  # `model.hidden.x=1`: an item of a list by a name
                message += " A list is set whole (model.hidden=[64,32]), not by an item's name."
        if message is None:
            return None
        raise UserError(f"The sweep's job with {' '.join(job)}: {message}" if job else message) from None


def _unknown_choice_message(error: Exception) -> str | None:
    """`activation=reluu`: the group's options, without Hydra's search path."""
    from hydra.errors import MissingConfigException

    from cnnlab.config import unknown_choice

    if not isinstance(error, MissingConfigException) or not error.options or "/" not in (error.missing_cfg_file or ""):
        return None
    group, _, name = error.missing_cfg_file.rpartition("/")
    return str(unknown_choice(group, name, error.options, f" (no {group}/{name}.yaml in the config folders)"))


def _unknown_setting_message(causes: list[BaseException], loader, config_name: str, overrides: list[str],
                             run_mode) -> str | None:
    """`model.hiden=[10]`: cnnlab's message for a setting that does not exist (Hydra's would suggest
    adding it with `+`), with the valid settings of the section as composed without that override."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from cnnlab.config import unknown_setting

    full_key = next((c.full_key for c in causes if isinstance(c, (ConfigAttributeError, ConfigKeyError))
                     and getattr(c, "full_key", None)), None)
    if not full_key or full_key == "hydra" or full_key.startswith("hydra."):
        return None  # Hydra's own settings: Hydra knows them
    named = [o for o in overrides if f"{o.partition('=')[0].lstrip('+~')}.".startswith(f"{full_key}.")]
    section, _, key = full_key.partition(".") if "." in full_key else ("", "", full_key)
    try:
        cfg = loader.load_configuration(config_name=config_name, run_mode=run_mode,
                                        overrides=[o for o in overrides if o not in named])
        node = cfg.get(section) if section else cfg
    except Exception:
        node = None  # another mistake besides: this one is named first
    return str(unknown_setting(section, key, node))


def _yaml_error_message(error) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    what = ": ".join(str(part) for part in (getattr(error, "context", None), getattr(error, "problem", None)) if part)
    if mark is None:
        return f"A config file is not valid YAML: {one_line(error, 300)}."
    return (f"{mark.name} is not valid YAML: {what or one_line(error, 200)} (line {mark.line + 1}, column "
            f"{mark.column + 1}). Fix the file, or take it out of the config folder.")


def _settings(node, path: str = "", depth: int = 0):
    """(dotted key, value) of every setting under node, depth first, with interpolations resolved
    where they can be before a job runs (`${oc.create:...}` can make a node out of a string)."""
    from omegaconf import ListConfig

    if depth > 40:  # an interpolation that refers to its own parent
        return
    for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
        where = f"{path}.{key}" if path else str(key)
        try:
            value = node[key]
        except Exception:  # ${hydra:...} resolves only in a running job, ??? never
            value = node._get_node(key)._value()
        yield where, value
        if isinstance(value, (DictConfig, ListConfig)) and not value._is_none() and not value._is_missing():
            yield from _settings(value, where, depth + 1)


def _refuse_code(cfg: DictConfig, job: str = "") -> None:
    for where, value in _settings(cfg):
        key = where.rpartition(".")[2]
        logging_setting = where.startswith(LOGGING_SECTIONS)
        if where.startswith("hydra.callbacks."):
            raise UserError(f"{where}{job}: Hydra callbacks run code before any job starts, and cnnlab takes none; "
                            f"remove hydra.callbacks from the config. {REFUSED}")
        if key == "_target_" and value not in ALLOWED_TARGETS.get(where, ()):
            instead = ("Choose Hydra's launcher by name instead (hydra/launcher=basic, joblib, submitit_local or "
                       "submitit_slurm). " if where in ALLOWED_TARGETS else "")
            raise UserError(f"{where}={value!r}{job}: configs never name Python classes or functions to call; cnnlab "
                            f"builds everything from plain settings. {instead}{REFUSED}")
        if logging_setting and key == "()":
            raise UserError(f"{where}={value!r}{job}: a logging factory `()` makes Python's logging call it. Choose "
                            f"Hydra's logging by name instead (hydra/job_logging=default, disabled, none or stdout). "
                            f"{REFUSED}")
        if logging_setting and key == "class" and value not in LOGGING_CLASSES:
            raise UserError(f"{where}={value!r}{job}: logging may use only the standard classes "
                            f"{', '.join(LOGGING_CLASSES)}. {REFUSED}")
        if logging_setting and isinstance(value, str) and value.startswith("ext://") and value not in LOGGING_STREAMS:
            raise UserError(f"{where}={value!r}{job}: logging may name only the streams "
                            f"{' and '.join(LOGGING_STREAMS)}. {REFUSED}")


def _swept_values(parser, cfg: DictConfig) -> dict[str, list[str]] | None:
    """Each task override's key and values (one value where it is not swept), in the order Hydra's
    BasicSweeper applies them: hydra.sweeper.params first, then the command line, a key given twice
    taking its last value; None for a sweep Hydra cannot run (it says so itself). A sweep that lists a
    value twice, or leaves a swept key out of the job names, is refused: two of its jobs would share
    one folder."""
    try:
        params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True) if cfg.hydra.sweeper.get("params") else {}
        swept: dict[str, list[str]] = {}
        keys: dict[str, str] = {}
        for override in parser.parse_overrides([*(f"{k}={v}" for k, v in params.items()), *cfg.hydra.overrides.task]):
            key = override.get_key_element()
            keys[key] = override.key_or_group
            if override.is_sweep_override():
                swept[key] = list(override.sweep_string_iterator())
            else:
                swept[key] = [override.get_value_element_as_str()]
        excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    except Exception:
        return None
    for key, values in swept.items():
        twice = sorted({value for value in values if values.count(value) > 1})
        if twice:
            raise UserError(f"{key}={','.join(values)} lists {', '.join(twice)} more than once: those jobs would run "
                            f"the same settings into the same folder. List each value once.")
        if len(values) > 1 and keys[key] in excluded:
            raise UserError(f"hydra.job.config.override_dirname.exclude_keys leaves the swept {keys[key]} out of "
                            f"the job names, so jobs would share folders. Keep it in the names.")
    return swept


def _swept_only(swept: dict[str, list[str]], job_overrides) -> list[str]:
    """A job's overrides of the keys swept over, which name it (all of them if none is swept)."""
    named = [override for override, values in zip(job_overrides, swept.values()) if len(values) > 1]
    return named or list(job_overrides)


def _sweep_samples(swept: dict[str, list[str]] | None) -> list[list[str]]:
    """Task overrides of a few jobs of the sweep that, between them, set every swept value (each one
    with the other sweeps at their first value)."""
    if swept is None:
        return []
    lines = [[f"{key}={value}" for value in values] for key, values in swept.items()]
    firsts = [values[0] for values in lines]
    samples = [firsts]
    for i, values in enumerate(lines):
        samples += [[*firsts[:i], value, *firsts[i + 1:]] for value in values[1:]]
    return samples


# A sweep job's folder is named by its swept overrides; at most this many bytes (file systems allow 255).
JOB_DIR_BYTES = 150


def _job_dir(override_dirname: str, job_num: Any) -> str:
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


OmegaConf.register_new_resolver("cnnlab_job_dir", _job_dir, replace=True)


def _hydra_arguments(args: list[str]):
    from hydra._internal.utils import get_args_parser

    parsed, _ = get_args_parser().parse_known_args(args)
    return parsed


def expand_home(args: list[str]) -> list[str]:
    """`~` and `~user` at the start of an override's value, or of an item of a swept or listed value
    (`dataset.path=~/pets`, `dataset.path=~/a,~/b`, `resume=~/runs/x`), expanded as a shell expands a
    word that starts with one: no shell does after `key=`, and Hydra's grammar cannot read `~` in a
    value, so this never changes the meaning of an override Hydra could read. Quoted text is kept."""
    overrides = set(_hydra_arguments(args).overrides)
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

    overrides = _hydra_arguments(args).overrides
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


def _default_dir(kind: str) -> str:
    """hydra.run.dir or hydra.sweep.dir as train.yaml's template gives it now."""
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
    given = [arg.partition("=")[2] for arg in _hydra_arguments(args).overrides if arg.startswith("hydra.sweep.dir=")]
    sweep_dir = Path(given[-1]) if given else Path(_default_dir("sweep"))
    check_writable("hydra.sweep.dir", sweep_dir)
    return (args if given else [*args, f"hydra.sweep.dir={sweep_dir}"]), sweep_dir


def place_single_run(args: list[str], overrides: list[str]) -> list[str]:
    """`resume=DIR` runs in DIR itself, and Hydra must not rewrite DIR/.hydra (the record of the
    run's config). A new run must not land in a folder that already holds one, nor where it cannot
    be written."""
    from cnnlab.rundir import last_checkpoint, locked_by

    values = dict(arg.partition("=")[::2] for arg in overrides if "=" in arg)
    resume = values.get("resume") not in (None, "", "null")
    run_dir = Path(values["resume"] if resume else values.get("hydra.run.dir") or _default_dir("run")).expanduser()
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
        return [*args, f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]
    if last_checkpoint(run_dir).is_file():
        raise UserError(
            f"hydra.run.dir={str(run_dir)!r} already holds a run; its results are kept. Continue it with "
            f"resume={run_dir}, or choose another directory.")
    check_writable("hydra.run.dir", run_dir)
    return args if "hydra.run.dir" in values else [*args, f"hydra.run.dir={run_dir}"]


def threads_per_job(n_jobs: int, cores: int) -> int:
    """CPU threads per job when joblib runs n_jobs at once (joblib's -1 = all cores, -2 = all but one)."""
    parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
    return max(1, cores // parallel)


def _print_error(message: str, job: str = "", outcome: str = "failed") -> None:
    from rich.console import Console

    prefix = f"cnnlab: job {job} {outcome}: " if job else "cnnlab: error: "
    Console(stderr=True).print(prefix + message, style="red", markup=False, highlight=False, soft_wrap=True)






def _train_and_print(run, run_dir: Path, output, resume: bool, label: str | None) -> str:
    """Interim adapter (helper "train"; helper "cli" rewrites run_job): train() returns a RunResult and
    prints nothing; print what it printed, and raise the error that ended the run as it raised it."""
    from cnnlab.cli.console import TrainingProgress, findings_panel, job_line, summary_table
    from cnnlab.rundir import read_metrics_or_none
    from cnnlab.train.loop import train

    def say(text) -> None:
        output.print(text, highlight=False, markup=False, soft_wrap=True)

    bar = TrainingProgress(run.trainer.epochs, output, label)
    bar.started = lambda description: say(description.replace("cnnlab: ", f"cnnlab: {label}: ", 1) if label else description)
    try:
        result = train(run, run_dir, resume=resume, progress=bar)
    except BaseException:
        if label is not None:
            say(job_line(label, read_metrics_or_none(run_dir) or {}, str(run_dir)))
        raise
    panel = None
    if run.findings.enabled and result.description:
        panel = (findings_panel(result.findings) if result.findings_error is None
                 else f"cnnlab: the findings could not be computed: {result.findings_error}")
    if label is not None:
        say(job_line(label, result.metrics, str(run_dir)))
    elif panel is not None and result.status != "completed":
        output.print(panel)  # a failed run's findings, before the error message
    if result.error is not None:
        raise result.error
    if label is None:
        output.print(summary_table(result.metrics, str(run_dir)))
        if panel is not None:
            output.print(panel)
    return result.status


def run_job(cfg: DictConfig) -> str:
    """One Hydra job: validate the config, then train; returns the job's status. A user mistake is
    reported, not raised; in a sweep, so is any other failure, so that the remaining jobs still run."""
    import traceback

    from hydra.core.hydra_config import HydraConfig

    from cnnlab.config import validate
    from cnnlab.rundir import CHECKPOINT_DIR, last_checkpoint, write_metrics

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
    from cnnlab.cli import console as progress
    from cnnlab.train.loop import Diverged, Interrupted  # torch: only once the config is known to be good

    # A sweep's job names itself in each line it prints (jobs of a joblib sweep interleave) and ends with
    # one line, not a table; parallel jobs share the terminal, so they print plain lines, never a live bar.
    swept = hydra_cfg.job.override_dirname or ",".join(hydra_cfg.overrides.task)
    label = f"job #{hydra_cfg.job.num} ({swept})" if multirun else None
    output = progress.console(live=not isinstance(n_jobs, int))
    try:
        return _train_and_print(run, run_dir, output, resume, label)
    except UserError as error:  # bad data or device: the trainer has recorded it in metrics.json
        _print_error(str(error), job)
        return "failed"
    except Diverged as error:
        kept = (f"The last good checkpoint is kept in {run_dir / CHECKPOINT_DIR}" if last_checkpoint(run_dir).is_file()
                else "It diverged before its first checkpoint")
        _print_error(f"{error}. {kept}; try a lower optimizer.lr, trainer.grad_clip, or "
                     f"trainer.on_nonfinite=skip.", job)
        return "diverged"
    except Interrupted as error:
        if multirun:
            again = "with a checkpoint" if last_checkpoint(run_dir).is_file() else "before its first checkpoint"
            _print_error(f"{error}, {again}; run the same sweep command again to finish it.", job, "stopped")
        elif last_checkpoint(run_dir).is_file():
            _print_error(f"{error}, with a checkpoint; continue with: cnnlab train resume={run_dir}")
        else:
            _print_error(f"{error}, before its first checkpoint: there is nothing to resume; run it again.")
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
    """The table of every job (`missing`: never started), summary.csv and summary.json in the sweep
    directory; the exit code."""
    from cnnlab.cli import console as progress
    from cnnlab.analysis.compare import find_runs, print_summary, write_summary

    try:  # every job, as the command line listed them; those not started as `missing`
        runs = find_runs([str(sweep_dir)], jobs=sweep_jobs(sweep_dir))
    except UserError:  # neither a job folder nor a job list to read
        runs = []
    print_summary(progress.console(), runs, title=f"sweep {sweep_dir}: {len(runs)} jobs")
    write_summary(sweep_dir, runs)
    not_completed = [f"{run.name} ({run.status})" for run in runs if run.status != "completed"]
    if not_completed:
        _print_error(f"{len(not_completed)} of {len(runs)} jobs did not complete: {'; '.join(not_completed)}.")
    return _exit_code([run.status for run in runs])


def sweep_jobs(sweep_dir: Path) -> list[tuple[Path, dict[str, str]]]:
    """Every job of the sweep in sweep_dir, started or not: its folder and its overrides, as Hydra's
    basic sweeper expands multirun.yaml and names the folders. Empty when that cannot be read."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.utils import setup_globals

    try:
        cfg = OmegaConf.load(sweep_dir / "multirun.yaml")
        setup_globals()  # the ${now:...} resolver, should a folder name use it
        parser = OverridesParser.create()
        params = [f"{key}={value}" for key, value in (cfg.hydra.sweeper.params or {}).items()]
        batches = BasicSweeper.split_arguments(parser.parse_overrides([*params, *cfg.hydra.overrides.task]), None)
        naming = cfg.hydra.job.config.override_dirname
        jobs = []
        for num, overrides in enumerate(batches[0]):
            cfg.hydra.job.num = num
            cfg.hydra.job.override_dirname = get_overrides_dirname(
                parser.parse_overrides(overrides), list(naming.exclude_keys), naming.item_sep, naming.kv_sep)
            folder = (sweep_dir / str(cfg.hydra.sweep.subdir)).resolve()
            jobs.append((folder, {key.lstrip("+~"): value for key, _, value in (o.partition("=") for o in overrides)}))
        return jobs
    except Exception:  # not a sweep of Hydra's basic sweeper: its job folders are all there is to show
        return []














def train_command(args: list[str]) -> int:
    import hydra

    sweep_dir = None
    args = expand_home(args)
    parsed = _hydra_arguments(args)
    if parsed.help:  # cnnlab's own: the settings with their comments (--hydra-help is Hydra's)
        try:
            from cnnlab.cli.trainhelp import print_train_help

            print_train_help([*([Path(parsed.config_dir)] if parsed.config_dir else []), config_dir()])
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`, or a pager closed early: not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    try:
        check_config_before_hydra(args)
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
    task = recording_statuses(statuses)
    stop = SweepStop(sweep_dir) if sweep_dir is not None else None  # a single run stops by itself (StopRequest)
    try:
        with stop or sigterm_as_interrupt():
            hydra.main(version_base=None, config_path=str(config_dir()), config_name="train")(
                stoppable(task, stop.stop_file) if stop else task)()
    except KeyboardInterrupt:
        if sweep_dir is not None and sweep_dir.is_dir():
            summarise_sweep(sweep_dir)
        elif sweep_dir is None:
            _print_error("stopped at once by a signal (while the run was starting, or a second Ctrl-C); the "
                         "last checkpoint, if there is one, is kept.")
        return EXIT_INTERRUPTED
    except SystemExit as exit:
        if exit.code not in (0, None) and not statuses and not (sweep_dir and sweep_dir.is_dir()):
            return EXIT_USAGE  # Hydra rejected the arguments or the config before any job ran
        if exit.code not in (0, None) and sweep_dir is None:
            return EXIT_FAILED
    finally:
        sys.argv = saved_argv
    if sweep_dir is not None and sweep_dir.is_dir():
        code = summarise_sweep(sweep_dir)
        return EXIT_INTERRUPTED if stop.signum is not None and code != EXIT_OK else code
    return _exit_code(statuses)


def compare_command(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="cnnlab compare",
        description="Compare runs: a table, summary.csv and summary.json, and PNG figures (also in TensorBoard).")
    parser.add_argument("paths", nargs="+", help="sweep directories, run directories, folders holding them "
                                                 "(searched recursively), or glob patterns of them")
    parser.add_argument("--out", help="where to write the summary and figures (default: the sweep directory "
                                      "when one is given, else ./comparison)")
    parser.add_argument("--tune", metavar="KEY", help="a setting that differs (e.g. optimizer.lr): for each "
                        "configuration, its value with the best mean validation accuracy, and the test accuracy there")
    options = parser.parse_args(args)
    from cnnlab.cli import console as progress
    from cnnlab.analysis.compare import find_runs, make_figures, print_summary, sweep_dirs, tune, write_summary

    single = Path(options.paths[0])
    default_out = single if len(options.paths) == 1 and single.is_dir() and not (single / ".hydra").is_dir() else Path("comparison")
    out = Path(options.out) if options.out else default_out
    try:
        jobs = [job for sweep in sweep_dirs(options.paths) for job in sweep_jobs(sweep)]  # not started: `missing`
        runs = find_runs(options.paths, jobs=jobs)  # a run whose files cannot be read is skipped, with a warning
        tuned = tune(runs, options.tune) if options.tune else None
        check_writable("--out", out)
    except UserError as error:
        _print_error(str(error))
        return EXIT_USAGE
    console = progress.console()
    print_summary(console, runs, title=f"{len(runs)} runs", tuned=tuned)
    written = [*write_summary(out, runs, tuned), *make_figures(runs, out)]
    console.print("wrote " + ", ".join(str(path) for path in written), highlight=False, markup=False, soft_wrap=True)
    return EXIT_OK


def activations_command(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="cnnlab activations",
                                     description="The activations cnnlab offers: a table, and optionally a plot.")
    parser.add_argument("--plot", metavar="FILE", help="draw each function and its derivative on [-5, 5] into FILE (PNG)")
    options = parser.parse_args(args)
    from rich.table import Table

    from cnnlab.train.models import ACTIVATIONS
    from cnnlab.cli.console import console

    table = Table(title="activation=NAME", title_justify="left")
    for column in ("name", "formula", "range", "settings (default)", "typical use"):
        table.add_column(column, overflow="fold")
    for name, row in ACTIVATIONS.items():
        table.add_row(name, row.formula, row.output_range, row.settings, row.typical_use)
    console().print(table)
    if options.plot:
        from cnnlab.train.models import plot_activations

        plot_activations(Path(options.plot))
        print(f"wrote {options.plot}")
    return EXIT_OK


def inspect_command(args: list[str]) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="cnnlab inspect",
        description="One run from its files: status, each layer at step 0 and at the last probe, and the findings.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (completed, running, failed or older)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    options = parser.parse_args(args)
    from cnnlab.analysis.inspection import inspect_run, print_report, to_json
    from cnnlab.cli.console import console

    try:
        inspection = inspect_run(Path(options.run_dir))
    except UserError as error:
        _print_error(str(error))
        return EXIT_USAGE
    if options.json:
        print(json.dumps(to_json(inspection), indent=2, allow_nan=False))
    else:
        print_report(console(), inspection)
    return EXIT_OK


COMMANDS = {"train": train_command, "compare": compare_command, "activations": activations_command,
            "inspect": inspect_command}


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

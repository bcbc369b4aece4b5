"""The config check before Hydra: compose the config as Hydra will and refuse, each with one message,
what Hydra would act on or fail at after making folders (code to run, a YAML file that does not parse,
a setting or an option that does not exist, an override its grammar cannot read, a sweep whose jobs
would share a folder) and a config that validate() rejects. No torch here."""

from __future__ import annotations

import itertools
import os
import re
import sys
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab.cli.hydra_api import config_loader, file_that_sets, parse_arguments
from cnnlab.cli.hydra_settings import (hydra_choices, refuse_foreign_hydra_options, refuse_hydra_settings_from_files,
                                       refuse_overrides_from_files, refuse_unsafe_command_line)
from cnnlab.cli.sweeps import sweep_lines
from cnnlab.config import RunConfig, config_dir
from cnnlab.errors import MissingTool, UserError, one_line

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

# A sweep whose first job is invalid is checked job by job, up to this many jobs (one composition each).
MAX_JOBS_CHECKED = 32
# A number cannot name code, a file or a folder outside the sweep's: the numbers one setting is swept
# over compose alike, so one job checks them all (integers and decimals apart, as YAML types them).
NUMBER_KINDS = {"integer": re.compile(r"[+-]?\d+"), "decimal": re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")}


class Composer:
    """Compositions of the config as Hydra will compose it, each override list composed once."""

    def __init__(self, loader: Any, config_name: str):
        self.loader, self.config_name = loader, config_name
        self.composed: dict[tuple[str, ...], DictConfig | None] = {}

    def compose(self, overrides: list[str], run_mode: Any, job: list[str] | None = None) -> DictConfig | None:
        key = (str(run_mode), *overrides)
        if key not in self.composed:
            self.composed[key] = _compose(self.loader, self.config_name, overrides, run_mode, job)
        return self.composed[key]


def check_config_before_hydra(args: list[str]) -> dict[str, RunConfig]:
    """Compose the config as Hydra will (in a sweep, once for every swept value) and refuse, each with
    one message: an override Hydra's grammar cannot read, a setting or an option that does not exist,
    what would run code, a YAML file that does not parse, a sweep whose jobs would share a folder, and
    a config that validate() rejects (a single run's, or every job's of a sweep for the same reason).
    Other composition errors are left to Hydra, which reports them with its own message. Returns the
    configs it validated, by task_key(): a job whose config is one of them need not validate it again."""
    from hydra.types import RunMode

    parsed = parse_arguments(args)
    overrides = read_overrides(parsed.overrides)
    refuse_unsafe_command_line(overrides, parsed.experimental_rerun)
    loader = _config_loader(parsed)
    if loader is None:
        return {}
    _refuse_code_in_overrides(overrides)
    composer = Composer(loader, parsed.config_name or "train")
    mode = RunMode.MULTIRUN if parsed.multirun else RunMode.RUN
    _refuse_deleted_settings(composer, parsed.overrides, mode)
    cfg = composer.compose(parsed.overrides, mode)
    if cfg is None:
        return {}
    _refuse_code(cfg)
    reference_loader = config_loader(str(config_dir()), [])  # cnnlab's configs/ and Hydra's, no user folder
    _refuse_hydra_settings_from_files(composer, reference_loader, cfg, mode, parsed.overrides)
    runs = not (parsed.help or parsed.hydra_help or parsed.cfg or parsed.info or parsed.shell_completion
                or parsed.experimental_rerun) and cfg.get("resume") in (None, "")  # resumed: checked by run_job
    if not parsed.multirun:
        return _validated(cfg) if runs else {}
    swept = _swept_values(cfg, loader)
    hydra_overrides = OmegaConf.to_container(cfg.hydra.overrides.hydra, resolve=False)  # `${oc.env:...}` as typed
    samples = _sweep_samples(swept, cfg)
    jobs = _count_jobs(swept) if swept is not None else 0
    if len(samples) < jobs:  # a long sweep, checked by samples, would otherwise be silent until its first job
        print(f"cnnlab: checking the sweep's {jobs} job{'s' * (jobs != 1)} before any starts: composing {len(samples)} "
              f"that between them set every swept value (numbers of one setting: one of each kind).",
              file=sys.stderr, flush=True)
    for job_overrides in samples:
        named = _swept_only(swept, job_overrides)
        given = [*hydra_overrides, *job_overrides]
        job = composer.compose(given, RunMode.RUN, named)
        if job is not None:
            where = f" (in the sweep's job with {' '.join(named)})"
            _refuse_code(job, where)
            _refuse_hydra_settings_from_files(composer, reference_loader, job, RunMode.RUN, given, where)
    if not runs:
        return {}
    validated = _refuse_a_sweep_of_invalid_jobs(composer, hydra_overrides, swept)
    _refuse_a_launcher_this_machine_lacks(cfg)  # last: what the config may not do is named first
    return validated


def _refuse_hydra_settings_from_files(composer: Composer, reference_loader: Any, cfg: DictConfig, run_mode: Any,
                                      given: list[str], job: str = "") -> None:
    """cfg (composed with the overrides `given`): its Hydra node against the one cnnlab's configs/, the
    same options of Hydra's groups and the command line's Hydra settings give (see cnnlab.cli.hydra_settings)."""
    def file(key: str) -> str | None:
        return file_that_sets(composer.loader, composer.config_name, given, run_mode, key)

    refuse_overrides_from_files(cfg, given, job, file)
    lines = [line for line in given if line.partition("=")[0].lstrip("+~") == "hydra"
             or line.partition("=")[0].lstrip("+~").startswith("hydra.")]
    choices = hydra_choices(cfg)
    refuse_foreign_hydra_options([choice for choice in choices if choice.partition("=")[2] not in
                                  reference_loader.get_group_options(choice.partition("=")[0])], job)
    try:
        reference = reference_loader.load_configuration(config_name="train", overrides=[*lines, *choices],
                                                        run_mode=run_mode)
    except Exception as error:  # an override of a Hydra setting that only a config file added
        raise UserError(f"{' '.join(lines)}{job}: these overrides need settings of `hydra` that only a config file "
                        f"adds ({one_line(error, 200)}); config files may not add to `hydra`.") from None
    refuse_hydra_settings_from_files(cfg, reference, job, file)


def _refuse_deleted_settings(composer: Composer, lines: list[str], run_mode: Any) -> None:
    """`~trainer.epochs`: every setting of cnnlab's is needed by every run (Hydra's own may go)."""
    from cnnlab.config import unknown_setting

    deleted = [line for line in lines if line.startswith("~") and not line[1:].startswith("hydra")]
    if not deleted:
        return
    cfg = composer.compose([line for line in lines if line not in deleted], run_mode)
    for line in deleted:
        key = line[1:].partition("=")[0]
        exists = cfg is not None and OmegaConf.select(cfg, key, default=KeyError, throw_on_missing=False,
                                                      throw_on_resolution_failure=False) is not KeyError
        if exists:
            raise UserError(f"{line}: {key} cannot be deleted; every run needs it. Set it instead ({key}=VALUE), or "
                            f"leave out {line} to keep its default.")
        if cfg is not None:  # Hydra would say only that it does not exist
            section, _, name = key.partition(".") if "." in key else ("", "", key)
            raise UserError(f"{line}: {unknown_setting(section, name, cfg.get(section) if section else cfg)}")


def _refuse_a_launcher_this_machine_lacks(cfg: DictConfig) -> None:
    """submitit's SLURM launcher fails only once it calls sbatch, after the sweep folder is made."""
    import shutil

    if str(cfg.hydra.launcher.get("_target_")).endswith(".SlurmLauncher") and shutil.which("sbatch") is None:
        raise MissingTool("hydra/launcher=submitit_slurm submits each job with SLURM's sbatch, which is not on PATH "
                          "on this machine. Run the sweep on a SLURM login node, or choose hydra/launcher=basic, "
                          "joblib or submitit_local. Nothing has run and no folder was made.")


def task_key(cfg: DictConfig) -> str:
    """A composed config without Hydra's node, as YAML: the same for the check's composition of a
    job and the task config Hydra hands the job."""
    return OmegaConf.to_yaml(_without_hydra(cfg))


def _without_hydra(cfg: DictConfig) -> DictConfig:
    return OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])


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


def _refuse_code_in_overrides(overrides: list) -> None:
    for override in overrides:
        key = override.key_or_group.replace("/", ".")
        if "_target_" in key or key == "hydra.callbacks" or key.startswith("hydra.callbacks."):
            raise UserError(f"{override.input_line}: {key} names code for Hydra to run. {REFUSED}")


def _validated(cfg: DictConfig) -> dict[str, RunConfig]:
    """validate() of a composed config, before Hydra makes a folder: a rejected run leaves nothing.
    The run's config by its task_key(), unless its settings interpolate: `${hydra:...}` resolves only
    in a running job, which validates it there (as it does any config that resolves at its own time)."""
    from cnnlab.config import validate

    task = _without_hydra(cfg)
    key = OmegaConf.to_yaml(task)
    if "${hydra" in key:
        return {}
    run = validate(task)
    return {} if "${" in key else {key: run}


def _refuse_a_sweep_of_invalid_jobs(composer: Composer, hydra_overrides: list[str],
                                    swept: dict[str, list[str]] | None) -> dict[str, RunConfig]:
    """A sweep whose every job would be rejected for one reason is refused before any job runs; one
    with some valid jobs runs, and its invalid jobs are listed in the summary (status invalid).
    Returns the first valid job's config."""
    from hydra.types import RunMode

    if swept is None:
        return {}
    reasons = set()
    for count, job_overrides in enumerate(itertools.product(*swept.values())):
        if count == MAX_JOBS_CHECKED:
            return {}
        job = composer.compose([*hydra_overrides, *job_overrides], RunMode.RUN, _swept_only(swept, job_overrides))
        if job is None:
            return {}
        try:
            return _validated(job)
        except UserError as error:
            reasons.add(str(error))
        if len(reasons) > 1:
            return {}
    if reasons:
        raise UserError(f"{reasons.pop()} Every job of the sweep would be rejected for this reason; none has run.")
    return {}


def _config_loader(parsed) -> Any:
    """Hydra's config loader with the search path hydra.main builds (configs/, then --config-dir)."""
    from hydra import version
    from hydra.core.utils import setup_globals

    version.setbase(None)  # as hydra.main(version_base=None) does
    setup_globals()  # Hydra's resolvers (${now:...}), so that settings resolve as they will
    if parsed.config_dir is not None and not os.path.isdir(parsed.config_dir):
        return None  # Hydra says so itself
    prepend = [os.path.abspath(parsed.config_dir)] if parsed.config_dir is not None else []
    return config_loader(parsed.config_path or str(config_dir()), prepend)


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


def _swept_values(cfg: DictConfig, loader: Any) -> dict[str, list[str]] | None:
    """Each task override's key and `key=value` lines (one where it is not swept), in the order Hydra's
    BasicSweeper applies them (see sweep_lines); None for a sweep Hydra cannot run (it says so
    itself). A sweep that lists a value twice, or leaves a swept key out of the job names, is refused:
    two of its jobs would share one folder."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True) if cfg.hydra.sweeper.get("params") else {}
        typed = OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False)  # `${oc.env:...}` unresolved
        overrides = OverridesParser.create(config_loader=loader).parse_overrides(
            [*(f"{k}={v}" for k, v in params.items()), *typed])
        swept = sweep_lines(overrides)
        keys = {override.get_key_element(): override.key_or_group for override in overrides}
        excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    except Exception:
        return None
    for key, lines in swept.items():
        if not lines:
            raise UserError(f"The sweep over {key} has no values (an empty range(), or a glob() that matches none "
                            f"of its options): give it at least one. Nothing has run.")
        values = [line[len(key) + 1:] for line in lines]
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
    named = [override for override, lines in zip(job_overrides, swept.values()) if len(lines) > 1]
    return named or list(job_overrides)


def _count_jobs(swept: dict[str, list[str]]) -> int:
    count = 1
    for lines in swept.values():
        count *= len(lines)
    return count


def _sweep_samples(swept: dict[str, list[str]] | None, cfg: DictConfig) -> list[list[str]]:
    """Task overrides of a few jobs of the sweep that, between them, set every swept value (each one
    with the other sweeps at their first value), except that a setting swept over numbers takes
    one of each kind (trainer.seed=range(1,1001): one job, not a thousand compositions)."""
    if swept is None:
        return []
    lines = list(swept.values())
    firsts = [values[0] for values in lines]
    samples = [firsts]
    for i, (key, values) in enumerate(swept.items()):
        kinds = {firsts[i]: _number_kind(cfg, key, firsts[i])}
        for value in values[1:]:
            kind = _number_kind(cfg, key, value)
            if kind is None or kind not in kinds.values():
                kinds[value] = kind
                samples.append([*firsts[:i], value, *firsts[i + 1:]])
    return samples


def _number_kind(cfg: DictConfig, key: str, line: str) -> str | None:
    """"integer" or "decimal" for `key=NUMBER` where key is an existing setting of the task config
    (not a group, nothing of Hydra's, nothing added or deleted); None for anything else."""
    value = line[len(key) + 1:]
    if key.startswith(("+", "~", "hydra")) or "@" in key or not isinstance(cfg, DictConfig):
        return None
    try:
        node = OmegaConf.select(cfg, key, default=KeyError, throw_on_missing=False)
    except OmegaConfBaseException:  # an interpolation that resolves only in the job
        return None
    if node is KeyError or isinstance(node, (DictConfig, ListConfig)):
        return None
    return next((kind for kind, pattern in NUMBER_KINDS.items() if pattern.fullmatch(value)), None)

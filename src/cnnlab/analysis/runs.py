"""A run as `cnnlab compare` reads it from its folder: metrics.json, .hydra/config.yaml and
.hydra/overrides.yaml, and every setting as text. Works for every launcher and for runs that are
running, failed or not started yet; no torch."""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from cnnlab.errors import UserError, one_line
from cnnlab.rundir import METRICS_FILE, read_run_metrics
from cnnlab.status import Status

EVENTS_MARK = "tfevents"  # TensorBoard's reader takes every file whose name holds it for an event file


@dataclass
class Run:
    path: Path
    overrides: dict[str, str]  # from .hydra/overrides.yaml: key -> value as typed
    metrics: dict[str, Any] | None  # None while metrics.json does not exist
    settings: dict[str, str] = field(default_factory=dict)  # every setting as text: settings_of()
    composed: bool = False  # whether settings come from the composed config (else from the overrides alone)
    name: str = ""  # the settings that differ between the runs compared
    group: str = ""  # the same without trainer.seed
    rerun: str = ""  # the folder that tells a rerun of the same config and seed from the others

    def __post_init__(self) -> None:
        if not self.settings:
            self.settings = settings_of(None, self.overrides)

    @property
    def status(self) -> str:
        """metrics.json's status (a Status value, or what an odd file says); `missing` without one."""
        return str(Status.MISSING if self.metrics is None else self.metrics.get("status", Status.MISSING))

    def metric(self, key: str) -> Any:
        if self.metrics is None:
            return None
        value = self.metrics.get(key)
        if key == "dead_fraction" and isinstance(value, dict):
            return value.get("all")
        if key == "warnings":  # the kinds of the run's warning findings, e.g. "dying_units,saturation"
            findings = value if isinstance(value, list) else self.metrics.get("findings") or []
            kinds = [f.get("kind") for f in findings if isinstance(f, dict) and f.get("severity") == "warning"]
            return ",".join(dict.fromkeys(str(kind) for kind in kinds))
        return value


def is_run_dir(path: Path) -> bool:
    """A run folder: it has .hydra/ (its config) or metrics.json."""
    return (path / ".hydra").is_dir() or (path / METRICS_FILE).is_file()


def event_files(path: Path) -> tuple[list[Path], list[Path]]:
    """(the run's TensorBoard event files, what is named like one but is not a regular file: a FIFO,
    a socket, a device, a folder), told apart without opening any: a reader would wait on a FIFO for ever."""
    files, special = [], []
    try:
        entries = sorted(Path(path).iterdir())
    except OSError:
        return [], []
    for entry in entries:
        if EVENTS_MARK in entry.name:
            (files if file_kind(entry) == "file" and holds_events(entry) else special).append(entry)
    return files, special


def holds_events(path: Path) -> bool:
    """Whether a regular file starts as TensorBoard's writer starts every event file (its first record
    says `brain.Event:`), or is still empty: its reader skips a garbage file without a word."""
    try:
        with open(path, "rb") as file:
            start = file.read(64)
    except OSError:
        return False
    return not start or b"brain.Event:" in start


def file_kind(path: Path) -> str:
    """What is at `path`, links followed: "file", "FIFO", "socket", "device", "folder" or "unreadable"."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # a dangling link, say
        return "unreadable"
    kinds = ((stat.S_ISREG, "file"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"),
             (stat.S_ISBLK, "device"), (stat.S_ISDIR, "folder"))
    return next((kind for test, kind in kinds if test(mode)), "unreadable")


def skipped_events_note(special: list[Path]) -> str:
    """What a reader says about the special files event_files() left out."""
    kinds = {path: file_kind(path) for path in special}
    named = ", ".join(f"{path.name} ({'not TensorBoard events' if kind == 'file' else f'a {kind}'})"
                      for path, kind in kinds.items())
    return f"skipped {named}: named like a TensorBoard event file, but not a regular file of TensorBoard's events"


@contextmanager
def readable_events(path: Path) -> Iterator[Path]:
    """A folder for TensorBoard's reader, which reads every event file of the folder it is given:
    `path` itself, or, when `path` holds special files named like event files, a temporary folder
    of links to its regular event files only."""
    files, special = event_files(path)
    if not special:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="cnnlab-events-") as view:
        for file in files:
            os.symlink(file.resolve(), Path(view) / file.name)
        yield Path(view)


def _read_yaml(file: Path, kind: type, what: str) -> Any:
    """The YAML in `file` (None without the file); UserError naming the file when it is not a `kind`."""
    if not file.is_file():
        return None
    try:
        value = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UserError(f"{file} cannot be read: {one_line(error, 200)}") from None
    if value is not None and not isinstance(value, kind):
        raise UserError(f"{file} holds a {type(value).__name__}, not {what} Hydra writes")
    return value


def read_overrides(path: Path) -> dict[str, str]:
    """key -> value of the run's command-line overrides; UserError if the file cannot be read."""
    lines = _read_yaml(path / ".hydra" / "overrides.yaml", list, "the list of overrides")
    overrides = {}
    for line in lines or []:
        key, _, value = str(line).partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def _parse(text: str) -> Any:
    """An override's value as a config holds it: 0.01, true, [32, 32], relu."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)  # 1e-3, which YAML 1.1 reads as a string
        except ValueError:
            pass
    return value


def setting_text(value: Any) -> str:
    """A setting as names show it: true/false, 0.01 (not 0.010000), [32,32], null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(setting_text, value)) + "]"
    return str(value)


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_of(config: dict | None, overrides: dict[str, str]) -> dict[str, str]:
    """Every setting of a run as text, flattened (`optimizer.lr`), a group's choice under the group's
    name (`activation` for activation.name); from the composed config, and for what it does not hold
    (`preset`, or everything for a job not started yet) from the overrides."""
    flat = _flatten(config or {})
    for key in [key for key in flat if key.count(".") == 1 and key.endswith(".name")]:
        flat[key.removesuffix(".name")] = flat.pop(key)
    for key, value in overrides.items():
        flat.setdefault(key, _parse(value))
    return {key: setting_text(value) for key, value in flat.items()}


def read_run(path: Path) -> Run:
    """The run in `path`; UserError naming the file if one of its files cannot be read."""
    overrides = read_overrides(path)
    config = _read_yaml(path / ".hydra" / "config.yaml", dict, "the config")
    return Run(path, overrides, read_run_metrics(path), settings_of(config, overrides), composed=config is not None)

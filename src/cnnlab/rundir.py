"""The files of a run directory, written so that a crash never leaves a half-written one, and
the lock that keeps a second process from writing into a run that is still going."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cnnlab.errors import UserError, one_line

METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
PREVIOUS_CHECKPOINT = "last.prev.pt"  # the last checkpoint before it: the way back if last.pt is corrupt
BEST_CHECKPOINT = "best.pt"
LOCK_FILE = ".cnnlab.lock"


def replace_atomically(path: Path, write) -> None:
    """Write through `write(file)` into a temporary file beside `path`, then rename it over `path`.
    If writing fails (a full disk, say), the temporary file is removed and `path` is as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def keep_as(path: Path, kept: Path) -> None:
    """Make `kept` the file `path` is now, atomically: a hard link (no copy; a copy where the
    filesystem has none). Writers replace `path` by renaming, never in place, so `kept` stays as it is."""
    tmp = kept.with_name(f".{kept.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, kept)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_safe(value: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers, and a diverged run has them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    text = json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n"
    replace_atomically(Path(run_dir) / METRICS_FILE, lambda file: file.write(text.encode()))


def record_config(run_dir: Path, settings: dict[str, Any]) -> None:
    """Keep a resumed run's record of its config (.hydra/config.yaml) true when the resume changed
    a setting (a longer run, say); called once the resume has been accepted. `settings` is
    config.as_dict(run); what the record holds besides the run's settings (`resume`) stays as it is."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not settings or not path.is_file():
        return
    recorded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    config = {**recorded, **settings}  # in the record's order
    if config != recorded:
        text = OmegaConf.to_yaml(OmegaConf.create(config))
        replace_atomically(path, lambda file: file.write(text.encode()))


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


def read_metrics_or_none(run_dir: Path) -> dict[str, Any] | None:
    """The run's metrics, or None while there are none to read (not written yet, or cut short, or not
    a run's: read_run_metrics says why)."""
    try:
        metrics = read_metrics(run_dir)
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def read_run_metrics(path: Path) -> dict[str, Any] | None:
    """The run's metrics.json; None while there is none (a job that has not started); UserError if
    it is not the JSON object a run writes (it is written atomically, so it is never cut short)."""
    file = path / METRICS_FILE
    if not file.is_file():
        return None
    try:
        metrics = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{file} cannot be read: {one_line(error, 200)}") from None
    if not isinstance(metrics, dict):
        raise UserError(f"{file} holds a JSON {type(metrics).__name__}, not the object of results a run writes")
    return metrics


def last_checkpoint(run_dir: Path) -> Path:
    """Where a run keeps the checkpoint it resumes from."""
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def previous_checkpoint(run_dir: Path) -> Path:
    """Where a run keeps the last checkpoint before its latest one."""
    return Path(run_dir) / CHECKPOINT_DIR / PREVIOUS_CHECKPOINT


def best_checkpoint(run_dir: Path) -> Path:
    """Where a run keeps the weights of its best validation epoch."""
    return Path(run_dir) / CHECKPOINT_DIR / BEST_CHECKPOINT


# --- one writer per run directory ----------------------------------------------------------------
def locked_by(run_dir: Path) -> str | None:
    """The process id of the live run holding run_dir's lock (as it wrote it), or None when no
    process holds it. A run that died released it with its process."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return None
    with open(path) as file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return file.read().strip() or "?"
        fcntl.flock(file, fcntl.LOCK_UN)
    return None


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold run_dir's lock while the run writes into it. The operating system releases it when the
    process ends, however it ends, so a crashed run never blocks its resume."""
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        file = open(path, "a+")
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not the lock file cnnlab keeps there; remove it (rmdir) and run "
                        f"again.") from None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "?"
        file.close()
        raise UserError(f"{run_dir} is in use by another cnnlab process (pid {holder}) that is still writing "
                        f"into it. Wait for it to end, or choose another folder.") from None
    try:
        file.truncate(0)
        file.write(str(os.getpid()))
        file.flush()
        yield
    finally:
        fcntl.flock(file, fcntl.LOCK_UN)
        file.close()


def clear_unfinished(run_dir: Path) -> list[str]:
    """Remove what a run that never reached its first checkpoint left in run_dir (its events,
    metrics, a best.pt, a traceback), so that a new run there starts clean; returns what went. Only
    files cnnlab writes, and only in a folder with nothing else (foreign_files): never another tool's."""
    run_dir = Path(run_dir)
    if last_checkpoint(run_dir).is_file():
        raise ValueError(f"{run_dir} holds a checkpoint")  # never: callers resume such a folder
    refuse_foreign_files(run_dir, "the run directory")
    checkpoints = run_dir / CHECKPOINT_DIR
    removed = []
    for path in [*run_dir.glob("events.out.tfevents.*"), run_dir / METRICS_FILE, run_dir / "traceback.txt",
                 *checkpoints.glob("*.pt"), *checkpoints.glob(".*.tmp")]:
        if path.is_file():
            path.unlink()
            removed.append(str(path.relative_to(run_dir)))
    with contextlib.suppress(OSError):  # not empty: not cnnlab's to remove
        checkpoints.rmdir()
    return removed


# What cnnlab and Hydra write into a run directory (globs, relative to it); anything else is someone
# else's, and so are cnnlab's own names in a folder no cnnlab run has held (no LOCK_FILE).
RUN_FILES = (".hydra", ".hydra/*.yaml", "train.log", LOCK_FILE, "events.out.tfevents.*", METRICS_FILE,
             ".*.tmp", "traceback.txt", CHECKPOINT_DIR, f"{CHECKPOINT_DIR}/*.pt",  # .*.tmp: replace_atomically's
             f"{CHECKPOINT_DIR}/.*.tmp", "density", "density/*.png", "density/.*.tmp")
BEFORE_A_RUN = (".hydra", ".hydra/*.yaml", "train.log")  # what Hydra writes before cnnlab's run starts


def foreign_files(run_dir: Path, most: int = 3) -> list[Path]:
    """Up to `most` files or folders in run_dir that a new run there could delete or overwrite and
    that cnnlab did not make: names it never writes, or its own names where no cnnlab run has been."""
    run_dir = Path(run_dir)
    ours = (run_dir / LOCK_FILE).is_file()
    found = []
    for path in run_dir.rglob("*") if run_dir.is_dir() else []:  # stops at the first few: a home folder is large
        relative = path.relative_to(run_dir)
        allowed = RUN_FILES if ours else BEFORE_A_RUN
        if not any(relative.match(pattern) and len(relative.parts) == len(Path(pattern).parts) for pattern in allowed):
            found.append(path)
            if len(found) == most:
                break
    return found


def refuse_foreign_files(run_dir: Path, what: str) -> None:
    """A UserError naming what in run_dir cnnlab did not make, if anything: a new run there must not
    delete or overwrite another tool's files (a run dir that points at the wrong folder)."""
    found = foreign_files(run_dir)
    if found:
        names = ", ".join(str(path) for path in found)
        raise UserError(f"{what} {run_dir} holds files cnnlab did not make ({names}); a new run writes only into "
                        f"an empty folder or one of its own. Nothing was changed. Choose another folder.")

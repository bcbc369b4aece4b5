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
STUDY_DIR = "remedies"  # `cnnlab remedy`'s study of the run: a sweep of its own inside the run's folder


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


def write_record(run_dir: Path, record: dict[str, str]) -> None:
    """The run's record of its config (cli.job.config_record: path in run_dir -> text), each file atomically."""
    for name, text in record.items():
        replace_atomically(Path(run_dir) / name, lambda file, text=text: file.write(text.encode()))


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
# A live run holds two locks (flock): on its folder itself, and on LOCK_FILE, which also names its
# process. The folder's lock holds even when someone removes LOCK_FILE during the run (a new LOCK_FILE
# would be a new file, free to lock); LOCK_FILE's serves filesystems that cannot lock a folder (NFS).
def locked_by(run_dir: Path) -> str | None:
    """The process id of the live run holding run_dir's lock (as it wrote it; `unknown` when its lock
    file was removed), or None when no process holds it. A run that died released it with its process."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    folder = os.open(run_dir, os.O_RDONLY)
    try:
        if not _try_flock(folder, fcntl.LOCK_SH, is_folder=True):
            return _holder(run_dir)
    finally:
        os.close(folder)
    path = run_dir / LOCK_FILE
    if not path.is_file():
        return None
    with open(path) as file:
        if not _try_flock(file.fileno(), fcntl.LOCK_SH):
            return _holder(run_dir)
    return None  # closing the file released the lock just taken


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold run_dir's locks while the run writes into it. The operating system releases them when the
    process ends, however it ends, so a crashed run never blocks its resume."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = os.open(run_dir, os.O_RDONLY)
    file = None
    try:
        if _try_flock(folder, fcntl.LOCK_EX, is_folder=True):  # before LOCK_FILE is made: a refused run adds nothing
            try:
                file = open(run_dir / LOCK_FILE, "a+")
            except IsADirectoryError:
                raise UserError(f"{run_dir / LOCK_FILE} is a folder, not the lock file cnnlab keeps there; remove it "
                                f"(rmdir) and run again.") from None
        if file is None or not _try_flock(file.fileno(), fcntl.LOCK_EX):
            raise UserError(f"{run_dir} is in use by another cnnlab process (pid {_holder(run_dir)}) that is still "
                            f"writing into it. Wait for it to end, or choose another folder.")
        file.truncate(0)
        file.write(str(os.getpid()))
        file.flush()
        yield
    finally:
        if file is not None:
            file.close()  # closing releases a lock
        os.close(folder)


def _try_flock(fd: int, mode: int, is_folder: bool = False) -> bool:
    """Take the flock `mode` on fd without waiting: False while another process holds one that
    conflicts. A folder on a filesystem that cannot lock one counts as free (LOCK_FILE still guards it)."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        if not is_folder:
            raise
    return True


def _holder(run_dir: Path) -> str:
    """What LOCK_FILE says about the process holding run_dir: its id, or `unknown` once removed."""
    try:
        return (Path(run_dir) / LOCK_FILE).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


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
        if ours and relative.parts[0] == STUDY_DIR:  # its remedy study's runs: never touched by a run here
            continue
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

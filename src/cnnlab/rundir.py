"""The files of a run directory, written so that a crash never leaves a half-written one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


def replace_atomically(path: Path, write) -> None:
    """Write through `write(file)` into a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    text = json.dumps(metrics, indent=2) + "\n"
    replace_atomically(Path(run_dir) / METRICS_FILE, lambda file: file.write(text.encode()))


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


def read_metrics_or_none(run_dir: Path) -> dict[str, Any] | None:
    """The run's metrics, or None while there are none to read (not written yet, or cut short)."""
    try:
        return read_metrics(run_dir)
    except (OSError, ValueError):
        return None


def last_checkpoint(run_dir: Path) -> Path:
    """Where a run keeps the checkpoint it resumes from."""
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def best_checkpoint(run_dir: Path) -> Path:
    """Where a run keeps the weights of its best validation epoch."""
    return Path(run_dir) / CHECKPOINT_DIR / BEST_CHECKPOINT

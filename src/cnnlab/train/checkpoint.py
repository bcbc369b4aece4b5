"""Checkpoints: what last.pt and best.pt hold, written atomically from a TrainState, and read back
(tensors and plain containers only) into one after checking that they fit the run.

last.pt is everything a run needs to continue exactly where it was written (weights, optimizer,
schedule, random number generators, data order, the logging window, counters, metrics); best.pt
is the weights of the best validation epoch. Writing a new last.pt keeps the one before it as
last.prev.pt (a hard link: no copy), the way back when last.pt turns out corrupt.

Every checkpoint is verified when it is read: torch.save writes a zip archive that holds a CRC-32
checksum of each of its records (the pickle, each tensor), which torch.load does not check. The
checksums are written in the same file, by the same rename, so no crash can leave a checkpoint and
its checksum out of step, and checkpoints of earlier cnnlab versions carry them too.
"""

from __future__ import annotations

import pickle
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from cnnlab.errors import UserError, one_line
from cnnlab.rundir import best_checkpoint, keep_as, last_checkpoint, previous_checkpoint, replace_atomically
from cnnlab.status import Status
from cnnlab.train.state import TrainState

# What every last.pt holds (resume.load_resumable refuses one without them: a best.pt copied over it, say).
LAST_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "batch", "rng", "log", "metrics")


class CorruptCheckpoint(UserError):
    """A checkpoint file that cannot be read back as it was written: truncated, damaged, not a checkpoint."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """A failed write (a full disk, a file too large) is an OSError that names the checkpoint: torch's
    zip writer turns the OSError of its file into a RuntimeError ("unexpected pos ...")."""
    try:
        replace_atomically(Path(path), lambda file: torch.save(state, file))
    except (OSError, RuntimeError) as error:
        cause = error if isinstance(error, OSError) else error.__context__
        if not isinstance(cause, OSError) or cause.errno is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from error


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Tensors and plain containers only (weights_only): a checkpoint someone sent must not be able
    to run code when it is opened. Anything unreadable is the user's to know about, not a crash."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No checkpoint at {path}.")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CorruptCheckpoint(f"Cannot read checkpoint {path}: it is not a complete file written by torch.save "
                                f"(truncated, or not a checkpoint at all).")
    damaged = damaged_record(path)
    if damaged:
        raise CorruptCheckpoint(f"{path} is corrupt ({damaged}); it cannot be loaded.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Weights only load failed" in str(error):
            raise UserError(
                f"Refused to load {path}: it holds Python objects other than tensors and plain containers, "
                f"which could run code when unpickled. cnnlab only opens checkpoints with weights_only=True."
            ) from None
        raise CorruptCheckpoint(f"Cannot read checkpoint {path} (corrupt?): {one_line(error, 300)}") from None
    except Exception as error:  # truncated files raise EOFError, RuntimeError, ...
        raise CorruptCheckpoint(f"Cannot read checkpoint {path} (truncated or corrupt?): {one_line(error, 300)}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a cnnlab checkpoint (it holds a {type(state).__name__}, not a dict).")
    return state


def damaged_record(path: Path) -> str | None:
    """What in the archive at `path` does not match the CRC-32 checksum written with it, or None when
    every record does (about 2 ms for the default MLP's 2.8 MB)."""
    name = "its directory"
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.CRC == 0 and record.file_size:  # written without checksums (torch's compute_crc32=False)
                    continue
                name = record.filename
                with archive.open(record) as data:
                    while data.read(1 << 20):  # zipfile checks the CRC-32 at the record's end
                        pass
    except Exception as error:  # a CRC mismatch or a damaged header: BadZipFile, EOFError, ValueError, ...
        if "CRC-32" in str(error):
            return f"checksum mismatch in record {name}"
        return f"damaged archive at {name}: {one_line(error, 200)}"
    return None


# --- writing ---------------------------------------------------------------------------------------
def save_last(state: TrainState) -> None:
    """last.pt: the run as it stands after state.batch batches of epoch state.epoch."""
    state.log.writer.flush()  # every event up to this step is on disk before a checkpoint covers it
    epoch_done = state.batch >= len(state.data.train)
    scaler = state.precision.scaler
    path = last_checkpoint(state.run_dir)
    if path.is_file():
        keep_as(path, previous_checkpoint(state.run_dir))  # before the new one replaces it
    save_checkpoint(path, {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "epoch": state.epoch,
        "step": state.step,
        "batch": state.batch,  # batches of this epoch done
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(state.device) if state.device.type == "cuda" else None,
            "data": state.data.train.state_dict(),
        },
        "log": state.log.state_dict(),
        "probes": state.probes.state_dict() if state.probes is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "metrics": dict(state.metrics, epochs=state.epoch - (not epoch_done), steps=state.step,
                        seconds=round(time.perf_counter() - state.started, 3)),
        "config": state.config,
    })


def save_best(state: TrainState, val_acc: float) -> None:
    """best.pt: the weights of the epoch with the best validation accuracy so far."""
    save_checkpoint(best_checkpoint(state.run_dir), {
        "model": state.model.state_dict(), "epoch": state.epoch, "step": state.step, "val_acc": val_acc,
        "config": state.config})


def restore(state: TrainState, saved: dict[str, Any]) -> None:
    """Put every piece of training state back as the checkpoint holds it, counters included; a
    checkpoint that closed its epoch continues with the next one. resume.check_fits first."""
    try:
        state.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        if state.scheduler is not None:
            state.scheduler.load_state_dict(saved["scheduler"])
        if state.precision.scaler is not None and saved.get("scaler"):
            state.precision.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"]["torch"])
        if state.device.type == "cuda" and saved["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], state.device)
        batches = state.data.train
        state.epoch, state.step, state.batch = saved["epoch"], saved["step"], saved["batch"]
        batches.load_state_dict(saved["rng"]["data"], resume_at=state.batch if state.batch < len(batches) else 0)
        state.log.load_state_dict(saved["log"])
        if state.probes is not None and saved.get("probes"):
            state.probes.load_state_dict(saved["probes"])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        raise UserError(f"{last_checkpoint(state.run_dir)} does not fit this run and cannot be resumed: "
                        f"{one_line(error, 300)}") from None
    if state.batch >= len(state.data.train):
        state.epoch, state.batch = state.epoch + 1, 0
    state.metrics.update(saved["metrics"], status=Status.RUNNING.value)

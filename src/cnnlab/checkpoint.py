"""Checkpoints: what last.pt and best.pt hold, written atomically from a TrainState, and read back
(tensors and plain containers only) into one after checking that they fit the run.

last.pt is everything a run needs to continue exactly where it was written (weights, optimizer,
schedule, random number generators, data order, the logging window, counters, metrics); best.pt
is the weights of the best validation epoch.
"""

from __future__ import annotations

import pickle
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cnnlab.config import resumable
from cnnlab.errors import UserError, one_line
from cnnlab.rundir import best_checkpoint, last_checkpoint, replace_atomically

if TYPE_CHECKING:
    from cnnlab.trainer import TrainState

LAST_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "batch", "rng", "log", "metrics")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    replace_atomically(Path(path), lambda file: torch.save(state, file))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Tensors and plain containers only (weights_only): a checkpoint someone sent must not be able
    to run code when it is opened. Anything unreadable is the user's to know about, not a crash."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No checkpoint at {path}.")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise UserError(f"Cannot read checkpoint {path}: it is not a complete file written by torch.save "
                        f"(truncated, or not a checkpoint at all).")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Weights only load failed" in str(error):
            raise UserError(
                f"Refused to load {path}: it holds Python objects other than tensors and plain containers, "
                f"which could run code when unpickled. cnnlab only opens checkpoints with weights_only=True."
            ) from None
        raise UserError(f"Cannot read checkpoint {path} (corrupt?): {one_line(error, 300)}") from None
    except Exception as error:  # truncated files raise EOFError, RuntimeError, ...
        raise UserError(f"Cannot read checkpoint {path} (truncated or corrupt?): {one_line(error, 300)}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a cnnlab checkpoint (it holds a {type(state).__name__}, not a dict).")
    return state


# --- writing ---------------------------------------------------------------------------------------
def save_last(state: TrainState) -> None:
    """last.pt: the run as it stands after state.batch batches of epoch state.epoch."""
    state.log.writer.flush()  # every event up to this step is on disk before a checkpoint covers it
    epoch_done = state.batch >= len(state.data.train)
    scaler = state.precision.scaler
    save_checkpoint(last_checkpoint(state.run_dir), {
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


# --- reading back ----------------------------------------------------------------------------------
def load_resumable(run_dir: Path, config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """run_dir's last.pt, refused unless it is complete and was written by this run's configuration."""
    path = last_checkpoint(run_dir)
    saved = load_checkpoint(path, map_location=device)
    missing = [key for key in LAST_KEYS if key not in saved]
    if missing:
        raise UserError(f"{path} is not a complete cnnlab checkpoint (no {', '.join(missing)}); it cannot be resumed.")
    differs = differing_settings(saved.get("config") or {}, config)
    if differs:
        shown = ", ".join(differs[:6]) + (f" and {len(differs) - 6} more" if len(differs) > 6 else "")
        raise UserError(
            f"{path} was written by a different configuration ({shown} differ) and cannot be resumed as "
            f"this run; start a new run in another directory.")
    return saved


def differing_settings(written_by: dict[str, Any], config: dict[str, Any], prefix: str = "") -> list[str]:
    """Every setting (dotted key) that shapes a run and differs between two configs; the settings
    a resume may change (config.resumable) and `resume` itself do not count."""
    differs = []
    for key in sorted(set(written_by) | set(config), key=str):
        dotted = f"{prefix}{key}"
        if resumable(dotted) or dotted == "resume":
            continue
        old, new = written_by.get(key), config.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differs += differing_settings(old, new, f"{dotted}.")
        elif old != new:
            differs.append(dotted)
    return differs


def check_fits(saved: dict[str, Any], state: TrainState) -> None:
    """Refuse a checkpoint whose weights do not fit this run's model, before anything is changed."""
    expected, weights = state.model.state_dict(), saved["model"]
    wrong = sorted(set(expected) ^ set(weights)) or [
        key for key in expected if tuple(weights[key].shape) != tuple(expected[key].shape)]
    if wrong:
        raise UserError(f"{last_checkpoint(state.run_dir)} holds a different model than this run's "
                        f"({', '.join(wrong[:4])} differ); it cannot be resumed as this run.")


def restore(state: TrainState, saved: dict[str, Any]) -> None:
    """Put every piece of training state back as the checkpoint holds it, counters included; a
    checkpoint that closed its epoch continues with the next one."""
    check_fits(saved, state)
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
    state.metrics.update(saved["metrics"], status="running")

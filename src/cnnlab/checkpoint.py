"""Checkpoints: written atomically, read back with tensors and plain containers only."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from cnnlab.errors import UserError
from cnnlab.rundir import replace_atomically


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    replace_atomically(Path(path), lambda file: torch.save(state, file))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Tensors and plain containers only (weights_only): a checkpoint someone sent must not be able
    to run code when it is opened. Anything unreadable is the user's to know about, not a crash."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No checkpoint at {path}.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Weights only load failed" in str(error):
            raise UserError(
                f"Refused to load {path}: it holds Python objects other than tensors and plain containers, "
                f"which could run code when unpickled. cnnlab only opens checkpoints with weights_only=True."
            ) from None
        raise UserError(f"Cannot read checkpoint {path} (corrupt?): {_one_line(error)}") from None
    except Exception as error:  # truncated files raise EOFError, RuntimeError, ...
        raise UserError(f"Cannot read checkpoint {path} (truncated or corrupt?): {_one_line(error)}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a cnnlab checkpoint (it holds a {type(state).__name__}, not a dict).")
    return state


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__

"""Checkpoints: written atomically, read back with tensors and plain containers only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cnnlab.rundir import replace_atomically


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    replace_atomically(Path(path), lambda file: torch.save(state, file))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    # weights_only: a checkpoint someone sent must not be able to run code when it is opened.
    return torch.load(path, map_location=map_location, weights_only=True)

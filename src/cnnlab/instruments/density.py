"""Activation density images: how a layer's outputs are spread, probe after probe, in one picture.

fastai's "colorful dimension", with a fixed signed value range, so that every column of one layer
shares its buckets and a drift of the whole distribution shows as a drift in the picture. x is the
probe (left to right), y the output value (high values at the top), colour log(1 + count).

Values outside the range are clamped into the edge buckets rather than dropped: a layer whose
outputs blow up past the range shows a bright top (or bottom) row instead of fading to nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

COLORMAP = "viridis"  # perceptually uniform; empty buckets get its darkest colour
# histc counts in float32, which stops counting one by one past 2**24: count larger tensors in chunks.
HISTC_CHUNK = 2**24


def density_column(output: Tensor, low: float, high: float, bins: int, chunk: int = HISTC_CHUNK) -> Tensor:
    """Counts (float64, [bins]) of `output`'s values in `bins` even buckets over [low, high], on the
    device, no host sync, `chunk` elements at a time. Values beyond the range count in the edge
    buckets; NaN is not counted."""
    if not low < high:
        raise ValueError(f"the range [{low}, {high}] is empty: low must be below high")
    x = output.detach().flatten().float()
    counts = torch.zeros(bins, dtype=torch.float64, device=x.device)
    with histc_allowed(x.device):
        for part in x.split(chunk):  # clamping per chunk: no copy of the whole tensor
            counts += torch.histc(part.clamp(low, high), bins=bins, min=low, max=high).double()
    return counts


@contextmanager
def histc_allowed(device: torch.device) -> Iterator[None]:
    """torch.histc under trainer.deterministic: on CUDA, histc adds 1.0 per element with float
    atomics and torch flags it as nondeterministic, but sums of whole numbers below 2**24 are exact
    in any order, so its counts are deterministic."""
    enabled = torch.are_deterministic_algorithms_enabled()
    if not (enabled and device.type == "cuda"):
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)


def _log_counts(columns: Tensor | Sequence[Tensor]) -> np.ndarray:
    """log(1 + count) as [steps, bins]."""
    return np.log1p(torch.stack([torch.as_tensor(column).detach().double().cpu() for column in columns]).numpy())


def density_image(columns: Tensor | Sequence[Tensor]) -> np.ndarray:
    """uint8 RGB [bins, steps, 3] from one column of counts per probe (a [steps, bins] tensor or a
    list of [bins] tensors): row 0 is the highest bucket, column 0 the first probe."""
    import matplotlib

    logs = _log_counts(columns)
    scaled = logs / logs.max() if logs.max() > 0 else logs  # per image: its fullest bucket is the top colour
    rgba = matplotlib.colormaps[COLORMAP](scaled.T[::-1])
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges halfway between centres (which may be unevenly spaced), the ends mirrored."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    middle = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - middle[0]], middle, [2 * centres[-1] - middle[-1]]])


def write_density_png(path: str | Path, columns: Tensor | Sequence[Tensor], steps: Sequence[int], low: float,
                      high: float, title: str) -> Path:
    """The density image as a PNG figure: probe step on x (real step numbers, uneven spacing kept),
    output value on y over [low, high], and a colourbar of log(1 + count): the colours of density_image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = _log_counts(columns)
    if len(steps) != len(logs):
        raise ValueError(f"{len(steps)} steps for {len(logs)} columns")
    figure, axis = plt.subplots(figsize=(8, 4.5))
    x = _edges(np.asarray(steps, dtype=float))
    y = np.linspace(low, high, logs.shape[1] + 1)
    mesh = axis.pcolormesh(x, y, logs.T, cmap=COLORMAP, vmin=0, vmax=max(logs.max(), 1e-12), shading="flat")
    figure.colorbar(mesh, ax=axis, label="log(1 + count)")
    axis.set(title=title, xlabel="probe step", ylabel="output value")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)

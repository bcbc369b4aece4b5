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


def cell_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges halfway between probe steps (which may be unevenly spaced), the outer ones at the
    first and last step: the x axis runs over the steps probed, never before step 0. One probe gets a
    cell one step wide."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    return np.concatenate([[steps[0]], (steps[1:] + steps[:-1]) / 2, [steps[-1]]])


DENSITY_MARGINS = {"left": 0.085, "right": 1.0, "bottom": 0.11, "top": 0.93}  # of the 800 x 450 figure


def render_density(columns: Tensor | Sequence[Tensor], steps: Sequence[int], low: float, high: float,
                   title: str) -> np.ndarray:
    """The density image as a figure, uint8 RGB [450, 800, 3]: probe step on x (real step numbers,
    uneven spacing kept), output value on y over [low, high], colour log(1 + count) with its colour
    bar. TensorBoard shows this array as it is; write_png saves it as the run folder's PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = _log_counts(columns)
    if len(steps) != len(logs):
        raise ValueError(f"{len(steps)} steps for {len(logs)} columns")
    # fixed margins, not tight_layout: the figure's size and labels are always alike, and the layout
    # search took half of each render (about 0.1 s a layer at every epoch end)
    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=100, gridspec_kw=DENSITY_MARGINS)
    try:
        x = cell_edges(np.asarray(steps, dtype=float))
        y = np.linspace(low, high, logs.shape[1] + 1)
        mesh = axis.pcolormesh(x, y, logs.T, cmap=COLORMAP, vmin=0, vmax=max(logs.max(), 1e-12), shading="flat")
        figure.colorbar(mesh, ax=axis, label="log(1 + count)")
        axis.set(title=title, xlabel="probe step", ylabel="output value", xlim=(x[0], x[-1]), ylim=(low, high))
        figure.canvas.draw()
        return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    finally:
        plt.close(figure)


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Save an RGB array as a PNG, replacing the file at once (a reader never sees half of it)."""
    from PIL import Image

    from cnnlab.rundir import replace_atomically

    replace_atomically(Path(path), lambda file: Image.fromarray(image).save(file, format="PNG"))
    return Path(path)

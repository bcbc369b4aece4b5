"""What goes into TensorBoard beyond plain scalars: probe results, histograms, the chart layout."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from cnnlab.probes import Measurement

# Custom-scalars layout: every layer of one statistic on one chart.
LAYOUT = {
    "training": {
        "loss": ["Multiline", [r"(train|val|test)/loss"]],
        "accuracy": ["Multiline", [r"(train|val|test)/acc"]],
    },
    "layers": {
        "dead fraction": ["Multiline", [r"dead_fraction/.*"]],
        "saturation": ["Multiline", [r"saturation/.*"]],
        "activation mean": ["Multiline", [r"act_mean/.*"]],
        "activation std": ["Multiline", [r"act_std/.*"]],
        "gradient norm": ["Multiline", [r"grad_norm/.*"]],
        "update ratio (log10)": ["Multiline", [r"update_ratio/.*"]],
        "PReLU slope": ["Multiline", [r"prelu_slope/.*"]],
    },
}


def write_layout(writer: SummaryWriter) -> None:
    writer.add_custom_scalars(LAYOUT)


def write_probe(writer: SummaryWriter, step: int, measurements: list[Measurement]) -> dict[str, float]:
    """Write one probe's results with a single transfer to the host; returns the dead fractions
    per layer and over the whole network ("all")."""
    if not measurements:
        return {}
    values = torch.cat([m.value.detach().reshape(-1).double() for m in measurements]).tolist()
    dead: dict[str, float] = {}
    dead_units = total_units = 0
    offset = 0
    for m in measurements:
        size = m.value.numel()
        chunk, offset = values[offset:offset + size], offset + size
        if m.kind == "scalar":
            writer.add_scalar(m.tag, chunk[0], step)
        elif m.kind == "dead":
            fraction = chunk[0] / m.units
            writer.add_scalar(m.tag, fraction, step)
            dead[m.tag.split("/", 1)[1]] = fraction
            dead_units, total_units = dead_units + chunk[0], total_units + m.units
        else:
            _write_histogram(writer, m.tag, chunk, step)
    if total_units:
        dead["all"] = dead_units / total_units
        writer.add_scalar("dead_fraction/all", dead["all"], step)
    return dead


def _write_histogram(writer: SummaryWriter, tag: str, values: list[float], step: int) -> None:
    low, high, total, squares, *counts = values
    if high > low:
        start, width = low, (high - low) / len(counts)
    else:  # a constant tensor: everything is in the first bucket, centred on the value
        width = max(abs(low), 1.0) * 1e-3
        start = low - width / 2
    writer.add_histogram_raw(
        tag, min=low, max=high, num=int(sum(counts)), sum=total, sum_squares=squares,
        bucket_limits=[start + width * (i + 1) for i in range(len(counts))], bucket_counts=counts,
        global_step=step,
    )

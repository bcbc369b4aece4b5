"""The comparison figures: one small function per figure in FIGURES, each drawing from one
Drawing (the runs by configuration, their scalar series, colours, labels), written as PNG files and
to TensorBoard by make_figures. matplotlib and torch are imported only to draw."""

from __future__ import annotations

import math
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.analysis.findings import EDGE_PAIRS
from cnnlab.analysis.names import fixed_settings
from cnnlab.analysis.runs import Run, readable_events
from cnnlab.analysis.stats import CONFIDENCE, by_group, completed_spread, mean_curve
from cnnlab.statistics import ACTIVATION, LAYER_START, compared_tags, layer_depth, split_tag
from cnnlab.status import Status

Series = dict[str, tuple[list[int], list[float]]]  # tag -> (steps, values)


MAX_INCHES = 16.0  # the most either side of a figure grows to, however many configurations


DPI = 100  # so a PNG is at most 1600 x 1600 pixels


LABEL_CHARS = 48  # legend and tick labels wrap at this many characters, onto two lines at most


def read_scalars(run: Run, prefixes: tuple[str, ...]) -> Series:
    """Scalar series of a run whose tag starts with one of `prefixes`, read by TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with readable_events(run.path) as folder:  # never a FIFO named like an event file: it would block
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
    series = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith(prefixes):
            points = events.Scalars(tag)
            series[tag] = ([p.step for p in points], [p.value for p in points])
    return series


@dataclass
class Drawing:
    """What every figure draws from: the runs drawn, by configuration, their scalar series (by run
    path), a colour and a legend label per configuration, and the settings every run shares."""
    groups: dict[str, list[Run]]
    scalars: dict[Path, Series]
    colours: dict[str, Any]
    labels: dict[str, str]
    fixed: str


def _label(name: str, members: list[Run]) -> str:
    statuses = sorted({run.status for run in members if run.status != Status.COMPLETED})
    seeds = f" ({len(members)} seeds)" if len(members) > 1 else ""
    text = f"{name}{seeds}" + (f" [{', '.join(statuses)}]" if statuses else "")
    return "\n".join(textwrap.wrap(text, LABEL_CHARS, max_lines=2, placeholder=" …"))


def _palette(count: int) -> list:
    """tab10 for up to 10 colours; then tab20's dark shades, its light ones, tab20b and tab20c (60)."""
    import matplotlib

    if count <= 10:
        return list(matplotlib.colormaps["tab10"].colors)
    tab20 = matplotlib.colormaps["tab20"].colors
    return [*tab20[0::2], *tab20[1::2], *matplotlib.colormaps["tab20b"].colors, *matplotlib.colormaps["tab20c"].colors]


def drawing(runs: list[Run], scalars: dict[Path, Series]) -> Drawing:
    """The Drawing of the runs that have something to draw: not those that never started training
    (a rejected config) or failed before their first probe, which have no series."""
    drawn = [run for run in runs if run.status != Status.INVALID and scalars.get(run.path)]
    groups = by_group(drawn)
    palette = _palette(len(groups))
    fixed = ", ".join(f"{key}={value}" for key, value in fixed_settings(runs).items())
    return Drawing(groups, scalars, {name: palette[i % len(palette)] for i, name in enumerate(groups)},
                   {name: _label(name, members) for name, members in groups.items()}, fixed)


def _wrap(text: str, inches: float, points: float = 10.0, lines: int | None = None) -> str:
    """`text` in lines that fit `inches` at `points` (an average glyph is about 0.6 em wide)."""
    width = max(8, int(inches * 72 / (points * 0.6)))
    return "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder=" …"))


def _entries(d: Drawing, names: list[str] | None = None) -> list[tuple[str, Any]]:
    """One legend entry per configuration: (label, colour)."""
    return [(d.labels[name], d.colours[name]) for name in (d.groups if names is None else names)]


def _figure(d: Drawing, rows: int, cols: int, panel: tuple[float, float], title: str,
            legend: list[tuple[str, Any]], **subplots):
    """rows x cols panels of about `panel` inches, the figure capped at MAX_INCHES a side, the title
    and the fixed settings above and `legend` (label, colour) below, in as many columns as fit."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    width = min(MAX_INCHES, cols * panel[0])
    headline = _wrap(title, width) + (f"\n{_wrap('fixed: ' + d.fixed, width)}" if d.fixed else "")
    lines = [line for label, _ in legend for line in label.split("\n")]
    longest = max(map(len, lines), default=0)
    columns = max(1, min(len(legend), int((width - 0.3) / (0.6 + longest * 8.3 * 0.6 / 72)))) if legend else 1
    legend_height = 0.19 * math.ceil(len(legend) / columns) * len(lines) / max(1, len(legend))
    height = min(MAX_INCHES, rows * panel[1] + 0.25 * (headline.count("\n") + 1) + legend_height + 0.3)
    figure, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False, layout="constrained", **subplots)
    figure.suptitle(headline, fontsize="medium")
    if legend:
        handles = [Line2D([], [], color=colour, linewidth=2) for _, colour in legend]
        figure.legend(handles, [label for label, _ in legend], loc="outside lower center", ncols=columns,
                      fontsize="small", frameon=False)
    return figure, axes


def _mean_line(axis, series, colour, marker: str | None = None, bounds=(-math.inf, math.inf)) -> None:
    """The mean over the runs, with its confidence band (cut to `bounds`, as [0, 1] for an accuracy)."""
    import numpy as np

    steps, mean, half = mean_curve(series)
    axis.plot(steps, mean, color=colour, marker=marker, markersize=3)
    if half is not None:
        axis.fill_between(steps, np.clip(mean - half, *bounds), np.clip(mean + half, *bounds), color=colour,
                          alpha=0.2, linewidth=0)


def _depth(tag: str) -> int:
    """act_mean/act07_conv -> 7."""
    return layer_depth(split_tag(tag)[1])


def _series(d: Drawing, members: list[Run], tag: str) -> list[tuple[list[int], list[float]]]:
    return [d.scalars[run.path][tag] for run in members if tag in d.scalars[run.path]]


def _val_curves(d: Drawing):
    """Training loss per log step (when logged), validation loss and accuracy per epoch; None without any."""
    import matplotlib.ticker

    panels = {"train/loss": "training loss (log scale), every trainer.log_every steps",
              "val/loss": "validation loss (log scale), one point per epoch",
              "val/acc": "validation accuracy, one point per epoch"}
    panels = {tag: title for tag, title in panels.items() if any(tag in series for series in d.scalars.values())}
    if not panels or not d.groups:
        return None
    figure, axes = _figure(d, 1, len(panels), (5.4, 3.8), "loss and accuracy against step: mean over seeds, band = "
                           f"{CONFIDENCE:.0%} confidence interval of the mean (Student t)", _entries(d))
    for axis, (tag, title) in zip(axes[0], panels.items()):
        for name, members in d.groups.items():
            if series := _series(d, members, tag):
                _mean_line(axis, series, d.colours[name], marker="o" if tag.startswith("val/") else None,
                           bounds=(0, 1) if tag.endswith("acc") else (-math.inf, math.inf))
        axis.set_title(_wrap(title, figure.get_figwidth() / len(panels), 9), fontsize="small")
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # steps are whole
        axis.set_yscale("log" if tag.endswith("loss") else "linear")
        axis.grid(alpha=0.3)
    return figure


def _test_accuracy(d: Drawing):
    """Horizontal bars, one per configuration, so that long names fit beside them."""
    if not d.groups:
        return None
    names = list(d.groups)
    longest = max(len(line) for name in names for line in d.labels[name].split("\n"))
    title = (f"final test accuracy: bar = mean over completed seeds, whisker = {CONFIDENCE:.0%} confidence interval "
             f"(Student t), dots = seeds")
    figure, axes = _figure(d, 1, 1, (5 + 0.075 * longest, 1.2 + 0.36 * len(names)), title, [])
    axis = axes[0][0]
    for i, name in enumerate(names):
        accuracy = completed_spread(d.groups[name], "test_acc")
        if accuracy.mean is None:
            axis.text(0.01, i, "no result", va="center", fontsize="small")
            continue
        axis.barh(i, accuracy.mean, xerr=accuracy.ci95, color=d.colours[name], alpha=0.7, capsize=3)
        axis.scatter(accuracy.values, [i] * accuracy.count, color="black", s=10, zorder=3)
    axis.set_yticks(range(len(names)), [d.labels[name] for name in names], fontsize="small")
    axis.set(xlim=(0, 1), ylim=(len(names) - 0.5, -0.5), xlabel="test accuracy")
    axis.grid(axis="x", alpha=0.3)
    return figure


def _dead_fraction(d: Drawing):
    """One panel per configuration, one line per layer (one legend for all); None without dead fractions."""
    import matplotlib
    import matplotlib.ticker

    layers = f"dead_fraction/{LAYER_START[ACTIVATION]}"  # dead_fraction/act01_fc, not dead_fraction/all
    tags = sorted({tag for series in d.scalars.values() for tag in series if tag.startswith(layers)},
                  key=lambda tag: (_depth(tag), tag))
    if not tags or not d.groups:
        return None
    colours = {tag: matplotlib.colormaps["viridis"](i / max(1, len(tags) - 1)) for i, tag in enumerate(tags)}
    cols = min(len(d.groups), math.ceil(math.sqrt(len(d.groups))))
    rows_ = math.ceil(len(d.groups) / cols)
    legend = [(split_tag(tag)[1], colour) for tag, colour in colours.items()]
    figure, grid = _figure(d, rows_, cols, (3.4, 2.8), "dead fraction of each activation layer on the training "
                           "images against step (step 0 and epoch ends, mean over seeds), one panel per configuration",
                           legend, sharey=True)
    for axis, (name, members) in zip(grid.flat, d.groups.items()):
        for tag in tags:
            if series := _series(d, members, tag):
                steps, mean, _ = mean_curve(series)
                axis.plot(steps, mean, marker=".", color=colours[tag])  # step 0 and epoch ends: few points
        title = d.labels[name].replace("\n", " ")
        axis.set_title(_wrap(title, figure.get_figwidth() / cols, 8, lines=3), fontsize="small")
        axis.set_ylim(-0.02, 1.02)
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
        axis.tick_params(labelsize="small")
        axis.grid(alpha=0.3)
    for axis in list(grid.flat)[len(d.groups):]:
        figure.delaxes(axis)
    grid[0][0].set_ylabel("dead fraction")
    return figure


def _depth_lines(axis, prefix: str, members: list[Run], scalars: dict[Path, Series], colour) -> None:
    """One statistic against depth for one group: at the first probe (step 0, dashed) and the last (solid)."""
    tags = sorted((tag for tag in scalars[members[0].path] if tag.startswith(prefix)), key=_depth)
    if not tags:
        return
    depth = [_depth(tag) for tag in tags]
    for moment, style in ((0, "--"), (-1, "-")):
        values = [statistics.fmean(scalars[run.path][tag][1][moment] for run in members if tag in scalars[run.path])
                  for tag in tags]
        axis.plot(depth, values, style, marker="o", markersize=3, color=colour)


def _activation_depth(d: Drawing):
    """Activation mean, std and (when logged) effective rank against depth; None without them."""
    import matplotlib.ticker

    panels = {"act_mean/": "activation mean by depth", "act_std/": "activation std by depth",
              "effective_rank/": "effective rank of the activations by depth"}
    panels = {prefix: title for prefix, title in panels.items()
              if any(tag.startswith(prefix) for series in d.scalars.values() for tag in series)}
    if not panels or not d.groups:
        return None
    figure, axes = _figure(d, 1, len(panels), (5.0, 3.8), "activations against depth, mean over seeds: dashed = "
                           "first probe (step 0), solid = last probe", _entries(d))
    for axis, (prefix, title) in zip(axes[0], panels.items()):
        for name, members in d.groups.items():
            _depth_lines(axis, prefix, members, d.scalars, d.colours[name])
        axis.set_title(title, fontsize="small")
        axis.set_xlabel("activation layer (input side first)")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))  # one layer too
        axis.grid(alpha=0.3)
    return figure


# sharpness.png's panels: each pair the edge of stability compares (findings.EDGE_PAIRS), the eigenvalue
# with its limit drawn dashed beside it in the same colour.
SHARPNESS_PANELS = tuple((top, limit, title) for (top, limit), title in zip(EDGE_PAIRS, (
    "top eigenvalue of the training loss's Hessian; dashed: SGD's stability limit",
    "Adam/RMSprop: top eigenvalue of P^-1 H; dashed: its stability limit")))


def _sharpness(d: Drawing):
    """The sharpness against step, each with its stability limit dashed: one panel for the Hessian's top
    eigenvalue (SGD's limit), one for the preconditioned sharpness when an adaptive optimizer's run has
    it (Cohen et al. 2022); None without sharpness."""
    panels = [(top, limit, title, names) for top, limit, title in SHARPNESS_PANELS
              if (names := [name for name, members in d.groups.items() if _series(d, members, top)])]
    if not panels:
        return None
    shown = list(dict.fromkeys(name for *_, names in panels for name in names))
    figure, axes = _figure(d, 1, len(panels), (12 / len(panels), 4.2), "sharpness against step, mean over seeds "
                           "(the edge of stability: Cohen et al. 2021; 2022)", _entries(d, shown))
    for axis, (top, limit, title, names) in zip(axes[0], panels):
        drawn = []
        for name in names:
            for tag, style in ((top, "-"), (limit, "--")):
                if series := _series(d, d.groups[name], tag):
                    steps, mean, _ = mean_curve(series)
                    # A limit's marker is a tick: a run with one estimate still shows where its limit is.
                    axis.plot(steps, mean, style, marker="." if style == "-" else "_", color=d.colours[name])
                    drawn.extend(mean)
        axis.set(xlabel="step", ylabel="eigenvalue")
        axis.set_title(title, fontsize="small")
        # Limits sit orders of magnitude above early sharpness: a log scale, linear around 0 when an
        # estimate is not positive (a top eigenvalue can be, on a nearly flat loss).
        axis.set_yscale("log") if min(drawn) > 0 else axis.set_yscale("symlog", linthresh=1.0)
        axis.grid(alpha=0.3)
    return figure


# One row per figure file: adding a figure is adding a row. Each draws from a Drawing; one that
# returns None (nothing to draw, as sharpness.png when no run measured sharpness) is not written.
FIGURES = {
    "val_curves.png": _val_curves,
    "test_accuracy.png": _test_accuracy,
    "dead_fraction.png": _dead_fraction,
    "activation_depth.png": _activation_depth,
    "sharpness.png": _sharpness,
}


def make_figures(runs: list[Run], out: Path) -> list[Path]:
    """The comparison figures as PNG files in `out`, also written to TensorBoard (out/figures); the
    files written, in FIGURES order (a figure with nothing to draw is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    from torch.utils.tensorboard import SummaryWriter

    scalars = {run.path: read_scalars(run, compared_tags()) for run in runs if run.path.is_dir()}
    d = drawing(runs, scalars)
    written = []
    with SummaryWriter(str(out / "figures")) as writer:
        for filename, draw in FIGURES.items():
            figure = draw(d)
            if figure is None:
                continue
            figure.savefig(out / filename, dpi=DPI)
            writer.add_figure(f"compare/{filename.removesuffix('.png')}", figure, global_step=0, close=True)
            written.append(out / filename)
    return written

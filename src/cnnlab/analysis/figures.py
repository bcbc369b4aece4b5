"""The comparison figures: one small function per figure in FIGURES, each drawing from one
Drawing (the runs by configuration, their scalar series, colours, labels), written as PNG files and
to TensorBoard by make_figures. matplotlib and torch are imported only to draw."""

from __future__ import annotations

import math
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.analysis.findings import EDGE_PAIRS
from cnnlab.analysis.names import fixed_settings
from cnnlab.analysis.runs import Run, readable_events
from cnnlab.analysis.stats import CONFIDENCE, by_group, completed_spread, equal_windows, mean_curve
from cnnlab.analysis.tuning import tuned_parts
from cnnlab.statistics import ACTIVATION, LAYER_START, compared_tags, layer_depth, split_tag
from cnnlab.status import Status

Series = dict[str, tuple[list[int], list[float]]]  # tag -> (steps, values)


MAX_INCHES = 16.0  # the most either side of a figure grows to, however many configurations


DPI = 100  # so a PNG is at most 1600 x 1600 pixels


LABEL_CHARS = 48  # legend and tick labels wrap at this many characters (never cut)


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
    path), a colour, a line style, a line width and a legend label per configuration, and the
    settings every run shares."""
    groups: dict[str, list[Run]]
    scalars: dict[Path, Series]
    colours: dict[str, Any]
    labels: dict[str, str]
    fixed: str
    styles: dict[str, Any] = field(default_factory=dict)  # "-" unless a tuned key gives each value one
    widths: dict[str, float] = field(default_factory=dict)
    tuned: dict[str, Any] | None = None  # what tuning.tune found, with --tune
    tuned_colours: dict[str, Any] = field(default_factory=dict)  # the colour of each tuned configuration


BAND_SEEDS = 5  # from this many seeds a configuration is drawn as its mean with a band; below, a line per seed

# Line styles for the values of a tuned key (--tune), in the order of the values: solid first.
TUNED_STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)), (0, (3, 1, 1, 1))]


def _label(name: str, members: list[Run]) -> str:
    """The legend label: wrapped, never cut, since the part that tells configurations apart may come last."""
    statuses = sorted({run.status for run in members if run.status != Status.COMPLETED})
    seeds = f" ({len(members)} seeds)" if len(members) > 1 else ""
    text = f"{name}{seeds}" + (f" [{', '.join(statuses)}]" if statuses else "")
    return "\n".join(textwrap.wrap(text, LABEL_CHARS, break_on_hyphens=False))


def _palette(count: int) -> list:
    """tab10 for up to 10 colours; then tab20's dark shades, its light ones, tab20b and tab20c (60)."""
    import matplotlib

    if count <= 10:
        return list(matplotlib.colormaps["tab10"].colors)
    tab20 = matplotlib.colormaps["tab20"].colors
    return [*tab20[0::2], *tab20[1::2], *matplotlib.colormaps["tab20b"].colors, *matplotlib.colormaps["tab20c"].colors]


def _widths(names: list[str]) -> dict[str, float]:
    """Each configuration's line width, the first drawn widest and each later one thinner: a line that
    lies on an earlier one (identical step-0 values in an lr sweep) leaves that one's edges showing."""
    if len(names) < 2:
        return {name: 2.0 for name in names}
    return {name: 3.2 - 2.2 * i / (len(names) - 1) for i, name in enumerate(names)}


def drawing(runs: list[Run], scalars: dict[Path, Series], tuned: dict[str, Any] | None = None) -> Drawing:
    """The Drawing of the runs that have something to draw: not those that never started training
    (a rejected config) or failed before their first probe, which have no series. With `tuned` (what
    tuning.tune found) a configuration's groups share one colour and each tuned value has its own line style."""
    drawn = [run for run in runs if run.status != Status.INVALID and scalars.get(run.path)]
    groups = by_group(drawn)
    if tuned:
        parts = tuned_parts(runs, tuned["key"])
        configurations = list(dict.fromkeys(configuration for configuration, _ in parts.values()))
        values = _sorted_values({value for _, value in parts.values()})
        palette = _palette(len(configurations))
        by_configuration = {name: palette[i % len(palette)] for i, name in enumerate(configurations)}
        colours = {name: by_configuration[parts[members[0].path][0]] for name, members in groups.items()}
        styles = {name: TUNED_STYLES[values.index(parts[members[0].path][1]) % len(TUNED_STYLES)]
                  for name, members in groups.items()}
    else:
        palette = _palette(len(groups))
        colours = {name: palette[i % len(palette)] for i, name in enumerate(groups)}
        styles, by_configuration = {name: "-" for name in groups}, {}
    fixed = ", ".join(f"{key}={value}" for key, value in fixed_settings(runs).items())
    return Drawing(groups, scalars, colours, {name: _label(name, members) for name, members in groups.items()},
                   fixed, styles, _widths(list(groups)), tuned, by_configuration)


def _sorted_values(values) -> list[str]:
    """A setting's values as text, in numeric order when they are numbers."""
    def order(value: str):
        try:
            return (0, float(value), "")
        except ValueError:
            return (1, 0.0, value)
    return sorted(values, key=order)


def _wrap(text: str, inches: float, points: float = 10.0, lines: int | None = None) -> str:
    """`text` in lines that fit `inches` at `points` (an average glyph is about 0.6 em wide)."""
    width = max(8, int(inches * 72 / (points * 0.6)))
    return "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder=" …"))


def _entries(d: Drawing, names: list[str] | None = None) -> list[tuple[str, Any, Any]]:
    """One legend entry per configuration: (label, colour, line style)."""
    return [(d.labels[name], d.colours[name], d.styles.get(name, "-")) for name in (d.groups if names is None else names)]


def _figure(d: Drawing, grid: tuple[int, int], panel: tuple[float, float], title: str,
            legend: list[tuple[str, Any, Any]], note: str = "", **subplots):
    """grid (rows, cols) of panels of about `panel` inches, the figure capped at MAX_INCHES a side, the title,
    the fixed settings and `note` above and `legend` (label, colour, line style) below, in as many
    columns as fit."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows, cols = grid
    width = min(MAX_INCHES, cols * panel[0])
    headline = "\n".join(_wrap(text, width) for text in (title, d.fixed and f"fixed: {d.fixed}", note) if text)
    lines = [line for label, *_ in legend for line in label.split("\n")]
    longest = max(map(len, lines), default=0)
    columns = max(1, min(len(legend), int((width - 0.3) / (0.8 + longest * 8.3 * 0.6 / 72)))) if legend else 1
    legend_height = 0.19 * math.ceil(len(legend) / columns) * len(lines) / max(1, len(legend))
    height = min(MAX_INCHES, rows * panel[1] + 0.25 * (headline.count("\n") + 1) + legend_height + 0.3)
    figure, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False, layout="constrained", **subplots)
    figure.suptitle(headline, fontsize="medium")
    if legend:
        handles = [Line2D([], [], color=colour, linestyle=style, linewidth=2) for _, colour, style in legend]
        figure.legend(handles, [label for label, *_ in legend], loc="outside lower center", ncols=columns,
                      fontsize="small", frameon=False, handlelength=3)
    return figure, axes


def _curves(axis, d: Drawing, name: str, series, marker: str | None = None, bounds=(-math.inf, math.inf)) -> None:
    """A configuration's runs against step. From BAND_SEEDS seeds on, their mean with its confidence band
    (cut to `bounds`, as [0, 1] for an accuracy); below, one thin line per seed: with two seeds the
    band (t = 12.7) would cover most of the panel and say nothing."""
    import numpy as np

    look = {"color": d.colours[name], "linestyle": d.styles.get(name, "-"), "marker": marker, "markersize": 3}
    if len(series) < BAND_SEEDS:
        for steps, values in series:
            axis.plot(steps, values, linewidth=0.6 * d.widths.get(name, 2.0), alpha=0.85, **look)
        return
    steps, mean, half = mean_curve(series)
    axis.plot(steps, mean, linewidth=d.widths.get(name, 2.0), **look)
    axis.fill_between(steps, np.clip(mean - half, *bounds), np.clip(mean + half, *bounds), color=d.colours[name],
                      alpha=0.2, linewidth=0)


def _depth(tag: str) -> int:
    """act_mean/act07_conv -> 7."""
    return layer_depth(split_tag(tag)[1])


def _series(d: Drawing, members: list[Run], tag: str) -> list[tuple[list[int], list[float]]]:
    return [d.scalars[run.path][tag] for run in members if tag in d.scalars[run.path]]


def _log_every(run: Run) -> int | None:
    try:
        return int(run.settings["trainer.log_every"])
    except (KeyError, ValueError):
        return None


def _training_loss(d: Drawing, members: list[Run]) -> list[tuple[list[int], list[float]]]:
    """Each run's training loss, every point the mean over trainer.log_every steps (equal_windows)."""
    return [equal_windows(*d.scalars[run.path]["train/loss"], _log_every(run))
            for run in members if "train/loss" in d.scalars[run.path]]


def _val_curves(d: Drawing):
    """Training loss per log step (when logged), validation loss and accuracy per epoch; None without any."""
    import matplotlib.ticker

    panels = {"train/loss": "training loss (log scale), each point the mean over trainer.log_every steps",
              "val/loss": "validation loss (log scale), one point per epoch",
              "val/acc": "validation accuracy, one point per epoch"}
    panels = {tag: title for tag, title in panels.items() if any(tag in series for series in d.scalars.values())}
    if not panels or not d.groups:
        return None
    title = (f"loss and accuracy against step: one thin line per seed below {BAND_SEEDS} seeds; from {BAND_SEEDS} "
             f"seeds the mean, band = {CONFIDENCE:.0%} confidence interval of the mean (Student t)")
    figure, axes = _figure(d, (1, len(panels)), (5.4, 3.8), title, _entries(d))
    for axis, (tag, title) in zip(axes[0], panels.items()):
        for name, members in d.groups.items():
            series = _training_loss(d, members) if tag == "train/loss" else _series(d, members, tag)
            if series:
                _curves(axis, d, name, series, marker="o" if tag.startswith("val/") else None,
                        bounds=(0, 1) if tag.endswith("acc") else (-math.inf, math.inf))
        axis.set_title(_wrap(title, figure.get_figwidth() / len(panels), 9), fontsize="small")
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # steps are whole
        axis.set_yscale("log" if tag.endswith("loss") else "linear")
        axis.grid(alpha=0.3)
    return figure


def _zoomed_limits(points: list[float]) -> tuple[float, float]:
    """Axis limits around `points` (accuracies: those past 0 or 1, ends of a wide interval, count as
    0 or 1) with a margin, so that 0.9455 and 0.9470 look different."""
    low, high = max(min(points), 0.0), min(max(points), 1.0)
    margin = max(0.08 * (high - low), 0.002)
    return low - margin, high + margin


def _test_accuracy(d: Drawing):
    """One row per configuration (long names fit beside it): the mean as a dot, a whisker for its
    confidence interval, the seeds as small open dots, on an axis zoomed to the data."""
    if not d.groups:
        return None
    names = list(d.groups)
    longest = max(len(line) for name in names for line in d.labels[name].split("\n"))
    lines = sum(d.labels[name].count("\n") + 1 for name in names)
    title = (f"final test accuracy: dot = mean over completed seeds, whisker = {CONFIDENCE:.0%} confidence interval "
             f"(Student t, cut at 0 and 1), open dots = seeds; the axis is zoomed to the results")
    figure, axes = _figure(d, (1, 1), (5 + 0.075 * longest, 1.2 + 0.2 * len(names) + 0.16 * lines), title, [])
    axis = axes[0][0]
    drawn = []
    for i, name in enumerate(names):
        accuracy = completed_spread(d.groups[name], "test_acc")
        if accuracy.mean is None:
            continue
        axis.scatter(accuracy.values, [i] * accuracy.count, facecolors="none", edgecolors=d.colours[name], s=22,
                     linewidths=1, zorder=3)
        axis.errorbar(accuracy.mean, i, xerr=accuracy.ci95, fmt="o", color=d.colours[name], markersize=7,
                      capsize=4, elinewidth=1.5, zorder=4)
        drawn += [*accuracy.values, accuracy.mean - (accuracy.ci95 or 0), accuracy.mean + (accuracy.ci95 or 0)]
    low, high = _zoomed_limits(drawn) if drawn else (0.0, 1.0)
    for i, name in enumerate(names):
        if completed_spread(d.groups[name], "test_acc").mean is None:
            axis.text(low + 0.01 * (high - low), i, "no result", va="center", fontsize="small")
    axis.set_yticks(range(len(names)), [d.labels[name] for name in names], fontsize="small")
    axis.set(xlim=(low, high), ylim=(len(names) - 0.5, -0.5), xlabel="test accuracy")
    axis.grid(axis="x", alpha=0.3)
    return figure


def _all_zero(d: Drawing, members: list[Run], tags: list[str]) -> bool:
    return all(value == 0 for tag in tags for _, values in _series(d, members, tag) for value in values)


def _dead_fraction(d: Drawing):
    """One panel per configuration with a dead unit, one line per layer (one legend for all); the
    configurations whose every value is zero are named in the subtitle instead of a panel of flat
    lines (a figure that says so when that is all of them); None without dead fractions."""
    import matplotlib
    import matplotlib.ticker

    layers = f"dead_fraction/{LAYER_START[ACTIVATION]}"  # dead_fraction/act01_fc, not dead_fraction/all
    tags = sorted({tag for series in d.scalars.values() for tag in series if tag.startswith(layers)},
                  key=lambda tag: (_depth(tag), tag))
    if not tags or not d.groups:
        return None
    zero = [name for name, members in d.groups.items() if _all_zero(d, members, tags)]
    shown = {name: members for name, members in d.groups.items() if name not in zero}
    if not shown:  # a result worth a figure: it says so rather than drawing flat lines
        figure, axes = _figure(d, (1, 1), (6.0, 1.2), "dead fraction of each activation layer on the training images", [])
        axes[0][0].set_axis_off()
        axes[0][0].text(0.5, 0.5, f"no dead unit at any probe, in any of the {len(zero)} configurations",
                        ha="center", va="center", transform=axes[0][0].transAxes)
        return figure
    colours = {tag: matplotlib.colormaps["viridis"](i / max(1, len(tags) - 1)) for i, tag in enumerate(tags)}
    cols = min(len(shown), math.ceil(math.sqrt(len(shown))))
    rows_ = math.ceil(len(shown) / cols)
    legend = [(split_tag(tag)[1], colour, "-") for tag, colour in colours.items()]
    note = f"left out, no dead unit at any probe: {'; '.join(zero)}" if zero else ""
    figure, grid = _figure(d, (rows_, cols), (3.4, 2.8), "dead fraction of each activation layer on the training "
                           "images against step (step 0 and epoch ends, mean over seeds), one panel per configuration",
                           legend, note, sharey=True)
    widths = _widths(tags)  # layers alike (all zero at step 0) stay visible
    for axis, (name, members) in zip(grid.flat, shown.items()):
        for tag in tags:
            if series := _series(d, members, tag):
                steps, mean, _ = mean_curve(series)  # step 0 and epoch ends: few points, each marked
                axis.plot(steps, mean, marker=".", color=colours[tag], linewidth=0.7 * widths[tag])
        title = d.labels[name].replace("\n", " ")
        axis.set_title(_wrap(title, figure.get_figwidth() / cols, 8), fontsize="small")  # never cut: the end may differ
        axis.set_ylim(-0.02, 1.02)
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
        axis.tick_params(labelsize="small")
        axis.grid(alpha=0.3)
    for axis in list(grid.flat)[len(shown):]:
        figure.delaxes(axis)
    grid[0][0].set_ylabel("dead fraction")
    return figure


def layer_widths(run: Run) -> dict[str, int]:
    """The width of each activation layer as its tags name it (act01_conv -> 16): a ConvNet's
    model.channels then its model.fc_hidden, an MLP's model.hidden; {} when the config does not say."""
    import yaml

    def read(key: str) -> Any:
        try:
            return yaml.safe_load(run.settings.get(key, "null"))
        except yaml.YAMLError:
            return None

    conv, fc = (read("model.channels"), [read("model.fc_hidden")]) if run.settings.get("model") == "convnet" \
        else ([], read("model.hidden"))
    kinds = [("conv", width) for width in conv or []] + [("fc", width) for width in fc or []]
    if not all(isinstance(width, int) and width > 0 for _, width in kinds):
        return {}
    return {f"{LAYER_START[ACTIVATION]}{i:02d}_{kind}": width for i, (kind, width) in enumerate(kinds, 1)}


def _depth_lines(axis, d: Drawing, name: str, prefix: str, positions: dict[str, int]) -> None:
    """One statistic against layer for one group, at the first probe (step 0, faint, open dots) and the
    last (full colour, filled dots), in the group's line style (which --tune gives a meaning); the
    effective rank as a share of the layer's width (1 = full rank)."""
    members = d.groups[name]
    tags = sorted((tag for tag in d.scalars[members[0].path] if tag.startswith(prefix)), key=_depth)
    widths = layer_widths(members[0])
    if prefix == "effective_rank/":
        tags = [tag for tag in tags if split_tag(tag)[1] in widths]  # no width: no share
    if not tags:
        return
    x = [positions[split_tag(tag)[1]] for tag in tags]
    per_width = {tag: widths[split_tag(tag)[1]] if prefix == "effective_rank/" else 1 for tag in tags}
    for moment, alpha in ((0, 0.35), (-1, 1.0)):
        values = [statistics.fmean(d.scalars[run.path][tag][1][moment] for run in members
                                   if tag in d.scalars[run.path]) / per_width[tag] for tag in tags]
        # open dots at the first probe: with one layer there is no line to tell them apart by
        axis.plot(x, values, d.styles.get(name, "-"), marker="o", markersize=4, color=d.colours[name], alpha=alpha,
                  linewidth=d.widths.get(name, 2.0), markerfacecolor="none" if moment == 0 else d.colours[name])


DEPTH_PANELS = {"act_mean/": "activation mean by layer", "act_std/": "activation std by layer",
                "effective_rank/": "effective rank / layer width by layer (1 = full rank)"}


def _activation_depth(d: Drawing):
    """Activation mean, std and (when logged) effective rank per width against layer, the layers named
    on the x axis (conv and fc layers differ); None without them."""
    panels = {prefix: title for prefix, title in DEPTH_PANELS.items()
              if any(tag.startswith(prefix) for series in d.scalars.values() for tag in series)}
    if not panels or not d.groups:
        return None
    names = sorted({split_tag(tag)[1] for series in d.scalars.values() for tag in series
                    if tag.startswith(tuple(panels))}, key=lambda layer: (layer_depth(layer), layer))
    positions = {layer: i for i, layer in enumerate(names)}
    figure, axes = _figure(d, (1, len(panels)), (max(5.0, 0.55 * len(names)), 3.8), "activations by layer, mean over "
                           "seeds: faint, open dots = first probe (step 0); full colour, filled dots = last probe", _entries(d))
    for axis, (prefix, title) in zip(axes[0], panels.items()):
        for name in d.groups:
            _depth_lines(axis, d, name, prefix, positions)
        axis.set_title(title, fontsize="small")
        axis.set_xticks(range(len(names)), names, rotation=45 if len(names) > 4 else 0, ha="right" if len(names) > 4
                        else "center", fontsize="small")
        axis.set_xlabel("activation layer (input side first)")
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
    figure, axes = _figure(d, (1, len(panels)), (12 / len(panels), 4.2), "sharpness against step, mean over seeds "
                           "(the edge of stability: Cohen et al. 2021; 2022)", _entries(d, shown))
    for axis, (top, limit, title, names) in zip(axes[0], panels):
        drawn = []
        for name in names:
            for tag, style in ((top, "-"), (limit, "--")):
                if series := _series(d, d.groups[name], tag):
                    steps, mean, _ = mean_curve(series)
                    # A limit's marker is a tick: a run with one estimate still shows where its limit is.
                    axis.plot(steps, mean, style, marker="." if style == "-" else "_", color=d.colours[name],
                              linewidth=d.widths.get(name, 2.0))
                    drawn.extend(mean)
        axis.set(xlabel="step", ylabel="eigenvalue")
        axis.set_title(title, fontsize="small")
        # Limits sit orders of magnitude above early sharpness: a log scale, linear around 0 when an
        # estimate is not positive (a top eigenvalue can be, on a nearly flat loss).
        axis.set_yscale("log") if min(drawn) > 0 else axis.set_yscale("symlog", linthresh=1.0)
        axis.grid(alpha=0.3)
    return figure


def _tuned_x(key: str, values: list[str]) -> tuple[dict[str, float], bool]:
    """Where each value of the tuned key goes on the x axis, and whether that axis is logarithmic (a
    learning rate's, or positive numbers spanning a factor of 10); values that are not numbers: evenly."""
    numbers = {value: float(value) for value in values if _is_number(value)}
    if len(numbers) < len(values):
        return {value: float(i) for i, value in enumerate(_sorted_values(values))}, False
    positive = all(number > 0 for number in numbers.values())
    spans = positive and max(numbers.values()) >= 10 * min(numbers.values())
    return numbers, positive and (key.rsplit(".", 1)[-1] == "lr" or spans)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _tuning(d: Drawing):
    """With --tune: each configuration's mean validation accuracy (whisker: its confidence interval)
    against the tuned value, one line per configuration, the value chosen marked; None without --tune."""
    if not d.tuned:
        return None
    key, configurations = d.tuned["key"], d.tuned["configurations"]
    values = list(dict.fromkeys(value for entry in configurations.values() for value in entry["tried"]))
    x, log = _tuned_x(key, values)
    legend = [(name, d.tuned_colours.get(name, "black"), "-") for name in configurations]
    note = "; ".join(d.tuned["warnings"])
    title = (f"tuning {key}: mean validation accuracy over completed seeds against {key}, whisker = "
             f"{CONFIDENCE:.0%} confidence interval (Student t); star = the value chosen (best mean)")
    figure, axes = _figure(d, (1, 1), (7.5, 4.2), title, legend, f"warning: {note}" if note else "")
    axis = axes[0][0]
    for name, entry in configurations.items():
        colour = d.tuned_colours.get(name, "black")
        scored = sorted((x[value], spread) for value, spread in entry["by_value"].items() if spread.mean is not None)
        if not scored:
            continue
        axis.errorbar([at for at, _ in scored], [s.mean for _, s in scored], yerr=[s.ci95 or 0 for _, s in scored],
                      color=colour, marker="o", markersize=4, capsize=3, linewidth=1.5)
        if entry["chosen"] is not None:
            axis.plot(x[entry["chosen"]], entry["val_acc"].mean, marker="*", markersize=16, color=colour,
                      markeredgecolor="black", linestyle="none", zorder=5)
    if log:
        axis.set_xscale("log")
    axis.set_xticks(list(x.values()), list(x), fontsize="small")
    axis.minorticks_off()  # the values tried, and nothing between them
    axis.set(xlabel=key + (" (log scale)" if log else ""), ylabel="validation accuracy")
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
    "tuning.png": _tuning,
}


def make_figures(runs: list[Run], out: Path, tuned: dict[str, Any] | None = None) -> list[Path]:
    """The comparison figures as PNG files in `out`; the files written, in FIGURES order (a figure with
    nothing to draw is left out; tuning.png without `tuned`). Not into TensorBoard: any folder of event
    files is a run there, and compare's figures would stand in the runs list beside the runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = {run.path: read_scalars(run, compared_tags()) for run in runs if run.path.is_dir()}
    d = drawing(runs, scalars, tuned)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, draw in FIGURES.items():
        figure = draw(d)
        if figure is None:
            continue
        figure.savefig(out / filename, dpi=DPI)
        plt.close(figure)
        written.append(out / filename)
    return written

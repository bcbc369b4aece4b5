"""The statistics of a comparison: mean and Student t confidence interval over seeds (Spread),
Welch's test against the best configuration, seed groups with their warnings, and mean curves."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cnnlab.analysis.names import SEED_KEY
from cnnlab.analysis.runs import Run
from cnnlab.status import Status

CONFIDENCE = 0.95  # of the intervals of a mean over seeds
SIGNIFICANCE = 0.05  # of Welch's test against the best configuration
GROUP_METRICS = ("val_acc", "test_acc", "val_loss", "test_loss", "dead_fraction")


@dataclass
class Spread:
    mean: float | None
    std: float | None  # sample standard deviation; None for fewer than two values
    ci95: float | None  # half-width of the 95% confidence interval of the mean (Student t); None likewise
    count: int
    values: list[float] = field(default_factory=list)

    def text(self, digits: int = 4) -> str:
        """`mean ± CI half-width`, `mean ± -` for one value (no interval), `-` for none."""
        if self.mean is None:
            return "-"
        return f"{self.mean:.{digits}f} ± " + ("-" if self.ci95 is None else f"{self.ci95:.{digits}f}")


def spread(values: list[Any]) -> Spread:
    """Mean, sample standard deviation and Student t 95% confidence interval of the finite numbers
    among `values`: mean ± t(0.975, n-1) s / sqrt(n) (Student 1908)."""
    from scipy import stats

    numbers = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not numbers:
        return Spread(None, None, None, 0)
    if len(numbers) == 1:
        return Spread(numbers[0], None, None, 1, numbers)
    std = statistics.stdev(numbers)
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, len(numbers) - 1)) * std / math.sqrt(len(numbers))
    return Spread(statistics.fmean(numbers), std, half, len(numbers), numbers)


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (Welch 1947) that a and b have the same mean; None when it
    cannot tell: fewer than two values on either side, or no spread on both."""
    import warnings

    from scipy import stats

    if len(a) < 2 or len(b) < 2 or (statistics.stdev(a) == 0 and statistics.stdev(b) == 0):
        return None
    with warnings.catch_warnings():  # "precision loss" for nearly equal seeds: the p-value is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def versus_best(accuracies: dict[str, Spread]) -> dict[str, dict[str, Any]]:
    """For each configuration, how its test accuracy compares with the best mean's: `best`,
    `not distinguishable` (Welch p >= 5%), `worse`, `cannot tell` (fewer than 2 seeds on a side, or
    no spread on both) or `no result`."""
    scored = {name: accuracy for name, accuracy in accuracies.items() if accuracy.mean is not None}
    best = max(scored, key=lambda name: scored[name].mean) if scored else None
    verdicts = {}
    for name, accuracy in accuracies.items():
        if name not in scored:
            verdicts[name] = {"verdict": "no result", "p": None}
        elif name == best:
            verdicts[name] = {"verdict": "best", "p": None}
        elif (p := welch_p(scored[best].values, accuracy.values)) is None:
            few = min(accuracy.count, scored[best].count) < 2
            verdicts[name] = {"verdict": "cannot tell", "p": None, "why": "fewer than 2 seeds" if few else "no spread"}
        else:
            verdicts[name] = {"verdict": "not distinguishable" if p >= SIGNIFICANCE else "worse", "p": p}
    return verdicts


def by_group(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs that differ only by trainer.seed, under their group name, in the order first seen."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


def completed_spread(runs: list[Run], metric: str) -> Spread:
    """The Spread of a metric over the runs that completed (the others' numbers are partial or none)."""
    return spread([run.metric(metric) for run in runs if run.status == Status.COMPLETED])


def seed_groups(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Each group of runs: its metrics over its completed runs (Spread), its warnings, and its test
    accuracy against the best group's (versus_best)."""
    summary = {}
    for name, members in by_group(runs).items():
        summary[name] = {
            "runs": len(members),
            "completed": sum(run.status == Status.COMPLETED for run in members),
            "seeds": [run.settings.get(SEED_KEY) for run in members],
            **{metric: completed_spread(members, metric) for metric in GROUP_METRICS},
            "warnings": warning_counts(members),
        }
    for name, verdict in versus_best({name: group["test_acc"] for name, group in summary.items()}).items():
        summary[name]["vs_best"] = verdict
    return summary


def warning_counts(runs: list[Run]) -> dict[str, int]:
    """For each kind of warning finding: how many of the runs (seeds) have it."""
    counts: dict[str, int] = {}
    for run in runs:
        for kind in filter(None, (run.metric("warnings") or "").split(",")):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


class Curve(NamedTuple):
    """A series averaged over runs: the steps every run reached, the mean there, and the half-width
    of the mean's 95% confidence interval (Student t) at each step, None for one run."""
    steps: list[int]
    mean: Any  # numpy array, one value per step
    ci95: Any  # numpy array like mean, or None


def mean_curve(series: list[tuple[list[int], list[float]]]) -> Curve:
    """The Curve of runs' (steps, values) series."""
    import numpy as np
    from scipy import stats

    points = [dict(zip(steps, values)) for steps, values in series]
    steps = sorted(set.intersection(*(set(p) for p in points)))
    values = np.array([[p[step] for step in steps] for p in points], dtype=float).reshape(len(points), len(steps))
    if len(points) < 2:
        return Curve(steps, values[0], None)
    half = stats.t.ppf((1 + CONFIDENCE) / 2, len(points) - 1) * values.std(axis=0, ddof=1) / math.sqrt(len(points))
    return Curve(steps, values.mean(axis=0), half)


def equal_windows(steps: list[int], values: list[float], every: int | None) -> tuple[list[int], list[float]]:
    """Training-loss points that each average `every` steps (trainer.log_every). The trainer logs at
    multiples of `every` and at each epoch's end, so the points either side of an epoch's end average
    fewer steps (and a shorter window is noisier: a fake dip or spike). Such short windows are merged,
    weighted by their steps, into the window that ends at the next multiple of `every`; a short window
    at the very end is dropped. Without `every` (an old run), the longest gap between points stands in."""
    gaps = [step - before for before, step in zip([0, *steps], steps)]
    every = every or max(gaps, default=0)
    if not every:
        return steps, values
    merged_steps, merged_values, total, covered = [], [], 0.0, 0
    for step, value, gap in zip(steps, values, gaps):
        total, covered = total + value * gap, covered + gap
        if step % every == 0:
            merged_steps.append(step)
            merged_values.append(total / covered if covered else value)  # a point at step 0
            total, covered = 0.0, 0
    return (merged_steps, merged_values) if merged_steps else (steps, values)

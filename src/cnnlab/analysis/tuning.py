"""`cnnlab compare --tune KEY`: each configuration at the value of KEY with the best mean
validation accuracy over its seeds, and its test accuracy there against the best configuration's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnlab.analysis.names import SEED_KEY, differing, name_keys, short_keys, shown_values
from cnnlab.analysis.runs import Run
from cnnlab.analysis.stats import completed_spread, spread, versus_best
from cnnlab.errors import UserError


def _tuned_key(runs: list[Run], key: str) -> str:
    """The setting `key` names (in full, or by its last part), if it differs; else UserError naming those that do."""
    keys = [k for k in differing(runs) if k != SEED_KEY]
    matches = [k for k in keys if k == key] or [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1 and key != SEED_KEY:
        return matches[0]
    named = [k for k in name_keys(runs) if k != SEED_KEY]
    why = ("picking the luckiest seed is not a fair comparison" if key == SEED_KEY else
           f"{key} could be {' or '.join(matches)}" if matches else
           f"{key} has one value in these runs (or none), so there is nothing to tune")
    settings = f"settings that differ: {', '.join(named)}" if named else "no setting differs between these runs"
    raise UserError(f"--tune {key}: {why}; {settings}.")


def tuned_parts(runs: list[Run], key: str) -> dict[Path, tuple[str, str]]:
    """Each run's configuration (the runs alike in every named setting but `key` and the seed, by
    those settings) and its value of `key` ("-" without one); `key` as _tuned_key gives it."""
    keys = [k for k in name_keys(runs) if k not in (key, SEED_KEY)]
    short, shown = short_keys(name_keys(runs)), shown_values(runs, keys)
    parts = {}
    for run in runs:
        name = ", ".join(f"{short[k]}={shown[k][run.settings[k]]}" for k in keys if k in run.settings) or "all"
        parts[run.path] = (f"{name} ({run.rerun})" if run.rerun else name, run.settings.get(key, "-"))
    return parts


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def edge_warning(key: str, name: str, chosen: str | None, means: dict[str, float | None]) -> str | None:
    """A warning when the chosen value is the largest or smallest number tried and strictly better
    than the value next to it (`means`: mean validation accuracy by value): the best may lie beyond
    the grid. None for a grid of fewer than two numbers, a choice inside it, or one tied with its neighbour."""
    numbers = sorted({number for value in means if (number := _number(value)) is not None})
    if chosen is None or _number(chosen) is None or len(numbers) < 2:
        return None
    edge = {numbers[-1]: "largest", numbers[0]: "smallest"}.get(_number(chosen))
    if edge is None:
        return None
    inner = numbers[-2] if edge == "largest" else numbers[1]
    neighbour = [mean for value, mean in means.items() if _number(value) == inner and mean is not None]
    if neighbour and means[chosen] is not None and max(neighbour) >= means[chosen]:
        return None  # as good one step inside: nothing says the best lies beyond
    return f"the best {key} for {name} is the {edge} value tried ({chosen}): extend the grid"


def tune(runs: list[Run], key: str) -> dict[str, Any]:
    """For each configuration (the runs alike in every named setting but `key` and the seed): the
    value of `key` with the best mean validation accuracy over its completed seeds, that value's
    validation and test accuracy, and the test accuracy against the best configuration's; each value's
    validation accuracy (`by_value`), and a warning where the value chosen is at an edge of the grid."""
    key = _tuned_key(runs, key)
    configurations: dict[str, dict[str, list[Run]]] = {}
    parts = tuned_parts(runs, key)
    for run in runs:
        name, value = parts[run.path]
        configurations.setdefault(name, {}).setdefault(value, []).append(run)
    tuned = {}
    for name, candidates in configurations.items():
        validation = {value: completed_spread(members, "val_acc") for value, members in candidates.items()}
        scored = [value for value, accuracy in validation.items() if accuracy.mean is not None]
        chosen = max(scored, key=lambda value: validation[value].mean) if scored else None
        tuned[name] = {"chosen": chosen, "tried": list(candidates),
                       "val_acc": validation[chosen] if chosen is not None else spread([]),
                       "test_acc": completed_spread(candidates.get(chosen, []), "test_acc"),
                       "by_value": validation, "warning": edge_warning(key, name, chosen, {value: accuracy.mean for value, accuracy in validation.items()})}
    for name, verdict in versus_best({name: entry["test_acc"] for name, entry in tuned.items()}).items():
        tuned[name]["vs_best"] = verdict
    warnings = [entry["warning"] for entry in tuned.values() if entry["warning"]]
    return {"key": key, "configurations": tuned, "warnings": warnings}

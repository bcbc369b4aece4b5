"""Run names: each run by the settings that differ between the runs compared (`activation=elu,
lr=0.01`), grouped over the seed, and the settings every run shares (the figures' subtitle)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path, PurePosixPath

from cnnlab.analysis.runs import Run
from cnnlab.config import role

SEED_KEY = "trainer.seed"
# The settings a figure's subtitle names when every run shares them, so that a shared PNG keeps its context.
FIXED_IN_FIGURES = ("dataset", "model", "model.hidden", "model.channels", "activation", "optimizer", "optimizer.lr",
                    "scheduler", "trainer.epochs", "trainer.batch_size")


def differing(runs: list[Run]) -> list[str]:
    """The settings with more than one value among the runs that have them, and those that only some
    runs have but one set on its command line (leaky_relu's negative_slope=0.2 beside relu runs)."""
    keys = dict.fromkeys(key for run in runs for key in run.settings)
    typed = {key for run in runs for key in run.overrides}
    return [key for key in keys if len({run.settings[key] for run in runs if key in run.settings}) > 1
            or (key in typed and any(key not in run.settings for run in runs))]


def _follows(runs: list[Run], key: str, choice: str) -> bool:
    """Whether each run's value of `key` is the one every run with its value of `choice` has."""
    seen: dict[str, str] = {}
    pairs = [(run.settings[choice], run.settings[key]) for run in runs if key in run.settings and choice in run.settings]
    return bool(pairs) and all(seen.setdefault(chosen, value) == value for chosen, value in pairs)


def name_keys(runs: list[Run]) -> list[str]:
    """The settings that name runs: those that differ, less bookkeeping (settings whose
    config.role(key).names_runs is false, unless nothing else differs), less those that follow from a
    group choice made on the command line (the option's own values: momentum with optimizer=sgd)
    unless set there too; sorted, the seed last."""
    keys = differing(runs)
    keys = [key for key in keys if role(key).names_runs] or keys
    typed = {key for run in runs for key in run.overrides}
    chosen = [key for key in keys if "." not in key and key in typed]
    kept = [key for key in keys if key in typed or key == SEED_KEY or not any(_follows(runs, key, c) for c in chosen)]
    return sorted(kept, key=lambda key: (key == SEED_KEY, key))


def short_keys(keys: list[str]) -> dict[str, str]:
    """`lr` for optimizer.lr when no other key ends so. Dataset settings keep their prefix
    (`dataset.root`: root alone would not say it is about the data)."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: key if key.startswith("dataset.") or last.count(end) > 1 else end for key, end in zip(keys, last)}


def _folder_labels(paths: list[Path]) -> dict[Path, str]:
    """Each path by as many of its last folders as tell it from the others."""
    for depth in range(1, max(len(path.parts) for path in paths) + 1):
        labels = {path: "/".join(path.parts[-depth:]) for path in paths}
        if len(set(labels.values())) == len(labels):
            return labels
    return {path: str(path) for path in paths}


def _shared_folders(values: set[str]) -> tuple[int, int]:
    """How many leading and trailing parts every path among `values` shares, (0, 0) unless all are
    paths; leaving at least one part of each in between, where they differ."""
    parts = [PurePosixPath(value).parts for value in values]
    if len(parts) < 2 or not all("/" in value for value in values):
        return 0, 0
    lead = tail = 0
    while lead < min(map(len, parts)) - 1 and len({part[lead] for part in parts}) == 1:
        lead += 1
    while lead + tail < min(map(len, parts)) - 1 and len({part[-1 - tail] for part in parts}) == 1:
        tail += 1
    return lead, tail


def _shown_path(value: str, lead: int, tail: int) -> str:
    """/home/me/a/runs/2026/data -> …/a/…/data: the part that differs, and the file or folder's own name."""
    parts = PurePosixPath(value).parts
    middle = "/".join(parts[lead:len(parts) - tail])
    end = {0: "", 1: f"/{parts[-1]}"}.get(tail, f"/…/{parts[-1]}")
    return ("…/" if lead else "") + middle + end


def shown_values(runs: list[Run], keys: list[str]) -> dict[str, dict[str, str]]:
    """For each key, how names show each of its values: a path by the part where the paths differ
    (`…/cnnlab-old/…/data` beside `…/cnnlab/…/data`), else as it is."""
    shown = {}
    for key in keys:
        values = {run.settings[key] for run in runs if key in run.settings}
        lead, tail = _shared_folders(values)
        shown[key] = {value: _shown_path(value, lead, tail) if lead or tail else value for value in values}
    return shown


def shared_prefixes(runs: list[Run], keys: list[str]) -> dict[str, str]:
    """The folders that the paths of each key share, which its shown values leave out: `/home/me/data/…`."""
    prefixes = {}
    for key in keys:
        values = {run.settings[key] for run in runs if key in run.settings}
        if lead := _shared_folders(values)[0]:
            prefixes[key] = str(PurePosixPath(*PurePosixPath(next(iter(values))).parts[:lead])) + "/…"
    return prefixes


def name_runs(runs: list[Run]) -> None:
    """Name each run by the settings that differ (name_keys), and group by all of them but the seed.
    Runs alike in all of them (reruns of one config and seed) are told apart by their folders; they
    are separate configurations, unless their group has other seeds: then a rerun (a single run
    repeating a sweep's job) joins that seed group rather than splitting it."""
    keys = name_keys(runs)
    short = short_keys(keys)
    shown = shown_values(runs, keys)
    for run in runs:
        parts = {key: f"{short[key]}={shown[key][run.settings[key]]}" for key in keys if key in run.settings}
        run.rerun = ""
        run.name = ", ".join(parts.values())
        run.group = ", ".join(part for key, part in parts.items() if key != SEED_KEY)
    counts = Counter(run.name for run in runs)
    seeds: dict[str, set] = {}
    for run in runs:
        seeds.setdefault(run.group, set()).add(run.settings.get(SEED_KEY))
    alike = [run for run in runs if counts[run.name] > 1 or not run.name]
    folders = _folder_labels([run.path for run in alike]) if alike else {}
    for run in alike:
        run.rerun = folders[run.path]
        run.name = f"{run.name} ({run.rerun})" if run.name else run.rerun
        if len(seeds[run.group]) < 2:
            run.group = f"{run.group} ({run.rerun})" if run.group else run.rerun
    for run in runs:
        run.group = run.group or "all"  # only the seed differs


def fixed_settings(runs: list[Run]) -> dict[str, str]:
    """The settings of FIXED_IN_FIGURES that every run with a composed config has, with one value, and
    the folders that a path setting's differing values share (which names leave out)."""
    composed = [run for run in runs if run.composed] or runs
    varied = differing(runs)
    fixed = {}
    for key in FIXED_IN_FIGURES:
        values = {run.settings.get(key) for run in composed}
        if len(values) == 1 and None not in values and key not in varied:
            fixed[key.rsplit(".", 1)[-1]] = values.pop()
    return {**fixed, **shared_prefixes(runs, name_keys(runs))}

"""Where runs are: the run and sweep folders in or below the paths given (or glob patterns of
them), read and named, with a sweep's jobs that have not started yet as `missing`."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console

from cnnlab.analysis.names import name_runs
from cnnlab.analysis.runs import Run, event_files, is_run_dir, read_run, skipped_events_note
from cnnlab.errors import UserError


def warn(message: str) -> None:
    Console(stderr=True).print(f"cnnlab: warning: {message}", style="yellow", markup=False, highlight=False,
                               soft_wrap=True)


def _matched_folders(paths: list[str]) -> list[Path]:
    folders = []
    for pattern in paths:
        for match in map(Path, sorted(glob.glob(str(Path(pattern).expanduser()))) or [pattern]):
            if not match.is_dir():
                raise UserError(f"{match} is not a directory: pass run directories or sweep directories.")
            folders.append(match)
    return folders


def _below(folder: Path) -> Iterator[Path]:
    """`folder` and every folder below it, not looking inside run directories or hidden folders."""
    yield folder
    if is_run_dir(folder):
        return
    try:
        children = sorted(child for child in folder.iterdir() if child.is_dir() and not child.is_symlink())
    except OSError:
        return
    for child in children:
        if not child.name.startswith("."):
            yield from _below(child)


def sweep_dirs(paths: list[str]) -> list[Path]:
    """The sweep folders (with Hydra's multirun.yaml) in or below `paths`."""
    return [folder for match in _matched_folders(paths) for folder in _below(match)
            if (folder / "multirun.yaml").is_file()]


def find_runs(paths: list[str], warn: Callable[[str], None] = warn,
              jobs: list[tuple[Path, dict[str, str]]] = ()) -> list[Run]:
    """Run directories in or below `paths` (run or sweep directories, or glob patterns of them), and
    the `jobs` of sweeps (folder, overrides) that have no folder yet, as `missing`, in the sweeps'
    order. A run whose files cannot be read is left out, with a warning."""
    found = [folder for match in _matched_folders(paths) for folder in _below(match) if is_run_dir(folder)]
    unique = list(dict.fromkeys(path.resolve() for path in found))
    if not unique and not jobs:
        raise UserError(f"No run directories in or below {', '.join(paths)} (a run directory has .hydra/ or "
                        f"metrics.json).")
    runs, unreadable = [], []
    for path in unique:
        try:
            runs.append(read_run(path))
        except UserError as error:
            unreadable.append(str(error))
        special = event_files(path)[1]
        if special:  # never opened: a FIFO would block compare for ever
            warn(f"{path}: {skipped_events_note(special)}.")
    runs += [Run(folder, overrides, None) for folder, overrides in jobs if folder not in unique]
    if not runs:
        raise UserError(f"No readable run in {', '.join(paths)}: {'; '.join(unreadable)}.")
    for problem in unreadable:
        warn(f"skipped a run: {problem}.")
    order = {folder: num for num, (folder, _) in enumerate(jobs)}
    runs = [run for _, run in sorted(enumerate(runs), key=lambda item: (order.get(item[1].path, len(order)), item[0]))]
    name_runs(runs)
    return runs

"""The commands that read what runs left: `cnnlab compare`, `cnnlab inspect`, and `cnnlab activations`,
which shows the activations on offer. Each parses its arguments, asks analysis/ or train/ for the
result, and prints it."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnlab.cli.console import print_error
from cnnlab.cli.folders import check_writable
from cnnlab.cli.sweeps import sweep_jobs
from cnnlab.errors import UserError
from cnnlab.status import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def compare_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cnnlab compare",
        description="Compare runs: a table, summary.csv and summary.json, and PNG figures.")
    parser.add_argument("paths", nargs="+", help="sweep directories, run directories, folders holding them "
                                                 "(searched recursively), or glob patterns of them")
    parser.add_argument("--out", help="where to write the summary and figures (default: the sweep directory "
                                      "when one is given, else ./comparison)")
    parser.add_argument("--tune", metavar="KEY", help="a setting that differs (e.g. optimizer.lr): for each "
                        "configuration, its value with the best mean validation accuracy, and the test accuracy there")
    options = parser.parse_args(args)
    from cnnlab.analysis.figures import make_figures
    from cnnlab.analysis.folders import find_runs, sweep_dirs
    from cnnlab.analysis.summary import print_summary, write_summary
    from cnnlab.analysis.tuning import tune
    from cnnlab.cli.console import console

    single = Path(options.paths[0])
    default_out = single if len(options.paths) == 1 and single.is_dir() and not (single / ".hydra").is_dir() else Path("comparison")
    out = Path(options.out) if options.out else default_out
    try:
        jobs = [job for sweep in sweep_dirs(options.paths) for job in sweep_jobs(sweep)]  # not started: `missing`
        runs = find_runs(options.paths, jobs=jobs)  # a run whose files cannot be read is skipped, with a warning
        tuned = tune(runs, options.tune) if options.tune else None
        check_writable("--out", out)
    except UserError as error:
        print_error(str(error))
        return EXIT_USAGE
    output = console()
    print_summary(output, runs, title=f"{len(runs)} runs", tuned=tuned)
    written = [*write_summary(out, runs, tuned), *make_figures(runs, out, tuned)]
    output.print("wrote " + ", ".join(str(path) for path in written), highlight=False, markup=False, soft_wrap=True)
    return EXIT_OK


def activations_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cnnlab activations",
                                     description="The activations cnnlab offers: a table, and optionally a plot.")
    parser.add_argument("--plot", metavar="FILE", help="draw each function and its derivative on [-5, 5] into FILE (PNG)")
    options = parser.parse_args(args)
    from rich.table import Table

    from cnnlab.activations import ACTIVATIONS
    from cnnlab.cli.console import console

    table = Table(title="activation=NAME", title_justify="left")
    for column in ("name", "formula", "range", "settings (default)", "typical use"):
        table.add_column(column, overflow="fold")
    for name, row in ACTIVATIONS.items():
        table.add_row(name, row.formula, row.output_range, row.settings, row.typical_use)
    console().print(table)
    if options.plot:
        try:
            plot = plot_path(options.plot)
        except UserError as error:
            print_error(str(error))
            return EXIT_USAGE
        from cnnlab.train.models import plot_activations

        try:
            plot_activations(plot)
        except OSError as error:  # a read-only folder, a full disk
            print_error(f"--plot: cannot write {plot}: {error.strerror or error}.")
            return EXIT_FAILED
        print(f"wrote {plot}")
    return EXIT_OK


PLOT_FORMATS = (".png", ".pdf", ".svg")  # what the figure is saved as, by the file's ending


def plot_path(given: str) -> Path:
    """The file `activations --plot` writes, checked before anything is drawn: a file (not a folder)
    ending in one of PLOT_FORMATS, in a folder that exists."""
    path = Path(given).expanduser()
    if path.is_dir():
        raise UserError(f"--plot {given}: that is a folder; give a file in it, e.g. --plot {path / 'activations.png'}.")
    if path.suffix.lower() not in PLOT_FORMATS:
        raise UserError(f"--plot {given}: the file must end in {', '.join(PLOT_FORMATS)}, e.g. "
                        f"--plot {path.with_suffix('.png') if path.suffix else Path(given + '.png')}.")
    if not path.parent.is_dir():
        raise UserError(f"--plot {given}: the folder {path.parent} does not exist.")
    return path


def inspect_command(args: list[str]) -> int:
    import json

    parser = argparse.ArgumentParser(
        prog="cnnlab inspect",
        description="One run from its files: status, each layer at step 0 and at the last probe, and the findings.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (completed, running, failed or older)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    options = parser.parse_args(args)
    from cnnlab.analysis.inspection import inspect_run, print_report, to_json
    from cnnlab.cli.console import console

    try:
        inspection = inspect_run(Path(options.run_dir))
    except UserError as error:
        print_error(str(error))
        return EXIT_USAGE
    if options.json:
        print(json.dumps(to_json(inspection), indent=2, allow_nan=False))
    else:
        print_report(console(), inspection)
    return EXIT_OK

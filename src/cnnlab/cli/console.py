"""What the commands show in the terminal: a run's progress (a rich bar, or plain lines when output is
not a terminal), its summary table, findings panel and a sweep job's one line, and error lines."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from cnnlab.analysis.summary import format_number  # one format for every table cell


def console(stderr: bool = False, live: bool = True) -> Console:
    """A rich console for cnnlab's output. When the output is not a terminal (a pipe, a file, a
    cluster log) it is as wide as any line needs, so that tables never wrap a name mid-word.
    live=False: plain lines even on a terminal (parallel sweep jobs share one; their bars would fight)."""
    terminal = Console(stderr=stderr)
    if live and terminal.is_terminal:
        return terminal
    return Console(stderr=stderr, width=max(terminal.width, 1000), force_terminal=False)


class QuietWhenClosed:
    """The command's stdout, which goes quiet once its reader has gone (`| head -1`, `| true`): the rest
    of the output is dropped instead of ending the command with a BrokenPipeError (Hydra's, rich's,
    logging's) on stderr."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._drop_the_rest()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._drop_the_rest()

    def _drop_the_rest(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # what is still buffered goes there too
        os.close(devnull)

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self.stream, name)


def print_error(message: str, job: str = "", outcome: str = "failed") -> None:
    """One red line on stderr: `cnnlab: error: ...`, or for a sweep's job `cnnlab: job #3 (...) failed: ...`."""
    prefix = f"cnnlab: job {job} {outcome}: " if job else "cnnlab: error: "
    Console(stderr=True).print(prefix + message, style="red", markup=False, highlight=False, soft_wrap=True)


class TrainingProgress:
    """One bar per epoch with the epoch's loss, accuracy and throughput so far; one line per finished
    epoch. In a sweep, `job` ("job #3 (activation=elu)") starts each of them: parallel jobs interleave."""

    def __init__(self, epochs: int, console: Console, job: str | None = None):
        self.console = console
        self.epochs = epochs
        self.job = job
        self.prefix = f"{job} " if job else ""
        self.live = self.console.is_terminal  # the trainer reads running values only for a bar someone sees
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[speed]} img/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.live,
        )
        self.task = None

    def __enter__(self) -> TrainingProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def started(self, description: str) -> None:
        """The run's one line once it is set up ("cnnlab: mlp + relu on mnist (...), ..."); a sweep's
        job names itself first ("cnnlab: job #3 (activation=elu): mlp + relu ...")."""
        if self.job:
            description = f"cnnlab: {self.job}: {description.removeprefix('cnnlab: ')}"
        self.console.print(description, highlight=False, markup=False, soft_wrap=True)

    def start_epoch(self, epoch: int, steps: int, completed: int = 0) -> None:
        self.task = self.progress.add_task(escape(f"{self.prefix}epoch {epoch}/{self.epochs}"), total=steps,
                                           completed=completed, loss="-", acc="-", speed="-")

    def advance(self) -> None:
        self.progress.advance(self.task)

    def update(self, loss: float, acc: float, images_per_second: float) -> None:
        self.progress.update(self.task, loss=f"{loss:.4f}", acc=f"{acc:.4f}", speed=f"{images_per_second:,.0f}")

    def end_epoch(self, epoch: int, step: int, summary: dict[str, Any]) -> None:
        parts = [f"{self.prefix}epoch {epoch}/{self.epochs}", f"step {step}"]
        parts += [f"{key} {format_number(value)}" for key, value in summary.items()]
        self.console.print(escape("  ".join(parts)), highlight=False, soft_wrap=True)


def job_line(job: str, metrics: dict[str, Any], run_dir: str) -> str:
    """A sweep job's one line at its end, in place of the summary table and the findings panel."""
    warnings = dict.fromkeys(f["kind"] for f in metrics.get("findings") or [] if f.get("severity") == "warning")
    parts = [f"{job}: {metrics.get('status')}", f"val_acc {format_number(metrics.get('val_acc'))}",
             f"test_acc {format_number(metrics.get('test_acc'))}",
             f"seconds {format_number(metrics.get('seconds'), 1)}"]
    if warnings:
        parts.append("warnings " + ",".join(warnings))
    return "  ".join([*parts, run_dir])


def summary_table(metrics: dict[str, Any], run_dir: str) -> Table:
    table = Table(title=f"cnnlab run: {metrics.get('status')}", show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("train loss / acc", f"{format_number(metrics.get('train_loss'))} / {format_number(metrics.get('train_acc'))}"),
        ("val loss / acc", f"{format_number(metrics.get('val_loss'))} / {format_number(metrics.get('val_acc'))}"),
        ("test loss / acc", f"{format_number(metrics.get('test_loss'))} / {format_number(metrics.get('test_acc'))}"),
        ("epochs / steps", f"{metrics.get('epochs')} / {metrics.get('steps')}"),
        ("images/s (run average)", f"{metrics.get('images_per_second') or 0:,.0f}"),
        ("seconds", format_number(metrics.get("seconds"), 1)),
        ("device", str(metrics.get("device"))),
        ("parameters", f"{metrics.get('parameters') or 0:,}"),
        ("run directory", run_dir),
    ]
    for name, value in rows:
        table.add_row(name, escape(value))
    return table


def findings_view(findings: list, findings_error: str | None) -> Panel | Text:
    """The findings panel, or the line that says why there are no findings to show."""
    if findings_error is not None:
        return Text(f"cnnlab: the findings could not be computed: {findings_error}")
    return findings_panel(findings)


def findings_panel(findings: list) -> Panel | Text:
    """The end-of-run "Findings": what went wrong inside the run, where, and what to try; one
    quiet line when there is nothing to say."""
    if not findings:
        return Text("Findings: nothing unusual in the probes.", style="green")
    styles = {"warning": "yellow", "info": "cyan"}
    lines = Text()
    for i, finding in enumerate(findings):
        where = ", ".join(part for part in (finding.layer, None if finding.step is None else f"step {finding.step}")
                          if part)
        lines.append("\n" if i else "")
        lines.append(f"{finding.severity} ", style=styles.get(finding.severity, ""))
        lines.append(f"{finding.kind}" + (f" ({where})" if where else ""), style="bold")
        lines.append(f": {finding.message}" + (f"\n  try: {finding.advice}" if finding.advice else ""))
    return Panel(lines, title=f"Findings ({len(findings)})", title_align="left", expand=False)

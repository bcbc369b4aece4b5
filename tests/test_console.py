"""What a run shows in the terminal: the live bar, its lines, a sweep job's one line, the findings."""

import io

from rich.console import Console

from cnnlab.analysis.findings import Finding
from cnnlab.cli.console import TrainingProgress, findings_view, job_line


def recording_console(terminal: bool = False) -> Console:
    return Console(file=io.StringIO(), force_terminal=terminal, width=150)


def test_a_terminal_gets_a_live_progress_bar(tiny_run):
    output = recording_console(terminal=True)
    tiny_run(progress=TrainingProgress(1, output))
    drawn = output.file.getvalue()
    assert "\x1b[" in drawn  # drawn with terminal control codes
    assert "epoch 1/1" in drawn and "img/s" in drawn and "8/8" in drawn


def test_a_sweeps_job_names_itself_on_its_description_line():
    description = "cnnlab: mlp + relu on fake (270 train / 30 val), 2,410 parameters, cpu, run directory x"
    named = "cnnlab: job #3 (activation=elu): mlp + relu on fake (270 train"
    for job, expected in ((None, description), ("job #3 (activation=elu)", named)):
        output = recording_console()
        TrainingProgress(2, output, job).started(description)
        assert output.file.getvalue().startswith(expected)


DYING = Finding("dying_relu", "warning", "act01_fc", 8, 0.5, "half of act01_fc's units never fire", "lower the lr")


def test_a_sweep_jobs_line_has_its_results_and_each_kind_of_warning_once():
    metrics = {"status": "completed", "val_acc": 0.5, "test_acc": 0.25, "seconds": 3.21,
               "findings": [DYING.to_dict(), DYING.to_dict(), {"kind": "edge_of_stability", "severity": "info"}]}
    assert job_line("job #1 (activation=elu)", metrics, "sweep/activation=elu") == (
        "job #1 (activation=elu): completed  val_acc 0.5000  test_acc 0.2500  seconds 3.2  warnings dying_relu  "
        "sweep/activation=elu")
    assert job_line("job #0 (x=1)", {"status": "failed"}, "d") == (
        "job #0 (x=1): failed  val_acc -  test_acc -  seconds -  d")


def test_findings_show_as_a_panel_a_quiet_line_or_why_they_could_not_be_computed():
    shown = {}
    for name, view in (("panel", findings_view([DYING], None)), ("none", findings_view([], None)),
                       ("error", findings_view([], "ValueError: boom"))):
        output = recording_console()
        output.print(view)
        shown[name] = output.file.getvalue()
    assert "Findings (1)" in shown["panel"] and "dying_relu (act01_fc, step 8)" in shown["panel"]
    assert "try: lower the lr" in shown["panel"]
    assert shown["none"] == "Findings: nothing unusual in the probes.\n"
    assert shown["error"] == "cnnlab: the findings could not be computed: ValueError: boom\n"


def test_a_finding_with_nothing_to_change_shows_no_advice_line():
    console = recording_console()
    note = Finding("dying_units", "info", "act03_fc", 80, 0.37, "6% -> 37% dead. The run learns well.", "")
    advised = Finding("not_learning", "warning", None, None, None, "The loss is flat.", "Try optimizer.lr=0.01.")
    console.print(findings_view([note, advised], None))
    text = console.file.getvalue()
    assert "The run learns well." in text and text.count("try:") == 1 and "try: Try optimizer.lr=0.01." in text

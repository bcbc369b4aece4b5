"""`cnnlab inspect RUN_DIR`: a hand-written run folder read back through the CLI, in this process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from cnnlab import cli
from cnnlab.analysis.findings import diagnose
from cnnlab.analysis.inspection import facts_of, findings_config, inspect_run, read_run
from tests.helpers import fails_after

# act01_fc and act02_fc at probe steps 0, 4, 8; the weight layers from step 4 (an update's statistics).
SCALARS = {
    "dead_fraction/act01_fc": [(0, 0.0), (4, 0.0625), (8, 0.125)],
    "dead_fraction/act02_fc": [(0, 0.25), (4, 0.375), (8, 0.5)],
    "act_mean/act01_fc": [(0, 0.5), (4, 0.6), (8, 0.75)],
    "act_std/act01_fc": [(0, 1.5), (4, 1.25), (8, 1.125)],
    "act_mean/act02_fc": [(0, 0.25), (4, 0.2), (8, 0.125)],
    "act_std/act02_fc": [(0, 0.5), (4, 0.5), (8, 0.25)],
    "effective_rank/act01_fc": [(0, 20.0), (4, 18.0), (8, 12.5)],
    "effective_rank/act02_fc": [(0, 10.0), (4, 9.0), (8, 7.5)],
    "grad_norm/layer01_fc": [(4, 0.5), (8, 0.25)],
    "update_ratio/layer01_fc": [(4, -2.5), (8, -3.0)],
    "grad_norm/layer02_fc": [(4, 0.125), (8, 0.0625)],
    "update_ratio/layer02_fc": [(4, -3.5), (8, -3.25)],
    "val/acc": [(8, 0.75)],
    "epoch": [(8, 1.0)],
}
CONFIG = {
    "dataset": {"name": "fake", "num_classes": 7},
    "model": {"name": "mlp", "init": "kaiming", "batchnorm": False},
    "activation": {"name": "relu"},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "trainer": {"grad_clip": None},
}
METRICS = {"status": "completed", "epochs": 1, "steps": 8, "val_acc": 0.75, "test_acc": 0.5}


def write_run(run_dir: Path, scalars=SCALARS, config=CONFIG, metrics=METRICS) -> Path:
    """A run folder as the trainer leaves it: event files, metrics.json, .hydra/config.yaml."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if config is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


@pytest.fixture
def inspect(capsys, monkeypatch):
    """cnnlab inspect ARGS in this process: (exit code, stdout, stderr)."""
    monkeypatch.setenv("COLUMNS", "200")  # rich's width when stdout is not a terminal

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit:
            cli.main(["inspect", *map(str, args)])
        out, err = capsys.readouterr()
        return exit.value.code, out, err

    return run


def row(out: str, layer: str) -> list[str]:
    """The cells of a layer's table row."""
    line = next(line for line in out.splitlines() if f" {layer} " in line)
    return [cell.strip() for cell in line.strip("│┃ ").split("│")]


# What the findings say of SCALARS: act02_fc's dead fraction rose by 0.25 (findings.dying_info is 0.2).
DYING = "act02_fc: the dead fraction on the training images rose from 25% (step 0) to 50% (step 8)."


def test_a_statistic_measured_once_shows_its_one_value_and_step_not_a_change(inspect, tmp_path):
    once = {tag: points[-1:] if tag.startswith(("grad_norm/", "update_ratio/")) else points
            for tag, points in SCALARS.items()}  # two probes, 0 and 8: an update's statistics only at 8
    write_run(tmp_path, scalars=once)
    code, out, err = inspect(tmp_path)
    assert code == 0, err
    assert row(out, "layer01_fc") == ["layer01_fc", "0.25 (step 8)", "-3.00 (step 8)", "-"]
    assert row(out, "act01_fc")[1] == "0.000 → 0.125"


def test_tables_show_each_layer_first_and_last_probe_in_depth_order(inspect, tmp_path):
    code, out, err = inspect(write_run(tmp_path))
    assert code == 0, err
    assert "completed" in out and "steps 8" in out and "val acc 0.7500" in out and "test acc 0.5000" in out
    assert row(out, "act01_fc") == ["act01_fc", "0.000 → 0.125", "-", "0.5 → 0.75", "1.5 → 1.12", "20.0 → 12.5"]
    assert row(out, "act02_fc") == ["act02_fc", "0.250 → 0.500", "-", "0.25 → 0.125", "0.5 → 0.25", "10.0 → 7.5"]
    assert row(out, "layer01_fc") == ["layer01_fc", "0.5 → 0.25", "-2.50 → -3.00", "-"]
    assert out.index("act01_fc") < out.index("act02_fc") < out.index("layer01_fc") < out.index("layer02_fc")
    assert "step 0 → 8" in out and "step 4 → 8" in out
    assert "findings (1)" in out and "[info] dying_units (act02_fc step 8)" in out and DYING in out
    assert "optimizer.lr=0.01" in out  # the advice


def test_findings_are_todays_rules_over_every_series_and_the_facts_of_the_runs_config(tmp_path):
    write_run(tmp_path)
    run = read_run(tmp_path)
    assert run.series["dead_fraction/act02_fc"] == [(0, 0.25), (4, 0.375), (8, 0.5)]
    facts = facts_of(run)
    assert (facts.num_classes, facts.steps_per_epoch, facts.activation, facts.init, facts.batchnorm) == (
        7, 8, "relu", "kaiming", False)
    assert (facts.optimizer, facts.lr, facts.momentum, facts.grad_clip, facts.status, facts.diverged_step) == (
        "sgd", 0.1, 0.9, None, "completed", None)
    inspection = inspect_run(tmp_path)
    assert inspection.findings == diagnose(run.series, facts, findings_config(run.config, []))
    assert [finding.message for finding in inspection.findings] == [DYING]
    assert inspection.notes == ["the run's config has no findings section: today's defaults are used"]


def test_a_runs_own_findings_settings_count_and_ones_this_version_does_not_know_get_todays(tmp_path):
    notes = []
    assert findings_config({**CONFIG, "findings": {"dying_info": 0.3}}, notes).dying_info == 0.3 and notes == []
    write_run(tmp_path, config={**CONFIG, "findings": {"dying_info": 0.3}})
    assert inspect_run(tmp_path).findings == []  # a rise of 0.25 is below the run's own threshold
    todays = findings_config({}, [])
    for unfitting in ({"bogus": 1}, {"dying_info": "high"}, ["dying_info"]):
        notes = []
        assert findings_config({"findings": unfitting}, notes) == todays
        [note] = notes
        assert note.startswith("the run's findings settings do not fit this version (") and "today's defaults" in note


def test_json_is_one_object_with_first_and_last_values_and_findings(inspect, tmp_path):
    code, out, _ = inspect(write_run(tmp_path), "--json")
    report = json.loads(out)  # stdout holds the JSON object and nothing else
    assert code == 0 and report["run"] == str(tmp_path) and report["status"] == "completed"
    assert report["layers"]["act01_fc"]["dead_fraction"] == {"first": 0.0, "last": 0.125, "first_step": 0,
                                                             "last_step": 8}
    assert report["layers"]["layer02_fc"]["update_ratio"]["last"] == -3.25
    assert "saturation" not in report["layers"]["act01_fc"]
    assert [(f["kind"], f["layer"], f["message"]) for f in report["findings"]] == [("dying_units", "act02_fc", DYING)]


def test_a_run_without_the_newer_tags_and_metrics_still_shows(inspect, tmp_path):
    old = {tag: points for tag, points in SCALARS.items() if not tag.startswith("effective_rank")}
    code, out, err = inspect(write_run(tmp_path, old, metrics={"status": "running", "epochs": 0, "steps": 8}))
    assert code == 0, err
    assert row(out, "act01_fc")[-1] == "-" and "running (no process is writing it" in out
    assert facts_of(read_run(tmp_path)).steps_per_epoch == 8  # from the epoch series, as metrics has no epoch yet


def test_a_fifo_named_like_an_event_file_is_skipped_with_a_note_not_waited_on(inspect, tmp_path):
    os.mkfifo(write_run(tmp_path) / "events.out.tfevents.9.fifo")  # issue 20, H2
    with fails_after(60):
        code, out, err = inspect(tmp_path)
    assert code == 0, err
    assert "skipped events.out.tfevents.9.fifo (a FIFO)" in out
    assert row(out, "act01_fc")[-1] == "20.0 → 12.5"  # the regular event file is read all the same


def test_a_garbage_file_named_like_an_event_file_is_named_in_one_note(inspect, tmp_path):
    (write_run(tmp_path) / "events.out.tfevents.9.garbage").write_bytes(b"\x00\x17 not a record" * 8)
    code, out, err = inspect(tmp_path)
    assert code == 0, err
    assert out.count("skipped events.out.tfevents.9.garbage (not TensorBoard events)") == 1
    assert row(out, "act01_fc")[-1] == "20.0 → 12.5"


@pytest.mark.parametrize("make", [lambda path: path.mkdir(), lambda path: None], ids=["not a run", "missing"])
def test_a_folder_that_is_not_a_run_is_one_clear_error_exit_2(inspect, tmp_path, make):
    folder = tmp_path / "folder"
    make(folder)
    code, out, err = inspect(folder)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and str(folder) in err and "Traceback" not in err


def test_inspects_a_real_tiny_run(inspect, tiny_run):
    run = tiny_run()
    code, out, err = inspect(run.dir, "--json")
    report = json.loads(out)
    assert code == 0, err
    assert report["status"] == "completed" and report["steps"] == run.metrics["steps"]
    assert report["layers"]["act01_fc"]["dead_fraction"]["last"] == pytest.approx(run.metrics["dead_fraction"]["act01_fc"])
    assert isinstance(report["findings"], list)

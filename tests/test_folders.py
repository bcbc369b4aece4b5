"""Finding runs: run and sweep folders in or below the paths given, a sweep's jobs not started yet,
runs whose files cannot be read."""

from __future__ import annotations

import os

import pytest

from cnnlab.analysis.folders import find_runs
from cnnlab.errors import UserError
from tests.fake_runs import configured, names, write_events, write_run
from tests.helpers import TINY, fails_after


def test_jobs_not_started_are_named_by_their_overrides_like_the_started_ones(tmp_path):
    configured(tmp_path / "sweep" / "activation=relu", "activation=relu", "optimizer.lr=0.1")
    jobs = [((tmp_path / "sweep" / "activation=elu").resolve(), {"activation": "elu", "optimizer.lr": "0.10"}),
            ((tmp_path / "sweep" / "activation=relu").resolve(), {"activation": "relu", "optimizer.lr": "0.1"})]
    runs = find_runs([str(tmp_path / "sweep")], jobs=jobs)
    assert [(r.name, r.status) for r in runs] == [("activation=elu", "missing"), ("activation=relu", "completed")]


def test_compare_searches_sub_folders_but_not_inside_runs_nor_its_own_figures(tmp_path, run_cli):
    outputs = tmp_path / "outputs"
    configured(outputs / "2026-11-26" / "10-00-00")
    configured(outputs / "2026-11-26" / "10-05-00", "optimizer.lr=0.01")
    configured(outputs / "multirun" / "2026-11-26" / "11-00-00" / "activation=elu", "activation=elu")
    write_run(outputs / "2026-11-26" / "10-00-00" / "checkpoints" / "inner")  # inside a run: not a run of its own
    assert names(outputs) == ["activation=relu, lr=0.001", "activation=relu, lr=0.01", "activation=elu, lr=0.001"]
    code, out, err = run_cli("compare", "outputs")
    assert code == 0, err
    assert (outputs / "summary.json").is_file() and (outputs / "summary.csv").is_file()
    assert len(find_runs([str(outputs)])) == 3  # what compare wrote there is not a run
    assert not (outputs / "figures").exists()  # nor a folder of event files, which TensorBoard would list as a run


@pytest.mark.parametrize("file, text, problem", [
    ("metrics.json", "[1, 2]", "holds a JSON list"),
    ("metrics.json", '"done"', "holds a JSON str"),
    ("metrics.json", '{"status": "compl', "cannot be read"),
    ("overrides.yaml", "- a=1\n  - b: [", "cannot be read"),
    ("overrides.yaml", "activation: relu\n", "holds a dict"),
    ("config.yaml", "- relu\n", "holds a list"),
])
def test_a_run_with_malformed_files_is_skipped_with_a_warning_naming_the_file(tmp_path, file, text, problem):
    write_run(tmp_path / "sweep" / "good")
    bad = write_run(tmp_path / "sweep" / "bad", overrides="- activation=elu\n")
    (bad / file if file == "metrics.json" else bad / ".hydra" / file).write_text(text)
    warnings = []
    runs = find_runs([str(tmp_path / "sweep")], warn=warnings.append)
    assert [run.path.name for run in runs] == ["good"]
    (warning,) = warnings
    assert f"{bad.name}" in warning and file in warning and problem in warning


def test_compare_skips_a_fifo_named_like_an_event_file_with_a_warning(tmp_path, run_cli):
    run = write_events(tmp_path / "runs" / "a", "0.1", {"val/acc": [0.25, 0.5]})
    write_events(tmp_path / "runs" / "b", "0.01", {"val/acc": [0.5, 0.75]})
    os.mkfifo(run / "events.out.tfevents.9.fifo")  # issue 20, H2
    with fails_after(60):
        code, out, err = run_cli("compare", "runs")
    assert code == 0, err
    assert "skipped events.out.tfevents.9.fifo (a FIFO)" in err and str(run.resolve()) in err
    (run / "events.out.tfevents.8.garbage").write_bytes(b"\x00\x17 not a record" * 8)
    code, out, err = run_cli("compare", "runs")
    assert code == 0 and err.count("events.out.tfevents.8.garbage (not TensorBoard events)") == 1, err
    assert (tmp_path / "runs" / "val_curves.png").is_file()


def test_a_single_run_is_named_by_its_typed_settings_after_its_time(tmp_path, run_cli):
    from cnnlab.cli.folders import named_by

    assert named_by(["model=convnet", "activation=leaky_relu", "hydra.run.dir=x", "resume=y", "~trainer.seed"]) == \
        "_activation-leaky_relu+model-convnet"
    assert named_by([]) == ""
    assert named_by(["dataset.root=/a/b", "model.hidden=[64,32]"]) == "_dataset.root-_a_b+model.hidden-_64_32_"
    assert named_by(["trainer.device=cpu", "dataset.root=/a", "activation=elu"]).startswith("_activation-elu+")
    code, out, err = run_cli("train", *TINY, "activation=tanh")
    assert code == 0, err
    (run,) = (tmp_path / "outputs").glob("*/*")
    time, name = run.name.split("_", 1)
    assert name == named_by([*TINY, "activation=tanh"])[1:]  # as long as a sweep job's name may be
    assert name.startswith("activation-tanh+dataset.image_size-8")  # TensorBoard's run name says what the run is
    code, out, err = run_cli("train", f"resume={run}", "trainer.epochs=2")  # the folder, typed as it is
    assert code == 0, err

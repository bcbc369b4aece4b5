"""Sweeps from the shell: failures, launchers, named experiments."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cnnlab.cli import config_dir, threads_per_job
from cnnlab.config import validate
from tests.helpers import TINY, TINY_DATA, TINY_TRAINER


def cnnlab(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def statuses(sweep: Path) -> dict[str, str]:
    return {path.name: json.loads((path / "metrics.json").read_text())["status"]
            for path in sweep.iterdir() if (path / "metrics.json").is_file()}


def test_a_failing_job_is_reported_at_once_and_at_the_end_and_the_others_complete(tmp_path):
    result = cnnlab("train", "-m", "model=convnet", "model.channels=[4],[4,4,4,4],[4,4]", "model.fc_hidden=8", *TINY_DATA,
                    *TINY_TRAINER, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 1
    assert statuses(tmp_path / "sweep") == {"model.channels=[4]": "completed", "model.channels=[4,4,4,4]": "failed",
                                            "model.channels=[4,4]": "completed"}
    lines = [line for line in result.stderr.splitlines() if "failed" in line]
    assert lines[0].startswith("cnnlab: job #1 (") and "model.channels" in lines[0]  # reported as it happened
    assert "1 of 3 jobs did not complete: model.channels=[4,4,4,4] (failed)" in result.stderr  # and at the end
    assert "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert summary["not_completed"] == ["model.channels=[4,4,4,4]"]
    # The failed job ran after the first one and before the last: the sweep went on.
    assert (tmp_path / "sweep" / "model.channels=[4,4]" / "checkpoints" / "last.pt").is_file()


def test_a_crash_in_one_job_leaves_a_traceback_file_and_the_sweep_goes_on(tmp_path):
    # BatchNorm cannot train on batches of one: torch raises in the first step of that job.
    tiny = [arg for arg in TINY if not arg.startswith("trainer.batch_size")]
    result = cnnlab("train", "-m", "trainer.batch_size=1,32", "model.batchnorm=true", *tiny, "hydra.sweep.dir=sweep",
                    cwd=tmp_path)
    assert result.returncode == 1
    sweep = tmp_path / "sweep"
    assert statuses(sweep) == {"trainer.batch_size=1": "failed", "trainer.batch_size=32": "completed"}
    assert "Expected more than 1 value per channel" in (sweep / "trainer.batch_size=1" / "traceback.txt").read_text()
    assert "Traceback" not in result.stderr and "traceback in" in result.stderr
    metrics = json.loads((sweep / "trainer.batch_size=1" / "metrics.json").read_text())
    assert "Expected more than 1 value per channel" in metrics["error"]


def test_joblib_runs_jobs_in_parallel_processes_with_one_thread_each(tmp_path):
    result = cnnlab("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "activation=relu,elu", *TINY,
                    "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert statuses(tmp_path / "sweep") == {"activation=relu": "completed", "activation=elu": "completed"}
    for job in ("activation=relu", "activation=elu"):
        assert json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["threads"] == max(1, threads_per_job(2, _cores()))
    assert "Joblib" in result.stdout + result.stderr


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def test_threads_per_job_shares_the_cores():
    assert threads_per_job(2, 16) == 8
    assert threads_per_job(-1, 16) == 1
    assert threads_per_job(-2, 16) == 1
    assert threads_per_job(4, 2) == 1


def test_submitit_local_runs_the_cluster_code_path_on_this_machine(tmp_path):
    result = cnnlab("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                    "activation=relu,gelu", *TINY, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert statuses(tmp_path / "sweep") == {"activation=relu": "completed", "activation=gelu": "completed"}
    assert (tmp_path / "sweep" / ".submitit").is_dir()


EXPERIMENTS = {
    "relu_variants": {"activation"},
    "batchnorm_sigmoid_relu": {"activation", "model.batchnorm"},
    "deep_saturation": {"activation"},
    "selu_vs_batchnorm": {"preset"},
    "init_schemes": {"model.init"},
}


@pytest.mark.parametrize("name, swept", sorted(EXPERIMENTS.items()))
def test_every_experiment_composes_validates_and_defines_its_sweep(name, swept):
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
    assert set(cfg.hydra.sweeper.params) == swept
    del cfg.hydra
    validate(cfg)


def test_experiment_files_are_exactly_the_documented_ones():
    assert sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml")) == sorted(EXPERIMENTS)


def test_an_experiment_sweep_runs_its_presets(tmp_path):
    result = cnnlab("train", "-m", "experiment=selu_vs_batchnorm", *TINY_DATA, *TINY_TRAINER, "model.hidden=[16,16,16]",
                    "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "sweep"
    assert statuses(sweep) == {"preset=selu_lecun": "completed", "preset=relu_kaiming": "completed",
                               "preset=relu_kaiming_batchnorm": "completed"}
    import yaml

    composed = {job: yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text()) for job in statuses(sweep)}
    assert composed["preset=selu_lecun"]["activation"]["name"] == "selu"
    assert composed["preset=selu_lecun"]["model"]["init"] == "lecun"
    assert composed["preset=relu_kaiming_batchnorm"]["model"]["batchnorm"] is True
    assert composed["preset=relu_kaiming"]["model"]["hidden"] == [16, 16, 16]  # the command line wins

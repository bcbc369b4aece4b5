"""Sweeps from the shell: failures, launchers, named experiments."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cnnlab.cli.folders import threads_per_job
from cnnlab.config import config_dir, validate
from tests.helpers import TINY, TINY_DATA, TINY_MLP, TINY_TRAINER, write_mnist


def cnnlab(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def statuses(sweep: Path) -> dict[str, str]:
    return {path.name: json.loads((path / "metrics.json").read_text())["status"]
            for path in sweep.iterdir() if (path / "metrics.json").is_file()}


def test_a_failing_job_is_reported_at_once_and_at_the_end_and_the_others_complete(tmp_path):
    # The middle job's data is missing: it fails once it runs (a config check cannot know that).
    write_mnist(tmp_path / "a")
    write_mnist(tmp_path / "c")
    result = cnnlab("train", "-m", "dataset.root=a,missing,c", "dataset.download=false", *TINY_MLP, *TINY_TRAINER,
                    "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 1
    assert statuses(tmp_path / "sweep") == {"dataset.root=a": "completed", "dataset.root=missing": "failed",
                                            "dataset.root=c": "completed"}
    lines = [line for line in result.stderr.splitlines() if "failed" in line]
    assert lines[0].startswith("cnnlab: job #1 (") and "dataset.root=missing" in lines[0]  # reported as it happened
    assert "1 of 3 jobs did not complete: dataset.root=missing (failed)" in result.stderr  # and at the end
    assert "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert summary["not_completed"] == ["dataset.root=missing"]
    # The failed job ran after the first one and before the last: the sweep went on.
    assert (tmp_path / "sweep" / "dataset.root=c" / "checkpoints" / "last.pt").is_file()


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


# Jobs long enough (6,700 steps, a few seconds) for two parallel jobs to be training at once, however
# far apart their workers start, with a checkpoint soon after each starts training.
# Jobs long enough to be stopped well inside their loops (1,350 steps, about 3 s each here), and no
# longer: the commands that finish them train the rest.
LONGER = ["dataset.train_size=12000", "trainer.epochs=4", "trainer.checkpoint_every=50", "probes.density=false"]


def start_sweep(*args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnnlab", "train", "-m", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoints(process: subprocess.Popen, sweep: Path, count: int) -> None:
    """Until `count` jobs have written a checkpoint: well inside their training loops."""
    deadline = time.monotonic() + 60
    while len(list(sweep.glob("*/checkpoints/last.pt"))) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def children(pid: int) -> list[int]:
    def parent(status: Path) -> int:
        try:
            return int(status.read_text().split("\nPPid:\t")[1].split()[0])
        except (OSError, IndexError):  # gone meanwhile
            return -1

    return [int(status.parent.name) for status in Path("/proc").glob("[0-9]*/status") if parent(status) == pid]


def summary_statuses(sweep: Path) -> dict[str, str]:
    return {run["name"]: run["status"] for run in json.loads((sweep / "summary.json").read_text())["runs"]}


def alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has ended
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="the sweep finds joblib's workers in /proc")
def test_sigterm_stops_every_job_of_a_joblib_sweep_with_a_checkpoint_and_the_same_command_finishes_them(tmp_path):
    args = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "activation=relu,elu,gelu", *TINY, *LONGER,
            "hydra.sweep.dir=sweep"]
    sweep = tmp_path / "sweep"
    process = start_sweep(*args, cwd=tmp_path)
    wait_for_checkpoints(process, sweep, 2)  # the first two jobs; the third waits for a free worker
    workers = children(process.pid)
    assert len(workers) >= 2
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    deadline = time.monotonic() + 10
    while any(map(alive, workers)):  # none keeps training once the sweep has ended
        assert time.monotonic() < deadline, [pid for pid in workers if alive(pid)]
        time.sleep(0.01)
    assert err.count("stopped by SIGTERM") == 2 and "Traceback" not in err
    summary = summary_statuses(sweep)
    assert summary == {"activation=relu": "interrupted", "activation=elu": "interrupted", "activation=gelu": "missing"}
    assert all(name in out for name in summary)  # the table lists the job that never started too
    for job in ("activation=relu", "activation=elu"):
        assert (sweep / job / "checkpoints" / "last.pt").is_file()

    again = cnnlab("train", "-m", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("resuming at epoch") == 2
    assert statuses(sweep) == {"activation=relu": "completed", "activation=elu": "completed",
                               "activation=gelu": "completed"}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda signum: signum.name)
def test_a_signal_stops_a_sweep_in_one_process_and_the_summary_lists_the_jobs_not_started(tmp_path, signum):
    process = start_sweep("activation=relu,elu,gelu", *TINY, *LONGER, "hydra.sweep.dir=sweep", cwd=tmp_path)
    wait_for_checkpoints(process, tmp_path / "sweep", 1)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert summary_statuses(tmp_path / "sweep") == {"activation=relu": "interrupted", "activation=elu": "missing",
                                                    "activation=gelu": "missing"}
    assert "3 of 3 jobs did not complete" in err and "activation=gelu (missing)" in err


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def test_threads_per_job_shares_the_cores():
    assert threads_per_job(2, 16) == 8
    assert threads_per_job(-1, 16) == 1
    assert threads_per_job(-2, 16) == 1
    assert threads_per_job(4, 2) == 1


EXPERIMENTS = {
    "relu_variants": {"activation"},
    "batchnorm_sigmoid_relu": {"activation", "model.batchnorm"},
    "deep_saturation": {"activation"},
    "selu_vs_batchnorm": {"preset"},
    "init_schemes": {"model.init"},
    "dying_relu": {"activation", "optimizer.lr"},
    "rank_collapse": {"model.batchnorm"},
    "edge_of_stability": {"optimizer.lr"},
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


def test_each_job_names_itself_on_its_lines_and_ends_with_one_line_not_a_table(run_cli, tmp_path):
    code, out, err = run_cli("train", "-m", "activation=relu,elu", *TINY, "trainer.epochs=2", "hydra.sweep.dir=sweep")
    assert code == 0, err
    lines = out.splitlines()
    for num, name in enumerate(["activation=relu", "activation=elu"]):
        job = f"job #{num} ({name})"
        assert any(line.startswith(f"cnnlab: {job}: mlp + {name.partition('=')[2]} on fake (") for line in lines)
        epochs = [line for line in lines if line.startswith(f"{job} epoch ")]
        assert [line.split("  ")[0] for line in epochs] == [f"{job} epoch 1/2", f"{job} epoch 2/2"]
        assert all("img/s (epoch) " in line for line in epochs)
        metrics = json.loads((tmp_path / "sweep" / name / "metrics.json").read_text())
        warned = dict.fromkeys(f["kind"] for f in metrics["findings"] if f["severity"] == "warning")  # see test_console
        [end] = [line for line in lines if line.startswith(f"{job}: ")]
        assert end == (f"{job}: completed  val_acc {metrics['val_acc']:.4f}  test_acc {metrics['test_acc']:.4f}  "
                       f"seconds {metrics['seconds']:.1f}  " + (f"warnings {','.join(warned)}  " if warned else "")
                       + str(tmp_path / "sweep" / name))
    assert "cnnlab run:" not in out and "Findings" not in out  # no table or panel per job


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL of a joblib worker")
def test_a_joblib_worker_killed_ends_the_sweep_with_its_summary_and_the_command_that_finishes_it(
        tmp_path, monkeypatch, capsys):
    from cnnlab.cli.train_command import train_command

    def job(cfg):  # in a joblib worker: the elu job's worker is killed (kill -9, out of memory)
        import os
        import signal
        from pathlib import Path

        from hydra.core.hydra_config import HydraConfig

        from cnnlab.rundir import write_metrics

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        write_metrics(run_dir, {"status": "running"})
        if cfg.activation.name == "elu":
            os.kill(os.getpid(), signal.SIGKILL)
        write_metrics(run_dir, {"status": "completed"})
        return "completed"

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code = train_command(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "activation=relu,elu,gelu",
                          *TINY, "hydra.sweep.dir=sweep"], job=job)
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err, err
    assert "a worker process of the joblib launcher died (exit code {SIGKILL(-9)}" in err, err
    assert re.search(r"activation=elu\S* (was|were) running and stopped", err), err
    assert "Run the same sweep command again to finish it" in err
    assert "activation=elu" in out  # the summary table lists every job
    assert "HYDRA_FULL_ERROR" not in os.environ  # the command's own setting does not outlive it


def test_a_second_joblib_sweep_in_one_process_puts_its_jobs_in_its_own_folder(tmp_path, monkeypatch):
    """joblib keeps its workers for the next call, each in the folder it started in; the sweep stops
    them at its end, so that a later sweep of this process (cnnlab remedy, a notebook) starts its own."""
    from cnnlab.cli.train_command import train_command

    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        assert train_command(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "activation=relu,elu", *TINY,
                              "probes.density=false", "hydra.sweep.dir=sweep"]) == 0
        jobs = sorted(path.name for path in (tmp_path / name / "sweep").iterdir() if (path / "metrics.json").is_file())
        assert jobs == ["activation=elu", "activation=relu"], name

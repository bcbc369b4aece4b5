"""Bad input, divergence and unsafe checkpoints: a clear error, a documented exit code, no
traceback, nothing lost. The command line runs in this process (`cnnlab.cli.main`), as a user's
shell would run it, only without paying torch's import time for every case."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from cnnlab import cli
from cnnlab.checkpoint import load_checkpoint
from cnnlab.trainer import RunningSums, train_step
from tests.helpers import write_image_folder

TINY = ["dataset=fake", "dataset.train_size=120", "dataset.test_size=20", "dataset.image_size=8", "model.hidden=[8]",
        "trainer.batch_size=20", "trainer.epochs=1", "trainer.device=cpu", "probes.batch_size=8"]


@pytest.fixture
def run_cli(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit:
            cli.main(list(args))
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return exit.value.code, out, err

    return run


def test_missing_or_empty_dataset_root_names_the_files(run_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    for root in ("missing", "empty"):
        code, _, err = run_cli("train", f"dataset.root={root}", "dataset.download=false", "trainer.device=cpu")
        assert code == 1
        assert "train-images-idx3-ubyte" in err and f"{root}/MNIST/raw" in err and "dataset.download=true" in err


def test_a_download_that_fails_says_why_and_what_to_do(run_cli, monkeypatch):
    # A proxy that refuses at once: the download fails here exactly as it does without network.
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    code, _, err = run_cli("train", "dataset=fashion_mnist", "dataset.root=data", "trainer.device=cpu")
    assert code == 1
    assert "Could not download fashion_mnist" in err and "dataset.download=false" in err


def test_image_folder_mistakes_fail_clearly(run_cli, tmp_path):
    write_image_folder(tmp_path / "single", classes=("cat",))
    for name in ("a", "b"):
        (tmp_path / "corrupt" / name).mkdir(parents=True)
        (tmp_path / "corrupt" / name / "x.png").write_bytes(b"not an image")
        (tmp_path / "text" / name).mkdir(parents=True)
        (tmp_path / "text" / name / "notes.txt").write_text("not an image")
    (tmp_path / "nothing").mkdir()
    expected = {"single": "at least two", "corrupt": "could be read", "text": "no images found",
                "nothing": "no images found"}
    for folder, message in expected.items():
        code, _, err = run_cli("train", "dataset=imagefolder", f"dataset.path={folder}", "trainer.device=cpu")
        assert code == 1 and message in err and "dataset.path" in err, (folder, err)


def test_a_corrupt_image_among_good_ones_is_reported_and_skipped(run_cli, tmp_path):
    root = write_image_folder(tmp_path / "pets", per_class=10, size=8)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    code, out, _ = run_cli("train", "dataset=imagefolder", "dataset.path=pets", "dataset.image_size=8",
                           "model.hidden=[8]", "trainer.epochs=1", "trainer.batch_size=4", "trainer.device=cpu",
                           "probes.batch_size=4", "hydra.run.dir=run")
    assert code == 0
    assert "broken.jpg" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_where_there_is_none(run_cli):
    code, _, err = run_cli("train", *TINY[:-2], "trainer.device=cuda:0")
    assert code == 1 and "trainer.device='cuda:0'" in err and "trainer.device=cpu" in err


def test_an_output_directory_that_cannot_be_written(run_cli, tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should go")
    code, _, err = run_cli("train", *TINY, "hydra.run.dir=blocker/run")
    assert code == 2 and "hydra.run.dir" in err and "is a file" in err
    code, _, err = run_cli("train", "-m", "activation=relu,elu", *TINY, "hydra.sweep.dir=blocker/sweep")
    assert code == 2 and "hydra.sweep.dir" in err


def test_a_new_run_never_overwrites_an_old_one(run_cli, tmp_path):
    assert run_cli("train", *TINY, "hydra.run.dir=run")[0] == 0
    before = (tmp_path / "run" / "metrics.json").read_text()
    code, _, err = run_cli("train", *TINY, "activation=elu", "hydra.run.dir=run")
    assert code == 2 and "already holds a run" in err and "resume=run" in err
    assert (tmp_path / "run" / "metrics.json").read_text() == before
    assert "relu" in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()


def test_resume_refuses_what_is_not_a_run_or_not_this_run(run_cli, tmp_path):
    code, _, err = run_cli("train", "resume=nowhere")
    assert code == 2 and "not a run directory" in err
    assert run_cli("train", *TINY, "hydra.run.dir=mlp")[0] == 0
    assert run_cli("train", *TINY[:4], "model=convnet", "model.channels=[4]", *TINY[5:], "hydra.run.dir=cnn")[0] == 0
    before = (tmp_path / "mlp" / "metrics.json").read_text()

    code, _, err = run_cli("train", "resume=mlp", "optimizer.lr=0.5")  # a setting that makes another run
    assert code == 2 and "optimizer.lr cannot change" in err

    shutil.copy(tmp_path / "cnn" / "checkpoints" / "last.pt", tmp_path / "mlp" / "checkpoints" / "last.pt")
    code, _, err = run_cli("train", "resume=mlp")  # a checkpoint of a different model
    assert code == 1 and "different configuration" in err and "model" in err

    checkpoint = tmp_path / "mlp" / "checkpoints" / "last.pt"
    checkpoint.write_bytes((tmp_path / "cnn" / "checkpoints" / "last.pt").read_bytes()[:300])  # truncated
    code, _, err = run_cli("train", "resume=mlp")
    assert code == 1 and "Cannot read checkpoint" in err
    assert (tmp_path / "mlp" / "metrics.json").read_text() == before  # nothing lost on the way


class Payload:
    """Unpickling this would create a file: a stand-in for any code a crafted checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(run_cli, tmp_path):
    assert run_cli("train", *TINY, "hydra.run.dir=run")[0] == 0
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(checkpoint)
    state["model"] = Payload(marker)
    torch.save(state, checkpoint)

    code, _, err = run_cli("train", "resume=run")
    assert code == 1 and "Refused to load" in err and "weights_only" in err
    assert not marker.exists()
    torch.load(checkpoint, weights_only=False)  # what an unsafe loader would have done
    assert marker.exists()


def test_divergence_stops_at_that_step_keeps_the_last_good_checkpoint_and_exits_3(run_cli, tmp_path):
    code, _, err = run_cli("train", "dataset=fake", "dataset.train_size=600", "model.hidden=[32]", "optimizer=sgd",
                           "optimizer.lr=1e4", "optimizer.momentum=0.9", "scheduler=onecycle", "trainer.epochs=4",
                           "trainer.batch_size=30", "trainer.checkpoint_every=5", "trainer.device=cpu",
                           "hydra.run.dir=run")
    assert code == 3
    assert "non-finite" in err and "last good checkpoint" in err and len(err.strip().splitlines()) == 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["diverged_step"] == 8
    kept = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert kept["step"] == 5 and all(torch.isfinite(v).all() for v in kept["model"].values())


def test_a_diverging_job_does_not_stop_a_sweep(run_cli, tmp_path):
    code, _, err = run_cli("train", "-m", "optimizer.lr=10000.0,0.01", "optimizer=sgd", "scheduler=onecycle",
                           *TINY, "trainer.epochs=3", "hydra.sweep.dir=sweep")
    assert code == 1
    statuses = {job: json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["status"]
                for job in ("optimizer.lr=10000.0", "optimizer.lr=0.01")}
    assert statuses == {"optimizer.lr=10000.0": "diverged", "optimizer.lr=0.01": "completed"}
    assert "optimizer.lr=10000.0 (diverged)" in err


def test_skip_mode_drops_a_non_finite_step_and_keeps_the_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    sums = RunningSums(torch.device("cpu"))
    before = [p.detach().clone() for p in parameters]
    poisoned = torch.full((2, 1, 2, 2), float("nan"))
    _, finite = train_step(model, parameters, optimizer, None, poisoned, torch.tensor([0, 1]), None, sums,
                           skip_nonfinite=True)
    assert not finite and all(torch.equal(b, p) for b, p in zip(before, parameters)) and sums.count == 0
    _, finite = train_step(model, parameters, optimizer, None, torch.ones(2, 1, 2, 2), torch.tensor([0, 1]), None,
                           sums, skip_nonfinite=True)
    assert finite and not all(torch.equal(b, p) for b, p in zip(before, parameters)) and sums.count == 2

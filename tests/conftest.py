import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import TINY_DATA, TINY_MLP, TINY_TRAINER, compose_config, write_mnist


@dataclass
class TinyRun:
    dir: Path  # the run directory: metrics.json, checkpoints/, event files
    metrics: dict  # what metrics.json says
    result: Any  # train's RunResult: status, findings, description, the error that ended the run


@pytest.fixture
def tiny_run(tmp_path):
    """Train the tiny run (tests/helpers.py) plus OVERRIDES in this process, into tmp_path/NAME.
    `data` and `model` swap those parts of it; `resume`, `progress` and `stop` go to train()."""
    from cnnlab.config import validate
    from cnnlab.train.loop import train

    def run(*overrides: str, data=TINY_DATA, model=TINY_MLP, name="run", resume=False, progress=None,
            stop=None) -> TinyRun:
        cfg = compose_config(*data, *model, *TINY_TRAINER, *overrides)
        result = train(validate(cfg), tmp_path / name, resume=resume, progress=progress, stop=stop)
        return TinyRun(tmp_path / name, result.metrics, result)

    return run


@pytest.fixture
def tiny_state(tmp_path):
    """setup() of the tiny run plus OVERRIDES, fresh or (resume=True) from tmp_path/NAME's
    checkpoint: a TrainState to drive step by step. Its TensorBoard writer is closed afterwards."""
    from cnnlab.config import validate
    from cnnlab.train.loop import setup

    states = []

    def build(*overrides: str, data=TINY_DATA, model=TINY_MLP, name="run", resume=False):
        cfg = compose_config(*data, *model, *TINY_TRAINER, *overrides)
        states.append(setup(validate(cfg), tmp_path / name, resume=resume))
        return states[-1]

    yield build
    for state in states:
        state.log.writer.close()


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    write_mnist(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def accept_generated_cifar(monkeypatch):
    """torchvision refuses CIFAR files whose md5 differs from the published ones, as generated files
    do. Skip only the md5 comparison (files must still exist), so torchvision's real parsing runs."""
    from torchvision.datasets import cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.fixture(autouse=True)
def logging_as_before():
    """Hydra points the root logger at this test's captured stdout, which pytest closes afterwards:
    a later command's log message must not go there."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def run_cli(capsys, monkeypatch, tmp_path):
    """`cnnlab ARGS` in this process, in tmp_path: (exit code, stdout, stderr), never a traceback."""
    from cnnlab import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit:
            cli.main(list(args))
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return exit.value.code, out, err

    return run

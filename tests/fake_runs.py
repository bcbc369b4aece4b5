"""Run folders as runs leave them, written without training, for compare's tests: .hydra/overrides.yaml,
.hydra/config.yaml (as far as BASE_CONFIG and OPTIONS compose it), metrics.json, event files."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from cnnlab.analysis.folders import find_runs
from cnnlab.analysis.runs import Run

# A composed config as Hydra writes it to .hydra/config.yaml (the parts compare reads).
BASE_CONFIG = {
    "dataset": {"name": "fake", "root": "data", "download": True, "num_workers": 0},
    "model": {"name": "mlp", "hidden": [32], "batchnorm": False},
    "activation": {"name": "relu"},
    "optimizer": {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999]},
    "trainer": {"epochs": 1, "batch_size": 32, "seed": 0, "device": "cpu", "threads": None},
    "resume": None,
    "probes": {"every": 100},
}
OPTIONS = {"optimizer=sgd": {"optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
           "activation=leaky_relu": {"activation": {"name": "leaky_relu", "negative_slope": 0.01}},
           "activation=elu": {"activation": {"name": "elu", "alpha": 1.0}},
           "model=convnet": {"model": {"name": "convnet", "channels": [16, 32], "fc_hidden": 64}},
           "preset=selu_lecun": {"activation": {"name": "selu"}, "model": {"init": "lecun"}}}


def composed(overrides: list[str]) -> dict:
    """The config `cnnlab train OVERRIDES` composes, as far as BASE_CONFIG and OPTIONS go."""
    config = json.loads(json.dumps(BASE_CONFIG))
    for override in overrides:
        for group, settings in OPTIONS.get(override, {}).items():
            config[group] = {**config[group], **settings} if group == "model" else dict(settings)
        key, _, value = override.partition("=")
        if "." in key:
            *parents, leaf = key.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[leaf] = yaml.safe_load(value)
    return config


def write_run(path: Path, overrides="- activation=relu\n", metrics='{"status": "completed", "val_acc": 0.5}',
              config: dict | None = None) -> Path:
    """A run directory as a run leaves it, without training: .hydra/overrides.yaml (and config.yaml), metrics.json."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(overrides)
    if config is not None:
        (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        (path / "metrics.json").write_text(metrics)
    return path


def configured(path: Path, *overrides: str, status="completed", val_acc=0.5, test_acc=0.5) -> Path:
    """A run started with `cnnlab train OVERRIDES`: its overrides, composed config and metrics."""
    metrics = json.dumps({"status": status, "val_acc": val_acc, "test_acc": test_acc})
    return write_run(path, "".join(f"- {o}\n" for o in overrides), metrics, composed(list(overrides)))


def seeded_run(name, seed, status="completed", val_acc=None, test_acc=None) -> Run:
    """A Run of activation=NAME and trainer.seed=SEED, only in memory (no folder)."""
    metrics = {"status": status, "val_acc": val_acc, "test_acc": test_acc, "dead_fraction": {"all": 0.5}}
    return Run(Path(f"/runs/{name}-{seed}"), {"activation": name, "trainer.seed": str(seed), "dataset.root": "/d"}, metrics)


def names(folder: Path) -> list[str]:
    return [r.name for r in find_runs([str(folder)])]


def write_events(path: Path, lr: str, scalars: dict[str, list[float]], metrics=None, *overrides: str) -> Path:
    """A run directory with TensorBoard scalars (tag -> values at steps 0, 10, 20, ...), as a run writes them;
    with `overrides`, also the config they compose (with optimizer.lr=LR)."""
    from torch.utils.tensorboard import SummaryWriter

    config = composed([f"optimizer.lr={lr}", *overrides]) if overrides else None
    write_run(path, overrides="".join(f"- {o}\n" for o in [f"optimizer.lr={lr}", *overrides]),
              metrics=metrics or '{"status": "completed", "val_acc": 0.5}', config=config)
    with SummaryWriter(str(path)) as writer:
        for tag, values in scalars.items():
            for i, value in enumerate(values):
                writer.add_scalar(tag, value, global_step=10 * i)
    return path

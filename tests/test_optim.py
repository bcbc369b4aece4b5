"""Optimizers and learning-rate schedules, built from their configs."""

import pytest
import torch

from cnnlab.config import validate
from cnnlab.train.optim import build_optimizer
from tests.helpers import compose_config, read_scalars


@pytest.mark.parametrize(
    "overrides, expected, settings",
    [
        (["optimizer=sgd", "optimizer.lr=0.2", "optimizer.momentum=0.8", "optimizer.nesterov=true",
          "optimizer.weight_decay=0.01"],
         torch.optim.SGD, {"lr": 0.2, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01}),
        (["optimizer=adam", "optimizer.lr=0.003", "optimizer.betas=[0.8,0.99]", "optimizer.weight_decay=0.001"],
         torch.optim.Adam, {"lr": 0.003, "betas": (0.8, 0.99), "weight_decay": 0.001}),
        (["optimizer=adamw", "optimizer.lr=0.002", "optimizer.betas=[0.85,0.95]", "optimizer.weight_decay=0.05"],
         torch.optim.AdamW, {"lr": 0.002, "betas": (0.85, 0.95), "weight_decay": 0.05}),
        (["optimizer=rmsprop", "optimizer.lr=0.004", "optimizer.alpha=0.9", "optimizer.momentum=0.5",
          "optimizer.weight_decay=0.02"],
         torch.optim.RMSprop, {"lr": 0.004, "alpha": 0.9, "momentum": 0.5, "weight_decay": 0.02}),
    ],
    ids=["sgd", "adam", "adamw", "rmsprop"],
)
def test_each_optimizer_name_builds_its_torch_optimizer_with_the_configs_settings(overrides, expected, settings):
    run = validate(compose_config(*overrides))
    optimizer = build_optimizer(run.optimizer, [torch.nn.Parameter(torch.zeros(3))])
    assert type(optimizer) is expected
    group = optimizer.param_groups[0]
    assert {key: group[key] for key in settings} == settings


@pytest.mark.parametrize("schedule", ["none", "step", "cosine", "onecycle"])
def test_learning_rate_schedules_show_in_the_logged_lr(tiny_run, schedule):
    extra = {"step": ["scheduler.step_size=1", "scheduler.gamma=0.5"], "cosine": ["scheduler.min_lr=0.0001"]}
    run = tiny_run(f"scheduler={schedule}", "optimizer.lr=0.01", "trainer.epochs=2", "trainer.log_every=1",
                   *extra.get(schedule, []))
    lrs = [value for _, value in read_scalars(run.dir)["lr"]]
    steps = len(lrs)
    if schedule == "none":
        assert lrs == pytest.approx([0.01] * steps)
    elif schedule == "step":
        assert lrs == pytest.approx([0.01] * (steps // 2) + [0.005] * (steps // 2))
    elif schedule == "cosine":
        assert lrs[0] == pytest.approx(0.01) and all(a >= b for a, b in zip(lrs, lrs[1:]))
        assert lrs[-1] < 0.0002
    else:
        peak = max(range(steps), key=lrs.__getitem__)
        assert lrs[peak] == pytest.approx(0.01, rel=0.05)
        assert 0 < peak < steps - 1 and lrs[0] < 0.01 / 10 and lrs[-1] < 0.01 / 10

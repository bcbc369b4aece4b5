import io
import math

import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console

from cnnlab.checkpoint import load_checkpoint
from cnnlab.config import validate
from cnnlab.errors import UserError
from cnnlab.rundir import read_metrics
from cnnlab.trainer import NonfiniteWatch, RunningSums, resolve_device, train, train_step
from tests.helpers import compose_config, read_scalars, write_image_folder

FAKE_DATA = ["dataset=fake", "dataset.train_size=300", "dataset.test_size=50", "dataset.image_size=8"]
SMALL_MLP = ["model.hidden=[32]"]
FAST = ["trainer.batch_size=32", "trainer.eval_batch_size=64", "trainer.device=cpu"]


def run_training(run_dir, *overrides, data=FAKE_DATA, model=SMALL_MLP):
    cfg = compose_config(*data, *model, *FAST, *overrides)
    console = Console(file=io.StringIO(), width=120)
    metrics = train(validate(cfg), run_dir, OmegaConf.to_container(cfg), console=console)
    return metrics, console.file.getvalue()


def test_a_run_writes_metrics_checkpoint_and_tensorboard_scalars(tmp_path):
    metrics, output = run_training(tmp_path, "trainer.epochs=2", "trainer.log_every=3")
    steps_per_epoch = 270 // 32
    assert metrics == read_metrics(tmp_path)
    assert metrics["status"] == "completed" and metrics["epochs"] == 2 and metrics["steps"] == 2 * steps_per_epoch
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "seconds", "images_per_second"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["device"] == "cpu" and metrics["parameters"] == 64 * 32 + 32 + 32 * 10 + 10

    scalars = read_scalars(tmp_path)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc", "lr", "grad_norm/total"):
        assert tag in scalars, tag
    # Every log_every steps, plus the partial window that closes each epoch.
    assert steps_per_epoch == 8
    assert [step for step, _ in scalars["train/loss"]] == [3, 6, 8, 9, 12, 15, 16]
    assert [step for step, _ in scalars["val/acc"]] == [steps_per_epoch, 2 * steps_per_epoch]
    assert scalars["test/acc"] == [(2 * steps_per_epoch, pytest.approx(metrics["test_acc"]))]
    assert scalars["val/acc"][-1][1] == pytest.approx(metrics["val_acc"])

    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert checkpoint["step"] == metrics["steps"] and checkpoint["epoch"] == 2
    assert set(checkpoint) >= {"model", "optimizer", "scheduler", "rng", "config", "metrics"}
    assert set(checkpoint["rng"]) == {"torch", "cuda", "data"} and "generator" in checkpoint["rng"]["data"]
    assert checkpoint["config"]["model"]["name"] == "mlp"
    assert "epoch 2/2" in output and "completed" in output


def test_initial_loss_is_that_of_a_uniform_guess_and_training_lowers_it(tmp_path):
    run_training(tmp_path, "trainer.epochs=3", "trainer.log_every=1", "optimizer.lr=0.01")
    losses = [value for _, value in read_scalars(tmp_path)["train/loss"]]
    assert losses[0] == pytest.approx(math.log(10), abs=0.3)
    assert losses[-1] < 0.5 * losses[0]


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path):
    def final_weights(name, seed):
        run_training(tmp_path / name, "trainer.epochs=1", "trainer.deterministic=true", f"trainer.seed={seed}",
                     "model.dropout=0.2")
        return load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["model"]

    first, again, other = final_weights("a", 1), final_weights("b", 1), final_weights("c", 2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_gradient_clipping_bounds_the_step_and_reports_the_unclipped_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(parameters, lr=1.0)
    before = torch.cat([p.detach().flatten() for p in parameters])
    images, labels = torch.randn(8, 1, 4, 4) * 10, torch.arange(8) % 4
    norm, finite = train_step(model, parameters, optimizer, None, images, labels, 1e-3, RunningSums(torch.device("cpu")))
    assert bool(finite)
    change = (torch.cat([p.detach().flatten() for p in parameters]) - before).norm()
    assert norm.item() > 1e-2  # the norm before clipping
    assert change.item() == pytest.approx(1e-3, rel=1e-3)  # SGD with lr 1 moves by the clipped norm


@pytest.mark.parametrize("schedule", ["none", "step", "cosine", "onecycle"])
def test_learning_rate_schedules_show_in_the_logged_lr(tmp_path, schedule):
    extra = {"step": ["scheduler.step_size=1", "scheduler.gamma=0.5"], "cosine": ["scheduler.min_lr=0.0001"]}
    run_training(tmp_path, f"scheduler={schedule}", "optimizer.lr=0.01", "trainer.epochs=2", "trainer.log_every=1",
                 *extra.get(schedule, []))
    lrs = [value for _, value in read_scalars(tmp_path)["lr"]]
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


def test_image_folder_run_trains_on_the_decoded_pngs(tmp_path):
    root = write_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=8, size=10)
    data = ["dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8"]
    model = ["model=convnet", "model.channels=[4]", "model.fc_hidden=8"]
    metrics, _ = run_training(tmp_path / "run", "trainer.epochs=1", "trainer.batch_size=8", data=data, model=model)
    assert metrics["status"] == "completed" and metrics["steps"] == 2  # 21 training images // 8
    assert metrics["test_acc"] is None  # no test/ folder: no test set
    assert "test/acc" not in read_scalars(tmp_path / "run")


def test_a_streamed_image_folder_trains_and_probes(tmp_path):
    root = write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=12, size=8, mode="L")
    data = ["dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8", "dataset.channels=1",
            "dataset.max_memory_mb=0", "dataset.num_workers=0", "dataset.augment=true"]
    metrics, output = run_training(tmp_path / "run", "trainer.epochs=2", "trainer.batch_size=4", "probes.batch_size=6",
                                   data=data)
    assert metrics["status"] == "completed" and metrics["steps"] == 2 * (22 // 4)
    assert set(metrics["dead_fraction"]) == {"act01_fc", "all"}
    scalars = read_scalars(tmp_path / "run")
    assert [step for step, _ in scalars["dead_fraction/all"]][0] == 0


def test_a_failing_run_records_failed_status_and_the_reason(tmp_path):
    cfg = compose_config(f"dataset.root={tmp_path / 'nothing'}", "dataset.download=false", "trainer.device=cpu")
    with pytest.raises(UserError, match="missing"):
        train(validate(cfg), tmp_path / "run", {}, console=Console(file=io.StringIO()))
    metrics = read_metrics(tmp_path / "run")
    assert metrics["status"] == "failed" and "train-images-idx3-ubyte" in metrics["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_user_error():
    with pytest.raises(UserError, match="trainer.device"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_keeps_data_on_the_gpu_and_steps_never_sync(tmp_path):
    from cnnlab.data import load_data
    from cnnlab.models import build_model

    run = validate(compose_config(*FAKE_DATA, *FAST, "trainer.device=cuda", "dataset.augment=true", "model=convnet",
                                  "model.channels=[8]", "model.batchnorm=true", "trainer.grad_clip=1"))
    device = torch.device("cuda")
    data = load_data(run.dataset, 32, 64, device, seed=0)
    assert data.train.data.images.is_cuda and data.train.data.labels.is_cuda
    model = build_model(run.model, run.activation, data.input_shape, data.num_classes).to(device)
    parameters = list(model.parameters())
    optimizer = torch.optim.Adam(parameters)
    sums = RunningSums(device)
    watch = NonfiniteWatch(device)
    batches = iter(data.train)
    images, labels = next(batches)  # the first step may allocate and warm up
    train_step(model, parameters, optimizer, None, images, labels, 1.0, sums)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, (images, labels) in enumerate(batches, 2):
            _, finite = train_step(model, parameters, optimizer, None, images, labels, 1.0, sums)
            watch.update(step, finite)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    watch.check(now=True)
    loss, acc, _ = sums.take()
    assert math.isfinite(loss) and 0 <= acc <= 1

    metrics, _ = run_training(tmp_path, "trainer.device=cuda", "trainer.epochs=1")
    assert metrics["status"] == "completed" and metrics["device"].startswith("cuda")


def test_a_terminal_gets_a_live_progress_bar(tmp_path):
    cfg = compose_config(*FAKE_DATA, *SMALL_MLP, *FAST, "trainer.epochs=1")
    console = Console(file=io.StringIO(), force_terminal=True, width=150)
    train(validate(cfg), tmp_path, {}, console=console)
    output = console.file.getvalue()
    assert "\x1b[" in output  # drawn with terminal control codes
    assert "epoch 1/1" in output and "img/s" in output and "8/8" in output


def test_bf16_autocast_and_channels_last_train_the_convnet(tmp_path):
    model = ["model=convnet", "model.channels=[4,8]", "model.fc_hidden=16"]
    plain, _ = run_training(tmp_path / "plain", "trainer.epochs=2", "optimizer.lr=0.01", model=model)
    for options in (["trainer.amp=bf16"], ["trainer.channels_last=true"]):
        metrics, _ = run_training(tmp_path / options[0], "trainer.epochs=2", "optimizer.lr=0.01", *options, model=model)
        assert metrics["status"] == "completed" and math.isfinite(metrics["val_loss"])
        assert metrics["val_acc"] == pytest.approx(plain["val_acc"], abs=0.15)


def test_channels_last_hands_the_convnet_nhwc_batches(tmp_path):
    from cnnlab.data import load_data

    run = validate(compose_config(*FAKE_DATA, *FAST, "model=convnet"))
    data = load_data(run.dataset, 32, 64, torch.device("cpu"), seed=0)
    data.train.normalise.channels_last = True
    images, _ = next(iter(data.train))
    assert images.is_contiguous(memory_format=torch.channels_last) and images.dtype == torch.float32


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the message for a machine without CUDA")
    with pytest.raises(UserError, match="trainer.amp=fp16"):
        run_training(tmp_path, "trainer.amp=fp16", "trainer.epochs=1")


def test_compiled_training_still_probes_every_layer(tmp_path, monkeypatch):
    # The eager backend runs TorchDynamo's real tracing without minutes of code generation on a CPU;
    # the benchmark measures the real compiler.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager", **kw))
    metrics, _ = run_training(tmp_path, "trainer.compile=true", "trainer.epochs=1", "probes.every=3")
    assert metrics["status"] == "completed"
    steps = [step for step, _ in read_scalars(tmp_path)["dead_fraction/all"]]
    assert steps == [0, 3, 6, 8]
    assert "model" in load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert not any(key.startswith("_orig_mod") for key in load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"])

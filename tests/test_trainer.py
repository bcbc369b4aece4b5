import math
import re
import time

import pytest
import torch

from cnnlab.train.checkpoint import load_checkpoint
from cnnlab.config import validate
from cnnlab.errors import UserError
from cnnlab.rundir import read_metrics
from cnnlab.status import Status
from cnnlab.train.loop import (Diverged, SilentProgress, TrainingLog, resolve_device, runnable_elsewhere, thread_choice,
                               train_epoch, train_step)
from tests.helpers import TINY, TINY_CONVNET, TINY_DATA, TINY_TRAINER, compose_config, read_scalars, write_image_folder


class RecordingProgress(SilentProgress):
    """What the loop shows: its description, every update() and every epoch's summary, for a bar
    that is (live) or is not drawn."""

    def __init__(self, live: bool = False):
        self.live, self.description, self.updates, self.epochs = live, None, [], []

    def started(self, description: str) -> None:
        self.description = description

    def update(self, loss: float, acc: float, images_per_second: float) -> None:
        self.updates.append((loss, acc, images_per_second))

    def end_epoch(self, epoch: int, step: int, summary: dict) -> None:
        self.epochs.append((epoch, step, summary))


def test_a_run_writes_metrics_checkpoint_and_tensorboard_scalars(tiny_run):
    progress = RecordingProgress()
    run = tiny_run("trainer.epochs=2", "trainer.log_every=3", progress=progress)
    metrics = run.metrics
    steps_per_epoch = 270 // 32
    assert metrics == read_metrics(run.dir)
    assert metrics["status"] == "completed" and metrics["epochs"] == 2 and metrics["steps"] == 2 * steps_per_epoch
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "seconds", "images_per_second"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["device"] == "cpu" and metrics["parameters"] == 64 * 32 + 32 + 32 * 10 + 10

    scalars = read_scalars(run.dir)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc", "lr", "grad_norm/total"):
        assert tag in scalars, tag
    # Every log_every steps, plus the partial window that closes each epoch.
    assert steps_per_epoch == 8
    assert [step for step, _ in scalars["train/loss"]] == [3, 6, 8, 9, 12, 15, 16]
    assert [step for step, _ in scalars["val/acc"]] == [steps_per_epoch, 2 * steps_per_epoch]
    assert scalars["test/acc"] == [(2 * steps_per_epoch, pytest.approx(metrics["test_acc"]))]
    assert scalars["val/acc"][-1][1] == pytest.approx(metrics["val_acc"])

    checkpoint = load_checkpoint(run.dir / "checkpoints" / "last.pt")
    assert checkpoint["step"] == metrics["steps"] and checkpoint["epoch"] == 2
    assert set(checkpoint) >= {"model", "optimizer", "scheduler", "rng", "config", "metrics"}
    assert set(checkpoint["rng"]) == {"torch", "cuda", "data"} and "generator" in checkpoint["rng"]["data"]
    assert checkpoint["config"]["model"]["name"] == "mlp"
    assert run.result.status == Status.COMPLETED and run.result.error is None
    assert progress.description == run.result.description
    assert progress.description.startswith("cnnlab: mlp + relu on fake (") and str(run.dir) in progress.description
    # Each epoch's summary: that epoch's throughput (metrics' images_per_second is the run's average).
    assert [(epoch, step) for epoch, step, _ in progress.epochs] == [(1, 8), (2, 16)]
    assert all(summary["img/s (epoch)"] > 0 for _, _, summary in progress.epochs)


def test_initial_loss_is_that_of_a_uniform_guess_and_training_lowers_it(tiny_run):
    run = tiny_run("trainer.epochs=3", "trainer.log_every=1", "optimizer.lr=0.01")
    losses = [value for _, value in read_scalars(run.dir)["train/loss"]]
    assert losses[0] == pytest.approx(math.log(10), abs=0.3)
    assert losses[-1] < 0.5 * losses[0]


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tiny_run):
    def final_weights(name, seed):
        run = tiny_run("trainer.deterministic=true", f"trainer.seed={seed}", "model.dropout=0.2", name=name)
        return load_checkpoint(run.dir / "checkpoints" / "last.pt")["model"]

    first, again, other = final_weights("a", 1), final_weights("b", 1), final_weights("c", 2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_gradient_clipping_bounds_the_step_and_reports_the_unclipped_norm(tiny_state):
    state = tiny_state("optimizer=sgd", "optimizer.lr=1", "optimizer.momentum=0", "trainer.grad_clip=1e-3")
    before = torch.cat([p.detach().flatten() for p in state.parameters])
    images, labels = next(iter(state.data.train))
    norm, finite = train_step(state, images * 10, labels)
    assert bool(finite)
    change = (torch.cat([p.detach().flatten() for p in state.parameters]) - before).norm()
    assert norm.item() > 1e-2  # the norm before clipping
    assert change.item() == pytest.approx(1e-3, rel=1e-3)  # SGD with lr 1 moves by the clipped norm


def test_image_folder_run_trains_on_the_decoded_pngs(tmp_path, tiny_run):
    root = write_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=8, size=10)
    data = ["dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8"]
    run = tiny_run("trainer.batch_size=8", data=data, model=TINY_CONVNET)
    assert run.metrics["status"] == "completed" and run.metrics["steps"] == 2  # 21 training images // 8
    assert run.metrics["test_acc"] is None  # no test/ folder: no test set
    assert "test/acc" not in read_scalars(run.dir)


def test_a_streamed_image_folder_trains_and_probes(tmp_path, tiny_run):
    root = write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=12, size=8, mode="L")
    data = ["dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8", "dataset.channels=1",
            "dataset.max_memory_mb=0", "dataset.num_workers=0", "dataset.augment=true"]
    run = tiny_run("trainer.epochs=2", "trainer.batch_size=4", "probes.batch_size=6", data=data)
    assert run.metrics["status"] == "completed" and run.metrics["steps"] == 2 * (22 // 4)
    assert set(run.metrics["dead_fraction"]) == {"act01_fc", "all"}
    scalars = read_scalars(run.dir)
    assert [step for step, _ in scalars["dead_fraction/all"]][0] == 0


def test_a_failing_run_records_failed_status_and_the_reason(tmp_path, tiny_run):
    run = tiny_run(data=["dataset=mnist", f"dataset.root={tmp_path / 'nothing'}", "dataset.download=false"])
    assert isinstance(run.result.error, UserError) and "missing" in str(run.result.error)
    assert run.result.status == Status.FAILED and run.result.description == ""  # setup did not finish
    metrics = read_metrics(tmp_path / "run")
    assert metrics["status"] == "failed" and "train-images-idx3-ubyte" in metrics["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_user_error_that_names_the_fix():
    with pytest.raises(UserError) as error:
        resolve_device("cuda:0")
    assert "trainer.device='cuda:0'" in str(error.value) and "trainer.device=cpu" in str(error.value)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_keeps_data_on_the_gpu_and_steps_never_sync(tiny_state, tiny_run):
    state = tiny_state("trainer.device=cuda", "dataset.augment=true", "model.batchnorm=true", "trainer.grad_clip=1",
                       model=TINY_CONVNET)
    assert state.data.train.data.images.is_cuda and state.data.train.data.labels.is_cuda
    batches = iter(state.data.train)
    images, labels = next(batches)  # the first step may allocate and warm up
    train_step(state, images, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, (images, labels) in enumerate(batches, 2):
            _, finite = train_step(state, images, labels)
            state.watch.update(step, finite)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    state.watch.check(now=True)
    loss, acc, _ = state.log.window.take()
    assert math.isfinite(loss) and 0 <= acc <= 1

    metrics = tiny_run("trainer.device=cuda", name="cuda").metrics
    assert metrics["status"] == "completed" and metrics["device"].startswith("cuda")


def test_bf16_autocast_and_channels_last_train_the_convnet(tiny_run):
    model = [*TINY_CONVNET, "model.channels=[4,8]", "model.fc_hidden=16"]
    plain = tiny_run("trainer.epochs=2", "optimizer.lr=0.01", model=model, name="plain").metrics
    for options in (["trainer.amp=bf16"], ["trainer.channels_last=true"]):
        metrics = tiny_run("trainer.epochs=2", "optimizer.lr=0.01", *options, model=model, name=options[0]).metrics
        assert metrics["status"] == "completed" and math.isfinite(metrics["val_loss"])
        assert metrics["val_acc"] == pytest.approx(plain["val_acc"], abs=0.15)


def test_channels_last_hands_the_convnet_nhwc_batches(tmp_path):
    from cnnlab.train.data import load_data

    run = validate(compose_config(*TINY_DATA, *TINY_CONVNET, *TINY_TRAINER))
    data = load_data(run.dataset, 32, 64, torch.device("cpu"), seed=0)
    data.train.normalise.channels_last = True
    images, _ = next(iter(data.train))
    assert images.is_contiguous(memory_format=torch.channels_last) and images.dtype == torch.float32


def test_fp16_needs_cuda(tiny_run):
    if torch.cuda.is_available():
        pytest.skip("checks the message for a machine without CUDA")
    error = tiny_run("trainer.amp=fp16").result.error
    assert isinstance(error, UserError) and "trainer.amp=fp16" in str(error)


def test_compiled_training_still_probes_every_layer(tiny_run, monkeypatch):
    # The eager backend runs TorchDynamo's real tracing without minutes of code generation on a CPU;
    # the benchmark measures the real compiler.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager", **kw))
    run = tiny_run("trainer.compile=true", "probes.every=3")
    assert run.metrics["status"] == "completed"
    steps = [step for step, _ in read_scalars(run.dir)["dead_on_batch/all"]]
    assert steps == [0, 3, 6, 8]
    assert "model" in load_checkpoint(run.dir / "checkpoints" / "last.pt")
    assert not any(key.startswith("_orig_mod") for key in load_checkpoint(run.dir / "checkpoints" / "last.pt")["model"])


def test_weights_that_became_non_finite_stop_the_run_even_when_the_loss_was_finite(tiny_state):
    state = tiny_state()
    state.watch.check_weights(state.parameters, step=4)  # finite: nothing happens
    with torch.no_grad():
        state.parameters[0][0, 0] = float("inf")
    with pytest.raises(Diverged, match="the weights became non-finite .* at step 4"):
        state.watch.check_weights(state.parameters, step=4)


def test_a_live_bar_shows_the_epoch_so_far_at_every_step_of_a_short_epoch_without_logging_more(tiny_state):
    # 8 steps per epoch and log_every=50: no log inside the epoch, yet a live bar reads the running
    # totals every ceil(8/20) = 1 step. They equal the running mean of the loss logged at every step.
    shown, logged = RecordingProgress(live=True), RecordingProgress(live=False)
    live = tiny_state("trainer.log_every=50", name="live")
    every_step = tiny_state("trainer.log_every=1", name="every_step")
    train_epoch(live, shown)
    train_epoch(every_step, logged)
    assert len(shown.updates) == len(logged.updates) == 8
    for (loss, acc, speed), (loss_1, acc_1, _) in zip(shown.updates, logged.updates):
        assert math.isfinite(loss) and 0 <= acc <= 1 and speed > 0
        assert (loss, acc) == (pytest.approx(loss_1, rel=1e-5), pytest.approx(acc_1, rel=1e-5))
    live.log.writer.close()
    every_step.log.writer.close()
    per_step = [value for _, value in read_scalars(every_step.run_dir)["train/loss"]]
    assert [loss for loss, _, _ in logged.updates] == pytest.approx(
        [sum(per_step[:k]) / k for k in range(1, 9)], rel=1e-5)
    assert [step for step, _ in read_scalars(live.run_dir)["train/loss"]] == [8]  # only the epoch's last window


def test_without_a_live_bar_nothing_is_read_between_logs(tiny_state):
    progress = RecordingProgress(live=False)
    train_epoch(tiny_state("trainer.log_every=50"), progress)
    assert len(progress.updates) == 1  # the epoch's last window, flushed at its end


def test_epoch_throughput_counts_only_that_epochs_images_and_training_time():
    class Writer:
        def add_scalar(self, tag, value, step):
            pass

    clock = [0.0]
    log = TrainingLog(torch.device("cpu"), Writer(), clock=lambda: clock[0])  # epoch 1 starts at t=0
    labels = torch.zeros(100, dtype=torch.long)
    log.window.add(torch.tensor(1.0), torch.zeros(100, 10), labels)
    clock[0] = 10.0  # 100 images in 10 s
    log.flush(step=1, lr=0.1, grad_norm=torch.tensor(1.0), parameters=[])
    clock[0] = 15.0  # 5 s of evaluation: not training time
    log.start_epoch()
    log.window.add(torch.tensor(1.0), torch.zeros(100, 10), labels)
    clock[0] = 16.0  # 100 images in 1 s
    assert log.running()[2] == pytest.approx(100)  # also read before the window is flushed
    log.flush(step=2, lr=0.1, grad_norm=torch.tensor(1.0), parameters=[])
    assert log.running()[2] == pytest.approx(100)
    assert log.images / log.seconds == pytest.approx(200 / 11)  # metrics' images_per_second: the run's average


def test_the_first_throughput_after_a_resume_divides_the_carried_window_by_its_own_time_too():
    class Writer:
        def __init__(self):
            self.speeds = []

        def add_scalar(self, tag, value, step):
            if tag == "perf/images_per_second":
                self.speeds.append(value)

    clock, labels = [0.0], torch.zeros(100, dtype=torch.long)
    before = TrainingLog(torch.device("cpu"), Writer(), clock=lambda: clock[0])
    before.window.add(torch.tensor(1.0), torch.zeros(100, 10), labels)
    clock[0] = 49.0  # 100 images in 49 s, not yet flushed: the checkpoint keeps them in its window
    saved = before.state_dict()

    clock[0] = 1000.0  # resumed much later
    after = TrainingLog(torch.device("cpu"), Writer(), clock=lambda: clock[0])
    after.load_state_dict(saved)
    after.start_epoch(keep_totals=True)  # as train_epoch does, mid-epoch
    after.window.add(torch.tensor(1.0), torch.zeros(100, 10), labels)
    clock[0] = 1001.0  # 100 more images in 1 s
    after.flush(step=2, lr=0.1, grad_norm=torch.tensor(1.0), parameters=[])
    assert after.writer.speeds == [pytest.approx(200 / 50)]  # not 200 images in 1 s
    assert after.images / after.seconds == pytest.approx(200 / 50)


def test_piped_output_never_wraps_a_name_and_draws_no_screen_wide_box(run_cli, tmp_path):
    name = "a_run_directory_named_longer_than_any_terminal_is_wide_" * 3
    # An lr too small to learn, judged with a loose tolerance: a not_learning warning, in a panel.
    code, out, err = run_cli("train", *TINY, "optimizer.lr=1e-6", "findings.not_learning=0.5", f"hydra.run.dir={name}")
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.startswith("│ run directory") and str(tmp_path / name) in line for line in lines)
    assert any("not_learning (step 8): At step 8, after the first epoch, the training loss" in line for line in lines)
    assert max(len(line) for line in lines if line[:1] in "╭│╰┏┃┡└") < 2 * len(str(tmp_path / name))  # fitted


def test_more_threads_than_cores_are_capped_with_a_note(tiny_state, caplog):
    import logging
    import os

    import torch

    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING, logger="cnnlab.train.loop"):
            state = tiny_state("trainer.threads=5000")
        assert torch.get_num_threads() == cores == state.metrics["threads"]
        assert f"trainer.threads=5000 is more than the {cores} cores this process may use: using {cores}" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_a_run_into_a_folder_with_another_tools_files_changes_nothing_there(tiny_run, tmp_path):
    theirs = tmp_path / "run"
    theirs.mkdir()
    (theirs / "metrics.json").write_text('{"loss": 0.1}')  # a name cnnlab uses, in a folder cnnlab never held
    run = tiny_run()
    assert run.result.status.value == "failed" and "holds files cnnlab did not make" in str(run.result.error)
    assert sorted(p.name for p in theirs.iterdir()) == ["metrics.json"]
    assert (theirs / "metrics.json").read_text() == '{"loss": 0.1}'


def test_default_threads_on_an_idle_machine_are_all_usable_cores():
    assert thread_choice(None, cores=2, busy_elsewhere=0, torch_default=2) == (
        2, "2 of 2 cores (0 threads of other processes running)")
    assert thread_choice(None, cores=16, busy_elsewhere=0, torch_default=8)[0] == 8  # torch's own: physical cores


def test_default_threads_beside_one_busy_process_on_two_cores_is_one():
    assert thread_choice(None, cores=2, busy_elsewhere=1, torch_default=2) == (
        1, "1 of 2 cores (1 thread of other processes running)")
    assert thread_choice(None, cores=16, busy_elsewhere=1, torch_default=8)[0] == 8  # a spare core takes it


def test_default_threads_never_fall_below_one():
    assert thread_choice(None, cores=2, busy_elsewhere=7, torch_default=2)[0] == 1
    assert thread_choice(None, cores=1, busy_elsewhere=0, torch_default=4)[0] == 1


def test_default_threads_without_proc_are_torchs_default():
    assert thread_choice(None, cores=4, busy_elsewhere=None, torch_default=4)[0] == 4


def test_explicit_threads_are_kept_whatever_the_load():
    assert thread_choice(2, cores=2, busy_elsewhere=1, torch_default=2) == (2, "2 of 2 cores (set)")
    assert thread_choice(1, cores=2, busy_elsewhere=0, torch_default=2)[0] == 1


def busy_process():
    """A process that keeps one core busy until killed (no torch: it starts at once)."""
    import subprocess
    import sys

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # running by now
    return spinner


def test_other_processes_running_threads_are_counted_without_this_ones():
    spinner = busy_process()
    try:
        assert runnable_elsewhere() >= 1  # the spinner; this process's own threads are not counted
    finally:
        spinner.kill()
        spinner.wait()


def test_a_resume_keeps_its_runs_thread_count_and_deterministic_runs_torchs_default_whatever_the_load():
    from cnnlab.train.loop import TORCH_DEFAULT_THREADS, choose_threads, cores_available

    assert choose_threads(None, resumed_with=1) == (1, f"1 of {cores_available()} cores (as the run had before its resume)")
    spinner = busy_process()
    try:
        threads, why = choose_threads(None, deterministic=True)
    finally:
        spinner.kill()
        spinner.wait()
    assert threads == min(TORCH_DEFAULT_THREADS, cores_available()) and "trainer.deterministic" in why


def test_setup_says_and_records_the_threads_it_chose_beside_a_busy_process(tiny_state, monkeypatch):
    import os

    from cnnlab.train.loop import describe

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # two cores, one of them kept busy
    before, spinner = torch.get_num_threads(), busy_process()
    try:
        state = tiny_state()
        assert torch.get_num_threads() == 1 == state.metrics["threads"]
        assert re.search(r"^1 of 2 cores \(\d+ threads? of other processes running\)$", state.threads_chosen)
        assert f"cpu with {state.threads_chosen}, run directory" in describe(state, resumed=False)  # the run's first line
    finally:
        spinner.kill()
        spinner.wait()
        torch.set_num_threads(before)

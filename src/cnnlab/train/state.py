"""What a run is made of while it trains: one TrainState (model, optimizer, data, probes, counters)
and its parts: the precision a step runs in, the running sums of a logging window, the watch for
non-finite values, and the log that writes TensorBoard's scalars; plus the builders setup() uses.
loop.py builds a TrainState and advances it; checkpoint.py saves and restores one.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.tensorboard import SummaryWriter

from cnnlab.analysis.findings import Series
from cnnlab.config import RunConfig
from cnnlab.errors import UserError, one_line
from cnnlab.instruments.probes import Measurement, Probes, gradient_norm
from cnnlab.instruments.sharpness import Preconditioner, adam_limit, sgd_limit
from cnnlab.statistics import split_tag
from cnnlab.status import Status
from cnnlab.train.data import Batches, Data
from cnnlab.train.tblog import write_probe


@dataclass
class TrainState:
    """Everything a run is made of, built by `setup`; the loop functions read and advance it."""

    run: RunConfig
    config: dict[str, Any]  # as_dict(run), made once by setup: what checkpoints keep to check a resume against
    run_dir: Path
    device: torch.device
    model: nn.Module  # the eager module: probes and checkpoints look at it
    step_model: nn.Module  # what steps and evaluation run: `model`, or `model` compiled (same parameters)
    parameters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None
    data: Data
    probes: Probes | None
    precision: Precision
    log: TrainingLog
    watch: NonfiniteWatch
    metrics: dict[str, Any]  # what metrics.json says about the run
    epoch: int = 1  # the epoch in progress
    step: int = 0  # optimizer steps taken
    batch: int = 0  # batches of this epoch done
    started: float = field(default_factory=time.perf_counter)  # the run's clock, for metrics' seconds
    threads_chosen: str = ""  # the CPU threads and why (loop.choose_threads), for the run's first line

    @property
    def epochs_done(self) -> int:
        return self.epoch - (self.batch < len(self.data.train))


def new_metrics() -> dict[str, Any]:
    return {
        "status": Status.RUNNING.value, "epochs": 0, "steps": 0,
        "train_loss": None, "train_acc": None, "val_loss": None, "val_acc": None,
        "test_loss": None, "test_acc": None, "best_val_acc": None, "best_epoch": None,
        "seconds": 0.0, "images_per_second": None,
        "device": None, "threads": None, "parameters": None, "dead_fraction": None, "skipped_steps": 0,
    }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"trainer.device={name!r} asks for CUDA, but no CUDA device is available here. "
                f"Use trainer.device=cpu, or auto to take a GPU only when there is one."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"trainer.device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}."
            )
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; harmless on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)  # the CPU and every CUDA device
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def fitting_in_memory(build):
    """build(), with running out of memory told as what it is: a setting too large for this machine."""
    try:
        return build()
    except (RuntimeError, MemoryError) as error:
        if not isinstance(error, (MemoryError, torch.OutOfMemoryError)) and "alloc" not in str(error).lower():
            raise
        raise UserError(f"The model does not fit in memory ({one_line(error, 200)}). Make it smaller: "
                        f"model.hidden, or model.channels and model.fc_hidden.") from None


def sgd_stability_limit(optimizer: torch.optim.Optimizer) -> Callable[[], float] | None:
    """For SGD, the sharpness above which it cannot be stable at the current learning rate and
    momentum (read when called: schedules change both): 2/lr, 2(1 + beta)/lr heavy ball,
    (2 + 2 beta)/((1 + 2 beta) lr) Nesterov (instruments.sharpness.sgd_limit). Adaptive optimizers
    have theirs on the preconditioned sharpness (adaptive_preconditioner)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    group = optimizer.param_groups[0]
    return lambda: sgd_limit(group["lr"], group["momentum"], group["nesterov"], group["dampening"],
                             group["weight_decay"])


def adaptive_preconditioner(optimizer: torch.optim.Optimizer) -> Preconditioner | None:
    """Adam, AdamW and RMSprop: their diagonal preconditioner P (the update is P^-1 times a momentum
    of the gradient) and the limit of the preconditioned sharpness (Cohen et al. 2022). Adam:
    P = (1 - beta1^t)(sqrt(v / (1 - beta2^t)) + eps), limit (2 + 2 beta1)/((1 - beta1) lr); RMSprop:
    P = sqrt(v) + eps (v less the squared mean gradient when centered), limit 2(1 + momentum)/lr.
    AdamW's decoupled decay is left out: it shifts the limit by about lr x weight_decay."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is one
        decoupled = isinstance(optimizer, torch.optim.AdamW)
        return Preconditioner(lambda p: _adam_diagonal(optimizer, p), lambda: adam_limit(group["lr"], group["betas"][0]),
                              lambda: 0.0 if decoupled else group["weight_decay"])
    if isinstance(optimizer, torch.optim.RMSprop):
        return Preconditioner(lambda p: _rmsprop_diagonal(optimizer, p), lambda: sgd_limit(group["lr"], group["momentum"]),
                              lambda: group["weight_decay"])
    return None


def _group_of(optimizer: torch.optim.Optimizer, parameter: Tensor) -> dict[str, Any]:
    return next(group for group in optimizer.param_groups if any(p is parameter for p in group["params"]))


def _adam_diagonal(optimizer: torch.optim.Optimizer, parameter: Tensor) -> Tensor | None:
    state, group = optimizer.state.get(parameter), _group_of(optimizer, parameter)
    if not state:
        return None
    beta1, beta2 = group["betas"]
    t = float(state["step"])
    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
    return (1 - beta1 ** t) * ((v / (1 - beta2 ** t)).sqrt() + group["eps"])


def _rmsprop_diagonal(optimizer: torch.optim.Optimizer, parameter: Tensor) -> Tensor | None:
    state, group = optimizer.state.get(parameter), _group_of(optimizer, parameter)
    if not state:
        return None
    v = state["square_avg"] - state["grad_avg"].square() if group["centered"] else state["square_avg"]
    return v.sqrt() + group["eps"]


class Precision:
    """trainer.amp: autocast to bf16 or fp16; fp16 also needs a gradient scaler against underflow."""

    def __init__(self, amp: str, device: torch.device):
        if amp == "fp16" and device.type != "cuda":
            raise UserError(f"trainer.amp=fp16 needs a CUDA device (this run is on {device}); use trainer.amp=bf16 "
                            f"or none.")
        self.device_type = device.type
        self.dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()  # entering a disabled autocast costs a few µs every step
        return torch.autocast(self.device_type, dtype=self.dtype)


FLOAT32 = Precision("none", torch.device("cpu"))


class RunningSums:
    """Loss and correct predictions summed on the device, so a step never waits for the host."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0

    def add(self, loss: Tensor, logits: Tensor, labels: Tensor) -> None:
        self.loss.add_(loss.detach(), alpha=len(labels))
        self.correct.add_((logits.detach().argmax(dim=1) == labels).sum())
        self.count += len(labels)

    def take(self, *extra: Tensor) -> tuple[float, float, list[float]]:
        """(mean loss, accuracy, extra values), in one transfer to the host; then start afresh."""
        values = torch.stack([self.loss, self.correct.to(self.loss.dtype), *extra]).tolist()
        count = self.count
        self.loss.zero_()
        self.correct.zero_()
        self.count = 0
        return values[0] / count, values[1] / count, values[2:]

    def peek(self) -> tuple[float, float]:
        """(summed loss, correct predictions) so far, in one transfer to the host; they keep adding up."""
        loss, correct = torch.stack([self.loss, self.correct.to(self.loss.dtype)]).tolist()
        return loss, correct


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, precision: Precision = FLOAT32) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    loss_sum: Tensor | float = 0.0
    correct: Tensor | int = 0
    count = 0
    for images, labels in batches:
        with precision.autocast():
            logits = model(images).float()
        loss_sum = loss_sum + F.cross_entropy(logits, labels, reduction="sum")
        correct = correct + (logits.argmax(dim=1) == labels).sum()
        count += len(labels)
    model.train(was_training)
    loss_sum, correct = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
    return loss_sum / count, correct / count


class Diverged(Exception):
    """A non-finite loss, gradient, weight or validation loss ended the run (loop.py re-exports it)."""

    def __init__(self, step: int, what: str = "the loss or the gradients"):
        super().__init__(f"{what} became non-finite (NaN or inf) at step {step}")
        self.step = step


class NonfiniteWatch:
    """Stops the run at the first step whose loss or gradient norm is not finite. On the CPU each
    step is checked at once (reading a CPU tensor costs nothing); on a GPU the first bad step is
    kept on the device and read only when the loop talks to the host anyway."""

    def __init__(self, device: torch.device):
        self.every_step = device.type == "cpu"
        self.first = torch.full((), -1, dtype=torch.int64, device=device)

    def update(self, step: int, finite: Tensor) -> None:
        if self.every_step:
            if not finite:
                raise Diverged(step)
        else:
            self.first = torch.where((self.first < 0) & ~finite, step, self.first)

    def check(self, now: bool) -> None:
        if now and not self.every_step:
            first = int(self.first)
            if first >= 0:
                raise Diverged(first)

    @staticmethod
    def check_weights(parameters: list[nn.Parameter], step: int) -> None:
        """Before a checkpoint or an evaluation: the last update can make the weights non-finite
        with a finite loss (a huge learning rate), and no later step would notice."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in parameters]).all()):
            raise Diverged(step, "the weights")


class TrainingLog:
    """TensorBoard scalars every trainer.log_every steps, and probes every probes.every steps: one
    transfer to the host each time. Throughput is timed between transfers, when the device has
    really finished the work."""

    def __init__(self, device: torch.device, writer: SummaryWriter | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.writer = writer  # opened by setup once the run is known to start or resume
        self.clock = clock  # seconds, for throughput
        self.window = RunningSums(device)
        self.seconds, self.images = 0.0, 0  # training time and images over the whole run
        self.dead_fraction: dict[str, float] = {}  # of the latest probe
        self.skipped = 0  # steps not applied for a non-finite loss (trainer.on_nonfinite=skip)
        self.carried_seconds = 0.0  # a resumed run's time on the steps since its last flush, before the checkpoint
        self.series: Series = {}  # every scalar logged so far, for the findings
        self.start_epoch()

    def start_epoch(self, keep_totals: bool = False) -> None:
        if not keep_totals:
            self.epoch_loss, self.epoch_correct, self.epoch_images = 0.0, 0.0, 0
            self.epoch_seconds = 0.0  # this epoch's training time, for its own images/s
        # Evaluation between epochs is not training time. A resume carries in the time its window's
        # steps took before the checkpoint: the next images/s divides those images by their time too.
        self.timer, self.carried_seconds = self.clock() - self.carried_seconds, 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": [self.epoch_loss, self.epoch_correct, self.epoch_images], "seconds": self.seconds,
                "images": self.images, "epoch_seconds": self.epoch_seconds,
                "dead_fraction": dict(self.dead_fraction), "skipped": self.skipped,
                "series": {tag: list(points) for tag, points in self.series.items()},
                # the steps since the last log: a resumed run logs exactly what an uninterrupted one would
                "window": [self.window.loss.clone(), self.window.correct.clone(), self.window.count],
                "window_seconds": self.clock() - self.timer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch_loss, self.epoch_correct, self.epoch_images = state["epoch"]
        self.seconds, self.images = state["seconds"], state["images"]
        # a checkpoint older than epoch_seconds: its epoch so far at the run's average speed
        self.epoch_seconds = state.get("epoch_seconds", self.epoch_images * self.seconds / max(self.images, 1))
        self.dead_fraction = dict(state["dead_fraction"])
        self.skipped = state["skipped"]
        self.series = {tag: [tuple(point) for point in points] for tag, points in state.get("series", {}).items()}
        loss, correct, self.window.count = state["window"]
        # a checkpoint from before window_seconds: the window's steps at the run's average speed
        self.carried_seconds = state.get("window_seconds", self.window.count * self.seconds / max(self.images, 1))
        self.window.loss.copy_(loss)
        self.window.correct.copy_(correct)

    def flush(self, step: int, lr: float, grad_norm: Tensor | None, parameters: list[nn.Parameter]) -> None:
        """Write the scalars of the steps since the last flush, and add them to the epoch's totals."""
        images = self.window.count
        loss, acc, (norm,) = self.window.take(grad_norm if grad_norm is not None else gradient_norm(parameters))
        now = self.clock()
        speed = images / max(now - self.timer, 1e-9)
        self.seconds += now - self.timer
        self.epoch_seconds += now - self.timer
        self.images += images
        self.timer = now
        self.epoch_loss += loss * images
        self.epoch_correct += acc * images
        self.epoch_images += images
        for tag, value in (("train/loss", loss), ("train/acc", acc), ("grad_norm/total", norm), ("lr", lr),
                           ("perf/images_per_second", speed)):
            self.writer.add_scalar(tag, value, step)
            self.series.setdefault(tag, []).append((step, value))

    def running(self) -> tuple[float, float, float] | None:
        """The epoch so far, steps since the last flush included: (mean loss, accuracy, images/s);
        one small transfer when there are such steps, none right after a flush. Writes nothing."""
        loss, correct, images, seconds = self.epoch_loss, self.epoch_correct, self.epoch_images, self.epoch_seconds
        if self.window.count:
            window_loss, window_correct = self.window.peek()
            loss, correct, images = loss + window_loss, correct + window_correct, images + self.window.count
            seconds += self.clock() - self.timer  # read after the transfer: the device has finished
        if not images:  # every step so far skipped (trainer.on_nonfinite=skip)
            return None
        return loss / images, correct / images, images / max(seconds, 1e-9)

    def probe(self, step: int, probes: Probes) -> None:
        self.record(step, probes.measure(step))

    def record(self, step: int, measurements: list[Measurement]) -> None:
        """Write measurements (a probe's, or Probes.on_data's) and keep their scalars for the findings."""
        scalars = write_probe(self.writer, step, measurements)
        for tag, value in scalars.items():
            self.series.setdefault(tag, []).append((step, value))
        split = [(split_tag(tag), value) for tag, value in scalars.items()]
        dead = {layer: value for (prefix, layer), value in split if prefix == "dead_fraction"}
        if dead:  # only on_data measures it
            self.dead_fraction = dead

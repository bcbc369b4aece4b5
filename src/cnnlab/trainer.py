"""The training loop: from a validated config to a finished run directory."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.tensorboard import SummaryWriter

from cnnlab.checkpoint import save_checkpoint
from cnnlab.config import RunConfig, TrainerConfig
from cnnlab.data import Batches, load_data
from cnnlab.errors import UserError
from cnnlab.models import build_model
from cnnlab.optim import build_optimizer, build_scheduler
from cnnlab.probes import Probes
from cnnlab.progress import TrainingProgress, summary_table
from cnnlab.rundir import CHECKPOINT_DIR, LAST_CHECKPOINT, write_metrics
from cnnlab.tblog import write_hparams_end, write_hparams_start, write_layout, write_probe


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


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    loss_sum: Tensor | float = 0.0
    correct: Tensor | int = 0
    count = 0
    for images, labels in batches:
        logits = model(images)
        loss_sum = loss_sum + F.cross_entropy(logits, labels, reduction="sum")
        correct = correct + (logits.argmax(dim=1) == labels).sum()
        count += len(labels)
    model.train(was_training)
    loss_sum, correct = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
    return loss_sum / count, correct / count


def total_grad_norm(parameters: list[nn.Parameter]) -> Tensor:
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def train_step(model: nn.Module, parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer,
               scheduler: LRScheduler | None, images: Tensor, labels: Tensor, grad_clip: float | None,
               sums: RunningSums, probes: Probes | None = None) -> Tensor | None:
    """One optimizer step, with no host synchronisation. Returns the gradient norm before clipping
    when clipping (clip_grad_norm_ computes it anyway), else None. With `probes`, records the
    gradients before clipping and the weights around the update."""
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)  # free the gradients' memory before the next backward
    loss.backward()
    if probes is not None:
        probes.before_update()
    grad_norm = nn.utils.clip_grad_norm_(parameters, grad_clip) if grad_clip else None
    optimizer.step()
    if probes is not None:
        probes.after_update()
    if scheduler is not None:
        scheduler.step()
    sums.add(loss, logits, labels)
    return grad_norm


class TrainingLog:
    """TensorBoard scalars every trainer.log_every steps, and probes every probes.every steps: one
    transfer to the host each time. Throughput is timed between transfers, when the device has
    really finished the work."""

    def __init__(self, writer: SummaryWriter, device: torch.device):
        self.writer = writer
        self.window = RunningSums(device)
        self.seconds, self.images = 0.0, 0  # training time and images over the whole run
        self.dead_fraction: dict[str, float] = {}  # of the latest probe
        self.start_epoch()

    def start_epoch(self) -> None:
        self.epoch_loss, self.epoch_correct, self.epoch_images = 0.0, 0.0, 0
        self.timer = time.perf_counter()  # evaluation between epochs is not training time

    def flush(self, step: int, lr: float, grad_norm: Tensor | None, parameters: list[nn.Parameter]) -> tuple[float, float, float]:
        """Write the scalars of the steps since the last flush; returns (loss, accuracy, images/s)."""
        images = self.window.count
        loss, acc, (norm,) = self.window.take(grad_norm if grad_norm is not None else total_grad_norm(parameters))
        now = time.perf_counter()
        speed = images / max(now - self.timer, 1e-9)
        self.seconds += now - self.timer
        self.images += images
        self.timer = now
        self.epoch_loss += loss * images
        self.epoch_correct += acc * images
        self.epoch_images += images
        for tag, value in (("train/loss", loss), ("train/acc", acc), ("grad_norm/total", norm), ("lr", lr),
                           ("perf/images_per_second", speed)):
            self.writer.add_scalar(tag, value, step)
        return loss, acc, speed

    def probe(self, step: int, probes: Probes) -> None:
        self.dead_fraction = write_probe(self.writer, step, probes.measure())


def train_epoch(model: nn.Module, parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                scheduler: LRScheduler | None, batches: Batches, cfg: TrainerConfig, log: TrainingLog,
                probes: Probes | None, progress: TrainingProgress, step: int, last_step: int) -> int:
    """One pass over the training batches: step, log, probe. Returns the step count after it.
    Probes run every probes.every steps and at last_step, so a run always ends with one."""
    log.start_epoch()
    model.train()
    lr, grad_norm = optimizer.param_groups[0]["lr"], None
    for images, labels in batches:
        probe_due = probes is not None and (probes.due(step + 1) or step + 1 == last_step)
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = train_step(model, parameters, optimizer, scheduler, images, labels, cfg.grad_clip, log.window,
                               probes if probe_due else None)
        step += 1
        if probe_due:
            log.probe(step, probes)
        progress.advance()
        if step % cfg.log_every == 0:
            progress.update(*log.flush(step, lr, grad_norm, parameters))
    if log.window.count:  # the rest of the epoch: its last partial window
        progress.update(*log.flush(step, lr, grad_norm, parameters))
    return step


def train(run: RunConfig, run_dir: Path, config: dict[str, Any], console: Console | None = None) -> dict[str, Any]:
    """Train, validate every epoch, test once at the end; everything lands in run_dir."""
    console = console or Console()
    started = time.perf_counter()
    run_dir = Path(run_dir)
    t = run.trainer
    metrics: dict[str, Any] = {
        "status": "running", "epochs": 0, "steps": 0,
        "train_loss": None, "train_acc": None, "val_loss": None, "val_acc": None,
        "test_loss": None, "test_acc": None, "seconds": 0.0, "images_per_second": None,
        "device": None, "threads": None, "parameters": None, "dead_fraction": None,
    }
    write_metrics(run_dir, metrics)
    writer = None
    try:
        device = resolve_device(t.device)
        metrics["device"] = str(device)
        seed_everything(t.seed, t.deterministic)
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        metrics["threads"] = torch.get_num_threads()
        data = load_data(run.dataset, t.batch_size, t.eval_batch_size, device, t.seed)
        model = build_model(run.model, run.activation, data.input_shape, data.num_classes).to(device)
        parameters = list(model.parameters())
        metrics["parameters"] = sum(p.numel() for p in parameters)
        optimizer = build_optimizer(run.optimizer, parameters)
        scheduler = build_scheduler(run.scheduler, optimizer, len(data.train), t.epochs)
        probes = None
        if run.probes.enabled:
            # The split seed, not the trainer seed: runs that differ by seed probe the same images.
            probe_images = data.train.sample(run.probes.batch_size, seed=run.dataset.split_seed)
            probes = Probes(model, probe_images, run.probes)
        writer = SummaryWriter(str(run_dir), flush_secs=10)
        write_layout(writer)
        write_hparams_start(writer, run)
        sizes = " / ".join(f"{count:,} {name}" for name, count in data.sizes.items() if count)
        console.print(
            f"cnnlab: {run.model.name} + {run.activation.name} on {run.dataset.name} ({sizes}), "
            f"{metrics['parameters']:,} parameters, {device}, run directory {run_dir}",
            highlight=False, markup=False, soft_wrap=True,
        )

        step = 0
        log = TrainingLog(writer, device)
        if probes is not None:
            log.probe(step, probes)  # before any update
        with TrainingProgress(t.epochs, console) as progress:
            for epoch in range(1, t.epochs + 1):
                progress.start_epoch(epoch, len(data.train))
                step = train_epoch(model, parameters, optimizer, scheduler, data.train, t, log, probes, progress, step,
                                   last_step=t.epochs * len(data.train))
                val_loss, val_acc = evaluate(model, data.val)
                writer.add_scalar("val/loss", val_loss, step)
                writer.add_scalar("val/acc", val_acc, step)
                writer.add_scalar("epoch", epoch, step)
                metrics.update(
                    epochs=epoch, steps=step, train_loss=log.epoch_loss / log.epoch_images,
                    train_acc=log.epoch_correct / log.epoch_images, val_loss=val_loss, val_acc=val_acc,
                    images_per_second=log.images / max(log.seconds, 1e-9),
                    seconds=round(time.perf_counter() - started, 3), dead_fraction=log.dead_fraction or None,
                )
                save_checkpoint(run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT, {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "epoch": epoch,
                    "step": step,
                    "rng": {
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        "data": data.train.state_dict(),
                    },
                    "metrics": dict(metrics),
                    "config": config,
                })
                write_metrics(run_dir, metrics)
                writer.flush()
                progress.end_epoch(epoch, step, {
                    "train_loss": metrics["train_loss"], "train_acc": metrics["train_acc"],
                    "val_loss": val_loss, "val_acc": val_acc, "img/s": round(metrics["images_per_second"]),
                })

        if data.test is not None:
            test_loss, test_acc = evaluate(model, data.test)
            writer.add_scalar("test/loss", test_loss, step)
            writer.add_scalar("test/acc", test_acc, step)
            metrics.update(test_loss=test_loss, test_acc=test_acc)
        metrics["status"] = "completed"
    except BaseException as error:
        metrics["status"] = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        metrics["error"] = " ".join(str(error).split()) or type(error).__name__
        raise
    finally:
        metrics["seconds"] = round(time.perf_counter() - started, 3)
        write_metrics(run_dir, metrics)
        if writer is not None:
            write_hparams_end(writer, metrics["status"])
            writer.close()
    console.print(summary_table(metrics, str(run_dir)))
    return metrics

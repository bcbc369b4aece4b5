"""The training loop: from a validated config to a finished run directory."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.tensorboard import SummaryWriter

from cnnlab.checkpoint import load_checkpoint, save_checkpoint
from cnnlab.config import RunConfig, TrainerConfig
from cnnlab.data import Batches, load_data
from cnnlab.errors import UserError
from cnnlab.models import build_model
from cnnlab.optim import build_optimizer, build_scheduler
from cnnlab.probes import Probes, gradient_norm
from cnnlab.progress import TrainingProgress, summary_table
from cnnlab.rundir import BEST_CHECKPOINT, CHECKPOINT_DIR, LAST_CHECKPOINT, write_metrics
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


def train_step(model: nn.Module, parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer,
               scheduler: LRScheduler | None, images: Tensor, labels: Tensor, grad_clip: float | None,
               sums: RunningSums, probes: Probes | None = None,
               skip_nonfinite: bool = False, precision: Precision = FLOAT32) -> tuple[Tensor | None, Tensor]:
    """One optimizer step, with no host synchronisation unless skip_nonfinite.

    Returns (gradient norm before clipping, or None when it was not computed; finite), where
    `finite` is a device bool: the loss, and the gradient norm when computed, are finite. With
    skip_nonfinite a step whose loss or gradients are not finite is not applied, which needs one
    host sync per step. With `probes`, records the gradients before clipping and the weights around
    the update."""
    with precision.autocast():
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)  # free the gradients' memory before the next backward
    scaler = precision.scaler
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # true gradients for clipping and probes
    if probes is not None:
        probes.before_update()
    if grad_clip:
        grad_norm = nn.utils.clip_grad_norm_(parameters, grad_clip)
    else:
        grad_norm = gradient_norm(parameters) if skip_nonfinite else None
    finite = torch.isfinite(loss) if grad_norm is None else torch.isfinite(loss) & torch.isfinite(grad_norm)
    if skip_nonfinite and not finite:
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
    else:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)  # skips the step itself when the scaled gradients overflowed
            scaler.update()
        sums.add(loss, logits, labels)
    if probes is not None:
        probes.after_update()
    if scheduler is not None:
        scheduler.step()  # the schedule follows the steps, taken or skipped
    return grad_norm, finite


class Diverged(Exception):
    def __init__(self, step: int):
        super().__init__(f"the loss or the gradients became non-finite (NaN or inf) at step {step}")
        self.step = step


class Interrupted(Exception):
    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step = signum, step


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


class StopRequest:
    """SIGINT and SIGTERM ask the loop to stop after the current step, with a checkpoint. A second
    SIGINT stops at once. Handlers a launcher installed (submitit's, say) are left alone."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
                    self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class TrainingLog:
    """TensorBoard scalars every trainer.log_every steps, and probes every probes.every steps: one
    transfer to the host each time. Throughput is timed between transfers, when the device has
    really finished the work."""

    def __init__(self, writer: SummaryWriter, device: torch.device):
        self.writer = writer
        self.window = RunningSums(device)
        self.seconds, self.images = 0.0, 0  # training time and images over the whole run
        self.dead_fraction: dict[str, float] = {}  # of the latest probe
        self.skipped = 0  # steps not applied for a non-finite loss (trainer.on_nonfinite=skip)
        self.start_epoch()

    def start_epoch(self, keep_totals: bool = False) -> None:
        if not keep_totals:
            self.epoch_loss, self.epoch_correct, self.epoch_images = 0.0, 0.0, 0
        self.timer = time.perf_counter()  # evaluation between epochs is not training time

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": [self.epoch_loss, self.epoch_correct, self.epoch_images], "seconds": self.seconds,
                "images": self.images, "dead_fraction": dict(self.dead_fraction), "skipped": self.skipped,
                # the steps since the last log: a resumed run logs exactly what an uninterrupted one would
                "window": [self.window.loss.clone(), self.window.correct.clone(), self.window.count]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch_loss, self.epoch_correct, self.epoch_images = state["epoch"]
        self.seconds, self.images = state["seconds"], state["images"]
        self.dead_fraction = dict(state["dead_fraction"])
        self.skipped = state["skipped"]
        loss, correct, self.window.count = state["window"]
        self.window.loss.copy_(loss)
        self.window.correct.copy_(correct)

    def flush(self, step: int, lr: float, grad_norm: Tensor | None, parameters: list[nn.Parameter]) -> tuple[float, float, float]:
        """Write the scalars of the steps since the last flush; returns (loss, accuracy, images/s)."""
        images = self.window.count
        loss, acc, (norm,) = self.window.take(grad_norm if grad_norm is not None else gradient_norm(parameters))
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
                probes: Probes | None, progress: TrainingProgress, step: int, last_step: int,
                checkpoint: Callable[[int, int], None] | None = None, first_batch: int = 0,
                watch: NonfiniteWatch | None = None, stop: StopRequest | None = None,
                precision: Precision = FLOAT32, step_model: nn.Module | None = None) -> int:
    """One pass over the training batches: step, log, probe, checkpoint. Returns the step count
    after it. Probes run every probes.every steps and at last_step, so a run always ends with one;
    `checkpoint(step, batches done)` runs every trainer.checkpoint_every steps within the epoch.
    first_batch > 0 continues an interrupted epoch. A non-finite loss raises Diverged (before any
    checkpoint could keep it); a stop request ends the epoch early with a checkpoint. step_model is
    the module the steps run (a compiled `model`); probes always look at `model` itself."""
    step_model = step_model or model
    log.start_epoch(keep_totals=first_batch > 0)
    model.train()
    lr, grad_norm = optimizer.param_groups[0]["lr"], None
    for batch, (images, labels) in enumerate(batches, first_batch + 1):
        probe_due = probes is not None and (probes.due(step + 1) or step + 1 == last_step)
        lr = optimizer.param_groups[0]["lr"]
        grad_norm, finite = train_step(step_model, parameters, optimizer, scheduler, images, labels, cfg.grad_clip,
                                       log.window, probes if probe_due else None, cfg.on_nonfinite == "skip",
                                       precision)
        step += 1
        if cfg.on_nonfinite == "skip" and not finite:
            log.skipped += 1
        elif watch is not None:
            watch.update(step, finite)
        if probe_due:
            log.probe(step, probes)
        progress.advance()
        logged = step % cfg.log_every == 0
        if logged and log.window.count:
            progress.update(*log.flush(step, lr, grad_norm, parameters))
        stopping = stop is not None and stop.signum is not None and batch < len(batches)
        due = checkpoint is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and batch < len(batches)
        if watch is not None:
            watch.check(now=logged or probe_due or due or stopping)
        if (due or stopping) and checkpoint is not None:
            checkpoint(step, batch)
        if stopping:
            raise Interrupted(stop.signum, step)
    if log.window.count:  # the rest of the epoch: its last partial window
        progress.update(*log.flush(step, lr, grad_norm, parameters))
    return step


def _differing_sections(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The sections in which a checkpoint's config differs from this run's."""
    return [key for key in ("dataset", "model", "activation", "optimizer", "scheduler") if saved.get(key) != config.get(key)]


def train(run: RunConfig, run_dir: Path, config: dict[str, Any], console: Console | None = None,
          resume: bool = False) -> dict[str, Any]:
    """Train, validate every epoch, test once at the end; everything lands in run_dir. With resume,
    continue from run_dir/checkpoints/last.pt exactly where it was written."""
    console = console or Console()
    started = time.perf_counter()
    run_dir = Path(run_dir)
    last_path = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    t = run.trainer
    metrics: dict[str, Any] = {
        "status": "running", "epochs": 0, "steps": 0,
        "train_loss": None, "train_acc": None, "val_loss": None, "val_acc": None,
        "test_loss": None, "test_acc": None, "best_val_acc": None, "best_epoch": None,
        "seconds": 0.0, "images_per_second": None,
        "device": None, "threads": None, "parameters": None, "dead_fraction": None, "skipped_steps": 0,
    }
    if not resume:
        write_metrics(run_dir, metrics)
    # A resume that fails before it has restored the run leaves the run's files as they were.
    restored = not resume
    writer = None
    try:
        device = resolve_device(t.device)
        state = load_checkpoint(last_path, map_location=device) if resume else None
        if state is not None:
            differs = _differing_sections(state.get("config") or {}, config)
            if differs:
                raise UserError(
                    f"{last_path} was written by a different configuration ({', '.join(differs)} differ) and "
                    f"cannot be resumed as this run; start a new run in another directory.")
            metrics.update(state["metrics"], status="running")
        metrics["device"] = str(device)
        seed_everything(t.seed, t.deterministic)
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        metrics["threads"] = torch.get_num_threads()
        data = load_data(run.dataset, t.batch_size, t.eval_batch_size, device, t.seed)
        model = build_model(run.model, run.activation, data.input_shape, data.num_classes).to(device)
        if t.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
            model = model.to(memory_format=torch.channels_last)
            data.train.normalise.channels_last = True  # one Normalise serves every split
        precision = Precision(t.amp, device)
        # Hooks added to a compiled module after its first call never fire, so steps run the compiled
        # module while probes (and checkpoints) use the eager one, which shares its parameters.
        step_model = torch.compile(model) if t.compile else model
        parameters = list(model.parameters())
        metrics["parameters"] = sum(p.numel() for p in parameters)
        optimizer = build_optimizer(run.optimizer, parameters)
        scheduler = build_scheduler(run.scheduler, optimizer, len(data.train), t.epochs)
        probes = None
        if run.probes.enabled:
            # The split seed, not the trainer seed: runs that differ by seed probe the same images.
            probe_images = data.train.sample(run.probes.batch_size, seed=run.dataset.split_seed)
            probes = Probes(model, probe_images, run.probes)
        if state is not None:  # nothing of the run is touched until the checkpoint has proved usable
            check_restorable(state, last_path, model)
            restored = True
        # purge_step: events a killed run wrote after its last checkpoint are dropped, so that
        # TensorBoard has each step once.
        writer = SummaryWriter(str(run_dir), flush_secs=10, purge_step=state["step"] + 1 if state else None)
        log = TrainingLog(writer, device)
        step, epoch, first_batch = 0, 1, 0
        if state is None:
            write_layout(writer)
            write_hparams_start(writer, run)
            if probes is not None:
                log.probe(step, probes)  # before any update
        else:
            step, epoch, first_batch = restore(state, last_path, model, optimizer, scheduler, data.train, log, device)
            if precision.scaler is not None and state.get("scaler"):
                precision.scaler.load_state_dict(state["scaler"])
            if first_batch >= len(data.train):  # the checkpoint closed its epoch
                epoch, first_batch = epoch + 1, 0
        write_metrics(run_dir, metrics)
        sizes = " / ".join(f"{count:,} {name}" for name, count in data.sizes.items() if count)
        console.print(
            f"cnnlab: {run.model.name} + {run.activation.name} on {run.dataset.name} ({sizes}), "
            f"{metrics['parameters']:,} parameters, {device}, run directory {run_dir}"
            + (f"; resuming at epoch {epoch}, step {step}" if state is not None else ""),
            highlight=False, markup=False, soft_wrap=True,
        )

        def checkpoint(epoch: int, step: int, batch: int) -> None:
            writer.flush()  # every event up to this step is on disk before a checkpoint covers it
            save_checkpoint(last_path, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch,
                "step": step,
                "batch": batch,  # batches of this epoch done
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "data": data.train.state_dict(),
                },
                "log": log.state_dict(),
                "scaler": precision.scaler.state_dict() if precision.scaler is not None else None,
                "metrics": dict(metrics, epochs=epoch - (batch < len(data.train)), steps=step),
                "config": config,
            })

        watch = NonfiniteWatch(device)
        with TrainingProgress(t.epochs, console) as progress, StopRequest() as stop:
            for epoch in range(epoch, t.epochs + 1):
                progress.start_epoch(epoch, len(data.train), completed=first_batch)
                step = train_epoch(model, parameters, optimizer, scheduler, data.train, t, log, probes, progress, step,
                                   last_step=t.epochs * len(data.train),
                                   checkpoint=lambda step, batch: checkpoint(epoch, step, batch), first_batch=first_batch,
                                   watch=watch, stop=stop, precision=precision, step_model=step_model)
                first_batch = 0
                watch.check(now=True)  # never evaluate or checkpoint a diverged model
                val_loss, val_acc = evaluate(step_model, data.val, precision)
                writer.add_scalar("val/loss", val_loss, step)
                writer.add_scalar("val/acc", val_acc, step)
                writer.add_scalar("epoch", epoch, step)
                metrics.update(
                    epochs=epoch, steps=step, train_loss=log.epoch_loss / log.epoch_images if log.epoch_images else None,
                    train_acc=log.epoch_correct / log.epoch_images if log.epoch_images else None, val_loss=val_loss,
                    val_acc=val_acc, images_per_second=log.images / max(log.seconds, 1e-9),
                    seconds=round(time.perf_counter() - started, 3), dead_fraction=log.dead_fraction or None,
                    skipped_steps=log.skipped,
                )
                if metrics["best_val_acc"] is None or val_acc > metrics["best_val_acc"]:
                    metrics.update(best_val_acc=val_acc, best_epoch=epoch)
                    save_checkpoint(run_dir / CHECKPOINT_DIR / BEST_CHECKPOINT, {
                        "model": model.state_dict(), "epoch": epoch, "step": step, "val_acc": val_acc, "config": config})
                checkpoint(epoch, step, len(data.train))
                write_metrics(run_dir, metrics)
                progress.end_epoch(epoch, step, {
                    "train_loss": metrics["train_loss"], "train_acc": metrics["train_acc"],
                    "val_loss": val_loss, "val_acc": val_acc, "img/s": round(metrics["images_per_second"]),
                })
                if stop.signum is not None and epoch < t.epochs:  # asked to stop during this epoch's last step
                    raise Interrupted(stop.signum, step)

        if data.test is not None:
            test_loss, test_acc = evaluate(step_model, data.test, precision)
            writer.add_scalar("test/loss", test_loss, step)
            writer.add_scalar("test/acc", test_acc, step)
            metrics.update(test_loss=test_loss, test_acc=test_acc)
        metrics["status"] = "completed"
    except BaseException as error:
        if isinstance(error, Diverged):
            metrics.update(status="diverged", diverged_step=error.step)
        elif isinstance(error, (Interrupted, KeyboardInterrupt, SystemExit)):  # SystemExit: a launcher's own handler
            metrics["status"] = "interrupted"
        else:
            metrics["status"] = "failed"
        metrics["error"] = " ".join(str(error).split()) or type(error).__name__
        raise
    finally:
        metrics["seconds"] = round(time.perf_counter() - started, 3)
        if restored:
            write_metrics(run_dir, metrics)
        if writer is not None:
            write_hparams_end(writer, metrics["status"])
            writer.close()
    console.print(summary_table(metrics, str(run_dir)))
    return metrics


def check_restorable(state: dict[str, Any], path: Path, model: nn.Module) -> None:
    """Refuse a checkpoint that does not fit this run's model, before anything is changed."""
    missing = [key for key in ("model", "optimizer", "scheduler", "epoch", "step", "batch", "rng", "log", "metrics")
               if key not in state]
    if missing:
        raise UserError(f"{path} is not a complete cnnlab checkpoint (no {', '.join(missing)}); it cannot be resumed.")
    expected = model.state_dict()
    saved = state["model"]
    wrong = sorted(set(expected) ^ set(saved)) or [k for k in expected if tuple(saved[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise UserError(f"{path} holds a different model than this run's ({', '.join(wrong[:4])} differ); "
                        f"it cannot be resumed as this run.")


def restore(state: dict[str, Any], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: LRScheduler | None, batches: Batches, log: TrainingLog, device: torch.device) -> tuple[int, int, int]:
    """Put every piece of training state back as the checkpoint holds it; (step, epoch, batch)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        batch = state["batch"]
        batches.load_state_dict(state["rng"]["data"], resume_at=batch if batch < len(batches) else 0)
        log.load_state_dict(state["log"])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        raise UserError(f"{path} does not fit this run and cannot be resumed: {' '.join(str(error).split())[:300]}") from None
    return state["step"], state["epoch"], batch

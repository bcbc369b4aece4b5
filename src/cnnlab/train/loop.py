"""The training loop, one explicit loop read top to bottom: `setup` builds a run's state,
`train_step` and `train_epoch` advance it, `end_epoch` validates and checkpoints, `test` ends it,
and `train` runs the whole of it and returns a RunResult. It prints nothing: what it shows while it
trains goes to a Progress, what it ends with is the result.

The state's parts are state.py's, writing and restoring checkpoints is checkpoint.py's, whether a
checkpoint may be resumed is resume.py's, when to probe is probes.py's, TensorBoard is tblog.py's.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import resource
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from cnnlab.analysis.findings import Finding, diagnose, run_facts
from cnnlab.config import RunConfig, as_dict
from cnnlab.errors import UserError, one_line
from cnnlab.instruments.probes import Probes, examples_needed, gradient_norm, images_within_budget
from cnnlab.instruments.sharpness import CurvatureSet
from cnnlab.rundir import (clear_unfinished, last_checkpoint, record_config, refuse_foreign_files, run_lock, write_metrics,
                           write_record)
from cnnlab.status import Status
from cnnlab.train.checkpoint import restore, save_best, save_last
from cnnlab.train.data import load_data
from cnnlab.train.models import build_model
from cnnlab.train.optim import build_optimizer, build_scheduler
from cnnlab.train.resume import check_fits, load_resumable
from cnnlab.train.state import (
    Diverged,
    NonfiniteWatch,
    Precision,
    TrainingLog,
    TrainState,
    adaptive_preconditioner,
    evaluate,
    fitting_in_memory,
    new_metrics,
    resolve_device,
    seed_everything,
    sgd_stability_limit,
)
from cnnlab.train.stops import StopRequest
from cnnlab.train.tblog import (close_events, write_density, write_findings, write_hparams_end, write_hparams_start,
                                write_layout, writer_error, writer_thread_quiet)

log = logging.getLogger(__name__)

# A run's own folder cannot be written: the user's to fix, with this.
DISK_ERRORS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (or raise your disk quota)",
               errno.EROFS: "make the folder writable", errno.EPERM: "make the folder writable",
               errno.EACCES: "make the folder writable",
               errno.EFBIG: "raise the file size limit (ulimit -f), or make the model smaller"}

@dataclass
class RunResult:
    """How a run ended, for the command to show: train() itself prints nothing."""

    status: Status
    metrics: dict[str, Any]  # what metrics.json says
    findings: list[Finding]  # at the end of the run; [] when findings are off
    findings_error: str | None  # why the findings could not be computed, else None
    description: str  # "cnnlab: mlp + relu on mnist (..), N parameters, cpu, run directory X[; resuming ..]"; "" if setup did not finish
    error: BaseException | None  # the Diverged / Interrupted / UserError that ended the run, else None


class Progress(Protocol):
    """What a run shows while it trains (cli.console.TrainingProgress draws it as a bar). The loop
    calls started() once, after setup, then enters the context for the epochs."""

    live: bool  # a bar someone watches: the loop then reads the epoch so far ~20 times an epoch

    def __enter__(self) -> Progress: ...
    def __exit__(self, *exc) -> None: ...
    def started(self, description: str) -> None: ...
    def start_epoch(self, epoch: int, steps: int, completed: int = 0) -> None: ...
    def advance(self) -> None: ...
    def update(self, loss: float, acc: float, images_per_second: float) -> None: ...
    def end_epoch(self, epoch: int, step: int, summary: dict[str, Any]) -> None: ...


class SilentProgress:
    """The Progress of a run that shows nothing."""

    live = False

    def __enter__(self) -> SilentProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def started(self, description: str) -> None:
        pass

    def start_epoch(self, epoch: int, steps: int, completed: int = 0) -> None:
        pass

    def advance(self) -> None:
        pass

    def update(self, loss: float, acc: float, images_per_second: float) -> None:
        pass

    def end_epoch(self, epoch: int, step: int, summary: dict[str, Any]) -> None:
        pass


class Interrupted(Exception):
    """A stop request (SIGINT, SIGTERM, or StopRequest's at_step/during) ended the run after a step."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step = signum, step


# torch's own thread count (OMP_NUM_THREADS, else the physical cores), read before anything here
# sets it: a later torch.get_num_threads() says only what the last run set.
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def cores_available() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def usable_threads(requested: int) -> int:
    """trainer.threads, at most the cores this process may run on: more only wait for each other, and
    thousands made OpenMP run out of memory and crash the process (trainer.threads=5000)."""
    cores = cores_available()
    if requested > cores:
        log.warning("trainer.threads=%d is more than the %d cores this process may use: using %d",
                    requested, cores, cores)
    return min(requested, cores)


def runnable_elsewhere(looks: int = 5, interval: float = 0.01) -> int | None:
    """Threads of other processes that are running or ready to run now (/proc/loadavg's count less
    this process's own), the median of a few looks so that a passing command does not count; None
    where /proc cannot say. Now, not the 1-minute load: that lags, and counts this process's past."""
    counts = []
    for look in range(looks):
        if look:
            time.sleep(interval)
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
            own = sum(1 for task in Path("/proc/self/task").iterdir() if _task_runnable(task))
        except (OSError, ValueError, IndexError):
            return None
        counts.append(max(0, running - own))
    return statistics.median_low(counts)


def _task_runnable(task: Path) -> bool:
    try:  # the state follows the command's name, which may hold spaces and parentheses
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
    except (OSError, IndexError):
        return False  # the thread ended while we looked


def thread_choice(requested: int | None, cores: int, busy_elsewhere: int | None,
                  torch_default: int = TORCH_DEFAULT_THREADS) -> tuple[int, str]:
    """CPU threads for torch, and why. trainer.threads=null: the cores not taken by other processes
    (at least one, at most torch's default: OMP_NUM_THREADS, else the physical cores), because torch's OpenMP threads spin waiting for each
    other, and one whose core is taken holds up the rest: beside one busy process on 2 cores, 2
    threads trained 3-7x slower than 1. An explicit trainer.threads is kept, capped to the cores."""
    if requested is not None:
        return min(requested, cores), f"{min(requested, cores)} of {cores} cores (set)"
    ceiling = min(torch_default, cores)
    if busy_elsewhere is None:
        return ceiling, f"{ceiling} of {cores} cores (torch's default; no /proc/loadavg to see other processes)"
    threads = max(1, min(ceiling, cores - busy_elsewhere))
    plural = "" if busy_elsewhere == 1 else "s"
    return threads, f"{threads} of {cores} cores ({busy_elsewhere} thread{plural} of other processes running)"


def choose_threads(requested: int | None, deterministic: bool = False, resumed_with: int | None = None) -> tuple[int, str]:
    """thread_choice on this machine, now. The thread count can change a CPU run's sums in their last
    bits, so a resume keeps the count its run had, and trainer.deterministic a fixed one (torch's
    default) whatever the load: their promise is a bit-identical continuation or rerun."""
    if requested is not None:
        return thread_choice(usable_threads(requested), cores_available(), None)
    if resumed_with is not None:
        threads = usable_threads(resumed_with)
        return threads, f"{threads} of {cores_available()} cores (as the run had before its resume)"
    if deterministic:
        threads, _ = thread_choice(None, cores_available(), None)
        return threads, f"{threads} of {cores_available()} cores (torch's default: trainer.deterministic, whatever the load)"
    return thread_choice(None, cores_available(), runnable_elsewhere())


def setup(run: RunConfig, run_dir: Path, resume: bool = False, metrics: dict[str, Any] | None = None) -> TrainState:
    """Build a run's state: fresh, or with `resume` exactly as run_dir's last checkpoint left it.
    A resume touches nothing in run_dir until the checkpoint has proved to fit this run."""
    t = run.trainer
    device = resolve_device(t.device)
    config = as_dict(run)
    saved = load_resumable(run_dir, config, device) if resume else None
    seed_everything(t.seed, t.deterministic)
    threads, why = choose_threads(t.threads, t.deterministic, (saved or {}).get("metrics", {}).get("threads"))
    torch.set_num_threads(threads)
    data = load_data(run.dataset, t.batch_size, t.eval_batch_size, device, t.seed)
    model = fitting_in_memory(lambda: build_model(run.model, run.activation, data.input_shape, data.num_classes).to(device))
    if t.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
        data.train.normalise.channels_last = True  # one Normalise serves every split
    # Hooks added to a compiled module after its first call never fire, so steps run the compiled
    # module while probes (and checkpoints) use the eager one, which shares its parameters.
    step_model = torch.compile(model) if t.compile else model
    parameters = list(model.parameters())
    optimizer = build_optimizer(run.optimizer, parameters)
    probes = None
    if run.probes.enabled:
        # The split seed, not the trainer seed: runs that differ by seed probe the same images. The
        # probe batch is the sample's start: the same images whatever the sample's size.
        examples = data.train.sample(examples_needed(run.probes, data.input_shape), seed=run.dataset.split_seed)
        # The sharpness's curvature set: the same seed, so the probe batch is its start.
        curvature_size = min(run.probes.curvature_examples, images_within_budget(data.input_shape))
        curvature = (CurvatureSet(*data.train.sample(curvature_size, seed=run.dataset.split_seed),
                                  batch_size=t.batch_size) if run.probes.sharpness_every else None)
        probes = Probes(model, examples, run.probes, last_step=t.epochs * len(data.train),
                        stability_limit=sgd_stability_limit(optimizer),
                        preconditioner=adaptive_preconditioner(optimizer), curvature=curvature)
    state = TrainState(
        run=run, config=config, run_dir=Path(run_dir), device=device, model=model, step_model=step_model,
        parameters=parameters, optimizer=optimizer,
        scheduler=build_scheduler(run.scheduler, optimizer, len(data.train), t.epochs), data=data, probes=probes,
        precision=Precision(t.amp, device), log=TrainingLog(device), watch=NonfiniteWatch(device),
        metrics=new_metrics() if metrics is None else metrics, threads_chosen=why)
    if saved is not None:
        check_fits(saved, state.model.state_dict(), run_dir)
        restore(state, saved)
    state.metrics.update(device=str(device), threads=torch.get_num_threads(),
                         parameters=sum(p.numel() for p in parameters))
    # Fresh or resumed, the HParams record says "not over" until this process ends (tblog.HPARAMS_FILE).
    write_hparams_start(run_dir, run)
    # purge_step: events a killed run wrote after its last checkpoint are dropped, so that
    # TensorBoard has each step once.
    state.log.writer = SummaryWriter(str(run_dir), flush_secs=10, purge_step=state.step + 1 if saved else None)
    if saved is None:
        write_layout(state.log.writer)
        if probes is not None:
            if probes.due(0):
                state.log.probe(0, probes)  # before any update
            state.log.record(0, probes.on_data())  # dead units at initialisation, on the data
    return state


def train_step(state: TrainState, images: Tensor, labels: Tensor, probe: bool = False) -> tuple[Tensor | None, Tensor]:
    """One optimizer step, with no host synchronisation unless trainer.on_nonfinite=skip.

    Returns (gradient norm before clipping, or None when it was not computed; finite), where
    `finite` is a device bool: the loss, and the gradient norm when computed, are finite. With
    on_nonfinite=skip a step whose loss or gradients are not finite is not applied, which needs one
    host sync per step. With `probe`, the probes record the gradients before clipping and the
    weights around the update."""
    t, precision, optimizer = state.run.trainer, state.precision, state.optimizer
    probes = state.probes if probe else None
    skip_nonfinite = t.on_nonfinite == "skip"
    with precision.autocast():
        logits = state.step_model(images)
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
    if t.grad_clip:
        grad_norm = nn.utils.clip_grad_norm_(state.parameters, t.grad_clip)
    else:
        grad_norm = gradient_norm(state.parameters) if skip_nonfinite else None
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
        state.log.window.add(loss, logits, labels)
    if probes is not None:
        probes.after_update()
    if state.scheduler is not None:
        state.scheduler.step()  # the schedule follows the steps, taken or skipped
    return grad_norm, finite


def train_epoch(state: TrainState, progress: Progress, stop: StopRequest | None = None) -> None:
    """The rest of epoch state.epoch (all of it, unless a resume starts mid-epoch): step, log,
    probe, checkpoint every trainer.checkpoint_every steps. A non-finite loss raises Diverged
    before any checkpoint could keep it; a stop request ends the epoch early with a checkpoint."""
    t, log, batches, probes = state.run.trainer, state.log, state.data.train, state.probes
    log.start_epoch(keep_totals=state.batch > 0)
    state.model.train()
    lr, grad_norm = state.optimizer.param_groups[0]["lr"], None
    # A live bar shows the epoch so far about 20 times an epoch however rarely the loop logs (one
    # small transfer each time); without a bar nothing is read between logs.
    refresh = math.ceil(len(batches) / 20)
    for images, labels in batches:
        probe = probes is not None and probes.due(state.step + 1)
        lr = state.optimizer.param_groups[0]["lr"]
        grad_norm, finite = train_step(state, images, labels, probe)
        state.step, state.batch = state.step + 1, state.batch + 1
        if stop is not None:
            stop.reached(state.step)
        if t.on_nonfinite == "skip" and not finite:
            log.skipped += 1
        else:
            state.watch.update(state.step, finite)
        if probe:
            log.probe(state.step, probes)
        progress.advance()
        mid_epoch = state.batch < len(batches)
        logged = state.step % t.log_every == 0
        if logged and log.window.count:
            log.flush(state.step, lr, grad_norm, state.parameters)
        if logged or (progress.live and mid_epoch and state.batch % refresh == 0):
            show_epoch_so_far(progress, log)
        stopping = stop is not None and stop.signum is not None and mid_epoch
        due = bool(t.checkpoint_every) and state.step % t.checkpoint_every == 0 and mid_epoch
        state.watch.check(now=logged or probe or due or stopping)
        if due or stopping:
            state.watch.check_weights(state.parameters, state.step)
            save_last(state)
        if stopping:
            raise Interrupted(stop.signum, state.step)
    if log.window.count:  # the rest of the epoch: its last partial window
        log.flush(state.step, lr, grad_norm, state.parameters)
        show_epoch_so_far(progress, log)


def show_epoch_so_far(progress: Progress, log: TrainingLog) -> None:
    so_far = log.running()
    if so_far is not None:
        progress.update(*so_far)


def end_epoch(state: TrainState, progress: Progress) -> None:
    """Validate, keep the best weights, checkpoint, and record the epoch in metrics.json."""
    state.watch.check(now=True)  # never evaluate or checkpoint a diverged model
    state.watch.check_weights(state.parameters, state.step)
    val_loss, val_acc = evaluate(state.step_model, state.data.val, state.precision)
    if not math.isfinite(val_loss):  # finite but huge weights can overflow the logits
        raise Diverged(state.step, "the validation loss")
    writer, log, metrics = state.log.writer, state.log, state.metrics
    writer.add_scalar("val/loss", val_loss, state.step)
    writer.add_scalar("val/acc", val_acc, state.step)
    writer.add_scalar("epoch", state.epoch, state.step)
    if state.probes is not None:  # forward passes only: training goes on exactly as without them
        state.log.record(state.step, state.probes.on_data())
    if state.run.findings.enabled:
        find(state)  # rewritten at each epoch end, so that a running sweep can be read
    train_loss, train_acc, epoch_speed = log.running() or (None, None, None)  # all flushed: no transfer
    metrics.update(
        epochs=state.epoch, steps=state.step, train_loss=train_loss, train_acc=train_acc,
        val_loss=val_loss, val_acc=val_acc, images_per_second=log.images / max(log.seconds, 1e-9),  # the run's average
        seconds=round(time.perf_counter() - state.started, 3), dead_fraction=log.dead_fraction or None,
        skipped_steps=log.skipped,
    )
    if metrics["best_val_acc"] is None or val_acc > metrics["best_val_acc"]:
        metrics.update(best_val_acc=val_acc, best_epoch=state.epoch)
        save_best(state, val_acc)
    save_last(state)
    write_metrics(state.run_dir, metrics)
    if state.probes is not None and state.probes.cfg.density:
        write_density(state.log.writer, state.run_dir, state.step, state.probes)
    progress.end_epoch(state.epoch, state.step, {
        "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
        "img/s (epoch)": None if epoch_speed is None else round(epoch_speed),
    })


def find(state: TrainState) -> list[Finding]:
    """The findings so far, also into metrics.json's `findings`."""
    facts = run_facts(state.config, num_classes=state.data.num_classes, steps_per_epoch=len(state.data.train),
                      metrics=state.metrics)
    found = diagnose(state.log.series, facts, state.run.findings)
    state.metrics["findings"] = [finding.to_dict() for finding in found]
    return found


def report_findings(state: TrainState, to_tensorboard: bool) -> tuple[list[Finding], str | None]:
    """At the end of a run, however it ended: the findings into metrics.json, and with
    `to_tensorboard` into TensorBoard (text `findings`); (them, None), or ([], why) when they could not
    be computed: a fault here must not cost the run its results."""
    try:
        found = find(state)
        if to_tensorboard:
            write_findings(state.log.writer, state.step, found)
    except Exception as error:  # noqa: BLE001 - the run's own outcome matters more
        return [], one_line(error, 200)
    return found, None


def test(state: TrainState) -> None:
    """The test split, once, at the end (there is none for an image folder without test/)."""
    if state.data.test is None:
        return
    test_loss, test_acc = evaluate(state.step_model, state.data.test, state.precision)
    state.log.writer.add_scalar("test/loss", test_loss, state.step)
    state.log.writer.add_scalar("test/acc", test_acc, state.step)
    state.metrics.update(test_loss=test_loss, test_acc=test_acc)


def train(run: RunConfig, run_dir: Path, *, resume: bool = False, progress: Progress | None = None,
          stop: StopRequest | None = None, record: dict[str, str] | None = None) -> RunResult:
    """Train, validate every epoch, test once at the end; everything lands in run_dir, which this
    process holds for itself meanwhile. With resume, continue from run_dir's last checkpoint exactly
    where it was written. SIGINT/SIGTERM at any point stop the run cleanly (see StopRequest).
    A run that completed, diverged, was stopped or failed with a UserError returns its RunResult;
    any other error propagates once metrics.json says `failed`, and a second Ctrl-C propagates.
    `record`: the record of the run's config (.hydra/ files, cli.job.config_record), written only once
    run_dir is this run's: its lock held and, for a resume, its checkpoint accepted."""
    run_dir = Path(run_dir)
    try:
        if not resume:  # before the lock file marks the folder as cnnlab's
            refuse_foreign_files(run_dir, "the run directory")
        with run_lock(run_dir), writer_thread_quiet(), (stop or StopRequest()) as stop, float32_by_default():
            if not resume:
                clear_unfinished(run_dir)  # what a run killed before its first checkpoint left here
                write_record(run_dir, record or {})
            return run_to_the_end(run, run_dir, resume, progress or SilentProgress(), stop, record)
    except UserError as error:  # run_to_the_end returns its own: another process holds run_dir, untouched
        return RunResult(Status.FAILED, {"status": Status.FAILED.value, "error": str(error)}, [], None, "", error)


@contextlib.contextmanager
def float32_by_default():
    """cnnlab's models, data and checkpoints are float32: a default dtype set elsewhere in the process
    (torch.set_default_dtype(torch.float64)) would build float64 layers that float32 images cannot enter."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def run_to_the_end(run: RunConfig, run_dir: Path, resume: bool, progress: Progress, stop: StopRequest,
                   record: dict[str, str] | None = None) -> RunResult:
    """The run from setup to its test, and what metrics.json says however it ends."""
    started = time.perf_counter()
    metrics, state, description, error = new_metrics(), None, "", None
    if not resume:
        write_metrics(run_dir, metrics)
    try:
        state = setup(run, run_dir, resume, metrics)
        state.started = started - metrics["seconds"]  # a resumed run adds to the time it had spent
        description = describe(state, resume)
        stop.reached("setup")
        if stop.signum is not None:  # asked to stop while it was starting
            raise Interrupted(stop.signum, state.step)
        if resume:  # accepted: the record of its config may follow now
            write_record(run_dir, record or {})
            record_config(run_dir, state.config)
        write_metrics(run_dir, metrics)
        progress.started(description)
        with progress:
            run_epochs(state, progress, stop)
        stop.reached("test")
        test(state)  # a stop request now waits for this last, short evaluation: the run is complete
        metrics["status"] = Status.COMPLETED.value
    except BaseException as caught:
        lost = events_lost(state, run_dir)  # the writer thread's error surfaces at the next write
        metrics.update(ending(lost or caught, state))
        error = lost or reported(caught, run_dir)
        if error is None:
            raise
    finally:
        found, findings_error, lost = finish(run, run_dir, state, metrics, resume, started)
    return RunResult(Status(metrics["status"]), metrics, found, findings_error, description, error or lost)


def run_epochs(state: TrainState, progress: Progress, stop: StopRequest) -> None:
    """Every epoch left, from where the state is (a resume may start mid-epoch)."""
    epochs = state.run.trainer.epochs
    while state.epoch <= epochs:
        progress.start_epoch(state.epoch, len(state.data.train), completed=state.batch)
        train_epoch(state, progress, stop)
        end_epoch(state, progress)
        if stop.signum is not None and state.epoch < epochs:  # asked to stop during the last step
            raise Interrupted(stop.signum, state.step)
        state.epoch, state.batch = state.epoch + 1, 0


def finish(run: RunConfig, run_dir: Path, state: TrainState | None, metrics: dict[str, Any], resume: bool,
           started: float) -> tuple[list[Finding], str | None, UserError | None]:
    """However the run ended: its time, its findings, TensorBoard's files closed, metrics.json. A run
    whose events did not all reach their file has failed: that error is returned, and said there."""
    metrics["seconds"] = round(time.perf_counter() - (state.started if state is not None else started), 3)
    found, findings_error, lost = [], None, None
    if state is not None and run.findings.enabled:
        # An interrupted run goes on when resumed, and writes its text then: once per run, not per session.
        found, findings_error = report_findings(state, to_tensorboard=metrics["status"] != Status.INTERRUPTED.value)
    if state is not None:
        lost = events_lost(state, run_dir, close_events(state.log.writer))
        if lost is not None and metrics["status"] == Status.COMPLETED.value:
            metrics.update(status=Status.FAILED.value, error=one_line(lost))
    # A refused resume leaves the run's files as they were; on a full disk, this may fail too.
    if state is not None or not resume:
        with contextlib.suppress(OSError):
            write_metrics(run_dir, metrics)
    if state is not None:
        with contextlib.suppress(OSError):
            write_hparams_end(run_dir, metrics["status"])
    return found, findings_error, lost


def events_lost(state: TrainState | None, run_dir: Path, error: BaseException | None = None) -> UserError | None:
    """The run's failure when TensorBoard's writer could not write its events (`error`, or the
    error that ended its thread): its events stop short, but its checkpoint and metrics.json are kept."""
    error = error or (writer_error(state.log.writer) if state is not None else None)
    if error is None:
        return None
    kept = (f"The last checkpoint and metrics.json are kept; fix the cause (for 'Too many open files', raise "
            f"`ulimit -n`), then continue with resume={run_dir}" if last_checkpoint(run_dir).is_file() else
            "It failed before its first checkpoint: fix the cause (for 'Too many open files', raise `ulimit -n`) "
            "and run it again")
    return UserError(f"TensorBoard's event writer failed ({one_line(error, 200)}), so the events in {run_dir} "
                     f"stop short. {kept}.")


def describe(state: TrainState, resumed: bool) -> str:
    run, sizes = state.run, " / ".join(f"{count:,} {name}" for name, count in state.data.sizes.items() if count)
    return (f"cnnlab: {run.model.name} + {run.activation.name} on {run.dataset.name} ({sizes}), "
            f"{state.metrics['parameters']:,} parameters, {state.device}"
            + (f" with {state.threads_chosen}" if state.device.type == "cpu" and state.threads_chosen else "")
            + f", run directory {state.run_dir}"
            + (f"; resuming at epoch {state.epoch}, step {state.step}" if resumed else ""))


def ending(error: BaseException, state: TrainState | None) -> dict[str, Any]:
    """What metrics.json says about a run that `error` ended: its status, and how far it got."""
    if isinstance(error, Diverged):
        status = {"status": Status.DIVERGED.value, "diverged_step": error.step}
    elif isinstance(error, (Interrupted, KeyboardInterrupt, SystemExit)):  # SystemExit: a launcher's own handler
        status = {"status": Status.INTERRUPTED.value}
    else:
        status = {"status": Status.FAILED.value}
    progress = {"epochs": state.epochs_done, "steps": state.step} if state is not None else {}
    return {**status, **progress, "error": one_line(error)}


def reported(error: BaseException, run_dir: Path) -> Exception | None:
    """The error a RunResult carries for a run that `error` ended, or None for one that propagates.
    A full or read-only disk is the user's to fix, not a crash."""
    if isinstance(error, OSError) and error.errno in DISK_ERRORS:
        if not last_checkpoint(run_dir).is_file():
            return UserError(f"Cannot write into {run_dir}: {one_line(error, 300)}. It stopped before its first "
                             f"checkpoint, so there is nothing to resume; {DISK_ERRORS[error.errno]}, then run it again.")
        return UserError(f"Cannot write into {run_dir}: {one_line(error, 300)}. The last checkpoint written "
                         f"before it is kept; {DISK_ERRORS[error.errno]}, then resume.")
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
        return UserError(f"{one_line(error, 200)}: this process may open only {open_files_limit()} files at once. "
                         f"The last checkpoint written before it is kept; raise the limit (`ulimit -n 4096`), "
                         f"then continue with resume={run_dir}.")
    return error if isinstance(error, (Diverged, Interrupted, UserError)) else None


def open_files_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # imported beforehand: an import opens a file too

"""Stopping runs and sweeps: SIGINT and SIGTERM become a stop after the current step, with a
checkpoint, for a single run (StopRequest), for a sweep's jobs wherever the launcher runs them
(SweepStop, stoppable), and while Hydra starts (sigterm_as_interrupt). No torch here."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cnnlab.status import Status


# Stopping a sweep. Jobs in this process (the basic launcher) stop as a single run does. joblib's
# workers do not see a signal sent to the sweep, and one that died of a signal would break joblib's
# pool (joblib then kills the others mid-step). So they start deaf to SIGINT and SIGTERM; asked to
# stop, the parent writes STOP_FILE into the sweep folder (a job that starts after it returns at
# once) and sends SIGTERM to each worker in a job, which the trainer turns into a stop after the
# current step, with a checkpoint. Linux only: the workers are found in /proc.
STOP_FILE = ".cnnlab-stop"


STOP_GRACE_SECONDS = 60  # then joblib kills the workers that have not stopped (so does a second signal)


def _loky_workers(in_a_job: bool = False) -> list[int]:
    """This process's joblib workers; with in_a_job, only those that handle SIGTERM (see stoppable):
    one that is still starting would die of it."""
    import signal

    if not Path("/proc").is_dir():  # not Linux: a signal stops the sweep as Ctrl-C always did
        return []
    workers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":\t" in line)
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # it ended meanwhile
            continue
        if int(status.get("PPid", -1)) != os.getpid() or b"popen_loky" not in command:
            continue
        if in_a_job and not int(status.get("SigCgt", "0"), 16) >> (signal.SIGTERM - 1) & 1:
            continue
        workers.append(int(pid))
    return workers


def _deaf_to_stop_signals() -> None:
    """Each joblib worker runs this as it starts: a terminal's Ctrl-C reaches every process, idle
    workers too."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stoppable(task, stop_file: Path):
    """Hydra's task function, made to stop with the sweep wherever the launcher runs it."""
    import signal

    parent = os.getpid()

    def job(cfg: DictConfig) -> Any:
        from hydra.core.hydra_config import HydraConfig

        if os.getpid() == parent:  # the basic launcher: SIGTERM, like SIGINT, stops the job as it stops a single run
            previous = {s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)
                        if signal.getsignal(s) != signal.SIG_IGN}
            try:
                return task(cfg)  # a stopped job raises KeyboardInterrupt, which ends the sweep
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
        if not str(HydraConfig.get().launcher.get("_target_")).endswith("JoblibLauncher"):
            return task(cfg)  # submitit's jobs keep submitit's own signal handling
        # A joblib worker: told to stop by the parent alone, once, with SIGTERM, which the trainer
        # turns into a stop with a checkpoint (and which raises KeyboardInterrupt before it starts).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            if stop_file.exists():
                return Status.MISSING  # not started: its folder has no metrics.json, and the summary says so
            return task(cfg)
        except KeyboardInterrupt:  # raised by run_job to end the sweep: here the parent ends it
            return Status.INTERRUPTED
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # idle, it must outlive a late SIGTERM

    return job


class SweepStop:
    """While a sweep runs: SIGINT or SIGTERM stops every job, each with a checkpoint, and starts no
    other (see STOP_FILE); a second signal stops at once."""

    def __init__(self, sweep_dir: Path):
        self.stop_file = sweep_dir.absolute() / STOP_FILE  # jobs may change directory (hydra.job.chdir)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SweepStop:
        import functools
        import signal

        self.stop_file.unlink(missing_ok=True)  # left by a stopped sweep that was then killed
        for signum in (signal.SIGINT, signal.SIGTERM):  # first: importing joblib takes a while
            if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):  # not if ignored
                self._previous[signum] = signal.signal(signum, self._request)
        try:
            from joblib import register_parallel_backend
            from joblib.parallel import LokyBackend
        except ImportError:  # no joblib launcher
            pass
        else:
            register_parallel_backend("loky", functools.partial(LokyBackend, initializer=_deaf_to_stop_signals))
        return self

    def _request(self, signum: int, frame) -> None:
        import signal

        if self.signum is not None:  # a second signal, or the grace period is over
            raise KeyboardInterrupt
        self.signum = signum
        self.stop_file.parent.mkdir(parents=True, exist_ok=True)
        self.stop_file.touch()
        if not _loky_workers():  # jobs in this process, or none started yet: as Ctrl-C always did
            raise KeyboardInterrupt
        for pid in _loky_workers(in_a_job=True):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        os.write(2, f"cnnlab: {signal.Signals(signum).name}: stopping the sweep; running jobs finish their step and "
                    f"write a checkpoint (a second signal stops at once)\n".encode())
        self._previous.setdefault(signal.SIGALRM, signal.signal(signal.SIGALRM, self._request))
        signal.alarm(STOP_GRACE_SECONDS)

    def __exit__(self, *exc) -> None:
        import signal

        signal.alarm(0)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self.stop_file.unlink(missing_ok=True)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """A single run: SIGTERM while Hydra starts (before the trainer's StopRequest takes over) ends the
    command like Ctrl-C, with a message and exit 130, not silently with 143."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequest:
    """SIGINT and SIGTERM ask the loop to stop after the current step, with a checkpoint. A second
    SIGINT stops at once. Handlers a launcher installed (submitit's, say) are left alone.

    at_step and during ask for a stop as a SIGTERM arriving then would: after that step, or while the
    run starts ("setup") or runs its final test ("test"). A stop at a known point, for tests."""

    POINTS = ("setup", "test")  # the parts of a run, besides its steps, where the loop calls reached()

    def __init__(self, at_step: int | None = None, during: str | None = None):
        assert during is None or during in self.POINTS, during
        self.signum: int | None = None
        self.at = {point for point in (at_step, during) if point is not None}
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
                    self._previous[signum] = signal.signal(signum, self._request)
        return self

    def reached(self, point: int | str) -> None:
        """The loop is at `point`: a step just taken, or one of POINTS."""
        if point in self.at and self.signum is None:
            self.signum = signal.SIGTERM

    def _request(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

"""How a run ended, and the exit status that says so: one enum for metrics.json, the sweep summary,
compare, inspect, TensorBoard's HParams status and the command's exit code. No torch here."""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """metrics.json's `status`. A str, so that JSON, YAML and comparisons with plain strings work."""

    RUNNING = "running"  # training, or killed (SIGKILL, power loss) before it could say otherwise
    COMPLETED = "completed"  # every epoch and the test split
    DIVERGED = "diverged"  # the loss, the gradients or the weights became non-finite
    FAILED = "failed"  # bad data, no device, a crash: the error is in metrics.json
    INTERRUPTED = "interrupted"  # stopped by SIGINT/SIGTERM; resumable when it has a checkpoint
    INVALID = "invalid"  # its config was rejected before training
    MISSING = "missing"  # a sweep's job that never started (only in summaries: it has no metrics.json)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def ended_badly(self) -> bool:
        """Summaries count these as not completed: they show what went wrong."""
        return self in (Status.FAILED, Status.DIVERGED, Status.INTERRUPTED, Status.MISSING, Status.RUNNING)


# The command's exit status for a run that ended so: 0 completed; 1 a run failed (bad data, no
# device, a crash) or a sweep job did not complete; 2 the command line or the config was rejected
# before training started; 3 the loss or the gradients became non-finite; 130 stopped by SIGINT or
# SIGTERM, with a checkpoint to resume from.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = {Status.COMPLETED: EXIT_OK, Status.INVALID: EXIT_USAGE, Status.DIVERGED: EXIT_DIVERGED,
              Status.INTERRUPTED: EXIT_INTERRUPTED}


def exit_code(status: Status | str) -> int:
    return EXIT_CODES.get(Status(status), EXIT_FAILED)

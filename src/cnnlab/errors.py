from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for (a setting, a path, a file): reported as one
    paragraph and a non-zero exit, never as a traceback."""


class MissingTool(UserError):
    """This machine lacks what the command needs (SLURM's sbatch, say): exit 1, not a usage error."""


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An exception as one line (of at most `limit` characters), for messages and metrics.json."""
    return " ".join(str(error).split())[:limit] or type(error).__name__

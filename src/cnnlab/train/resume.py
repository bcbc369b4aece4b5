"""Resuming a run, every decision in one place, in the order a resume meets them: whether a job
resumes (`resume=DIR`, or a job run again in its own folder), the resumed config and the settings
it may change (config.ROLES), then, as the trainer starts, whether run_dir's last checkpoint is
complete, was written by this run's settings, and holds weights that fit its model. Nothing in the
run's folder changes before all of that has passed. No torch at import: only load_resumable needs it.
"""

from __future__ import annotations

from pathlib import Path
from shlex import quote
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from cnnlab.config import resumable_settings, role, with_todays_defaults
from cnnlab.errors import UserError, one_line
from cnnlab.rundir import (best_checkpoint, last_checkpoint, previous_checkpoint, read_metrics_or_none,
                           read_run_metrics)
from cnnlab.status import Status

if TYPE_CHECKING:
    import torch

# A job whose folder says it ended so is not run again: its results stand, with or without a checkpoint.
ENDED = (Status.COMPLETED, Status.DIVERGED)
SHOWN_SETTINGS = 6  # the differing settings a refusal names before "and N more"


def prepare_job(cfg: DictConfig, run_dir: Path, task_overrides: list[str]) -> tuple[DictConfig, bool, Status | None]:
    """(the config to run, whether it resumes, the status when there is nothing to run): `resume=DIR`,
    or the same job run again in its own folder (a requeued cluster job, or a sweep rerun)."""
    if cfg.get("resume"):
        cfg = resumed_config(Path(cfg.resume), task_overrides)
        metrics = read_run_metrics(run_dir) or {}  # one that is not a run's is named
        if metrics.get("status") == Status.COMPLETED and metrics.get("epochs") == cfg.trainer.epochs:
            print(f"cnnlab: {run_dir} has completed its {cfg.trainer.epochs} epochs: nothing to do. "
                  f"Train it for longer with trainer.epochs=N.")
            return cfg, False, Status.COMPLETED
        return cfg, True, None
    status = (read_metrics_or_none(run_dir) or {}).get("status")
    if status in ENDED:
        print(f"cnnlab: {run_dir} already ended ({status}); its results are kept.")
        return cfg, False, Status(status)
    return cfg, last_checkpoint(run_dir).is_file(), None


def resumed_config(run_dir: Path, task_overrides: list[str]) -> DictConfig:
    """The composed config of the run in run_dir, with the command line's allowed overrides. Nothing
    is written here: the run's record of its config changes only once the resume has started."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # a third of a second: only to resume

    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"resume={str(run_dir)!r} is not a cnnlab run directory: {saved} is missing.")
    try:
        cfg = OmegaConf.load(saved)
        epochs, schedule = cfg.trainer.epochs, cfg.scheduler.name
    except Exception as error:  # malformed YAML, or not a cnnlab config at all
        raise UserError(f"resume: cannot read the run's config {saved}: {one_line(error, 200)}.") from None
    with_todays_defaults(cfg)  # settings newer than the run
    for override in OverridesParser.create().parse_overrides(list(task_overrides)):
        key = override.key_or_group
        if key == "resume":
            continue
        if not resumable(key):
            raise UserError(
                f"resume: {key} cannot change when a run is resumed (it would make it a different run). "
                f"Settings a resumed run may change: {', '.join(resumable_settings())}.")
        if key == "trainer.epochs" and schedule != "none":
            raise UserError(
                f"resume: trainer.epochs cannot change for a run with scheduler={schedule}: its "
                f"schedule was planned for {epochs} epochs.")
        OmegaConf.update(cfg, key, override.value())
    cfg.resume = None
    done = (read_metrics_or_none(run_dir) or {}).get("epochs")
    if isinstance(done, int) and isinstance(cfg.trainer.epochs, int) and cfg.trainer.epochs < done:
        raise UserError(f"resume: trainer.epochs={cfg.trainer.epochs} is fewer than the {done} epochs this run "
                        f"has already done; a run can be made longer, not shorter.")
    return cfg


def resumable(key: str) -> bool:
    """Whether a resumed run may change the setting `key` (config.ROLES says)."""
    return role(key).resumable


# --- as the trainer starts: the checkpoint ---------------------------------------------------------
def load_resumable(run_dir: Path, settings: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """run_dir's last.pt, refused unless it is intact (its checksums match), complete and was
    written by this run's settings (config.as_dict(run)). A corrupt one is refused naming the way back."""
    from cnnlab.train.checkpoint import CorruptCheckpoint, load_checkpoint  # torch

    path = last_checkpoint(run_dir)
    try:
        saved = load_checkpoint(path, map_location=device)
    except CorruptCheckpoint as error:
        raise UserError(f"{error} {way_back(run_dir)}") from None
    missing = missing_keys(saved)
    if missing:
        raise UserError(f"{path} is not a complete cnnlab checkpoint (no {', '.join(missing)}); it cannot be resumed.")
    differs = differing_settings(saved.get("config") or {}, settings)
    if differs:
        more = len(differs) - SHOWN_SETTINGS
        shown = ", ".join(differs[:SHOWN_SETTINGS]) + (f" and {more} more" if more > 0 else "")
        raise UserError(
            f"{path} was written by a different configuration ({shown} differ) and cannot be resumed as "
            f"this run; start a new run in another directory.")
    return saved


def missing_keys(saved: dict[str, Any]) -> list[str]:
    """What a resume needs that the checkpoint `saved` lacks (a best.pt holds only the weights)."""
    from cnnlab.train.checkpoint import LAST_KEYS

    return [key for key in LAST_KEYS if key not in saved]


def way_back(run_dir: Path) -> str:
    """What a user can do when run_dir's last.pt is corrupt: copy the intact checkpoint written before
    it over it and resume again (it is not used unasked: the run would lose steps), or, failing that,
    what best.pt can and cannot give."""
    last, previous, best = last_checkpoint(run_dir), previous_checkpoint(run_dir), best_checkpoint(run_dir)
    earlier = intact(previous)
    if earlier is not None and not missing_keys(earlier):
        return (f"{previous}, the checkpoint written before it (epoch {earlier['epoch']}, step {earlier['step']}), "
                f"is intact: to continue from there, copy it over the corrupt one "
                f"(cp {quote(str(previous))} {quote(str(last))}) and resume again; the steps after it are trained again.")
    weights = intact(best)
    no_earlier = f"No intact earlier checkpoint is kept ({previous} is missing or corrupt too)"
    if weights is None:
        return f"{no_earlier}, nor an intact {best}: the run cannot be resumed; train it again in a new folder."
    return (f"{no_earlier}. {best} (epoch {weights.get('epoch')}, val_acc {weights.get('val_acc')}) is intact, but "
            f"it holds only the model's weights, without the optimizer, schedule, random number generator and "
            f"data-order states a resume needs: it cannot continue this run; train it again in a new folder.")


def intact(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None when there is none or it cannot be read back."""
    from cnnlab.train.checkpoint import load_checkpoint

    try:
        return load_checkpoint(path) if path.is_file() else None
    except UserError:
        return None


def differing_settings(written_by: dict[str, Any], config: dict[str, Any], prefix: str = "") -> list[str]:
    """Every setting (dotted key) that shapes a run and differs between two configs; the settings
    a resume may change (resumable, `resume` itself included) do not count."""
    differs = []
    for key in sorted(set(written_by) | set(config), key=str):
        dotted = f"{prefix}{key}"
        if resumable(dotted):
            continue
        old, new = written_by.get(key), config.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differs += differing_settings(old, new, f"{dotted}.")
        elif old != new:
            differs.append(dotted)
    return differs


def check_fits(saved: dict[str, Any], expected: dict[str, Any], run_dir: Path) -> None:
    """Refuse a checkpoint whose weights do not fit this run's model (`expected`: its state_dict),
    before anything is restored."""
    weights = saved["model"]
    wrong = sorted(set(expected) ^ set(weights)) or [
        key for key in expected if tuple(weights[key].shape) != tuple(expected[key].shape)]
    if wrong:
        raise UserError(f"{last_checkpoint(run_dir)} holds a different model than this run's "
                        f"({', '.join(wrong[:4])} differ); it cannot be resumed as this run.")

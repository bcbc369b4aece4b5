"""One Hydra job: its config made ready (resumed or new, validated once), trained, and its result
shown (a single run's summary table and findings, a sweep job's one line), then how it ended: a
rejected config, a divergence, a stop, a failure, each with its message and status."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from cnnlab.cli.console import print_error
from cnnlab.cli.folders import threads_per_job
from cnnlab.cli.precheck import task_key
from cnnlab.config import RunConfig
from cnnlab.errors import UserError
from cnnlab.status import Status
from cnnlab.train.resume import prepare_job

if TYPE_CHECKING:
    from rich.console import Console

    from cnnlab.train.loop import RunResult


@dataclass
class Job:
    """What Hydra says about the job in progress."""

    run_dir: Path
    multirun: bool
    num: int
    task_overrides: list[str]
    override_dirname: str  # the swept overrides that name a sweep's job
    n_jobs: int | None  # jobs joblib runs at once, else None

    @property
    def name(self) -> str:
        """How error lines name a sweep's job (`#3 (activation=elu,trainer.seed=1)`); "" for a single run."""
        return f"#{self.num} ({','.join(self.task_overrides)})" if self.multirun else ""

    @property
    def label(self) -> str | None:
        """What starts each line a sweep's job prints (`job #3 (activation=elu)`): the jobs of a joblib
        sweep interleave. None for a single run."""
        if not self.multirun:
            return None
        return f"job #{self.num} ({self.override_dirname or ','.join(self.task_overrides)})"


def this_job() -> Job:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode.name == "MULTIRUN"
    n_jobs = (hydra_cfg.get("launcher") or {}).get("n_jobs")
    return Job(run_dir=Path(hydra_cfg.runtime.output_dir), multirun=multirun,
               num=hydra_cfg.job.num if multirun else 0,  # a single run has none
               task_overrides=OmegaConf.to_container(hydra_cfg.overrides.task),  # as typed: ${oc.env:X} unresolved
               override_dirname=hydra_cfg.job.override_dirname if multirun else "",
               n_jobs=n_jobs if isinstance(n_jobs, int) else None)


def run_job(cfg: DictConfig, validated: dict[str, RunConfig] | None = None, record_subdir: str | None = None) -> Status:
    """One Hydra job: make its config ready, then train; returns the job's status. A user mistake is
    reported, not raised; in a sweep, so is any other failure, so that the remaining jobs still run.
    `validated`: configs the check before Hydra has validated, by precheck.task_key(). `record_subdir`:
    where in the run folder to write the record of its config that Hydra was told not to write
    (folders.record_config_after_lock); a resume=DIR keeps the record it has."""
    import traceback

    job = this_job()
    record = config_record(cfg, record_subdir) if record_subdir and not cfg.get("resume") else None
    ready = ready_config(cfg, job, validated if validated is not None else {}, record)
    if isinstance(ready, Status):
        return ready
    run, resume = ready
    try:
        return train_and_tell(run, job, resume, record)
    except Exception as error:
        if not job.multirun:
            raise
        # One job's crash must not end the sweep: one line now, the traceback in the job's folder.
        (job.run_dir / "traceback.txt").write_text(traceback.format_exc())
        print_error(f"{type(error).__name__}: {error} (traceback in {job.run_dir / 'traceback.txt'})", job.name)
        return Status.FAILED


def config_record(cfg: DictConfig, subdir: str) -> dict[str, str]:
    """The files Hydra writes into a job's folder as it starts (`.hydra/config.yaml`, `hydra.yaml`,
    `overrides.yaml`: path in the folder -> text), for the job to write once the folder is its own."""
    from hydra.core.hydra_config import HydraConfig

    hydra_node = OmegaConf.to_container(HydraConfig.instance().cfg, resolve=False)
    hydra_node["hydra"]["output_subdir"] = subdir  # where the record is, as if Hydra had written it
    return {f"{subdir}/config.yaml": OmegaConf.to_yaml(cfg),
            f"{subdir}/hydra.yaml": OmegaConf.to_yaml(OmegaConf.create(hydra_node)),
            f"{subdir}/overrides.yaml": OmegaConf.to_yaml(HydraConfig.get().overrides.task)}


def ready_config(cfg: DictConfig, job: Job, validated: dict[str, RunConfig],
                 record: dict[str, str] | None = None) -> tuple[RunConfig, bool] | Status:
    """(the run's typed config, whether it resumes), or the job's status when there is nothing to
    run: it has ended already, or its config is rejected (recorded as `invalid`, with the record of
    its config, in a folder that holds no run). A config the check before Hydra validated is not
    validated again."""
    from cnnlab.config import validate
    from cnnlab.rundir import CHECKPOINT_DIR, write_metrics, write_record

    resume = False
    try:
        cfg, resume, ended = prepare_job(cfg, job.run_dir, job.task_overrides)
        if ended is not None:
            return Status(ended)
        run = validated.pop(task_key(cfg), None) or validate(cfg)
    except UserError as error:
        print_error(str(error), job.name)
        if not resume and not (job.run_dir / CHECKPOINT_DIR).exists():
            write_metrics(job.run_dir, {"status": Status.INVALID, "error": str(error)})
            write_record(job.run_dir, record or {})
        return Status.INVALID
    if run.trainer.threads is None and job.n_jobs is not None:
        run.trainer.threads = threads_per_job(job.n_jobs, os.cpu_count() or 1)
    return run, resume


def train_and_tell(run: RunConfig, job: Job, resume: bool, record: dict[str, str] | None = None) -> Status:
    """Train (torch: only once the config is known to be good), show the result, and tell the error
    that ended the run if one did. Parallel jobs share the terminal: plain lines, never a live bar."""
    from cnnlab.cli.console import TrainingProgress, console, job_line
    from cnnlab.rundir import read_metrics_or_none
    from cnnlab.train.loop import train

    output = console(live=job.n_jobs is None)
    try:
        result = train(run, job.run_dir, resume=resume, record=record,
                       progress=TrainingProgress(run.trainer.epochs, output, job.label))
    except BaseException:  # a crash (metrics.json says failed), a second Ctrl-C: a sweep's job still ends with its line
        if job.label is not None:
            say(output, job_line(job.label, read_metrics_or_none(job.run_dir) or {}, str(job.run_dir)))
        raise
    show_result(output, result, job, findings=run.findings.enabled)
    return result.status if result.error is None else tell_error(result.error, job)


def show_result(output: Console, result: RunResult, job: Job, findings: bool) -> None:
    """A single run ends with its summary table and findings (a failed run: its findings, before the
    error message); a sweep's job with one line, whatever its outcome (the jobs of a joblib sweep
    interleave, and the sweep's summary follows)."""
    from cnnlab.cli.console import findings_view, job_line, summary_table

    view = findings_view(result.findings, result.findings_error) if findings and result.description else None
    if job.label is not None:
        say(output, job_line(job.label, result.metrics, str(job.run_dir)))
    elif result.error is None:
        output.print(summary_table(result.metrics, str(job.run_dir)))
    if job.label is None and view is not None:
        output.print(view)
        if any(finding.severity == "warning" and finding.remedies for finding in result.findings):
            say(output, f"To try their remedies and see which one cures the run: cnnlab remedy {shlex.quote(str(job.run_dir))}")


def say(output: Console, line: str) -> None:
    output.print(line, highlight=False, markup=False, soft_wrap=True)


def tell_error(error: BaseException, job: Job) -> Status:
    """The message and status of a run that diverged, was stopped, or failed for bad data or a device
    (metrics.json says so already). A stopped sweep job stops the sweep (KeyboardInterrupt)."""
    from cnnlab.rundir import CHECKPOINT_DIR, last_checkpoint
    from cnnlab.train.loop import Diverged, Interrupted

    checkpoint = last_checkpoint(job.run_dir).is_file()
    if isinstance(error, Diverged):
        kept = (f"The last good checkpoint is kept in {job.run_dir / CHECKPOINT_DIR}" if checkpoint
                else "It diverged before its first checkpoint")
        print_error(f"{error}. {kept}; try a lower optimizer.lr, trainer.grad_clip, or trainer.on_nonfinite=skip.",
                    job.name)
        return Status.DIVERGED
    if not isinstance(error, Interrupted):
        print_error(str(error), job.name)
        return Status.FAILED
    if job.multirun:
        again = "with a checkpoint" if checkpoint else "before its first checkpoint"
        print_error(f"{error}, {again}; run the same sweep command again to finish it.", job.name, "stopped")
        raise KeyboardInterrupt from None  # stopping one job stops the sweep
    if checkpoint:
        print_error(f"{error}, with a checkpoint; continue with: cnnlab train resume={job.run_dir}")
    else:
        print_error(f"{error}, before its first checkpoint: there is nothing to resume; run it again.")
    return Status.INTERRUPTED

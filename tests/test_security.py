"""The threat model: config files, experiment files and `--config-dir` folders may come from someone
else; they choose among what cnnlab offers and nothing else. Each attack is refused before Hydra
runs (exit 2, one message naming the setting and the file), and its victim is left as it was."""

import os
import pickle
from pathlib import Path

import pytest

from cnnlab.cli.precheck import check_config_before_hydra
from cnnlab.errors import UserError
from cnnlab.train.checkpoint import load_checkpoint
from tests.helpers import TINY

SINGLE, SWEEP = ([], ["hydra.run.dir=run"]), (["-m"], ["activation=relu,elu", "hydra.sweep.dir=sweep"])


def shared_experiment(tmp_path: Path, text: str) -> list[str]:
    """A shared experiment file, mine/experiment/shared.yaml: the arguments that use it."""
    (tmp_path / "mine" / "experiment").mkdir(parents=True, exist_ok=True)
    (tmp_path / "mine" / "experiment" / "shared.yaml").write_text("# @package _global_\n" + text)
    return ["--config-dir", "mine", "experiment=shared"]


def nothing_made(tmp_path: Path) -> bool:
    return not any((tmp_path / name).exists() for name in ("run", "sweep", "outputs"))


@pytest.mark.parametrize("mode", [SINGLE, SWEEP], ids=["run", "sweep"])
@pytest.mark.parametrize("mode_of_file", ["a", "w"])
def test_a_file_may_not_set_hydras_logging_so_no_log_goes_into_a_users_file(run_cli, tmp_path, mode, mode_of_file):
    victim = tmp_path / ".bashrc"
    victim.write_text("export KEEP=1\n")
    uses = shared_experiment(tmp_path, f"""
hydra:
  job_logging:
    formatters:
      simple: {{format: "touch {tmp_path}/marker; %(message)s"}}
    handlers:
      file: {{class: logging.FileHandler, filename: {victim}, mode: {mode_of_file}}}
""")
    flags, where = mode
    code, _, err = run_cli("train", *flags, *uses, *TINY, *where)
    assert code == 2 and "hydra.job_logging." in err and "experiment/shared.yaml" in err, err
    assert "may set in hydra only hydra.run.dir" in err
    assert victim.read_text() == "export KEEP=1\n" and not (tmp_path / "marker").exists() and nothing_made(tmp_path)


@pytest.mark.parametrize("setting", ["setup: ['touch MARKER']", "name: \"x\\n#SBATCH --wrap='touch MARKER'\"",
                                     "additional_parameters: {mail-user: 'x\\n#!/bin/sh\\ntouch MARKER'}",
                                     "submitit_folder: /tmp/elsewhere/%j"])
def test_a_file_may_not_give_the_launcher_commands_or_paths(run_cli, tmp_path, setting):
    key = setting.partition(":")[0]
    uses = shared_experiment(tmp_path, f"""
defaults:
  - override /hydra/launcher: submitit_slurm
hydra:
  launcher:
    {setting.replace("MARKER", str(tmp_path / "marker"))}
""")
    code, _, err = run_cli("train", "-m", *uses, *TINY, "activation=relu,elu", "hydra.sweep.dir=sweep")
    assert code == 2 and f"hydra.launcher.{key}" in err and "experiment/shared.yaml" in err, err
    assert nothing_made(tmp_path)


def test_a_file_may_choose_a_launcher_and_its_resources_but_not_a_launcher_of_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sbatch").write_text("#!/bin/sh\n")  # SLURM's, which the check looks for
    (tmp_path / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    uses = shared_experiment(tmp_path, """
defaults:
  - override /hydra/launcher: submitit_slurm
hydra:
  sweeper:
    params:
      activation: relu,elu
  launcher: {partition: gpu, gpus_per_node: 1, cpus_per_task: 8, mem_gb: 32, timeout_min: 120, constraint: a100}
  sweep: {dir: "outputs/shared/${now:%Y-%m-%d}"}
""")
    check_config_before_hydra(["-m", *uses, *TINY])
    (tmp_path / "mine" / "hydra" / "launcher").mkdir(parents=True)
    (tmp_path / "mine" / "hydra" / "launcher" / "mine.yaml").write_text("setup: ['touch marker']\n")
    with pytest.raises(UserError, match="hydra/launcher=mine: Hydra's groups .* take Hydra's own options only"):
        check_config_before_hydra(["-m", "--config-dir", "mine", "hydra/launcher=mine", *TINY, "activation=relu,elu"])


@pytest.mark.parametrize("text, message", [
    ("launcher:\n    partition: \"gpu\\n#SBATCH --wrap='touch marker'\"",
     "hydra.launcher.partition=.* must be a number or a word without spaces"),
    ("sweeper:\n    params:\n      hydra.launcher.setup: '[touch marker]'",
     "hydra.sweeper.params=.* must be settings to sweep, none of them under hydra"),
    ("job:\n    name: ../../.bashrc", "hydra.job.name=.* must be a plain name"),
])
def test_what_a_file_may_set_in_hydra_must_be_plain(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    uses = shared_experiment(tmp_path, f"hydra:\n  {text}\n")
    with pytest.raises(UserError, match=message):
        check_config_before_hydra(["-m", *uses[:2], "hydra/launcher=submitit_slurm", *uses[2:], *TINY])


@pytest.mark.parametrize("mode", [SINGLE, SWEEP], ids=["run", "sweep"])
def test_a_file_may_not_add_overrides_that_hydra_would_apply_to_every_job(run_cli, tmp_path, mode):
    victim = tmp_path / ".bashrc"
    victim.write_text("export KEEP=1\n")
    uses = shared_experiment(tmp_path, f"hydra:\n  overrides:\n    hydra: ['hydra.job_logging.handlers.file.filename={victim}']\n")
    flags, where = mode
    code, _, err = run_cli("train", *flags, *uses, *TINY, *where)
    assert code == 2 and "hydra.overrides=" in err and "overrides come only from the command line" in err, err
    assert victim.read_text() == "export KEEP=1\n" and nothing_made(tmp_path)


def test_a_pickle_to_rerun_is_refused_before_it_is_read(run_cli, tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "marker",))

    (tmp_path / "config.pickle").write_bytes(pickle.dumps(Payload()))
    code, _, err = run_cli("train", "--experimental-rerun", "config.pickle")
    assert code == 2 and "--experimental-rerun config.pickle is refused" in err, err
    assert not (tmp_path / "marker").exists()


def a_finished_run(folder: Path) -> dict[Path, bytes]:
    """A folder that looks like a user's finished run: what its files hold."""
    (folder / "checkpoints").mkdir(parents=True)
    files = {folder / "metrics.json": b'{"status": "completed"}', folder / "checkpoints" / "last.pt": b"weights",
             folder / "config.yaml": b"mine: 1\n"}
    for path, content in files.items():
        path.write_bytes(content)
    return files


@pytest.mark.parametrize("subdir", ["ABS", "../escaped", "jobs/../../escaped", "${hydra:runtime.cwd}"])
def test_a_sweep_job_stays_inside_the_sweep_folder(run_cli, tmp_path, subdir):
    victim = tmp_path / "escaped"
    files = a_finished_run(victim)
    subdir = subdir.replace("ABS", str(victim))
    uses = shared_experiment(tmp_path, f"hydra:\n  sweep:\n    subdir: {subdir}\n")
    code, _, err = run_cli("train", "-m", *uses, *TINY, "activation=relu,elu", "hydra.sweep.dir=sweep")
    assert code == 2 and "hydra.sweep.subdir=" in err and "must be a relative path inside the sweep folder" in err, err
    code, _, err = run_cli("train", "-m", *TINY, "activation=relu,elu", "hydra.sweep.dir=sweep",
                           f"hydra.sweep.subdir={subdir}")
    assert code == 2 and "must be a relative path inside the sweep folder" in err, err
    assert all(path.read_bytes() == content for path, content in files.items()) and nothing_made(tmp_path)


def test_a_job_folder_named_by_a_files_swept_path_stays_inside_the_sweep_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uses = shared_experiment(tmp_path, """
hydra:
  sweeper:
    params:
      dataset.root: data,a/../../../../escaped
  sweep:
    subdir: ${hydra.job.override_dirname}
""")
    with pytest.raises(UserError, match=r"hydra.sweep.subdir=.*\(in the sweep's job with dataset.root=a/\.\./"):
        check_config_before_hydra(["-m", *uses, "dataset=mnist"])


def test_a_runs_record_of_its_config_stays_inside_the_run(run_cli, tmp_path):
    victim = tmp_path / "mine_run"
    files = a_finished_run(victim)
    uses = shared_experiment(tmp_path, f"hydra:\n  output_subdir: {victim}\n")
    code, _, err = run_cli("train", *uses, *TINY, "hydra.run.dir=run")
    assert code == 2 and "hydra.output_subdir=" in err and "experiment/shared.yaml" in err, err
    uses = shared_experiment(tmp_path, "hydra:\n  output_subdir: meta\n")  # relative, but a file may not move it
    code, _, err = run_cli("train", *uses, *TINY, "hydra.run.dir=run")
    assert code == 2 and "hydra.output_subdir='meta'" in err, err
    code, _, err = run_cli("train", *TINY, "hydra.run.dir=run", f"hydra.output_subdir={victim}")
    assert code == 2 and "hydra.output_subdir must be a relative folder inside the run folder" in err, err
    assert all(path.read_bytes() == content for path, content in files.items()) and nothing_made(tmp_path)


def test_a_file_may_not_put_runs_outside_the_outputs_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("/tmp/elsewhere", "outputs/../../elsewhere", "~/runs"):
        uses = shared_experiment(tmp_path, f"hydra:\n  run:\n    dir: {folder}\n")
        with pytest.raises(UserError, match="hydra.run.dir=.* must be a folder under outputs/"):
            check_config_before_hydra([*uses, *TINY])


def test_the_command_line_keeps_its_choice_of_hydras_settings(tmp_path, monkeypatch):
    (tmp_path / "sbatch").write_text("#!/bin/sh\n")  # SLURM's, which the check looks for
    (tmp_path / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    for override in ("hydra/job_logging=disabled", "hydra.job_logging.handlers.file.filename=train.log",
                     "hydra.output_subdir=meta", "hydra.output_subdir=null", "hydra.run.dir=/tmp/anywhere"):
        check_config_before_hydra([*TINY, override])
    check_config_before_hydra(["-m", "hydra/launcher=submitit_slurm", "hydra.launcher.setup=[module load cuda]",
                               *TINY, "activation=relu,elu", "hydra.sweep.subdir=seed_${hydra.job.num}"])


def test_a_secret_from_the_environment_is_never_shown(run_cli, monkeypatch):
    monkeypatch.setenv("CNNLAB_SECRET", "hunter2-sesame")
    for override in ("trainer.device=${oc.env:CNNLAB_SECRET}", "trainer.epochs=${oc.env:CNNLAB_SECRET}",
                     "model.hidden=[${oc.env:CNNLAB_SECRET}]"):
        for flags, where in (SINGLE, SWEEP):
            code, out, err = run_cli("train", *flags, *TINY, override, *where)
            assert code == 2 and "${oc.env:CNNLAB_SECRET}" in err and "hunter2" not in out + err, err


def test_a_checkpoint_keeps_a_setting_from_the_environment_as_written(run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("CNNLAB_DEVICE", "cpu")
    code, _, err = run_cli("train", *TINY, "trainer.device=${oc.env:CNNLAB_DEVICE}", "hydra.run.dir=run")
    assert code == 0, err
    for name in ("last.pt", "best.pt"):
        saved = load_checkpoint(tmp_path / "run" / "checkpoints" / name, map_location="cpu")
        assert saved["config"]["trainer"]["device"] == "${oc.env:CNNLAB_DEVICE}"
    code, _, err = run_cli("train", "resume=run", "trainer.epochs=2")  # the same expression: the same run
    assert code == 0, err

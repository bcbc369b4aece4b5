"""The command line end to end, as a user runs it: in subprocesses where the process itself is under test
(the console script, what a command imports, an address-space limit), else in this process (run_cli)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnnlab.cli.folders import JOB_DIR_BYTES, check_writable, expand_home, job_dir, name_jobs_by_swept_overrides
from cnnlab.cli.precheck import check_config_before_hydra
from cnnlab.config import config_dir
from cnnlab.train.checkpoint import load_checkpoint
from tests.helpers import TINY, TINY_MLP, TINY_TRAINER, read_scalars, write_image_folder, write_mnist


def cnnlab(*args: str, cwd: Path, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}  # keep errors short
    return subprocess.run([sys.executable, *flags, "-m", "cnnlab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def imported_torch(result: subprocess.CompletedProcess) -> bool:
    """With -X importtime every imported module is listed on stderr as '... | name'."""
    return any(line.rstrip().endswith("| torch") for line in result.stderr.splitlines())


def test_console_script_help_lists_the_commands(tmp_path):
    script = Path(sys.executable).parent / "cnnlab"
    result = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "train" in result.stdout and "usage: cnnlab COMMAND" in result.stdout
    assert cnnlab(cwd=tmp_path).returncode == 2
    unknown = cnnlab("trian", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown command 'trian'" in unknown.stderr and "train" in unknown.stderr


def test_train_help_lists_every_group_fast_and_without_torch(tmp_path):
    result = cnnlab("train", "--help", cwd=tmp_path, importtime=True)
    assert result.returncode == 0
    for text in ("cnnlab train", "activation: celu, elu, gelu", "dataset: cifar10, fake, fashion_mnist, imagefolder, mnist",
                 "model: convnet, mlp", "optimizer: adam, adamw, rmsprop, sgd", "scheduler: cosine, none, onecycle, step",
                 "log_every"):
        assert text in result.stdout, text
    assert not imported_torch(result)


def test_cfg_job_prints_the_composed_config_without_torch(tmp_path):
    result = cnnlab("train", "model=convnet", "activation=elu", "--cfg", "job", cwd=tmp_path, importtime=True)
    assert result.returncode == 0
    assert "name: convnet" in result.stdout and "alpha: 1.0" in result.stdout and "epochs: 5" in result.stdout
    assert not imported_torch(result)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("activation=swish", ["activation/swish", "leaky_relu", "selu"]),
        ("model=resnet", ["model/resnet", "convnet", "mlp"]),
        ("trainer.epoch=3", ["trainer.epoch"]),
        ("+trainer.epoch=3", ["trainer.epoch", "epochs", "batch_size"]),
        ("optimizer.lr=abc", ["optimizer.lr", "abc"]),
        ("optimizer.lr=0", ["optimizer.lr", "> 0"]),
        ("trainer.epochs=0", ["trainer.epochs", "at least 1"]),
        ("dataset.val_fraction=1.5", ["dataset.val_fraction"]),
        ("model.dropout=1", ["model.dropout", "[0, 1)"]),
        ("trainer.device=gpu", ["trainer.device", "auto, cpu, cuda, cuda:N"]),
        ("model.hidden.x=1", ["model.hidden.x=1", "A list is set whole"]),
    ],
)
def test_a_bad_override_is_one_clear_error_exit_2_and_no_traceback(tmp_path, override, expected):
    result = cnnlab("train", override, cwd=tmp_path, importtime=True)
    assert result.returncode == 2
    message = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    for text in expected:
        assert text in message, (text, message)
    assert "Traceback" not in message
    assert not imported_torch(result)  # answered before the heavy imports


def test_train_end_to_end_writes_a_complete_run_directory(tmp_path):
    result = cnnlab("train", *TINY, "trainer.epochs=2", "trainer.log_every=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "outputs").glob("*/*")  # outputs/DATE/TIME: the default layout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2 and metrics["steps"] == 2 * (270 // 32)
    for key in ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "seconds", "device", "parameters"):
        assert metrics[key] is not None, key
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert "trainer.epochs=2" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    scalars = read_scalars(run_dir)
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "test/acc", "lr", "grad_norm/total"} <= set(scalars)
    assert scalars["dead_fraction/all"][0][0] == 0  # probes are on by default, from step 0
    assert set(metrics["dead_fraction"]) == {"act01_fc", "all"}
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == metrics["steps"]
    assert "epoch 2/2" in result.stdout and "cnnlab run: completed" in result.stdout


def test_multirun_names_jobs_by_the_overrides_that_differ(run_cli, tmp_path):
    write_mnist(tmp_path / "my data", train=60, test=20)
    shared = [f"dataset.root={tmp_path / 'my data'}", "dataset.download=false", *TINY_MLP, *TINY_TRAINER]
    code, _, err = run_cli("train", "-m", "activation=relu,elu", *shared, "hydra.sweep.dir=sweep")
    assert code == 0, err
    jobs = sorted(path.name for path in (tmp_path / "sweep").iterdir() if path.is_dir())
    assert jobs == ["activation=elu", "activation=relu"]  # no shared override, no nested folders
    for job in jobs:
        assert json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["status"] == "completed"
        assert "val/acc" in read_scalars(tmp_path / "sweep" / job)
    assert (tmp_path / "sweep" / "multirun.yaml").is_file()


def test_a_sweep_with_a_bad_job_runs_the_others_and_exits_non_zero(run_cli, tmp_path):
    code, _, err = run_cli("train", "-m", "optimizer.lr=0,0.01", *TINY, "hydra.sweep.dir=sweep")
    assert code == 2
    assert "optimizer.lr" in err  # and no traceback (run_cli)
    status = {job: json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["status"]
              for job in ("optimizer.lr=0", "optimizer.lr=0.01")}
    assert status == {"optimizer.lr=0": "invalid", "optimizer.lr=0.01": "completed"}


def test_config_dir_adds_a_users_own_options(tmp_path):
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "wide_mlp.yaml").write_text(
        "name: mlp\nhidden: [1024, 1024]\nbatchnorm: true\ndropout: 0.1\ninit: kaiming\n")
    result = cnnlab("train", "--config-dir", "mine", "model=wide_mlp", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "- 1024" in result.stdout and "init: kaiming" in result.stdout


# A shared experiment file (`--config-dir mine experiment=shared`) that would run code through
# Hydra before any job starts: the code would delete `victim` or create `marker`.
CODE_IN_CONFIGS = {
    "callback": ("hydra.callbacks.x", """
hydra:
  callbacks:
    x: {_target_: pathlib.Path.unlink, self: VICTIM}
"""),
    "logging_factory": ("hydra.job_logging.formatters.x.()", """
hydra:
  job_logging:
    formatters:
      x: {"()": pathlib.Path.touch, self: MARKER}
"""),
    "logging_class": ("hydra.hydra_logging.handlers.x.class", """
hydra:
  hydra_logging:
    handlers:
      x: {class: pathlib.Path.touch, self: MARKER}
"""),
    "launcher": ("hydra.launcher._target_", """
hydra:
  launcher:
    _target_: pathlib.Path.touch
"""),
    "interpolated_factory": ("hydra.job_logging.formatters.x.()", """
hydra:
  job_logging:
    formatters:
      x: "${oc.create:'{\\"()\\": pathlib.Path.touch, self: MARKER}'}"
"""),
}


@pytest.mark.parametrize("case", sorted(CODE_IN_CONFIGS))
@pytest.mark.parametrize("multirun", [False, True])
def test_a_config_that_would_run_code_is_refused_before_anything_runs(run_cli, tmp_path, case, multirun):
    key, text = CODE_IN_CONFIGS[case]
    victim, marker = tmp_path / "victim", tmp_path / "marker"
    victim.write_text("keep me")
    (tmp_path / "mine" / "experiment").mkdir(parents=True)
    (tmp_path / "mine" / "experiment" / "shared.yaml").write_text(
        "# @package _global_" + text.replace("VICTIM", str(victim)).replace("MARKER", str(marker)))
    mode, where = (["-m"], ["activation=relu,elu", "hydra.sweep.dir=sweep"]) if multirun else ([], ["hydra.run.dir=run"])
    code, _, err = run_cli("train", *mode, "--config-dir", "mine", "experiment=shared", *TINY, *where)
    assert code == 2 and key in err and "nothing has run" in err, err
    assert victim.read_text() == "keep me" and not marker.exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_code_in_any_job_of_a_sweep_or_in_an_override_is_refused(run_cli, tmp_path):
    (tmp_path / "mine" / "activation").mkdir(parents=True)
    (tmp_path / "mine" / "activation" / "custom.yaml").write_text("name: relu\n_target_: pathlib.Path.touch\n")
    code, _, err = run_cli("train", "-m", "--config-dir", "mine", "activation=relu,elu,custom", *TINY,
                           "hydra.sweep.dir=sweep")
    assert code == 2 and "activation._target_" in err and "activation=custom" in err
    assert not (tmp_path / "sweep").exists()  # not even the first job ran
    code, _, err = run_cli("train", "+hydra.callbacks.x._target_=pathlib.Path.touch", *TINY)
    assert code == 2 and "hydra.callbacks.x._target_" in err
    code, _, err = run_cli("train", "-m", "+extra={a:1},{_target_:pathlib.Path.touch}", *TINY, "hydra.sweep.dir=sweep")
    assert code == 2 and "extra._target_" in err and not (tmp_path / "sweep").exists()


def test_the_slurm_launcher_without_sbatch_is_one_message_before_anything_starts(run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    code, _, err = run_cli("train", "-m", *TINY, "hydra/launcher=submitit_slurm", "trainer.seed=0,1")
    assert code == 1 and "SLURM's sbatch, which is not on PATH" in err and "hydra/launcher=basic" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "submitit_slurm"])
def test_hydras_own_launchers_pass_the_check(launcher, monkeypatch, tmp_path):
    (tmp_path / "sbatch").write_text("#!/bin/sh\n")  # SLURM's, which the check looks for
    (tmp_path / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    check_config_before_hydra(["-m", f"hydra/launcher={launcher}", "activation=relu,elu"])


def test_a_sweep_of_a_thousand_seeds_is_checked_in_a_few_compositions_and_says_so(capsys):
    started = time.monotonic()
    check_config_before_hydra(["-m", "trainer.seed=range(1,1001)", "activation=relu,elu", "optimizer.lr=0.1,0.01,1"])
    err = capsys.readouterr().err
    # the first job, activation=elu, and lr=1 (an integer where the others are decimals): not 12,000 jobs
    assert "checking the sweep's 6000 jobs before any starts: composing 3 " in err, err
    assert time.monotonic() - started < 60  # it took 437 s when every seed was composed


@pytest.mark.parametrize("args, message", [
    (["~trainer.epochs", "trainer.epochs=2"], "~trainer.epochs: trainer.epochs cannot be deleted; every run needs it."),
    (["-m", "~model", "trainer.seed=0,1"], "~model: model cannot be deleted"),
    (["~trainer.epoch"], "~trainer.epoch: Unknown setting trainer.epoch. Valid settings of trainer: epochs,"),
])
def test_deleting_a_setting_says_it_cannot_be_deleted_or_that_it_does_not_exist(run_cli, tmp_path, args, message):
    code, _, err = run_cli("train", *args)
    assert code == 2 and message in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    ([*TINY, "dataset.val_fraction=1e-320"], ("of 300 training images it would hold out 0 for validation; choose a "
                                              "fraction in [0.00333, 0.996667]")),
    (["dataset=cifar10", "dataset.val_fraction=0.99999"], "of 50000 training images it would hold out 50000"),
])
def test_a_val_fraction_that_leaves_a_side_empty_is_refused_naming_the_range_before_a_folder(run_cli, tmp_path,
                                                                                            args, message):
    code, _, err = run_cli("train", *args)
    assert code == 2 and "dataset.val_fraction" in err and message in err, err
    assert not list(tmp_path.iterdir())


def test_every_named_experiment_passes_the_check():
    for experiment in sorted(path.stem for path in (config_dir() / "experiment").glob("*.yaml")):
        check_config_before_hydra(["-m", f"experiment={experiment}", "trainer.seed=0,1"])


def test_a_config_file_that_is_not_valid_yaml_is_named(run_cli, tmp_path):
    (tmp_path / "mine" / "experiment").mkdir(parents=True)
    broken = tmp_path / "mine" / "experiment" / "broken.yaml"
    broken.write_text("# @package _global_\ntrainer:\n  epochs: [1, 2\n")
    for mode, where in (["--cfg", "job"], []), ([], ["hydra.run.dir=run"]), (["-m"], ["trainer.seed=0,1"]):
        code, _, err = run_cli("train", *mode, "--config-dir", "mine", "experiment=broken", *where)
        assert code == 2 and f"{broken} is not valid YAML" in err and "line 4" in err, err


def test_a_sweep_that_lists_a_value_twice_is_refused(run_cli, tmp_path):
    code, _, err = run_cli("train", "-m", "trainer.seed=0,0", *TINY, "hydra.sweep.dir=sweep")
    assert code == 2 and "trainer.seed=0,0 lists 0 more than once" in err
    code, _, err = run_cli("train", "-m", "activation=relu,elu", *TINY, "hydra.sweep.dir=sweep",
                           "hydra.job.config.override_dirname.exclude_keys=[activation]")
    assert code == 2 and "activation" in err and "share folders" in err
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_over_paths_gets_one_flat_folder_per_job(run_cli, tmp_path):
    for name in ("a", "b"):
        write_image_folder(tmp_path / "data" / name, per_class=6, size=8)
    paths = [str(tmp_path / "data" / name) for name in ("a", "b")]  # values with slashes
    code, _, err = run_cli("train", "-m", "dataset=imagefolder", f"dataset.path={','.join(paths)}",
                           "dataset.image_size=8", *TINY_MLP, *TINY_TRAINER, "trainer.batch_size=4",
                           "probes.batch_size=4", "hydra.sweep.dir=sweep")
    assert code == 0, err
    jobs = sorted(path for path in (tmp_path / "sweep").iterdir() if path.is_dir())
    assert len(jobs) == 2 and all(job.name.startswith("dataset.path=") for job in jobs)
    assert all(json.loads((job / "metrics.json").read_text())["status"] == "completed" for job in jobs)
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert sorted(row["name"] for row in summary["runs"]) == ["dataset.path=…/a", "dataset.path=…/b"]  # where they differ
    assert sorted(row["dataset.path"] for row in summary["runs"]) == paths  # in full in their column


def test_job_folder_names_are_single_safe_bounded_and_unique():
    assert job_dir("activation=elu,trainer.seed=1", 3) == "activation=elu,trainer.seed=1"  # unchanged
    assert job_dir("", 3) == "job3"
    names = ["dataset.path=/a/b", "dataset.path=/a_b", "dataset.path=_a_b", ".hidden=1", "x=" + "é" * 200,
             "x=" + "é" * 199 + "e", "x=line\nbreak", "x=" + "a" * 300, "x=" + "a" * 299]
    folders = [job_dir(name, 0) for name in names]
    assert len(set(folders)) == len(names)
    for folder in folders:
        assert "/" not in folder and "\n" not in folder and not folder.startswith(".")
        assert len(folder.encode()) <= JOB_DIR_BYTES
    assert folders[0].startswith("dataset.path=_a_b-") and folders[2] == "dataset.path=_a_b"


def test_shared_overrides_are_left_out_of_job_names_whatever_their_prefix():
    args = name_jobs_by_swept_overrides(["-m", "activation=relu,elu", "+preset=selu_lecun", "dataset.root=/d"])
    assert args[-1] == "hydra.job.config.override_dirname.exclude_keys=['preset','dataset.root']"


# --- overrides Hydra cannot read, settings that do not exist, `~`, and rejected runs that leave nothing --
def test_a_value_starting_with_tilde_is_expanded_in_every_override_and_item(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = expand_home(["-m", "dataset.path=~/a,~/b", "model.hidden=[1]", "x=[~/c, ~]", "resume=~/run",
                            "y='~/quoted'", "z=a~/b", "~trainer.grad_clip", "--config-dir", "w=~/dir"])
    assert args == ["-m", f"dataset.path={tmp_path}/a,{tmp_path}/b", "model.hidden=[1]", f"x=[{tmp_path}/c, {tmp_path}]",
                    f"resume={tmp_path}/run", "y='~/quoted'", "z=a~/b", "~trainer.grad_clip", "--config-dir", "w=~/dir"]


def test_the_readme_quickstart_with_a_home_path_reaches_the_config(run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_image_folder(tmp_path / "pictures" / "pets", per_class=2, size=8)
    code, out, err = run_cli("train", "dataset=imagefolder", "dataset.path=~/pictures/pets", "dataset.image_size=64",
                             "model=convnet", "--cfg", "job")
    assert code == 0 and f"path: {tmp_path}/pictures/pets" in out, err
    code, _, err = run_cli("train", "resume=~/nowhere")
    assert code == 2 and str(tmp_path / "nowhere") in err and "not a run directory" in err


@pytest.mark.parametrize("override", ["dataset.path=~nosuchuser/pets", "dataset.path=my#pets", "a b=1", "trainer.epochs"])
def test_an_override_hydra_cannot_read_is_named_with_the_quoting_that_works(run_cli, tmp_path, override):
    code, out, err = run_cli("train", override)
    assert code == 2 and f"Hydra cannot read the override {override!r}" in err, err
    assert """'key="value with spaces"'""" in err and "LexerNoViable" not in err and "hydra.cc" not in err
    assert len(err.strip().splitlines()) == 1 and not out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["model.hiden=[10]"], "Unknown setting model.hiden. Valid settings of model 'mlp': name, batchnorm, dropout, init, "
                           "hidden."),
    (["activation.negative_slope=0.2"], "Unknown setting activation.negative_slope. Valid settings of activation "
                                        "'relu': name. negative_slope is a setting of activation leaky_relu: choose "
                                        "it with activation=leaky_relu."),
    (["activation=reluu"], "Unknown activation 'reluu' (no activation/reluu.yaml in the config folders). Valid choices: "
                           "celu, elu, gelu, leaky_relu, mish, prelu, relu, rrelu, selu, sigmoid, silu, softplus, tanh."),
    (["activaton=relu"], "Unknown top-level setting activaton. Valid ones: the groups dataset, model, activation,"),
    (["-m", "model=mlp,convnet", "model.hidden=[8]"], "The sweep's job with model=convnet: Unknown setting "
                                                     "model.hidden. Valid settings of model 'convnet': name,"),
], ids=["misspelt", "setting_of_another_option", "unknown_option", "misspelt_group", "in_one_job_of_a_sweep"])
def test_a_setting_or_option_that_does_not_exist_is_cnnlabs_one_message_and_nothing_is_written(run_cli, tmp_path,
                                                                                               args, message):
    code, out, err = run_cli("train", *args, *TINY_TRAINER)
    assert code == 2 and err.startswith(f"cnnlab: error: {message}"), err
    assert "+model" not in err and "append" not in err and "search path" not in err and not out
    assert list(tmp_path.iterdir()) == []


def test_adding_a_misspelt_setting_with_plus_gets_the_same_message(run_cli):
    assert run_cli("train", "model.hiden=[10]")[2] == run_cli("train", "+model.hiden=[10]")[2]


def test_a_rejected_run_leaves_no_folder_behind(run_cli, tmp_path):
    code, _, err = run_cli("train", *TINY, "trainer.epochs=0")  # checked before Hydra makes outputs/DATE/TIME
    assert code == 2 and "trainer.epochs=0" in err
    code, _, err = run_cli("train", *TINY, "hydra.job.nosuchsetting=1", "hydra.run.dir=deep/run")  # refused by Hydra
    assert code == 2 and "nosuchsetting" in err
    code, _, err = run_cli("train", "-m", "dataset=imagefolder", "activation=relu,elu", *TINY_TRAINER,
                           "hydra.sweep.dir=sweep")
    assert code == 2 and "dataset.path" in err and "Every job of the sweep would be rejected" in err
    assert list(tmp_path.iterdir()) == []


def test_checking_that_an_output_folder_can_be_written_leaves_no_folder(tmp_path):
    (tmp_path / "kept").mkdir()
    check_writable("hydra.run.dir", tmp_path / "a" / "b" / "c")
    check_writable("hydra.run.dir", tmp_path / "kept")
    assert [path.name for path in tmp_path.iterdir()] == ["kept"] and not list((tmp_path / "kept").iterdir())


# --- cnnlab train --help: the YAML comments are the documentation ----------------------------------
def yaml_settings(path: Path, section: str | None = None) -> list[tuple[str, str, str]]:
    """(key, value as written, first line of its comment) of each setting of a config file."""
    from omegaconf import OmegaConf

    keys = OmegaConf.load(path)[section] if section else OmegaConf.load(path)
    indent = "  " if section else ""
    text = path.read_text().split(f"\n{section}:")[1].split("\n\n")[0] if section else path.read_text()
    rows = []
    for key in keys:
        (line,) = [line for line in text.splitlines() if line.startswith(f"{indent}{key}:")]
        value, _, comment = line.partition(":")[2].partition(" #")
        rows.append((str(key), value.strip(), comment.strip()))
    return rows


def test_train_help_shows_every_setting_of_every_option_with_its_default_and_comment(run_cli, monkeypatch):
    from cnnlab.config import SCHEMAS

    monkeypatch.setenv("COLUMNS", "1000")  # one line per setting
    code, out, _ = run_cli("train", "--help")
    assert code == 0 and run_cli("train", "-h") == (0, out, "")
    lines = out.splitlines()
    checked = 0
    for group in SCHEMAS:
        for path in sorted((config_dir() / group).glob("*.yaml")):
            header = path.read_text().splitlines()[0].lstrip("# ")
            assert any(line.startswith(f"  {path.stem}: {header}") for line in lines), (path, header)
            for key, value, comment in yaml_settings(path):
                if key == "name":
                    continue
                assert comment, f"{path}: {key} has no comment"
                assert any(line.strip().startswith(f"{key}: {value}") and line.endswith(f"# {comment}")
                           for line in lines), (path, key)
                checked += 1
    for section in ("trainer", "probes", "findings"):
        for key, value, comment in yaml_settings(config_dir() / "train.yaml", section):
            assert comment, f"train.yaml: {section}.{key} has no comment"
            assert any(line.startswith(f"  {key}: {value}") and f"# {comment}" in line for line in lines), key
            checked += 1
    assert checked > 80
    mode = next(line for line in lines if line.startswith("  mode: train"))
    assert mode.endswith("in a training step (without touching the running statistics); eval: running statistics")
    for text in ("dataset=NAME: the images", "activation=NAME: the nonlinearity after every hidden layer (default relu)",
                 "experiment=NAME: optional", "  dying_relu: Dying ReLU: plain SGD at high learning rates",
                 "resume: null", "--hydra-help"):
        assert text in out, text


def test_train_help_lists_the_options_of_a_users_config_dir(run_cli, tmp_path):
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "wide_mlp.yaml").write_text(
        "# A wide MLP\nname: mlp\nhidden: [1024, 1024]  # two wide layers\n")
    code, out, _ = run_cli("train", "--config-dir", "mine", "--help")
    assert code == 0 and "model: convnet, mlp, wide_mlp (default mlp)" in out
    assert "  wide_mlp: A wide MLP" in out and "name: mlp" in out and "# two wide layers" in out


def test_hydras_own_help_still_answers(run_cli):
    code, out, _ = run_cli("train", "--hydra-help")
    assert code == 0 and "Hydra (" in out


@pytest.mark.parametrize("given, message", [
    ("plots", "that is a folder; give a file in it, e.g. --plot plots/activations.png"),
    ("act", "the file must end in .png, .pdf, .svg, e.g. --plot act.png"),
    ("act.jpeg2", "the file must end in .png, .pdf, .svg, e.g. --plot act.png"),
    ("missing/act.png", "the folder missing does not exist"),
])
def test_activations_plot_names_a_file_it_can_write_or_says_what_is_wrong(run_cli, tmp_path, given, message):
    (tmp_path / "plots").mkdir()
    code, out, err = run_cli("activations", "--plot", given)
    assert code == 2 and message in err and not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("plots/*"))


def test_activations_plot_into_a_folder_it_cannot_write_is_one_message_and_exit_1(run_cli, tmp_path):
    # /sys refuses new files even to root, who may write into any read-only folder of tmp_path.
    code, out, err = run_cli("activations", "--plot", "/sys/act.png")
    assert code == 1 and "--plot: cannot write /sys/act.png: Permission denied." in err


def test_activations_plot_writes_the_file_it_names(run_cli, tmp_path):
    code, out, _ = run_cli("activations", "--plot", "act.svg")
    assert code == 0 and "wrote act.svg" in out and (tmp_path / "act.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("empty", ["", ".", " "])
def test_an_empty_run_dir_is_refused_and_the_current_folders_files_are_kept(run_cli, tmp_path, empty):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet_final.pt").write_bytes(b"a week of training")
    (tmp_path / "metrics.json").write_text('{"top1": 0.8}')
    code, out, err = run_cli("train", *TINY, f"hydra.run.dir={empty}")
    assert code == 2 and "would be the current folder (an unset variable?)" in err
    assert (tmp_path / "checkpoints" / "resnet_final.pt").read_bytes() == b"a week of training"
    assert (tmp_path / "metrics.json").read_text() == '{"top1": 0.8}' and not (tmp_path / ".hydra").exists()


def test_a_run_dir_holding_another_tools_files_is_refused_naming_one_and_left_untouched(run_cli, tmp_path):
    theirs = tmp_path / "their_run"
    (theirs / "checkpoints").mkdir(parents=True)
    (theirs / "checkpoints" / "epoch10.pt").write_bytes(b"weights")
    (theirs / "metrics.json").write_text('{"loss": 0.1}')
    (theirs / "events.out.tfevents.1.host").write_bytes(b"their events")
    before = {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()}
    code, out, err = run_cli("train", *TINY, f"hydra.run.dir={theirs}")
    assert code == 2 and "holds files cnnlab did not make" in err and "Nothing was changed" in err
    assert {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()} == before and not (theirs / ".hydra").exists()


@pytest.mark.parametrize("sweep", ["trainer.seed=range(5,0)", "activation=glob(zzz*)"])
def test_a_sweep_with_no_values_is_one_message_and_exit_2(run_cli, tmp_path, sweep):
    code, out, err = run_cli("train", "-m", *TINY, sweep)
    assert code == 2 and f"The sweep over {sweep.split('=')[0]} has no values" in err
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("args", [["train", "--hydra-help"], ["train", "--cfg", "job"], ["train", "--info"],
                                  ["inspect", "run", "--json"], ["compare", "run"], ["--help"]])
def test_output_into_a_pipe_whose_reader_has_gone_ends_quietly(capfd, monkeypatch, tmp_path, args):
    from cnnlab import cli
    from tests.fake_runs import write_run

    write_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -1` once it has its line, `| true` at once
    with open(write_end, "w", buffering=1) as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        with pytest.raises(SystemExit) as exit:
            cli.main(args)
        monkeypatch.undo()
    err = capfd.readouterr().err
    assert exit.value.code == 0 and "BrokenPipeError" not in err and "Logging error" not in err, err


def test_an_address_space_limit_too_low_for_torch_is_one_message_before_any_folder(tmp_path):
    import resource

    def limited() -> None:  # `ulimit -v 1500000`: Hydra loads, torch's libraries do not
        resource.setrlimit(resource.RLIMIT_AS, (1_500_000 * 1024, resource.getrlimit(resource.RLIMIT_AS)[1]))

    result = subprocess.run([sys.executable, "-m", "cnnlab", "train", *TINY, "hydra.run.dir=run"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, preexec_fn=limited, check=False)
    assert result.returncode == 1 and "torch cannot be loaded" in result.stderr, result.stderr
    assert "ulimit -v" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()

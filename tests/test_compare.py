import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml
from rich.console import Console

from cnnlab.analysis.compare import (
    DPI, FIGURES, MAX_INCHES, SEED_KEY, Run, drawing, find_runs, make_figures, name_runs, print_summary, read_scalars,
    rows, seed_groups, settings_of, spread, tune, versus_best, welch_p, write_summary)
from cnnlab.errors import UserError
from tests.helpers import TINY, not_blank

# What a run without sharpness estimates (probes.sharpness_every=0, the default) gets.
DRAWN_WITHOUT_SHARPNESS = [figure for figure in FIGURES if figure != "sharpness.png"]


def cnnlab(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A finished four-job sweep: two activations x two seeds."""
    cwd = tmp_path_factory.mktemp("sweep")
    result = cnnlab("train", "-m", "activation=relu,tanh", "trainer.seed=0,1", *TINY, "trainer.epochs=2", "probes.every=2",
                    "hydra.sweep.dir=sweep", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "sweep"


# --- fake runs: the files a run leaves, without training ----------------------------------------
# A composed config as Hydra writes it to .hydra/config.yaml (the parts compare reads).
BASE_CONFIG = {
    "dataset": {"name": "fake", "root": "data", "download": True, "num_workers": 0},
    "model": {"name": "mlp", "hidden": [32], "batchnorm": False},
    "activation": {"name": "relu"},
    "optimizer": {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999]},
    "trainer": {"epochs": 1, "batch_size": 32, "seed": 0, "device": "cpu", "threads": None},
    "resume": None,
    "probes": {"every": 100},
}
OPTIONS = {"optimizer=sgd": {"optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
           "activation=leaky_relu": {"activation": {"name": "leaky_relu", "negative_slope": 0.01}},
           "activation=elu": {"activation": {"name": "elu", "alpha": 1.0}},
           "preset=selu_lecun": {"activation": {"name": "selu"}, "model": {"init": "lecun"}}}


def composed(overrides: list[str]) -> dict:
    """The config `cnnlab train OVERRIDES` composes, as far as BASE_CONFIG and OPTIONS go."""
    config = json.loads(json.dumps(BASE_CONFIG))
    for override in overrides:
        for group, settings in OPTIONS.get(override, {}).items():
            config[group] = {**config[group], **settings} if group == "model" else dict(settings)
        key, _, value = override.partition("=")
        if "." in key:
            *parents, leaf = key.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[leaf] = yaml.safe_load(value)
    return config


def write_run(path: Path, overrides="- activation=relu\n", metrics='{"status": "completed", "val_acc": 0.5}',
              config: dict | None = None) -> Path:
    """A run directory as a run leaves it, without training: .hydra/overrides.yaml (and config.yaml), metrics.json."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(overrides)
    if config is not None:
        (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        (path / "metrics.json").write_text(metrics)
    return path


def configured(path: Path, *overrides: str, status="completed", val_acc=0.5, test_acc=0.5) -> Path:
    """A run started with `cnnlab train OVERRIDES`: its overrides, composed config and metrics."""
    metrics = json.dumps({"status": status, "val_acc": val_acc, "test_acc": test_acc})
    return write_run(path, "".join(f"- {o}\n" for o in overrides), metrics, composed(list(overrides)))


def run(name, seed, status="completed", val_acc=None, test_acc=None):
    metrics = {"status": status, "val_acc": val_acc, "test_acc": test_acc, "dead_fraction": {"all": 0.5}}
    return Run(Path(f"/runs/{name}-{seed}"), {"activation": name, "trainer.seed": str(seed), "dataset.root": "/d"}, metrics)


def names(folder: Path) -> list[str]:
    return [r.name for r in find_runs([str(folder)])]


# --- names ---------------------------------------------------------------------------------------
def test_runs_are_named_by_the_settings_that_differ_in_their_composed_configs_with_short_keys(tmp_path):
    day = tmp_path / "outputs" / "2026-11-26"
    configured(day / "10-00-00", "optimizer.lr=0.01", "model.batchnorm=true", "trainer.threads=4", "probes.every=10")
    configured(day / "10-05-00")
    configured(day / "10-10-00", "activation=leaky_relu", "optimizer.lr=0.01")
    configured(day / "10-15-00", "activation=leaky_relu", "activation.negative_slope=0.2")
    assert names(day) == ["activation=relu, batchnorm=true, lr=0.01",
                          "activation=relu, batchnorm=false, lr=0.001",
                          "activation=leaky_relu, negative_slope=0.01, batchnorm=false, lr=0.01",
                          "activation=leaky_relu, negative_slope=0.2, batchnorm=false, lr=0.001"]
    # a setting that only one run has, set on its command line: the one thing it adds to its name
    alone = tmp_path / "alone"
    configured(alone / "a")
    configured(alone / "b", "activation=leaky_relu", "activation.negative_slope=0.2")
    configured(alone / "c", "activation=leaky_relu")
    assert names(alone) == ["activation=relu", "activation=leaky_relu, negative_slope=0.2",
                            "activation=leaky_relu, negative_slope=0.01"]


def test_settings_that_do_not_define_the_result_name_runs_only_when_nothing_else_differs(tmp_path):
    configured(tmp_path / "a", "trainer.threads=1", "trainer.device=cpu", "dataset.download=false")
    configured(tmp_path / "b", "trainer.threads=4")
    assert names(tmp_path) == ["dataset.download=false, threads=1", "dataset.download=true, threads=4"]
    configured(tmp_path / "c", "trainer.threads=4", "optimizer.lr=0.01")
    assert names(tmp_path) == ["lr=0.001 (a)", "lr=0.001 (b)", "lr=0.01"]  # a and b: alike in what counts


def test_settings_that_follow_from_a_group_choice_stay_out_of_names_unless_typed(tmp_path):
    configured(tmp_path / "a", "optimizer=sgd")
    configured(tmp_path / "b")
    assert names(tmp_path) == ["optimizer=sgd", "optimizer=adam"]  # not lr, momentum or betas: sgd's and adam's own
    configured(tmp_path / "c", "optimizer=sgd", "optimizer.lr=0.1")
    assert names(tmp_path) == ["optimizer=sgd, lr=0.05", "optimizer=adam, lr=0.001", "optimizer=sgd, lr=0.1"]

    presets = tmp_path / "presets"
    configured(presets / "a", "preset=selu_lecun")  # activation=selu and model.init=lecun come with the preset
    configured(presets / "b", "preset=relu_kaiming")
    assert names(presets) == ["preset=selu_lecun", "preset=relu_kaiming"]


def test_reruns_of_one_config_and_seed_are_separate_configurations_named_by_folder_without_a_spread(tmp_path):
    day = tmp_path / "2026-11-26"
    for time, accuracy in (("10-00-00", 0.8), ("10-05-00", 0.82), ("10-10-00", 0.84)):
        configured(day / time, "optimizer.lr=0.01", test_acc=accuracy)
    runs = find_runs([str(day)])
    assert [r.name for r in runs] == ["10-00-00", "10-05-00", "10-10-00"]
    groups = seed_groups(runs)
    assert len(groups) == 3 and all(g["runs"] == 1 for g in groups.values())
    assert groups["10-00-00"]["test_acc"].std is None and groups["10-00-00"]["test_acc"].text() == "0.8000 ± -"
    console = Console(file=io.StringIO(), width=200)
    print_summary(console, runs, title="t")
    output = console.file.getvalue()
    assert "seeds" not in output.split("One run per configuration")[0] and "One run per configuration" in output

    configured(day / "10-15-00", "optimizer.lr=0.01", "trainer.seed=1")  # now seeds differ: seed 0 three times
    runs = find_runs([str(day)])
    assert [r.name for r in runs] == ["seed=0 (10-00-00)", "seed=0 (10-05-00)", "seed=0 (10-10-00)", "seed=1"]


def test_jobs_not_started_are_named_by_their_overrides_like_the_started_ones(tmp_path):
    configured(tmp_path / "sweep" / "activation=relu", "activation=relu", "optimizer.lr=0.1")
    jobs = [((tmp_path / "sweep" / "activation=elu").resolve(), {"activation": "elu", "optimizer.lr": "0.10"}),
            ((tmp_path / "sweep" / "activation=relu").resolve(), {"activation": "relu", "optimizer.lr": "0.1"})]
    runs = find_runs([str(tmp_path / "sweep")], jobs=jobs)
    assert [(r.name, r.status) for r in runs] == [("activation=elu", "missing"), ("activation=relu", "completed")]
    assert settings_of(None, {"model.batchnorm": "True", "model.hidden": "[32, 32]", "optimizer.lr": "1e-3"}) == \
        {"model.batchnorm": "true", "model.hidden": "[32,32]", "optimizer.lr": "0.001"}


def test_runs_that_differ_by_seed_only_are_one_group():
    runs = [run("relu", 0), run("relu", 1), run("elu", 0)]
    name_runs(runs)
    assert [r.name for r in runs] == ["activation=relu, seed=0", "activation=relu, seed=1", "activation=elu, seed=0"]
    assert [r.group for r in runs] == ["activation=relu", "activation=relu", "activation=elu"]
    only_seeds = [run("relu", 0), run("relu", 1)]
    name_runs(only_seeds)
    assert [r.group for r in only_seeds] == ["all", "all"]


# --- statistics ----------------------------------------------------------------------------------
def test_a_mean_over_seeds_has_a_student_t_confidence_interval():
    # [1, 2, 3]: mean 2, s = 1, t(0.975, 2) = 4.3027: 2 ± 4.3027 / sqrt(3) = 2 ± 2.484.
    interval = spread([1, 2, 3])
    assert interval.mean == 2 and interval.std == pytest.approx(1.0)
    assert interval.ci95 == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5) and interval.text(3) == "2.000 ± 2.484"
    one = spread([0.8, None, float("nan")])
    assert (one.mean, one.std, one.ci95, one.count, one.text()) == (0.8, None, None, 1, "0.8000 ± -")
    assert spread([]).text() == "-"


def test_welch_p_value_is_the_two_sided_tail_of_t_with_welch_satterthwaite_degrees_of_freedom():
    from scipy import stats

    # a = [1, 2, 3, 4]: mean 2.5, variance 5/3; b = [3, 5, 7]: mean 5, variance 4 (Welch 1947).
    se2_a, se2_b = (5 / 3) / 4, 4 / 3
    t = (2.5 - 5) / math.sqrt(se2_a + se2_b)  # -2.5 / sqrt(7/4) = -1.88982
    df = (se2_a + se2_b) ** 2 / (se2_a ** 2 / 3 + se2_b ** 2 / 2)  # (49/16) / (409/432) = 1323/409
    assert t == pytest.approx(-1.889822, abs=1e-6) and df == pytest.approx(1323 / 409)
    assert welch_p([1, 2, 3, 4], [3, 5, 7]) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    assert welch_p([1, 2, 3, 4], [3, 5, 7]) == pytest.approx(0.14847, abs=1e-5)  # also by integrating t's density
    assert welch_p([0.9], [0.5, 0.6]) is None and welch_p([0.5, 0.5], [0.6, 0.6]) is None  # cannot tell


def test_configurations_are_marked_against_the_best_by_welchs_test_and_too_few_seeds_are_not_marked():
    verdicts = versus_best({"best": spread([0.90, 0.92, 0.91]), "close": spread([0.89, 0.93, 0.90]),
                            "worse": spread([0.50, 0.52, 0.51]), "one seed": spread([0.6]), "failed": spread([])})
    assert {name: v["verdict"] for name, v in verdicts.items()} == {
        "best": "best", "close": "not distinguishable", "worse": "worse", "one seed": "cannot tell",
        "failed": "no result"}
    assert verdicts["close"]["p"] == pytest.approx(welch_p([0.90, 0.92, 0.91], [0.89, 0.93, 0.90])) and \
        verdicts["close"]["p"] > 0.05 and verdicts["worse"]["p"] < 0.05
    lone_best = versus_best({"a": spread([0.95]), "b": spread([0.5, 0.52])})  # the best has one seed: no test
    assert lone_best["b"] == {"verdict": "cannot tell", "p": None, "why": "fewer than 2 seeds"}
    alike = versus_best({"a": spread([0.9, 0.9]), "b": spread([0.8, 0.8])})  # no spread: no test either
    assert alike["b"] == {"verdict": "cannot tell", "p": None, "why": "no spread"}


def test_seed_groups_give_mean_and_interval_of_completed_runs():
    runs = [run("relu", 0, val_acc=0.90, test_acc=0.80), run("relu", 1, val_acc=0.94, test_acc=0.84),
            run("relu", 2, status="failed"), run("elu", 0, val_acc=0.5, test_acc=0.6)]
    name_runs(runs)
    groups = seed_groups(runs)
    relu = groups["activation=relu"]
    assert (relu["runs"], relu["completed"], relu["seeds"]) == (3, 2, ["0", "1", "2"])
    assert relu["val_acc"].mean == pytest.approx(0.92) and relu["val_acc"].std == pytest.approx(np.std([0.9, 0.94], ddof=1))
    assert relu["test_acc"].ci95 == pytest.approx(12.7062 * np.std([0.80, 0.84], ddof=1) / math.sqrt(2), rel=1e-4)
    assert groups["activation=elu"]["val_acc"].std is None and groups["activation=elu"]["val_acc"].count == 1
    assert relu["vs_best"]["verdict"] == "best" and groups["activation=elu"]["vs_best"]["verdict"] == "cannot tell"


# --- tuning --------------------------------------------------------------------------------------
def tuning_runs(tmp_path: Path) -> list[Run]:
    """relu and elu at lr 0.01 and 0.1, three seeds each: relu validates best at 0.1, elu at 0.01."""
    validation = {("relu", "0.01"): 0.80, ("relu", "0.1"): 0.90, ("elu", "0.01"): 0.85, ("elu", "0.1"): 0.70}
    for (activation, lr), val in validation.items():
        for seed in range(3):
            configured(tmp_path / "sweep" / f"{activation},{lr},{seed}", f"activation={activation}",
                       f"optimizer.lr={lr}", f"trainer.seed={seed}", val_acc=val + 0.01 * seed,
                       test_acc=val - 0.05 + 0.01 * seed)
    return find_runs([str(tmp_path / "sweep")])


def test_tune_picks_per_configuration_the_value_with_the_best_mean_validation_accuracy(tmp_path):
    runs = tuning_runs(tmp_path)
    tuned = tune(runs, "lr")
    assert tuned["key"] == "optimizer.lr"
    relu, elu = tuned["configurations"]["activation=relu"], tuned["configurations"]["activation=elu"]
    assert (relu["chosen"], elu["chosen"]) == ("0.1", "0.01") and relu["tried"] == ["0.01", "0.1"]
    assert relu["val_acc"].mean == pytest.approx(0.91) and relu["test_acc"].mean == pytest.approx(0.86)
    assert relu["test_acc"].ci95 == pytest.approx(4.302653 * 0.01 / math.sqrt(3), abs=1e-6)
    assert elu["test_acc"].mean == pytest.approx(0.81)
    assert relu["vs_best"]["verdict"] == "best" and elu["vs_best"]["verdict"] == "worse"  # 0.86 vs 0.81, s = 0.01

    write_summary(tmp_path / "out", runs, tuned)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tuned"]["configurations"]["activation=elu"]["chosen"] == "0.01"
    assert summary["tuned"]["configurations"]["activation=elu"]["test_acc"]["mean"] == pytest.approx(0.81)
    assert summary["groups"]["activation=relu, lr=0.1"]["test_acc"]["ci95"] == pytest.approx(0.02484, abs=1e-5)
    console = Console(file=io.StringIO(), width=300)
    print_summary(console, runs, title="t", tuned=tuned)
    output = console.file.getvalue()
    assert "tuned over optimizer.lr" in output and "0.8600 ± 0.0248" in output and "worse (p=" in output


def test_tune_refuses_a_setting_that_does_not_differ_naming_those_that_do(tmp_path, run_cli):
    tuning_runs(tmp_path)
    code, _, err = run_cli("compare", "sweep", "--tune", "optimizer.momentum")
    assert code == 2 and "--tune optimizer.momentum: optimizer.momentum has one value" in err
    assert "settings that differ: activation, optimizer.lr." in err
    code, _, err = run_cli("compare", "sweep", "--tune", "trainer.seed")
    assert code == 2 and "luckiest seed" in err
    assert not (tmp_path / "sweep" / "summary.json").exists()


# --- finding runs --------------------------------------------------------------------------------
def test_compare_searches_sub_folders_but_not_inside_runs_nor_its_own_figures(tmp_path, run_cli):
    outputs = tmp_path / "outputs"
    configured(outputs / "2026-11-26" / "10-00-00")
    configured(outputs / "2026-11-26" / "10-05-00", "optimizer.lr=0.01")
    configured(outputs / "multirun" / "2026-11-26" / "11-00-00" / "activation=elu", "activation=elu")
    write_run(outputs / "2026-11-26" / "10-00-00" / "checkpoints" / "inner")  # inside a run: not a run of its own
    assert names(outputs) == ["activation=relu, lr=0.001", "activation=relu, lr=0.01", "activation=elu, lr=0.001"]
    code, out, err = run_cli("compare", "outputs")
    assert code == 0, err
    assert (outputs / "summary.json").is_file() and (outputs / "figures").is_dir()
    assert len(find_runs([str(outputs)])) == 3  # figures/ (TensorBoard events only) is not a run
    with pytest.raises(UserError, match="No run directories in or below"):
        find_runs([str(tmp_path / "outputs" / "figures")])


def test_compare_of_a_running_sweep_lists_the_jobs_not_started_as_missing(sweep, tmp_path, run_cli):
    partial = tmp_path / "partial"
    shutil.copytree(sweep, partial)
    shutil.rmtree(partial / "activation=tanh,trainer.seed=1")  # a job that has not started
    (partial / "activation=tanh,trainer.seed=0" / "metrics.json").unlink()  # one that is starting
    running = partial / "activation=relu,trainer.seed=1" / "metrics.json"
    running.write_text(json.dumps({**json.loads(running.read_text()), "status": "running", "test_acc": None}))
    code, out, err = run_cli("compare", "partial")
    assert code == 0, err
    summary = json.loads((partial / "summary.json").read_text())
    assert [(row["name"], row["status"]) for row in summary["runs"]] == [
        ("activation=relu, seed=0", "completed"), ("activation=relu, seed=1", "running"),
        ("activation=tanh, seed=0", "missing"), ("activation=tanh, seed=1", "missing")]
    assert "activation=tanh, seed=1" in out and out.count("missing") >= 2
    assert all(not_blank(partial / figure) for figure in DRAWN_WITHOUT_SHARPNESS)


def test_a_sweep_summary_is_written_with_one_row_per_job(sweep):
    summary = json.loads((sweep / "summary.json").read_text())
    assert [row["name"] for row in summary["runs"]] == ["activation=relu, seed=0", "activation=relu, seed=1",
                                                        "activation=tanh, seed=0", "activation=tanh, seed=1"]
    assert all(row["status"] == "completed" for row in summary["runs"]) and summary["not_completed"] == []
    relu = summary["groups"]["activation=relu"]
    assert relu["completed"] == 2 and relu["vs_best"]["verdict"] in ("best", "not distinguishable", "worse", "cannot tell")
    values = [row["val_acc"] for row in summary["runs"] if row["name"].startswith("activation=relu")]
    assert relu["val_acc"]["mean"] == pytest.approx(sum(values) / 2) and relu["val_acc"]["values"] == values
    assert summary["fixed"]["dataset"] == "fake" and summary["fixed"]["epochs"] == "2"
    lines = (sweep / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("name,status,") and len(lines) == 5


def test_compare_writes_every_figure_the_summary_and_tensorboard_images(sweep, tmp_path, run_cli):
    code, out, err = run_cli("compare", str(sweep), "--out", "out")
    assert code == 0, err
    for figure in DRAWN_WITHOUT_SHARPNESS:
        assert not_blank(tmp_path / "out" / figure), figure
    assert not (tmp_path / "out" / "sharpness.png").exists() and "sharpness.png" not in out
    assert (tmp_path / "out" / "summary.csv").is_file()
    assert out.count("│ completed ") == 4  # the table: one row per job
    assert "grouped over trainer.seed: mean ± 95% confidence interval" in out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "out" / "figures"))
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(f"compare/{f.removesuffix('.png')}" for f in DRAWN_WITHOUT_SHARPNESS)


def test_compare_accepts_globs_of_run_directories(sweep, tmp_path):
    runs = find_runs([str(sweep / "activation=relu*")])
    assert [r.name for r in runs] == ["seed=0", "seed=1"]
    with pytest.raises(UserError, match="No run directories"):
        find_runs([str(tmp_path)])


@pytest.mark.parametrize("file, text, problem", [
    ("metrics.json", "[1, 2]", "holds a JSON list"),
    ("metrics.json", '"done"', "holds a JSON str"),
    ("metrics.json", '{"status": "compl', "cannot be read"),
    ("overrides.yaml", "- a=1\n  - b: [", "cannot be read"),
    ("overrides.yaml", "activation: relu\n", "holds a dict"),
    ("config.yaml", "- relu\n", "holds a list"),
])
def test_a_run_with_malformed_files_is_skipped_with_a_warning_naming_the_file(tmp_path, file, text, problem):
    write_run(tmp_path / "sweep" / "good")
    bad = write_run(tmp_path / "sweep" / "bad", overrides="- activation=elu\n")
    (bad / file if file == "metrics.json" else bad / ".hydra" / file).write_text(text)
    warnings = []
    runs = find_runs([str(tmp_path / "sweep")], warn=warnings.append)
    assert [run.path.name for run in runs] == ["good"]
    (warning,) = warnings
    assert f"{bad.name}" in warning and file in warning and problem in warning


def test_compare_refuses_runs_it_cannot_read_and_an_out_that_is_a_file(tmp_path, run_cli):
    write_run(tmp_path / "broken" / "a", metrics="[]")
    code, _, err = run_cli("compare", "broken")
    assert code == 2 and "No readable run" in err and "metrics.json holds a JSON list" in err

    write_run(tmp_path / "sweep" / "a")
    (tmp_path / "taken").write_text("a file")
    code, _, err = run_cli("compare", "sweep", "--out", "taken")
    assert code == 2 and "--out='taken'" in err and "is a file, not a folder" in err
    assert (tmp_path / "taken").read_text() == "a file" and not (tmp_path / "sweep" / "summary.csv").exists()


# --- figures -------------------------------------------------------------------------------------
def write_events(path: Path, lr: str, scalars: dict[str, list[float]], metrics=None) -> Path:
    """A run directory with TensorBoard scalars (tag -> values at steps 0, 10, 20, ...), as a run writes them."""
    from torch.utils.tensorboard import SummaryWriter

    write_run(path, overrides=f"- optimizer.lr={lr}\n", metrics=metrics or '{"status": "completed", "val_acc": 0.5}')
    with SummaryWriter(str(path)) as writer:
        for tag, values in scalars.items():
            for i, value in enumerate(values):
                writer.add_scalar(tag, value, global_step=10 * i)
    return path


def depth_scalars(rank_start: float, rank_end: float) -> dict[str, list[float]]:
    layers = ("act01_fc", "act02_fc", "act03_fc")
    return {**{f"act_mean/{a}": [0.5, 0.4] for a in layers}, **{f"act_std/{a}": [1.0, 0.9] for a in layers},
            **{f"effective_rank/{a}": [rank_start / (i + 1), rank_end] for i, a in enumerate(layers)}}


def legend_labels(figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


def test_activation_depth_gains_an_effective_rank_panel_when_runs_log_it(tmp_path):
    runs = find_runs([str(write_events(tmp_path / "sweep" / "a", "0.1", depth_scalars(30.0, 20.0)).parent)])
    scalars = {run.path: read_scalars(run, ("act_mean/", "act_std/", "effective_rank/")) for run in runs}
    figure = FIGURES["activation_depth.png"](drawing(runs, scalars))
    plt.close(figure)
    assert [axis.get_title() for axis in figure.axes] == ["activation mean by depth", "activation std by depth",
                                                          "effective rank of the activations by depth"]
    start, end = figure.axes[2].get_lines()  # the first probe dashed, the last solid, layer by layer
    assert (start.get_linestyle(), end.get_linestyle()) == ("--", "-")
    assert list(start.get_xdata()) == [1, 2, 3] and list(start.get_ydata()) == pytest.approx([30, 15, 10])
    assert list(end.get_ydata()) == pytest.approx([20, 20, 20])
    assert "dashed = first probe" in figure.get_suptitle() and legend_labels(figure) == ["a"]

    scalars = {path: {tag: s for tag, s in series.items() if "rank" not in tag} for path, series in scalars.items()}
    older = FIGURES["activation_depth.png"](drawing(runs, scalars))  # runs from before the rank probe
    plt.close(older)
    assert len(older.axes) == 2


def test_sharpness_figure_is_drawn_only_when_some_run_estimated_sharpness(tmp_path):
    sweep = tmp_path / "sweep"
    write_events(sweep / "lr=0.01", "0.01", {"val/acc": [0.5], "sharpness/top_eigenvalue": [5.0, 50.0, 190.0],
                                             "sharpness/stability_limit": [200.0, 200.0, 200.0]})
    write_events(sweep / "lr=0.04", "0.04", {"val/acc": [0.5], "sharpness/top_eigenvalue": [5.0, 45.0, 52.0]})
    written = make_figures(find_runs([str(sweep)]), tmp_path / "with")
    assert [path.name for path in written] == ["val_curves.png", "test_accuracy.png", "sharpness.png"]
    assert not_blank(tmp_path / "with" / "sharpness.png")

    write_events(tmp_path / "plain" / "a", "0.1", {"val/acc": [0.5, 0.6]})
    written = make_figures(find_runs([str(tmp_path / "plain")]), tmp_path / "without")
    assert [path.name for path in written] == ["val_curves.png", "test_accuracy.png"]  # no probes: nothing else
    assert not (tmp_path / "without" / "sharpness.png").exists()


def test_sharpness_figure_draws_the_eigenvalue_solid_and_the_stability_limit_dashed_in_one_colour(tmp_path):
    sweep = tmp_path / "sweep"
    write_events(sweep / "sgd", "0.01", {"sharpness/top_eigenvalue": [5.0, 50.0, 190.0],
                                         "sharpness/stability_limit": [200.0, 200.0, 200.0]})
    write_events(sweep / "adam", "0.001", {"sharpness/top_eigenvalue": [3.0, 4.0, 5.0]})  # no limit: not SGD
    runs = find_runs([str(sweep)])
    scalars = {run.path: read_scalars(run, ("sharpness/",)) for run in runs}
    figure = FIGURES["sharpness.png"](drawing(runs, scalars))
    plt.close(figure)
    (axis,) = figure.axes
    assert legend_labels(figure) == ["lr=0.001", "lr=0.01"]  # one entry per configuration
    adam, eigenvalue, limit = axis.get_lines()
    assert (eigenvalue.get_linestyle(), limit.get_linestyle()) == ("-", "--")
    assert eigenvalue.get_color() == limit.get_color() != adam.get_color()
    assert list(eigenvalue.get_xdata()) == [0, 10, 20] and list(limit.get_ydata()) == [200, 200, 200]
    assert axis.get_yscale() == "log" and "2(1+momentum)/lr" in figure.get_suptitle()


def test_runs_that_never_trained_are_left_out_of_the_figures_and_listed_in_the_table(tmp_path):
    sweep = tmp_path / "sweep"
    write_events(sweep / "a", "0.01", {"val/acc": [0.5, 0.6], "dead_fraction/act01_fc": [0.1, 0.2]})
    write_events(sweep / "b", "0.1", {"val/acc": [0.4, 0.5], "dead_fraction/act01_fc": [0.3, 0.4]})
    write_run(sweep / "c", "- optimizer.lr=-1\n", '{"status": "invalid", "error": "optimizer.lr must be > 0"}')
    write_run(sweep / "d", "- optimizer.lr=10\n", '{"status": "failed", "error": "no data"}')  # before any probe
    runs = find_runs([str(sweep)])
    written = make_figures(runs, tmp_path / "out")
    scalars = {run.path: read_scalars(run, ("val/", "dead_fraction/")) for run in runs}
    d = drawing(runs, scalars)
    assert list(d.groups) == ["lr=0.01", "lr=0.1"]
    figure = FIGURES["val_curves.png"](d)
    plt.close(figure)
    assert legend_labels(figure) == ["lr=0.01", "lr=0.1"]
    assert [row["status"] for row in rows(runs)] == ["completed", "completed", "invalid", "failed"]
    assert "dead_fraction.png" in [path.name for path in written]


def test_val_curves_draw_the_training_loss_per_log_step_and_a_confidence_band_over_seeds():
    from matplotlib.collections import PolyCollection

    from cnnlab.analysis.compare import _mean_ci

    runs = [run("relu", 0), run("relu", 1), run("elu", 0)]
    name_runs(runs)
    train = {"relu-0": [2.0, 1.0, 0.5], "relu-1": [2.2, 1.2, 0.7], "elu-0": [2.0, 1.5, 1.0]}
    scalars = {r.path: {"train/loss": ([0, 5, 10], train[r.path.name]), "val/loss": ([10], [0.9]),
                        "val/acc": ([10], [0.6])} for r in runs}
    figure = FIGURES["val_curves.png"](drawing(runs, scalars))
    plt.close(figure)
    training, loss, accuracy = figure.axes
    assert "every trainer.log_every steps" in training.get_title() and "one point per epoch" in loss.get_title()
    relu_line, elu_line = training.get_lines()
    assert list(relu_line.get_xdata()) == [0, 5, 10] and list(relu_line.get_ydata()) == pytest.approx([2.1, 1.1, 0.6])
    assert sum(isinstance(c, PolyCollection) for c in training.collections) == 1  # a band for relu's two seeds only
    assert "band = 95% confidence interval" in figure.get_suptitle()
    # Two seeds at each step, 0.1 apart: s = 0.0707, t(0.975, 1) = 12.706, so 12.706 * 0.0707 / sqrt(2) = 0.6353.
    steps, mean, half = _mean_ci([([0, 5], [2.0, 1.0]), ([0, 5, 10], [2.1, 1.1, 0.3])])
    assert steps == [0, 5] and list(mean) == pytest.approx([2.05, 1.05]) and list(half) == pytest.approx([0.63531] * 2,
                                                                                                        abs=1e-5)


def many_runs(count: int) -> tuple[list[Run], dict]:
    """`count` configurations, two seeds each, with long names and every series the figures read."""
    runs, scalars = [], {}
    layers = [f"act{i:02d}_fc" for i in range(1, 4)]
    for i in range(count):
        for seed in (0, 1):
            settings = {"activation": ["relu", "leaky_relu", "elu"][i % 3], "optimizer.lr": f"{0.001 * (i + 1):g}",
                        "model.hidden": "[256,256,256,256]", "model.init": ["kaiming", "orthogonal"][i % 2],
                        "dataset.noise": str(i // 6 / 10), SEED_KEY: str(seed)}
            r = Run(Path(f"/runs/{i}-{seed}"), settings, {"status": "completed", "test_acc": 0.5 + 0.01 * i + 0.005 * seed})
            runs.append(r)
            steps = list(range(0, 100, 20))
            scalars[r.path] = {"train/loss": (steps, [2.0 / (1 + s + i) for s in steps]),
                               "val/loss": ([50, 100], [1.0, 0.8]), "val/acc": ([50, 100], [0.5, 0.6 + 0.01 * seed]),
                               "sharpness/top_eigenvalue": (steps, [10.0 + s for s in steps]),
                               **{f"{kind}/{layer}": (steps, [0.1 * seed + 0.01 * s for s in steps])
                                  for kind in ("dead_fraction", "act_mean", "act_std", "effective_rank")
                                  for layer in layers}}
    name_runs(runs)
    return runs, scalars


def assert_fits(figure) -> None:
    """Every panel (its title, tick labels and axis labels as drawn), legend and the title lie inside the figure."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    box = figure.bbox
    for part in [*figure.axes, *figure.legends, figure._suptitle]:
        extent = part.get_tightbbox(renderer)
        assert (extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1 and extent.y0 >= box.y0 - 1
                and extent.y1 <= box.y1 + 1), (part, extent, box)


def test_figures_of_thirty_configurations_are_bounded_fit_their_labels_and_list_each_configuration_once():
    from PIL import Image

    runs, scalars = many_runs(30)
    d = drawing(runs, scalars)
    assert len(d.groups) == 30 and len(set(map(str, d.colours.values()))) == 30  # 30 distinct colours
    for filename, draw in FIGURES.items():
        figure = draw(d)
        width, height = figure.get_size_inches()
        assert width <= MAX_INCHES and height <= MAX_INCHES, filename
        assert_fits(figure)
        if filename in ("val_curves.png", "activation_depth.png", "sharpness.png"):
            assert legend_labels(figure) == [d.labels[name] for name in d.groups], filename
        if filename == "test_accuracy.png":
            assert [label.get_text() for label in figure.axes[0].get_yticklabels()] == list(d.labels.values())
        if filename == "dead_fraction.png":
            assert len(figure.axes) == 30 and legend_labels(figure) == ["act01_fc", "act02_fc", "act03_fc"]
        if filename == "dead_fraction.png":  # the largest: its PNG as make_figures writes it
            png = io.BytesIO()
            figure.savefig(png, dpi=DPI)
            with Image.open(png) as image:
                assert image.size == (1600, round(height * DPI)) and image.size[1] <= MAX_INCHES * DPI
        plt.close(figure)


def test_figures_name_the_settings_every_run_shares_in_their_subtitle(tmp_path):
    configured(tmp_path / "a", "activation=elu", "trainer.epochs=3")
    configured(tmp_path / "b", "activation=relu", "trainer.epochs=3")
    runs = find_runs([str(tmp_path)])
    d = drawing(runs, {run.path: {"val/acc": ([10], [0.5])} for run in runs})
    assert d.fixed == "dataset=fake, model=mlp, hidden=[32], optimizer=adam, lr=0.001, epochs=3, batch_size=32"
    figure = FIGURES["test_accuracy.png"](d)
    plt.close(figure)
    assert "fixed: dataset=fake, model=mlp" in figure.get_suptitle()
    assert "activation" not in figure.get_suptitle()  # it differs: it is in the names


def test_each_runs_warning_kinds_reach_the_tables_and_seed_groups_count_them(tmp_path):
    def run(seed, kinds):
        findings = [{"kind": kind, "severity": "warning"} for kind in kinds] + [{"kind": "dying_units", "severity": "info"}]
        return Run(tmp_path / f"s{seed}", {"activation": "relu", SEED_KEY: str(seed)},
                   {"status": "completed", "findings": findings})

    runs = [run(0, ["dead_at_init", "vanishing_gradients"]), run(1, ["dead_at_init"]), run(2, [])]
    name_runs(runs)
    assert [row["warnings"] for row in rows(runs)] == ["dead_at_init,vanishing_gradients", "dead_at_init", ""]
    group = next(iter(seed_groups(runs).values()))
    assert group["warnings"] == {"dead_at_init": 2, "vanishing_gradients": 1}  # info findings do not count
    console = Console(file=io.StringIO(), width=200)
    print_summary(console, runs, title="t")
    assert "dead_at_init (2/3)" in console.file.getvalue() and "warnings" in console.file.getvalue()
    quiet = Console(file=io.StringIO(), width=200)
    print_summary(quiet, [run(3, [])], title="t")
    assert "warnings" not in quiet.file.getvalue()  # no column when no run has any

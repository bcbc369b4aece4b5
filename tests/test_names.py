"""Run names: the settings that differ, short keys, seed groups, reruns told apart by their folders."""

from __future__ import annotations

import io

from rich.console import Console

from cnnlab.analysis.folders import find_runs
from cnnlab.analysis.names import fixed_settings, name_runs, shown_values
from cnnlab.analysis.stats import seed_groups
from cnnlab.analysis.summary import print_summary
from tests.fake_runs import configured, names, seeded_run


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


def test_runs_that_differ_by_seed_only_are_one_group():
    runs = [seeded_run("relu", 0), seeded_run("relu", 1), seeded_run("elu", 0)]
    name_runs(runs)
    assert [r.name for r in runs] == ["activation=relu, seed=0", "activation=relu, seed=1", "activation=elu, seed=0"]
    assert [r.group for r in runs] == ["activation=relu", "activation=relu", "activation=elu"]
    only_seeds = [seeded_run("relu", 0), seeded_run("relu", 1)]
    name_runs(only_seeds)
    assert [r.group for r in only_seeds] == ["all", "all"]


def test_paths_that_differ_show_their_differing_part_and_a_repeated_job_joins_its_seed_group(tmp_path):
    out = tmp_path / "outputs"
    sweep = out / "multirun" / "2026-11-26" / "10-00-00"
    root = "dataset.root=/home/me/projects/cnnlab/data"
    for activation in ("relu", "elu"):
        for seed in range(3):
            configured(sweep / f"activation={activation},trainer.seed={seed}", f"activation={activation}",
                       f"trainer.seed={seed}", root)
    configured(out / "2026-11-27" / "09-00-00", "activation=relu", "trainer.seed=0", root)  # repeats a job
    configured(out / "2026-11-27" / "09-30-00", "activation=relu", "dataset.root=/home/me/projects/cnnlab-old/data")
    runs = find_runs([str(out)])
    by_folder = {run.path.name: run for run in runs}
    assert by_folder["09-30-00"].name == "activation=relu, dataset.root=…/cnnlab-old/data, seed=0"
    assert by_folder["activation=elu,trainer.seed=1"].name == "activation=elu, dataset.root=…/cnnlab/data, seed=1"
    assert fixed_settings(runs)["dataset.root"] == "/home/me/projects/…"  # what every name leaves out
    groups = seed_groups(runs)
    relu = groups["activation=relu, dataset.root=…/cnnlab/data"]
    assert relu["runs"] == 4 and relu["seeds"] == ["0", "0", "1", "2"]  # the single run joined the sweep's seeds
    assert by_folder["09-00-00"].name == "activation=relu, dataset.root=…/cnnlab/data, seed=0 (09-00-00)"
    assert set(groups) == {"activation=elu, dataset.root=…/cnnlab/data", "activation=relu, dataset.root=…/cnnlab/data",
                           "activation=relu, dataset.root=…/cnnlab-old/data"}


def test_legend_labels_wrap_long_names_without_cutting_the_part_that_differs():
    from cnnlab.analysis.figures import drawing

    runs = [seeded_run("relu", 0), seeded_run("elu", 0)]
    for run, width in zip(runs, ("1024", "512")):  # long names that differ at their ends
        run.settings["model.hidden"] = "[" + ",".join([width] * 20) + "]"
        run.overrides["model.hidden"] = run.settings["model.hidden"]
        run.settings["optimizer.lr"] = run.overrides["optimizer.lr"] = "0.1" if run.settings["activation"] == "relu" else "0.2"
    name_runs(runs)
    d = drawing(runs, {run.path: {"val/acc": ([1], [0.5])} for run in runs})
    assert ["".join(label.split()) for label in d.labels.values()] == ["".join(run.name.split()) for run in runs]
    assert all("lr=0." in label and label.count("\n") >= 2 for label in d.labels.values())  # three lines, not cut


def test_a_path_is_shown_by_where_the_paths_differ_and_its_own_name():
    runs = [seeded_run("relu", 0), seeded_run("relu", 1), seeded_run("relu", 2)]
    for run, root in zip(runs, ("/home/me/a/runs/2026/data", "/home/me/b/runs/2026/data", "data")):
        run.settings["dataset.root"] = root
    assert shown_values(runs[:2], ["dataset.root"])["dataset.root"] == {"/home/me/a/runs/2026/data": "…/a/…/data",
                                                                        "/home/me/b/runs/2026/data": "…/b/…/data"}
    assert shown_values(runs, ["dataset.root"])["dataset.root"]["data"] == "data"  # not all paths: as they are

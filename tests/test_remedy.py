"""`cnnlab remedy` (issue 22): each finding's candidate remedies as override maps, the study's plan (its
option files composed by Hydra), the verdict on hand-made results, and whole studies of tiny sick runs
on generated data: vanishing gradients, a mismatched init (interrupted and resumed), a healthy run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from scipy import stats

from cnnlab.analysis.findings import WARNING, Finding, diagnose
from cnnlab.analysis.folders import find_runs
from cnnlab.analysis.remedies import REMEDIES, candidate_remedies, remedy_name
from cnnlab.analysis.remedy_study import (
    BASELINE,
    compare_to_baseline,
    is_lower,
    outcomes,
    plan_study,
    propose,
    recommend,
)
from cnnlab.analysis.runs import Run
from cnnlab.cli import run_command
from cnnlab.cli.remedy_command import (
    compose_problem,
    not_applied,
    plan_the_study,
    read_the_run,
    remedy_command,
    sweep_arguments,
    write_options,
)
from cnnlab.cli.train_command import train_command
from cnnlab.rundir import foreign_files
from tests.helpers import TINY, TINY_DATA, TINY_TRAINER
from tests.test_findings import CFG, FACTS, killed_by_its_lr

QUIET = ["probes.density=false", "probes.histograms=false", "trainer.threads=1"]  # fast and reproducible
DOWN_ONLY, BOTH = (0.1,), (10.0, 0.1)


def finding(kind: str, advice: str = "Try something.", remedies=()) -> Finding:
    return Finding(kind, WARNING, None, 0, 0.0, "message", advice, list(remedies))


# --- the candidate remedies of each kind of finding ------------------------------------------------------
def test_vanishing_gradients_in_a_sigmoid_net_propose_batchnorm_its_init_and_relu():
    facts = replace(FACTS, activation="sigmoid", init="default")
    assert candidate_remedies(finding("vanishing_gradients"), facts, BOTH) == [
        {"model.batchnorm": True}, {"model.init": "xavier"}, {"activation": "relu", "model.init": "kaiming"}]
    # what the run has already is not proposed again
    assert candidate_remedies(finding("vanishing_gradients"), replace(facts, batchnorm=True, init="xavier"), BOTH) == [
        {"activation": "relu", "model.init": "kaiming"}]


def test_dying_units_propose_a_third_and_a_tenth_of_the_lr_leaky_relu_and_batchnorm():
    facts = replace(FACTS, lr=0.1)
    assert candidate_remedies(finding("dying_units"), facts, DOWN_ONLY) == [
        {"optimizer.lr": 0.0333}, {"optimizer.lr": 0.01}, {"activation": "leaky_relu"}, {"model.batchnorm": True}]


@pytest.mark.parametrize("kind, facts, expected", [
    ("diverged", replace(FACTS, lr=0.5), [{"optimizer.lr": 0.05}, {"trainer.grad_clip": 1.0}, {"model.batchnorm": True}]),
    ("activation_scale", replace(FACTS, init="lecun"), [{"model.init": "kaiming"}, {"model.batchnorm": True}]),
    ("gradient_growth", replace(FACTS, batchnorm=True, grad_clip=1.0), [{"model.batchnorm": False}, {"optimizer.lr": 0.01}]),
    ("dead_at_init", replace(FACTS, init="xavier"), [{"activation": "leaky_relu"}, {"model.init": "kaiming"},
                                                     {"model.batchnorm": True}]),
])
def test_each_kind_proposes_the_fixes_of_its_source_that_change_something(kind, facts, expected):
    assert candidate_remedies(finding(kind), facts, DOWN_ONLY) == expected


def test_every_rule_has_remedies_and_a_note_with_no_advice_has_none():
    from cnnlab.analysis.findings import RULES

    assert {rule.__name__ for rule in RULES} == set(REMEDIES)
    assert candidate_remedies(finding("dying_units", advice=""), FACTS, DOWN_ONLY) == []


def test_the_lr_moves_only_where_the_series_allow_it():
    # too-small updates and nothing else: the lr goes up, never down, within the optimizer's range
    assert candidate_remedies(finding("update_ratio"), replace(FACTS, lr=0.01), (10.0,))[0] == {"optimizer.lr": 0.1}
    assert {"optimizer.lr": 0.001} not in candidate_remedies(finding("update_ratio"), replace(FACTS, lr=0.01), (10.0,))
    assert candidate_remedies(finding("not_learning"), replace(FACTS, lr=1.0), BOTH)[0] == {"optimizer.lr": 0.1}
    assert candidate_remedies(finding("not_learning"), FACTS, ())[0] == {"model.batchnorm": True}  # dead from step 0


def test_a_net_killed_by_its_lr_gets_no_remedy_with_a_higher_lr():
    series, facts = killed_by_its_lr()
    found = diagnose(series, facts, CFG)
    lrs = [remedy["optimizer.lr"] for f in found for remedy in f.remedies if "optimizer.lr" in remedy]
    assert lrs and all(lr < facts.lr for lr in lrs)
    assert {"activation": "leaky_relu"} in next(f for f in found if f.kind == "dying_units").remedies
    assert all(isinstance(f.to_dict()["remedies"], list) for f in found)


def test_remedy_names_are_folder_and_override_safe():
    assert remedy_name({"activation": "relu", "model.init": "kaiming"}) == "activation-relu+init-kaiming"
    assert remedy_name({"model.batchnorm": True}) == "batchnorm-true"
    assert remedy_name({"optimizer.lr": 0.0333}) == "lr-0.0333"


# --- the plan: option files that Hydra composes into the run's config plus the remedy -------------------------
def test_settings_a_remedy_changes_leave_the_command_line_for_every_option_file(tmp_path):
    findings = [finding("vanishing_gradients", remedies=[{"activation": "relu", "model.init": "kaiming"}]),
                finding("diverged", remedies=[{"optimizer.lr": 0.05}, {"activation": "relu", "model.init": "kaiming"}]),
                Finding("dying_units", "info", None, 0, 0.0, "a note", "", [{"optimizer.lr": 0.01}])]
    overrides = ["activation=leaky_relu", "activation.negative_slope=0.2", "optimizer=sgd", "optimizer.lr=0.5",
                 "trainer.seed=3", "trainer.epochs=2", "model.hidden=[8,8]", *TINY[:3]]
    config = {"activation": {"name": "leaky_relu", "negative_slope": 0.2}, "optimizer": {"lr": 0.5}}
    plan = plan_study(findings, overrides, config, {"activation": "leaky_relu"}, most=6)
    assert plan.warnings == ["vanishing_gradients", "diverged"]  # the info note proposes nothing
    assert list(plan.remedies) == ["activation-relu+init-kaiming", "lr-0.05"]
    assert plan.command_line == ["optimizer=sgd", "model.hidden=[8,8]", *TINY[:3]]
    options = write_options(tmp_path, plan.options)
    run = {"config_dir": None}
    for name, remedy in [(BASELINE, {"activation": "leaky_relu", "activation.negative_slope": 0.2, "optimizer.lr": 0.5}),
                         *plan.remedies.items()]:
        assert compose_problem(run, plan.command_line, options, name, remedy) is None, name
    # the relu option drops leaky_relu's slope (ReLU has none), and keeps the run's lr
    assert "negative_slope" not in plan.options["activation-relu+init-kaiming"]
    assert "lr: 0.5" in plan.options["activation-relu+init-kaiming"]
    assert propose(findings, most=1)[1] == {"activation-relu+init-kaiming": {"activation": "relu", "model.init": "kaiming"}}


def test_a_remedy_that_a_file_of_the_run_overrides_is_said_to_be_not_applied(tmp_path):
    plan = plan_study([finding("saturation", remedies=[{"activation": "relu", "model.init": "kaiming"}])],
                      ["activation=tanh"], {}, {"activation": "tanh"}, most=6)
    options = write_options(tmp_path, plan.options)
    # the user's own override of the init comes after every file, so the remedy's init cannot hold
    problem = compose_problem({"config_dir": None}, ["model.init=xavier"], options, "activation-relu+init-kaiming",
                              {"activation": "relu", "model.init": "kaiming"})
    assert problem and "model.init=kaiming" in problem


# --- the verdict on hand-made results ------------------------------------------------------------------
def job(remedy: str, seed: int, val_acc: float, warnings: list[str], status: str = "completed") -> Run:
    findings = [{"kind": kind, "severity": "warning"} for kind in warnings]
    return Run(Path(f"/study/{remedy}-{seed}"), {"remedy": remedy, "trainer.seed": str(seed)},
               {"status": status, "val_acc": val_acc, "seconds": 2.0, "findings": findings})


def test_outcomes_compare_each_remedy_with_the_baseline_by_welchs_test():
    plan = plan_study([finding("vanishing_gradients", remedies=[{"model.batchnorm": True}, {"model.init": "xavier"}])],
                      [], {}, {}, most=6)
    base, bn, xavier = [0.50, 0.52, 0.51], [0.80, 0.83, 0.81], [0.49, 0.53, 0.50]
    runs = [*(job(BASELINE, s, a, ["vanishing_gradients", "not_learning"]) for s, a in enumerate(base)),
            *(job("batchnorm-true", s, a, ["gradient_growth"] if s == 1 else []) for s, a in enumerate(bn)),
            *(job("init-xavier", s, a, ["vanishing_gradients"] if s == 2 else []) for s, a in enumerate(xavier))]
    rows = {row["name"]: row for row in compare_to_baseline(outcomes(runs, plan))}
    bn_row, xavier_row = rows["batchnorm-true"], rows["init-xavier"]
    assert bn_row["cleared"] == ["vanishing_gradients", "not_learning"] and bn_row["new"] == ["gradient_growth"]
    assert xavier_row["cleared"] == ["not_learning"] and xavier_row["remaining"] == ["vanishing_gradients"]
    assert bn_row["delta"] == pytest.approx(sum(bn) / 3 - sum(base) / 3)
    assert bn_row["p"] == pytest.approx(stats.ttest_ind(bn, base, equal_var=False).pvalue)
    half = stats.t.ppf(0.975, 2) * stats.tstd(bn) / 3 ** 0.5
    assert bn_row["val_acc_ci95"] == pytest.approx(half)


def row(name: str, overrides: dict, cleared: list, remaining: list, new: list, val_acc: float, delta: float, p=None):
    return {"name": name, "overrides": overrides, "cleared": cleared, "remaining": remaining, "new": new,
            "val_acc": val_acc, "delta": delta, "p": p, "lower": is_lower(delta, p)}


def test_the_recommendation_is_the_fewest_settings_that_cure_without_losing_accuracy():
    one = row("a", {"model.batchnorm": True}, ["x", "y"], [], [], 0.80, 0.10)
    two = row("b", {"activation": "relu", "model.init": "kaiming"}, ["x", "y"], [], [], 0.90, 0.20)
    worse = row("c", {"model.init": "xavier"}, ["x", "y"], [], [], 0.60, -0.10, p=0.001)
    tied = row("d", {"optimizer.lr": 0.01}, ["x", "y"], [], [], 0.85, 0.15)
    assert recommend([two, one, worse]) == (one, True)
    assert recommend([two, one, tied]) == (tied, True)  # one setting each: the higher accuracy
    assert recommend([worse]) == (None, False)  # a cure that costs accuracy is no cure
    partial = row("e", {"model.init": "xavier"}, ["x"], ["y"], [], 0.7, 0.0)
    new = row("f", {"model.batchnorm": True}, ["x", "y"], [], ["z"], 0.9, 0.2)
    assert recommend([partial, new]) == (new, False)  # clears two, adds one: the best partial
    assert recommend([row("g", {"trainer.grad_clip": 1.0}, [], ["x", "y"], [], 0.9, 0.1)]) == (None, False)


def test_lower_accuracy_is_judged_by_welchs_test_where_it_can_tell():
    assert is_lower(-0.01, None) and is_lower(-0.01, 0.01)
    assert not is_lower(-0.01, 0.4) and not is_lower(0.0, None) and not is_lower(0.02, 0.001)


def test_a_remedy_that_trains_where_the_baseline_diverged_is_not_lower_and_one_that_diverges_is():
    plan = plan_study([finding("diverged", remedies=[{"optimizer.lr": 0.05}, {"trainer.grad_clip": 1.0}])], [], {}, {}, 6)
    runs = [job(BASELINE, 0, None, ["diverged"], status="diverged"), job("lr-0.05", 0, 0.9, []),
            job("grad_clip-1", 0, None, ["diverged"], status="diverged")]
    rows = compare_to_baseline(outcomes(runs, plan))
    assert [(r["name"], r["cleared"], r["delta"], r["lower"]) for r in rows] == [
        ("lr-0.05", ["diverged"], None, False), ("grad_clip-1", [], None, True)]
    assert recommend(rows) == (rows[0], True)


# --- whole studies, on generated data ----------------------------------------------------------------
def train_sick_run(folder: Path, *overrides: str) -> Path:
    assert train_command([*TINY, *QUIET, *overrides, f"hydra.run.dir={folder}"]) in (0, 3)
    return folder


VANISHING = ["activation=sigmoid", "model.hidden=[16,16,16,16,16,16,16,16,16,16]", "optimizer=sgd", "optimizer.lr=0.05",
             "trainer.epochs=2", "probes.every=4"]


def test_a_ten_layer_sigmoid_nets_recommended_remedy_clears_its_vanishing_gradients(tmp_path, capsys):
    run = train_sick_run(tmp_path / "sigmoid", *VANISHING)
    metrics = json.loads((run / "metrics.json").read_text())
    vanishing = next(f for f in metrics["findings"] if f["kind"] == "vanishing_gradients")
    assert {"model.batchnorm": True} in vanishing["remedies"]  # metrics.json carries them, and inspect --json
    assert f"To try their remedies and see which one cures the run: cnnlab remedy {run}" in capsys.readouterr().out
    assert run_command(["inspect", str(run), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)["findings"]
    assert next(f for f in inspected if f["kind"] == "vanishing_gradients")["remedies"] == vanishing["remedies"]
    assert remedy_command([str(run), "--json", "--max-remedies", "3"]) == 0
    study = json.loads(capsys.readouterr().out)  # the sweep's own lines went to stderr
    assert set(study) >= {"baseline", "remedies", "recommended", "cures_all", "verdict", "epochs", "seeds"}
    assert set(study["baseline"]) >= {"overrides", "warnings", "val_acc"}
    assert study["baseline"]["overrides"]["activation"] == "sigmoid" and study["seeds"] == [0]
    assert "vanishing_gradients" in study["baseline"]["warnings"] and len(study["remedies"]) == 3
    for remedy in study["remedies"]:
        assert set(remedy) >= {"overrides", "cleared", "remaining", "new", "val_acc", "delta", "p"}
    recommended = next(r for r in study["remedies"] if r["overrides"] == study["recommended"])
    assert "vanishing_gradients" in recommended["cleared"] and recommended["delta"] >= 0
    assert json.loads((run / "remedies" / "remedy.json").read_text()) == study
    assert (run / "remedies" / "remedy.png").stat().st_size > 10_000
    jobs = sorted(path.name for path in (run / "remedies").glob("+remedy=*"))
    assert jobs == ["+remedy=activation-relu+init-kaiming", "+remedy=baseline", "+remedy=batchnorm-true",
                    "+remedy=init-xavier"]
    assert json.loads((run / "remedies" / "+remedy=batchnorm-true" / "metrics.json").read_text())["epochs"] == 2
    # the study inside the run's folder is cnnlab's: it stops no resume or rerun of the run there
    assert foreign_files(run) == [] and run_command(["train", f"resume={run}"]) == 0


def interrupted_after_the_baseline(cfg):
    """The study's job: the baseline runs, then the sweep is interrupted (Ctrl-C) at the first remedy."""
    from hydra.core.hydra_config import HydraConfig

    from cnnlab.cli.job import run_job

    if HydraConfig.get().runtime.choices["remedy"] != BASELINE:
        raise KeyboardInterrupt
    return run_job(cfg, None, ".hydra")


def test_a_mismatched_init_is_cured_by_the_matching_init_in_a_study_that_resumes(tmp_path, capsys):
    run = train_sick_run(tmp_path / "lecun", "activation=relu", "model.init=lecun", "trainer.epochs=3",
                         "model.hidden=[32,32,32,32,32,32,32,32,32,32]", "probes.every=4")
    assert remedy_command([str(run)], job=interrupted_after_the_baseline) == 130
    _, err = capsys.readouterr()
    assert "run the same command again to finish it" in err
    baseline = run / "remedies" / "+remedy=baseline" / "metrics.json"
    before = baseline.read_bytes()
    assert remedy_command([str(run)]) == 0
    out, err = capsys.readouterr()
    assert baseline.read_bytes() == before and "already ended (completed); its results are kept" in out + err
    study = json.loads((run / "remedies" / "remedy.json").read_text())
    assert study["baseline"]["warnings"] == ["activation_scale"]
    assert study["recommended"] == {"model.init": "kaiming"} and study["cures_all"]
    assert "recommended: model.init=kaiming clears every warning (activation_scale)" in " ".join(out.split())
    # another budget for the same folder would mix budgets: refused
    assert remedy_command([str(run), "--epochs", "1"]) == 2
    assert "holds a study of 3 epochs a job" in capsys.readouterr().err


def test_a_job_of_an_experiments_sweep_is_remedied_without_that_sweep(tmp_path, capsys):
    """deep_saturation sweeps activation=sigmoid,tanh,relu in its file: the study of its sigmoid job runs
    the baseline and the remedy once each, and the remedy that changes the activation gets it."""
    assert train_command(["-m", "experiment=deep_saturation", *TINY_DATA, *TINY_TRAINER, *QUIET, "activation=sigmoid", "trainer.epochs=1",
                          "probes.every=4", f"hydra.sweep.dir={tmp_path / 'sweep'}"]) == 0
    [job] = [path for path in (tmp_path / "sweep").iterdir() if path.is_dir()]
    run = read_the_run(job)
    plan = plan_the_study(run, most=6)
    relu = next(name for name, remedy in plan.remedies.items() if remedy.get("activation") == "relu")
    plan.remedies = {relu: plan.remedies[relu]}
    study_dir = job / "remedies"
    budget = {"epochs": 1, "seeds": [0]}
    train_command(sweep_arguments(run, plan, study_dir, budget, []))
    jobs = sorted(path.name for path in study_dir.iterdir() if (path / "metrics.json").is_file())
    assert jobs == ["+remedy=activation-relu+init-kaiming", "+remedy=baseline"]
    relu_config = yaml.safe_load((study_dir / jobs[0] / ".hydra" / "config.yaml").read_text())
    assert relu_config["activation"]["name"] == "relu" and relu_config["model"]["init"] == "kaiming"
    assert not_applied(find_runs([str(study_dir)]), plan) == {}


def test_a_run_whose_config_record_lacks_its_budget_is_one_message(tmp_path, capsys):
    run = train_sick_run(tmp_path / "edited")
    (run / ".hydra" / "config.yaml").write_text("model: {name: mlp}\n")
    capsys.readouterr()
    assert run_command(["remedy", str(run)]) == 2
    assert "has no trainer.epochs and trainer.seed: cnnlab cannot rerun the run" in capsys.readouterr().err


def test_a_healthy_run_has_nothing_to_remedy_and_starts_nothing(tmp_path, capsys):
    run = train_sick_run(tmp_path / "healthy")
    capsys.readouterr()
    assert remedy_command([str(run)]) == 0
    assert "nothing to remedy: the run has no warning" in capsys.readouterr().out
    assert not (run / "remedies").exists()


@pytest.mark.parametrize("setup, args, message", [
    ("missing", [], "does not exist"),
    ("sweep", [], "is a sweep folder: remedy one of its runs"),
    ("never_trained", [], "never trained (status invalid"),
    ("run", ["--seeds", "0"], "--seeds 0: it must be a whole number of at least 1"),
])
def test_what_cannot_be_remedied_is_one_message_and_exit_2(tmp_path, capsys, setup, args, message):
    folder = tmp_path / setup
    if setup == "sweep":
        folder.mkdir()
        (folder / "multirun.yaml").write_text("hydra: {}\n")
    elif setup in ("never_trained", "run"):
        (folder / ".hydra").mkdir(parents=True)
        for name in ("config", "hydra", "overrides"):
            (folder / ".hydra" / f"{name}.yaml").write_text("{}\n" if name != "overrides" else "[]\n")
        (folder / "metrics.json").write_text(json.dumps({"status": "invalid", "error": "bad"}))
    assert run_command(["remedy", str(folder), *args]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err

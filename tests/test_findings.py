import json
import math
import re
from dataclasses import replace

import pytest

from cnnlab.config import SCHEMAS, as_dict, validate
from cnnlab.errors import UserError
from cnnlab.analysis.findings import RULES, Finding, RunFacts, diagnose, run_facts
from cnnlab.analysis.remedies import ADAPTIVE, LR_RANGES
from tests.helpers import TINY, compose_config

CFG = validate(compose_config()).findings
FACTS = RunFacts(num_classes=10, steps_per_epoch=100, activation="relu", init="kaiming", batchnorm=False,
                 optimizer="sgd", lr=0.1, momentum=0.9, grad_clip=None, status="completed", diverged_step=None)


def kinds(series, facts=FACTS, cfg=CFG):
    return [f.kind for f in diagnose(series, facts, cfg)]


def probes(*values, every=100):
    """A probe series at steps 0, every, 2*every, ..."""
    return [(i * every, v) for i, v in enumerate(values)]


# --- the facts of a run ------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [[], ["optimizer=sgd", "optimizer.momentum=0.5", "trainer.grad_clip=1.0"],
                                       ["activation=elu", "model.init=kaiming", "model.batchnorm=true"],
                                       ["preset=selu_lecun", "optimizer=rmsprop"]])
def test_run_facts_of_a_validated_config_are_the_settings_the_trainer_runs_with(overrides):
    run = validate(compose_config(*TINY, *overrides))
    metrics = {"status": "diverged", "diverged_step": 12}
    facts = run_facts(as_dict(run), num_classes=7, steps_per_epoch=8, metrics=metrics)
    assert facts == RunFacts(
        num_classes=7, steps_per_epoch=8, activation=run.activation.name, init=run.model.init,
        batchnorm=run.model.batchnorm, optimizer=run.optimizer.name, lr=run.optimizer.lr,
        momentum=float(getattr(run.optimizer, "momentum", 0.0)), grad_clip=run.trainer.grad_clip,
        status="diverged", diverged_step=12,
        widths=tuple(run.model.hidden) if run.model.name == "mlp" else (*run.model.channels, run.model.fc_hidden))


@pytest.mark.parametrize("model, widths", [({"name": "mlp", "hidden": [256, 128]}, (256, 128)),
                                           ({"name": "convnet", "channels": [32, 64], "fc_hidden": 128}, (32, 64, 128)),
                                           ({"hidden": "odd"}, ()), ({"channels": [32], "fc_hidden": None}, ()),
                                           ({"hidden": [True, 3]}, ()), ({}, ())])
def test_run_facts_take_the_widths_of_the_activation_layers_from_the_config(model, widths):
    assert run_facts({"model": model}, num_classes=10, steps_per_epoch=5, metrics={}).widths == widths


def test_run_facts_of_an_older_or_partial_config_take_the_defaults():
    facts = run_facts({"model": None, "optimizer": {"name": "sgd", "momentum": None}, "trainer": "odd"},
                      num_classes=10, steps_per_epoch=5, metrics={})
    assert (facts.activation, facts.init, facts.batchnorm, facts.optimizer, facts.lr, facts.momentum) == (
        "", "default", False, "sgd", 0.0, 0.0)
    assert (facts.grad_clip, facts.status, facts.diverged_step) == (None, "unknown", None)


def test_dead_at_init_fires_on_a_mostly_dead_layer_at_step_0_only():
    series = {"dead_fraction/act01_fc": probes(0.1, 0.1), "dead_fraction/act02_fc": probes(0.6, 0.6),
              "dead_fraction/all": probes(0.5, 0.5)}
    [finding] = diagnose(series, FACTS, CFG)
    assert (finding.kind, finding.layer, finding.step, finding.value) == ("dead_at_init", "act02_fc", 0, 0.6)
    assert "60%" in finding.message and "activation=leaky_relu" in finding.advice
    assert kinds({"dead_fraction/act02_fc": [(100, 0.6), (200, 0.6)]}) == []  # no step-0 probe


@pytest.mark.parametrize("last, severity", [(0.25, "info"), (0.6, "warning"), (0.15, None)])
def test_dying_units_grade_the_rise_of_the_dead_fraction(last, severity):
    found = diagnose({"dead_fraction/act01_fc": probes(0.0, 0.05, last)}, FACTS, CFG)
    assert [f.severity for f in found] == ([severity] if severity else [])
    if severity:
        assert found[0].layer == "act01_fc" and found[0].step == 200 and "optimizer.lr=0.01" in found[0].advice


def test_a_dead_fraction_that_falls_or_has_one_probe_is_not_dying():
    assert kinds({"dead_fraction/act01_fc": probes(0.4, 0.1)}) == []
    assert kinds({"dead_fraction/act01_fc": probes(0.0)}) == []



def test_dying_units_judge_the_training_images_and_the_probe_batch_only_when_a_run_ends_in_its_first_epoch():
    batch_rise = {"dead_on_batch/act01_fc": probes(0.0, 0.3, 0.7, every=5)}
    # Diverged at step 12: one measurement on the data (step 0), three on the probe batch.
    [found] = diagnose({"dead_fraction/act01_fc": [(0, 0.0)], **batch_rise}, FACTS, CFG)
    assert (found.kind, found.severity, found.step, found.value) == ("dying_units", "warning", 10, 0.7)
    assert "on the probe batch rose from 0% (step 0) to 70% (step 10)" in found.message
    # Two measurements on the data: they are what is judged, however high the batch reads.
    assert kinds({"dead_fraction/act01_fc": probes(0.0, 0.05), **batch_rise}) == []
    [found] = diagnose({"dead_fraction/act01_fc": probes(0.0, 0.3), **batch_rise}, FACTS, CFG)
    assert "on the training images rose from 0% (step 0) to 30% (step 100)" in found.message

def test_saturation_fires_on_the_median_of_the_last_probes():
    tanh = replace(FACTS, activation="tanh", init="default")
    found = diagnose({"saturation/act02_fc": probes(0.1, 0.3, 0.7, 0.8, 0.2)}, tanh, CFG)
    assert [(f.kind, f.layer) for f in found] == [("saturation", "act02_fc")]
    assert "model.init=xavier" in found[0].advice
    # healthy: saturation that passes (one spike) or stays low
    assert kinds({"saturation/act02_fc": probes(0.1, 0.9, 0.2, 0.1)}, tanh) == []
    assert kinds({"saturation/act01_fc": probes(0.05, 0.1)}, tanh) == []


def grad_norms(first, top, n=4):
    return {"grad_norm/total": probes(*[1.0] * n), "grad_norm/layer01_fc": probes(*[first] * n),
            "grad_norm/layer02_fc": probes(*[0.5] * n), "grad_norm/layer03_fc": probes(*[top] * n),
            "grad_norm/layer04_classifier": probes(*[5.0] * n)}


def test_vanishing_gradients_compare_the_first_layer_with_the_last_hidden_one():
    found = diagnose(grad_norms(1e-5, 1.0), FACTS, CFG)
    assert [(f.kind, f.layer) for f in found] == [("vanishing_gradients", "layer01_fc")]
    assert "layer03_fc" in found[0].message  # the last hidden layer, not the classifier
    assert kinds(grad_norms(0.1, 1.0)) == []
    assert kinds({"grad_norm/layer01_fc": probes(1e-6), "grad_norm/layer02_classifier": probes(1.0)}) == []


def test_exploding_gradients_fire_on_a_jump_over_the_running_median():
    series = {"grad_norm/total": probes(1.0, 2.0, 1.5, 1.2, 300.0, 1.0)}
    [finding] = diagnose(series, FACTS, CFG)
    assert (finding.kind, finding.step, finding.value) == ("exploding_gradients", 400, 300.0)
    assert "trainer.grad_clip=" in finding.advice
    # healthy: a steady rise, and a large value before any history
    assert kinds({"grad_norm/total": probes(1, 2, 4, 8, 16, 32, 64)}) == []
    assert kinds({"grad_norm/total": probes(0.01, 5.0)}) == []


def test_clipping_on_most_steps_is_reported_and_occasional_clipping_is_not():
    clipped = replace(FACTS, grad_clip=1.0)
    [finding] = diagnose({"grad_norm/total": probes(3.0, 2.5, 2.0, 0.5)}, clipped, CFG)
    assert finding.kind == "exploding_gradients" and "3 of 4" in finding.message
    assert kinds({"grad_norm/total": probes(3.0, 0.5, 0.6, 0.4)}, clipped) == []


@pytest.mark.parametrize("activation, init, advice", [("relu", "default", "model.init=kaiming"),
                                                      ("selu", "default", "model.init=lecun"),
                                                      ("sigmoid", "kaiming", "model.init=xavier")])
def test_activation_scale_names_the_init_that_fits_the_activation(activation, init, advice):
    facts = replace(FACTS, activation=activation, init=init)
    series = {"act_std/act01_fc": probes(1.0, 1.0), "act_std/act02_fc": probes(0.3, 0.3),
              "act_std/act10_fc": probes(0.02, 0.5)}  # sorted by number, not by name
    [finding] = diagnose(series, facts, CFG)
    assert (finding.kind, finding.layer) == ("activation_scale", "act10_fc")
    assert advice in finding.advice and "model.batchnorm=true" in finding.advice


def test_activation_scale_is_quiet_for_a_steady_scale_or_without_step_0():
    assert kinds({"act_std/act01_fc": probes(1.0), "act_std/act02_fc": probes(0.5)}) == []
    assert kinds({"act_std/act01_fc": [(100, 1.0)], "act_std/act02_fc": [(100, 0.01)]}) == []


@pytest.mark.parametrize("values, fires", [
    ([-3.0, -0.5, -0.4, -0.6], "optimizer.lr=0.01"),  # too high
    ([-4.0, -5.5, -6.0, -5.8], "optimizer.lr=1"),  # too low
    ([-0.5, -2.5, -3.0, -3.2], None),  # early spike, then healthy
    ([-3.0, -0.5], None),  # one point in the second half: too few to judge
])
def test_update_ratio_judges_the_median_of_the_second_half(values, fires):
    found = diagnose({"update_ratio/layer01_fc": [(100 * (i + 1), v) for i, v in enumerate(values)]}, FACTS, CFG)
    assert [f.advice.split("Try ")[-1].rstrip(".") for f in found] == ([fires] if fires else [])


def test_not_learning_fires_when_the_loss_stays_at_chance_after_an_epoch():
    chance = math.log(10)
    [finding] = diagnose({"train/loss": [(s, chance + 0.01) for s in range(0, 300, 50)]}, FACTS, CFG)
    assert finding.kind == "not_learning" and finding.step == 250
    assert kinds({"train/loss": [(0, chance), (50, chance), (100, 1.5), (150, 1.2)]}) == []
    assert kinds({"train/loss": [(0, chance), (50, chance)]}) == []  # not yet an epoch


def test_diverged_names_the_first_layer_whose_statistics_blew_up():
    facts = replace(FACTS, status="diverged", diverged_step=230)
    series = {"act_std/act02_fc": probes(1.0, 1.0, math.nan), "act_std/act03_fc": probes(1.0, math.inf, math.nan),
              "grad_norm/layer03_fc": probes(1.0, 1.0, math.nan),
              "update_ratio/layer01_fc": probes(-3.0, -math.inf, -3.0)}  # a frozen step, not a blow-up
    [finding] = diagnose(series, facts, CFG)
    assert (finding.kind, finding.layer, finding.step) == ("diverged", "act03_fc", 230)
    assert "step 100" in finding.message
    assert diagnose({}, facts, CFG)[0].layer is None
    assert kinds(series) == []  # status completed


def test_edge_of_stability_is_information_against_the_logged_limit():
    # More in test_sharpness.py: the pairs judged per optimizer, and runs from before issue 19.
    series = {"sharpness/top_eigenvalue": probes(5.0, 20.0, 37.0), "sharpness/min_eigenvalue": probes(-1.0, -1.0, -1.0),
              "sharpness/stability_limit": probes(38.0, 38.0, 38.0)}
    [finding] = diagnose(series, FACTS, CFG)
    assert (finding.kind, finding.severity, finding.step) == ("edge_of_stability", "info", 200)
    assert kinds({**series, "sharpness/top_eigenvalue": probes(5.0, 20.0)}) == []
    assert kinds({"sharpness/top_eigenvalue": probes(5.0, 36.0)}) == []  # no limit logged: nothing to compare with


def healthy_run() -> dict:
    """Two probes of a run that trains well: nothing to say."""
    return {"train/loss": [(0, 2.30), (50, 1.2), (100, 0.6), (150, 0.4)], "lr": [(0, 0.1), (150, 0.1)],
            "grad_norm/total": [(0, 1.0), (50, 1.5), (100, 1.2), (150, 1.1)],
            "dead_fraction/act01_fc": [(0, 0.0), (150, 0.05)], "dead_fraction/all": [(0, 0.0), (150, 0.04)],
            "act_std/act01_fc": [(0, 0.8), (150, 1.0)], "act_std/act02_fc": [(0, 0.7), (150, 0.9)],
            "grad_norm/layer01_fc": [(150, 0.3)], "grad_norm/layer02_fc": [(150, 0.4)],
            "grad_norm/layer03_classifier": [(150, 0.9)], "update_ratio/layer01_fc": [(150, -3.1)]}


def test_a_healthy_short_run_and_an_empty_one_say_nothing():
    assert diagnose(healthy_run(), FACTS, CFG) == []
    assert diagnose({}, FACTS, CFG) == []
    for rule in RULES:
        assert rule({}, FACTS, CFG) == []


def test_diagnose_puts_warnings_first_then_orders_by_step_and_can_be_switched_off():
    series = {"dead_fraction/act01_fc": probes(0.0, 0.3), "dead_fraction/act02_fc": probes(0.0, 0.1, 0.7),
              "sharpness/top_eigenvalue": probes(37.0), "sharpness/min_eigenvalue": probes(-1.0),
              "sharpness/stability_limit": probes(38.0), "grad_norm/total": probes(1, 1, 1, 1, 500)}
    found = diagnose(series, FACTS, CFG)
    assert [(f.kind, f.severity, f.step) for f in found] == [
        ("dying_units", "warning", 200), ("exploding_gradients", "warning", 400),
        ("edge_of_stability", "info", 0), ("dying_units", "info", 100)]
    assert diagnose(series, FACTS, replace(CFG, enabled=False)) == []


def test_findings_are_json_safe():
    for value in (math.nan, math.inf, None, 0.5):
        d = Finding("k", "info", None, 3, value, "m", "a").to_dict()
        assert json.loads(json.dumps(d, allow_nan=False)) == d
        assert d["value"] == (value if value == 0.5 else None)


def test_findings_settings_compose_and_are_range_checked():
    assert CFG.enabled and CFG.dead_at_init == 0.5 and CFG.vanishing_ratio == 1e-3
    assert validate(compose_config("findings.enabled=false")).findings.enabled is False


@pytest.mark.parametrize("override", ["findings.dead_at_init=0", "findings.saturation=1.5", "findings.dying_info=-0.1",
                                      "findings.dying_warning=0.1", "findings.saturation_probes=0",
                                      "findings.vanishing_ratio=1", "findings.exploding_factor=1", "findings.most=0.4",
                                      "findings.activation_scale=0.5", "findings.update_ratio_low=0",
                                      "findings.not_learning=0", "findings.edge_of_stability=0",
                                      "findings.update_ratio_low_adaptive=-1", "findings.loss_rise=0",
                                      "findings.learning_well=1", "findings.rank_collapse=0",
                                      "findings.gradient_growth=1",
                                      "findings.most=nan", "+findings.bogus=1"])
def test_impossible_findings_settings_are_user_errors_that_name_them(override):
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(UserError, match=re.escape(key)):
        validate(compose_config(override))


def test_a_layer_that_does_not_move_at_all_is_not_blamed_on_the_learning_rate():
    from cnnlab.analysis.findings import update_ratio

    frozen = {"update_ratio/layer02_fc": [(step, -20.0) for step in range(0, 100, 10)]}
    assert update_ratio(frozen, FACTS, CFG) == []


# --- no harmful advice about the learning rate (issue 19) --------------------------------------------
def lrs_advised(found) -> list[float]:
    """Every learning rate the findings advise, in order."""
    return [float(x.rstrip(".")) for f in found for x in re.findall(r"optimizer\.lr=([0-9][0-9.e+-]*)", f.advice)]


def killed_by_its_lr() -> tuple[dict, RunFacts]:
    """The issue's run: momentum SGD (lr 0.5, momentum 0.9) on ReLUs, val accuracy 0.085, two layers
    77% and 98% dead, their updates tiny, the loss back at chance after a spike."""
    steps = range(0, 1001, 100)
    series = {"train/loss": probes(2.3, 9.0, 4.0, 2.6, 2.35, *[2.30] * 15, every=50),
              "val/acc": [(500, 0.085), (1000, 0.085)],
              "dead_fraction/act01_fc": [(s, 0.05 + 0.72 * min(1, s / 300)) for s in steps],
              "dead_fraction/act02_fc": [(s, 0.10 + 0.88 * min(1, s / 300)) for s in steps],
              "update_ratio/layer01_fc": [(s, -5.6) for s in steps[1:]],
              "update_ratio/layer02_fc": [(s, -6.1) for s in steps[1:]],
              "update_ratio/layer03_classifier": [(s, -5.3) for s in steps[1:]]}
    return series, replace(FACTS, lr=0.5, momentum=0.9, init="default")


def test_a_net_killed_by_a_too_large_lr_is_never_told_to_raise_it():
    series, facts = killed_by_its_lr()
    found = diagnose(series, facts, CFG)
    assert {"dying_units", "update_ratio", "not_learning"} <= {f.kind for f in found}
    lrs = lrs_advised(found)
    assert lrs and all(lr < facts.lr for lr in lrs) and 0.05 in lrs  # down, by ten
    small = [f for f in found if f.kind == "update_ratio"]
    assert small and all("units died during training in act01_fc, act02_fc" in f.message for f in small)
    assert all("a higher lr would make it worse" in f.advice for f in small)


@pytest.mark.parametrize("sign, series", [
    ("the training loss went back up", {"train/loss": probes(2.3, 1.5, 1.2, 1.0, 3.5, 2.8, 2.9, 3.0)}),
    ("the training loss rose", {"train/loss": probes(2.3, 1.0, 0.5, 0.45, 0.5, 0.7, 1.2, 1.3, 1.4)}),
    ("the update ratio of layer03_classifier is above", {"update_ratio/layer03_classifier": probes(-3, -0.5, -0.4, -0.3)}),
])
def test_a_too_small_update_is_not_blamed_on_a_small_lr_when_the_lr_looks_too_large(sign, series):
    series = {**series, "update_ratio/layer01_fc": probes(-3.0, -5.5, -6.0, -5.8)}
    [small] = [f for f in diagnose(series, FACTS, CFG) if f.kind == "update_ratio" and f.layer == "layer01_fc"]
    assert sign in small.message and lrs_advised([small]) == [0.01]


def test_a_diverged_run_and_a_net_dead_from_step_0_get_no_higher_lr():
    tiny = {"update_ratio/layer01_fc": probes(-3.0, -5.5, -6.0, -5.8)}
    [small] = [f for f in diagnose(tiny, replace(FACTS, status="diverged"), CFG) if f.kind == "update_ratio"]
    assert "the run diverged" in small.message and lrs_advised([small]) == [0.01]
    dead = {**tiny, "dead_fraction/act01_fc": probes(0.9, 0.9, 0.9, 0.9)}
    found = diagnose(dead, FACTS, CFG)
    [small] = [f for f in found if f.kind == "update_ratio"]
    assert "act01_fc dead from step 0" in small.message and lrs_advised(found) == []  # no lr revives them


def test_adam_at_a_tiny_lr_is_told_its_steps_are_too_small_and_never_to_lower_the_lr():
    adam = replace(FACTS, optimizer="adam", lr=1e-6, momentum=0.0)
    series = {"train/loss": probes(*[2.3026] * 12, every=25),
              "update_ratio/layer01_fc": probes(-4.9, -4.8, -4.9, -4.7), "update_ratio/layer02_fc": probes(-4.5, -4.6, -4.5, -4.6)}
    found = diagnose(series, adam, CFG)
    assert sorted(f.kind for f in found) == ["not_learning", "update_ratio", "update_ratio"]
    assert lrs_advised(found) == [1e-5] * 3  # up, and never 1e-7
    assert all("whose step is about lr per weight" in f.message for f in found if f.kind == "update_ratio")
    # Adam's ratio follows lr / |w|: -3.5 is a working Adam; the same for SGD is fine too, -4.5 as well
    assert kinds({"update_ratio/layer01_fc": probes(-3.5, -3.5, -3.5)}, adam) == []
    assert kinds({"update_ratio/layer01_fc": probes(-4.5, -4.5, -4.5)}) == []


@pytest.mark.parametrize("optimizer, lr, advised", [("sgd", 0.5, [1.0]), ("sgd", 1.0, []), ("sgd", 2e-4, [0.002]),
                                                    ("adam", 5e-3, [1e-2]), ("adam", 0.02, []), ("rmsprop", 1e-4, [1e-3])])
def test_a_higher_lr_is_advised_within_the_optimizers_usual_range(optimizer, lr, advised):
    facts = replace(FACTS, optimizer=optimizer, lr=lr)
    low = CFG.update_ratio_low_adaptive if optimizer in ADAPTIVE else CFG.update_ratio_low
    found = diagnose({"update_ratio/layer01_fc": probes(low - 1, low - 1, low - 1)}, facts, CFG)
    assert [f.kind for f in found] == ["update_ratio"] and lrs_advised(found) == pytest.approx(advised)
    assert found[0].advice.endswith(".")


def test_a_lower_lr_is_advised_within_the_optimizers_usual_range():
    assert lrs_advised(diagnose({}, replace(FACTS, lr=1e6, status="diverged"), CFG)) == [1.0]  # not 1e5
    assert lrs_advised(diagnose({}, replace(FACTS, lr=1e-4, status="diverged"), CFG)) == []  # not 1e-5
    assert set(LR_RANGES) == set(SCHEMAS["optimizer"])


@pytest.mark.parametrize("extra, advised", [({}, [1.0, 0.01]),
                                            ({"update_ratio/layer01_fc": probes(-6.0, -6.0, -6.0)}, [1.0]),
                                            ({"dead_fraction/act01_fc": probes(0.0, 0.3, 0.6)}, [0.01]),
                                            ({"dead_fraction/act01_fc": probes(0.8, 0.8, 0.8)}, [])])
def test_not_learning_advises_the_lr_only_in_the_directions_the_other_signs_allow(extra, advised):
    chance = math.log(10)
    found = diagnose({"train/loss": [(s, chance) for s in range(0, 300, 25)], **extra}, FACTS, CFG)
    [finding] = [f for f in found if f.kind == "not_learning"]
    assert lrs_advised([finding]) == advised


# --- a healthy run is not told to change what works ----------------------------------------------------
def learning(loss_end: float) -> dict:
    return {"train/loss": [(s, 2.3 * math.exp(-s / 300) + loss_end) for s in range(0, 2001, 50)]}


def test_dying_units_in_a_run_that_learns_well_are_a_note_without_advice():
    convnet = replace(FACTS, lr=0.003, widths=(32, 64, 128))
    dying = {"dead_fraction/act03_fc": probes(0.06, 0.2, 0.37, every=1000)}  # the default ConvNet at its best lr
    [note] = diagnose({**learning(0.05), **dying}, convnet, CFG)
    assert (note.kind, note.severity, note.advice) == ("dying_units", "info", "")
    assert "6%" in note.message and "37%" in note.message and "learns well" in note.message
    # a run that does not learn well, or a layer that dies past dying_warning, still gets advice
    [still] = diagnose({**learning(1.5), **dying}, convnet, CFG)
    assert lrs_advised([still]) == [0.0003]
    [warning] = diagnose({**learning(0.05), "dead_fraction/act03_fc": probes(0.06, 0.7)}, convnet, CFG)
    assert warning.severity == "warning" and "optimizer.lr=" in warning.advice


# --- rank collapse and gradient growth --------------------------------------------------------------
def ranks(last: float, layers: int = 10, start: float = 127.0) -> dict:
    """Effective ranks of `layers` activation layers whose deepest falls from `start` to `last`."""
    deep = [(s, start + (last - start) * min(1, s / 600)) for s in range(0, 1001, 100)]
    return {f"effective_rank/act{i:02d}_fc": deep if i == layers else probes(100.0, 90.0) for i in range(1, layers + 1)}


def test_rank_collapse_fires_on_the_issues_tanh_mlp():
    tanh = replace(FACTS, activation="tanh", init="default", widths=(256,) * 10)
    [finding] = diagnose(ranks(3.6), tanh, CFG)
    assert (finding.kind, finding.severity, finding.layer) == ("rank_collapse", "warning", "act10_fc")
    assert finding.value == pytest.approx(3.6)
    assert "from 127 at step 0" in finding.message and "256 units" in finding.message
    assert "model.batchnorm=true" in finding.advice and "activation=relu with model.init=kaiming" in finding.advice
    assert "Daneshmand" in finding.advice
    bn_relu = diagnose(ranks(3.6), replace(tanh, activation="relu", batchnorm=True), CFG)[0].advice
    assert "batchnorm" not in bn_relu and "activation=relu" not in bn_relu and "shallower" in bn_relu
    # a run that learns well, and a layer whose units died, are left to other findings
    assert kinds({**ranks(3.6), **learning(0.05)}, tanh) == []
    assert kinds({**ranks(3.6), "dead_fraction/act10_fc": probes(0.0, 0.9)}, tanh) == ["dying_units"]


@pytest.mark.parametrize("last, widths, classes", [(40.0, (256,) * 10, 10),  # above 0.05 x 256
                                                   (8.4, (256,) * 10, 10),  # class means (neural collapse) read 8-10
                                                   (3.6, (256,) * 9, 10),  # widths do not match the layers
                                                   (3.6, (), 10), (1.0, (256,) * 10, 2)])
def test_rank_collapse_is_quiet_for_a_rank_a_classifier_needs_or_unknown_widths(last, widths, classes):
    assert kinds(ranks(last), replace(FACTS, widths=widths, num_classes=classes)) == []


def test_gradient_growth_fires_on_a_deep_batchnorm_net_at_its_first_probe():
    bn = replace(FACTS, batchnorm=True, widths=(64,) * 20)
    # gradients are first logged at the first probe after step 0
    series = {f"grad_norm/layer{i:02d}_fc": [(20, 72.0 * 0.8 ** (i - 1)), (40, 1.0)] for i in range(1, 20)}
    series |= {"grad_norm/layer20_fc": [(20, 1.0), (40, 1.0)], "grad_norm/layer21_classifier": [(20, 9.0), (40, 1.0)]}
    [finding] = diagnose(series, bn, CFG)
    assert (finding.kind, finding.layer, finding.step, finding.value) == ("gradient_growth", "layer01_fc", 20, 72.0)
    assert "layer20_fc" in finding.message and "Yang et al. 2019" in finding.advice
    assert "trainer.grad_clip=1.0" in finding.advice and "shallower" in finding.advice


def test_gradient_growth_is_quiet_for_a_steady_gradient_or_after_the_first_epoch():
    assert kinds(grad_norms(1.5, 1.0)) == []
    assert kinds(grad_norms(50.0, 1.0)) == ["gradient_growth"]
    late = {"grad_norm/layer01_fc": [(500, 50.0)], "grad_norm/layer02_fc": [(500, 1.0)]}
    assert kinds(late) == []  # steps_per_epoch 100: not the start of training
    assert kinds({"grad_norm/layer01_fc": probes(50.0), "grad_norm/layer02_classifier": probes(1.0)}) == []


# --- end to end: runs built to misbehave say so, healthy ones say nothing ---------------------------
MISBEHAVING = {
    "narrow_deep_relu": (["model.hidden=[2,2,2,2,2,2,2,2,2,2]"], {"dead_at_init", "vanishing_gradients"}),
    "deep_sigmoid": (["model.hidden=[32,32,32,32,32,32,32,32,32,32]", "activation=sigmoid"],
                     {"vanishing_gradients", "not_learning"}),
    "relu_with_lecun_init": (["model.hidden=[64,64,64,64,64,64,64,64,64,64]", "model.init=lecun"],
                             {"activation_scale"}),
    "relu_killing_lr": (["model.hidden=[64,64]", "optimizer=sgd", "optimizer.lr=3", "optimizer.momentum=0"],
                        {"dying_units", "diverged"}),  # ReLUs die on the way to divergence
    "sigmoid_that_cannot_move": (["model.hidden=[32,32,32,32,32]", "activation=sigmoid", "optimizer=sgd",
                                  "optimizer.lr=0.001", "optimizer.momentum=0"], {"not_learning", "update_ratio"}),
    "lr_1e6": (["model.hidden=[32]", "optimizer=sgd", "optimizer.lr=1e6"], {"diverged"}),
    "default_mlp": ([], set()),
    "default_convnet": (["model=convnet"], set()),
}
RUN = ["dataset=fake", "dataset.train_size=600", "dataset.test_size=50", "dataset.image_size=8",
       "trainer.batch_size=32", "trainer.device=cpu", "trainer.epochs=2", "probes.batch_size=64", "probes.every=5"]


@pytest.mark.parametrize("name", MISBEHAVING)
def test_runs_built_to_misbehave_produce_the_right_findings_and_healthy_ones_none(name, tmp_path):
    from cnnlab.rundir import read_metrics
    from cnnlab.status import Status
    from cnnlab.train.loop import train

    overrides, expected = MISBEHAVING[name]
    result = train(validate(compose_config(*RUN, *overrides)), tmp_path)
    assert result.status in (Status.COMPLETED, Status.DIVERGED), result.error
    if result.status == Status.DIVERGED:
        assert "diverged" in expected
    warnings = {f["kind"] for f in read_metrics(tmp_path)["findings"] if f["severity"] == "warning"}
    assert expected <= warnings if expected else warnings == set()


def findings_of_a_real_run(tmp_path, *overrides) -> list[dict]:
    from cnnlab.rundir import read_metrics
    from cnnlab.train.loop import train

    train(validate(compose_config(*RUN, *overrides)), tmp_path)
    return read_metrics(tmp_path)["findings"]


@pytest.mark.parametrize("overrides, expected, way", [
    # the issue's run: momentum SGD at lr 0.5 kills the ReLUs; never "lr too low, try 5"
    (["model.hidden=[64,64]", "optimizer=sgd", "optimizer.lr=0.5", "optimizer.momentum=0.9"], {"dying_units"}, "down"),
    # Adam at lr 1e-6: update ratios -4.7 to -5.0, too small for Adam; never "try 1e-7"
    (["optimizer=adam", "optimizer.lr=1e-6"], {"update_ratio", "not_learning"}, "up"),
])
def test_real_runs_are_advised_to_move_the_lr_the_right_way(overrides, expected, way, tmp_path):
    found = findings_of_a_real_run(tmp_path, *overrides)
    lr = float(next(o for o in overrides if o.startswith("optimizer.lr=")).split("=")[1])
    assert expected <= {f["kind"] for f in found if f["severity"] == "warning"}
    advised = lrs_advised([Finding(**f) for f in found])
    assert advised and all(a < lr if way == "down" else a > lr for a in advised)


def test_a_real_deep_batchnorm_net_has_gradients_growing_towards_the_input(tmp_path):
    found = findings_of_a_real_run(tmp_path, "model.hidden=[16,16,16,16,16,16,16,16,16,16,16,16,16,16,16,16,16,16,16,16]",
                                   "model.batchnorm=true", "trainer.epochs=1", "dataset.train_size=200",
                                   "probes.histograms=false", "probes.density=false")
    [growth] = [f for f in found if f["kind"] == "gradient_growth"]
    assert growth["layer"] == "layer01_fc" and growth["value"] > 30  # 79x at 20 x 32 units, 108x at 20 x 16


def test_small_updates_in_a_run_that_learns_well_are_not_a_warning():
    """A BatchNorm net at 100% accuracy whose scale-free first layers move by 10^-6 a step (issue 22's
    worked example) is told nothing; the same updates at the loss of guessing are."""
    small = {"update_ratio/layer01_fc": probes(-3.0, -6.0, -6.1, -6.2)}
    learned = {**small, "train/loss": probes(2.3, 0.5, 0.05, 0.02, 0.01, 0.01, 0.01, every=50)}
    assert "update_ratio" not in kinds(learned)
    stuck = {**small, "train/loss": probes(*[2.30] * 7, every=50)}
    assert "update_ratio" in kinds(stuck)

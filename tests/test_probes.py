import math

import pytest
import torch
from torch import nn

from cnnlab.train.checkpoint import load_checkpoint
from cnnlab.config import ProbesConfig, validate
from cnnlab.train.models import build_model
from cnnlab.instruments.probes import (
    Probes,
    activation_layers,
    centred_gram,
    dead_from_maxima,
    dead_units,
    dies,
    forward_hooks,
    effective_rank,
    histogram,
    rank_of_gram,
    saturation_fraction,
    unit_maxima,
    update_ratio,
    weight_layers,
)
from cnnlab.errors import UserError
from cnnlab.rundir import read_metrics
from tests.helpers import TINY_CONVNET, compose_config, read_scalars

PROBES = ProbesConfig(enabled=True, every=1, batch_size=8, histograms=True, bins=10, mode="train", per_example=8,
                      noise_batch=2, death_examples=64, noise_every=1, sharpness_every=0, sharpness_iterations=5,
                      sharpness_tolerance=1e-3, curvature_examples=8, density=True)


def batch(images, classes=3):
    """A probe batch: the images and some labels."""
    return images, torch.arange(len(images)) % classes


# --- statistics on hand-made tensors --------------------------------------------------------------
def test_saturation_counts_outputs_within_the_margin_of_either_asymptote():
    sigmoid_out = torch.tensor([0.0, 0.005, 0.5, 0.995, 1.0, 0.02, 0.98, 0.3])
    assert saturation_fraction(sigmoid_out, 0.0, 1.0).item() == pytest.approx(4 / 8)
    tanh_out = torch.tanh(torch.tensor([-10.0, -0.1, 0.0, 3.0, 0.5]))  # tanh(3) = 0.995 > 0.99
    assert saturation_fraction(tanh_out, -1.0, 1.0).item() == pytest.approx(2 / 5)


def test_histogram_counts_every_element_once_in_even_buckets_over_min_max():
    x = torch.tensor([0.0, 0.1, 0.9, 1.0, 1.0, 2.0, 3.9, 4.0])
    low, high, total, squares, *counts = histogram(x, bins=4).tolist()
    assert (low, high) == (0.0, 4.0)
    assert counts == [3, 2, 1, 2]  # [0,1) [1,2) [2,3) [3,4]: the maximum lands in the last bucket
    assert total == pytest.approx(x.sum().item()) and squares == pytest.approx((x * x).sum().item())
    big = torch.randn(3, 64, 17, 9)
    assert sum(histogram(big, bins=64).tolist()[4:]) == big.numel()


def test_histogram_of_a_constant_tensor_puts_everything_in_one_bucket():
    values = histogram(torch.zeros(100), bins=5).tolist()
    assert values[:2] == [0.0, 0.0] and values[4:] == [100, 0, 0, 0, 0]


def test_histogram_counts_exactly_beyond_float32_integer_range():
    x = torch.arange(100.0)
    assert histogram(x, bins=10, chunk=7).tolist()[4:] == [10] * 10  # 7 stands in for 2**24: the chunks add up


# --- dead units: the slope of the activation, from its row ------------------------------------------
def prelu_per_channel():
    prelu = nn.PReLU(3)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.1, -0.5, 2.0]))  # a negative and a steeper-than-1 slope too
    return prelu


def test_relu_unit_is_dead_when_never_positive_over_the_batch():
    pre = torch.tensor([[-1.0, -2.0, 0.0],
                        [-0.5, 3.0, 0.0],
                        [-4.0, -1.0, 0.0]])  # unit 0 always negative, unit 1 positive once, unit 2 always 0
    assert dead_units(pre, nn.ReLU()).tolist() == [True, False, True]


def test_sigmoid_and_tanh_saturate_rather_than_die():
    # Their measure is `saturation`: no dead units are counted for them at all.
    assert not dies(nn.Sigmoid()) and not dies(nn.Tanh())
    assert dies(nn.ReLU()) and dies(nn.LeakyReLU()) and dies(nn.ELU())


@pytest.mark.parametrize("module", [nn.LeakyReLU(), nn.LeakyReLU(0.005), nn.LeakyReLU(1e-6), prelu_per_channel(),
                                    nn.PReLU(), nn.RReLU()],
                         ids=["leaky_relu", "leaky_relu(0.005)", "leaky_relu(1e-6)", "prelu(per channel)", "prelu",
                              "rrelu"])
def test_leaky_units_never_die_whatever_their_slope_even_on_very_negative_inputs(module):
    pre = torch.full((4, 3, 2, 2), -1e3)
    assert not dead_units(pre, module).any()  # no threshold on the slope: any leak lets gradient through


def test_prelu_unit_dies_only_when_its_learned_slope_is_zero_and_it_is_never_positive():
    prelu = prelu_per_channel()
    with torch.no_grad():
        prelu.weight[0], prelu.weight[1] = 0.005, 0.0
    pre = torch.full((4, 3), -1.0)
    assert dead_units(pre, prelu).tolist() == [False, True, False]  # 0.005 and 0.0099 alike: alive
    pre[2, 1] = 0.5
    assert dead_units(pre, prelu).tolist() == [False, False, False]


def test_exponential_units_die_far_enough_below_zero():
    # ELU's slope alpha*exp(x) falls below 1% of alpha past x = ln(0.01) = -4.6: exp(-5) = 0.0067.
    pre = torch.tensor([[-5.0, -4.0, -30.0],
                        [-6.0, -50.0, 0.5]])
    assert dead_units(pre, nn.ELU()).tolist() == [True, False, False]
    assert dead_units(pre, nn.ELU(alpha=2.0)).tolist() == [True, False, False]  # the 1% scales with alpha
    assert dead_units(pre, nn.SELU()).tolist() == [True, False, False]
    assert dead_units(pre, nn.CELU()).tolist() == [True, False, False]
    assert dead_units(pre, nn.Softplus()).tolist() == [True, False, False]  # sigmoid(x) < 0.01 past -4.6
    assert dead_units(pre, nn.GELU()).tolist() == [True, True, False]  # Phi(x) + x phi(x) vanishes fast


def test_conv_channel_is_dead_only_if_every_example_and_position_is():
    pre = -torch.rand(3, 2, 4, 4)  # ReLU: all dead...
    pre[2, 1, 3, 0] = 0.5  # ...but for one position of one example in channel 1
    assert dead_units(pre, nn.ReLU()).tolist() == [True, False]
    assert dead_units(pre, nn.ReLU()).dtype == torch.bool


def test_update_ratio_is_log10_of_step_size_over_weight_size():
    before = torch.ones(10)
    assert update_ratio(before, before + 0.01).item() == pytest.approx(-2.0, abs=1e-5)
    assert update_ratio(before, before * 1.1).item() == pytest.approx(-1.0, abs=1e-5)
    assert math.isfinite(update_ratio(before, before).item())  # no step: a floor, not -inf


# --- layers and hooks -----------------------------------------------------------------------------
def small_model(*overrides, model="convnet"):
    small = ["model.channels=[4,6]", "model.fc_hidden=10"] if model == "convnet" else ["model.hidden=[12,8]"]
    run = validate(compose_config(f"model={model}", *small, *overrides))
    return build_model(run.model, run.activation, (1, 8, 8), 3)


def test_layer_names_sort_in_depth_order_and_say_what_they_are():
    model = small_model()
    assert [layer.name for layer in activation_layers(model)] == ["act01_conv", "act02_conv", "act03_fc"]
    assert [layer.name for layer in weight_layers(model)] == ["layer01_conv", "layer02_conv", "layer03_fc",
                                                              "layer04_classifier"]
    mlp = small_model(model="mlp")
    assert [layer.name for layer in activation_layers(mlp)] == ["act01_fc", "act02_fc"]


def hooks_left(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_probing_leaves_no_hook_behind_even_when_the_forward_fails():
    model = small_model()
    probes = Probes(model, batch(torch.randn(8, 1, 8, 8)), PROBES, last_step=10)
    probes.measure(0)
    assert hooks_left(model) == 0
    broken = Probes(model, batch(torch.randn(8, 2, 8, 8)), PROBES, last_step=10)  # wrong channel count: the forward raises
    with pytest.raises(RuntimeError):
        broken.measure(0)
    assert hooks_left(model) == 0


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("was_training", [True, False])
def test_probing_restores_the_mode_and_batchnorm_statistics_and_draws_no_training_randomness(mode, was_training):
    model = small_model("model.batchnorm=true", "model.dropout=0.5", "activation=rrelu")
    model.train(was_training)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    probes = Probes(model, batch(torch.randn(8, 1, 8, 8) * 3 + 1), ProbesConfig(**{**PROBES.__dict__, "mode": mode}),
                    last_step=10)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    probes.measure(0)
    assert torch.equal(torch.rand(3), expected_next)
    assert model.training == was_training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in buffers.items())
    assert all(p.grad is None for p in model.parameters())


def test_a_probe_measures_every_family_for_every_layer():
    model = small_model("activation=prelu", "activation.per_channel=true")
    probes = Probes(model, batch(torch.randn(8, 1, 8, 8)), PROBES, last_step=10)
    loss = model(torch.randn(4, 1, 8, 8)).sum()
    loss.backward()
    probes.before_update()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.01 * p.grad
    probes.after_update()
    measurements = probes.measure(0)
    tags = {m.tag for m in measurements}
    for name in ("act01_conv", "act02_conv", "act03_fc"):
        for family in ("activations", "preactivations", "act_mean", "act_std", "dead_on_batch", "prelu_slope",
                       "prelu_slopes"):
            assert f"{family}/{name}" in tags
    for name in ("layer01_conv", "layer02_conv", "layer03_fc", "layer04_classifier"):
        for family in ("grad_norm", "update_ratio", "weights"):
            assert f"{family}/{name}" in tags
    assert "dead_on_batch/all" in tags and not any(tag.startswith("dead_fraction/") for tag in tags)  # on_data's
    expected_norm = torch.cat([p.grad.flatten() for p in weight_layers(model)[0].module.parameters()]).norm().item()
    measured = next(m.value for m in measurements if m.tag == "grad_norm/layer01_conv")
    assert measured.item() == pytest.approx(expected_norm, rel=1e-5)


def test_dead_fraction_all_weights_layers_by_their_units():
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 30), nn.ReLU(), nn.Linear(30, 2))
    with torch.no_grad():
        model[0].bias[:5], model[0].bias[5:] = -100.0, 100.0  # 5 of 10 units dead, the rest alive
        model[2].bias[:3], model[2].bias[3:] = -1e4, 1e4  # 3 of 30 units dead
    probes = Probes(model, batch(torch.randn(16, 4), classes=2), PROBES, last_step=10)
    for found, prefix in ((probes.on_data(), "dead_fraction"), (probes.measure(0), "dead_on_batch")):
        dead = {m.tag: m.value.item() for m in found if m.tag.startswith(f"{prefix}/")}
        assert dead[f"{prefix}/act01_fc"] == pytest.approx(0.5)
        assert dead[f"{prefix}/act02_fc"] == pytest.approx(0.1)
        assert dead[f"{prefix}/all"] == pytest.approx(8 / 40)


def test_effective_rank_is_the_exponential_of_the_entropy_of_the_normalised_singular_values():
    # A centred [examples, units] matrix with singular values 3, 1, 0 (and its conv-shaped twin).
    u = torch.linalg.qr(torch.randn(40, 3, dtype=torch.float64))[0]
    u = u - u.mean(dim=0)  # centring keeps the singular values only if the columns already are
    u = torch.linalg.qr(u)[0]
    v = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64))[0]
    x = u @ torch.diag(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64)) @ v.T + 7.0  # + a mean, removed
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(x).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)
    assert effective_rank(torch.eye(6) * 2).item() == pytest.approx(5.0, rel=1e-6)  # centred: rank 5, equal values
    assert effective_rank(torch.ones(10, 4)).item() == 0.0  # nothing varies: no rank at all
    conv = x.reshape(8, 5, 5).permute(0, 2, 1).unsqueeze(-1)  # [N, C, H, W]: rows of x are (example, position)
    assert effective_rank(conv).item() == pytest.approx(effective_rank(x).item(), rel=1e-9)


def test_a_gram_matrix_with_inf_or_nan_has_a_nan_rank_not_an_error():
    overflowed = torch.randn(16, 8) * 1e30
    overflowed[0, 0] = float("inf")
    for gram in (torch.full((4, 4), float("nan"), dtype=torch.float64),
                 torch.diag(torch.tensor([1.0, float("inf"), 2.0, 3.0], dtype=torch.float64)),
                 centred_gram(overflowed)):
        assert math.isnan(rank_of_gram(gram).item())  # torch.linalg.eigvalsh raises LinAlgError on each


def test_a_run_whose_probed_activations_overflow_ends_diverged_not_failed(tiny_run):
    # Issue 20, T1: the update of a step whose loss was finite sends the probe batch's activations to inf.
    run = tiny_run("model.hidden=[64,64,64,64]", "optimizer=sgd", "optimizer.lr=1e4", "probes.every=1")
    assert run.result.status == "diverged" and run.metrics["status"] == "diverged", run.metrics.get("error")


def test_revived_units_are_those_dead_at_the_previous_probe_and_alive_now():
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
    with torch.no_grad():
        model[0].bias[:6], model[0].bias[6:] = -100.0, 100.0  # 6 of 10 dead
    probes = Probes(model, batch(torch.randn(16, 4), classes=2), PROBES, last_step=10)
    first = {m.tag: m.value.item() for m in probes.measure(0) if m.kind == "scalar" and m.finish is None}
    assert "revived_fraction/act01_fc" not in first  # nothing to compare with yet
    with torch.no_grad():
        model[0].bias[:2] = 100.0  # two of the dead come back
        model[0].bias[9] = -100.0  # and one alive unit dies: not a revival
    second = {m.tag: m.value.item() for m in probes.measure(1) if m.kind == "scalar" and m.finish is None}
    assert second["revived_fraction/act01_fc"] == pytest.approx(2 / 10)
    assert second["dead_on_batch/act01_fc"] == pytest.approx(5 / 10)


# --- death on the data ----------------------------------------------------------------------------
def planted_set(count=512, rare=(300, 301, 302)):
    """Images [count, 2] of which only `rare` have x0 > 1: the first unit of planted_relu_net is
    positive on those alone, the second on all, the third on none."""
    images = torch.rand(count, 2) * 0.5
    images[list(rare), 0] = 2.0
    return images, torch.arange(count) % 2


def planted_relu_net(activation=nn.ReLU):
    model = nn.Sequential(nn.Linear(2, 3), activation(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
        model[0].bias.copy_(torch.tensor([-1.0, 1.0, -1.0]))
    return model


def test_death_on_the_data_counts_a_unit_alive_that_only_a_few_images_activate_where_the_batch_misses_them():
    probes = Probes(planted_relu_net(), planted_set(), ProbesConfig(**{**PROBES.__dict__, "death_examples": 512}),
                    last_step=10)
    on_data = {m.tag: m.value.item() for m in probes.on_data()}
    on_batch = {m.tag: m.value.item() for m in probes.measure(0) if m.tag.startswith("dead_on_batch/")}
    assert on_data["dead_fraction/act01_fc"] == pytest.approx(1 / 3)  # only the third unit is dead
    assert on_batch["dead_on_batch/act01_fc"] == pytest.approx(2 / 3)  # the first 8 images miss the rare ones
    fewer = Probes(planted_relu_net(), planted_set(), ProbesConfig(**{**PROBES.__dict__, "death_examples": 300}),
                   last_step=10)
    assert {m.tag: m.value.item() for m in fewer.on_data()}["dead_fraction/act01_fc"] == pytest.approx(2 / 3)


def test_negative_fraction_counts_leaky_units_never_positive_over_the_data_and_none_of_them_is_dead():
    probes = Probes(planted_relu_net(lambda: nn.LeakyReLU(0.005)), planted_set(),
                    ProbesConfig(**{**PROBES.__dict__, "death_examples": 512}), last_step=10)
    on_data = {m.tag: m.value.item() for m in probes.on_data()}
    assert on_data["negative_fraction/act01_fc"] == pytest.approx(1 / 3)
    assert on_data["dead_fraction/act01_fc"] == 0.0


def test_death_on_the_data_runs_without_dropout_and_changes_nothing_in_training():
    # Dropout before the layer would zero the rare images' inputs: the unit they alone activate would
    # look dead. BatchNorm's running statistics, the modes and the RNG are as they were.
    planted = planted_relu_net()
    model = nn.Sequential(nn.Dropout(0.99), planted[0], planted[1], nn.BatchNorm1d(3), planted[2])
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    probes = Probes(model, planted_set(), ProbesConfig(**{**PROBES.__dict__, "death_examples": 512}), last_step=10)
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    found = {m.tag: m.value.item() for m in probes.on_data()}
    assert torch.equal(torch.rand(3), expected_next)
    assert model.training and model[0].training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in buffers.items())
    assert all(p.grad is None for p in model.parameters())
    assert found["dead_fraction/act01_fc"] == pytest.approx(1 / 3)


def test_a_sharpness_step_measures_the_top_eigenvalue_and_still_changes_nothing():
    model = small_model("model.batchnorm=true", "model.dropout=0.5")
    cfg = ProbesConfig(**{**PROBES.__dict__, "every": 10, "noise_every": 0, "sharpness_every": 3})
    probes = Probes(model, batch(torch.randn(8, 1, 8, 8)), cfg, last_step=100, stability_limit=lambda: 20.0)
    assert [step for step in range(10) if probes.due(step)] == [0, 3, 6, 9]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected_next = torch.rand(2)
    torch.manual_seed(5)
    found = {m.tag: m.value for m in probes.measure(3)}
    assert torch.equal(torch.rand(2), expected_next)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in buffers.items())
    assert all(p.grad is None for p in model.parameters())
    assert found["sharpness/top_eigenvalue"].item() > 0 and found["sharpness/stability_limit"].item() == 20.0
    assert "sharpness/top_eigenvalue" not in {m.tag for m in probes.measure(4)}


# --- in the trainer ---------------------------------------------------------------------------------
def test_probes_never_change_training(tiny_run):
    common = ["model.batchnorm=true", "model.dropout=0.3", "activation=rrelu", "trainer.epochs=2",
              "trainer.deterministic=true", "probes.every=3"]
    on = tiny_run(*common, "probes.enabled=true", model=TINY_CONVNET, name="on")
    off = tiny_run(*common, "probes.enabled=false", model=TINY_CONVNET, name="off")
    weights_on = load_checkpoint(on.dir / "checkpoints" / "last.pt")["model"]
    weights_off = load_checkpoint(off.dir / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(weights_on[k], weights_off[k]) for k in weights_on)
    assert on.metrics["val_loss"] == off.metrics["val_loss"]
    assert on.metrics["dead_fraction"] is not None and off.metrics["dead_fraction"] is None


def test_a_run_writes_every_probe_family_for_every_layer_from_step_0(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tiny_run("model.channels=[4,4]", "activation=tanh", "probes.every=4", "trainer.epochs=2",
                   "probes.per_example=8", "probes.noise_batch=2", "probes.noise_every=8", "probes.sharpness_every=8", "probes.sharpness_iterations=3",
                   "optimizer=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.5", model=TINY_CONVNET)
    metrics = run.metrics
    events = EventAccumulator(str(run.dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0,
                                                           "images": 0})
    events.Reload()
    tags = events.Tags()
    probed = [0, 4, 8, 12, 16]
    assert metrics["steps"] == 16
    for name in ("act01_conv", "act02_conv", "act03_fc"):
        for family in ("activations", "preactivations"):
            assert [e.step for e in events.Histograms(f"{family}/{name}")] == probed
        for family in ("act_mean", "act_std", "saturation", "effective_rank"):
            assert [e.step for e in events.Scalars(f"{family}/{name}")] == probed
        images = events.Images(f"activation_density/{name}")
        assert [e.step for e in images] == [8, 16]  # at each epoch end, the whole run so far
        assert (images[-1].width, images[-1].height) == (800, 450)  # a figure with axes, not a 5 x 64 pixel strip
        assert (run.dir / "density" / f"{name}.png").is_file()
    for name in ("layer01_conv", "layer02_conv", "layer03_fc", "layer04_classifier"):
        assert [e.step for e in events.Histograms(f"weights/{name}")] == probed
        assert [e.step for e in events.Scalars(f"gradient_snr/{name}")] == [0, 8, 16]
        for family in ("grad_norm", "update_ratio"):  # these need an update: from the first probed step
            assert [e.step for e in events.Scalars(f"{family}/{name}")] == probed[1:]
    assert [e.step for e in events.Scalars("gradient_noise_scale")] == [0, 8, 16]
    assert [e.step for e in events.Scalars("sharpness/top_eigenvalue")] == [0, 8, 16]
    assert [e.value for e in events.Scalars("sharpness/stability_limit")] == pytest.approx([2 * 1.5 / 0.05] * 3)
    histogram = events.Histograms("activations/act01_conv")[0].histogram_value
    assert histogram.num == 16 * 4 * 8 * 8 and -1 <= histogram.min <= histogram.max <= 1
    assert "custom_scalars__config__" in tags["tensors"]
    # tanh saturates rather than dies: no dead units are counted for it
    assert not any(tag.startswith(("dead_", "revived_", "negative_")) for tag in tags["scalars"])
    assert metrics["dead_fraction"] is None


def test_a_run_judges_death_on_the_data_at_step_0_and_every_epoch_end_and_on_the_batch_at_every_probe(tiny_run):
    run = tiny_run("probes.every=4", "trainer.epochs=2", "activation=leaky_relu", model=TINY_CONVNET)
    scalars = read_scalars(run.dir)
    assert run.metrics["steps"] == 16  # 270 training images, whole batches of 32
    for name in ("act01_conv", "act02_fc"):
        assert [step for step, _ in scalars[f"dead_fraction/{name}"]] == [0, 8, 16]
        assert [step for step, _ in scalars[f"negative_fraction/{name}"]] == [0, 8, 16]
        assert [step for step, _ in scalars[f"dead_on_batch/{name}"]] == [0, 4, 8, 12, 16]
    assert set(run.metrics["dead_fraction"]) == {"act01_conv", "act02_fc", "all"}
    assert read_metrics(run.dir)["dead_fraction"] == run.metrics["dead_fraction"]
    assert run.metrics["dead_fraction"]["all"] == pytest.approx(scalars["dead_fraction/all"][-1][1])


def test_high_learning_rate_relu_network_shows_dying_units(tiny_run):
    """What cnnlab exists for: SGD at a reckless learning rate kills ReLU units, and the probes see it."""
    reckless = tiny_run("model.hidden=[64,64]", "optimizer=sgd", "optimizer.lr=2.0", "optimizer.momentum=0.9",
                        "trainer.epochs=2", "trainer.grad_clip=100", name="reckless")
    healthy = tiny_run("model.hidden=[64,64]", "trainer.epochs=2", name="healthy")
    assert reckless.metrics["dead_fraction"]["all"] > 0.3
    assert healthy.metrics["dead_fraction"]["all"] < 0.1


def test_histograms_can_be_switched_off(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tiny_run("probes.histograms=false")
    events = EventAccumulator(str(run.dir))
    events.Reload()
    assert events.Tags()["histograms"] == [] and "dead_fraction/act01_fc" in events.Tags()["scalars"]


def test_an_earlier_runs_probes_section_validates_and_its_32_images_give_four_micro_batches():
    """Runs made before probes.noise_batch existed have per_example: 32 (then the default). Today's
    noise_batch (32) fills in: they must still validate and resume, with micro-batches of 8."""
    from omegaconf import OmegaConf

    from cnnlab.config import with_todays_defaults
    from cnnlab.instruments.gradients import gradient_snr, micro_batch_moments

    earlier = OmegaConf.create({"probes": {"enabled": True, "every": 100, "batch_size": 256, "histograms": True,
                                           "bins": 64, "mode": "train", "per_example": 32, "noise_every": 2000,
                                           "sharpness_every": 0, "sharpness_iterations": 20, "density": True}})
    probes_cfg = validate(OmegaConf.merge(compose_config(), with_todays_defaults(earlier, sections=("probes",)))).probes
    assert (probes_cfg.per_example, probes_cfg.noise_batch) == (32, 32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    images, labels = batch(torch.randn(32, 1, 4, 4))
    found = {m.tag: m.value for m in Probes(model, (images, labels), probes_cfg, last_step=10).measure(0)}
    mean, variance, samples = micro_batch_moments(model, images, labels, 8)
    assert samples == 4
    names = ["1.weight", "1.bias"]  # layer01_fc
    expected = gradient_snr(torch.cat([mean[n] for n in names]), torch.cat([variance[n] for n in names]), 8, samples)
    assert found["gradient_snr/layer01_fc"].item() == pytest.approx(expected.item())
    for override in ("probes.per_example=3", "probes.noise_batch=0"):
        with pytest.raises(UserError, match=override.split("=")[0]):
            validate(compose_config(override))


@pytest.mark.parametrize("name", ["relu", "elu", "selu", "celu", "softplus", "gelu", "silu", "mish"])
def test_dead_units_by_the_largest_input_agree_with_the_slope_of_every_input(name):
    """unit_maxima's shortcut for activations whose slope rises with the input: the same verdict as the
    definition (|f'| below 1% of its largest on every example and position), on units placed around it."""
    from cnnlab.activations import ACTIVATIONS

    module = getattr(nn, ACTIVATIONS[name].module)()
    torch.manual_seed(0)
    shift = torch.linspace(-12, 2, 64).view(1, 64, 1, 1)  # from dead for every activation here to alive
    pre = torch.randn(16, 64, 5, 5) * 0.5 + shift
    definition = ACTIVATIONS[name].derivative(pre, module).abs().amax(dim=(0, 2, 3)) < (
        0.01 * ACTIVATIONS[name].max_derivative(module))
    found = dead_units(pre, module)
    assert torch.equal(found, definition) and 0 < int(found.sum()) < 64
    halves = torch.maximum(unit_maxima(pre[:8], module), unit_maxima(pre[8:], module))  # over two batches
    assert torch.equal(dead_from_maxima(halves, module), definition)


def test_the_gram_matrix_by_chunks_of_rows_is_the_float64_gram_of_the_centred_outputs():
    from cnnlab.instruments.probes import GRAM_CHUNK, centred_gram

    torch.manual_seed(0)
    conv = torch.relu(torch.randn(40, 6, 17, 17) + 0.5).contiguous(memory_format=torch.channels_last)
    rows = conv.permute(0, 2, 3, 1).reshape(-1, 6).double()
    assert len(rows) > 1.4 * GRAM_CHUNK  # a partial last chunk too
    centred = rows - rows.mean(dim=0)
    torch.testing.assert_close(centred_gram(conv), centred.T @ centred, rtol=1e-10, atol=1e-8)
    wide = torch.randn(5, 12)  # more units than examples: the examples' side
    centred = wide.double() - wide.double().mean(dim=0)
    torch.testing.assert_close(centred_gram(wide), centred @ centred.T, rtol=1e-12, atol=1e-12)


def test_death_on_the_data_stops_once_every_unit_has_been_alive_and_reads_every_image_while_one_is_dead():
    def batches_read(model, images) -> int:
        seen = []
        handle = model[0].register_forward_hook(lambda module, inputs, output: seen.append(len(output)))
        cfg = ProbesConfig(**{**PROBES.__dict__, "death_examples": 512})  # batches of 8 images
        found = {m.tag: m.value.item() for m in Probes(model, images, cfg, last_step=10).on_data()}
        handle.remove()
        return len(seen), found["dead_fraction/act01_fc"]

    alive = planted_relu_net()
    with torch.no_grad():
        alive[0].bias.fill_(1.0)  # every unit positive on every image
    assert batches_read(alive, planted_set()) == (1, 0.0)
    # The third unit is dead: every image is read, and the rare images 300-302 keep the first alive.
    assert batches_read(planted_relu_net(), planted_set()) == (64, pytest.approx(1 / 3))
    # Only the rare images decide: once they are read (batch 38 holds image 300) nothing is undecided.
    revived = planted_relu_net()
    with torch.no_grad():
        revived[0].bias[2] = 1.0
    assert batches_read(revived, planted_set()) == (38, 0.0)


def test_the_probes_images_stay_within_their_memory_budget_for_large_images():
    from cnnlab.instruments.probes import PROBE_IMAGES_MB, examples_needed, images_within_budget

    defaults = validate(compose_config()).probes
    assert examples_needed(defaults, (1, 28, 28)) == defaults.death_examples == 8192  # MNIST: all of them
    assert examples_needed(defaults, (3, 64, 64)) == 8192  # 400 MB
    large = examples_needed(defaults, (3, 224, 224))
    assert large == images_within_budget((3, 224, 224)) == 891 and large * 4 * 3 * 224 * 224 <= PROBE_IMAGES_MB * 2**20
    assert examples_needed(defaults, (3, 1024, 1024)) == defaults.batch_size  # never fewer than the probe batch


def test_histograms_and_density_columns_count_the_first_images_of_a_large_layer_and_every_image_of_a_small_one():
    model = small_model()
    images = torch.randn(8, 1, 8, 8)
    probes = Probes(model, batch(images), PROBES, last_step=10)
    outputs = {}

    def record(module, inputs, output):
        outputs[id(module)] = (inputs[0], output)

    with forward_hooks([layer.module for layer in probes.activations], record):
        model(images)
    per_image = {layer.name: outputs[id(layer.module)][1][0].numel() for layer in probes.activations}
    limit = 3 * per_image["act01_conv"] + 5  # room for 3 images of the first conv layer's outputs
    probes.histogram_outputs = limit
    measurements = {m.tag: m.value for m in probes.measure(0)}
    for layer in probes.activations:
        pre, output = outputs[id(layer.module)]
        counted = min(len(images), limit // per_image[layer.name])
        for family, tensor in (("activations", output), ("preactivations", pre)):
            found = measurements[f"{family}/{layer.name}"]
            assert found[4:].sum().item() == counted * per_image[layer.name]
            expected = histogram(tensor[:counted], PROBES.bins)
            assert torch.equal(found, expected)
        assert probes.density[layer.name][-1].sum().item() == counted * per_image[layer.name]
    assert min(len(images), limit // per_image["act01_conv"]) == 3  # the first conv layer: 3 of 8 images
    assert limit // per_image["act03_fc"] >= len(images)  # the fc layer: all 8

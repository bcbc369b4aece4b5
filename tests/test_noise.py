"""Gradient noise on a real-shaped network and the whole generated training split: the estimates from
micro-batch gradients (what the probes log) against each other and against per-example gradients
of every training image (an independent computation, by vmap)."""

import pytest
import torch
import torch.nn.functional as F

from cnnlab.config import validate
from cnnlab.instruments.gradients import (
    gradient_noise_scale,
    gradient_snr,
    micro_batch_moments,
    per_example_gradients,
)
from cnnlab.instruments.probes import weight_layers
from cnnlab.train.data import load_data
from cnnlab.train.models import build_model
from tests.helpers import compose_config

DRAW = 1024  # probes.per_example's default
MICRO = 32  # probes.noise_batch's default


def trained_a_little(*overrides: str, size: int = 4608):
    """A model on generated MNIST-shaped data after 30 SGD steps, and its whole training split (shuffled)."""
    run = validate(compose_config("dataset=fake", f"dataset.train_size={size}", "trainer.device=cpu", *overrides))
    data = load_data(run.dataset, 128, 512, torch.device("cpu"), seed=0)
    images, labels = data.train.sample(10**9, seed=0)
    torch.manual_seed(0)
    model = build_model(run.model, run.activation, data.input_shape, data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(30):
        part = slice(step * 128 % (len(images) - 128), step * 128 % (len(images) - 128) + 128)
        optimizer.zero_grad()
        F.cross_entropy(model(images[part]), labels[part]).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model, images, labels


def layer_snrs(model, mean, variance, batch, samples) -> dict[str, float]:
    names = {id(p): name for name, p in model.named_parameters()}
    found = {}
    for layer in weight_layers(model):
        keys = [names[id(p)] for p in layer.module.parameters()]
        found[layer.name] = gradient_snr(torch.cat([mean[k] for k in keys]), torch.cat([variance[k] for k in keys]),
                                         batch, samples).item()
    return found


def estimates(model, images, labels) -> tuple[dict[str, float], float]:
    mean, variance, samples = micro_batch_moments(model, images, labels, MICRO)
    scale = gradient_noise_scale([(mean[k], variance[k]) for k in mean], MICRO, samples).item()
    return layer_snrs(model, mean, variance, MICRO, samples), scale


def whole_split(model, images, labels) -> tuple[dict[str, float], float]:
    """GSNR and B_simple from the per-example gradients of every image (sums in float64, by chunks)."""
    total, squares = {}, {}
    for part in range(0, len(images), 256):
        grads = per_example_gradients(model, images[part:part + 256], labels[part:part + 256])
        for name, g in grads.items():
            g = g.flatten(1).double()
            total[name] = total.get(name, 0) + g.sum(dim=0)
            squares[name] = squares.get(name, 0) + g.square().sum(dim=0)
    n = len(images)
    mean = {name: value / n for name, value in total.items()}
    variance = {name: (squares[name] - n * mean[name].square()) / (n - 1) for name in mean}
    scale = gradient_noise_scale([(mean[k], variance[k]) for k in mean], 1, n).item()
    return layer_snrs(model, mean, variance, 1, n), scale


def agree(values: list[float], within: float) -> bool:
    centre = sum(values) / len(values)
    return all(abs(value - centre) <= within * centre for value in values)


def test_four_disjoint_draws_of_the_training_split_agree_within_a_quarter_on_the_default_mlp():
    model, images, labels = trained_a_little()
    draws = [estimates(model, images[k * DRAW:(k + 1) * DRAW], labels[k * DRAW:(k + 1) * DRAW]) for k in range(4)]
    for layer in draws[0][0]:
        assert agree([snrs[layer] for snrs, _ in draws], 0.25), (layer, [snrs[layer] for snrs, _ in draws])
    assert agree([scale for _, scale in draws], 0.25), [scale for _, scale in draws]


def test_the_estimates_from_one_draw_agree_with_the_per_example_gradients_of_the_whole_split():
    model, images, labels = trained_a_little("model.hidden=[64]")
    model.eval()  # no BatchNorm or dropout: per-example gradients are the training ones
    snrs, scale = estimates(model, images[:DRAW], labels[:DRAW])
    full_snrs, full_scale = whole_split(model, images, labels)
    assert scale == pytest.approx(full_scale, rel=0.25)
    for layer, value in snrs.items():
        assert value == pytest.approx(full_snrs[layer], rel=0.25), layer

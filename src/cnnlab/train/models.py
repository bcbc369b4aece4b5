"""The MLP and the ConvNet, built from two tables: cnnlab.activations.ACTIVATIONS (one row per
activation, all that is known about it, its torch.nn module by name) and INITIALISERS (one small
function per initialisation scheme)."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

from torch import Tensor, nn

from cnnlab.activations import ACTIVATIONS, Activation, ActivationConfig
from cnnlab.config import ConvNetConfig, MLPConfig, ModelConfig
from cnnlab.errors import UserError


def module_class(row: Activation) -> type[nn.Module]:
    """The torch.nn class of an activation's row."""
    return getattr(nn, row.module)


# Makes one fresh activation module for a layer of the given width (units or channels).
ActivationFactory = Callable[[int], nn.Module]


def activation_factory(cfg: ActivationConfig) -> ActivationFactory:
    row = ACTIVATIONS[cfg.name]
    module = module_class(row)
    return lambda width: module(**row.kwargs(cfg, width))


def build_mlp(cfg: MLPConfig, make_activation: ActivationFactory, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = math.prod(input_shape)
    for i, hidden in enumerate(cfg.hidden, 1):
        # A bias before BatchNorm is cancelled by its mean subtraction.
        layers[f"fc{i}"] = nn.Linear(width, hidden, bias=not cfg.batchnorm)
        if cfg.batchnorm:
            layers[f"bn{i}"] = nn.BatchNorm1d(hidden)
        layers[f"act{i}"] = make_activation(hidden)
        if cfg.dropout > 0:
            layers[f"drop{i}"] = nn.Dropout(cfg.dropout)
        width = hidden
    layers["classifier"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


def build_convnet(cfg: ConvNetConfig, make_activation: ActivationFactory, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    in_channels, height, width = input_shape
    if min(height, width) >> len(cfg.channels) == 0:
        raise UserError(
            f"Invalid setting model.channels={list(cfg.channels)}: {len(cfg.channels)} conv blocks halve "
            f"{height}x{width} images {len(cfg.channels)} times, which leaves nothing; use at most "
            f"{int(math.log2(min(height, width)))} blocks for this dataset."
        )
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, channels in enumerate(cfg.channels, 1):
        layers[f"conv{i}"] = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=not cfg.batchnorm)
        if cfg.batchnorm:
            layers[f"bn{i}"] = nn.BatchNorm2d(channels)
        layers[f"act{i}"] = make_activation(channels)
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        in_channels, height, width = channels, height // 2, width // 2
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(in_channels * height * width, cfg.fc_hidden, bias=not cfg.batchnorm)
    if cfg.batchnorm:
        layers["bn_fc"] = nn.BatchNorm1d(cfg.fc_hidden)
    layers["act_fc"] = make_activation(cfg.fc_hidden)
    if cfg.dropout > 0:
        layers["drop_fc"] = nn.Dropout(cfg.dropout)
    layers["classifier"] = nn.Linear(cfg.fc_hidden, num_classes)
    return nn.Sequential(layers)


MODELS = {"mlp": build_mlp, "convnet": build_convnet}


def build_model(cfg: ModelConfig, activation: ActivationConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    model = MODELS[cfg.name](cfg, activation_factory(activation), input_shape, num_classes)
    initialise(model, cfg.init, activation)
    return model


def _kaiming(weight: Tensor, nonlinearity: str, slope: float) -> None:
    nn.init.kaiming_normal_(weight, a=slope, nonlinearity=nonlinearity)


def _lecun(weight: Tensor, nonlinearity: str, slope: float) -> None:
    nn.init.kaiming_normal_(weight, nonlinearity="linear")  # variance 1/fan_in whatever the activation


def _xavier(weight: Tensor, nonlinearity: str, slope: float) -> None:
    nn.init.xavier_uniform_(weight, gain=nn.init.calculate_gain(nonlinearity, slope))


def _orthogonal(weight: Tensor, nonlinearity: str, slope: float) -> None:
    nn.init.orthogonal_(weight, gain=nn.init.calculate_gain(nonlinearity, slope))


# Each scheme draws a weight for the gain arguments of the activation that follows it; "default"
# keeps PyTorch's own initialisation, biases included.
INITIALISERS: dict[str, Callable[[Tensor, str, float], None] | None] = {
    "default": None,
    "kaiming": _kaiming,
    "xavier": _xavier,
    "lecun": _lecun,
    "orthogonal": _orthogonal,
}


def initialise(model: nn.Module, scheme: str, activation: ActivationConfig) -> None:
    """Re-initialise every Linear/Conv weight; the classifier (last layer) gets the linear gain."""
    draw = INITIALISERS[scheme]
    if draw is None:
        return
    weight_layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    hidden_gain = ACTIVATIONS[activation.name].gain(activation)
    for layer in weight_layers:
        nonlinearity, slope = ("linear", 0.0) if layer is weight_layers[-1] else hidden_gain
        draw(layer.weight, nonlinearity, slope)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def plot_activations(path) -> None:
    """Each activation (at its default settings) and its derivative on [-5, 5], into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    x = torch.linspace(-5, 5, 1001, requires_grad=True)
    columns = 4
    rows = math.ceil(len(ACTIVATIONS) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, (name, row) in zip(grid.flat, ACTIVATIONS.items()):
        module = module_class(row)().eval()  # RReLU: its mean slope
        y = module(x)
        (slope,) = torch.autograd.grad(y.sum(), x)
        axis.plot(x.detach(), y.detach(), label="f(x)")
        axis.plot(x.detach(), slope, "--", label="f'(x)")
        axis.axhline(0, color="grey", linewidth=0.5)
        axis.axvline(0, color="grey", linewidth=0.5)
        axis.set(title=name, ylim=(-2, 5))
        axis.grid(alpha=0.3)
    for axis in list(grid.flat)[len(ACTIVATIONS):]:
        axis.set_visible(False)
    grid[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)

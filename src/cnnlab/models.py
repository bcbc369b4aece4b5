"""The MLP and the ConvNet, built from two tables: ACTIVATIONS (one row per activation, all that is
known about it) and INITIALISERS (one small function per initialisation scheme)."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, Callable

from torch import Tensor, nn

from cnnlab.config import ActivationConfig, ConvNetConfig, MLPConfig, ModelConfig
from cnnlab.errors import UserError


def _settings_as_kwargs(cfg: ActivationConfig, width: int) -> dict[str, Any]:
    # The config's settings are named like the module's constructor arguments.
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "name"}


def _relu_gain(cfg: ActivationConfig) -> tuple[str, float]:
    # ReLU and its smooth relatives (ELU, CELU, GELU, SiLU, Mish, Softplus) are ReLU-like near the
    # scale that matters for variance, so they get ReLU's gain.
    return "relu", 0.0


@dataclass(frozen=True)
class Activation:
    """One row of ACTIVATIONS: its module class, how to build it, the gain for the weights before it,
    how `cnnlab activations` describes it, and where it saturates."""

    module: type[nn.Module]
    # What `cnnlab activations` prints about it.
    formula: str
    output_range: str
    settings: str  # with their defaults
    typical_use: str
    # The constructor's arguments for a layer of the given width (units or channels).
    kwargs: Callable[[ActivationConfig, int], dict[str, Any]] = _settings_as_kwargs
    # The (nonlinearity, slope) that torch.nn.init's gain formulas know for this activation.
    gain: Callable[[ActivationConfig], tuple[str, float]] = _relu_gain
    bounds: tuple[float, float] | None = None  # asymptotes of the output, where it saturates


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(nn.ReLU, "max(0, x)", "[0, inf)", "-",
                       "the default; cheap; units whose input stays negative die"),
    "leaky_relu": Activation(nn.LeakyReLU, "x if x > 0 else a*x", "(-inf, inf)", "negative_slope a = 0.01",
                             "ReLU that cannot die", gain=lambda cfg: ("leaky_relu", cfg.negative_slope)),
    "prelu": Activation(nn.PReLU, "x if x > 0 else a*x, a learned", "(-inf, inf)", "per_channel, init a = 0.25",
                        "lets the network learn the leak (He et al. 2015)",
                        kwargs=lambda cfg, width: {"num_parameters": width if cfg.per_channel else 1, "init": cfg.init},
                        gain=lambda cfg: ("leaky_relu", cfg.init)),
    "rrelu": Activation(nn.RReLU, "x if x > 0 else a*x, a ~ U(l, u) in training", "(-inf, inf)",
                        "lower = 1/8, upper = 1/3", "leak as a regulariser; mean slope at evaluation",
                        gain=lambda cfg: ("leaky_relu", (cfg.lower + cfg.upper) / 2)),
    "elu": Activation(nn.ELU, "x if x > 0 else a*(exp(x) - 1)", "(-a, inf)", "alpha a = 1",
                      "smooth, mean closer to 0 than ReLU"),
    # Self-normalising networks need unit-variance weights (LeCun), not a SELU-specific gain.
    "selu": Activation(nn.SELU, "s*x if x > 0 else s*a*(exp(x) - 1)", "(-1.76, inf)", "fixed s = 1.0507, a = 1.6733",
                       "self-normalising MLPs with LeCun init, no BatchNorm", gain=lambda cfg: ("linear", 0.0)),
    "celu": Activation(nn.CELU, "max(0, x) + min(0, a*(exp(x/a) - 1))", "(-a, inf)", "alpha a = 1",
                       "ELU, continuously differentiable in a"),
    "gelu": Activation(nn.GELU, "x * Phi(x)", "(-0.17, inf)", "approximate = none | tanh", "transformers; smooth ReLU"),
    "silu": Activation(nn.SiLU, "x * sigmoid(x)", "(-0.28, inf)", "-", "a.k.a. swish; smooth, non-monotonic"),
    "mish": Activation(nn.Mish, "x * tanh(softplus(x))", "(-0.31, inf)", "-", "smooth, non-monotonic, close to SiLU"),
    "softplus": Activation(nn.Softplus, "log(1 + exp(b*x)) / b", "(0, inf)", "beta b = 1, threshold = 20",
                           "a smooth ReLU that never dies"),
    "sigmoid": Activation(nn.Sigmoid, "1 / (1 + exp(-x))", "(0, 1)", "-", "outputs, gates; saturates, not zero-centred",
                          gain=lambda cfg: ("sigmoid", 0.0), bounds=(0.0, 1.0)),
    "tanh": Activation(nn.Tanh, "(exp(x) - exp(-x)) / (exp(x) + exp(-x))", "(-1, 1)", "-",
                       "zero-centred sigmoid; saturates", gain=lambda cfg: ("tanh", 0.0), bounds=(-1.0, 1.0)),
}
# What the probes need to know about a module of the network.
ACTIVATION_MODULES = tuple(row.module for row in ACTIVATIONS.values())
BOUNDS_BY_MODULE = {row.module: row.bounds for row in ACTIVATIONS.values() if row.bounds}

# Makes one fresh activation module for a layer of the given width (units or channels).
ActivationFactory = Callable[[int], nn.Module]


def activation_factory(cfg: ActivationConfig) -> ActivationFactory:
    row = ACTIVATIONS[cfg.name]
    return lambda width: row.module(**row.kwargs(cfg, width))


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
        module = row.module().eval()  # RReLU: its mean slope
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

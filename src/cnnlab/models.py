"""The MLP and the ConvNet, the table of activations, and the initialisation schemes."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import fields
from typing import Callable

from torch import nn

from cnnlab.config import INIT_SCHEMES, ActivationConfig, ConvNetConfig, MLPConfig, ModelConfig
from cnnlab.errors import UserError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "rrelu": nn.RReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "celu": nn.CELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}

# For `cnnlab activations`: formula, output range, settings, and when people reach for it.
ACTIVATION_INFO: dict[str, tuple[str, str, str, str]] = {
    "relu": ("max(0, x)", "[0, inf)", "-", "the default; cheap; units whose input stays negative die"),
    "leaky_relu": ("x if x > 0 else a*x", "(-inf, inf)", "negative_slope a = 0.01", "ReLU that cannot die"),
    "prelu": ("x if x > 0 else a*x, a learned", "(-inf, inf)", "per_channel, init a = 0.25",
              "lets the network learn the leak (He et al. 2015)"),
    "rrelu": ("x if x > 0 else a*x, a ~ U(l, u) in training", "(-inf, inf)", "lower = 1/8, upper = 1/3",
              "leak as a regulariser; mean slope at evaluation"),
    "elu": ("x if x > 0 else a*(exp(x) - 1)", "(-a, inf)", "alpha a = 1", "smooth, mean closer to 0 than ReLU"),
    "selu": ("s*x if x > 0 else s*a*(exp(x) - 1)", "(-1.76, inf)", "fixed s = 1.0507, a = 1.6733",
             "self-normalising MLPs with LeCun init, no BatchNorm"),
    "celu": ("max(0, x) + min(0, a*(exp(x/a) - 1))", "(-a, inf)", "alpha a = 1", "ELU, continuously differentiable in a"),
    "gelu": ("x * Phi(x)", "(-0.17, inf)", "approximate = none | tanh", "transformers; smooth ReLU"),
    "silu": ("x * sigmoid(x)", "(-0.28, inf)", "-", "a.k.a. swish; smooth, non-monotonic"),
    "mish": ("x * tanh(softplus(x))", "(-0.31, inf)", "-", "smooth, non-monotonic, close to SiLU"),
    "softplus": ("log(1 + exp(b*x)) / b", "(0, inf)", "beta b = 1, threshold = 20", "a smooth ReLU that never dies"),
    "sigmoid": ("1 / (1 + exp(-x))", "(0, 1)", "-", "outputs, gates; saturates, not zero-centred"),
    "tanh": ("(exp(x) - exp(-x)) / (exp(x) + exp(-x))", "(-1, 1)", "-", "zero-centred sigmoid; saturates"),
}

# Makes one fresh activation module for a layer of the given width (units or channels).
ActivationFactory = Callable[[int], nn.Module]


def activation_factory(cfg: ActivationConfig) -> ActivationFactory:
    if cfg.name not in ACTIVATIONS:
        raise UserError(f"Unknown activation '{cfg.name}'. Valid choices: {', '.join(ACTIVATIONS)}.")
    if cfg.name == "prelu":
        return lambda width: nn.PReLU(num_parameters=width if cfg.per_channel else 1, init=cfg.init)
    module_class = ACTIVATIONS[cfg.name]
    # The config's settings are named like the module's constructor arguments.
    kwargs = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "name"}
    return lambda width: module_class(**kwargs)


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
    if cfg.name not in MODELS:
        raise UserError(f"Unknown model '{cfg.name}'. Valid choices: {', '.join(MODELS)}.")
    model = MODELS[cfg.name](cfg, activation_factory(activation), input_shape, num_classes)
    initialise(model, cfg.init, activation)
    return model


def gain_arguments(activation: ActivationConfig) -> tuple[str, float]:
    """The (nonlinearity, slope) that torch.nn.init's gain formulas know for this activation."""
    name = activation.name
    if name == "leaky_relu":
        return "leaky_relu", activation.negative_slope
    if name == "prelu":
        return "leaky_relu", activation.init
    if name == "rrelu":
        return "leaky_relu", (activation.lower + activation.upper) / 2
    if name in ("sigmoid", "tanh"):
        return name, 0.0
    if name == "selu":
        # Self-normalising networks need unit-variance weights (LeCun), not a SELU-specific gain.
        return "linear", 0.0
    # ReLU and its smooth relatives (ELU, CELU, GELU, SiLU, Mish, Softplus) are ReLU-like near the
    # scale that matters for variance, so they get ReLU's gain.
    return "relu", 0.0


def initialise(model: nn.Module, scheme: str, activation: ActivationConfig) -> None:
    """Re-initialise every Linear/Conv weight; the classifier (last layer) gets the linear gain."""
    if scheme not in INIT_SCHEMES:
        raise UserError(f"Unknown model.init '{scheme}'. Valid choices: {', '.join(INIT_SCHEMES)}.")
    if scheme == "default":
        return
    weight_layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for layer in weight_layers:
        nonlinearity, slope = ("linear", 0.0) if layer is weight_layers[-1] else gain_arguments(activation)
        gain = nn.init.calculate_gain(nonlinearity, slope)
        if scheme == "kaiming":
            nn.init.kaiming_normal_(layer.weight, a=slope, nonlinearity=nonlinearity)
        elif scheme == "lecun":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="linear")
        elif scheme == "xavier":
            nn.init.xavier_uniform_(layer.weight, gain=gain)
        elif scheme == "orthogonal":
            nn.init.orthogonal_(layer.weight, gain=gain)
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
    for axis, (name, module_class) in zip(grid.flat, ACTIVATIONS.items()):
        module = module_class().eval()  # RReLU: its mean slope
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

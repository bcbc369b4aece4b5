"""The MLP and the ConvNet, built from two tables: ACTIVATIONS (one row per activation, all that is
known about it) and INITIALISERS (one small function per initialisation scheme)."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import KW_ONLY, dataclass, fields
from typing import Any, Callable

import torch
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


# Each activation's derivative f'(x) in closed form, elementwise on the pre-activation x, with the module's
# own settings. At a kink (x = 0) each takes the branch torch's autograd takes (the negative one), so the
# two agree everywhere. None reads a tensor back or branches on its values: the probes never wait for the
# device.

def _relu_derivative(x: Tensor, m: nn.ReLU) -> Tensor:
    return (x > 0).to(x.dtype)


def _leaky_relu_derivative(x: Tensor, m: nn.LeakyReLU) -> Tensor:
    return torch.full_like(x, m.negative_slope).masked_fill_(x > 0, 1.0)


def _prelu_derivative(x: Tensor, m: nn.PReLU) -> Tensor:
    # One learned slope, or one per channel along dim 1: shaped [C, 1, 1] to line up with [N, C, H, W].
    slope = m.weight.detach().view(-1, *[1] * (x.dim() - 2))
    return torch.where(x > 0, 1.0, slope)


def _rrelu_derivative(x: Tensor, m: nn.RReLU) -> Tensor:
    # Evaluation mode's slope, the mean of U(lower, upper): in training each element draws its own,
    # which no closed form can know.
    return torch.full_like(x, (m.lower + m.upper) / 2).masked_fill_(x > 0, 1.0)


def _elu_derivative(x: Tensor, m: nn.ELU) -> Tensor:
    return torch.where(x > 0, 1.0, m.alpha * torch.exp(x))  # exp overflows only where x > 0: not chosen


# SELU's fixed constants, as torch defines them (Klambauer et al. 2017).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _selu_derivative(x: Tensor, m: nn.SELU) -> Tensor:
    return SELU_SCALE * torch.where(x > 0, 1.0, SELU_ALPHA * torch.exp(x))


def _celu_derivative(x: Tensor, m: nn.CELU) -> Tensor:
    return torch.where(x > 0, 1.0, torch.exp(x / m.alpha))


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_TANH_KAPPA = 0.044715  # the cubic term of GELU's tanh approximation


def _gelu_derivative(x: Tensor, m: nn.GELU) -> Tensor:
    if m.approximate == "tanh":
        # f(x) = x/2 * (1 + tanh(u)) with u = sqrt(2/pi) * (x + kappa x^3): the product rule, in torch's order.
        t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_KAPPA * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_KAPPA * x * x)
    # f(x) = x * Phi(x), so f'(x) = Phi(x) + x * phi(x), with phi the standard normal density.
    return torch.special.ndtr(x) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _silu_derivative(x: Tensor, m: nn.SiLU) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _mish_derivative(x: Tensor, m: nn.Mish) -> Tensor:
    # f(x) = x * tanh(softplus(x)); softplus' is the sigmoid.
    t = torch.tanh(nn.functional.softplus(x))
    return t + x * torch.sigmoid(x) * (1 - t * t)


def _softplus_derivative(x: Tensor, m: nn.Softplus) -> Tensor:
    # sigmoid(beta x), except where beta x > threshold: there torch's softplus is x itself, slope exactly 1.
    bx = x * m.beta
    return torch.where(bx > m.threshold, 1.0, torch.sigmoid(bx))


def _sigmoid_derivative(x: Tensor, m: nn.Sigmoid) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def _tanh_derivative(x: Tensor, m: nn.Tanh) -> Tensor:
    t = torch.tanh(x)
    return 1 - t * t


# The peaks of f' for the smooth, non-monotonic activations (their dips below 0 are shallower: GELU -0.129,
# SiLU -0.100, Mish -0.113), so these are the suprema of |f'|. GELU's has a closed form, at x = sqrt(2)
# where f'' = phi(x) (2 - x^2) vanishes; the others were found by golden-section search in float64, and
# tests/test_models.py checks every one against a dense grid.
GELU_MAX_DERIVATIVE = 0.5 * (1 + math.erf(1)) + math.exp(-1) / math.sqrt(math.pi)  # 1.128904
GELU_TANH_MAX_DERIVATIVE = 1.1289930686587717  # at x = 1.4185
SILU_MAX_DERIVATIVE = 1.0998393201288668  # at x = 2.3994
MISH_MAX_DERIVATIVE = 1.0884981612517277  # at x = 1.4906


def _prelu_max_derivative(m: nn.PReLU) -> Tensor:
    # The slopes are learned, so this is a 0-dim tensor on their device: reading it back would make the
    # probes wait for the device. float() it where a number is needed.
    return m.weight.detach().abs().max().clamp(min=1.0)


@dataclass(frozen=True)
class Activation:
    """One row of ACTIVATIONS: its module class, how to build it, the gain for the weights before it,
    how `cnnlab activations` describes it, where it saturates, its derivative, and how the probes draw it."""

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
    _: KW_ONLY
    # f'(x) in closed form, elementwise on a pre-activation tensor, with the module's own settings.
    derivative: Callable[[Tensor, nn.Module], Tensor]
    # sup |f'(x)| over all real x for the module's settings: a float (a 0-dim tensor for PReLU).
    max_derivative: Callable[[nn.Module], float | Tensor]
    # The fixed (low, high) output axis of the activation-density image.
    density_range: tuple[float, float]


# density_range: the top is fastai's 10 for every unbounded activation, which holds typical positive
# outputs and lets layers be compared at a glance; the bottom (the comment on each row says why) sits
# just below the lowest typical output, so that the negative part shows, which fastai's [0, 10] cuts off.
ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(nn.ReLU, "max(0, x)", "[0, inf)", "-",
                       "the default; cheap; units whose input stays negative die",
                       derivative=_relu_derivative, max_derivative=lambda m: 1.0,
                       density_range=(0.0, 10.0)),  # never negative; 0 itself is the bottom row
    "leaky_relu": Activation(nn.LeakyReLU, "x if x > 0 else a*x", "(-inf, inf)", "negative_slope a = 0.01",
                             "ReLU that cannot die", gain=lambda cfg: ("leaky_relu", cfg.negative_slope),
                             derivative=_leaky_relu_derivative,
                             max_derivative=lambda m: max(1.0, abs(m.negative_slope)),
                             density_range=(-2.0, 10.0)),  # a*x for x down to -10 and slopes up to 0.2
    "prelu": Activation(nn.PReLU, "x if x > 0 else a*x, a learned", "(-inf, inf)", "per_channel, init a = 0.25",
                        "lets the network learn the leak (He et al. 2015)",
                        kwargs=lambda cfg, width: {"num_parameters": width if cfg.per_channel else 1, "init": cfg.init},
                        gain=lambda cfg: ("leaky_relu", cfg.init),
                        derivative=_prelu_derivative, max_derivative=_prelu_max_derivative,
                        density_range=(-3.0, 10.0)),  # the initial 0.25 reaches -2.5 at x = -10; room to learn
    "rrelu": Activation(nn.RReLU, "x if x > 0 else a*x, a ~ U(l, u) in training", "(-inf, inf)",
                        "lower = 1/8, upper = 1/3", "leak as a regulariser; mean slope at evaluation",
                        gain=lambda cfg: ("leaky_relu", (cfg.lower + cfg.upper) / 2),
                        derivative=_rrelu_derivative,
                        max_derivative=lambda m: max(1.0, abs(m.lower + m.upper) / 2),  # evaluation's slope
                        density_range=(-3.0, 10.0)),  # training slopes up to 1/3 reach -3 at x = -9
    "elu": Activation(nn.ELU, "x if x > 0 else a*(exp(x) - 1)", "(-a, inf)", "alpha a = 1",
                      "smooth, mean closer to 0 than ReLU",
                      derivative=_elu_derivative, max_derivative=lambda m: max(1.0, m.alpha),  # a*exp(0) at x = 0
                      density_range=(-2.0, 10.0)),  # the floor is -alpha: room for alpha up to 2
    # Self-normalising networks need unit-variance weights (LeCun), not a SELU-specific gain.
    "selu": Activation(nn.SELU, "s*x if x > 0 else s*a*(exp(x) - 1)", "(-1.76, inf)", "fixed s = 1.0507, a = 1.6733",
                       "self-normalising MLPs with LeCun init, no BatchNorm", gain=lambda cfg: ("linear", 0.0),
                       derivative=_selu_derivative, max_derivative=lambda m: SELU_SCALE * SELU_ALPHA,  # 1.7581 at x = 0
                       density_range=(-2.0, 10.0)),  # the floor is -s*a = -1.758
    "celu": Activation(nn.CELU, "max(0, x) + min(0, a*(exp(x/a) - 1))", "(-a, inf)", "alpha a = 1",
                       "ELU, continuously differentiable in a",
                       derivative=_celu_derivative, max_derivative=lambda m: 1.0,  # exp(x/a) <= 1 for x <= 0
                       density_range=(-2.0, 10.0)),  # the floor is -alpha: room for alpha up to 2
    "gelu": Activation(nn.GELU, "x * Phi(x)", "(-0.17, inf)", "approximate = none | tanh", "transformers; smooth ReLU",
                       derivative=_gelu_derivative,
                       max_derivative=lambda m: (GELU_TANH_MAX_DERIVATIVE if m.approximate == "tanh"
                                                 else GELU_MAX_DERIVATIVE),
                       density_range=(-0.5, 10.0)),  # dips to -0.17
    "silu": Activation(nn.SiLU, "x * sigmoid(x)", "(-0.28, inf)", "-", "a.k.a. swish; smooth, non-monotonic",
                       derivative=_silu_derivative, max_derivative=lambda m: SILU_MAX_DERIVATIVE,
                       density_range=(-0.5, 10.0)),  # dips to -0.28
    "mish": Activation(nn.Mish, "x * tanh(softplus(x))", "(-0.31, inf)", "-", "smooth, non-monotonic, close to SiLU",
                       derivative=_mish_derivative, max_derivative=lambda m: MISH_MAX_DERIVATIVE,
                       density_range=(-0.5, 10.0)),  # dips to -0.31
    "softplus": Activation(nn.Softplus, "log(1 + exp(b*x)) / b", "(0, inf)", "beta b = 1, threshold = 20",
                           "a smooth ReLU that never dies",
                           derivative=_softplus_derivative,
                           max_derivative=lambda m: 1.0,  # sigmoid < 1, and exactly 1 past the threshold, any beta
                           density_range=(0.0, 10.0)),  # always positive
    "sigmoid": Activation(nn.Sigmoid, "1 / (1 + exp(-x))", "(0, 1)", "-", "outputs, gates; saturates, not zero-centred",
                          gain=lambda cfg: ("sigmoid", 0.0), bounds=(0.0, 1.0),
                          derivative=_sigmoid_derivative, max_derivative=lambda m: 0.25,  # at x = 0
                          density_range=(0.0, 1.0)),  # its bounds: saturated units pile up on the edges
    "tanh": Activation(nn.Tanh, "(exp(x) - exp(-x)) / (exp(x) + exp(-x))", "(-1, 1)", "-",
                       "zero-centred sigmoid; saturates", gain=lambda cfg: ("tanh", 0.0), bounds=(-1.0, 1.0),
                       derivative=_tanh_derivative, max_derivative=lambda m: 1.0,  # at x = 0
                       density_range=(-1.0, 1.0)),  # its bounds: saturated units pile up on the edges
}
# What the probes need to know about a module of the network.
ACTIVATION_MODULES = tuple(row.module for row in ACTIVATIONS.values())
ACTIVATIONS_BY_MODULE = {row.module: row for row in ACTIVATIONS.values()}
BOUNDS_BY_MODULE = {row.module: row.bounds for row in ACTIVATIONS.values() if row.bounds}

# A unit is dead when its slope stays below this fraction of its activation's largest slope on every
# example and position: almost no gradient flows back through it. LeakyReLU's default leak of 0.01 is
# exactly at the limit, and so counts as alive.
DEAD_SLOPE_FRACTION = 0.01


def dead_units(pre: Tensor, module: nn.Module) -> Tensor:
    """One bool per unit (dim 1 of the pre-activations `pre`, [N, C] or [N, C, H, W]): True where
    |f'(pre)| < DEAD_SLOPE_FRACTION * max |f'| for every example and position. Stays on the device."""
    row = ACTIVATIONS_BY_MODULE[type(module)]
    slope = row.derivative(pre, module).abs()
    others = [dim for dim in range(pre.dim()) if dim != 1]
    return slope.amax(dim=others) < DEAD_SLOPE_FRACTION * row.max_derivative(module)

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

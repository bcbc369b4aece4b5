"""The activations cnnlab offers, one row each in ACTIVATIONS: all that is known about an activation.

A row holds its settings schema (the dataclass `activation=NAME` is validated against), its torch.nn
module (by class name: this module imports no torch, so that config mistakes answer fast), how
`cnnlab activations` describes it, the initialisation it wants, how to build it, the gain for the
weights before it, where it saturates, its derivative and how the probes draw it. Adding an
activation is its row here and its configs/activation/NAME.yaml.

train/models.py builds the modules; the probes and the findings read the rows.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable

from omegaconf import MISSING

if TYPE_CHECKING:
    from torch import Tensor, nn


# --- settings: the parameter names are those of the torch.nn modules --------------------------------
@dataclass
class ActivationConfig:
    name: str = MISSING


@dataclass
class LeakyReLUConfig(ActivationConfig):
    negative_slope: float = MISSING


@dataclass
class PReLUConfig(ActivationConfig):
    per_channel: bool = MISSING  # one learned slope per channel/unit instead of one per layer
    init: float = MISSING  # initial slope


@dataclass
class RReLUConfig(ActivationConfig):
    lower: float = MISSING
    upper: float = MISSING


@dataclass
class AlphaActivationConfig(ActivationConfig):
    alpha: float = MISSING


@dataclass
class GELUConfig(ActivationConfig):
    approximate: str = MISSING  # "none" or "tanh"


@dataclass
class SoftplusConfig(ActivationConfig):
    beta: float = MISSING
    threshold: float = MISSING


# The model.init schemes an activation may want, and where each comes from (the findings cite it).
INIT_SOURCES = {"kaiming": "He et al. 2015", "lecun": "Klambauer et al. 2017", "xavier": "Glorot & Bengio 2010"}


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
# device. torch is imported inside them: it is loaded by then, and this module must not load it.

def _relu_derivative(x: Tensor, m: nn.ReLU) -> Tensor:
    return (x > 0).to(x.dtype)


def _leaky_relu_derivative(x: Tensor, m: nn.LeakyReLU) -> Tensor:
    return x.new_full(x.shape, m.negative_slope).masked_fill_(x > 0, 1.0)


def _prelu_derivative(x: Tensor, m: nn.PReLU) -> Tensor:
    import torch

    # One learned slope, or one per channel along dim 1: shaped [C, 1, 1] to line up with [N, C, H, W].
    slope = m.weight.detach().view(-1, *[1] * (x.dim() - 2))
    return torch.where(x > 0, 1.0, slope)


def _rrelu_derivative(x: Tensor, m: nn.RReLU) -> Tensor:
    # Evaluation mode's slope, the mean of U(lower, upper): in training each element draws its own,
    # which no closed form can know.
    return x.new_full(x.shape, (m.lower + m.upper) / 2).masked_fill_(x > 0, 1.0)


def _elu_derivative(x: Tensor, m: nn.ELU) -> Tensor:
    import torch

    return torch.where(x > 0, 1.0, m.alpha * torch.exp(x))  # exp overflows only where x > 0: not chosen


# SELU's fixed constants, as torch defines them (Klambauer et al. 2017).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _selu_derivative(x: Tensor, m: nn.SELU) -> Tensor:
    import torch

    return SELU_SCALE * torch.where(x > 0, 1.0, SELU_ALPHA * torch.exp(x))


def _celu_derivative(x: Tensor, m: nn.CELU) -> Tensor:
    import torch

    return torch.where(x > 0, 1.0, torch.exp(x / m.alpha))


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_TANH_KAPPA = 0.044715  # the cubic term of GELU's tanh approximation


def _gelu_derivative(x: Tensor, m: nn.GELU) -> Tensor:
    import torch

    if m.approximate == "tanh":
        # f(x) = x/2 * (1 + tanh(u)) with u = sqrt(2/pi) * (x + kappa x^3): the product rule, in torch's order.
        t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_KAPPA * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_KAPPA * x * x)
    # f(x) = x * Phi(x), so f'(x) = Phi(x) + x * phi(x), with phi the standard normal density.
    return torch.special.ndtr(x) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _silu_derivative(x: Tensor, m: nn.SiLU) -> Tensor:
    s = x.sigmoid()
    return s * (1 + x * (1 - s))


def _mish_derivative(x: Tensor, m: nn.Mish) -> Tensor:
    import torch

    # f(x) = x * tanh(softplus(x)); softplus' is the sigmoid.
    t = torch.tanh(torch.nn.functional.softplus(x))
    return t + x * torch.sigmoid(x) * (1 - t * t)


def _softplus_derivative(x: Tensor, m: nn.Softplus) -> Tensor:
    import torch

    # sigmoid(beta x), except where beta x > threshold: there torch's softplus is x itself, slope exactly 1.
    bx = x * m.beta
    return torch.where(bx > m.threshold, 1.0, torch.sigmoid(bx))


def _sigmoid_derivative(x: Tensor, m: nn.Sigmoid) -> Tensor:
    s = x.sigmoid()
    return s * (1 - s)


def _tanh_derivative(x: Tensor, m: nn.Tanh) -> Tensor:
    t = x.tanh()
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
    """One row of ACTIVATIONS: its module, how `cnnlab activations` describes it, its settings, the
    init it wants, how to build it, the gain for the weights before it, where it saturates, its
    derivative, and how the probes draw it."""

    module: str  # the torch.nn class, by name: getattr(torch.nn, module)
    # What `cnnlab activations` prints about it.
    formula: str
    output_range: str
    settings: str  # with their defaults
    typical_use: str
    _: KW_ONLY
    init: str  # the model.init that keeps its output variance steady with depth: a key of INIT_SOURCES
    schema: type[ActivationConfig] = ActivationConfig  # what activation=NAME is validated against
    # The constructor's arguments for a layer of the given width (units or channels).
    kwargs: Callable[[ActivationConfig, int], dict[str, Any]] = _settings_as_kwargs
    # The (nonlinearity, slope) that torch.nn.init's gain formulas know for this activation.
    gain: Callable[[ActivationConfig], tuple[str, float]] = _relu_gain
    bounds: tuple[float, float] | None = None  # asymptotes of the output, where it saturates
    # f'(x) in closed form, elementwise on a pre-activation tensor, with the module's own settings.
    derivative: Callable[[Tensor, nn.Module], Tensor]
    # sup |f'(x)| over all real x for the module's settings: a float (a 0-dim tensor for PReLU).
    max_derivative: Callable[[nn.Module], float | Tensor]
    # |f'| rises with x up to where it first reaches 1% of its largest and stays at least that beyond:
    # then a unit's largest input alone decides whether it is dead (the probes skip f' of every input).
    slope_rises: bool = False
    # The fixed (low, high) output axis of the activation-density image.
    density_range: tuple[float, float]


# density_range: the top is fastai's 10 for every unbounded activation, which holds typical positive
# outputs and lets layers be compared at a glance; the bottom (the comment on each row says why) sits
# just below the lowest typical output, so that the negative part shows, which fastai's [0, 10] cuts off.
ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation("ReLU", "max(0, x)", "[0, inf)", "-",
                       "the default; cheap; units whose input stays negative die", init="kaiming",
                       derivative=_relu_derivative, max_derivative=lambda m: 1.0, slope_rises=True,
                       density_range=(0.0, 10.0)),  # never negative; 0 itself is the bottom row
    "leaky_relu": Activation("LeakyReLU", "x if x > 0 else a*x", "(-inf, inf)", "negative_slope a = 0.01",
                             "ReLU that cannot die", init="kaiming", schema=LeakyReLUConfig,
                             gain=lambda cfg: ("leaky_relu", cfg.negative_slope),
                             derivative=_leaky_relu_derivative,
                             max_derivative=lambda m: max(1.0, abs(m.negative_slope)),
                             density_range=(-2.0, 10.0)),  # a*x for x down to -10 and slopes up to 0.2
    "prelu": Activation("PReLU", "x if x > 0 else a*x, a learned", "(-inf, inf)", "per_channel, init a = 0.25",
                        "lets the network learn the leak (He et al. 2015)", init="kaiming", schema=PReLUConfig,
                        kwargs=lambda cfg, width: {"num_parameters": width if cfg.per_channel else 1, "init": cfg.init},
                        gain=lambda cfg: ("leaky_relu", cfg.init),
                        derivative=_prelu_derivative, max_derivative=_prelu_max_derivative,
                        density_range=(-3.0, 10.0)),  # the initial 0.25 reaches -2.5 at x = -10; room to learn
    "rrelu": Activation("RReLU", "x if x > 0 else a*x, a ~ U(l, u) in training", "(-inf, inf)",
                        "lower = 1/8, upper = 1/3", "leak as a regulariser; mean slope at evaluation",
                        init="kaiming", schema=RReLUConfig,
                        gain=lambda cfg: ("leaky_relu", (cfg.lower + cfg.upper) / 2),
                        derivative=_rrelu_derivative,
                        max_derivative=lambda m: max(1.0, abs(m.lower + m.upper) / 2),  # evaluation's slope
                        density_range=(-3.0, 10.0)),  # training slopes up to 1/3 reach -3 at x = -9
    "elu": Activation("ELU", "x if x > 0 else a*(exp(x) - 1)", "(-a, inf)", "alpha a = 1",
                      "smooth, mean closer to 0 than ReLU", init="kaiming", schema=AlphaActivationConfig,
                      derivative=_elu_derivative, max_derivative=lambda m: max(1.0, m.alpha),  # a*exp(0) at x = 0
                      slope_rises=True,
                      density_range=(-2.0, 10.0)),  # the floor is -alpha: room for alpha up to 2
    # Self-normalising networks need unit-variance weights (LeCun), not a SELU-specific gain.
    "selu": Activation("SELU", "s*x if x > 0 else s*a*(exp(x) - 1)", "(-1.76, inf)", "fixed s = 1.0507, a = 1.6733",
                       "self-normalising MLPs with LeCun init, no BatchNorm", init="lecun",
                       gain=lambda cfg: ("linear", 0.0),
                       derivative=_selu_derivative, max_derivative=lambda m: SELU_SCALE * SELU_ALPHA,  # 1.7581 at x = 0
                       slope_rises=True,
                       density_range=(-2.0, 10.0)),  # the floor is -s*a = -1.758
    "celu": Activation("CELU", "max(0, x) + min(0, a*(exp(x/a) - 1))", "(-a, inf)", "alpha a = 1",
                       "ELU, continuously differentiable in a", init="kaiming", schema=AlphaActivationConfig,
                       derivative=_celu_derivative, max_derivative=lambda m: 1.0,  # exp(x/a) <= 1 for x <= 0
                       slope_rises=True,
                       density_range=(-2.0, 10.0)),  # the floor is -alpha: room for alpha up to 2
    "gelu": Activation("GELU", "x * Phi(x)", "(-0.17, inf)", "approximate = none | tanh", "transformers; smooth ReLU",
                       init="kaiming", schema=GELUConfig, derivative=_gelu_derivative,
                       max_derivative=lambda m: (GELU_TANH_MAX_DERIVATIVE if m.approximate == "tanh"
                                                 else GELU_MAX_DERIVATIVE),
                       density_range=(-0.5, 10.0)),  # dips to -0.17
    "silu": Activation("SiLU", "x * sigmoid(x)", "(-0.28, inf)", "-", "a.k.a. swish; smooth, non-monotonic",
                       init="kaiming", derivative=_silu_derivative, max_derivative=lambda m: SILU_MAX_DERIVATIVE,
                       density_range=(-0.5, 10.0)),  # dips to -0.28
    "mish": Activation("Mish", "x * tanh(softplus(x))", "(-0.31, inf)", "-", "smooth, non-monotonic, close to SiLU",
                       init="kaiming", derivative=_mish_derivative, max_derivative=lambda m: MISH_MAX_DERIVATIVE,
                       density_range=(-0.5, 10.0)),  # dips to -0.31
    "softplus": Activation("Softplus", "log(1 + exp(b*x)) / b", "(0, inf)", "beta b = 1, threshold = 20",
                           "a smooth ReLU that never dies", init="kaiming", schema=SoftplusConfig,
                           derivative=_softplus_derivative,
                           max_derivative=lambda m: 1.0,  # sigmoid < 1, and exactly 1 past the threshold, any beta
                           slope_rises=True,
                           density_range=(0.0, 10.0)),  # always positive
    "sigmoid": Activation("Sigmoid", "1 / (1 + exp(-x))", "(0, 1)", "-", "outputs, gates; saturates, not zero-centred",
                          init="xavier", gain=lambda cfg: ("sigmoid", 0.0), bounds=(0.0, 1.0),
                          derivative=_sigmoid_derivative, max_derivative=lambda m: 0.25,  # at x = 0
                          density_range=(0.0, 1.0)),  # its bounds: saturated units pile up on the edges
    "tanh": Activation("Tanh", "(exp(x) - exp(-x)) / (exp(x) + exp(-x))", "(-1, 1)", "-",
                       "zero-centred sigmoid; saturates", init="xavier", gain=lambda cfg: ("tanh", 0.0),
                       bounds=(-1.0, 1.0), derivative=_tanh_derivative, max_derivative=lambda m: 1.0,  # at x = 0
                       density_range=(-1.0, 1.0)),  # its bounds: saturated units pile up on the edges
}

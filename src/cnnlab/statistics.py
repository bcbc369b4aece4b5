"""What the probes log, one row per statistic: its TensorBoard tag prefix, the level it is measured
at, its kind (scalar, histogram, image), its Custom Scalars chart, its `cnnlab inspect` column,
whether it turns non-finite when a layer blows up, and whether `cnnlab compare` draws it. The
TensorBoard layout, inspect's columns, compare's series and the findings' lists are all derived
from these rows, and the probes make every tag with `tag`. No torch here. Adding a statistic is
its computation in instruments/probes.py and its row here.

Tags are `PREFIX/LAYER` (`dead_fraction/act02_relu`, `grad_norm/layer01_linear`) or, for a statistic
of the whole network, `PREFIX` or `PREFIX/WHAT` (`gradient_noise_scale`, `sharpness/top_eigenvalue`).
Layer names start with `act` (an activation's output) or `layer` (a weight layer), then their depth
in two digits, so that they sort in depth order."""

from __future__ import annotations

import re
from dataclasses import dataclass

# The levels a statistic is measured at.
ACTIVATION, WEIGHT, NETWORK = "activation", "weight", "network"
LEVELS = (ACTIVATION, WEIGHT, NETWORK)
LAYER_START = {ACTIVATION: "act", WEIGHT: "layer"}  # how the names of each level's layers start
# What a statistic is in TensorBoard: a scalar per probe, a histogram per probe, or an image.
SCALAR, HISTOGRAM, IMAGE = "scalar", "histogram", "image"


@dataclass(frozen=True)
class Statistic:
    level: str  # ACTIVATION: per activation layer; WEIGHT: per weight layer; NETWORK: one for the network
    chart: str  # the title of its chart in TensorBoard's Custom Scalars tab (a scalar's), or what it shows
    meaning: str  # one line: what it measures
    column: tuple[str, str] | None = None  # (title, number format) of its `cnnlab inspect` column; None: none
    blows_up: bool = False  # turns NaN/inf when a layer's weights or inputs blow up (the findings read it so)
    compared: bool = False  # `cnnlab compare` reads it for its figures
    kind: str = SCALAR  # SCALAR, HISTOGRAM or IMAGE
    # What the tags of a NETWORK statistic end in (`sharpness/top_eigenvalue`); none: the tag is the prefix.
    parts: tuple[str, ...] = ()


# In the order of their charts. A layer-level statistic's tags end in the layer's name, or in
# `all` (dead_fraction, dead_on_batch: every layer together) or `total` (grad_norm: every parameter, from the loop).
STATISTICS: dict[str, Statistic] = {
    "dead_fraction": Statistic(ACTIVATION, "dead fraction",
                               "share of units dead on every one of probes.death_examples training images "
                               "(step 0 and each epoch end); not for sigmoid/tanh, which saturate",
                               column=("dead fraction", ".3f"), compared=True),
    "dead_on_batch": Statistic(ACTIVATION, "dead fraction on the probe batch",
                               "share of units dead on every image of the probe batch (every probe; reads high)"),
    "negative_fraction": Statistic(ACTIVATION, "negative fraction",
                                   "leaky ReLU/PReLU/RReLU: share of units never positive on the death_examples images"),
    "saturation": Statistic(ACTIVATION, "saturation", "share of outputs within 1% of a bounded activation's limits",
                            column=("saturation", ".3f"), blows_up=True),
    "act_mean": Statistic(ACTIVATION, "activation mean", "mean of the layer's outputs",
                          column=("act mean", ".3g"), blows_up=True, compared=True),
    "act_std": Statistic(ACTIVATION, "activation std", "standard deviation of the layer's outputs",
                         column=("act std", ".3g"), blows_up=True, compared=True),
    "grad_norm": Statistic(WEIGHT, "gradient norm", "L2 norm of the layer's weight gradient (`total`: all)",
                           column=("grad norm", ".3g"), blows_up=True),
    "update_ratio": Statistic(WEIGHT, "update ratio (log10)", "log10 of |weight update| / |weight|",
                              column=("update ratio (log10)", ".2f"), blows_up=True),
    "prelu_slope": Statistic(ACTIVATION, "PReLU slope", "mean learned negative slope of a PReLU layer"),
    "revived_fraction": Statistic(ACTIVATION, "revived fraction", "share of units dead at the last probe, alive now"),
    "effective_rank": Statistic(ACTIVATION, "effective rank", "exp of the entropy of the outputs' singular values",
                                column=("eff. rank", ".1f"), blows_up=True, compared=True),
    "gradient_snr": Statistic(WEIGHT, "gradient SNR",
                              "mean over the layer's parameters of (mean^2 - var/N) / var of the per-example gradient",
                              column=("gradient SNR", ".3g")),
    "gradient_noise_scale": Statistic(NETWORK, "gradient noise scale", "tr(Sigma) / |G|^2 (McCandlish et al. 2018)"),
    "sharpness": Statistic(NETWORK, "sharpness and stability limit",
                           "largest and smallest eigenvalues of the training loss's Hessian on the curvature set, "
                           "the optimizer's stability limit; Adam/RMSprop: the top eigenvalue of P^-1 H and its limit",
                           compared=True, parts=("top_eigenvalue", "min_eigenvalue", "stability_limit",
                                                 "preconditioned_eigenvalue", "preconditioned_limit")),
    "activations": Statistic(ACTIVATION, "activation histograms", "the layer's outputs on the probe batch",
                             kind=HISTOGRAM),
    "preactivations": Statistic(ACTIVATION, "pre-activation histograms", "the layer's inputs on the probe batch",
                                kind=HISTOGRAM),
    "weights": Statistic(WEIGHT, "weight histograms", "the layer's weights", kind=HISTOGRAM),
    "prelu_slopes": Statistic(ACTIVATION, "PReLU slope histograms", "a per-channel PReLU layer's learned slopes",
                              kind=HISTOGRAM),
    "activation_density": Statistic(ACTIVATION, "activation density (also density/LAYER.png)",
                                    "the layer's output values against probe step, log(1 + count) as colour",
                                    kind=IMAGE),
}

# The training curves, logged by the loop rather than the probes: the first charts, and what
# compare's figures read besides the statistics above.
TRAINING_CHARTS = {"loss": r"(train|val|test)/loss", "accuracy": r"(train|val|test)/acc"}
TRAINING_COMPARED = ("train/loss", "val/")


def tag(prefix: str, layer: str = "") -> str:
    """`dead_fraction`, `act02_relu` -> `dead_fraction/act02_relu`; `gradient_noise_scale` alone -> itself.
    The prefix must be a row: every tag the probes write is made here."""
    assert prefix in STATISTICS, prefix
    return f"{prefix}/{layer}" if layer else prefix


def split_tag(tag_: str) -> tuple[str, str]:
    """`dead_fraction/act02_relu` -> (`dead_fraction`, `act02_relu`); `gradient_noise_scale` -> (it, ``)."""
    prefix, _, layer = tag_.partition("/")
    return prefix, layer


def layer_depth(name: str) -> int:
    """act03_fc, layer03_conv -> 3; names without a depth (`all`, `total`) sort last."""
    match = re.match(r"(?:act|layer)(\d+)", name)
    return int(match.group(1)) if match else 10**9


def prefixes(level: str | None = None, *, column: bool = False, blows_up: bool = False,
             compared: bool = False, kind: str = SCALAR) -> tuple[str, ...]:
    """The prefixes of the `kind` rows at `level` (any level if None) that have each property asked for."""
    return tuple(prefix for prefix, row in STATISTICS.items()
                 if row.kind == kind and (level is None or row.level == level)
                 and (row.column is not None or not column) and (row.blows_up or not blows_up)
                 and (row.compared or not compared))


def columns(level: str) -> tuple[tuple[str, str, str], ...]:
    """`cnnlab inspect`'s columns for a level's layers: (prefix, title, number format)."""
    return tuple((prefix, *STATISTICS[prefix].column) for prefix in prefixes(level, column=True))


def custom_scalars_layout() -> dict[str, dict[str, list]]:
    """TensorBoard's Custom Scalars layout: the training curves first, then one chart per scalar
    statistic, of all its tags (every layer of it)."""
    training = {chart: ["Multiline", [pattern]] for chart, pattern in TRAINING_CHARTS.items()}
    layers = {STATISTICS[prefix].chart: ["Multiline", [_tags_pattern(prefix)]] for prefix in prefixes()}
    return {"training": training, "layers": layers}


def _tags_pattern(prefix: str) -> str:
    row = STATISTICS[prefix]
    return prefix if row.level == NETWORK and not row.parts else rf"{prefix}/.*"


def compared_tags() -> tuple[str, ...]:
    """The tag prefixes compare's figures read (`str.startswith` each)."""
    return (*TRAINING_COMPARED, *(f"{prefix}/" for prefix in prefixes(compared=True)))

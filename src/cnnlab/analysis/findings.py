"""Findings: a short list of what a run's per-layer series say, each rule grounded in the literature.

Every rule is a pure function (series, facts, cfg) -> [Finding] over the TensorBoard scalars of one
run; none needs torch. A rule whose tags are missing, or that has too few points to judge, says
nothing: a healthy or a short run must not raise alarms. The thresholds are FindingsConfig fields
(config.py, with their sources in configs/train.yaml).
"""

from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from cnnlab.config import FindingsConfig
from cnnlab.statistics import layer_depth, prefixes, split_tag
from cnnlab.status import Status

WARNING, INFO = "warning", "info"

# TensorBoard scalar tag -> [(step, value)], steps increasing.
Series = dict[str, list[tuple[int, float]]]

# The model.init that keeps each activation's output variance steady with depth.
RELU_FAMILY = ("relu", "leaky_relu", "prelu", "rrelu", "elu", "celu", "gelu", "silu", "mish", "softplus")
INIT_FOR = {**{name: "kaiming" for name in RELU_FAMILY}, "selu": "lecun", "sigmoid": "xavier", "tanh": "xavier"}
INIT_SOURCE = {"kaiming": "He et al. 2015", "lecun": "Klambauer et al. 2017", "xavier": "Glorot & Bengio 2010"}
# Earlier points a running median needs before a jump over it means anything.
MIN_HISTORY = 3


@dataclass
class Finding:
    kind: str
    severity: str  # WARNING or INFO
    layer: Optional[str]
    step: Optional[int]
    value: Optional[float]
    message: str
    advice: str

    def to_dict(self) -> dict:
        """JSON-safe: a value that is not a finite number becomes None."""
        d = asdict(self)
        d["value"] = float(self.value) if self.value is not None and math.isfinite(self.value) else None
        d["step"] = int(self.step) if self.step is not None else None
        return d


@dataclass
class RunFacts:
    num_classes: int
    steps_per_epoch: int
    activation: str  # config name: relu, tanh, selu...
    init: str  # model.init: default, kaiming, xavier, lecun, orthogonal
    batchnorm: bool
    optimizer: str  # sgd, adam, adamw, rmsprop
    lr: float
    momentum: float  # 0.0 where the optimizer has none
    grad_clip: Optional[float]
    status: str  # metrics.json's status (a Status), "unknown" without one
    diverged_step: Optional[int]


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    section = config.get(name)
    return section if isinstance(section, dict) else {}


def run_facts(config: dict[str, Any], *, num_classes: int, steps_per_epoch: int, metrics: dict[str, Any]) -> RunFacts:
    """What the findings need to know about a run besides its series: from its config as plain
    containers (.hydra/config.yaml, or config.as_dict(run)) and its metrics.json. Lenient with an
    older or partial config: what it lacks is taken as the defaults (init `default`, no BatchNorm,
    no momentum, no clipping)."""
    model, optimizer = _section(config, "model"), _section(config, "optimizer")
    return RunFacts(
        num_classes=num_classes, steps_per_epoch=steps_per_epoch,
        activation=str(_section(config, "activation").get("name", "")), init=str(model.get("init", "default")),
        batchnorm=bool(model.get("batchnorm", False)), optimizer=str(optimizer.get("name", "")),
        lr=float(optimizer.get("lr", 0.0)), momentum=float(optimizer.get("momentum", 0.0) or 0.0),
        grad_clip=_section(config, "trainer").get("grad_clip"), status=str(metrics.get("status", "unknown")),
        diverged_step=metrics.get("diverged_step"))


# --- reading series --------------------------------------------------------------------------------
def _layers(series: Series, prefix: str) -> list[str]:
    """The layers with a `prefix/<layer>` tag, in depth order (not `all`, `total`)."""
    names = [layer for of, layer in map(split_tag, series) if of == prefix and layer]
    return sorted((n for n in names if n not in ("all", "total")), key=lambda n: (layer_depth(n), n))


def _finite(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(s, v) for s, v in points if v is not None and math.isfinite(v)]


def _at_step0(series: Series, tag: str) -> Optional[float]:
    points = _finite(series.get(tag, []))
    return points[0][1] if points and points[0][0] == 0 else None


def _lr_advice(facts: RunFacts, factor: float) -> str:
    return f"optimizer.lr={facts.lr * factor:.3g}"


def _init_advice(facts: RunFacts) -> str:
    """Which model.init fits the activation, and BatchNorm, as one sentence."""
    init = INIT_FOR.get(facts.activation)
    tips = []
    if init and facts.init != init:
        tips.append(f"model.init={init} (the scheme made for {facts.activation}, {INIT_SOURCE[init]})")
    if not facts.batchnorm:
        tips.append("model.batchnorm=true")
    return "Try " + " and/or ".join(tips) + "." if tips else "Try a shallower or wider model."


# --- the rules ---------------------------------------------------------------------------------------
def dead_at_init(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """A layer mostly dead before any update: no gradient reaches its units (Lu et al. 2019)."""
    found = []
    for layer in _layers(series, "dead_fraction"):
        dead = _at_step0(series, f"dead_fraction/{layer}")
        if dead is not None and dead >= cfg.dead_at_init:
            fix = "activation=leaky_relu, " if facts.activation == "relu" else ""
            found.append(Finding(
                "dead_at_init", WARNING, layer, 0, dead,
                f"{layer}: {dead:.0%} of its units are dead at initialisation (step 0): no gradient flows through them.",
                f"Deep narrow nets die at initialisation (Lu et al. 2019). Try {fix}model.init={INIT_FOR.get(facts.activation, 'kaiming')}, "
                f"model.batchnorm=true, or a wider/shallower model."))
    return found


def dying_units(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """Units that die during training, typically ReLUs pushed negative by large updates (Lu et al. 2019)."""
    found = []
    for layer in _layers(series, "dead_fraction"):
        points = _finite(series[f"dead_fraction/{layer}"])
        if len(points) < 2:
            continue
        (first_step, first), (last_step, last) = points[0], points[-1]
        rise = last - first
        if rise < cfg.dying_info:
            continue
        severity = WARNING if rise >= cfg.dying_warning else INFO
        fix = ", activation=leaky_relu" if facts.activation == "relu" else ""
        found.append(Finding(
            "dying_units", severity, layer, last_step, last,
            f"{layer}: the dead fraction rose from {first:.0%} (step {first_step}) to {last:.0%} (step {last_step}).",
            f"Units die when large updates push their inputs where the activation is flat (Lu et al. 2019). "
            f"Try {_lr_advice(facts, 0.1)}{fix}, or model.batchnorm=true."))
    return found


def saturation(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """A sigmoid/tanh layer stuck at its asymptotes, where its slope and gradient vanish (Glorot & Bengio 2010)."""
    found = []
    for layer in _layers(series, "saturation"):
        points = _finite(series[f"saturation/{layer}"])[-cfg.saturation_probes:]
        if not points:
            continue
        share = statistics.median(v for _, v in points)
        if share >= cfg.saturation:
            found.append(Finding(
                "saturation", WARNING, layer, points[-1][0], share,
                f"{layer}: {share:.0%} of its outputs are saturated (median of the last {len(points)} probes, "
                f"to step {points[-1][0]}).",
                f"Saturated units pass almost no gradient (Glorot & Bengio 2010). {_init_advice(facts)} "
                f"Or {_lr_advice(facts, 0.1)}, or a ReLU-family activation (activation=leaky_relu)."))
    return found


def vanishing_gradients(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """The first weight layer gets a tiny share of the gradient the top hidden layer gets (Glorot & Bengio 2010)."""
    layers = _layers(series, "grad_norm")
    hidden = [name for name in layers if not name.endswith("classifier")]
    if len(hidden) < 2:
        return []
    first, top = hidden[0], hidden[-1]
    top_at = {s: v for s, v in _finite(series[f"grad_norm/{top}"]) if v > 0}
    ratios = [(s, v / top_at[s]) for s, v in _finite(series[f"grad_norm/{first}"]) if s in top_at]
    if not ratios:
        return []
    small = [(s, r) for s, r in ratios if r < cfg.vanishing_ratio]
    if len(small) <= cfg.most * len(ratios):
        return []
    median = statistics.median(r for _, r in ratios)
    return [Finding(
        "vanishing_gradients", WARNING, first, small[0][0], median,
        f"{first}: its gradient norm is below {cfg.vanishing_ratio:g} x that of {top} on {len(small)} of "
        f"{len(ratios)} probes (median ratio {median:.2g}, first at step {small[0][0]}).",
        f"The gradient shrinks on its way down, so the first layers barely learn (Glorot & Bengio 2010). "
        f"{_init_advice(facts)} Bounded activations vanish most: activation=relu or leaky_relu.")]


def exploding_gradients(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """A jump of the global gradient norm over its running median, or clipping on most steps (Pascanu et al. 2013)."""
    points = _finite(series.get("grad_norm/total", []))
    found = []
    earlier: list[float] = []
    for step, value in points:
        if len(earlier) >= MIN_HISTORY:
            median = statistics.median(earlier)
            if median > 0 and value >= cfg.exploding_factor * median:
                clip = "" if facts.grad_clip is not None else ", trainer.grad_clip=1.0"
                found.append(Finding(
                    "exploding_gradients", WARNING, None, step, value,
                    f"The global gradient norm jumped to {value:.3g} at step {step}, {value / median:.0f}x its "
                    f"running median {median:.3g}.",
                    f"Exploding gradients (Pascanu et al. 2013). Try {_lr_advice(facts, 0.1)}{clip}, or model.batchnorm=true."))
                break
        bisect.insort(earlier, value)
    if facts.grad_clip is not None and points:
        clipped = [s for s, v in points if v > facts.grad_clip]
        if len(clipped) > cfg.most * len(points):
            median = statistics.median(v for _, v in points)
            found.append(Finding(
                "exploding_gradients", WARNING, None, clipped[0], len(clipped) / len(points),
                f"Clipping was active on {len(clipped)} of {len(points)} logged steps: the gradient norm (median "
                f"{median:.3g}) exceeds trainer.grad_clip={facts.grad_clip:g}.",
                f"Clipping on most steps does the learning rate's job (Pascanu et al. 2013). Try {_lr_advice(facts, 0.1)}, "
                f"or trainer.grad_clip={median * 2:.3g} so that it only catches spikes."))
    return found


def activation_scale(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """At step 0 the output scale shrinks or grows with depth: the init does not fit the activation (He et al. 2015)."""
    stds = [(layer, _at_step0(series, f"act_std/{layer}")) for layer in _layers(series, "act_std")]
    stds = [(layer, v) for layer, v in stds if v is not None]
    if len(stds) < 2 or stds[0][1] <= 0:
        return []
    (first, first_std), (deep, deep_std) = stds[0], stds[-1]
    ratio = deep_std / first_std
    if 1 / cfg.activation_scale <= ratio <= cfg.activation_scale:
        return []
    way = "shrinks" if ratio < 1 else "grows"
    return [Finding(
        "activation_scale", WARNING, deep, 0, ratio,
        f"At step 0 the output std {way} with depth: {deep} {deep_std:.3g} vs {first} {first_std:.3g} "
        f"({ratio:.3g}x) with model.init={facts.init} and activation={facts.activation}.",
        f"The initialisation does not fit the activation (He et al. 2015). {_init_advice(facts)}")]


# probes.update_ratio floors log10(0) at -20: at or below this, the weights did not change at all.
NO_UPDATE = -19.0


def update_ratio(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """A layer's update/weight ratio far from ~1e-3 over the second half of the run (Karpathy, CS231n)."""
    found = []
    for layer in _layers(series, "update_ratio"):
        points = _finite(series[f"update_ratio/{layer}"])
        if not points:
            continue
        middle = (points[0][0] + points[-1][0]) / 2
        late = [v for s, v in points if s >= middle]
        if len(late) < 2:
            continue
        median = statistics.median(late)
        if median <= NO_UPDATE:  # the layer does not move at all: no gradient reaches it, which the
            continue             # dead-unit and gradient findings explain; a lower lr would not
        if median > cfg.update_ratio_high:
            found.append(Finding(
                "update_ratio", WARNING, layer, points[-1][0], median,
                f"{layer}: each step changes its weights by 10^{median:.1f} of their norm (median over the second "
                f"half, steps {math.ceil(middle)}-{points[-1][0]}); about 10^-3 is healthy.",
                f"The learning rate is too high for this layer (Karpathy, CS231n). Try {_lr_advice(facts, 0.1)}."))
        elif median < cfg.update_ratio_low:
            found.append(Finding(
                "update_ratio", WARNING, layer, points[-1][0], median,
                f"{layer}: each step changes its weights by only 10^{median:.1f} of their norm (median over the second "
                f"half, steps {math.ceil(middle)}-{points[-1][0]}); about 10^-3 is healthy.",
                f"The learning rate is too low for this layer (Karpathy, CS231n). Try {_lr_advice(facts, 10)}."))
    return found


def not_learning(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """After an epoch the loss still equals that of uniform guessing, ln(classes) (Karpathy 2019)."""
    if facts.num_classes < 2:
        return []
    late = [(s, v) for s, v in _finite(series.get("train/loss", [])) if s >= facts.steps_per_epoch][-3:]
    if not late:
        return []
    chance = math.log(facts.num_classes)
    loss = statistics.median(v for _, v in late)
    if abs(loss - chance) > cfg.not_learning * chance:
        return []
    return [Finding(
        "not_learning", WARNING, None, late[-1][0], loss,
        f"At step {late[-1][0]}, after the first epoch, the training loss {loss:.3f} is still that of uniform "
        f"guessing, ln({facts.num_classes}) = {chance:.3f}.",
        f"The network has learned nothing (Karpathy 2019, 'A Recipe for Training Neural Networks'). "
        f"Try {_lr_advice(facts, 10)} or {_lr_advice(facts, 0.1)}; look for dead or saturated layers above. "
        f"{_init_advice(facts)}")]


def diverged(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """The run stopped on a NaN/inf; name the layer whose statistics blew up first, when the probes saw it."""
    if facts.status != Status.DIVERGED:
        return []
    first: Optional[tuple[int, int, str]] = None  # (step, depth, layer)
    blows_up = prefixes(blows_up=True)  # the statistics that turn NaN/inf when a layer blows up
    for tag, points in series.items():
        prefix, layer = split_tag(tag)
        if prefix not in blows_up or layer in ("", "all", "total"):
            continue
        for step, value in points:
            # log10 of a zero update is -inf: a frozen layer, not a blown-up one.
            if math.isnan(value) or (math.isinf(value) and not (prefix == "update_ratio" and value < 0)):
                first = min(first or (step, layer_depth(layer), layer), (step, layer_depth(layer), layer))
                break
    at = f" at step {facts.diverged_step}" if facts.diverged_step is not None else ""
    where = f"; the first layer whose statistics became non-finite is {first[2]} (step {first[0]})" if first else ""
    clip = ", trainer.grad_clip=1.0" if facts.grad_clip is None else ""
    return [Finding(
        "diverged", WARNING, first[2] if first else None, facts.diverged_step, None,
        f"The run diverged{at}: the loss or a gradient became NaN/inf{where}.",
        f"Try {_lr_advice(facts, 0.1)}{clip}, or model.batchnorm=true.")]


def edge_of_stability(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """SGD's sharpness reaches 2(1 + momentum)/lr: training at the edge of stability (Cohen et al. 2021)."""
    if facts.optimizer != "sgd":
        return []
    limits = dict(_finite(series.get("sharpness/stability_limit", [])))
    fallback = 2 * (1 + facts.momentum) / facts.lr if facts.lr > 0 else None
    for step, eig in _finite(series.get("sharpness/top_eigenvalue", [])):
        limit = limits.get(step, fallback)
        if limit and eig >= cfg.edge_of_stability * limit:
            return [Finding(
                "edge_of_stability", INFO, None, step, eig / limit,
                f"At step {step} the sharpness (top Hessian eigenvalue) {eig:.3g} reached {eig / limit:.0%} of "
                f"the stability limit 2(1 + momentum)/lr = {limit:.3g}.",
                f"Expected with SGD at this learning rate: sharpness rises to the limit and hovers there, and the "
                f"loss falls non-monotonically (Cohen et al. 2021). A smaller lr ({_lr_advice(facts, 0.5)}) raises the limit.")]
    return []


RULES: tuple[Callable[[Series, RunFacts, FindingsConfig], list[Finding]], ...] = (
    dead_at_init, dying_units, saturation, vanishing_gradients, exploding_gradients,
    activation_scale, update_ratio, not_learning, diverged, edge_of_stability,
)


def diagnose(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """Every rule's findings: warnings first, then by step (findings without a step last)."""
    if not cfg.enabled:
        return []
    found = [finding for rule in RULES for finding in rule(series, facts, cfg)]
    return sorted(found, key=lambda f: (f.severity != WARNING, f.step is None, f.step or 0))

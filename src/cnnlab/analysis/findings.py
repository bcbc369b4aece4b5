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
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from cnnlab.activations import ACTIVATIONS, INIT_SOURCES
from cnnlab.analysis.remedies import ADAPTIVE, DOWN, UP, candidate_remedies, init_for, lr_times
from cnnlab.config import FindingsConfig
from cnnlab.statistics import layer_depth, prefixes, split_tag
from cnnlab.status import Status

WARNING, INFO = "warning", "info"

# TensorBoard scalar tag -> [(step, value)], steps increasing.
Series = dict[str, list[tuple[int, float]]]

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
    advice: str  # "" when there is nothing to change
    remedies: list[dict[str, Any]] = field(default_factory=list)  # override maps to try (remedies.py)

    def __post_init__(self) -> None:
        self.advice = self.advice.strip()  # a sentence whose options were all left out ends in a space

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
    # Units of each activation layer, input side first (MLP: model.hidden; ConvNet: model.channels,
    # then model.fc_hidden); () when the config does not say.
    widths: tuple[int, ...] = ()


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    section = config.get(name)
    return section if isinstance(section, dict) else {}


def _widths(model: dict[str, Any]) -> tuple[int, ...]:
    """The units of the model's activation layers, input side first; () for what is not a list of widths."""
    parts = [model.get("hidden")] if "hidden" in model else [model.get("channels"), [model.get("fc_hidden")]]
    if not all(isinstance(part, (list, tuple)) for part in parts):
        return ()
    widths = [width for part in parts for width in part]
    return tuple(widths) if all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths) else ()


def run_facts(config: dict[str, Any], *, num_classes: int, steps_per_epoch: int, metrics: dict[str, Any]) -> RunFacts:
    """What the findings need to know about a run besides its series: from its config as plain
    containers (.hydra/config.yaml, or config.as_dict(run)) and its metrics.json. Lenient with an
    older or partial config: what it lacks is taken as the defaults (init `default`, no BatchNorm,
    no momentum, no clipping, widths unknown)."""
    model, optimizer = _section(config, "model"), _section(config, "optimizer")
    return RunFacts(
        num_classes=num_classes, steps_per_epoch=steps_per_epoch,
        activation=str(_section(config, "activation").get("name", "")), init=str(model.get("init", "default")),
        batchnorm=bool(model.get("batchnorm", False)), optimizer=str(optimizer.get("name", "")),
        lr=float(optimizer.get("lr", 0.0)), momentum=float(optimizer.get("momentum", 0.0) or 0.0),
        grad_clip=_section(config, "trainer").get("grad_clip"), status=str(metrics.get("status", "unknown")),
        diverged_step=metrics.get("diverged_step"), widths=_widths(model))


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
    """`optimizer.lr=X`, X = lr x factor within the optimizer's LR_RANGES (remedies.lr_times); "" when
    there is no room in that direction."""
    lr = lr_times(facts, factor)
    return "" if lr is None else f"optimizer.lr={lr:.3g}"


def _options(*options: str) -> str:
    """`a, b, or c` of the options given; empty ones are left out."""
    given = [option for option in options if option]
    return given[0] if len(given) == 1 else ", ".join(given[:-1]) + (f", or {given[-1]}" if given else "")


def _try(*options: str) -> str:
    """`Try a, b, or c.`; "" when no option is given."""
    text = _options(*options)
    return f"Try {text}." if text else ""


def _init_advice(facts: RunFacts) -> str:
    """Which model.init fits the activation, and BatchNorm, as one sentence."""
    init = init_for(facts.activation)
    tips = []
    if init and facts.init != init:
        tips.append(f"model.init={init} (the scheme made for {facts.activation}, {INIT_SOURCES[init]})")
    if not facts.batchnorm:
        tips.append("model.batchnorm=true")
    return "Try " + " and/or ".join(tips) + "." if tips else "Try a shallower or wider model."


# --- what the series say about the learning rate -------------------------------------------------------
# probes.update_ratio floors log10(0) at -20: at or below this, the weights did not change at all.
NO_UPDATE = -19.0
LAST_PROBES = 3  # the last probes (or loss logs) whose median says where a series ended


def _dead_rise(series: Series, layer: str) -> tuple[tuple[int, float], tuple[int, float], str] | None:
    """The first and the last (step, dead fraction) of a layer and what they were measured on: the
    training images (step 0 and epoch ends) when there are two such, else the probe batch (a run that
    ended within its first epoch, as a diverging one may), which reads higher; None without two."""
    for prefix, measured_on in (("dead_fraction", "on the training images"), ("dead_on_batch", "on the probe batch")):
        points = _finite(series.get(f"{prefix}/{layer}", []))
        if len(points) >= 2:
            return points[0], points[-1], measured_on
    return None


def _dying_layers(series: Series, cfg: FindingsConfig) -> list[str]:
    """The layers whose dead fraction rose at least findings.dying_info."""
    rises = [(layer, _dead_rise(series, layer)) for layer in _layers(series, "dead_fraction")]
    return [layer for layer, rise in rises if rise and rise[1][1] - rise[0][1] >= cfg.dying_info]


def _dead_at_step0(series: Series, cfg: FindingsConfig) -> list[str]:
    """The layers at least findings.dead_at_init dead at step 0."""
    return [layer for layer in _layers(series, "dead_fraction")
            if (_at_step0(series, f"dead_fraction/{layer}") or 0.0) >= cfg.dead_at_init]


def _loss_unstable(series: Series, cfg: FindingsConfig) -> str:
    """How the training loss shows a too-large step, in words; "" when it does not: in the second half
    of its logs it went back above its first value, or the median of its last third is above that of
    an earlier third, each by more than findings.loss_rise (relative)."""
    points = _finite(series.get("train/loss", []))
    if len(points) < 6:
        return ""
    start, third = points[0][1], len(points) // 3
    peak_step, peak = max(points[len(points) // 2:], key=lambda point: point[1])
    if peak > (1 + cfg.loss_rise) * start:
        return f"the training loss went back up to {peak:.3g} at step {peak_step}, above its start {start:.3g}"
    thirds = [statistics.median(v for _, v in part) for part in (points[:third], points[third:-third], points[-third:])]
    if thirds[2] > (1 + cfg.loss_rise) * min(thirds[:2]):
        return f"the training loss rose from {min(thirds[:2]):.3g} to {thirds[2]:.3g} (medians of thirds of the run)"
    return ""


def _update_medians(series: Series) -> list[tuple[str, float, float, int]]:
    """(layer, median log10 update ratio over the second half of the run, its first step, last step)
    of the layers that have two points there and move at all: a layer that does not move gets no
    gradient, which the dead-unit and gradient findings explain; no lr would."""
    found = []
    for layer in _layers(series, "update_ratio"):
        points = _finite(series[f"update_ratio/{layer}"])
        if not points:
            continue
        middle = (points[0][0] + points[-1][0]) / 2
        late = [v for s, v in points if s >= middle]
        if len(late) >= 2 and statistics.median(late) > NO_UPDATE:
            found.append((layer, statistics.median(late), middle, points[-1][0]))
    return found


def _update_ratio_low(facts: RunFacts, cfg: FindingsConfig) -> float:
    """Below this log10 update ratio the lr is too low: Adam and its kin step about lr per weight, so
    their ratio follows the lr alone and has a threshold of its own."""
    return cfg.update_ratio_low_adaptive if facts.optimizer in ADAPTIVE else cfg.update_ratio_low


def _too_large_lr(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[str]:
    """What says that the lr is too large, in words: the run diverged, units died during training,
    the loss is unstable, a layer's update ratio is above findings.update_ratio_high. [] when nothing does."""
    signs = ["the run diverged"] if facts.status == Status.DIVERGED else []
    dying = _dying_layers(series, cfg)
    if dying:
        signs.append(f"units died during training in {', '.join(dying)}")
    signs.append(_loss_unstable(series, cfg))
    high = [layer for layer, median, _, _ in _update_medians(series) if median > cfg.update_ratio_high]
    if high:
        signs.append(f"the update ratio of {', '.join(high)} is above 10^{cfg.update_ratio_high:g}")
    return [sign for sign in signs if sign]


def _lr_directions(series: Series, facts: RunFacts, cfg: FindingsConfig) -> tuple[float, ...]:
    """Which way the lr may be moved: DOWN only when something says it is too large; neither when
    layers are dead from step 0 (no lr revives them); UP only when updates are too small; else both."""
    if _too_large_lr(series, facts, cfg):
        return (DOWN,)
    if _dead_at_step0(series, cfg):
        return ()
    low = _update_ratio_low(facts, cfg)
    return (UP,) if any(median < low for _, median, _, _ in _update_medians(series)) else (UP, DOWN)


def _learning_well(series: Series, facts: RunFacts, cfg: FindingsConfig) -> float | None:
    """The training loss (median of its last logs) when the run learns well: below findings.learning_well
    x ln(classes), the loss of uniform guessing, steady and not diverged; None otherwise."""
    points = _finite(series.get("train/loss", []))[-LAST_PROBES:]
    if not points or facts.num_classes < 2 or facts.status == Status.DIVERGED or _loss_unstable(series, cfg):
        return None
    loss = statistics.median(v for _, v in points)
    return loss if loss <= cfg.learning_well * math.log(facts.num_classes) else None


# --- the rules ---------------------------------------------------------------------------------------
def dead_at_init(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """A layer mostly dead before any update: no gradient reaches its units (Lu et al. 2019)."""
    found = []
    for layer in _dead_at_step0(series, cfg):
        dead = _at_step0(series, f"dead_fraction/{layer}")
        fix = "activation=leaky_relu, " if facts.activation == "relu" else ""
        found.append(Finding(
            "dead_at_init", WARNING, layer, 0, dead,
            f"{layer}: {dead:.0%} of its units are dead at initialisation (step 0): no gradient flows through them.",
            f"Deep narrow nets die at initialisation (Lu et al. 2019). Try {fix}model.init={init_for(facts.activation) or 'kaiming'}, "
            f"model.batchnorm=true, or a wider/shallower model."))
    return found


def dying_units(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """Units that die during training, typically ReLUs pushed negative by large updates (Lu et al. 2019).
    In a run that learns well, a rise below findings.dying_warning is a note with no advice: nothing
    that works should be changed for it."""
    found = []
    learning_well = _learning_well(series, facts, cfg)
    for layer in _dying_layers(series, cfg):
        (first_step, first), (last_step, last), measured_on = _dead_rise(series, layer)
        severity = WARNING if last - first >= cfg.dying_warning else INFO
        message = (f"{layer}: the dead fraction {measured_on} rose from {first:.0%} "
                   f"(step {first_step}) to {last:.0%} (step {last_step}).")
        if severity == INFO and learning_well is not None:
            found.append(Finding(
                "dying_units", INFO, layer, last_step, last,
                f"{message} The run learns well (training loss {learning_well:.3g}, against "
                f"{math.log(facts.num_classes):.3g} for guessing): nothing to change for it.", ""))
            continue
        fix = "activation=leaky_relu" if facts.activation == "relu" else ""
        found.append(Finding(
            "dying_units", severity, layer, last_step, last, message,
            "Units die when large updates push their inputs where the activation is flat (Lu et al. 2019). "
            + _try(_lr_advice(facts, DOWN), fix, "" if facts.batchnorm else "model.batchnorm=true")))
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
                f"Or {_options(_lr_advice(facts, DOWN), 'a ReLU-family activation (activation=leaky_relu)')}."))
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


def gradient_growth(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """At the start of training the gradient grows towards the input: the first weight layer's gradient
    norm over the last hidden layer's, at the first probe with gradients, is above findings.gradient_growth.
    Deep BatchNorm nets do this at initialisation (Yang et al. 2019)."""
    hidden = [name for name in _layers(series, "grad_norm") if not name.endswith("classifier")]
    if len(hidden) < 2:
        return []
    first, top = hidden[0], hidden[-1]
    firsts, tops = _finite(series[f"grad_norm/{first}"]), dict(_finite(series[f"grad_norm/{top}"]))
    if not firsts or not tops.get(firsts[0][0], 0) > 0 or firsts[0][0] > facts.steps_per_epoch:
        return []
    step, norm = firsts[0]
    ratio = norm / tops[step]
    if ratio <= cfg.gradient_growth:
        return []
    cause = ("Deep BatchNorm nets make gradients explode towards the input at initialisation, by a factor "
             "per layer (Yang et al. 2019, 'A Mean Field Theory of Batch Normalization')" if facts.batchnorm else
             "The initialisation amplifies the gradient on its way down (He et al. 2015; Pascanu et al. 2013)")
    init = init_for(facts.activation)
    return [Finding(
        "gradient_growth", WARNING, first, step, ratio,
        f"{first}: at step {step}, the first probe with gradients, its gradient norm {norm:.3g} is {ratio:.3g}x "
        f"that of {top} {tops[step]:.3g}: the gradient grows towards the input.",
        f"{cause}. " + _try("a shallower model", "" if facts.grad_clip is not None else "trainer.grad_clip=1.0",
                            f"model.init={init}" if init and init != facts.init else "",
                            "model.batchnorm=false (or fewer BatchNorm layers)" if facts.batchnorm else "",
                            _lr_advice(facts, DOWN)))]


def exploding_gradients(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """A jump of the global gradient norm over its running median, or clipping on most steps (Pascanu et al. 2013)."""
    points = _finite(series.get("grad_norm/total", []))
    found = []
    earlier: list[float] = []
    for step, value in points:
        if len(earlier) >= MIN_HISTORY:
            median = statistics.median(earlier)
            if median > 0 and value >= cfg.exploding_factor * median:
                found.append(Finding(
                    "exploding_gradients", WARNING, None, step, value,
                    f"The global gradient norm jumped to {value:.3g} at step {step}, {value / median:.0f}x its "
                    f"running median {median:.3g}.",
                    "Exploding gradients (Pascanu et al. 2013). " + _try(
                        _lr_advice(facts, DOWN), "" if facts.grad_clip is not None else "trainer.grad_clip=1.0",
                        "" if facts.batchnorm else "model.batchnorm=true")))
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
                "Clipping on most steps does the learning rate's job (Pascanu et al. 2013). "
                + _try(_lr_advice(facts, DOWN), f"trainer.grad_clip={median * 2:.3g} so that it only catches spikes")))
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


def rank_collapse(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """The last hidden layer's output spans a few directions: its effective rank is below
    findings.rank_collapse of its width, and below half of classes - 1, the rank a well-trained last layer
    keeps when its features collapse onto the class means (neural collapse, Papyan et al. 2020; the
    entropy-based rank reads 8-10 there for 10 classes). Deep nets without normalisation lose rank with
    depth (Daneshmand et al. 2020). Quiet in a run that learns well, and where dead units explain it
    (dead_at_init, dying_units report them)."""
    layers = _layers(series, "effective_rank")
    if not layers or len(layers) != len(facts.widths) or facts.num_classes < 2:
        return []
    deep, width = layers[-1], facts.widths[-1]
    late = _finite(series[f"effective_rank/{deep}"])[-LAST_PROBES:]
    if not late or deep in _dying_layers(series, cfg) + _dead_at_step0(series, cfg):
        return []
    rank = statistics.median(v for _, v in late)
    if rank >= min(cfg.rank_collapse * width, (facts.num_classes - 1) / 2) or _learning_well(series, facts, cfg):
        return []
    start = _at_step0(series, f"effective_rank/{deep}")
    since = f", from {start:.3g} at step 0" if start is not None and late[-1][0] > 0 else ""
    bounded = facts.activation in ACTIVATIONS and ACTIVATIONS[facts.activation].bounds is not None
    return [Finding(
        "rank_collapse", WARNING, deep, late[-1][0], rank,
        f"{deep}, the last hidden layer: its output has an effective rank of {rank:.3g} for {width} units "
        f"(median of the last {len(late)} probes, to step {late[-1][0]}{since}), below "
        f"{cfg.rank_collapse:g} of its width and below (classes - 1)/2 = {(facts.num_classes - 1) / 2:g}: the classifier "
        f"sees the images in a few directions only.",
        "Without normalisation, deep nets lose the rank of their representations (rank collapse, Daneshmand "
        "et al. 2020). " + _try("" if facts.batchnorm else "model.batchnorm=true",
                                "activation=relu with model.init=kaiming (He et al. 2015)" if bounded else "",
                                "a shallower model"))]


def update_ratio(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """A layer's update/weight ratio far from ~1e-3 over the second half of the run (Karpathy, CS231n);
    the threshold for too small a step depends on the optimizer (_update_ratio_low). A higher lr is
    never advised while something says the lr is too large, or layers are dead."""
    found = []
    low, medians = _update_ratio_low(facts, cfg), _update_medians(series)
    # what else explains small steps: read once, and only when a layer has them; small steps in a run
    # that learns well (a BatchNorm net's scale-free layers, say) need no change
    small = any(median < low for _, median, _, _ in medians) and _learning_well(series, facts, cfg) is None
    excuses = (_too_large_lr(series, facts, cfg), _dead_at_step0(series, cfg)) if small else ([], [])
    for layer, median, middle, last in medians:
        span = f"(median over the second half, steps {math.ceil(middle)}-{last}; about 10^-3 is healthy)"
        if median > cfg.update_ratio_high:
            found.append(Finding(
                "update_ratio", WARNING, layer, last, median,
                f"{layer}: each step changes its weights by 10^{median:.1f} of their norm {span}.",
                "The learning rate is too high for this layer (Karpathy, CS231n). "
                + _try(_lr_advice(facts, DOWN) or ("" if facts.grad_clip is not None else "trainer.grad_clip=1.0"))))
        elif median < low and small:
            found.append(_too_small_update(facts, layer, (median, low, last, span), *excuses))
    return found


def _too_small_update(facts: RunFacts, layer: str, judged: tuple[float, float, int, str],
                      signs: list[str], dead: list[str]) -> Finding:
    """The finding for a layer whose updates are below `low`: a too-low lr, unless signs of a too-large
    lr (_too_large_lr) or layers dead from step 0 explain them, and then the advice never raises the lr."""
    median, low, last, span = judged
    kin = (f": too small for {facts.optimizer}, whose step is about lr per weight, below 10^{low:g}"
           if facts.optimizer in ADAPTIVE else "")
    message = f"{layer}: each step changes its weights by only 10^{median:.1f} of their norm {span}{kin}"
    if not signs and not dead:
        top = f"The lr ({facts.lr:g}) is at the top of {facts.optimizer}'s usual range already: look at the init."
        return Finding("update_ratio", WARNING, layer, last, median, message + ".",
                       "The learning rate is too low for this layer (Karpathy, CS231n). "
                       + (_try(_lr_advice(facts, UP)) or f"{top} {_init_advice(facts)}"))
    why = "; ".join(signs + ([f"{', '.join(dead)} dead from step 0"] if dead else []))
    fix = "activation=leaky_relu" if facts.activation == "relu" else ""
    return Finding(
        "update_ratio", WARNING, layer, last, median, f"{message}, while {why}.",
        "The steps are small because dead units pass no gradient, not because the lr is small: a higher lr "
        "would make it worse (Lu et al. 2019). "
        + _try(_lr_advice(facts, DOWN) if signs else "", fix, "" if facts.batchnorm else "model.batchnorm=true"))


def not_learning(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """After an epoch the loss still equals that of uniform guessing, ln(classes) (Karpathy 2019). The lr
    is advised only in the directions the other signs allow (_lr_directions)."""
    if facts.num_classes < 2:
        return []
    late = [(s, v) for s, v in _finite(series.get("train/loss", [])) if s >= facts.steps_per_epoch][-3:]
    if not late:
        return []
    chance = math.log(facts.num_classes)
    loss = statistics.median(v for _, v in late)
    if abs(loss - chance) > cfg.not_learning * chance:
        return []
    lrs = _options(*(_lr_advice(facts, factor) for factor in _lr_directions(series, facts, cfg)))
    return [Finding(
        "not_learning", WARNING, None, late[-1][0], loss,
        f"At step {late[-1][0]}, after the first epoch, the training loss {loss:.3f} is still that of uniform "
        f"guessing, ln({facts.num_classes}) = {chance:.3f}.",
        "The network has learned nothing (Karpathy 2019, 'A Recipe for Training Neural Networks'). "
        + (f"Try {lrs}; look" if lrs else "Look") + f" for dead or saturated layers above. {_init_advice(facts)}")]


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
    return [Finding(
        "diverged", WARNING, first[2] if first else None, facts.diverged_step, None,
        f"The run diverged{at}: the loss or a gradient became NaN/inf{where}.",
        _try(_lr_advice(facts, DOWN), "" if facts.grad_clip is not None else "trainer.grad_clip=1.0",
             "" if facts.batchnorm else "model.batchnorm=true"))]


# The pairs the edge of stability compares, each logged at every sharpness probe: the sharpness and
# SGD's limit on it; an adaptive optimizer's preconditioned sharpness and its limit (Cohen et al. 2022).
EDGE_PAIRS = (("sharpness/top_eigenvalue", "sharpness/stability_limit"),
              ("sharpness/preconditioned_eigenvalue", "sharpness/preconditioned_limit"))
# Logged only since the sharpness is that of the training loss (curvature set, Lanczos): earlier runs
# logged the probe batch's top eigenvalue, 9-42% above the training loss's, and 2(1 + beta)/lr for Nesterov too.
TRAINING_LOSS_SHARPNESS = "sharpness/min_eigenvalue"
LIMIT_FORMULAS = {"sgd": "2/lr plain, 2(1 + beta)/lr heavy ball, (2 + 2 beta)/((1 + 2 beta) lr) Nesterov",
                  "adam": "(2 + 2 beta1)/((1 - beta1) lr)", "adamw": "(2 + 2 beta1)/((1 - beta1) lr)",
                  "rmsprop": "2(1 + momentum)/lr"}


def edge_of_stability(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """The sharpness reaches the optimizer's stability limit: training at the edge of stability (Cohen et
    al. 2021; for Adam and RMSprop the preconditioned sharpness, Cohen et al. 2022). Quiet without a
    logged limit, and for runs from before the sharpness was that of the training loss."""
    if TRAINING_LOSS_SHARPNESS not in series:
        return []
    for eigenvalue_tag, limit_tag in EDGE_PAIRS:
        limits = dict(_finite(series.get(limit_tag, [])))
        for step, eig in _finite(series.get(eigenvalue_tag, [])):
            limit = limits.get(step)
            if limit and limit > 0 and eig >= cfg.edge_of_stability * limit:
                return [_edge_finding(step, eig, limit, eigenvalue_tag == EDGE_PAIRS[1][0], facts)]
    return []


def _edge_finding(step: int, eig: float, limit: float, preconditioned: bool, facts: RunFacts) -> Finding:
    what = ("the preconditioned sharpness (top eigenvalue of P^-1 H, P the optimizer's preconditioner)" if preconditioned
            else "the sharpness (top eigenvalue of the training loss's Hessian)")
    formula = LIMIT_FORMULAS.get(facts.optimizer, "the optimizer's")
    source = "Cohen et al. 2022" if preconditioned else "Cohen et al. 2021"
    return Finding(
        "edge_of_stability", INFO, None, step, eig / limit,
        f"At step {step} {what} {eig:.3g} reached {eig / limit:.0%} of the stability limit {limit:.3g} ({formula}).",
        f"Expected at this learning rate: the sharpness rises to the limit and hovers there while the loss falls "
        f"non-monotonically ({source}). A smaller lr ({_lr_advice(facts, 0.5)}) raises the limit.")


RULES: tuple[Callable[[Series, RunFacts, FindingsConfig], list[Finding]], ...] = (
    dead_at_init, dying_units, saturation, vanishing_gradients, gradient_growth, exploding_gradients,
    activation_scale, rank_collapse, update_ratio, not_learning, diverged, edge_of_stability,
)


def diagnose(series: Series, facts: RunFacts, cfg: FindingsConfig) -> list[Finding]:
    """Every rule's findings: warnings first, then by step (findings without a step last)."""
    if not cfg.enabled:
        return []
    found = [finding for rule in RULES for finding in rule(series, facts, cfg)]
    directions = _lr_directions(series, facts, cfg) if found else ()
    for finding in found:
        finding.remedies = candidate_remedies(finding, facts, directions)
    return sorted(found, key=lambda f: (f.severity != WARNING, f.step is None, f.step or 0))

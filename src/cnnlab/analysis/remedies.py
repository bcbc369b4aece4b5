"""The candidate remedies of a finding: settings to change, as override maps (`{"model.batchnorm": True}`),
that `cnnlab remedy` runs as a controlled experiment. Each kind of finding proposes the fixes its own
rule's source gives (the table REMEDIES; README: Remedies). No torch here.

The learning rate moves only in the directions the run's series allow (findings._lr_directions: never
up while something says it is too large) and stays within the optimizer's usual range (LR_RANGES)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cnnlab.activations import ACTIVATIONS
from cnnlab.analysis.runs import setting_text

if TYPE_CHECKING:
    from cnnlab.analysis.findings import Finding, RunFacts

Remedy = dict[str, Any]  # setting -> value; `activation` is a config group, the rest are settings

# The learning rates a suggestion stays within, per optimizer (config.SCHEMAS' names): "try lr=X"
# never leaves them, so the findings never offer an absurd lr (SGD at 5, Adam at 1e-7). SGD: Bengio
# 2012 ("Practical recommendations for gradient-based training") puts useful rates below 1 and finds
# 0.01 a good default; Adam and RMSprop move each weight by about lr per step (Kingma & Ba 2015,
# default 1e-3), so their useful range is narrower and lower.
LR_RANGES = {"sgd": (1e-4, 1.0), "adam": (1e-5, 1e-2), "adamw": (1e-5, 1e-2), "rmsprop": (1e-5, 1e-2)}
# Optimizers whose step is about lr per weight whatever the gradient's size (a normalised update).
ADAPTIVE = ("adam", "adamw", "rmsprop")
UP, DOWN = 10.0, 0.1  # the factors a finding suggests for the learning rate
GRAD_CLIP = 1.0  # the clipping norm a remedy tries (Pascanu et al. 2013 clip at a few times the usual norm)


def lr_times(facts: RunFacts, factor: float) -> float | None:
    """lr x factor kept within the optimizer's LR_RANGES, to 3 significant digits; None when the range
    leaves no room in that direction (at least a factor of 2), or the lr is unknown."""
    if not facts.lr > 0 or factor == 1:
        return None
    low, high = LR_RANGES.get(facts.optimizer, (0.0, math.inf))
    lr = float(f"{min(max(facts.lr * factor, low), high):.3g}")
    if math.log(lr / facts.lr) * math.log(factor) <= 0 or abs(math.log(lr / facts.lr)) < math.log(2) - 1e-9:
        return None
    return lr


def init_for(activation: str) -> str | None:
    """The model.init that keeps the activation's output variance steady with depth (its row says)."""
    return ACTIVATIONS[activation].init if activation in ACTIVATIONS else None


# --- the remedies, each a function (facts, lr directions) -> an override map, or None where it changes nothing
Maker = Callable[["RunFacts", tuple[float, ...]], Remedy | None]


def batchnorm(facts: RunFacts, directions: tuple[float, ...]) -> Remedy | None:
    """BatchNorm keeps each layer's input normalised (Ioffe & Szegedy 2015)."""
    return None if facts.batchnorm else {"model.batchnorm": True}


def without_batchnorm(facts: RunFacts, directions: tuple[float, ...]) -> Remedy | None:
    """Deep BatchNorm nets make the gradient explode towards the input at initialisation (Yang et al. 2019)."""
    return {"model.batchnorm": False} if facts.batchnorm else None


def matching_init(facts: RunFacts, directions: tuple[float, ...]) -> Remedy | None:
    """The initialisation made for the activation (Glorot & Bengio 2010, He et al. 2015, Klambauer et al. 2017)."""
    init = init_for(facts.activation)
    return {"model.init": init} if init and init != facts.init else None


def relu_with_kaiming(facts: RunFacts, directions: tuple[float, ...]) -> Remedy | None:
    """A bounded activation (sigmoid, tanh) replaced by ReLU with its init (Glorot et al. 2011; He et al. 2015)."""
    bounded = facts.activation in ACTIVATIONS and ACTIVATIONS[facts.activation].bounds is not None
    return {"activation": "relu", "model.init": "kaiming"} if bounded else None


def leaky_relu(facts: RunFacts, directions: tuple[float, ...]) -> Remedy | None:
    """A ReLU whose units die replaced by Leaky ReLU, which keeps a gradient below 0 (Maas et al. 2013)."""
    return {"activation": "leaky_relu"} if facts.activation == "relu" else None


def gradient_clipping(facts: RunFacts, directions: tuple[float, ...]) -> Remedy | None:
    """Clipping the gradient's norm bounds a step (Pascanu et al. 2013)."""
    return {"trainer.grad_clip": GRAD_CLIP} if facts.grad_clip is None else None


def lr_by(factor: float) -> Maker:
    """The learning rate x factor, where the run's series allow that direction."""
    def remedy(facts: RunFacts, directions: tuple[float, ...]) -> Remedy | None:
        allowed = any((direction < 1) == (factor < 1) for direction in directions)
        lr = lr_times(facts, factor) if allowed else None
        return {"optimizer.lr": lr} if lr is not None else None

    return remedy


# What each kind of finding proposes, most direct first (README: Remedies, with the sources).
REMEDIES: dict[str, tuple[Maker, ...]] = {
    "dead_at_init": (leaky_relu, matching_init, batchnorm),
    "dying_units": (lr_by(1 / 3), lr_by(DOWN), leaky_relu, batchnorm),
    "saturation": (matching_init, batchnorm, relu_with_kaiming, lr_by(DOWN)),
    "vanishing_gradients": (batchnorm, matching_init, relu_with_kaiming),
    "gradient_growth": (gradient_clipping, matching_init, without_batchnorm, lr_by(DOWN)),
    "exploding_gradients": (lr_by(DOWN), gradient_clipping, batchnorm),
    "activation_scale": (matching_init, batchnorm),
    "rank_collapse": (batchnorm, relu_with_kaiming),
    "update_ratio": (lr_by(UP), lr_by(DOWN), leaky_relu, batchnorm),
    "not_learning": (lr_by(UP), lr_by(DOWN), batchnorm, matching_init),
    "diverged": (lr_by(DOWN), gradient_clipping, batchnorm),
    "edge_of_stability": (lr_by(0.5),),
}


def candidate_remedies(finding: Finding, facts: RunFacts, directions: tuple[float, ...]) -> list[Remedy]:
    """The finding's remedies that change something in this run, in REMEDIES' order; none for a
    finding that advises nothing (a note on a run that works)."""
    if not finding.advice:
        return []
    made = (make(facts, directions) for make in REMEDIES.get(finding.kind, ()))
    return [remedy for remedy in made if remedy]


def remedy_name(remedy: Remedy) -> str:
    """`batchnorm-true`, `activation-relu+init-kaiming`: the last part of each setting and its value,
    in characters a folder name and Hydra's override grammar both take."""
    return "+".join(f"{key.rpartition('.')[2]}-{setting_text(value)}" for key, value in remedy.items())

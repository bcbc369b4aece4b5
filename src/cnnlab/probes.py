"""Per-layer statistics of a network in training.

The statistics are pure functions from tensors to tensors, computed on the device so that a probe
costs one transfer to the host. `Probes` runs them: on a fixed probe batch through forward hooks
that live only inside a `with` block, and on the gradients and weights of each weight layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from cnnlab.config import ProbesConfig
from cnnlab.models import ACTIVATION_MODULES, BOUNDS_BY_MODULE

# An output within this distance of an asymptote counts as saturated: there the derivative of
# sigmoid is below 0.0099 (4% of its peak) and that of tanh below 0.02 (2% of its peak).
SATURATION_MARGIN = 0.01
# histc counts in float32, which stops counting one by one past 2**24: histogram larger tensors in chunks.
HISTC_CHUNK = 2**24


# --- statistics: tensors in, tensors out, no host synchronisation ---------------------------------
def unit_dims(x: Tensor) -> tuple[int, ...]:
    """Every dimension but the unit one: neurons of [N, F], channels of [N, C, H, W]."""
    return (0, *range(2, x.dim()))


def dead_units(pre_activation: Tensor) -> Tensor:
    """Per unit: True where the pre-activation is never positive, for any example and position."""
    return pre_activation.amax(dim=unit_dims(pre_activation)) <= 0


def saturation_fraction(output: Tensor, low: float, high: float, margin: float = SATURATION_MARGIN) -> Tensor:
    """Share of outputs within `margin` of either asymptote of a bounded activation."""
    return ((output <= low + margin) | (output >= high - margin)).float().mean()


def histogram(x: Tensor, bins: int) -> Tensor:
    """[min, max, sum, sum of squares, count of bucket 1..bins], float64, buckets spread evenly over
    [min, max]: every element is counted once, and the range needs no trip to the host."""
    x = x.detach().flatten().float()
    low, high = torch.aminmax(x)  # one pass for both
    scaled = torch.sub(x, low).div_((high - low).clamp_min(torch.finfo(torch.float32).tiny))  # in [0, 1]
    counts = torch.zeros(bins, dtype=torch.float64, device=x.device)
    with _histc_allowed(x.device):
        for chunk in scaled.split(HISTC_CHUNK):
            counts += torch.histc(chunk, bins=bins, min=0.0, max=1.0).double()
    squares = torch.linalg.vector_norm(x).square()  # no temporary the size of x
    moments = torch.stack([low, high, x.sum(), squares]).double()
    return torch.cat([moments, counts])


@contextmanager
def _histc_allowed(device: torch.device) -> Iterator[None]:
    # On CUDA, histc adds 1.0 per element with float atomics and torch flags it as nondeterministic.
    # Sums of whole numbers below 2**24 are exact in any order, so its counts are deterministic.
    enabled = torch.are_deterministic_algorithms_enabled()
    if not (enabled and device.type == "cuda"):
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)


def update_ratio(before: Tensor, after: Tensor) -> Tensor:
    """log10(|after - before| / |before|): the size of one step relative to the weights."""
    ratio = (after - before).norm() / before.norm().clamp_min(1e-30)
    return torch.log10(ratio.clamp_min(1e-20))


def gradient_norm(parameters: list[nn.Parameter]) -> Tensor:
    """Global L2 norm of the gradients of `parameters` (zero when none has a gradient)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=parameters[0].device)


# --- naming: depth order, and what each layer is ---------------------------------------------------
@dataclass
class Layer:
    name: str  # e.g. act01_conv, layer03_fc: sorts in depth order in TensorBoard
    module: nn.Module


def activation_layers(model: nn.Module) -> list[Layer]:
    """Activation modules in forward order, named by the kind of layer that feeds them."""
    layers, kind = [], "fc"
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            kind = "conv"
        elif isinstance(module, nn.Linear):
            kind = "fc"
        elif isinstance(module, ACTIVATION_MODULES):
            layers.append(Layer(f"act{len(layers) + 1:02d}_{kind}", module))
    return layers


def weight_layers(model: nn.Module) -> list[Layer]:
    modules = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    kinds = ["conv" if isinstance(m, nn.Conv2d) else "fc" for m in modules]
    if kinds and kinds[-1] == "fc":
        kinds[-1] = "classifier"
    return [Layer(f"layer{i:02d}_{kind}", m) for i, (m, kind) in enumerate(zip(modules, kinds), 1)]


# --- one probe: what is measured, as (kind, tag, device tensor) -----------------------------------
@dataclass
class Measurement:
    kind: str  # "scalar" or "histogram" (see `histogram` for its layout)
    tag: str
    value: Tensor


@contextmanager
def forward_hooks(modules: list[nn.Module], hook) -> Iterator[None]:
    """Forward hooks that are removed when the block ends, whatever happens inside it."""
    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def side_effect_free(model: nn.Module, mode: str, device: torch.device) -> Iterator[None]:
    """Run the model in `mode` without changing training: the mode, BatchNorm's running statistics
    and the random number generators (dropout, RReLU) are all as they were afterwards."""
    was_training = model.training
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.train(mode == "train")
        try:
            yield
        finally:
            model.train(was_training)
            for buffer, saved in buffers:
                buffer.copy_(saved)


class Probes:
    """Everything probed about one model: activations on a fixed batch, gradients, weights, updates."""

    def __init__(self, model: nn.Module, probe_images: Tensor, cfg: ProbesConfig, last_step: int):
        self.model, self.images, self.cfg, self.last_step = model, probe_images, cfg, last_step
        self.activations = activation_layers(model)
        self.weights = weight_layers(model)
        self._pending: list[Measurement] = []
        self._weights_before: list[Tensor] = []

    def due(self, step: int) -> bool:
        """Probe before any update (step 0), every probes.every steps, and after the last step, so
        that a run always starts and ends with one."""
        return step % self.cfg.every == 0 or step == self.last_step

    def before_update(self) -> None:
        """Between backward and the optimizer step: gradient norms (before any clipping), and a copy
        of the weights to measure the step by."""
        for layer in self.weights:
            norm = gradient_norm(list(layer.module.parameters()))
            self._pending.append(Measurement("scalar", f"grad_norm/{layer.name}", norm))
        self._weights_before = [layer.module.weight.detach().clone() for layer in self.weights]

    def after_update(self) -> None:
        for layer, before in zip(self.weights, self._weights_before):
            ratio = update_ratio(before, layer.module.weight.detach())
            self._pending.append(Measurement("scalar", f"update_ratio/{layer.name}", ratio))
        self._weights_before = []

    def measure(self) -> list[Measurement]:
        """Activation statistics on the probe batch, weight statistics, and whatever before/after
        update recorded since the last call. Device tensors only: nothing waits for the device."""
        found, self._pending = self._pending, []
        names = {id(layer.module): layer.name for layer in self.activations}
        bins, histograms = self.cfg.bins, self.cfg.histograms
        dead_counts: list[Tensor] = []  # per layer; "all" weights the layers by their units
        units: list[int] = []

        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            name, pre = names[id(module)], inputs[0]
            found.append(Measurement("scalar", f"act_mean/{name}", output.mean()))
            found.append(Measurement("scalar", f"act_std/{name}", output.std()))
            dead = dead_units(pre)
            dead_counts.append(dead.sum())
            units.append(dead.numel())
            found.append(Measurement("scalar", f"dead_fraction/{name}", dead.float().mean()))
            bounds = BOUNDS_BY_MODULE.get(type(module))
            if bounds is not None:
                found.append(Measurement("scalar", f"saturation/{name}", saturation_fraction(output, *bounds)))
            if histograms:
                found.append(Measurement("histogram", f"activations/{name}", histogram(output, bins)))
                found.append(Measurement("histogram", f"preactivations/{name}", histogram(pre, bins)))

        device = self.images.device
        with side_effect_free(self.model, self.cfg.mode, device), \
                forward_hooks([layer.module for layer in self.activations], record):
            self.model(self.images)
        if units:
            found.append(Measurement("scalar", "dead_fraction/all", torch.stack(dead_counts).sum() / sum(units)))

        for layer in self.activations:
            if isinstance(layer.module, nn.PReLU):
                slopes = layer.module.weight.detach()
                found.append(Measurement("scalar", f"prelu_slope/{layer.name}", slopes.mean()))
                if histograms and slopes.numel() > 1:
                    found.append(Measurement("histogram", f"prelu_slopes/{layer.name}", histogram(slopes, bins)))
        if histograms:
            for layer in self.weights:
                found.append(Measurement("histogram", f"weights/{layer.name}", histogram(layer.module.weight, bins)))
        return found

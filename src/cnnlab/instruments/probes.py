"""Per-layer statistics of a network in training.

The statistics are pure functions from tensors to tensors, computed on the device so that a probe
costs one transfer to the host. `Probes` runs them: on a fixed probe batch through forward hooks
that live only inside a `with` block, and on the gradients and weights of each weight layer.
"""

from __future__ import annotations

import math

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from cnnlab.activations import ACTIVATIONS, Activation
from cnnlab.config import ProbesConfig
from cnnlab.instruments.density import HISTC_CHUNK, density_column, histc_allowed
from cnnlab.instruments.gradients import gradient_noise_scale, gradient_snr, micro_batch_moments
from cnnlab.instruments.sharpness import CurvatureSet, Preconditioner, hessian_spectrum, preconditioned_top_eigenvalue
from cnnlab.statistics import tag

# An output within this distance of an asymptote counts as saturated: there the derivative of
# sigmoid is below 0.0099 (4% of its peak) and that of tanh below 0.02 (2% of its peak).
SATURATION_MARGIN = 0.01
# A unit is dead when its slope stays below this fraction of its activation's largest slope on every
# example and position: almost no gradient flows back through it. Not for the leaky activations,
# whose slope on the negative side is a setting (see dead_from_maxima), nor for the bounded ones,
# which saturate rather than die (their measure is `saturation`).
DEAD_SLOPE_FRACTION = 0.01
# The activations with a negative-side slope of their own (a setting, learned, or drawn): never dead
# while it is not 0; `negative_fraction` counts their units that are never on the positive side.
LEAKY = (nn.LeakyReLU, nn.PReLU, nn.RReLU)

# The activations' rows by their torch.nn class: what the probes know about a module of the network.
ACTIVATIONS_BY_MODULE: dict[type[nn.Module], Activation] = {getattr(nn, row.module): row
                                                             for row in ACTIVATIONS.values()}


def activation_row(module: nn.Module) -> Activation:
    """The row of cnnlab.activations.ACTIVATIONS that an activation module of the network is."""
    return ACTIVATIONS_BY_MODULE[type(module)]


# --- statistics: tensors in, tensors out, no host synchronisation ---------------------------------
def unit_dims(x: Tensor) -> tuple[int, ...]:
    """Every dimension but the unit one: neurons of [N, F], channels of [N, C, H, W]."""
    return (0, *range(2, x.dim()))


GRAM_CHUNK = 8192  # rows of the [examples, units] matrix per float64 product

# Histograms and density columns count at most this many outputs of a layer: those of the first
# images of the probe batch. A picture of 64 buckets needs no more, and counting costs about 9 ns an
# element on a CPU core: the ConvNet's first layer has 6.4 million outputs on 256 images.
HISTOGRAM_OUTPUTS = 2**20


def leading_images(x: Tensor, outputs: int) -> Tensor:
    """The first images of the batch `x` ([N, ...]) that hold at most `outputs` values, at least one
    image: a view, no copy."""
    per_image = max(x[0].numel(), 1) if len(x) else 1
    return x[:max(1, outputs // per_image)]


def centred_gram(output: Tensor) -> Tensor:
    """The Gram matrix of the centred [examples, units] matrix, on its smaller side (the same nonzero
    singular values, squared); for conv outputs positions count as examples, channels as units."""
    x = output.detach().movedim(1, -1).reshape(-1, output.shape[1])
    mean = x.mean(dim=0, dtype=torch.float64)
    if x.shape[1] > x.shape[0]:
        centred = x.double() - mean
        return centred @ centred.T
    # float64 (singular values are square roots of the Gram's eigenvalues: a float32 Gram would put
    # noise of sqrt(1e-7) on the zero ones), by chunks of rows that stay in the cache: 4x faster than
    # at once on a conv layer's 200,000 positions.
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for part in x.split(GRAM_CHUNK):
        centred = part.double() - mean
        gram.addmm_(centred.T, centred)
    return gram


def rank_of_gram(gram: Tensor) -> Tensor:
    """Effective rank from centred_gram: exp of the Shannon entropy of the normalised singular values
    (Roy & Vetterli 2007); 0 for a layer whose outputs do not vary at all. Probes run it on the host
    after their one transfer: eigvalsh synchronises a CUDA device to check for errors. A Gram matrix
    with inf or NaN (a diverging run) has no rank: NaN, where eigvalsh would raise LinAlgError."""
    finite = torch.isfinite(gram).all()
    singular = torch.linalg.eigvalsh(torch.where(finite, gram, torch.zeros_like(gram))).clamp_min(0).sqrt()
    total = singular.sum()
    p = singular / total.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(torch.float64).tiny))).sum()
    rank = torch.where(total > 0, entropy.exp(), torch.zeros_like(entropy))
    return torch.where(finite, rank, torch.full_like(rank, float("nan")))


def effective_rank(output: Tensor) -> Tensor:
    """The effective rank of a layer's output, [examples, units] or [N, C, H, W]: in units."""
    return rank_of_gram(centred_gram(output))


def saturation_fraction(output: Tensor, low: float, high: float, margin: float = SATURATION_MARGIN) -> Tensor:
    """Share of outputs within `margin` of either asymptote of a bounded activation."""
    return ((output <= low + margin) | (output >= high - margin)).float().mean()


def dies(module: nn.Module) -> bool:
    """Whether dead units are measured for this activation: not for sigmoid and tanh, which saturate
    (their slope is tiny far out, never zero on a bounded output: `saturation` measures that)."""
    return activation_row(module).bounds is None


def leak(module: nn.Module) -> Tensor | float:
    """The slope on the negative side of a leaky activation: a PReLU's learned ones (per channel or
    one), LeakyReLU's setting, the largest of RReLU's range."""
    if isinstance(module, nn.PReLU):
        return module.weight.detach()
    if isinstance(module, nn.RReLU):
        return max(abs(module.lower), abs(module.upper))
    return module.negative_slope


def unit_maxima(pre: Tensor, module: nn.Module) -> Tensor:
    """[2, units]: per unit (dim 1 of `pre`, [N, C] or [N, C, H, W]), its largest |slope| and its
    largest pre-activation over every example and position. Maxima over several batches are the
    elementwise maximum of theirs, so death over a whole set needs no more than this per batch.
    Where the slope rises with the input (ReLU, the ELU family, softplus: Activation.slope_rises) the
    slope is that at the largest input: the same verdict in dead_from_maxima, at the cost of one
    reduction instead of f' of every element (a tenth of the time on a conv layer's outputs)."""
    others = [dim for dim in range(pre.dim()) if dim != 1]
    largest = pre.detach().amax(dim=others)
    row = activation_row(module)
    if isinstance(module, LEAKY):
        slope = torch.zeros_like(largest)
    elif row.slope_rises:
        slope = row.derivative(largest.unsqueeze(0), module).abs().squeeze(0)
    else:
        slope = row.derivative(pre, module).abs().amax(dim=others)
    return torch.stack([slope, largest])


def dead_from_maxima(maxima: Tensor, module: nn.Module) -> Tensor:
    """One bool per unit from unit_maxima. A unit is dead when no gradient can flow through it:
    |f'| < DEAD_SLOPE_FRACTION * max |f'| everywhere; for a leaky activation, whatever its slope,
    only when it is never positive and its negative-side slope is exactly 0."""
    if isinstance(module, LEAKY):
        return (maxima[1] <= 0) & (torch.as_tensor(leak(module), device=maxima.device) == 0)
    return maxima[0] < DEAD_SLOPE_FRACTION * activation_row(module).max_derivative(module)


def negative_from_maxima(maxima: Tensor) -> Tensor:
    """One bool per unit from unit_maxima: never on the positive side (pre-activation <= 0 throughout)."""
    return maxima[1] <= 0


def dead_units(pre: Tensor, module: nn.Module) -> Tensor:
    """One bool per unit of the pre-activations `pre` ([N, C] or [N, C, H, W]): dead on every example
    and position (dead_from_maxima). Stays on the device."""
    return dead_from_maxima(unit_maxima(pre, module), module)


def histogram(x: Tensor, bins: int, chunk: int = HISTC_CHUNK) -> Tensor:
    """[min, max, sum, sum of squares, count of bucket 1..bins], float64, buckets spread evenly over
    [min, max]: every element is counted once (histc counts `chunk` elements at a time), and the
    range needs no trip to the host."""
    x = x.detach().flatten().float()
    low, high = torch.aminmax(x)  # one pass for both
    scaled = torch.sub(x, low).div_((high - low).clamp_min(torch.finfo(torch.float32).tiny))  # in [0, 1]
    counts = torch.zeros(bins, dtype=torch.float64, device=x.device)
    with histc_allowed(x.device):
        for part in scaled.split(chunk):
            counts += torch.histc(part, bins=bins, min=0.0, max=1.0).double()
    squares = torch.linalg.vector_norm(x).square()  # no temporary the size of x
    moments = torch.stack([low, high, x.sum(), squares]).double()
    return torch.cat([moments, counts])


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
        elif isinstance(module, tuple(ACTIVATIONS_BY_MODULE)):
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
    # For a scalar whose last step must run on the host (it would synchronise the device): the
    # function from the transferred value to the number.
    finish: Callable[[Tensor], Tensor] | None = None


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
    with torch.random.fork_rng(devices=devices):
        model.train(mode == "train")
        try:
            yield
        finally:
            model.train(was_training)
            for buffer, saved in buffers:
                buffer.copy_(saved)


@contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """Dropout modules in eval mode (identity) for the block: a dropped unit is not a dead one."""
    dropouts = [(m, m.training) for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for module, _ in dropouts:
        module.train(False)
    try:
        yield
    finally:
        for module, training in dropouts:
            module.train(training)


def undecided_units(maxima: dict[str, Tensor], layers: list[Layer]) -> bool:
    """Whether some unit of `layers` is still dead (or, for a leaky activation, never positive) by the
    unit_maxima so far: whether more images could change what on_data reports."""
    flags = [negative_from_maxima(maxima[layer.name]) if isinstance(layer.module, LEAKY)  # dead ones are too
             else dead_from_maxima(maxima[layer.name], layer.module) for layer in layers]
    return bool(torch.cat(flags).any())


# The most memory the probes' float copies of training images take (the sample, and the curvature set).
PROBE_IMAGES_MB = 512


def examples_needed(cfg: ProbesConfig, image_shape: tuple[int, ...] = (1, 28, 28)) -> int:
    """How many training images Probes wants: the probe batch, the images death is judged on, and the
    images of the gradient noise (each set is the start of the same sample). Large images get fewer
    death and noise images, so that the sample stays within PROBE_IMAGES_MB (at 128 x 128 RGB: 2,730);
    never fewer than the probe batch."""
    wanted = max(cfg.death_examples, cfg.per_example)
    return max(cfg.batch_size, min(wanted, images_within_budget(image_shape)))


def images_within_budget(image_shape: tuple[int, ...]) -> int:
    """How many float32 images of this shape fit in PROBE_IMAGES_MB."""
    return PROBE_IMAGES_MB * 2**20 // (4 * math.prod(image_shape))


class Probes:
    """Everything probed about one model: activations on a fixed batch (dead, revived, saturated
    units, effective rank, density columns), gradient noise, sharpness, gradients, weights and
    updates; and, from `on_data`, dead units over many training images. `measure` and `on_data`
    return device tensors; the caller makes one transfer.

    `examples` is a fixed sample of the training split (examples_needed images, or fewer): the probe
    batch is its first probes.batch_size images, death is judged on its first probes.death_examples,
    gradient noise on its first probes.per_example."""

    def __init__(self, model: nn.Module, examples: tuple[Tensor, Tensor], cfg: ProbesConfig, last_step: int,
                 stability_limit: Callable[[], float] | None = None, preconditioner: Preconditioner | None = None,
                 curvature: CurvatureSet | None = None):
        self.model, self.cfg, self.last_step = model, cfg, last_step
        self.examples = examples
        self.images, self.labels = (part[:cfg.batch_size] for part in examples)
        # The edge of stability: SGD's limit on the sharpness at the current lr (instruments.sharpness.sgd_limit),
        # or an adaptive optimizer's preconditioner and its limit.
        self.stability_limit, self.preconditioner = stability_limit, preconditioner
        # The training images the sharpness is measured on (the trainer draws probes.curvature_examples);
        # without them, the probe batch as one training batch.
        self.curvature = curvature or CurvatureSet(self.images, self.labels, len(self.labels))
        self.activations = activation_layers(model)
        self.weights = weight_layers(model)
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        self._parameter_names = {layer.name: [names[id(p)] for p in layer.module.parameters()] for layer in self.weights}
        self._pending: list[Measurement] = []
        self._weights_before: list[Tensor] = []
        self._dead_before: dict[str, Tensor] = {}  # per layer, at the previous probe: for revival
        self.histogram_outputs = HISTOGRAM_OUTPUTS  # per layer, what histograms and density columns count
        self.density_steps: list[int] = []
        self.density: dict[str, list[Tensor]] = {layer.name: [] for layer in self.activations}

    def due(self, step: int) -> bool:
        """Probe before any update (step 0), every probes.every steps, at every sharpness and
        gradient-noise step, and after the last step, so that a run always starts and ends with one."""
        return (step % self.cfg.every == 0 or step == self.last_step or self.sharpness_due(step)
                or self.noise_due(step))

    def sharpness_due(self, step: int) -> bool:
        return self.cfg.sharpness_every > 0 and step % self.cfg.sharpness_every == 0

    def noise_due(self, step: int) -> bool:
        """Gradient noise costs several probes' worth: every probes.noise_every steps, and at the end."""
        every = self.cfg.noise_every
        return self.cfg.per_example > 0 and every > 0 and (step % every == 0 or step == self.last_step)

    def before_update(self) -> None:
        """Between backward and the optimizer step: gradient norms (before any clipping), and a copy
        of the weights to measure the step by."""
        for layer in self.weights:
            norm = gradient_norm(list(layer.module.parameters()))
            self._pending.append(Measurement("scalar", tag("grad_norm", layer.name), norm))
        self._weights_before = [layer.module.weight.detach().clone() for layer in self.weights]

    def after_update(self) -> None:
        for layer, before in zip(self.weights, self._weights_before):
            ratio = update_ratio(before, layer.module.weight.detach())
            self._pending.append(Measurement("scalar", tag("update_ratio", layer.name), ratio))
        self._weights_before = []

    def measure(self, step: int) -> list[Measurement]:
        """Everything due at `step`, and whatever before/after update recorded since the last call.
        Device tensors only: nothing waits for the device."""
        found, self._pending = self._pending, []
        with side_effect_free(self.model, self.cfg.mode, self.images.device):
            with torch.no_grad():
                found += self._activation_statistics(step)
            if self.sharpness_due(step):
                found += self._sharpness()
            if self.noise_due(step):
                found += self._gradient_noise()
        found += self._weight_statistics()
        return found

    def on_data(self) -> list[Measurement]:
        """Dead units over the first probes.death_examples training images (forward passes of
        probes.batch_size images): `dead_fraction` per layer and `all`, and for the leaky activations
        `negative_fraction`. In probes.mode (train: BatchNorm normalises each batch by its own
        statistics, as in training) with dropout off, and without side effects: BatchNorm's running
        statistics are restored, the RNG is forked, no parameter or gradient is touched. It stops
        early once every unit has been alive (and positive) on some image: more images cannot change
        that, so a healthy net costs a batch or two, and only a net with dead units the whole set."""
        images = self.examples[0][:self.cfg.death_examples]
        layers = [layer for layer in self.activations if dies(layer.module)]
        if not layers:  # sigmoid, tanh: saturation, not death
            return []
        names = {id(layer.module): layer.name for layer in layers}
        maxima: dict[str, Tensor] = {}

        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            name, found = names[id(module)], unit_maxima(inputs[0], module)
            maxima[name] = found if name not in maxima else torch.maximum(maxima[name], found)

        with (side_effect_free(self.model, self.cfg.mode, images.device), dropout_off(self.model), torch.no_grad(),
              forward_hooks([layer.module for layer in layers], record)):
            for part in images.split(self.cfg.batch_size):
                self.model(part)
                if not undecided_units(maxima, layers):  # one small transfer per batch, at an epoch end
                    break
        found, dead_counts, units = [], [], 0
        for layer in layers:
            dead = dead_from_maxima(maxima[layer.name], layer.module)
            dead_counts.append(dead.sum())
            units += dead.numel()
            found.append(Measurement("scalar", tag("dead_fraction", layer.name), dead.float().mean()))
            if isinstance(layer.module, LEAKY):
                negative = negative_from_maxima(maxima[layer.name]).float().mean()
                found.append(Measurement("scalar", tag("negative_fraction", layer.name), negative))
        if dead_counts:
            found.append(Measurement("scalar", tag("dead_fraction", "all"), torch.stack(dead_counts).sum() / units))
        return found

    def _activation_statistics(self, step: int) -> list[Measurement]:
        found: list[Measurement] = []
        names = {id(layer.module): layer.name for layer in self.activations}
        dead_counts: list[Tensor] = []  # per layer; "all" weights the layers by their units
        units: list[int] = []
        if self.cfg.density:
            self.density_steps.append(step)

        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            name, pre = names[id(module)], inputs[0]
            dead = dead_units(pre, module) if dies(module) else None
            found.extend(self._layer_statistics(name, module, pre, output, dead))  # reads the last probe's dead
            if dead is not None:
                dead_counts.append(dead.sum())
                units.append(dead.numel())
                self._dead_before[name] = dead
            if self.cfg.density:
                low, high = activation_row(module).density_range
                counted = leading_images(output, self.histogram_outputs)
                self.density[name].append(density_column(counted, low, high, self.cfg.bins))

        with forward_hooks([layer.module for layer in self.activations], record):
            self.model(self.images)
        if dead_counts:
            found.append(Measurement("scalar", tag("dead_on_batch", "all"), torch.stack(dead_counts).sum() / sum(units)))
        return found

    def _layer_statistics(self, name: str, module: nn.Module, pre: Tensor, output: Tensor,
                          dead: Tensor | None) -> list[Measurement]:
        """dead: the layer's dead units on the probe batch, None for an activation that saturates instead."""
        found = [Measurement("scalar", tag("act_mean", name), output.mean()),
                 Measurement("scalar", tag("act_std", name), output.std()),
                 Measurement("scalar", tag("effective_rank", name), centred_gram(output), finish=rank_of_gram)]
        if dead is not None:
            found.append(Measurement("scalar", tag("dead_on_batch", name), dead.float().mean()))
            before = self._dead_before.get(name)
            if before is not None:
                found.append(Measurement("scalar", tag("revived_fraction", name), (before & ~dead).float().mean()))
        bounds = activation_row(module).bounds
        if bounds is not None:
            found.append(Measurement("scalar", tag("saturation", name), saturation_fraction(output, *bounds)))
        if self.cfg.histograms:
            for family, values in (("activations", output), ("preactivations", pre)):
                counted = leading_images(values, self.histogram_outputs)
                found.append(Measurement("histogram", tag(family, name), histogram(counted, self.cfg.bins)))
        return found

    def _gradient_noise(self) -> list[Measurement]:
        """gradient_snr per weight layer and gradient_noise_scale, from the gradients of micro-batches
        of probes.noise_batch images (1: per-example gradients) over the first probes.per_example
        training images, in probes.mode: the network as it trains (BatchNorm with batch statistics)."""
        images, labels = (part[:self.cfg.per_example] for part in self.examples)
        batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        smallest = 2 if batchnorm and self.cfg.mode == "train" else 1  # BatchNorm cannot normalise one image
        # A training split smaller than per_example: smaller micro-batches, four of them at least
        batch = max(min(self.cfg.noise_batch, len(images) // 4), smallest)
        if len(images) // batch < 2:
            return []  # no variance from fewer than two gradients
        mean, variance, samples = micro_batch_moments(self.model, images, labels, batch)
        found = []
        for layer in self.weights:
            names = [name for name in self._parameter_names[layer.name] if name in mean]  # trainable ones
            if names:
                layer_mean, layer_variance = (torch.cat([part[name] for name in names]) for part in (mean, variance))
                found.append(Measurement("scalar", tag("gradient_snr", layer.name),
                                         gradient_snr(layer_mean, layer_variance, batch, samples)))
        moments = [(mean[name], variance[name]) for name in mean]  # every trainable parameter
        found.append(Measurement("scalar", tag("gradient_noise_scale"), gradient_noise_scale(moments, batch, samples)))
        return found

    def _sharpness(self) -> list[Measurement]:
        """The extreme eigenvalues of the training loss's Hessian on the curvature set, the optimizer's
        limit, and for an adaptive optimizer its preconditioned sharpness (see instruments/sharpness.py)."""
        steps, tolerance, device = self.cfg.sharpness_iterations, self.cfg.sharpness_tolerance, self.images.device

        def scalar(part: str, value: float) -> Measurement:
            return Measurement("scalar", tag("sharpness", part), torch.tensor(value, dtype=torch.float64, device=device))

        spectrum = hessian_spectrum(self.model, self.curvature, steps, tolerance)
        found = [scalar("top_eigenvalue", spectrum.largest), scalar("min_eigenvalue", spectrum.smallest)]
        if self.stability_limit is not None:
            found.append(scalar("stability_limit", self.stability_limit()))
        if self.preconditioner is not None:
            top = preconditioned_top_eigenvalue(self.model, self.curvature, self.preconditioner, steps, tolerance)
            if top is not None:  # not before the first update: there is no preconditioner yet
                found += [scalar("preconditioned_eigenvalue", top.largest),
                          scalar("preconditioned_limit", self.preconditioner.limit())]
        return found

    def _weight_statistics(self) -> list[Measurement]:
        found, bins = [], self.cfg.bins
        for layer in self.activations:
            if isinstance(layer.module, nn.PReLU):
                slopes = layer.module.weight.detach()
                found.append(Measurement("scalar", tag("prelu_slope", layer.name), slopes.mean()))
                if self.cfg.histograms and slopes.numel() > 1:
                    found.append(Measurement("histogram", tag("prelu_slopes", layer.name), histogram(slopes, bins)))
        if self.cfg.histograms:
            for layer in self.weights:
                found.append(Measurement("histogram", tag("weights", layer.name), histogram(layer.module.weight, bins)))
        return found

    def density_columns(self) -> dict[str, Tensor]:
        """Per activation layer: its density columns so far, [probes, bins], on the host."""
        stacked = {name: torch.stack(columns) for name, columns in self.density.items() if columns}
        return {name: columns.cpu() for name, columns in stacked.items()}

    def state_dict(self) -> dict:
        """What a resumed run needs to go on exactly: dead units at the last probe, density columns."""
        return {"dead": dict(self._dead_before), "density_steps": list(self.density_steps),
                "density": {name: list(columns) for name, columns in self.density.items()}}

    def load_state_dict(self, state: dict) -> None:
        device = self.images.device
        self._dead_before = {name: dead.to(device) for name, dead in state["dead"].items()}
        self.density_steps = list(state["density_steps"])
        self.density = {name: [column.to(device) for column in columns] for name, columns in state["density"].items()}

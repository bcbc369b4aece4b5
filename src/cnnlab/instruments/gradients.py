"""Instruments on the gradients: per-example and micro-batch gradients and the statistics built
from them (gradient signal-to-noise ratio, gradient noise scale). Sharpness, the curvature of the
loss, is sharpness.py's.

Like the statistics in probes.py, these are functions from tensors to tensors on the model's
device, with no host synchronisation; the loss is always the mean cross-entropy of the batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters the instruments differentiate with respect to, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# --- per-example gradients ---------------------------------------------------------------------------
def per_example_gradients(model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Name -> [N, *param.shape]: the gradient of each example's cross-entropy, by torch.func's vmap(grad).

    Computed with the model in eval mode: BatchNorm's batch statistics tie every example's gradient
    to the others', so each example goes through BatchNorm with its running statistics (and dropout
    is off). The modules' modes are restored afterwards; parameters, buffers, .grad and the RNG are untouched.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            raise ValueError(f"{type(module).__name__} without running statistics (track_running_stats=False) "
                             "normalises with batch statistics even in eval mode: per-example gradients are undefined")
    params = {name: p.detach() for name, p in trainable_parameters(model).items()}
    # Frozen parameters and buffers are constants of the loss.
    constants = {name: t.detach() for name, t in model.named_parameters() if name not in params}
    constants.update({name: b.detach() for name, b in model.named_buffers()})

    def loss_of_one(params: dict[str, Tensor], image: Tensor, label: Tensor) -> Tensor:
        logits = functional_call(model, (params, constants), (image.unsqueeze(0),))
        return F.cross_entropy(logits, label.unsqueeze(0))

    modes = [(module, module.training) for module in model.modules()]  # a model may mix modes
    model.eval()
    try:
        with rrelu_as_its_mean_slope(model):
            # randomness="error": a random op (there should be none in eval mode) fails loudly
            # instead of drawing from the global RNG.
            return vmap(grad(loss_of_one), in_dims=(None, 0, 0), randomness="error")(params, images, labels)
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def rrelu_as_its_mean_slope(model: nn.Module) -> Iterator[None]:
    """RReLU in eval mode is leaky ReLU with slope (lower + upper)/2, but torch runs it through an op
    that vmap does not support (aten::rrelu_with_noise): compute it as leaky ReLU meanwhile."""
    rrelus = [module for module in model.modules() if isinstance(module, nn.RReLU)]
    for module in rrelus:
        module.forward = lambda x, m=module: F.leaky_relu(x, (m.lower + m.upper) / 2)
    try:
        yield
    finally:
        for module in rrelus:
            del module.forward  # back to the class's own forward


def moments_of_samples(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Per parameter of gradient samples [M, ...] (one per example, or one per micro-batch): the mean
    and the unbiased variance, float64, in two passes (as accurate as Tensor.var)."""
    g = samples.detach().flatten(1).double()
    mean = g.mean(dim=0)
    variance = (g - mean).square_().sum(dim=0) / (g.shape[0] - 1)
    # Exactly 0 where every sample is the same: the variance of equal values can round to a tiny number.
    return mean, torch.where((g == g[:1]).all(dim=0), 0.0, variance)


def micro_batch_moments(model: nn.Module, images: Tensor, labels: Tensor, batch: int,
                        chunk: int = 32) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
    """The gradients of the mean cross-entropy of consecutive micro-batches of `batch` images, in the
    model's current mode (train: BatchNorm normalises each micro-batch by its own statistics, as a
    training step of that size does): name -> (mean, unbiased variance) per parameter, float64,
    flattened, and the number of micro-batches M. `chunk` gradients at a time are stacked and merged
    into the running moments (Chan et al.), so memory stays at `chunk` copies of the parameters.
    Buffers are never written (BatchNorm updates copies) and no .grad is set; a training-mode
    dropout or RReLU draws from the global RNG: the caller forks it."""
    params = trainable_parameters(model)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    samples = len(images) // batch
    count, mean, m2, first, constant = 0, {}, {}, {}, {}
    for start in range(0, samples, chunk):
        stacked: dict[str, list[Tensor]] = {name: [] for name in params}
        for k in range(start, min(start + chunk, samples)):
            part = slice(k * batch, (k + 1) * batch)
            with torch.enable_grad():
                loss = F.cross_entropy(functional_call(model, buffers, (images[part],)), labels[part])
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True)
            for name, g in zip(params, grads):
                stacked[name].append(g.detach().flatten())
        for name, parts in stacked.items():
            g = torch.stack(parts)  # a chunk's moments in the parameters' precision, merged in float64
            part_mean = g.mean(dim=0)
            part_m2 = (g - part_mean).square_().sum(dim=0).double()
            part_mean = part_mean.double()
            first.setdefault(name, g[0])
            constant[name] = (g == first[name]).all(dim=0) & constant.get(name, True)
            if name not in mean:
                mean[name], m2[name] = part_mean, part_m2
                continue
            total, delta = count + len(g), part_mean - mean[name]
            mean[name] = mean[name] + delta * (len(g) / total)
            m2[name] = m2[name] + part_m2 + delta.square() * (count * len(g) / total)
        count += min(chunk, samples - start)
    # Exactly 0 where every sample is the same: the variance of equal values can round to a tiny number.
    variance = {name: torch.where(constant[name], 0.0, m2[name] / max(samples - 1, 1)) for name in m2}
    return mean, variance, samples


def gradient_snr(mean: Tensor, variance: Tensor, batch: int, samples: int) -> Tensor:
    """GSNR (Liu et al. 2020, ICLR): per parameter, E[g]^2 / Var[g] of the per-example gradient g,
    averaged over a layer's parameters, float64; from the mean and unbiased variance of `samples`
    gradient samples, each the mean of `batch` examples (batch 1: per-example gradients).

    Per-example variance = batch * variance. The plug-in mean^2 is biased up by variance/samples
    (= Var[g]/N over the N = batch * samples examples): that is subtracted, and the result clipped at
    0. 1/variance is biased up by (M-1)/(M-3) for M normal samples: multiplied back for M > 3.
    Parameters whose gradient does not vary have no finite SNR and are left out; NaN if all are."""
    mean, variance = mean.flatten().double(), variance.flatten().double()
    varies = variance > 0
    signal = (mean.square() - variance / samples).clamp_min(0.0)
    snr = torch.where(varies, signal / (batch * variance).clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    unbias = (samples - 3) / (samples - 1) if samples > 3 else 1.0
    return unbias * snr.sum() / varies.sum()


def gradient_noise_scale(moments: list[tuple[Tensor, Tensor]], batch: int, samples: int) -> Tensor:
    """B_simple = tr(Sigma) / |G|^2 over all parameters together (McCandlish et al. 2018), float64, from
    the (mean, unbiased variance) of `samples` gradient samples of `batch` examples each. This is their
    App. A two-batch-size estimator with B_small = batch (the norms of the samples) and B_big = batch *
    samples (the norm of their mean): tr(Sigma) = batch * sum(variance) and the unbiased
    |G|^2 = |mean|^2 - sum(variance) / samples. inf when that is not positive (noise hides the mean)."""
    variance = sum(v.double().sum() for _, v in moments)
    mean_norm2 = sum(m.double().square().sum() for m, _ in moments)
    signal = mean_norm2 - variance / samples
    return batch * variance / signal.clamp_min(0.0)

"""Instruments on the gradients of a fixed probe batch: per-example gradients and the statistics
built from them (gradient signal-to-noise ratio, gradient noise scale), and sharpness (the top
eigenvalue of the loss Hessian) with the edge-of-stability limit it is compared against.

Like the statistics in probes.py, these are functions from tensors to tensors on the model's
device, with no host synchronisation; the loss is always the mean cross-entropy of the batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

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


def _mean_and_variance(per_example: Tensor) -> tuple[Tensor, Tensor]:
    # Per parameter of [N, ...]: the mean and the unbiased variance, in two passes (as accurate as
    # Tensor.var, and twice as fast over dim 0 on a CPU).
    g = per_example.detach().flatten(1)
    mean = g.mean(dim=0)
    return mean, (g - mean).square_().sum(dim=0) / (g.shape[0] - 1)


def gradient_snr(per_example: Tensor) -> Tensor:
    """Mean over a layer's parameters of mean^2 / unbiased variance of the per-example gradient [N, ...]
    (GSNR, Liu et al. 2020, ICLR), float64. Parameters whose gradient is the same for every example
    have no finite SNR and are left out; NaN if all are (or if N < 2)."""
    mean, variance = _mean_and_variance(per_example)
    g = per_example.detach().flatten(1)
    # Exact equality, not variance == 0: the variance of equal values can round to a tiny positive
    # number. (variance > 0 drops differences so small that their squares underflow.)
    varies = (g != g[:1]).any(dim=0) & (variance > 0)
    snr = torch.where(varies, mean.square() / variance, 0.0)
    return snr.sum(dtype=torch.float64) / varies.sum()


def gradient_noise_scale(per_example: dict[str, Tensor]) -> Tensor:
    """B_simple = tr(Sigma) / |G|^2 over all parameters together (McCandlish et al. 2018), float64, with
    the unbiased |G|^2 = |mean|^2 - tr(Sigma)/N; inf when that is not positive (noise hides the mean)."""
    moments = [_mean_and_variance(g) for g in per_example.values()]
    trace = sum(variance.sum(dtype=torch.float64) for _, variance in moments)  # tr(Sigma)
    mean_norm2 = sum(mean.square().sum(dtype=torch.float64) for mean, _ in moments)  # E = |G|^2 + tr(Sigma)/N
    n = next(iter(per_example.values())).shape[0]
    # McCandlish et al.'s App. A estimate of |G|^2 from batch sizes 1 and N; the biased |mean|^2
    # would cap B_simple at N, the probe batch size.
    signal = mean_norm2 - trace / n
    return trace / signal.clamp_min(0.0)


# --- sharpness -----------------------------------------------------------------------------------------
def _power_steps(matvec: Callable[[Tensor], Tensor], v: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    # Power iteration from the unit vector v: the last Rayleigh quotient v.Av and the last v.
    eigenvalue = torch.zeros((), device=v.device, dtype=v.dtype)
    for _ in range(iterations):
        av = matvec(v)
        eigenvalue = torch.dot(v, av)
        v = av / torch.linalg.vector_norm(av).clamp_min(torch.finfo(v.dtype).tiny)
    return eigenvalue, v


def power_iteration(matvec: Callable[[Tensor], Tensor], dim: int, iterations: int,
                    generator: torch.Generator | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """The largest eigenvalue of the symmetric operator v -> matvec(v), by power iteration (Rayleigh
    quotient). Plain power iteration finds the eigenvalue of largest magnitude; where that is negative,
    the second half of the iterations runs on A - lambda I, whose largest eigenvalue is then the dominant one.
    The start vector is drawn with `generator` (on its device, then moved to `device`), or with a
    fixed seed: never from the global RNG."""
    if generator is None:
        generator = torch.Generator(device=device or "cpu").manual_seed(0)
    device = device or generator.device
    start = torch.randn(dim, generator=generator, device=generator.device, dtype=dtype).to(device)
    start = start / torch.linalg.vector_norm(start)
    dominant, v = _power_steps(matvec, start, iterations // 2)
    # Selected on the device, not branched on: with a positive dominant eigenvalue the shift is 0 and the
    # second half simply goes on from where the first stopped.
    shift = dominant.clamp_max(0.0)
    v = torch.where(dominant >= 0, v, start)
    shifted, _ = _power_steps(lambda u: matvec(u) - shift * u, v, iterations - iterations // 2)
    return shifted + shift


def top_hessian_eigenvalue(model: nn.Module, images: Tensor, labels: Tensor, iterations: int,
                           generator: torch.Generator | None = None) -> Tensor:
    """Sharpness: the top eigenvalue of the Hessian of the batch's mean cross-entropy w.r.t. the trainable
    parameters, by power iteration on Hessian-vector products (double backward), as a 0-dim tensor.

    The caller picks the mode; in train mode BatchNorm uses batch statistics and dropout one fixed mask
    (drawn inside a forked RNG). Buffers are never written (BatchNorm updates copies) and no .grad is set.
    """
    params = trainable_parameters(model)
    # BatchNorm's running statistics update copies, not the model's buffers.
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    device = images.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with torch.enable_grad():
            logits = functional_call(model, buffers, (images,))
            loss = F.cross_entropy(logits, labels)
            gradients = torch.autograd.grad(loss, list(params.values()), create_graph=True,
                                            allow_unused=True, materialize_grads=True)
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def hvp(v: Tensor) -> Tensor:
        pieces = [piece.view(shape) for piece, shape in zip(v.split(sizes), shapes)]
        with torch.enable_grad():
            g_dot_v = sum((g * piece).sum() for g, piece in zip(gradients, pieces))
            hv = torch.autograd.grad(g_dot_v, list(params.values()), retain_graph=True,
                                     allow_unused=True, materialize_grads=True)
        return torch.cat([h.reshape(-1) for h in hv])

    dtype = next(iter(params.values())).dtype
    return power_iteration(hvp, sum(sizes), iterations, generator, device, dtype).detach()


def stability_limit(lr: float, momentum: float = 0.0) -> float:
    """2(1 + momentum) / lr: the sharpness above which (heavy-ball) gradient descent on a quadratic
    diverges, where training sits at the edge of stability (Cohen et al. 2021, ICLR)."""
    return 2.0 * (1.0 + momentum) / lr

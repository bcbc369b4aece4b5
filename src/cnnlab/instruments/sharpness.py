"""Sharpness: the extreme eigenvalues of the Hessian of the training loss, and the stability limits
of the optimizers it is compared with (the edge of stability, Cohen et al. 2021; 2022).

The loss is the mean cross-entropy over a fixed curvature set of training images (CurvatureSet),
as a training step computes it: BatchNorm normalises each training batch by its own statistics,
while dropout and RReLU take their expectation (eval mode), so that the loss is one deterministic
function of the weights. Its Hessian is never formed: Lanczos (with full reorthogonalisation) runs
on Hessian-vector products (torch.func, forward-over-reverse) until both extreme Ritz values reach a
tolerance, which also finds a largest eigenvalue that is smaller in magnitude than the smallest.

For an adaptive optimizer the quantity at the edge is the preconditioned sharpness, the largest
eigenvalue of P^-1 H with P the optimizer's diagonal preconditioner (Preconditioner).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

Matvec = Callable[[Tensor], Tensor]


@dataclass
class CurvatureSet:
    """The training images the sharpness is measured on, fixed for the run."""

    images: Tensor
    labels: Tensor
    batch_size: int  # the training batch size: BatchNorm normalises each such chunk by its own statistics

    def chunks(self) -> list[tuple[Tensor, Tensor, float]]:
        """(images, labels, share of the set) per training-batch-sized chunk; a last chunk of one image
        joins the one before it (BatchNorm cannot normalise a single example by its own statistics)."""
        count = len(self.labels)
        starts = list(range(0, count, self.batch_size))
        if len(starts) > 1 and count - starts[-1] < 2:
            starts.pop()
        ends = [*starts[1:], count]
        return [(self.images[a:b], self.labels[a:b], (b - a) / count) for a, b in zip(starts, ends)]


@dataclass(frozen=True)
class Spectrum:
    """The extreme eigenvalues Lanczos found, and how it got there."""

    smallest: float
    largest: float
    steps: int  # operator applications (Hessian-vector products over the whole curvature set)
    converged: bool  # within the tolerance; False when it ran out of steps first


@dataclass(frozen=True)
class Preconditioner:
    """An adaptive optimizer's side of the edge of stability (Cohen et al. 2022): its preconditioned
    sharpness is the largest eigenvalue of P^-1 (H + weight_decay I), compared with `limit`. All three
    are read when called, so they follow the optimizer's schedule and state."""

    diagonal: Callable[[Tensor], Tensor | None]  # a parameter -> P's diagonal for it; None before its first update
    limit: Callable[[], float]  # at the current learning rate and momentum
    weight_decay: Callable[[], float]  # L2 penalty added to the gradient (coupled); 0 for decoupled decay


# --- stability limits: the sharpness above which the update diverges on a quadratic ---------------
def sgd_limit(lr: float, momentum: float = 0.0, nesterov: bool = False, dampening: float = 0.0,
              weight_decay: float = 0.0) -> float:
    """The largest Hessian eigenvalue torch's SGD is stable at: 2/lr plain, 2(1 + beta)/lr with heavy
    ball (with dampening d: over (1 - d) lr), (2 + 2 beta)/((1 + 2 beta) lr) with Nesterov; minus the
    coupled weight decay, which adds itself to every eigenvalue. On f(x) = h x^2 / 2 the update
    converges for h below the limit and diverges above it (Cohen et al. 2021 for the first two)."""
    if nesterov:
        limit = (2 + 2 * momentum) / ((1 + 2 * momentum) * lr)
    else:
        limit = 2 * (1 + momentum) / ((1 - dampening) * lr)
    return limit - weight_decay


def adam_limit(lr: float, beta1: float) -> float:
    """(2 + 2 beta1) / ((1 - beta1) lr): the preconditioned sharpness Adam is stable at, with P =
    (1 - beta1^t) diag(sqrt(v_hat) + eps), the update being P^-1 lr m (Cohen et al. 2022, eq. 2)."""
    return (2 + 2 * beta1) / ((1 - beta1) * lr)


# --- Lanczos ---------------------------------------------------------------------------------------------
def random_start(dim: int, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> Tensor:
    """A unit start vector drawn from its own generator (on the CPU, then moved): never the global RNG."""
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)
    return v / torch.linalg.vector_norm(v)


def _ritz(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    # Eigenvalues and eigenvectors of the Lanczos tridiagonal matrix, in float64 on the host.
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


def lanczos(matvec: Matvec, start: Tensor, max_steps: int, tolerance: float, both_ends: bool = True) -> Spectrum:
    """The extreme eigenvalues of the symmetric operator `matvec`, by Lanczos with full
    reorthogonalisation from the unit vector `start`. It stops when the residual |beta_k s_k| of the
    largest Ritz pair (and of the smallest, with both_ends) is within tolerance x the spectral radius
    found so far: then an eigenvalue lies within that distance of each (Parlett 1998, ch. 13), after
    max_steps, or when the Krylov space is exhausted (exact)."""
    basis, alphas, betas = [start], [], []
    dim = start.numel()
    for step in range(1, min(max_steps, dim) + 1):
        q = basis[-1]
        w = matvec(q)
        alpha = torch.dot(q, w)
        w = w - alpha * q - (betas[-1] * basis[-2] if betas else 0.0)
        for _ in range(2):  # twice is enough (Kahan, Parlett): float32 loses orthogonality fast otherwise
            for b in basis:
                w -= torch.dot(b, w) * b
        beta = torch.linalg.vector_norm(w)
        alphas.append(float(alpha))
        if not (math.isfinite(alphas[-1]) and math.isfinite(float(beta))):  # weights or loss blown up
            return Spectrum(math.nan, math.nan, step, False)
        ritz, vectors = _ritz(alphas, betas)
        residuals = float(beta) * vectors[-1].abs()
        scale = max(abs(float(ritz[0])), abs(float(ritz[-1])))
        ends = [0, -1] if both_ends else [-1]
        converged = all(float(residuals[i]) <= tolerance * scale for i in ends)
        exhausted = float(beta) <= 1e-6 * max(scale, torch.finfo(torch.float32).tiny) or step == dim
        if converged or exhausted or step == max_steps:
            return Spectrum(float(ritz[0]), float(ritz[-1]), step, converged or exhausted)
        betas.append(float(beta))
        basis.append(w / beta)
    raise ValueError("lanczos needs max_steps >= 1")


# --- the Hessian of the training loss --------------------------------------------------------------------
@contextmanager
def training_loss_mode(model: nn.Module) -> Iterator[None]:
    """The model as the training loss sees it, without side effects: BatchNorm in train mode with
    batch statistics and its running statistics left alone (track_running_stats off: F.batch_norm then
    gets none to update), every other module (dropout, RReLU) in eval mode. Restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = [m.track_running_stats for m in norms]
    model.eval()
    for module in norms:
        module.train()
        module.track_running_stats = False
    try:
        yield
    finally:
        for module, track in zip(norms, tracking):
            module.track_running_stats = track
        for module, training in modes:
            module.training = training


def hessian_vector_product(model: nn.Module, curvature: CurvatureSet) -> tuple[Matvec, list[Tensor]]:
    """(v -> H v, the trainable parameters): H the Hessian of the curvature set's mean cross-entropy with respect
    to the trainable parameters, flattened in their order. Forward-over-reverse (torch.func's jvp of
    grad), chunk by chunk: memory stays that of one training batch, and on this project's CPU it took
    half the time of double backward. The caller puts the model in training_loss_mode. No .grad is set."""
    weights = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    sizes = [p.numel() for p in weights.values()]
    chunks = curvature.chunks()

    def loss(w: dict[str, Tensor], images: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, w, (images,)), labels)

    def hvp(v: Tensor) -> Tensor:
        tangents = {name: piece.view_as(p) for (name, p), piece in zip(weights.items(), v.split(sizes))}
        total = torch.zeros_like(v)
        for images, labels, share in chunks:
            _, hv = jvp(lambda w, x=images, y=labels: grad(loss)(w, x, y), (weights,), (tangents,))
            total += share * torch.cat([h.reshape(-1) for h in hv.values()])
        return total

    return hvp, [p for p in model.parameters() if p.requires_grad]  # the parameters themselves: optimizer state keys


def hessian_spectrum(model: nn.Module, curvature: CurvatureSet, max_steps: int, tolerance: float) -> Spectrum:
    """The largest and smallest eigenvalues of the Hessian of the training loss on `curvature`, by
    Lanczos (`lanczos`) from a fixed start. Parameters, buffers, modes, .grad and the RNG are untouched."""
    with training_loss_mode(model):
        hvp, params = hessian_vector_product(model, curvature)
        start = random_start(sum(p.numel() for p in params), params[0].device, params[0].dtype)
        return lanczos(hvp, start, max_steps, tolerance)


def preconditioned_top_eigenvalue(model: nn.Module, curvature: CurvatureSet, preconditioner: Preconditioner,
                                  max_steps: int, tolerance: float) -> Spectrum | None:
    """The largest eigenvalue of P^-1 (H + weight_decay I), as that of the symmetric
    P^-1/2 (H + weight_decay I) P^-1/2 (the same eigenvalues); None before the optimizer's first update."""
    with training_loss_mode(model):
        hvp, params = hessian_vector_product(model, curvature)
        diagonals = [preconditioner.diagonal(p) for p in params]
        if any(d is None for d in diagonals):
            return None
        scale = torch.cat([d.detach().reshape(-1) for d in diagonals]).rsqrt().to(params[0].dtype)
        decay = preconditioner.weight_decay()

        def matvec(v: Tensor) -> Tensor:
            return scale * hvp(scale * v) + decay * scale.square() * v

        start = random_start(scale.numel(), scale.device, scale.dtype)
        return lanczos(matvec, start, max_steps, tolerance, both_ends=False)

"""Does the sharpness instrument measure the training loss? An independent check on a whole training split.

Trains a tanh MLP with SGD (the issue-19 edge-of-stability setting: 784-200-200, lr 0.4, limit 2/lr = 5)
on generated MNIST-shaped data, and at a few steps compares three estimates of lambda_max (and
lambda_min) of the Hessian of the training loss:

  probe batch   Lanczos on the 256-image probe batch (what earlier versions measured, with power iteration)
  instrument    cnnlab's hessian_spectrum on the curvature set (probes.curvature_examples images, or each
                size given with --curvature: nested sets, each the start of the same draw, as the trainer draws it)
  full split    scipy's ARPACK (eigsh, which="LA"; lambda_min from the shifted operator) on Hessian-vector products over the whole
                training split, in float64, by torch.func (forward-over-reverse): independent of cnnlab's code

    python scripts/check_sharpness.py                       # 12,000 images, default curvature set
    python scripts/check_sharpness.py --train-size 8000 --hidden 64,64 --steps 200 --every 200   # quicker
    python scripts/check_sharpness.py --train-size 24000 --curvature 4096,8192,16384 --no-probe-batch  # by size
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from scipy.sparse.linalg import LinearOperator, eigsh

from cnnlab.config import config_dir, validate
from cnnlab.instruments.sharpness import CurvatureSet, hessian_spectrum
from cnnlab.train.data import load_data
from cnnlab.train.models import build_model


def full_split_extremes(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        chunk: int = 2000) -> tuple[float, float, int]:
    """(lambda_min, lambda_max, products) of the mean cross-entropy over all `images`, by ARPACK in float64."""
    reference = {name: p.detach().double() for name, p in model.named_parameters()}
    flat = torch.cat([p.reshape(-1) for p in reference.values()])
    double = build_like(model)
    products = 0

    def loss_of(vector: torch.Tensor, part: torch.Tensor, part_labels: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, p in reference.items():
            params[name], offset = vector[offset:offset + p.numel()].view_as(p), offset + p.numel()
        return F.cross_entropy(torch.func.functional_call(double, params, (part,)), part_labels, reduction="sum")

    def hvp(v):
        nonlocal products
        products += 1
        v = torch.as_tensor(v).reshape(-1)
        total = torch.zeros_like(flat)
        for part, part_labels in zip(images.split(chunk), labels.split(chunk)):
            grad = torch.func.grad(lambda w: loss_of(w, part.double(), part_labels))
            total += torch.func.jvp(grad, (flat,), (v,))[1]
        return (total / len(labels)).numpy()

    operator = LinearOperator((flat.numel(), flat.numel()), matvec=hvp, dtype="float64")
    largest = eigsh(operator, k=1, which="LA", tol=1e-5, return_eigenvectors=False)[0]
    # lambda_min as largest - the top eigenvalue of largest I - H: ARPACK's "SA" crawls where the bulk sits near 0.
    shifted = LinearOperator(operator.shape, matvec=lambda v: largest * v.reshape(-1) - hvp(v), dtype="float64")
    smallest = largest - eigsh(shifted, k=1, which="LA", tol=1e-4, return_eigenvectors=False)[0]
    return float(smallest), float(largest), products


def build_like(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).double().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=12000, help="generated training images (before the val split)")
    parser.add_argument("--steps", type=int, default=600, help="SGD steps")
    parser.add_argument("--every", type=int, default=200, help="steps between comparisons")
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--noise", type=float, default=2.0, help="dataset.noise: how hard the generated images are")
    parser.add_argument("--hidden", default="200,200", help="hidden widths of the tanh MLP")
    parser.add_argument("--curvature", default="", help="curvature set sizes to compare, e.g. 4096,16384 "
                        "(default: probes.curvature_examples); each capped at the split, as the trainer does")
    parser.add_argument("--no-probe-batch", action="store_true", help="skip Lanczos on the probe batch")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("train", overrides=[
            "dataset=fake", f"dataset.train_size={args.train_size}", f"dataset.noise={args.noise}", "model=mlp",
            f"model.hidden=[{args.hidden}]", "activation=tanh", "optimizer=sgd", f"optimizer.lr={args.lr}",
            "optimizer.momentum=0.0", "trainer.device=cpu"])
    run = validate(cfg)
    torch.manual_seed(0)
    data = load_data(run.dataset, run.trainer.batch_size, run.trainer.eval_batch_size, torch.device("cpu"), seed=0)
    model = build_model(run.model, run.activation, data.input_shape, data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    split = run.dataset.split_seed
    everything = data.train.sample(10**9, seed=split)  # the whole training split
    sizes = [int(n) for n in args.curvature.split(",")] if args.curvature else [run.probes.curvature_examples]
    curvatures = [CurvatureSet(*data.train.sample(n, seed=split), run.trainer.batch_size) for n in sizes]
    probe_batch = (None if args.no_probe_batch else
                   CurvatureSet(*data.train.sample(run.probes.batch_size, seed=split), run.probes.batch_size))
    print(f"{len(everything[1])} training images, curvature sets {[len(c.labels) for c in curvatures]}, "
          f"limit 2/lr = {2 / args.lr:.3g}")
    step = 0
    while step <= args.steps:
        for images, labels in data.train:
            if step % args.every == 0:
                compare(model, step, probe_batch, curvatures, everything, run.probes)
            if step == args.steps:
                return
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1


def compare(model, step, probe_batch, curvatures, everything, probes) -> None:
    """One line per estimate: its lambda_max and lambda_min, their errors against ARPACK on the whole split."""
    with torch.no_grad():
        loss = F.cross_entropy(model(everything[0]), everything[1]).item()
    start = time.perf_counter()
    smallest, largest, products = full_split_extremes(model, *everything)
    full_seconds = time.perf_counter() - start
    print(f"step {step}: loss {loss:.4g}; whole split (ARPACK, float64) lambda_max {largest:.4g}, lambda_min "
          f"{smallest:.4g} ({products} products, {full_seconds:.0f} s)")
    print(f"  {'curvature set':>13} {'lambda_max':>11} {'error':>7} {'lambda_min':>11} {'error':>7} "
          f"{'products':>8} {'seconds':>8}")
    for curvature in ([probe_batch] if probe_batch is not None else []) + curvatures:
        start = time.perf_counter()
        ours = hessian_spectrum(model, curvature, probes.sharpness_iterations, probes.sharpness_tolerance)
        seconds = time.perf_counter() - start
        print(f"  {len(curvature.labels):>13} {ours.largest:>11.4g} {ours.largest / largest - 1:>+7.1%} "
              f"{ours.smallest:>11.4g} {ours.smallest / smallest - 1:>+7.1%} {ours.steps:>8} {seconds:>8.1f}",
              flush=True)


if __name__ == "__main__":
    main()

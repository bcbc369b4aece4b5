"""Sharpness of the training loss: Lanczos against known spectra, the Hessian against explicit
Hessians and an independent Lanczos (scipy's ARPACK) on the whole training split, the optimizers'
stability limits against torch's own optimizers on a quadratic, and the edge-of-stability finding."""

import copy
import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from cnnlab.analysis.findings import RunFacts, diagnose
from cnnlab.config import ProbesConfig, validate
from cnnlab.errors import UserError
from cnnlab.instruments.probes import Probes
from cnnlab.instruments.sharpness import (
    CurvatureSet,
    adam_limit,
    hessian_spectrum,
    lanczos,
    preconditioned_top_eigenvalue,
    random_start,
    sgd_limit,
)
from cnnlab.train.checkpoint import load_checkpoint
from cnnlab.train.state import adaptive_preconditioner, sgd_stability_limit
from tests.helpers import compose_config

PROBES = ProbesConfig(enabled=True, every=10, batch_size=16, histograms=False, bins=8, mode="train", per_example=0,
                      noise_every=0, sharpness_every=3, sharpness_iterations=100, sharpness_tolerance=1e-4,
                      curvature_examples=4096, density=False)


def symmetric(eigenvalues: list[float], dtype=torch.float64) -> torch.Tensor:
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    return (q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T).to(dtype)


def spectrum_with(ends: list[float], bulk: tuple[float, float], size: int = 300) -> list[float]:
    """`ends` plus a bulk of `size` eigenvalues spread evenly over `bulk`."""
    return [*ends, *torch.linspace(*bulk, size).tolist()]


def patterns(count: int, features: int, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated images: one fixed random pattern per class plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (count,), generator=generator)
    centres = torch.randn(classes, features, generator=generator)
    return centres[labels] + 0.8 * torch.randn(count, features, generator=generator), labels


def explicit_hessian(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int) -> torch.Tensor:
    """The full Hessian of the training loss, the mean over batches of `batch` of their mean cross-entropy
    in train mode (BatchNorm with each batch's statistics, updating copies of its buffers), by
    torch.autograd.functional.hessian, block by block."""
    names = [n for n, _ in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def loss_of(*params):
        total = 0.0
        for part, part_labels in zip(images.split(batch), labels.split(batch)):
            copies = {n: b.clone() for n, b in buffers.items()}
            logits = torch.func.functional_call(model, (dict(zip(names, params)), copies), (part,))
            total = total + F.cross_entropy(logits, part_labels) * len(part) / len(images)
        return total

    model.train()
    blocks = torch.autograd.functional.hessian(loss_of, tuple(p.detach() for p in model.parameters()))
    sizes = [p.numel() for p in model.parameters()]
    return torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(sizes))], dim=1)
                      for i in range(len(sizes))])


def state_of(model: nn.Module) -> dict:
    return {"modes": [m.training for m in model.modules()], "tensors": {k: v.clone() for k, v in model.state_dict().items()},
            "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            "tracking": [getattr(m, "track_running_stats", None) for m in model.modules()], "rng": torch.get_rng_state()}


def assert_same_state(before: dict, after: dict) -> None:
    assert after["modes"] == before["modes"] and after["tracking"] == before["tracking"]
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(after["grads"], before["grads"]))
    assert torch.equal(after["rng"], before["rng"])


# --- Lanczos on known spectra ------------------------------------------------------------------------
@pytest.mark.parametrize("eigenvalues", [
    spectrum_with([5.0], (0.0, 1.0)),
    spectrum_with([1.51, -1.50], (-0.5, 0.5)),  # power iteration read 21% low here
    spectrum_with([0.91, -8.0], (-1.0, 0.8)),  # and 44-95% low where the negative end dominates
    spectrum_with([0.05, -10.0], (-1.0, -0.2)),  # a largest eigenvalue near 0, beside a huge negative one
], ids=["positive", "balanced", "negative_dominant", "tiny_top"])
def test_lanczos_finds_both_ends_of_a_known_spectrum_even_where_the_negative_end_dominates(eigenvalues):
    matrix = symmetric(eigenvalues)
    before = torch.get_rng_state()
    spectrum = lanczos(lambda v: matrix @ v, random_start(len(eigenvalues), "cpu", torch.float64), 200, 1e-6)
    radius = max(abs(e) for e in eigenvalues)
    assert spectrum.converged and spectrum.steps < len(eigenvalues)  # long before the space is exhausted
    assert spectrum.largest == pytest.approx(max(eigenvalues), abs=1e-5 * radius)
    assert spectrum.smallest == pytest.approx(min(eigenvalues), abs=1e-5 * radius)
    assert torch.equal(torch.get_rng_state(), before)  # the start vector has a generator of its own


def test_lanczos_in_float32_at_the_default_tolerance_is_within_a_tenth_of_a_percent():
    eigenvalues = spectrum_with([0.91, -8.0], (-1.0, 0.8), size=1000)
    matrix = symmetric(eigenvalues, torch.float32)
    spectrum = lanczos(lambda v: matrix @ v, random_start(len(eigenvalues), "cpu", torch.float32), 100, 1e-3)
    assert spectrum.converged
    assert spectrum.largest == pytest.approx(0.91, abs=1e-3 * 8) and spectrum.smallest == pytest.approx(-8.0, rel=1e-3)


def test_lanczos_reports_when_it_ran_out_of_steps_and_is_exact_on_a_small_space():
    matrix = symmetric(torch.linspace(-1, 1, 400).tolist())  # no gap at either end: slow
    assert not lanczos(lambda v: matrix @ v, random_start(400, "cpu", torch.float64), 5, 1e-9).converged
    small = symmetric([3.0, -2.0, 0.5])
    spectrum = lanczos(lambda v: small @ v, random_start(3, "cpu", torch.float64), 50, 1e-12)
    assert spectrum.converged and spectrum.steps <= 3
    assert (spectrum.smallest, spectrum.largest) == (pytest.approx(-2.0), pytest.approx(3.0))


# --- the Hessian of the training loss -------------------------------------------------------------------
def test_curvature_chunks_are_training_batches_weighted_by_their_share():
    images, labels = torch.randn(65, 2), torch.arange(65) % 3
    chunks = CurvatureSet(images, labels, 16).chunks()
    assert [len(c[1]) for c in chunks] == [16, 16, 16, 17]  # a last chunk of one joins the one before
    assert sum(share for _, _, share in chunks) == pytest.approx(1.0)
    assert [len(c[1]) for c in CurvatureSet(images[:40], labels[:40], 16).chunks()] == [16, 16, 8]


@pytest.mark.parametrize("build", [
    lambda: nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)),
    lambda: nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)),
], ids=["tanh_mlp", "batchnorm_relu_mlp"])
def test_hessian_spectrum_matches_the_explicit_hessian_of_the_training_loss(build):
    torch.manual_seed(0)
    model = build()
    images, labels = patterns(120, 8)
    expected = torch.linalg.eigvalsh(explicit_hessian(model, images, labels, batch=40))
    model.eval()  # the probe sets its own modes
    spectrum = hessian_spectrum(model, CurvatureSet(images, labels, 40), 100, 1e-4)
    assert spectrum.converged
    radius = expected.abs().max().item()
    assert spectrum.largest == pytest.approx(expected[-1].item(), rel=0.01, abs=1e-3 * radius)
    assert spectrum.smallest == pytest.approx(expected[0].item(), abs=0.01 * radius)


def test_hessian_spectrum_is_right_where_negative_curvature_dominates():
    # In train mode this BatchNorm net's Hessian has a most negative eigenvalue larger in magnitude
    # than its largest one: where power iteration goes wrong.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 3))
    images, labels = torch.randn(48, 4), torch.randint(0, 3, (48,))
    expected = torch.linalg.eigvalsh(explicit_hessian(model, images, labels, batch=16))
    assert -expected[0] > expected[-1] > 0  # what makes this case hard
    spectrum = hessian_spectrum(model, CurvatureSet(images, labels, 16), 100, 1e-5)
    assert spectrum.largest == pytest.approx(expected[-1].item(), rel=0.01)
    assert spectrum.smallest == pytest.approx(expected[0].item(), rel=0.01)


def test_hessian_spectrum_leaves_modes_buffers_grads_and_rng_untouched_and_ignores_dropout():
    torch.manual_seed(0)
    with_dropout = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.RReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    images, labels = patterns(40, 6)
    with torch.no_grad():
        with_dropout(images)  # running statistics away from their start
    with_dropout[0].weight.grad = torch.ones_like(with_dropout[0].weight)
    before = state_of(with_dropout)
    with torch.no_grad():  # the probes run it inside no_grad blocks
        spectrum = hessian_spectrum(with_dropout, CurvatureSet(images, labels, 20), 50, 1e-3)
    assert_same_state(before, state_of(with_dropout))
    # Dropout off, RReLU at its mean slope: the same loss as the net without dropout, with leaky ReLU.
    without = nn.Sequential(*with_dropout[:2], nn.LeakyReLU((1 / 8 + 1 / 3) / 2), with_dropout[4])
    same = hessian_spectrum(without, CurvatureSet(images, labels, 20), 50, 1e-3)
    assert spectrum.largest == pytest.approx(same.largest, rel=1e-4)


def test_probes_sharpness_over_the_whole_training_split_matches_an_independent_lanczos(tiny_state):
    """The trainer's curvature set is the whole (small) training split; its lambda_max and lambda_min agree
    within 3% with scipy's ARPACK on a float64 copy of the net, products by torch.func over the split at once."""
    state = tiny_state("model.hidden=[16]", "optimizer=sgd", "optimizer.lr=0.1", "probes.sharpness_every=1",
                       "probes.curvature_examples=100000", "probes.every=1000", "probes.histograms=false")
    probes, images = state.probes, state.probes.curvature.images
    assert len(images) == state.data.sizes["train"]  # the whole split
    for images_, labels in state.data.train:  # a few steps away from the initialisation
        loss = F.cross_entropy(state.model(images_), labels)
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
    found = {m.tag: m.value.item() for m in probes.measure(3) if m.tag.startswith("sharpness/")}

    reference = copy.deepcopy(state.model).double()
    weights = {n: p.detach() for n, p in reference.named_parameters()}
    flat = torch.cat([p.reshape(-1) for p in weights.values()])
    all_images, all_labels = images.double(), probes.curvature.labels

    def loss_of(vector):
        params, offset = {}, 0
        for name, p in weights.items():
            params[name], offset = vector[offset:offset + p.numel()].view_as(p), offset + p.numel()
        return F.cross_entropy(torch.func.functional_call(reference, params, (all_images,)), all_labels)

    def hvp(v):
        return torch.func.jvp(torch.func.grad(loss_of), (flat,), (torch.as_tensor(v).reshape(-1),))[1].numpy()

    operator = LinearOperator((flat.numel(), flat.numel()), matvec=hvp, dtype="float64")
    largest = eigsh(operator, k=1, which="LA", tol=1e-4, return_eigenvectors=False)[0]
    # lambda_min as largest - the top eigenvalue of largest I - H: ARPACK's "SA" crawls where the bulk sits near 0.
    shifted = LinearOperator(operator.shape, matvec=lambda v: largest * v.reshape(-1) - hvp(v), dtype="float64")
    smallest = largest - eigsh(shifted, k=1, which="LA", tol=1e-3, return_eigenvectors=False)[0]
    assert found["sharpness/top_eigenvalue"] == pytest.approx(largest, rel=0.03)
    assert found["sharpness/min_eigenvalue"] == pytest.approx(smallest, abs=0.03 * abs(largest))
    assert found["sharpness/stability_limit"] == pytest.approx(2 * 1.9 / 0.1)  # configs/optimizer/sgd.yaml


# --- adaptive optimizers: the preconditioner is the one torch's update divides by ---------------------------
@pytest.mark.parametrize("name, kwargs", [("adam", {}), ("adam", {"amsgrad": True}), ("adamw", {"weight_decay": 0.1}),
                                          ("rmsprop", {}), ("rmsprop", {"centered": True})])
def test_preconditioner_divides_the_update_as_torch_does(name, kwargs):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    images, labels = patterns(20, 5)
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}[name](
        model.parameters(), lr=0.01, **kwargs)
    preconditioner = adaptive_preconditioner(optimizer)
    assert preconditioner.diagonal(model.weight) is None  # no update yet
    for _ in range(3):
        before = model.weight.detach().clone()
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        state = optimizer.state[model.weight]
        # Adam's update is lr m / P (m: its running mean of the gradient), RMSprop's lr g / P.
        push = state["exp_avg"] if name != "rmsprop" else model.weight.grad
        decay = 1 - 0.01 * kwargs.get("weight_decay", 0) if name == "adamw" else 1
        step = before * decay - model.weight.detach()
        assert torch.allclose(step, 0.01 * push / preconditioner.diagonal(model.weight), rtol=1e-4, atol=1e-9)
    assert preconditioner.weight_decay() == 0.0  # AdamW's decay is decoupled; Adam's and RMSprop's default 0
    limit = adam_limit(0.01, 0.9) if name != "rmsprop" else sgd_limit(0.01)
    assert preconditioner.limit() == pytest.approx(limit)


def test_preconditioned_sharpness_is_the_top_eigenvalue_of_p_inverse_h():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    images, labels = patterns(60, 6)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    preconditioner = adaptive_preconditioner(optimizer)
    p = torch.cat([preconditioner.diagonal(q).reshape(-1) for q in model.parameters()]).double()
    hessian = explicit_hessian(model, images, labels, batch=60).double() + 0.05 * torch.eye(len(p), dtype=torch.float64)
    expected = torch.linalg.eigvals(torch.diag(1 / p) @ hessian).real.max().item()
    top = preconditioned_top_eigenvalue(model, CurvatureSet(images, labels, 60), preconditioner, 100, 1e-5)
    assert top.converged and top.largest == pytest.approx(expected, rel=0.01)
    assert adam_limit(0.01, 0.9) == pytest.approx(3.8 / 0.001)


# --- stability limits on a quadratic ---------------------------------------------------------------------
def distance_after(h: float, steps: int = 3000, **sgd) -> float:
    """|x| after torch's SGD ran `steps` steps on f(x) = h x^2 / 2 from x = 1."""
    x = nn.Parameter(torch.ones(1, dtype=torch.float64))
    optimizer = torch.optim.SGD([x], **sgd)
    for _ in range(steps):
        optimizer.zero_grad()
        (h * x.square() / 2).sum().backward()
        optimizer.step()
    return x.abs().item()


@pytest.mark.parametrize("sgd", [{"momentum": 0.0}, {"momentum": 0.9}, {"momentum": 0.5, "dampening": 0.5},
                                 {"momentum": 0.9, "nesterov": True}, {"momentum": 0.3, "nesterov": True},
                                 {"momentum": 0.9, "weight_decay": 0.5}],
                         ids=["plain", "heavy_ball", "dampened", "nesterov", "nesterov_0.3", "weight_decay"])
def test_sgd_converges_just_below_its_stability_limit_and_diverges_just_above(sgd):
    limit = sgd_limit(0.1, sgd["momentum"], sgd.get("nesterov", False), sgd.get("dampening", 0.0),
                      sgd.get("weight_decay", 0.0))
    assert distance_after(0.98 * limit, lr=0.1, **sgd) < 1e-3
    assert distance_after(1.02 * limit, lr=0.1, **sgd) > 1e3


def test_the_nesterov_limit_is_not_the_heavy_ball_one_and_follows_the_schedule():
    assert sgd_limit(0.1, 0.9, nesterov=True) == pytest.approx(13.571, abs=1e-3)  # not 2(1 + 0.9)/0.1 = 38
    assert sgd_limit(0.1) == pytest.approx(20.0) and sgd_limit(0.1, 0.9) == pytest.approx(38.0)
    optimizer = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1, momentum=0.9, nesterov=True)
    limit = sgd_stability_limit(optimizer)
    assert limit() == pytest.approx(13.571, abs=1e-3)
    optimizer.param_groups[0]["lr"] = 0.05  # what a scheduler does
    assert limit() == pytest.approx(2 * 13.571, abs=1e-2)
    assert sgd_stability_limit(torch.optim.Adam([nn.Parameter(torch.ones(1))])) is None
    assert adaptive_preconditioner(optimizer) is None


# --- in the probes and the trainer ---------------------------------------------------------------------------
def test_a_sharpness_probe_logs_both_ends_and_the_limits_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3))
    images, labels = patterns(48, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    probes = Probes(model, (images[:16], labels[:16]), PROBES, last_step=100, preconditioner=adaptive_preconditioner(optimizer),
                    curvature=CurvatureSet(images, labels, 16))
    assert [step for step in range(10) if probes.due(step)] == [0, 3, 6, 9]
    first = {m.tag for m in probes.measure(0)}
    assert {"sharpness/top_eigenvalue", "sharpness/min_eigenvalue"} <= first
    assert "sharpness/preconditioned_eigenvalue" not in first  # before the first update there is no preconditioner
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()
    before = state_of(model)
    found = {m.tag: m.value.item() for m in probes.measure(3) if m.tag.startswith("sharpness/")}
    assert_same_state(before, state_of(model))
    assert set(found) == {"sharpness/top_eigenvalue", "sharpness/min_eigenvalue", "sharpness/preconditioned_eigenvalue",
                          "sharpness/preconditioned_limit"}
    assert found["sharpness/min_eigenvalue"] <= found["sharpness/top_eigenvalue"]
    assert found["sharpness/preconditioned_limit"] == pytest.approx(3.8 / 0.001)
    assert "sharpness/top_eigenvalue" not in {m.tag for m in probes.measure(4)}


def test_a_run_with_sharpness_is_bit_identical_to_one_without_probes(tiny_run):
    common = ["model.batchnorm=true", "model.dropout=0.3", "activation=rrelu", "trainer.deterministic=true",
              "optimizer=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9", "optimizer.nesterov=true"]
    on = tiny_run(*common, "probes.sharpness_every=4", "probes.sharpness_iterations=10", name="on")
    off = tiny_run(*common, "probes.enabled=false", name="off")
    weights_on = load_checkpoint(on.dir / "checkpoints" / "last.pt")["model"]
    weights_off = load_checkpoint(off.dir / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(weights_on[k], weights_off[k]) for k in weights_on)
    assert on.metrics["val_loss"] == off.metrics["val_loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(on.dir), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("sharpness/min_eigenvalue")] == [0, 4, 8]
    assert [e.value for e in events.Scalars("sharpness/stability_limit")] == pytest.approx([(2 + 2 * 0.9) / ((1 + 2 * 0.9) * 0.05)] * 3)


def test_curvature_settings_are_range_checked():
    for override in ("probes.sharpness_tolerance=0", "probes.curvature_examples=1", "probes.sharpness_iterations=1"):
        with pytest.raises(UserError, match=re.escape(override.split("=")[0])):
            validate(compose_config(override))


# --- the finding -----------------------------------------------------------------------------------------------
FACTS = RunFacts(num_classes=10, steps_per_epoch=100, activation="relu", init="kaiming", batchnorm=False,
                 optimizer="sgd", lr=0.1, momentum=0.9, grad_clip=None, status="completed", diverged_step=None)
CFG = validate(compose_config()).findings


def probed(*values, every=100):
    return [(i * every, v) for i, v in enumerate(values)]


def edge(series, facts=FACTS):
    return [f for f in diagnose(series, facts, CFG) if f.kind == "edge_of_stability"]


def test_edge_of_stability_compares_the_sharpness_with_the_logged_limit():
    series = {"sharpness/top_eigenvalue": probed(5.0, 10.0, 13.0), "sharpness/min_eigenvalue": probed(-1.0, -1.0, -1.0),
              "sharpness/stability_limit": probed(13.57, 13.57, 13.57)}  # Nesterov at lr 0.1, beta 0.9
    [finding] = edge(series)
    assert (finding.severity, finding.step, finding.value) == ("info", 200, pytest.approx(13.0 / 13.57))
    assert "Nesterov" in finding.message and "Cohen et al. 2021" in finding.advice
    assert edge({**series, "sharpness/top_eigenvalue": probed(5.0, 10.0, 12.0)}) == []  # 88% < 90%


def test_edge_of_stability_judges_adam_by_its_preconditioned_sharpness():
    adam = replace(FACTS, optimizer="adam", lr=0.001, momentum=0.0)
    series = {"sharpness/top_eigenvalue": probed(50.0, 500.0, 900.0), "sharpness/min_eigenvalue": probed(-1.0, -1.0, -1.0),
              "sharpness/preconditioned_eigenvalue": probed(100.0, 3500.0),
              "sharpness/preconditioned_limit": probed(3800.0, 3800.0)}
    [finding] = edge(series, adam)
    assert (finding.step, finding.value) == (100, pytest.approx(3500 / 3800))
    assert "preconditioned" in finding.message and "Cohen et al. 2022" in finding.advice
    # The raw sharpness has no limit for Adam: however high it is, nothing to say without the preconditioned one.
    assert edge({k: v for k, v in series.items() if "preconditioned" not in k}, adam) == []


def test_edge_of_stability_is_quiet_without_a_limit_and_for_runs_before_training_loss_sharpness():
    assert edge({"sharpness/top_eigenvalue": probed(50.0), "sharpness/min_eigenvalue": probed(-1.0)}) == []
    # An earlier run: the probe batch's top eigenvalue (9-42% high), no min_eigenvalue.
    assert edge({"sharpness/top_eigenvalue": probed(37.0), "sharpness/stability_limit": probed(38.0)}) == []
    assert edge({}) == []
    assert math.isfinite(sgd_limit(1.0))

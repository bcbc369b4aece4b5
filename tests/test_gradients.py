import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.instruments.gradients import (
    gradient_noise_scale,
    gradient_snr,
    per_example_gradients,
    power_iteration,
    stability_limit,
    top_hessian_eigenvalue,
)


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def tiny_convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 3))


def with_running_statistics(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    # A few training forwards move the running statistics away from (0, 1), so that eval mode differs
    # from a BatchNorm that has seen nothing.
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *shape) * 2 + 1)
    return model


def state_of(model: nn.Module) -> dict:
    return {
        "modes": [m.training for m in model.modules()],
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "rng": torch.get_rng_state(),
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["modes"] == before["modes"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k in before["tensors"]:
        assert torch.equal(after["tensors"][k], before["tensors"][k]), k
    for a, b in zip(after["grads"], before["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(after["rng"], before["rng"])


def looped_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    # The reference: one eval-mode backward pass per example, on a copy of the model.
    model = copy.deepcopy(model).eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for image, label in zip(images, labels):
        loss = F.cross_entropy(model(image[None]), label[None])
        rows.append(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
    return {name: torch.stack([row[i] for row in rows]) for i, name in enumerate(names)}


# --- per-example gradients -------------------------------------------------------------------------
@pytest.mark.parametrize("build, shape", [(tiny_mlp, (3, 2, 2)), (tiny_convnet, (1, 4, 4))],
                         ids=["mlp_bn1d_dropout", "convnet_bn2d"])
def test_per_example_gradients_equal_a_loop_of_eval_mode_backward_passes_and_leave_the_model_untouched(build, shape):
    model = with_running_statistics(build(), shape)
    model[-1].eval()  # a mixed-mode model: each module's own mode must come back
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    next(model.parameters()).grad = None  # and one that has none
    images, labels = torch.randn(6, *shape), torch.tensor([0, 1, 2, 0, 1, 2])
    before = state_of(model)

    per_example = per_example_gradients(model, images, labels)

    assert_same_state(before, state_of(model))
    expected = looped_gradients(model, images, labels)
    assert per_example.keys() == expected.keys()
    for name, g in per_example.items():
        assert g.shape == (6, *dict(model.named_parameters())[name].shape)
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-6)


def test_per_example_gradients_skip_frozen_parameters():
    model = with_running_statistics(tiny_mlp(), (3, 2, 2))
    model[1].bias.requires_grad_(False)
    per_example = per_example_gradients(model, torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]))
    assert "1.bias" not in per_example and "1.weight" in per_example


def test_per_example_gradients_refuse_batchnorm_without_running_statistics():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats"):
        per_example_gradients(model, torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))


# --- statistics of per-example gradients ---------------------------------------------------------
def test_gradient_snr_is_the_mean_over_parameters_of_mean_squared_over_unbiased_variance():
    # Parameter 0: [1, 3] -> mean 2, variance 2, SNR 2. Parameter 1: [0, 2] -> mean 1, variance 2, SNR 0.5.
    per_example = torch.tensor([[[1.0, 0.0]], [[3.0, 2.0]]])  # [N=2, 1, 2]
    snr = gradient_snr(per_example)
    assert snr.dtype == torch.float64 and snr.shape == ()
    assert snr.item() == pytest.approx((2.0 + 0.5) / 2)


def test_gradient_snr_leaves_out_parameters_whose_gradient_is_the_same_for_every_example():
    # Columns: [1, 3, 2] (mean 2, variance 1, SNR 4); 0.1 for every example (infinite SNR, even though
    # the float variance of three 0.1s need not be exactly 0); all zeros (undefined). Only the first counts.
    per_example = torch.tensor([[1.0, 0.1, 0.0], [3.0, 0.1, 0.0], [2.0, 0.1, 0.0]])
    assert gradient_snr(per_example).item() == pytest.approx(4.0)
    assert gradient_snr(torch.full((5, 3), 0.1)).isnan()


def test_gradient_noise_scale_is_the_trace_of_the_covariance_over_the_unbiased_squared_mean_gradient():
    # Two layers, N = 2 examples.
    a = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # two parameters, [1, 3] and [0, 2]: means 2, 1; variances 2, 2
    b = torch.tensor([[[4.0]], [[4.0]]])  # one parameter, [4, 4]: mean 4, variance 0
    trace = 2 + 2 + 0
    mean_norm2 = 2**2 + 1**2 + 4**2  # 21
    expected = trace / (mean_norm2 - trace / 2)  # 4 / 19
    scale = gradient_noise_scale({"a": a, "b": b})
    assert scale.dtype == torch.float64
    assert scale.item() == pytest.approx(expected)


def test_gradient_noise_scale_is_infinite_when_the_noise_hides_the_mean_gradient():
    # Mean 0, variance 2: the unbiased |G|^2 = 0 - 2/2 is negative.
    assert gradient_noise_scale({"w": torch.tensor([[1.0], [-1.0]])}).isinf()


# --- sharpness ---------------------------------------------------------------------------------------
def rotated(eigenvalues: list[float]) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=torch.Generator().manual_seed(1),
                                       dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("eigenvalues", [[5.0, 2.0, 1.0, 0.5], [3.0, 1.0, -0.5, -6.0]],
                         ids=["positive", "negative_dominant"])
def test_power_iteration_finds_the_largest_eigenvalue_of_a_symmetric_matrix_not_the_largest_in_magnitude(eigenvalues):
    matrix = rotated(eigenvalues)
    before = torch.get_rng_state()
    eigenvalue = power_iteration(lambda v: matrix @ v, 4, 60, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert eigenvalue.item() == pytest.approx(max(eigenvalues), abs=1e-3)
    assert torch.equal(torch.get_rng_state(), before)


def test_power_iteration_is_reproducible_from_its_generator_and_without_one():
    matrix = torch.diag(torch.tensor([3.0, 2.9, 1.0]))  # slow convergence: the start vector shows
    one = power_iteration(lambda v: matrix @ v, 3, 3, torch.Generator().manual_seed(7))
    two = power_iteration(lambda v: matrix @ v, 3, 3, torch.Generator().manual_seed(7))
    assert torch.equal(one, two)
    assert torch.equal(power_iteration(lambda v: matrix @ v, 3, 3), power_iteration(lambda v: matrix @ v, 3, 3))


def explicit_hessian(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # The full Hessian of the mean cross-entropy, built block by block; BatchNorm updates copies of its buffers.
    names = [n for n, _ in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def loss_of(*params):
        copies = {n: b.clone() for n, b in buffers.items()}
        logits = torch.func.functional_call(model, (dict(zip(names, params)), copies), (images,))
        return F.cross_entropy(logits, labels)

    blocks = torch.autograd.functional.hessian(loss_of, tuple(p.detach() for p in model.parameters()))
    sizes = [p.numel() for p in model.parameters()]
    return torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(sizes))], dim=1)
                      for i in range(len(sizes))])


def test_top_hessian_eigenvalue_matches_the_explicit_hessian_of_a_small_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    images, labels = torch.randn(32, 4) * 2, torch.randint(0, 3, (32,))
    expected = torch.linalg.eigvalsh(explicit_hessian(model, images, labels))[-1].item()

    sharpness = top_hessian_eigenvalue(model, images, labels, 50, torch.Generator().manual_seed(0))
    assert sharpness.shape == ()
    assert sharpness.item() == pytest.approx(expected, rel=0.03)


def test_top_hessian_eigenvalue_is_the_largest_even_where_negative_curvature_dominates():
    # In train mode this BatchNorm net's Hessian has eigenvalues from about -2.3 to 1.5.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 3)).train()
    images, labels = torch.randn(16, 4), torch.randint(0, 3, (16,))
    eigenvalues = torch.linalg.eigvalsh(explicit_hessian(model, images, labels))
    assert -eigenvalues[0] > eigenvalues[-1] > 0  # what makes this case hard

    sharpness = top_hessian_eigenvalue(model, images, labels, 50, torch.Generator().manual_seed(0))
    assert sharpness.item() == pytest.approx(eigenvalues[-1].item(), rel=0.03)


def test_top_hessian_eigenvalue_in_train_mode_leaves_buffers_grads_and_rng_untouched():
    model = with_running_statistics(tiny_mlp(), (3, 2, 2)).train()
    images, labels = torch.randn(8, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    before = state_of(model)
    sharpness = top_hessian_eigenvalue(model, images, labels, 5, torch.Generator().manual_seed(0))
    assert sharpness.isfinite()
    assert_same_state(before, state_of(model))


def test_top_hessian_eigenvalue_runs_inside_no_grad():
    model = with_running_statistics(tiny_convnet(), (1, 4, 4)).eval()
    with torch.no_grad():
        sharpness = top_hessian_eigenvalue(model, torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]), 3)
    assert sharpness.isfinite()


def test_stability_limit_is_two_plus_two_momentum_over_the_learning_rate():
    # approx: 2 * 1.9 / 0.1 is 37.99999999999999 in floating point.
    assert stability_limit(0.1, 0.9) == pytest.approx(38.0, rel=1e-12)
    assert stability_limit(0.01, 0.0) == 200.0


def test_per_example_gradients_of_an_rrelu_network_use_its_evaluation_slope():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.RReLU(0.1, 0.3), nn.Linear(5, 3))
    twin = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.LeakyReLU(0.2), nn.Linear(5, 3))
    twin.load_state_dict(model.state_dict())
    images, labels = torch.randn(4, 1, 2, 3), torch.tensor([0, 1, 2, 0])
    ours, expected = per_example_gradients(model, images, labels), per_example_gradients(twin, images, labels)
    assert all(torch.allclose(ours[name], expected[name]) for name in expected)
    assert "forward" not in vars(model[2])  # the module's own forward is back

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.instruments.gradients import (
    gradient_noise_scale,
    gradient_snr,
    micro_batch_moments,
    moments_of_samples,
    per_example_gradients,
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


# --- statistics of per-example and micro-batch gradients -------------------------------------------
def snr_of(samples: torch.Tensor, batch: int = 1) -> torch.Tensor:
    mean, variance = moments_of_samples(samples)
    return gradient_snr(mean, variance, batch, len(samples))


def test_gradient_snr_subtracts_the_bias_var_over_n_of_the_squared_mean_and_clips_at_zero():
    # Parameter 0: [1, 3] -> mean 2, variance 2: (4 - 2/2) / 2 = 1.5. Parameter 1: [0, 2] -> mean 1,
    # variance 2: 1 - 2/2 = 0. The plug-in mean^2 / variance would say 2 and 0.5.
    snr = snr_of(torch.tensor([[[1.0, 0.0]], [[3.0, 2.0]]]))  # [N=2, 1, 2]
    assert snr.dtype == torch.float64 and snr.shape == ()
    assert snr.item() == pytest.approx((1.5 + 0.0) / 2)
    assert snr_of(torch.tensor([[1.0], [-1.0]])).item() == 0.0  # mean 0: clipped, never negative


def test_gradient_snr_leaves_out_parameters_whose_gradient_is_the_same_for_every_example():
    # Columns: [1, 3, 2] (mean 2, variance 1: 4 - 1/3); 0.1 for every example (infinite SNR, even though
    # the float variance of three 0.1s need not be exactly 0); all zeros (undefined). Only the first counts.
    per_example = torch.tensor([[1.0, 0.1, 0.0], [3.0, 0.1, 0.0], [2.0, 0.1, 0.0]])
    assert snr_of(per_example).item() == pytest.approx(4.0 - 1 / 3)
    assert snr_of(torch.full((5, 3), 0.1)).isnan()


def planted_gradients(count: int, parameters: int = 2000, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Per-example gradients [count, parameters]: half the parameters mean 0, half mean 0.2 (std 1 all):
    a true GSNR of 0 and 0.04, 0.02 on average."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.cat([torch.zeros(parameters // 2), torch.full((parameters // 2,), 0.2)])
    return mean + torch.randn(count, parameters, generator=generator), 0.02


def test_gradient_snr_of_planted_per_example_gradients_is_their_known_snr_where_the_plug_in_is_not():
    samples, truth = planted_gradients(200)
    assert snr_of(samples).item() == pytest.approx(truth, rel=0.1)
    mean, variance = moments_of_samples(samples)
    plug_in = (mean.square() / variance).mean().item()
    assert plug_in > 1.2 * truth  # biased up by about 1/N = 0.005


def test_gradient_snr_from_micro_batches_estimates_the_per_example_snr():
    samples, truth = planted_gradients(1000)
    micro = samples.reshape(50, 20, -1).mean(dim=1)  # 50 micro-batches of 20 examples
    assert snr_of(micro, batch=20).item() == pytest.approx(truth, rel=0.15)


def test_gradient_noise_scale_is_the_trace_of_the_covariance_over_the_unbiased_squared_mean_gradient():
    # Two layers, N = 2 examples.
    a = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # two parameters, [1, 3] and [0, 2]: means 2, 1; variances 2, 2
    b = torch.tensor([[[4.0]], [[4.0]]])  # one parameter, [4, 4]: mean 4, variance 0
    trace = 2 + 2 + 0
    mean_norm2 = 2**2 + 1**2 + 4**2  # 21
    expected = trace / (mean_norm2 - trace / 2)  # 4 / 19
    scale = gradient_noise_scale([moments_of_samples(a), moments_of_samples(b)], batch=1, samples=2)
    assert scale.dtype == torch.float64
    assert scale.item() == pytest.approx(expected)
    # The same samples as means of micro-batches of 8: per-example covariance 8 x theirs
    scale = gradient_noise_scale([moments_of_samples(a), moments_of_samples(b)], batch=8, samples=2)
    assert scale.item() == pytest.approx(8 * expected)


def test_gradient_noise_scale_is_infinite_when_the_noise_hides_the_mean_gradient():
    # Mean 0, variance 2: the unbiased |G|^2 = 0 - 2/2 is negative.
    assert gradient_noise_scale([moments_of_samples(torch.tensor([[1.0], [-1.0]]))], 1, 2).isinf()


def plain_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))


def test_micro_batch_moments_of_single_images_are_those_of_the_per_example_gradients():
    model = plain_mlp()
    images, labels = torch.randn(16, 3, 2, 2), torch.arange(16) % 3
    mean, variance, samples = micro_batch_moments(model, images, labels, batch=1)
    per_example = per_example_gradients(model, images, labels)
    assert samples == 16
    for name, g in per_example.items():
        expected_mean, expected_variance = moments_of_samples(g)
        torch.testing.assert_close(mean[name], expected_mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(variance[name], expected_variance, rtol=1e-4, atol=1e-7)


def test_micro_batch_moments_of_a_batchnorm_net_are_those_of_its_training_steps_and_touch_nothing():
    model = tiny_mlp()  # BatchNorm and dropout: the training gradient, batch statistics and a dropout mask
    model.train()
    images, labels = torch.randn(32, 3, 2, 2), torch.arange(32) % 3
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    mean, variance, samples = micro_batch_moments(model, images, labels, batch=8)
    assert samples == 4 and all(torch.equal(model.state_dict()[k], v) for k, v in buffers.items())
    assert all(p.grad is None for p in model.parameters())
    twin = copy.deepcopy(model)
    torch.manual_seed(3)  # the same dropout masks, drawn in the same order
    steps = []
    for part in range(4):
        twin.zero_grad()
        F.cross_entropy(twin(images[8 * part:8 * part + 8]), labels[8 * part:8 * part + 8]).backward()
        steps.append({name: p.grad.flatten().double().clone() for name, p in twin.named_parameters()})
    for name in mean:
        expected_mean, expected_variance = moments_of_samples(torch.stack([step[name] for step in steps]))
        torch.testing.assert_close(mean[name], expected_mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(variance[name], expected_variance, rtol=1e-4, atol=1e-7)


def test_per_example_gradients_of_an_rrelu_network_use_its_evaluation_slope():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.RReLU(0.1, 0.3), nn.Linear(5, 3))
    twin = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.LeakyReLU(0.2), nn.Linear(5, 3))
    twin.load_state_dict(model.state_dict())
    images, labels = torch.randn(4, 1, 2, 3), torch.tensor([0, 1, 2, 0])
    ours, expected = per_example_gradients(model, images, labels), per_example_gradients(twin, images, labels)
    assert all(torch.allclose(ours[name], expected[name]) for name in expected)
    assert "forward" not in vars(model[2])  # the module's own forward is back

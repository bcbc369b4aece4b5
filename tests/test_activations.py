"""The activations' rows (cnnlab.activations): each closed-form derivative agrees with autograd,
each largest slope with a dense grid, and each density range holds the typical outputs."""

import pytest
import torch
from torch import nn

from cnnlab.activations import ACTIVATIONS


def prelu_per_channel():
    prelu = nn.PReLU(3)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.1, -0.5, 2.0]))  # a negative and a steeper-than-1 slope too
    return prelu


# Every activation at its defaults and at the non-default settings that change its derivative, with the
# supremum of |f'| we expect (the numbers quoted in the docs; the grid test checks the table's own values).
SETTINGS = {
    "relu": (nn.ReLU, 1.0),
    "leaky_relu": (nn.LeakyReLU, 1.0),
    "leaky_relu(0.2)": (lambda: nn.LeakyReLU(0.2), 1.0),
    "leaky_relu(1.5)": (lambda: nn.LeakyReLU(1.5), 1.5),
    "prelu": (nn.PReLU, 1.0),
    "prelu(per channel)": (prelu_per_channel, 2.0),
    "rrelu": (nn.RReLU, 1.0),
    "rrelu(0.1, 0.5)": (lambda: nn.RReLU(0.1, 0.5), 1.0),
    "elu": (nn.ELU, 1.0),
    "elu(alpha=2)": (lambda: nn.ELU(alpha=2.0), 2.0),
    "selu": (nn.SELU, 1.7581),
    "celu": (nn.CELU, 1.0),
    "celu(alpha=2)": (lambda: nn.CELU(alpha=2.0), 1.0),
    "gelu": (nn.GELU, 1.1289),
    "gelu(tanh)": (lambda: nn.GELU(approximate="tanh"), 1.1290),
    "silu": (nn.SiLU, 1.0998),
    "mish": (nn.Mish, 1.0885),
    "softplus": (nn.Softplus, 1.0),
    "softplus(beta=2)": (lambda: nn.Softplus(beta=2.0), 1.0),
    "softplus(beta=2, threshold=1)": (lambda: nn.Softplus(beta=2.0, threshold=1.0), 1.0),  # the linear part shows
    "sigmoid": (nn.Sigmoid, 0.25),
    "tanh": (nn.Tanh, 1.0),
}


def autograd_derivative(module, x):
    x = x.detach().clone().requires_grad_()
    (slope,) = torch.autograd.grad(module(x).sum(), x)  # elementwise, so the sum's gradient is f'(x)
    return slope


def row_of(setting: str):
    """`leaky_relu(0.2)` -> the leaky_relu row."""
    return ACTIVATIONS[setting.split("(")[0]]


def test_every_activation_has_derivative_cases_of_its_own_module():
    assert {setting.split("(")[0] for setting in SETTINGS} == set(ACTIVATIONS)
    for setting, (make, _) in SETTINGS.items():
        assert type(make()) is getattr(nn, row_of(setting).module), setting


@pytest.mark.parametrize("setting", SETTINGS)
def test_closed_form_derivative_equals_autograds(setting):
    module = SETTINGS[setting][0]().eval()  # RReLU: evaluation's fixed slope
    large = torch.tensor([1e4, 1e3, 100.0, 50.0, 30.0, 10.5, 10.0, 0.5000001])
    grid = torch.cat([torch.linspace(-30, 30, 6001), large, -large, torch.zeros(1)])  # 0: the kink
    x = grid.view(-1, 1, 1, 1).expand(-1, 3, 2, 1).contiguous()  # [N, C, H, W]: every channel sees the grid
    with torch.no_grad():
        ours = row_of(setting).derivative(x, module)
    assert not ours.requires_grad and ours.dtype == torch.float32 and ours.shape == x.shape
    torch.testing.assert_close(ours, autograd_derivative(module, x), atol=1e-5, rtol=1e-4)
    x = grid.view(-1, 1).expand(-1, 3)  # and on [N, C]
    torch.testing.assert_close(row_of(setting).derivative(x, module), autograd_derivative(module, x),
                               atol=1e-5, rtol=1e-4)


def test_prelu_derivative_uses_each_channels_own_slope():
    prelu = prelu_per_channel()
    x = torch.tensor([-2.0, 0.0, 3.0]).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    slope = ACTIVATIONS["prelu"].derivative(x, prelu)
    assert slope[0, :, 0, 0].tolist() == pytest.approx([0.1, -0.5, 2.0])  # x < 0: the channel's slope
    assert slope[1, :, 1, 1].tolist() == pytest.approx([0.1, -0.5, 2.0])  # x = 0 too, as in autograd
    assert slope[2].eq(1).all()


def test_softplus_derivative_is_exactly_one_past_the_threshold():
    softplus = nn.Softplus(beta=2.0, threshold=1.0)
    slope = ACTIVATIONS["softplus"].derivative(torch.tensor([0.5, 0.51, 3.0]), softplus)
    assert slope.tolist() == pytest.approx([torch.sigmoid(torch.tensor(1.0)).item(), 1.0, 1.0])


@pytest.mark.parametrize("setting", SETTINGS)
def test_max_derivative_is_the_largest_slope_on_a_dense_grid(setting):
    make, documented = SETTINGS[setting]
    module = make().eval()
    grid = torch.arange(-30_000, 30_001).view(-1, 1).expand(-1, 3) * 1e-3  # [-30, 30] in steps of 0.001
    largest = autograd_derivative(module, grid).abs().max().item()
    assert float(row_of(setting).max_derivative(module)) == pytest.approx(largest, rel=1e-5)  # the peaks are flat
    assert float(row_of(setting).max_derivative(module)) == pytest.approx(documented, abs=1e-4)


def test_prelu_max_derivative_follows_the_learned_slopes_without_reading_them_back():
    prelu = prelu_per_channel()
    largest = ACTIVATIONS["prelu"].max_derivative(prelu)
    assert isinstance(largest, torch.Tensor) and largest.device == prelu.weight.device
    with torch.no_grad():
        prelu.weight.fill_(-3.0)
    assert float(ACTIVATIONS["prelu"].max_derivative(prelu)) == 3.0


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_density_range_holds_typical_outputs_including_the_negative_ones(name):
    row = ACTIVATIONS[name]
    low, high = row.density_range
    assert low < high
    outputs = getattr(nn, row.module)().eval()(torch.linspace(-8, 8, 1601))
    assert low <= outputs.min().item() and outputs.max().item() <= high
    if row.bounds is not None:
        assert row.density_range == row.bounds


@pytest.mark.parametrize("setting", SETTINGS)
def test_slope_rises_is_set_exactly_where_the_largest_input_decides_death(setting):
    """slope_rises: |f'| rises with x until it first reaches 1% of its largest and stays at least that
    beyond (then the probes judge a unit by its largest input). Checked on a dense grid, with autograd."""
    module = SETTINGS[setting][0]().eval()
    grid = torch.arange(-30_000, 30_001).view(-1, 1).expand(-1, 3) * 1e-3
    slope = autograd_derivative(module, grid)[:, 0].abs()
    alive = slope >= 0.01 * float(row_of(setting).max_derivative(module))
    first = int(alive.nonzero()[0])
    holds = bool(alive[first:].all()) and bool((slope[1:first + 1] >= slope[:first]).all())
    leaky = row_of(setting).module in ("LeakyReLU", "PReLU", "RReLU")  # never dead by the slope: not judged by it
    assert row_of(setting).slope_rises == (holds and not leaky and row_of(setting).bounds is None), setting

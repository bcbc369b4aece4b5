import math

import pytest
import torch
from torch import nn

from cnnlab.config import SCHEMAS, validate
from cnnlab.errors import UserError
from cnnlab.train.models import ACTIVATION_MODULES, ACTIVATIONS, ACTIVATIONS_BY_MODULE, build_model, dead_units
from tests.helpers import TINY_CONVNET, TINY_MLP, compose_config


def small_model(model="mlp", activation="relu", *overrides, input_shape=(1, 8, 8), num_classes=3):
    """The tiny run's MLP or ConvNet (tests/helpers.py) with OVERRIDES, for 8x8 grey images."""
    tiny = {"mlp": TINY_MLP, "convnet": TINY_CONVNET}[model]
    run = validate(compose_config(*tiny, f"activation={activation}", *overrides))
    return build_model(run.model, run.activation, input_shape, num_classes)


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
@pytest.mark.parametrize("activation", sorted(SCHEMAS["activation"]))
def test_every_model_activation_batchnorm_combination_trains_a_step(model_name, activation, batchnorm):
    torch.manual_seed(0)
    model = small_model(model_name, activation, f"model.batchnorm={batchnorm}", "model.dropout=0.1")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, labels = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert model(images).shape == (5, 3)
    assert any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in model.modules()) == batchnorm


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_each_activation_is_its_own_named_module(model_name):
    deeper = {"mlp": ["model.hidden=[16,12]"], "convnet": ["model.channels=[4,6]"]}  # two layers of each kind
    model = small_model(model_name, "prelu", "activation.per_channel=true", *deeper[model_name])
    activations = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.PReLU)]
    expected = {"mlp": [("act1", 16), ("act2", 12)], "convnet": [("act1", 4), ("act2", 6), ("act_fc", 8)]}
    assert [(name, m.weight.numel()) for name, m in activations] == expected[model_name]
    assert len({id(m) for _, m in activations}) == len(activations)


def test_shared_prelu_has_one_slope_with_the_initial_value():
    model = small_model("mlp", "prelu", "activation.init=0.1")
    slopes = [m.weight for m in model.modules() if isinstance(m, nn.PReLU)]
    assert [s.numel() for s in slopes] == [1]  # one slope for the layer's 32 units
    assert all(torch.allclose(s, torch.tensor([0.1])) for s in slopes)


def test_activation_parameters_reach_the_modules():
    model = small_model("mlp", "leaky_relu", "activation.negative_slope=0.2")
    assert all(m.negative_slope == 0.2 for m in model.modules() if isinstance(m, nn.LeakyReLU))
    model = small_model("mlp", "elu", "activation.alpha=0.5")
    assert all(m.alpha == 0.5 for m in model.modules() if isinstance(m, nn.ELU))
    model = small_model("mlp", "gelu", "activation.approximate=tanh")
    assert all(m.approximate == "tanh" for m in model.modules() if isinstance(m, nn.GELU))


def test_activation_table_maps_names_to_torch_modules():
    assert ACTIVATIONS["relu"].module is nn.ReLU and ACTIVATIONS["selu"].module is nn.SELU
    assert ACTIVATIONS["silu"].module is nn.SiLU


def test_batchnorm_sits_between_the_weight_layer_and_the_activation():
    names = [name for name, _ in small_model("convnet", "relu", "model.batchnorm=true").named_children()]
    assert names[:4] == ["conv1", "bn1", "act1", "pool1"]
    assert names[-4:] == ["fc", "bn_fc", "act_fc", "classifier"]
    names = [name for name, _ in small_model("mlp", "relu", "model.batchnorm=true", "model.dropout=0.2").named_children()]
    assert names[:5] == ["flatten", "fc1", "bn1", "act1", "drop1"]


def test_too_many_conv_blocks_for_the_image_size_is_a_user_error():
    with pytest.raises(UserError, match=r"model\.channels"):
        small_model("convnet", "relu", "model.channels=[4,4,4,4]", input_shape=(1, 8, 8))


def weight_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


@pytest.mark.parametrize("activation, gain", [("relu", math.sqrt(2)), ("tanh", 5 / 3), ("selu", 1.0),
                                              ("leaky_relu", math.sqrt(2 / (1 + 0.01**2)))])
def test_kaiming_init_scales_by_fan_in_and_the_activation_gain(activation, gain):
    torch.manual_seed(0)
    model = small_model("mlp", activation, "model.init=kaiming", "model.hidden=[400,400]", input_shape=(1, 20, 20))
    hidden, last = weight_layers(model)[1], weight_layers(model)[-1]
    assert hidden.weight.std().item() == pytest.approx(gain / math.sqrt(400), rel=0.03)
    assert last.weight.std().item() == pytest.approx(1 / math.sqrt(400), rel=0.1)  # classifier: linear gain
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in weight_layers(model))


def test_lecun_init_has_variance_one_over_fan_in_whatever_the_activation():
    torch.manual_seed(0)
    model = small_model("mlp", "relu", "model.init=lecun", "model.hidden=[400,400]", input_shape=(1, 20, 20))
    assert weight_layers(model)[1].weight.std().item() == pytest.approx(1 / 20, rel=0.03)


def test_xavier_init_is_uniform_within_the_glorot_bound():
    torch.manual_seed(0)
    model = small_model("mlp", "tanh", "model.init=xavier", "model.hidden=[300,200]", input_shape=(1, 20, 20))
    weight = weight_layers(model)[1].weight  # 300 -> 200
    bound = 5 / 3 * math.sqrt(6 / (300 + 200))
    assert weight.abs().max().item() <= bound
    assert weight.abs().max().item() > 0.95 * bound


def test_orthogonal_init_gives_orthogonal_rows_times_the_gain():
    model = small_model("mlp", "relu", "model.init=orthogonal", "model.hidden=[32,16]", input_shape=(1, 8, 8))
    weight = weight_layers(model)[1].weight  # 16 x 32: orthonormal rows scaled by sqrt(2)
    assert torch.allclose(weight @ weight.T, 2 * torch.eye(16), atol=1e-5)


def test_default_init_is_pytorchs_own():
    torch.manual_seed(3)
    ours = small_model("mlp", "relu", "model.init=default")
    torch.manual_seed(3)
    again = small_model("mlp", "relu", "model.init=default")
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), again.parameters()))
    assert any(torch.count_nonzero(layer.bias) > 0 for layer in weight_layers(ours))


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_each_architecture_can_overfit_a_small_batch(model_name, batchnorm):
    torch.manual_seed(0)
    model = small_model(model_name, "relu", f"model.batchnorm={batchnorm}", num_classes=4)
    images, labels = torch.randn(16, 1, 8, 8), torch.arange(16) % 4  # random labels: only memorising works
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert (logits.argmax(1) == labels).all()
    assert nn.functional.cross_entropy(logits, labels).item() < 0.1


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


def row_of(module):
    return ACTIVATIONS_BY_MODULE[type(module)]


def test_every_activation_has_derivative_cases():
    assert {type(make()) for make, _ in SETTINGS.values()} == set(ACTIVATION_MODULES)


@pytest.mark.parametrize("setting", SETTINGS)
def test_closed_form_derivative_equals_autograds(setting):
    module = SETTINGS[setting][0]().eval()  # RReLU: evaluation's fixed slope
    large = torch.tensor([1e4, 1e3, 100.0, 50.0, 30.0, 10.5, 10.0, 0.5000001])
    grid = torch.cat([torch.linspace(-30, 30, 6001), large, -large, torch.zeros(1)])  # 0: the kink
    x = grid.view(-1, 1, 1, 1).expand(-1, 3, 2, 1).contiguous()  # [N, C, H, W]: every channel sees the grid
    with torch.no_grad():
        ours = row_of(module).derivative(x, module)
    assert not ours.requires_grad and ours.dtype == torch.float32 and ours.shape == x.shape
    torch.testing.assert_close(ours, autograd_derivative(module, x), atol=1e-5, rtol=1e-4)
    x = grid.view(-1, 1).expand(-1, 3)  # and on [N, C]
    torch.testing.assert_close(row_of(module).derivative(x, module), autograd_derivative(module, x),
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
    assert float(row_of(module).max_derivative(module)) == pytest.approx(largest, rel=1e-5)  # the peaks are flat
    assert float(row_of(module).max_derivative(module)) == pytest.approx(documented, abs=1e-4)


def test_prelu_max_derivative_follows_the_learned_slopes_without_reading_them_back():
    prelu = prelu_per_channel()
    largest = ACTIVATIONS["prelu"].max_derivative(prelu)
    assert isinstance(largest, torch.Tensor) and largest.device == prelu.weight.device
    with torch.no_grad():
        prelu.weight.fill_(-3.0)
    assert float(ACTIVATIONS["prelu"].max_derivative(prelu)) == 3.0


def test_relu_unit_is_dead_when_never_positive_over_the_batch():
    pre = torch.tensor([[-1.0, -2.0, 0.0],
                        [-0.5, 3.0, 0.0],
                        [-4.0, -1.0, 0.0]])  # unit 0 always negative, unit 1 positive once, unit 2 always 0
    assert dead_units(pre, nn.ReLU()).tolist() == [True, False, True]


def test_saturated_sigmoid_and_tanh_units_are_dead():
    pre = torch.tensor([[-11.0, -12.0, 15.0],
                        [-20.0, 0.1, 11.0]])
    assert dead_units(pre, nn.Sigmoid()).tolist() == [True, False, True]  # s(1 - s) < 0.0025 past |x| = 6
    pre = torch.tensor([[-4.0, 3.5, -0.2],
                        [-5.0, 2.0, 4.0]])
    assert dead_units(pre, nn.Tanh()).tolist() == [True, False, False]  # 1 - tanh^2 < 0.01 past |x| = 3


@pytest.mark.parametrize("module", [nn.LeakyReLU(), prelu_per_channel(), nn.PReLU(), nn.RReLU()],
                         ids=["leaky_relu", "prelu(per channel)", "prelu", "rrelu"])
def test_leaky_units_never_die_even_on_very_negative_inputs(module):
    pre = torch.full((4, 3, 2, 2), -1e3)
    assert not dead_units(pre, module).any()  # leaky's 0.01 is not below 0.01 * 1: alive by a hair


def test_prelu_unit_dies_once_its_learned_slope_shrinks_below_a_hundredth():
    prelu = prelu_per_channel()
    with torch.no_grad():
        prelu.weight[0] = 0.005
    assert dead_units(torch.full((4, 3), -1.0), prelu).tolist() == [True, False, False]


def test_exponential_units_die_far_enough_below_zero():
    # ELU's slope alpha*exp(x) falls below 1% of alpha past x = ln(0.01) = -4.6: exp(-5) = 0.0067.
    pre = torch.tensor([[-5.0, -4.0, -30.0],
                        [-6.0, -50.0, 0.5]])
    assert dead_units(pre, nn.ELU()).tolist() == [True, False, False]
    assert dead_units(pre, nn.ELU(alpha=2.0)).tolist() == [True, False, False]  # the 1% scales with alpha
    assert dead_units(pre, nn.SELU()).tolist() == [True, False, False]
    assert dead_units(pre, nn.CELU()).tolist() == [True, False, False]
    assert dead_units(pre, nn.Softplus()).tolist() == [True, False, False]  # sigmoid(x) < 0.01 past -4.6
    assert dead_units(pre, nn.GELU()).tolist() == [True, True, False]  # Phi(x) + x phi(x) vanishes fast


def test_conv_channel_is_dead_only_if_every_example_and_position_is():
    pre = -torch.rand(3, 2, 4, 4)  # ReLU: all dead...
    pre[2, 1, 3, 0] = 0.5  # ...but for one position of one example in channel 1
    assert dead_units(pre, nn.ReLU()).tolist() == [True, False]
    assert dead_units(pre, nn.ReLU()).dtype == torch.bool


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_density_range_holds_typical_outputs_including_the_negative_ones(name):
    row = ACTIVATIONS[name]
    low, high = row.density_range
    assert low < high
    outputs = row.module().eval()(torch.linspace(-8, 8, 1601))
    assert low <= outputs.min().item() and outputs.max().item() <= high
    if row.bounds is not None:
        assert row.density_range == row.bounds

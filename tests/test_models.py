import math

import pytest
import torch
from torch import nn

from cnnlab.activations import ACTIVATIONS
from cnnlab.config import SCHEMAS, validate
from cnnlab.errors import UserError
from cnnlab.train.models import build_model, module_class
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


def test_activation_rows_name_their_torch_modules():
    assert module_class(ACTIVATIONS["relu"]) is nn.ReLU and module_class(ACTIVATIONS["selu"]) is nn.SELU
    assert module_class(ACTIVATIONS["silu"]) is nn.SiLU


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

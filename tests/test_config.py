from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cnnlab.config import MAX_SEED, SCHEMAS, MLPConfig, RunConfig, check_values, config_dir, validate
from cnnlab.datasets import ImageFolderConfig
from cnnlab.errors import UserError
from tests.helpers import compose_config


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))


def test_every_schema_option_has_a_yaml_file_and_every_yaml_file_a_schema():
    for group, schemas in SCHEMAS.items():
        assert options(group) == sorted(schemas), group


def test_builders_know_exactly_the_options_the_configs_offer():
    """Datasets and activations are rows with their schemas: tests/test_tables.py keeps those complete."""
    from cnnlab.config import INIT_SCHEMES
    from cnnlab.train.models import INITIALISERS, MODELS
    from cnnlab.train.optim import OPTIMIZERS, SCHEDULERS

    assert sorted(MODELS) == options("model")
    assert sorted(OPTIMIZERS) == options("optimizer")
    assert sorted(SCHEDULERS) == options("scheduler")
    assert sorted(INITIALISERS) == sorted(INIT_SCHEMES)


@pytest.mark.parametrize("group", sorted(SCHEMAS))
def test_every_option_of_every_group_composes_and_validates(group, tmp_path):
    for option in options(group):
        overrides = [f"{group}={option}"]
        if option == "imagefolder":
            overrides.append(f"dataset.path={tmp_path}")
        run = validate(compose_config(*overrides))
        assert isinstance(run, RunConfig)
        assert getattr(run, group).name == option


def test_defaults_are_mnist_mlp_relu_adam():
    run = validate(compose_config())
    assert (run.dataset.name, run.model.name, run.activation.name, run.optimizer.name, run.scheduler.name) == (
        "mnist", "mlp", "relu", "adam", "none")
    assert isinstance(run.model, MLPConfig) and list(run.model.hidden) == [256, 128]
    assert run.dataset.root == "data" and run.dataset.download is True
    assert run.trainer.grad_clip is None


def test_overrides_arrive_typed():
    run = validate(compose_config("optimizer.lr=0.5", "model.hidden=[8,4]", "trainer.grad_clip=1", "trainer.epochs=3"))
    assert run.optimizer.lr == 0.5 and list(run.model.hidden) == [8, 4]
    assert run.trainer.grad_clip == 1.0 and isinstance(run.trainer.grad_clip, float)
    assert run.trainer.epochs == 3


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["optimizer.lr=0"], "optimizer.lr"),
        (["optimizer.lr=-0.1"], "optimizer.lr"),
        (["optimizer.lr=abc"], "optimizer.lr"),
        (["trainer.epochs=0"], "trainer.epochs"),
        (["trainer.batch_size=0"], "trainer.batch_size"),
        (["trainer.log_every=0"], "trainer.log_every"),
        (["trainer.grad_clip=0"], "trainer.grad_clip"),
        (["trainer.device=gpu"], "trainer.device"),
        (["trainer.epochs=1.5"], "trainer.epochs"),
        (["dataset.val_fraction=0"], "dataset.val_fraction"),
        (["dataset.val_fraction=1"], "dataset.val_fraction"),
        (["model.dropout=1.0"], "model.dropout"),
        (["model.dropout=-0.1"], "model.dropout"),
        (["model.init=glorot"], "model.init"),
        (["model.hidden=[8,x]"], "model.hidden"),
        (["model=convnet", "model.channels=[]"], "model.channels"),
        (["activation=leaky_relu", "activation.negative_slope=-1"], "activation.negative_slope"),
        (["activation=rrelu", "activation.lower=0.5", "activation.upper=0.1"], "activation.lower"),
        (["activation=gelu", "activation.approximate=fast"], "activation.approximate"),
        (["optimizer=sgd", "optimizer.momentum=1.5"], "optimizer.momentum"),
        (["optimizer=adam", "optimizer.betas=[0.9]"], "optimizer.betas"),
        (["scheduler=onecycle", "scheduler.pct_start=0"], "scheduler.pct_start"),
        (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size"),
        (["probes.every=0"], "probes.every"),
        (["probes.bins=1"], "probes.bins"),
        (["probes.batch_size=0"], "probes.batch_size"),
        (["probes.mode=test"], "probes.mode"),
        (["+trainer.epoch=3"], "trainer.epoch"),
        (["+model.width=3"], "model.width"),
        (["+foo=1"], "foo"),
        (["activation.name=swish"], "activation"),
        (["model=convnet", "dataset.name=svhn"], "dataset"),  # no row: refused by name, not a KeyError
        (["trainer.seed=18446744073709551616"], "trainer.seed"),  # 2**64: torch refuses it
        (["trainer.seed=-1"], "trainer.seed"),
        (["dataset.split_seed=18446744073709551616"], "dataset.split_seed"),
        (["model.hidden=[[1,2]]"], "model.hidden"),
        (["optimizer=adam", "optimizer.betas=[0.9,[0.99]]"], "optimizer.betas"),
        (["model=convnet", "model.channels=[4,{a:1}]"], "model.channels"),
        (["optimizer.lr=inf"], "optimizer.lr"),
        (["optimizer.lr=nan"], "optimizer.lr"),
        (["trainer.grad_clip=inf"], "trainer.grad_clip"),
        (["optimizer=adam", "optimizer.betas=[0.9,nan]"], "optimizer.betas"),
        (["model=convnet", "model.channels=[8,8,8,8,8,8]"], "model.channels"),  # on MNIST's 28x28 images
        (["model=convnet", "dataset=cifar10", "model.channels=[4,4,4,4,4,4]"], "model.channels"),  # 32x32
        (["model=convnet", "dataset=fake", "dataset.image_size=1", "model.channels=[4]"], "dataset.image_size"),
    ],
)
def test_impossible_values_are_user_errors_that_name_the_setting(overrides, names):
    with pytest.raises(UserError, match=names.replace(".", r"\.")):
        validate(compose_config(*overrides))


def test_unknown_key_error_lists_the_valid_settings():
    with pytest.raises(UserError) as error:
        validate(compose_config("+trainer.epoch=3"))
    assert "epochs" in str(error.value) and "batch_size" in str(error.value)


def test_an_unknown_setting_names_the_valid_settings_and_the_options_that_have_it():
    with pytest.raises(UserError) as error:
        validate(compose_config("+optimizer.momentum=0.5"))
    assert str(error.value) == ("Unknown setting optimizer.momentum. Valid settings of optimizer 'adam': name, lr, "
                                "weight_decay, betas. momentum is a setting of optimizer sgd, rmsprop: choose one with "
                                "optimizer=sgd.")


def test_unknown_option_error_lists_the_choices():
    with pytest.raises(UserError) as error:
        validate(compose_config("activation.name=swish"))
    for choice in SCHEMAS["activation"]:
        assert choice in str(error.value)


def test_missing_value_is_named():
    with pytest.raises(UserError, match=r"dataset\.path"):
        validate(compose_config("dataset=imagefolder"))


def test_imagefolder_path_must_be_a_folder(tmp_path):
    with pytest.raises(UserError, match=r"dataset\.path"):
        validate(compose_config("dataset=imagefolder", f"dataset.path={tmp_path / 'nowhere'}"))
    run = validate(compose_config("dataset=imagefolder", f"dataset.path={tmp_path}"))
    assert isinstance(run.dataset, ImageFolderConfig) and run.dataset.channels == 3


def test_validation_needs_no_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cnnlab.config import validate\n"
        "from tests.helpers import compose_config\n"
        "validate(compose_config('model=convnet', 'activation=prelu'))\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1], check=True)
    assert result.stdout.strip() == "False"


def test_composed_config_is_plain_yaml_without_class_paths():
    text = OmegaConf.to_yaml(compose_config("model=convnet", "activation=prelu", "optimizer=sgd", "scheduler=cosine"))
    assert "_target_" not in text


def test_seeds_may_be_anything_torch_accepts_and_nothing_else():
    import torch

    torch.Generator().manual_seed(MAX_SEED)  # the largest seed torch takes...
    with pytest.raises(ValueError):
        torch.Generator().manual_seed(MAX_SEED + 1)  # ...and the one it does not
    run = validate(compose_config(f"trainer.seed={MAX_SEED}", f"dataset.split_seed={MAX_SEED}", "trainer.epochs=1"))
    assert run.trainer.seed == run.dataset.split_seed == MAX_SEED
    with pytest.raises(UserError, match=r"trainer\.seed.*\[0, 2\*\*64 - 1\]"):
        validate(compose_config(f"trainer.seed={MAX_SEED + 1}"))


def test_every_float_setting_refuses_non_finite_values():
    """Range checks alone would let `inf` through (inf > 0); every float of every option is refused."""
    import typing
    from dataclasses import fields

    checked = 0
    for group, schemas in SCHEMAS.items():
        for option, schema in schemas.items():
            hints = typing.get_type_hints(schema)
            for f in fields(schema):
                if hints[f.name] not in (float, typing.Optional[float]):
                    continue
                extra = [f"dataset.path={Path.cwd()}"] if option == "imagefolder" else []
                with pytest.raises(UserError, match=rf"{group}\.{f.name}=inf: .*finite"):
                    validate(compose_config(f"{group}={option}", *extra, f"{group}.{f.name}=inf"))
                checked += 1
    assert checked >= 15


def test_a_convnet_is_refused_exactly_when_it_would_halve_the_images_to_nothing():
    """The config's check agrees with the model builder's for every image size and depth."""
    from torch import nn

    from cnnlab.train.models import build_convnet

    run = validate(compose_config("dataset=fake", "model=convnet"))
    for size in range(1, 40):
        for blocks in range(1, 7):
            run.dataset.image_size, run.model.channels = size, [2] * blocks
            try:
                build_convnet(run.model, lambda width: nn.ReLU(), (1, size, size), 10)
                builds = True
            except UserError:
                builds = False
            try:
                check_values(run)
                valid = True
            except UserError as error:
                assert "model.channels" in str(error) and "dataset.image_size" in str(error)
                valid = False
            assert valid == builds, (size, blocks)


def test_the_torchvision_datasets_known_image_sizes_bound_the_convnet():
    validate(compose_config("model=convnet", "model.channels=[4,4,4,4]"))  # 28 -> 1
    with pytest.raises(UserError, match=r"28x28 images of dataset mnist.*at most 4 blocks"):
        validate(compose_config("model=convnet", "model.channels=[4,4,4,4,4]"))
    validate(compose_config("model=convnet", "dataset=cifar10", "model.channels=[4,4,4,4,4]"))  # 32 -> 1


UNSET_VARIABLE = ("Invalid setting trainer.device='${oc.env:CNNLAB_UNSET_VARIABLE}': it reads the environment "
                  "variable CNNLAB_UNSET_VARIABLE, which is not set.")
LOOP = "Invalid setting trainer.seed='${trainer.threads}': it refers back to itself through other settings"


@pytest.mark.parametrize("overrides, message", [
    (["trainer.device=${oc.env:CNNLAB_UNSET_VARIABLE}"], UNSET_VARIABLE),
    (["trainer.seed=${trainer.threads}", "trainer.threads=${trainer.seed}"], LOOP),
])
def test_an_interpolation_that_cannot_resolve_names_the_setting_and_why(monkeypatch, overrides, message):
    monkeypatch.delenv("CNNLAB_UNSET_VARIABLE", raising=False)
    with pytest.raises(UserError) as error:
        validate(compose_config(*overrides))
    assert message in str(error.value)


def test_a_setting_may_interpolate_a_setting_of_its_section():
    assert validate(compose_config("trainer.eval_batch_size=${trainer.batch_size}")).trainer.eval_batch_size == 128

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cnnlab.cli import config_dir
from cnnlab.config import SCHEMAS, ImageFolderConfig, MLPConfig, RunConfig, validate
from cnnlab.errors import UserError
from tests.helpers import compose_config


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))


def test_every_schema_option_has_a_yaml_file_and_every_yaml_file_a_schema():
    for group, schemas in SCHEMAS.items():
        assert options(group) == sorted(schemas), group


def test_builders_know_exactly_the_options_the_configs_offer():
    from cnnlab.data import LOADERS
    from cnnlab.config import INIT_SCHEMES
    from cnnlab.models import ACTIVATIONS, INITIALISERS, MODELS
    from cnnlab.optim import OPTIMIZERS, SCHEDULERS

    assert sorted(ACTIVATIONS) == options("activation")
    assert sorted(MODELS) == options("model")
    assert sorted(LOADERS) == options("dataset")
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
    ],
)
def test_impossible_values_are_user_errors_that_name_the_setting(overrides, names):
    with pytest.raises(UserError, match=names.replace(".", r"\.")):
        validate(compose_config(*overrides))


def test_unknown_key_error_lists_the_valid_settings():
    with pytest.raises(UserError) as error:
        validate(compose_config("+trainer.epoch=3"))
    assert "epochs" in str(error.value) and "batch_size" in str(error.value)


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

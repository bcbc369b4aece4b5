"""The tables stay complete: every activation (cnnlab.activations) and every dataset (cnnlab.datasets)
has a filled-in row and a YAML file, and every statistic the probes write has a row of
cnnlab.statistics that some probe configuration writes. (Each activation's derivative is checked
against autograd in tests/test_activations.py, which fails for a row without derivative cases.)"""

from dataclasses import fields

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from cnnlab.activations import ACTIVATIONS, INIT_SOURCES
from cnnlab.config import INIT_SCHEMES, ProbesConfig, config_dir, validate
from cnnlab.datasets import DATASETS
from cnnlab.instruments.probes import Probes
from cnnlab.statistics import HISTOGRAM, IMAGE, LAYER_START, LEVELS, NETWORK, SCALAR, STATISTICS, split_tag
from cnnlab.train.data import LOADERS
from cnnlab.train.models import build_model, module_class
from cnnlab.train.tblog import write_density
from tests.helpers import TINY_CONVNET, compose_config


def yaml_files(group: str) -> list[str]:
    return sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))


def typed_yaml(group: str, name: str, schema: type):
    """configs/GROUP/NAME.yaml checked against `schema`: it sets each setting (`???` where the user
    must), and an unknown key or a wrong type raises."""
    yaml = OmegaConf.load(config_dir() / group / f"{name}.yaml")
    assert yaml.name == name
    assert set(yaml) == {f.name for f in fields(schema)}, f"{name}.yaml and its schema differ"
    return OmegaConf.merge(OmegaConf.structured(schema), yaml)


# --- activations -----------------------------------------------------------------------------------
def test_every_activation_yaml_has_a_row_and_every_row_a_yaml():
    assert sorted(ACTIVATIONS) == yaml_files("activation")


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_activation_row_is_filled_in_and_builds_from_its_yaml(name):
    row = ACTIVATIONS[name]
    for text in (row.module, row.formula, row.output_range, row.settings, row.typical_use):
        assert isinstance(text, str) and text.strip()
    assert row.init in INIT_SOURCES and row.init in INIT_SCHEMES
    assert issubclass(module_class(row), nn.Module)
    low, high = row.density_range
    assert low < high
    assert row.bounds is None or row.bounds[0] < row.bounds[1]
    cfg = OmegaConf.to_object(typed_yaml("activation", name, row.schema))
    module = module_class(row)(**row.kwargs(cfg, 3))  # the settings are the module's arguments
    nonlinearity, slope = row.gain(cfg)
    assert nn.init.calculate_gain(nonlinearity, slope) > 0
    x = torch.linspace(-3, 3, 12).view(4, 3)
    assert row.derivative(x, module.eval()).shape == x.shape
    assert float(row.max_derivative(module)) > 0


# --- datasets ----------------------------------------------------------------------------------------
def test_every_dataset_yaml_has_a_row_and_every_row_a_yaml():
    assert sorted(DATASETS) == yaml_files("dataset")


@pytest.mark.parametrize("name", DATASETS)
def test_every_dataset_row_is_filled_in_and_has_a_loader(name):
    from torchvision import datasets

    row = DATASETS[name]
    assert row.loader in LOADERS
    if row.loader == "torchvision":
        assert issubclass(getattr(datasets, row.torchvision_class), datasets.VisionDataset)
    else:
        assert row.torchvision_class is None
    settings = {f.name for f in fields(row.schema)}
    typed_yaml("dataset", name, row.schema)
    # Known in advance exactly where no setting says it: dataset.image_size, dataset.num_classes, the folder.
    assert (row.image_size is None) == ("image_size" in settings)
    assert (row.classes is None) == ("num_classes" in settings or row.loader == "imagefolder")
    assert row.image_size is None or row.image_size >= 1
    assert row.classes is None or row.classes >= 2


# --- statistics ---------------------------------------------------------------------------------------
ALL_PROBES = ProbesConfig(enabled=True, every=1, batch_size=8, histograms=True, bins=8, mode="train", per_example=4,
                          noise_batch=1, death_examples=8, noise_every=1, sharpness_every=1, sharpness_iterations=2,
                          sharpness_tolerance=1e-3, curvature_examples=8, density=True)
# Between them these write every statistic: PReLU's slopes (and negative_fraction) need a per-channel
# PReLU, saturation a bounded activation.
PROBED = {"prelu": ["activation=prelu", "activation.per_channel=true"], "tanh": ["activation=tanh"]}


class RecordingWriter:
    """Stands in for TensorBoard's SummaryWriter: keeps the tags of the images written to it."""

    def __init__(self):
        self.tags: list[str] = []

    def add_image(self, tag, *args, **kwargs):
        self.tags.append(tag)


def probed_tags(overrides: list[str], run_dir) -> dict[str, str]:
    """Tag -> kind of everything two probes (one after an update) and the density images write."""
    torch.manual_seed(0)
    run = validate(compose_config(*TINY_CONVNET, "model.channels=[4,4]", *overrides))
    model = build_model(run.model, run.activation, (1, 8, 8), 3)
    probes = Probes(model, (torch.randn(8, 1, 8, 8), torch.arange(8) % 3), ALL_PROBES, last_step=1,
                    stability_limit=lambda: 20.0)
    written = {m.tag: m.kind for m in probes.measure(0)}
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    probes.before_update()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter -= 0.01 * parameter.grad
    probes.after_update()
    written |= {m.tag: m.kind for m in probes.measure(1)}
    written |= {m.tag: m.kind for m in probes.on_data()}  # dead units on the data, at epoch ends
    writer = RecordingWriter()
    write_density(writer, run_dir, 1, probes)
    return written | {tag: IMAGE for tag in writer.tags}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, dict[str, str]]:
    return {name: probed_tags(overrides, tmp_path_factory.mktemp(name)) for name, overrides in PROBED.items()}


def test_every_tag_the_probes_write_is_made_from_a_row(written):
    for tags in written.values():
        for tag, kind in tags.items():
            prefix, layer = split_tag(tag)
            assert prefix in STATISTICS, tag
            row = STATISTICS[prefix]
            assert row.kind == kind, tag
            if row.level == NETWORK:
                assert layer in row.parts if row.parts else layer == "", tag
            else:
                assert layer.startswith(LAYER_START[row.level]) or (
                    (prefix, layer) in (("dead_fraction", "all"), ("dead_on_batch", "all"))), tag


def test_every_statistic_is_written_by_some_probe_configuration(written):
    prefixes = {split_tag(tag)[0] for tags in written.values() for tag in tags}
    assert prefixes == set(STATISTICS)


def test_every_statistic_row_has_a_chart_and_a_meaning():
    for prefix, row in STATISTICS.items():
        assert row.chart.strip() and row.meaning.strip(), prefix
        assert row.level in LEVELS and row.kind in (SCALAR, HISTOGRAM, IMAGE), prefix
        assert row.kind == SCALAR or not (row.column or row.blows_up or row.compared), prefix  # those read scalars
    charts = [row.chart for row in STATISTICS.values()]
    assert len(set(charts)) == len(charts)

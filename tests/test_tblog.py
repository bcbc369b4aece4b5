"""What a run writes for TensorBoard, read back by TensorBoard's own reader."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from cnnlab.probes import Measurement, histogram
from cnnlab.tblog import write_probe


def test_a_probe_is_written_as_scalars_and_histograms_under_its_tags(tmp_path):
    measurements = [
        Measurement("scalar", "act_mean/act01_fc", torch.tensor(0.25)),
        Measurement("histogram", "activations/act01_fc", histogram(torch.tensor([0.0, 1.0, 1.0, 3.0]), bins=3)),
        Measurement("histogram", "weights/layer01_fc", histogram(torch.full((5,), 2.0), bins=3)),  # constant
        Measurement("scalar", "dead_fraction/all", torch.tensor(0.5)),
    ]
    with SummaryWriter(str(tmp_path)) as writer:
        scalars = write_probe(writer, 7, measurements)
    assert scalars == {"act_mean/act01_fc": 0.25, "dead_fraction/all": 0.5}
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["act_mean/act01_fc", "dead_fraction/all"]
    assert [(e.step, e.value) for e in events.Scalars("dead_fraction/all")] == [(7, 0.5)]
    (written,) = events.Histograms("activations/act01_fc")
    values = written.histogram_value
    assert written.step == 7
    assert (values.min, values.max, values.num) == (0.0, 3.0, 4)
    assert (values.sum, values.sum_squares) == pytest.approx((5.0, 11.0))
    assert list(values.bucket) == [1, 2, 1]  # [0, 1) [1, 2) [2, 3]
    constant = events.Histograms("weights/layer01_fc")[0].histogram_value
    assert constant.min == constant.max == 2.0 and constant.num == 5


def test_a_run_records_its_hyperparameters_in_its_own_event_files(tiny_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tiny_run("activation=tanh", "trainer.seed=1")
    # no add_hparams sub-run: the only folders are the checkpoints and the density PNGs
    assert sorted(p.name for p in run.dir.iterdir() if p.is_dir()) == ["checkpoints", "density"]
    events = EventAccumulator(str(run.dir))
    events.Reload()
    content = {tag: plugin_data_pb2.HParamsPluginData.FromString(data)
               for tag, data in events.PluginTagToContent("hparams").items()}
    start = content["_hparams_/session_start_info"].session_start_info.hparams
    assert start["activation"].string_value == "tanh" and start["trainer.seed"].number_value == 1
    assert start["model.batchnorm"].bool_value is False and start["optimizer.lr"].number_value == pytest.approx(0.001)
    experiment = content["_hparams_/experiment"].experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"val/acc", "test/acc", "dead_fraction/all"}
    activation_info = next(h for h in experiment.hparam_infos if h.name == "activation")
    assert "selu" in [v.string_value for v in activation_info.domain_discrete.values]  # a categorical filter
    assert content["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
    assert "val/acc" in events.Tags()["scalars"]  # the metric columns read these scalars

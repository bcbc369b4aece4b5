"""What a run writes for TensorBoard, read back by TensorBoard's own reader; the HPARAMS tab as
TensorBoard's hparams plugin computes it for the dashboard."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2
from torch.utils.tensorboard import SummaryWriter

from cnnlab.config import role, validate
from cnnlab.instruments.probes import Measurement, histogram
from cnnlab.train.tblog import DEFINING_HPARAMS, HPARAMS_FILE, flat_hparams, write_hparams_start, write_probe
from cnnlab.train.loop import Diverged, Interrupted, SilentProgress
from cnnlab.train.stops import StopRequest
from tests.helpers import TINY, TINY_MLP, TINY_TRAINER, compose_config

SUCCESS, FAILURE, UNKNOWN = api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_UNKNOWN


def hparams_plugin(logdir):
    """TensorBoard's hparams plugin over the runs under logdir, from its event multiplexer, and a request."""
    from tensorboard import context
    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.base_plugin import TBContext
    from tensorboard.plugins.hparams import backend_context

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = MultiplexerDataProvider(multiplexer, str(logdir))
    return backend_context.Context(TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider)), \
        context.RequestContext()


def session_groups(logdir):
    """The rows of the HPARAMS tab, as for the dashboard's /session_groups request."""
    from tensorboard.plugins.hparams import list_session_groups

    plugin, request = hparams_plugin(logdir)
    everything = api_pb2.ListSessionGroupsRequest(allowed_statuses=api_pb2.Status.values(), slice_size=100)
    return list_session_groups.Handler(request, plugin, "", everything).run().session_groups


def hparams_tab(logdir):
    """(the columns, {run: its session}) of the HPARAMS tab for the runs under logdir, computed by
    TensorBoard's hparams plugin, as for the dashboard's /experiment and /session_groups requests."""
    from tensorboard.plugins.hparams import get_experiment

    plugin, request = hparams_plugin(logdir)
    experiment = get_experiment.Handler(request, plugin, "", api_pb2.GetExperimentRequest(hparams_limit=1000)).run()
    groups = session_groups(logdir)
    assert all(len(group.sessions) == 1 for group in groups)  # one row per run
    return experiment, {group.sessions[0].name: (group.sessions[0], group.hparams) for group in groups}


def status(logdir, run="run"):
    return hparams_tab(logdir)[1][run][0].status


def read_records(path):
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    return [Event.FromString(record) for record in RawEventFileLoader(str(path)).Load()]


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


def test_the_hparams_record_has_typed_values_the_defining_settings_first_and_no_paths_or_switches(tmp_path):
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    run = validate(compose_config("dataset=mnist", *TINY_MLP, *TINY_TRAINER, "model.batchnorm=true"))
    write_hparams_start(tmp_path, run)
    version, *records = read_records(tmp_path / HPARAMS_FILE)
    assert version.file_version == "brain.Event:2"
    content = {value.tag: plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
               for record in records for value in record.summary.value}
    assert list(content) == [metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG]  # no end yet
    infos = content[metadata.EXPERIMENT_TAG].experiment.hparam_infos
    names = [info.name for info in infos]
    assert names[:8] == list(DEFINING_HPARAMS) and names[8:] == sorted(names[8:])
    assert [info.name for info in infos if info.differs] == list(DEFINING_HPARAMS)  # what TensorBoard sorts on
    not_hparams = {"dataset.root", "dataset.download", "trainer.threads", "trainer.device"}  # config.role says so
    assert not_hparams <= set(flat_hparams(run)) and not not_hparams & set(names)
    assert all(role(name).hparam for name in names)
    start = content[metadata.SESSION_START_INFO_TAG].session_start_info.hparams
    assert set(start) == set(names)  # a map: no order
    batchnorm = next(info for info in infos if info.name == "model.batchnorm")
    assert batchnorm.type == api_pb2.DATA_TYPE_BOOL
    assert [v.WhichOneof("kind") for v in batchnorm.domain_discrete.values] == ["bool_value", "bool_value"]
    assert [v.bool_value for v in batchnorm.domain_discrete.values] == [False, True]
    assert start["model.batchnorm"].WhichOneof("kind") == "bool_value" and start["model.batchnorm"].bool_value
    assert start["dataset.augment"].WhichOneof("kind") == "bool_value"
    assert start["optimizer.lr"].number_value == pytest.approx(0.001) and start["dataset"].string_value == "mnist"
    activation = next(info for info in infos if info.name == "activation")
    assert activation.type == api_pb2.DATA_TYPE_STRING
    assert "selu" in [v.string_value for v in activation.domain_discrete.values]  # a filter with every option


def test_the_settings_typed_on_the_command_line_are_the_first_columns_and_name_the_trial(tmp_path):
    for seed in (0, 1):
        run_dir = tmp_path / f"multirun/2026-12-02/14-20-00/{seed}"
        (run_dir / ".hydra").mkdir(parents=True)
        typed = ["activation=elu", "optimizer.lr=0.1", f"trainer.seed={seed}", "dataset.root=/a/long/path",
                 "dataset=mnist", "dataset.val_fraction=0.2"]  # the last two shared by the sweep's jobs: not its names
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {line}\n" for line in typed))
        (run_dir / ".hydra" / "hydra.yaml").write_text(
            "hydra:\n  job:\n    config:\n      override_dirname:\n        exclude_keys: [dataset, dataset.val_fraction]\n")
        run = validate(compose_config("dataset=mnist", *TINY_MLP, *TINY_TRAINER, *typed))
        write_hparams_start(run_dir, run)
    experiment, sessions = hparams_tab(tmp_path)
    names = [info.name for info in experiment.hparam_infos]  # as the dashboard orders them
    assert names[:3] == ["activation", "optimizer.lr", "trainer.seed"]  # within its first five, ticked
    assert [info.name for info in experiment.hparam_infos if info.differs] == names[:3]
    groups = [group.name for group in session_groups(tmp_path)]  # the Trial ID column
    assert sorted(groups) == ["activation=elu,optimizer.lr=0.1,trainer.seed=0", "activation=elu,optimizer.lr=0.1,trainer.seed=1"]
    assert "dataset.root" not in names  # not a hyperparameter: neither a column nor in the name


def test_a_completed_run_is_one_successful_row_with_its_settings_and_metrics(tiny_run):
    run = tiny_run("activation=tanh", "trainer.seed=1")
    # no add_hparams sub-run: the only folders are the checkpoints and the density PNGs
    assert sorted(p.name for p in run.dir.iterdir() if p.is_dir()) == ["checkpoints", "density"]
    experiment, sessions = hparams_tab(run.dir.parent)
    session, hparams = sessions["run"]
    assert session.status == SUCCESS and session.end_time_secs > 0
    assert [info.name for info in experiment.hparam_infos][:8] == list(DEFINING_HPARAMS)  # the dashboard's order
    assert hparams["activation"].string_value == "tanh" and hparams["trainer.seed"].number_value == 1
    assert hparams["model.batchnorm"].WhichOneof("kind") == "bool_value" and not hparams["model.batchnorm"].bool_value
    assert "trainer.device" not in hparams
    metrics = {value.name.tag: value.value for value in session.metric_values}
    assert metrics["val/acc"] == pytest.approx(run.metrics["val_acc"])
    assert metrics["test/acc"] == pytest.approx(run.metrics["test_acc"])


def test_a_diverged_run_is_a_failure(tiny_run, tmp_path):
    assert isinstance(tiny_run("optimizer=sgd", "optimizer.lr=1e10", "trainer.batch_size=100").result.error, Diverged)
    assert status(tmp_path) == FAILURE


def test_an_interrupted_run_is_unknown_until_its_resume_completes_it(tiny_run, tmp_path):
    assert isinstance(tiny_run("trainer.epochs=2", stop=StopRequest(at_step=3)).result.error, Interrupted)
    assert status(tmp_path) == UNKNOWN  # not over: it may resume
    assert tiny_run("trainer.epochs=2", resume=True).metrics["status"] == "completed"
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 3  # the record and one per process
    assert status(tmp_path) == SUCCESS
    texts = findings_texts(tmp_path / "run")
    assert [step for step, _ in texts] == [16]  # once, at the run's end: not also where it was interrupted


def findings_texts(run_dir) -> list[tuple[int, str]]:
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    assert "findings" in events.Tags()["tensors"]  # the tag the README names, not findings/text_summary
    return [(event.step, event.tensor_proto.string_val[0].decode()) for event in events.Tensors("findings")]


def test_findings_are_a_markdown_list_with_the_advice_beneath_each(tmp_path):
    from cnnlab.analysis.findings import Finding
    from cnnlab.train.tblog import write_findings

    found = [Finding("dying_units", "warning", "act01_fc", 400, 0.6, "60% of act01_fc died.", "Try optimizer.lr=0.001."),
             Finding("not_learning", "warning", None, None, None, "The loss | stays at ln 10.", "")]
    with SummaryWriter(str(tmp_path)) as writer:
        write_findings(writer, 7, found)
        write_findings(writer, 8, [])
    texts = dict(findings_texts(tmp_path))
    assert texts[7].splitlines() == [
        "- **warning** `dying_units` in `act01_fc` at step 400: 60% of act01_fc died.  ",
        "  Try optimizer.lr=0.001.",
        "- **warning** `not_learning`: The loss | stays at ln 10."]
    assert texts[8] == "Nothing unusual in the probes."


class BrokenTerminal(SilentProgress):
    def end_epoch(self, epoch, step, summary):
        raise RuntimeError("the terminal went away")


def test_a_completed_run_resumed_for_more_epochs_shows_how_its_last_process_ended(run_cli, tiny_run, tmp_path):
    assert run_cli("train", *TINY, "hydra.run.dir=run")[0] == 0
    assert run_cli("train", "resume=run")[0] == 0  # nothing to do: the record stays as it is
    assert status(tmp_path) == SUCCESS

    with pytest.raises(RuntimeError):  # the success of epoch 1 no longer stands
        tiny_run("trainer.epochs=2", resume=True, progress=BrokenTerminal())
    assert status(tmp_path) == FAILURE

    assert run_cli("train", "resume=run", "trainer.epochs=3")[0] == 0
    _, sessions = hparams_tab(tmp_path)
    session, hparams = sessions["run"]
    assert session.status == SUCCESS and hparams["trainer.epochs"].number_value == 3  # the settings it ended with

"""What goes into TensorBoard beyond plain scalars: probe results, histograms, the chart layout,
the HParams records. It writes what it is given and computes nothing."""

from __future__ import annotations

import os
import threading
import time
import typing
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch
from google.protobuf.struct_pb2 import ListValue, Value
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter

from cnnlab.config import INIT_SCHEMES, SCHEMAS, RunConfig, role
from cnnlab.instruments.probes import Measurement, Probes, activation_row
from cnnlab.rundir import replace_atomically
from cnnlab.statistics import custom_scalars_layout, tag
from cnnlab.status import Status

# --- HParams ----------------------------------------------------------------------------------------
# The metrics the HPARAMS tab shows for each run: the last value of these scalar tags.
HPARAM_METRICS = ("val/acc", "val/loss", "test/acc", "test/loss", "train/loss", tag("dead_fraction", "all"))
# The settings that define a run, which a sweep varies: the first columns of the HPARAMS tab, which
# ticks its first five. TensorBoard lists the hparams marked `differs` first, then the rest, each by name
# (backend_context._sort_and_reduce_to_hparams_limit); so these are marked, and named in that order.
DEFINING_HPARAMS = ("activation", "model", "model.batchnorm", "model.init", "optimizer", "optimizer.lr",
                    "trainer.batch_size", "trainer.seed")
# Text settings with a fixed set of values: the HPARAMS tab filters them by ticking values.
DISCRETE_HPARAMS = {**{group: tuple(options) for group, options in SCHEMAS.items()}, "model.init": INIT_SCHEMES}
# metrics.json's status -> the HPARAMS tab's. An interrupted run has none (Unknown): it may resume.
HPARAM_STATUSES = {Status.COMPLETED: api_pb2.STATUS_SUCCESS, Status.DIVERGED: api_pb2.STATUS_FAILURE,
                   Status.FAILED: api_pb2.STATUS_FAILURE}
# The run's HParams record (settings, metric names, end) lives in an event file of its own, named
# to be read before the training's. TensorBoard keeps the first session start and the first session
# end it reads in a run's folder and ignores later ones (the multiplexer's and the data server's
# readers keep a tag's first summary metadata), so the record holds at most one end, and a resume
# rewrites it.
HPARAMS_FILE = "events.out.tfevents.0000000000.hparams"


# --- the writer's background thread -----------------------------------------------------------------
# SummaryWriter hands events to a thread that writes them. When a write fails there (too many open
# files, a full disk), the thread keeps the error, prints its traceback and ends; later events are
# lost, and the error is raised only by the next write or flush in the run's thread, or never (after
# the last). The run fails with that error instead (cnnlab.train.loop), once, without the traceback.
def writer_error(writer: SummaryWriter | None) -> BaseException | None:
    """The error that ended the writer's background thread, or None while it writes. Missing public
    API: TensorBoard keeps the error on its thread (_AsyncWriterThread.exception) and says nothing."""
    for thread in _writer_threads(writer):
        if thread.exception is not None:
            return thread.exception
    return None


def close_events(writer: SummaryWriter) -> BaseException | None:
    """Close the writer (its last events written); the error that kept events from their file, if any."""
    threads = _writer_threads(writer)  # close() forgets its file writers
    try:
        writer.close()
    except Exception as error:  # the thread's error, raised again, or the last flush's own
        return error
    return next((thread.exception for thread in threads if thread.exception is not None), None)


def _writer_threads(writer: SummaryWriter | None) -> list[_AsyncWriterThread]:
    file_writers = (getattr(writer, "all_writers", None) or {}).values()
    async_writers = [getattr(getattr(w, "event_writer", None), "_async_writer", None) for w in file_writers]
    return [a._worker for a in async_writers if isinstance(getattr(a, "_worker", None), _AsyncWriterThread)]


@contextmanager
def writer_thread_quiet() -> typing.Iterator[None]:
    """While a run lasts, the writer thread's death prints no traceback: the run reports its error."""
    previous = threading.excepthook

    def hook(args) -> None:
        if not isinstance(args.thread, _AsyncWriterThread):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


# --- probes and findings ----------------------------------------------------------------------------
def write_layout(writer: SummaryWriter) -> None:
    """Custom Scalars: the training curves, then every layer of one statistic on one chart."""
    writer.add_custom_scalars(custom_scalars_layout())


def write_probe(writer: SummaryWriter, step: int, measurements: list[Measurement]) -> dict[str, float]:
    """Write one probe's results with a single transfer to the host; returns its scalars by tag."""
    if not measurements:
        return {}
    flat = torch.cat([m.value.detach().reshape(-1).double() for m in measurements]).cpu()  # the one transfer
    values = flat.tolist()  # Python floats at once: indexing the tensor per value costs more than the probe's statistics
    scalars: dict[str, float] = {}
    summary = summary_pb2.Summary()  # every value in one event: an event per value cost 2.7 ms a probe of 40 scalars
    offset = 0
    for m in measurements:
        size = m.value.numel()
        start, offset = offset, offset + size
        if m.kind == "scalar":
            value = values[start] if m.finish is None else float(m.finish(flat[start:offset].view(m.value.shape)))
            summary.value.add(tag=m.tag, simple_value=value)
            scalars[m.tag] = value
        else:
            summary.value.append(_histogram_value(m.tag, values[start:offset]))
    writer.file_writer.add_summary(summary, step)
    return scalars


def write_findings(writer: SummaryWriter, step: int, findings: list) -> None:
    """The findings into TensorBoard's text tab under the tag `findings`: a list, one finding per
    item, which reads at any width (a six-column table squeezed its columns to a letter or two)."""
    from torch.utils.tensorboard.summary import text

    if not findings:
        markdown = "Nothing unusual in the probes."
    else:
        markdown = "\n".join(
            f"- **{f.severity}** `{f.kind}`" + (f" in `{f.layer}`" if f.layer else "")
            + ("" if f.step is None else f" at step {f.step}") + f": {f.message}"
            + (f"  \n  {f.advice}" if f.advice else "") for f in findings)  # the advice reads "Try ..."
    summary = text("findings", markdown)
    summary.value[0].tag = "findings"  # torch's text() appends "/text_summary"; the README names `findings`
    writer._get_file_writer().add_summary(summary, step)


def write_density(writer: SummaryWriter, run_dir: Path, step: int, probes: Probes) -> None:
    """Each activation layer's density figure so far (axes, real probe steps, colour bar): into
    TensorBoard (`activation_density/<act>`, 800 x 450 pixels) and as run_dir/density/<act>.png,
    replaced each time so that the file always shows the whole run."""
    from cnnlab.instruments.density import render_density, write_png

    folder = Path(run_dir) / "density"
    modules = {layer.name: layer.module for layer in probes.activations}
    for name, columns in probes.density_columns().items():
        low, high = activation_row(modules[name]).density_range
        image = render_density(columns, probes.density_steps, low, high, title=f"{name}: output value against probe step")
        writer.add_image(tag("activation_density", name), image, step, dataformats="HWC")
        write_png(folder / f"{name}.png", image)


def _histogram_value(tag: str, values: list[float]) -> summary_pb2.Summary.Value:
    """TensorBoard's histogram of a probe's counts ([min, max, sum, sum of squares, counts...])."""
    from torch.utils.tensorboard.summary import histogram_raw

    low, high, total, squares, *counts = values
    if high > low:
        start, width = low, (high - low) / len(counts)
    else:  # a constant tensor: everything is in the first bucket, centred on the value
        width = max(abs(low), 1.0) * 1e-3
        start = low - width / 2
    return histogram_raw(tag, min=low, max=high, num=int(sum(counts)), sum=total, sum_squares=squares,
                         bucket_limits=[start + width * (i + 1) for i in range(len(counts))],
                         bucket_counts=counts).value[0]


def flat_hparams(run: RunConfig) -> dict[str, bool | str | int | float]:
    """Every setting of the run as one flat dict: `activation` for the chosen option of a group,
    `activation.alpha`, `trainer.seed`... Lists and optional settings become text, so that a column
    keeps one type across runs."""
    values: dict[str, bool | str | int | float] = {}
    for section_name in ("dataset", "model", "activation", "optimizer", "scheduler", "trainer", "probes"):
        section = getattr(run, section_name)
        hints = typing.get_type_hints(type(section))
        for field in fields(section):
            key = section_name if field.name == "name" else f"{section_name}.{field.name}"
            value = getattr(section, field.name)
            optional = type(None) in typing.get_args(hints[field.name])
            values[key] = value if isinstance(value, (bool, int, float, str)) and not optional else str(value)
    return values


def hparam_values(run: RunConfig, first: tuple[str, ...] = DEFINING_HPARAMS) -> dict[str, bool | str | int | float]:
    """The settings the HPARAMS tab shows, in its order: `first`, then the rest by name; none of
    those whose config.role says they are not hyperparameters."""
    values = flat_hparams(run)
    keys = sorted((key for key in values if role(key).hparam), key=lambda key: (key not in first, key))
    return {key: values[key] for key in keys}


def typed_settings(run_dir: Path) -> dict[str, str]:
    """The settings that name the run, key -> value as typed: its command-line overrides
    (.hydra/overrides.yaml) less those every job of its sweep shares (cnnlab leaves them out of the
    job folders' names: hydra.job.config.override_dirname.exclude_keys in .hydra/hydra.yaml), so a
    sweep's swept ones. Empty for a run without the files, or with ones it cannot read."""
    import yaml

    from cnnlab.analysis.runs import read_overrides
    from cnnlab.errors import UserError

    try:
        typed = read_overrides(Path(run_dir))
        hydra = yaml.safe_load((Path(run_dir) / ".hydra" / "hydra.yaml").read_text()) or {}
        shared = hydra["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"] or []
    except UserError:
        return {}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        shared = []  # a single run's record, or one from before cnnlab named jobs: every typed setting
    return {key: value for key, value in typed.items() if key not in shared}


def hparam_info(name: str, value: bool | str | int | float, differs: bool) -> api_pb2.HParamInfo:
    """A column of the HPARAMS tab. Booleans are booleans (torch's hparams() writes them as numbers,
    shown as 0.0000), with the filter [false, true]; a group's column filters on all its options."""
    info = api_pb2.HParamInfo(name=name, differs=differs)
    if isinstance(value, bool):  # before int: a bool is an int
        info.type, options = api_pb2.DATA_TYPE_BOOL, [Value(bool_value=False), Value(bool_value=True)]
    elif isinstance(value, str):
        info.type, options = api_pb2.DATA_TYPE_STRING, [Value(string_value=o) for o in DISCRETE_HPARAMS.get(name, ())]
    else:
        info.type, options = api_pb2.DATA_TYPE_FLOAT64, []
    if options:
        info.domain_discrete.CopyFrom(ListValue(values=options))
    return info


def hparam_value(value: bool | str | int | float) -> Value:
    if isinstance(value, bool):
        return Value(bool_value=value)
    return Value(string_value=value) if isinstance(value, str) else Value(number_value=value)


def write_hparams_start(run_dir: Path, run: RunConfig) -> None:
    """(Re)write the run's HParams record with its settings and no end: the status a resumed run's
    last process recorded goes, since TensorBoard would keep showing it (see HPARAMS_FILE)."""
    # The settings typed on the command line (a sweep's swept ones among them) are the first columns,
    # which TensorBoard shows ticked; DEFINING_HPARAMS when nothing was typed. TensorBoard sorts the
    # columns by `differs`, then by name, so these are the ones marked.
    values = hparam_values(run)
    typed = {key: value for key, value in typed_settings(run_dir).items() if key in values}
    first = tuple(typed) or DEFINING_HPARAMS
    values = hparam_values(run, first)
    experiment = api_pb2.Experiment(hparam_infos=[hparam_info(name, value, name in first) for name, value in values.items()],
                                    metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag))
                                                  for tag in HPARAM_METRICS])
    # The Trial ID column shows the session group's name: the overrides read better than a cut-off folder path.
    start = plugin_data_pb2.SessionStartInfo(hparams={name: hparam_value(value) for name, value in values.items()},
                                             group_name=",".join(f"{key}={value}" for key, value in typed.items()))
    records = [Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString(),
               _hparams_record(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
               _hparams_record(metadata.SESSION_START_INFO_TAG,
                               plugin_data_pb2.HParamsPluginData(session_start_info=start))]

    def write(file) -> None:
        for record in records:
            RecordWriter(file).write(record)

    replace_atomically(Path(run_dir) / HPARAMS_FILE, write)


def write_hparams_end(run_dir: Path, status: Status) -> None:
    """Add the run's end to its HParams record when the run is over (not when it was interrupted).
    Appended, not rewritten: a TensorBoard open meanwhile reads it too (the data server does)."""
    path = Path(run_dir) / HPARAMS_FILE
    if status not in HPARAM_STATUSES or not path.is_file():
        return
    end = plugin_data_pb2.SessionEndInfo(status=HPARAM_STATUSES[status], end_time_secs=time.time())
    record = _hparams_record(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))
    with open(path, "ab") as file:
        RecordWriter(file).write(record)
        file.flush()
        os.fsync(file.fileno())


def _hparams_record(tag: str, data: plugin_data_pb2.HParamsPluginData) -> bytes:
    """One HParams summary in the form TensorBoard's own hparams summaries have."""
    summary_metadata = metadata.create_summary_metadata(data)
    summary_metadata.data_class = summary_pb2.DATA_CLASS_TENSOR
    value = summary_pb2.Summary.Value(tag=tag, metadata=summary_metadata, tensor=metadata.NULL_TENSOR)
    return Event(wall_time=time.time(), step=0, summary=summary_pb2.Summary(value=[value])).SerializeToString()

"""What goes into TensorBoard beyond plain scalars: probe results, histograms, the chart layout,
the HParams records. It writes what it is given and computes nothing."""

from __future__ import annotations

import typing
from dataclasses import fields
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from cnnlab.config import SCHEMAS, RunConfig
from cnnlab.probes import Measurement, Probes

# The metrics the HPARAMS tab shows for each run: the last value of these scalar tags.
HPARAM_METRICS = ("val/acc", "val/loss", "test/acc", "test/loss", "train/loss", "dead_fraction/all")

# Custom-scalars layout: every layer of one statistic on one chart.
LAYOUT = {
    "training": {
        "loss": ["Multiline", [r"(train|val|test)/loss"]],
        "accuracy": ["Multiline", [r"(train|val|test)/acc"]],
    },
    "layers": {
        "dead fraction": ["Multiline", [r"dead_fraction/.*"]],
        "saturation": ["Multiline", [r"saturation/.*"]],
        "activation mean": ["Multiline", [r"act_mean/.*"]],
        "activation std": ["Multiline", [r"act_std/.*"]],
        "gradient norm": ["Multiline", [r"grad_norm/.*"]],
        "update ratio (log10)": ["Multiline", [r"update_ratio/.*"]],
        "PReLU slope": ["Multiline", [r"prelu_slope/.*"]],
        "revived fraction": ["Multiline", [r"revived_fraction/.*"]],
        "effective rank": ["Multiline", [r"effective_rank/.*"]],
        "gradient SNR": ["Multiline", [r"gradient_snr/.*"]],
        "gradient noise scale": ["Multiline", [r"gradient_noise_scale"]],
        "sharpness and stability limit": ["Multiline", [r"sharpness/.*"]],
    },
}


def write_layout(writer: SummaryWriter) -> None:
    writer.add_custom_scalars(LAYOUT)


def write_probe(writer: SummaryWriter, step: int, measurements: list[Measurement]) -> dict[str, float]:
    """Write one probe's results with a single transfer to the host; returns its scalars by tag."""
    if not measurements:
        return {}
    flat = torch.cat([m.value.detach().reshape(-1).double() for m in measurements]).cpu()  # the one transfer
    scalars: dict[str, float] = {}
    offset = 0
    for m in measurements:
        size = m.value.numel()
        part, offset = flat[offset:offset + size], offset + size
        if m.kind == "scalar":
            value = float(part[0]) if m.finish is None else float(m.finish(part.view(m.value.shape)))
            writer.add_scalar(m.tag, value, step)
            scalars[m.tag] = value
        else:
            _write_histogram(writer, m.tag, part.tolist(), step)
    return scalars


def write_findings(writer: SummaryWriter, step: int, findings: list) -> None:
    """The findings as a markdown table in TensorBoard's text tab (tag `findings`)."""
    if not findings:
        writer.add_text("findings", "Nothing unusual in the probes.", step)
        return
    cell = lambda value: str(value).replace("|", "\\|")  # noqa: E731 - markdown tables split on |
    lines = ["| severity | kind | layer | step | what happened | what to try |", "|---|---|---|---|---|---|"]
    lines += [f"| {f.severity} | {f.kind} | {cell(f.layer or '-')} | {cell('-' if f.step is None else f.step)} | "
              f"{cell(f.message)} | {cell(f.advice)} |" for f in findings]
    writer.add_text("findings", "\n".join(lines), step)


def write_density(writer: SummaryWriter, run_dir: Path, step: int, probes: Probes) -> None:
    """Each activation layer's density image so far: into TensorBoard (`activation_density/<act>`)
    and as run_dir/density/<act>.png, replaced each time so that the file always shows the whole run."""
    from cnnlab.density import density_image, write_density_png
    from cnnlab.models import ACTIVATIONS_BY_MODULE

    folder = Path(run_dir) / "density"
    folder.mkdir(exist_ok=True)
    modules = {layer.name: layer.module for layer in probes.activations}
    for name, columns in probes.density_columns().items():
        low, high = ACTIVATIONS_BY_MODULE[type(modules[name])].density_range
        writer.add_image(f"activation_density/{name}", density_image(columns), step, dataformats="HWC")
        write_density_png(folder / f"{name}.png", columns, probes.density_steps, low, high,
                          title=f"{name}: output value against probe step")


def _write_histogram(writer: SummaryWriter, tag: str, values: list[float], step: int) -> None:
    low, high, total, squares, *counts = values
    if high > low:
        start, width = low, (high - low) / len(counts)
    else:  # a constant tensor: everything is in the first bucket, centred on the value
        width = max(abs(low), 1.0) * 1e-3
        start = low - width / 2
    writer.add_histogram_raw(
        tag, min=low, max=high, num=int(sum(counts)), sum=total, sum_squares=squares,
        bucket_limits=[start + width * (i + 1) for i in range(len(counts))], bucket_counts=counts,
        global_step=step,
    )


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


def write_hparams_start(writer: SummaryWriter, run: RunConfig) -> None:
    """The run's hyperparameters into its own event file (add_hparams would open a new run folder)."""
    from torch.utils.tensorboard.summary import hparams

    domains = {group: list(options) for group, options in SCHEMAS.items()}  # categorical filters
    experiment, session_start, _ = hparams(flat_hparams(run), {tag: 0.0 for tag in HPARAM_METRICS},
                                           hparam_domain_discrete=domains)
    writer.file_writer.add_summary(experiment)
    writer.file_writer.add_summary(session_start)


def write_hparams_end(writer: SummaryWriter, status: str) -> None:
    """The run's end, successful or not, in the form torch's hparams() writes it (whose helper
    always says success)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    outcome = api_pb2.STATUS_SUCCESS if status == "completed" else api_pb2.STATUS_FAILURE
    content = plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(status=outcome), version=metadata.PLUGIN_DATA_VERSION)
    plugin_data = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    summary = Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG,
                                           metadata=SummaryMetadata(plugin_data=plugin_data))])
    writer.file_writer.add_summary(summary)

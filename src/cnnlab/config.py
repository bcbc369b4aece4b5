"""The schema of a run: typed dataclasses that the composed YAML config is checked against.

The YAML files under configs/ hold the default values; these classes give each setting its type,
SCHEMAS says which class checks which option, and one checker per section says which values are
valid. The schemas of datasets and activations live in their rows (cnnlab.datasets,
cnnlab.activations). This module must not import torch: config errors answer fast.
"""

from __future__ import annotations

import math
import re
import typing
from pathlib import Path
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException

from cnnlab.activations import (
    ACTIVATIONS,
    ActivationConfig,
    AlphaActivationConfig,
    GELUConfig,
    LeakyReLUConfig,
    RReLUConfig,
    SoftplusConfig,
)
from cnnlab.datasets import DATASETS, DatasetConfig, FakeDatasetConfig, ImageFolderConfig
from cnnlab.environment import environment_settings, hide_environment
from cnnlab.errors import UserError

# The names of models.INITIALISERS, here so that validating a config needs no torch.
INIT_SCHEMES = ("default", "kaiming", "xavier", "lecun", "orthogonal")
# torch.manual_seed and torch.Generator.manual_seed take seeds in [0, 2**64 - 1].
MAX_SEED = 2**64 - 1


# --- model ---------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = MISSING
    batchnorm: bool = MISSING  # BatchNorm between each weight layer and its activation
    dropout: float = MISSING  # dropout probability after hidden fully connected activations
    init: str = MISSING  # weight initialisation scheme, one of INIT_SCHEMES


@dataclass
class MLPConfig(ModelConfig):
    hidden: list[int] = field(default_factory=lambda: MISSING)  # hidden widths, input side first


@dataclass
class ConvNetConfig(ModelConfig):
    channels: list[int] = field(default_factory=lambda: MISSING)  # conv block widths
    fc_hidden: int = MISSING  # width of the hidden fully connected layer


# --- optimizer and schedule ----------------------------------------------------------------------
@dataclass
class OptimizerConfig:
    name: str = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING


@dataclass
class SGDConfig(OptimizerConfig):
    momentum: float = MISSING
    nesterov: bool = MISSING


@dataclass
class AdamConfig(OptimizerConfig):
    betas: list[float] = field(default_factory=lambda: MISSING)


@dataclass
class RMSpropConfig(OptimizerConfig):
    alpha: float = MISSING
    momentum: float = MISSING


@dataclass
class SchedulerConfig:
    name: str = MISSING


@dataclass
class StepSchedulerConfig(SchedulerConfig):
    step_size: int = MISSING  # epochs between decays
    gamma: float = MISSING


@dataclass
class CosineSchedulerConfig(SchedulerConfig):
    min_lr: float = MISSING


@dataclass
class OneCycleSchedulerConfig(SchedulerConfig):
    pct_start: float = MISSING


# --- trainer -------------------------------------------------------------------------------------
@dataclass
class TrainerConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    device: str = MISSING  # auto | cpu | cuda | cuda:N
    seed: int = MISSING
    deterministic: bool = MISSING
    grad_clip: Optional[float] = MISSING  # max global gradient norm; None = no clipping
    log_every: int = MISSING  # optimizer steps between scalar logs
    threads: Optional[int] = MISSING  # CPU threads for torch; None = the cores other processes leave free (train.loop.choose_threads)
    checkpoint_every: int = MISSING  # optimizer steps between mid-epoch checkpoints; 0 = epoch ends only
    on_nonfinite: str = MISSING  # "stop" or "skip": what a NaN/inf loss or gradient does
    channels_last: bool = MISSING  # NHWC memory layout for images and conv weights
    amp: str = MISSING  # mixed precision: "none", "bf16" or "fp16"
    compile: bool = MISSING  # torch.compile the model used for training steps and evaluation


@dataclass
class ProbesConfig:
    enabled: bool = MISSING
    every: int = MISSING  # optimizer steps between probes
    batch_size: int = MISSING  # images in the fixed probe batch
    histograms: bool = MISSING  # write histograms (the costliest part of a probe)
    bins: int = MISSING  # buckets per histogram
    mode: str = MISSING  # "train" or "eval": the mode the network is probed in
    per_example: int = MISSING  # training images for gradient SNR and noise scale; 0 = off
    noise_batch: int = MISSING  # images per micro-batch gradient of the noise measures (1: per-example gradients)
    death_examples: int = MISSING  # training images dead units are judged on, at step 0 and every epoch end
    noise_every: int = MISSING  # optimizer steps between gradient-noise measurements; 0 = off
    sharpness_every: int = MISSING  # optimizer steps between estimates of the training loss's Hessian eigenvalues; 0 = off
    sharpness_iterations: int = MISSING  # most Lanczos steps (Hessian-vector products over the curvature set) per estimate
    sharpness_tolerance: float = MISSING  # Lanczos stops when its extreme eigenvalues are this close, relative
    curvature_examples: int = MISSING  # training images the sharpness is measured on (the whole split when smaller)
    density: bool = MISSING  # activation density images (output value against probe step)


@dataclass
class FindingsConfig:
    """Thresholds of findings.diagnose: the rules that read a run's probe series (README: Findings)."""
    enabled: bool = MISSING
    dead_at_init: float = MISSING  # share of a layer's units dead at step 0 (Lu et al. 2019)
    dying_info: float = MISSING  # rise of a layer's dead fraction from its first probe to its last (Lu et al. 2019)
    dying_warning: float = MISSING  # the rise that makes dying units a warning
    saturation: float = MISSING  # share of a sigmoid/tanh layer's outputs saturated (Glorot & Bengio 2010)
    saturation_probes: int = MISSING  # last probes whose median saturation is compared
    vanishing_ratio: float = MISSING  # first weight layer's grad norm / last hidden layer's (Glorot & Bengio 2010)
    exploding_factor: float = MISSING  # global grad norm / running median of the earlier ones (Pascanu et al. 2013)
    most: float = MISSING  # share of points above which a condition holds on "most" of them
    activation_scale: float = MISSING  # step-0 act_std ratio, deepest / first, outside [1/x, x] (He et al. 2015)
    update_ratio_high: float = MISSING  # log10 update/weight ratio above this: lr too high (Karpathy, CS231n)
    update_ratio_low: float = MISSING  # log10 update/weight ratio below this: lr too low (Karpathy, CS231n)
    not_learning: float = MISSING  # loss within this relative distance of ln(classes) after an epoch (Karpathy 2019)
    edge_of_stability: float = MISSING  # sharpness / the optimizer's stability limit that reports the edge (Cohen et al. 2021; 2022)
    update_ratio_low_adaptive: float = MISSING  # the same for Adam, AdamW, RMSprop, whose step is about lr per weight
    loss_rise: float = MISSING  # relative rise of the training loss that says the lr is too large: no higher lr advised
    learning_well: float = MISSING  # training loss below this x ln(classes): the run learns well, info needs no advice
    rank_collapse: float = MISSING  # last hidden layer's effective rank below this share of its width (Daneshmand et al. 2020)
    gradient_growth: float = MISSING  # first / last hidden layer's grad norm at the first probe above this (Yang et al. 2019)


@dataclass
class RunConfig:
    dataset: DatasetConfig
    model: ModelConfig
    activation: ActivationConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    trainer: TrainerConfig
    probes: ProbesConfig
    findings: FindingsConfig
    # Settings read from environment variables, as written (`trainer.device: ${oc.env:DEVICE}`): what
    # checkpoints keep and messages show instead of the values, which may be secrets.
    from_environment: dict[str, Any] = field(default_factory=dict)


# Which schema checks which option of each config group. The names are the interface: they are
# the YAML file names under configs/ and the keys of the builders' tables. Datasets and activations
# bring their own (cnnlab.datasets.DATASETS, cnnlab.activations.ACTIVATIONS).
SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {name: row.schema for name, row in DATASETS.items()},
    "model": {"mlp": MLPConfig, "convnet": ConvNetConfig},
    "activation": {name: row.schema for name, row in ACTIVATIONS.items()},
    "optimizer": {"sgd": SGDConfig, "adam": AdamConfig, "adamw": AdamConfig, "rmsprop": RMSpropConfig},
    "scheduler": {
        "none": SchedulerConfig,
        "step": StepSchedulerConfig,
        "cosine": CosineSchedulerConfig,
        "onecycle": OneCycleSchedulerConfig,
    },
}
SECTIONS = (*SCHEMAS, "trainer", "probes", "findings")
CLI_KEYS = ("resume",)  # read by the command line, not part of a run's settings


def validate(cfg: DictConfig) -> RunConfig:
    """Check the composed config against the schema; any mistake is a UserError naming the key (and
    showing a setting read from the environment as written, never its value)."""
    written = environment_settings(cfg, SECTIONS)
    try:
        run = _validate(cfg)
    except UserError as error:
        raise UserError(hide_environment(str(error), cfg, written)) from None
    run.from_environment = written
    return run


def _validate(cfg: DictConfig) -> RunConfig:
    unknown = sorted(set(cfg.keys()) - set(SECTIONS) - set(CLI_KEYS))
    if unknown:
        raise unknown_setting("", unknown[0], cfg)
    for section in SECTIONS:
        if section not in cfg or not isinstance(cfg[section], DictConfig):
            raise UserError(f"The config has no '{section}' section; it needs one of: {', '.join(SECTIONS)}.")
    sections: dict[str, Any] = {}
    for group, options in SCHEMAS.items():
        name = cfg[group].get("name")
        if name not in options:
            raise unknown_choice(group, name, options, f" ({group}.name)")
        sections[group] = _typed_section(group, cfg[group], options[name])
    sections["trainer"] = _typed_section("trainer", cfg.trainer, TrainerConfig)
    sections["probes"] = _typed_section("probes", cfg.probes, ProbesConfig)
    sections["findings"] = _typed_section("findings", cfg.findings, FindingsConfig)
    run = RunConfig(**sections)
    check_finite(run)
    check_values(run)
    return run


def unknown_choice(group: str, name: Any, choices, where: str = "") -> UserError:
    """The error for an option of a group that does not exist (`activation=reluu`)."""
    return UserError(f"Unknown {group} '{name}'{where}. Valid choices: {', '.join(choices)}.")


def schema_of(section: str, node: Any) -> type | None:
    """The dataclass that checks a section of the composed config; None for an unknown option."""
    fixed = {"trainer": TrainerConfig, "probes": ProbesConfig, "findings": FindingsConfig}
    if section in fixed:
        return fixed[section]
    name = node.get("name") if isinstance(node, DictConfig) else None
    return SCHEMAS.get(section, {}).get(name) if isinstance(name, str) else None


def unknown_setting(section: str, key: str, node: Any) -> UserError:
    """The error for a setting the config does not have (`model.hiden`, `activation.negative_slope`
    with activation=relu), naming the valid settings of that option and the options that have it.
    node is the section as composed (the whole config for a top-level key), or None if unknown."""
    if not section:
        fixed = [section for section in SECTIONS if section not in SCHEMAS]
        return UserError(f"Unknown top-level setting {key}. Valid ones: the groups {', '.join(SCHEMAS)} (GROUP=OPTION), "
                         f"the sections {', '.join(fixed)} (SECTION.KEY=VALUE), and {', '.join(CLI_KEYS)}.")
    schema = schema_of(section, node)
    if schema is not None:
        valid = [f.name for f in fields(schema)]
    else:
        valid = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    name = node.get("name") if isinstance(node, DictConfig) else None
    option = f"{section} '{name}'" if name is not None else section
    message = f"Unknown setting {section}.{key}."
    if valid:
        message += f" Valid settings of {option}: {', '.join(valid)}."
    having = [choice for choice, other in SCHEMAS.get(section, {}).items()
              if choice != name and key in {f.name for f in fields(other)}]
    if having:
        message += (f" {key} is a setting of {section} {', '.join(having)}: choose {'it' if len(having) == 1 else 'one'} "
                    f"with {section}={having[0]}.")
    return UserError(message)


def _resolved(node: DictConfig) -> DictConfig:
    """The section with its interpolations resolved while the whole config is in view: a section
    merged alone could not see `${trainer.batch_size}`. One that cannot resolve is a UserError."""
    try:
        return OmegaConf.create(OmegaConf.to_container(node, resolve=True, throw_on_missing=False))
    except InterpolationResolutionError as error:
        key = error.full_key
        setting = node._get_node(key.rpartition(".")[2]) if key and "[" not in key else None
        written = setting._value() if setting is not None else "..."  # as written, never an environment's value
        reason = error.msg.splitlines()[0] if error.msg else type(error).__name__
        variable = re.search(r"Environment variable '([^']*)' not found", reason)
        if variable:
            raise UserError(f"Invalid setting {key}={written!r}: it reads the environment variable "
                            f"{variable[1]}, which is not set. Set it, or give a default: "
                            f"${{oc.env:{variable[1]},VALUE}}.") from None
        if "Recursive interpolation" in reason:
            raise UserError(f"Invalid setting {key}={written!r}: it refers back to itself through other settings "
                            f"(an interpolation loop). Give one of them a value.") from None
        raise UserError(f"Invalid setting {key}={written!r}: {reason}.") from None


def _typed_section(section: str, node: DictConfig, schema: type) -> Any:
    node = _resolved(node)
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), node)
        missing = sorted(OmegaConf.missing_keys(typed))  # resolves: an interpolation of the wrong type fails here
        typed_section = None if missing else OmegaConf.to_object(typed)
    except ConfigKeyError as error:
        raise unknown_setting(section, str(error.key), node) from None
    except OmegaConfBaseException as error:
        key = f"{section}.{error.full_key}" if error.full_key else section
        reason = error.msg.splitlines()[0] if error.msg else type(error).__name__
        raise UserError(f"Invalid value for {key}: {reason}.") from None
    if missing:
        keys = ", ".join(f"{section}.{key}" for key in missing)
        raise UserError(f"Setting(s) {keys} have no value; set them on the command line, e.g. {section}.{missing[0]}=...")
    _check_flat_lists(section, typed_section)
    return typed_section


def _check_flat_lists(section: str, typed_section: Any) -> None:
    """OmegaConf lets a list or dict into a typed list (`model.hidden=[[1,2]]`); refuse it here."""
    hints = typing.get_type_hints(type(typed_section))
    for f in fields(typed_section):
        if typing.get_origin(hints[f.name]) is not list:
            continue
        value = getattr(typed_section, f.name)
        item_type = typing.get_args(hints[f.name])[0].__name__
        for i, item in enumerate(value):
            if isinstance(item, (list, dict)):
                raise UserError(f"Invalid value for {section}.{f.name}={value!r}: it must be a flat list of {item_type} "
                                f"values, but item {i} is a {type(item).__name__}, {item!r}.")


def check_finite(run: RunConfig) -> None:
    """No setting may be NaN or infinite (`optimizer.lr=inf` would pass every range check)."""
    for section in SECTIONS:
        typed_section = getattr(run, section)
        for f in fields(typed_section):
            value = getattr(typed_section, f.name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, float) and not math.isfinite(item):
                    raise UserError(f"Invalid setting {section}.{f.name}={value!r}: every number in the config "
                                    f"must be finite (not nan, inf or -inf).")


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise UserError(f"Invalid setting {key}={value!r}: {what}.")


def check_values(run: RunConfig) -> None:
    """Range checks the types alone cannot express, one checker per section."""
    _check_dataset(run.dataset)
    _check_model(run.model)
    _check_activation(run.activation)
    _check_optimizer(run.optimizer)
    _check_scheduler(run.scheduler, run.optimizer)
    _check_trainer(run.trainer)
    _check_probes(run.probes)
    _check_findings(run.findings)
    _check_model_fits_images(run.model, run.dataset)


def _check_dataset(d: DatasetConfig) -> None:
    _require(0 < d.val_fraction < 1, "dataset.val_fraction", d.val_fraction, "must be between 0 and 1 (exclusive)")
    _check_split(d)
    _require(0 <= d.split_seed <= MAX_SEED, "dataset.split_seed", d.split_seed,
             "must be in [0, 2**64 - 1] = [0, 18446744073709551615], the seeds torch accepts")
    if isinstance(d, ImageFolderConfig):
        _require(Path(d.path).expanduser().is_dir(), "dataset.path", d.path,
                 "no such folder; it must hold one folder per class, or train/ and val/ or test/ folders of them")
        _require(d.image_size >= 1, "dataset.image_size", d.image_size, "must be at least 1")
        _require(d.channels in (1, 3), "dataset.channels", d.channels, "must be 1 (greyscale) or 3 (RGB)")
        _require(d.max_memory_mb >= 0, "dataset.max_memory_mb", d.max_memory_mb, "must be >= 0")
        _require(d.num_workers >= 0, "dataset.num_workers", d.num_workers, "must be >= 0")
    if isinstance(d, FakeDatasetConfig):
        _require(d.train_size >= 2, "dataset.train_size", d.train_size, "must be at least 2")
        _require(d.test_size >= 1, "dataset.test_size", d.test_size, "must be at least 1")
        _require(d.image_size >= 1, "dataset.image_size", d.image_size, "must be at least 1")
        _require(d.channels in (1, 3), "dataset.channels", d.channels, "must be 1 or 3")
        _require(d.num_classes >= 2, "dataset.num_classes", d.num_classes, "must be at least 2")
        _require(d.noise >= 0, "dataset.noise", d.noise, "must be >= 0")


def _check_split(d: DatasetConfig) -> None:
    """Where the training split's size is known before reading it: the held-out share leaves at least
    one image on each side (an image folder's is checked when it is read)."""
    count = d.train_size if isinstance(d, FakeDatasetConfig) else DATASETS[d.name].train_images
    if count is None or count < 2:
        return
    held_out = round(count * d.val_fraction)
    _require(1 <= held_out < count, "dataset.val_fraction", d.val_fraction,
             f"of {count} training images it would hold out {held_out} for validation; choose a fraction in "
             f"[{1 / count:.3g}, {1 - 1 / count:.6g}] so that each side keeps at least one image")


def _check_model(m: ModelConfig) -> None:
    _require(m.init in INIT_SCHEMES, "model.init", m.init, f"valid choices are {', '.join(INIT_SCHEMES)}")
    _require(0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
    if isinstance(m, MLPConfig):
        _require(all(w >= 1 for w in m.hidden), "model.hidden", list(m.hidden), "every width must be at least 1")
    if isinstance(m, ConvNetConfig):
        _require(len(m.channels) >= 1, "model.channels", list(m.channels), "needs at least one conv block")
        _require(all(c >= 1 for c in m.channels), "model.channels", list(m.channels), "every width must be at least 1")
        _require(m.fc_hidden >= 1, "model.fc_hidden", m.fc_hidden, "must be at least 1")


def _check_activation(a: ActivationConfig) -> None:
    if isinstance(a, LeakyReLUConfig):
        _require(a.negative_slope >= 0, "activation.negative_slope", a.negative_slope, "must be >= 0")
    if isinstance(a, RReLUConfig):
        _require(0 <= a.lower <= a.upper, "activation.lower", a.lower, f"must satisfy 0 <= lower <= upper (upper={a.upper})")
    if isinstance(a, AlphaActivationConfig):
        _require(a.alpha > 0, "activation.alpha", a.alpha, "must be > 0")
    if isinstance(a, GELUConfig):
        _require(a.approximate in ("none", "tanh"), "activation.approximate", a.approximate, "valid choices are none, tanh")
    if isinstance(a, SoftplusConfig):
        _require(a.beta > 0, "activation.beta", a.beta, "must be > 0")


def _check_optimizer(o: OptimizerConfig) -> None:
    _require(o.lr > 0, "optimizer.lr", o.lr, "must be > 0")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
    if isinstance(o, (SGDConfig, RMSpropConfig)):
        _require(0 <= o.momentum < 1, "optimizer.momentum", o.momentum, "must be in [0, 1)")
    if isinstance(o, SGDConfig) and o.nesterov:
        _require(o.momentum > 0, "optimizer.nesterov", o.nesterov, "Nesterov momentum needs optimizer.momentum > 0")
    if isinstance(o, AdamConfig):
        _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas", list(o.betas),
                 "must be two numbers in [0, 1)")
    if isinstance(o, RMSpropConfig):
        _require(0 <= o.alpha < 1, "optimizer.alpha", o.alpha, "must be in [0, 1)")


def _check_scheduler(s: SchedulerConfig, o: OptimizerConfig) -> None:
    if isinstance(s, StepSchedulerConfig):
        _require(s.step_size >= 1, "scheduler.step_size", s.step_size, "must be at least 1 (epochs)")
        _require(0 < s.gamma <= 1, "scheduler.gamma", s.gamma, "must be in (0, 1]")
    if isinstance(s, CosineSchedulerConfig):
        _require(0 <= s.min_lr <= o.lr, "scheduler.min_lr", s.min_lr, f"must be in [0, optimizer.lr={o.lr}]")
    if isinstance(s, OneCycleSchedulerConfig):
        _require(0 < s.pct_start < 1, "scheduler.pct_start", s.pct_start, "must be between 0 and 1 (exclusive)")


def _check_trainer(t: TrainerConfig) -> None:
    _require(t.epochs >= 1, "trainer.epochs", t.epochs, "must be at least 1")
    _require(0 <= t.seed <= MAX_SEED, "trainer.seed", t.seed,
             "must be in [0, 2**64 - 1] = [0, 18446744073709551615], the seeds torch accepts")
    _require(t.batch_size >= 1, "trainer.batch_size", t.batch_size, "must be at least 1")
    _require(t.eval_batch_size >= 1, "trainer.eval_batch_size", t.eval_batch_size, "must be at least 1")
    _require(t.log_every >= 1, "trainer.log_every", t.log_every, "must be at least 1 (optimizer steps)")
    _require(t.grad_clip is None or t.grad_clip > 0, "trainer.grad_clip", t.grad_clip, "must be > 0, or null for no clipping")
    _require(t.amp in ("none", "bf16", "fp16"), "trainer.amp", t.amp, "valid choices are none, bf16, fp16 (fp16 needs CUDA)")
    _require(t.on_nonfinite in ("stop", "skip"), "trainer.on_nonfinite", t.on_nonfinite, "valid choices are stop, skip")
    _require(t.checkpoint_every >= 0, "trainer.checkpoint_every", t.checkpoint_every,
             "must be >= 0 (optimizer steps; 0 = at the end of each epoch only)")
    _require(t.threads is None or t.threads >= 1, "trainer.threads", t.threads, "must be at least 1, or null")
    _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None, "trainer.device", t.device,
             "valid choices are auto, cpu, cuda, cuda:N")


def _check_probes(p: ProbesConfig) -> None:
    _require(p.every >= 1, "probes.every", p.every, "must be at least 1 (optimizer steps)")
    _require(p.batch_size >= 2, "probes.batch_size", p.batch_size, "must be at least 2 (statistics over a batch)")
    _require(p.bins >= 2, "probes.bins", p.bins, "must be at least 2")
    _require(p.mode in ("train", "eval"), "probes.mode", p.mode, "valid choices are train, eval")
    _require(p.noise_batch >= 1, "probes.noise_batch", p.noise_batch, "must be at least 1 (images per micro-batch)")
    # Fewer than 4 x noise_batch images make smaller micro-batches (Probes._gradient_noise): four at least.
    _require(p.per_example == 0 or p.per_example >= 4, "probes.per_example", p.per_example,
             "must be 0 (off) or at least 4 (training images: four micro-batches of one)")
    _require(p.death_examples >= 1, "probes.death_examples", p.death_examples, "must be at least 1 (training images)")
    _require(p.sharpness_every >= 0, "probes.sharpness_every", p.sharpness_every, "must be >= 0 (0 = off)")
    _require(p.noise_every >= 0, "probes.noise_every", p.noise_every, "must be >= 0 (0 = off)")
    _require(p.sharpness_iterations >= 2, "probes.sharpness_iterations", p.sharpness_iterations,
             "must be at least 2 (Lanczos steps)")
    _require(0 < p.sharpness_tolerance < 1, "probes.sharpness_tolerance", p.sharpness_tolerance,
             "must be in (0, 1) (relative to the largest eigenvalue in magnitude)")
    _require(p.curvature_examples >= 2, "probes.curvature_examples", p.curvature_examples,
             "must be at least 2 (training images)")


def _check_findings(f: FindingsConfig) -> None:
    for key in ("dead_at_init", "dying_info", "saturation"):
        _require(0 < getattr(f, key) <= 1, f"findings.{key}", getattr(f, key), "must be a share in (0, 1]")
    _require(f.dying_info <= f.dying_warning <= 1, "findings.dying_warning", f.dying_warning,
             f"must be in [findings.dying_info={f.dying_info}, 1]")
    _require(f.saturation_probes >= 1, "findings.saturation_probes", f.saturation_probes, "must be at least 1")
    _require(0 < f.vanishing_ratio < 1, "findings.vanishing_ratio", f.vanishing_ratio, "must be in (0, 1)")
    _require(f.exploding_factor > 1, "findings.exploding_factor", f.exploding_factor, "must be > 1")
    _require(0.5 <= f.most < 1, "findings.most", f.most, "must be in [0.5, 1): a majority of the points")
    _require(f.activation_scale > 1, "findings.activation_scale", f.activation_scale, "must be > 1")
    _require(f.update_ratio_low < f.update_ratio_high, "findings.update_ratio_low", f.update_ratio_low,
             f"must be below findings.update_ratio_high={f.update_ratio_high} (both log10)")
    _require(0 < f.not_learning < 1, "findings.not_learning", f.not_learning, "must be in (0, 1)")
    _require(0 < f.edge_of_stability <= 2, "findings.edge_of_stability", f.edge_of_stability, "must be in (0, 2]")
    _require(f.update_ratio_low_adaptive < f.update_ratio_high, "findings.update_ratio_low_adaptive",
             f.update_ratio_low_adaptive, f"must be below findings.update_ratio_high={f.update_ratio_high} (both log10)")
    _require(f.loss_rise > 0, "findings.loss_rise", f.loss_rise, "must be > 0 (a relative rise)")
    _require(0 < f.learning_well < 1, "findings.learning_well", f.learning_well,
             "must be in (0, 1): a share of ln(classes), the loss of uniform guessing")
    _require(0 < f.rank_collapse < 1, "findings.rank_collapse", f.rank_collapse, "must be in (0, 1): a share of the width")
    _require(f.gradient_growth > 1, "findings.gradient_growth", f.gradient_growth, "must be > 1")


def image_size(d: DatasetConfig) -> int:
    """The side of the dataset's (square) images, as the model sees them: its row's, or dataset.image_size."""
    known = DATASETS[d.name].image_size
    return d.image_size if known is None else known


def _check_model_fits_images(m: ModelConfig, d: DatasetConfig) -> None:
    """Each conv block halves the image (models.build_convnet): n blocks need images of at least 2**n."""
    if not isinstance(m, ConvNetConfig):
        return
    size, blocks = image_size(d), len(m.channels)
    if size >> blocks > 0:
        return
    most = size.bit_length() - 1  # floor(log2(size))
    if DATASETS[d.name].image_size is not None:
        images, fix = f"the {size}x{size} images of dataset {d.name}", f"Use at most {most} blocks for this dataset."
    elif most == 0:
        images, fix = f"{size}x{size} images (dataset.image_size={size})", f"Set dataset.image_size to at least {2**blocks}."
    else:
        images = f"{size}x{size} images (dataset.image_size={size})"
        fix = f"Use at most {most} blocks, or dataset.image_size={2**blocks} or more."
    raise UserError(f"Invalid setting model.channels={list(m.channels)}: each conv block halves the image, and "
                    f"{blocks} of them leave nothing of {images}. {fix}")


def config_dir() -> Path:
    """configs/ inside an installed wheel, or at the top of a source checkout (editable install)."""
    package = Path(__file__).resolve().parent  # src/cnnlab, or site-packages/cnnlab
    packaged = package / "configs"
    if packaged.is_dir():
        return packaged
    return package.parents[1] / "configs"


def as_dict(run: RunConfig) -> dict[str, Any]:
    """The run's settings as plain containers: what a checkpoint keeps to check a resume against,
    and what a resumed run records as its config. A setting read from the environment is kept as
    written (`${oc.env:...}`), never as its value."""
    settings = OmegaConf.to_container(OmegaConf.structured(run))
    del settings["from_environment"]
    for key, expression in run.from_environment.items():
        section, _, name = key.partition(".")
        settings[section][name] = expression
    return settings


def with_todays_defaults(cfg: DictConfig, sections: tuple[str, ...] = ("probes", "findings")) -> DictConfig:
    """An older run's config with the settings it predates filled in from today's configs/train.yaml
    (its own settings win): `probes` and `findings` grew after runs were made, and neither changes
    what an older run computed. A setting this version does not know raises OmegaConf's error."""
    defaults = OmegaConf.load(config_dir() / "train.yaml")
    for section in sections:
        cfg[section] = OmegaConf.merge(defaults[section], cfg.get(section) or {})
    return cfg


@dataclass(frozen=True)
class Role:
    """Where a setting counts. Every setting defines the run (DEFINES) except those in ROLES."""

    hparam: bool  # a column of TensorBoard's HParams tab
    names_runs: bool  # names runs in `cnnlab compare` and sweep summaries when it differs
    resumable: bool  # a resumed run may change it


DEFINES = Role(hparam=True, names_runs=True, resumable=False)
# The settings that do not define what a run computes (where its files are, how it is loaded, where
# and how fast it runs, how often it writes, what is reported about it), and trainer.epochs, which a
# resumed run may raise. A key ending in "." stands for its whole section.
ROLES: dict[str, Role] = {
    "resume": Role(hparam=False, names_runs=False, resumable=True),
    "dataset.root": Role(hparam=False, names_runs=True, resumable=False),
    "dataset.path": Role(hparam=False, names_runs=True, resumable=False),
    "dataset.download": Role(hparam=False, names_runs=False, resumable=False),
    "dataset.num_workers": Role(hparam=False, names_runs=False, resumable=False),
    "dataset.max_memory_mb": Role(hparam=False, names_runs=True, resumable=False),
    "trainer.device": Role(hparam=False, names_runs=False, resumable=True),
    "trainer.threads": Role(hparam=False, names_runs=False, resumable=True),
    "trainer.checkpoint_every": Role(hparam=False, names_runs=False, resumable=True),
    "trainer.log_every": Role(hparam=True, names_runs=False, resumable=True),
    "trainer.eval_batch_size": Role(hparam=True, names_runs=False, resumable=False),
    "trainer.epochs": Role(hparam=True, names_runs=True, resumable=True),  # without a schedule planned for it
    "probes.": Role(hparam=True, names_runs=False, resumable=False),
    "findings.": Role(hparam=True, names_runs=False, resumable=True),  # shapes only what is reported
}


def role(key: str) -> Role:
    """The role of a dotted setting (`trainer.threads`, `findings.dead_fraction`)."""
    if key in ROLES:
        return ROLES[key]
    section = key.split(".", 1)[0] + "."
    return ROLES.get(section, DEFINES) if "." in key else DEFINES


def resumable_settings() -> list[str]:
    """What a resumed run may change, for messages: `trainer.epochs, ..., findings.*`."""
    return [key + "*" if key.endswith(".") else key for key, r in ROLES.items() if r.resumable and key != "resume"]

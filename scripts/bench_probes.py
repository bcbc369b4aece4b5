"""What probes cost, and what cnnlab's training loop costs over a bare hand-written loop.

For the MLP and the ConvNet (default configs, MNIST-shaped generated data, default batch size), time
one epoch of a fixed number of steps with three loops, interleaved in one process:

  bare   the loop a user writes by hand: randperm, index, normalise, forward, backward, step
  off    cnnlab's train_epoch with probes off (running sums, scalar logs, progress)
  on     cnnlab's train_epoch with probes on at the default settings

and report, per model, the median, min and max over rounds of the ratios off/bare and on/off.
Identical runs differ by up to ~15% here, so only ratios of neighbouring runs are compared.

    python scripts/bench_probes.py            # 8 rounds after a warm-up round
    python scripts/bench_probes.py --quick    # the same with half the steps per epoch

An epoch is 1000 steps for the MLP and 200 for the ConvNet (500 and 100 with --quick): long enough
to include whole probe intervals at the default probes.every. Dead units on the data run once per
epoch end, outside train_epoch: their pass is timed on its own and added to on/off as its share of
an MNIST epoch at this batch size (421 steps of 128).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from rich.console import Console
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

from cnnlab.config import config_dir, validate
from cnnlab.train.data import load_data
from cnnlab.train.models import build_model
from cnnlab.train.optim import build_optimizer
from cnnlab.instruments.probes import Probes, examples_needed
from cnnlab.cli.console import TrainingProgress
from cnnlab.train.tblog import write_probe
from cnnlab.train.loop import train_epoch
from cnnlab.train.state import NonfiniteWatch, Precision, TrainingLog, TrainState, resolve_device

TARGETS = {"off/bare": 1.05, "on/off": 1.10}
MNIST_TRAIN = 60000  # MNIST's training split, before the validation share is held out


def setup(model_name: str, steps: int, device_name: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("train", overrides=[f"model={model_name}", "dataset=fake", f"trainer.device={device_name}"])
    run = validate(cfg)
    batch_size = run.trainer.batch_size
    # Enough generated images that one epoch is exactly `steps` steps after the validation split.
    run.dataset.train_size = round(steps * batch_size / (1 - run.dataset.val_fraction)) + 1
    device = resolve_device(run.trainer.device)
    torch.manual_seed(0)
    data = load_data(run.dataset, batch_size, run.trainer.eval_batch_size, device, seed=0)
    assert len(data.train) == steps, (len(data.train), steps)
    model = build_model(run.model, run.activation, data.input_shape, data.num_classes).to(device)
    if run.trainer.channels_last and model_name == "convnet":  # as the trainer's setup() does, for all three loops
        model = model.to(memory_format=torch.channels_last)
        data.train.normalise.channels_last = True
    return run, data, model, device


def bare_epoch(model, optimizer, data, batch_size: int, generator: torch.Generator) -> None:
    images, labels, normalise = data.train.data.images, data.train.data.labels, data.train.normalise
    order = torch.randperm(len(labels), device=images.device, generator=generator)
    for i in range(len(labels) // batch_size):
        index = order[i * batch_size:(i + 1) * batch_size]
        loss = F.cross_entropy(model(normalise(images[index])), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def bench_model(model_name: str, steps: int, rounds: int, device_name: str, workdir: Path) -> dict:
    run, data, model, device = setup(model_name, steps, device_name)
    variants = {}
    for name in ("bare", "off", "on"):
        copy_ = copy.deepcopy(model)
        parameters = list(copy_.parameters())
        variants[name] = {"model": copy_, "parameters": parameters, "optimizer": build_optimizer(run.optimizer, parameters)}
    probe_batch = data.train.sample(examples_needed(run.probes), seed=0)  # as setup() draws it
    probes = Probes(variants["on"]["model"], probe_batch, run.probes, last_step=-1)
    quiet = TrainingProgress(epochs=1, console=Console(file=io.StringIO()))
    generator = torch.Generator(device=device).manual_seed(0)
    logs = {name: TrainingLog(device, SummaryWriter(str(workdir / f"{model_name}-{name}"))) for name in ("off", "on")}
    states = {  # cnnlab's own epoch, on a state built like setup() builds it
        name: TrainState(run=run, config={}, run_dir=workdir, device=device, model=variants[name]["model"],
                         step_model=variants[name]["model"], parameters=variants[name]["parameters"],
                         optimizer=variants[name]["optimizer"], scheduler=None, data=data,
                         probes=probes if name == "on" else None, precision=Precision("none", device),
                         log=logs[name], watch=NonfiniteWatch(device), metrics={})
        for name in ("off", "on")}

    def one_epoch(name: str) -> float:
        v = variants[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if name == "bare":
            bare_epoch(v["model"], v["optimizer"], data, run.trainer.batch_size, generator)
        else:
            quiet.start_epoch(1, steps)
            states[name].batch = 0
            train_epoch(states[name], quiet)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for name in ("bare", "off", "on"):  # warm-up: allocator, kernels, first-call costs
        one_epoch(name)
    times = {"bare": [], "off": [], "on": []}
    order = ["bare", "off", "on"]
    for round_ in range(rounds):
        # Rotate the order each round, so that no variant always runs first or after the same one.
        for name in order[round_ % 3:] + order[:round_ % 3]:
            times[name].append(one_epoch(name))
    for log in logs.values():
        log.writer.close()

    def spread(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    # The cost of one probe on its own: at the defaults, then without each instrument (its cost is
    # the difference), and with sharpness on, which is off by default.
    # Gradient noise runs every probes.noise_every steps (1000), not at every probe: "with gradient
    # noise" is the cost of a probe at which it runs.
    instruments = {
        "defaults": {},
        "without histograms": {"histograms": False},
        "without density columns": {"density": False},
        "with gradient noise": {"noise_every": 1},
        "with sharpness": {"sharpness_every": 1},
    }
    probe_ms = {}
    for label, change in instruments.items():
        alone = Probes(variants["on"]["model"], probe_batch, dataclasses.replace(run.probes, **change),
                       last_step=-1, stability_limit=lambda: 1.0)
        with SummaryWriter(str(workdir / f"{model_name}-probe-{len(probe_ms)}")) as writer:
            durations = []
            for i in range(1, 7 if label != "with sharpness" else 4):  # step 0 would add gradient noise
                start = time.perf_counter()
                write_probe(writer, i, alone.measure(i))  # ends with the transfer: the work is done
                durations.append(time.perf_counter() - start)
        probe_ms[label] = 1000 * statistics.median(durations[1:])  # the first pays one-off costs
    # Dead units on the data (probes.death_examples images), once per epoch end: outside train_epoch,
    # so not in the ratios above; its cost is this against the epoch's.
    durations = []
    for _ in range(4):
        start = time.perf_counter()
        [m.value.item() for m in probes.on_data()]
        durations.append(time.perf_counter() - start)
    probe_ms["death on the data (epoch end)"] = 1000 * statistics.median(durations[1:])

    ratios = {
        "off/bare": spread([o / b for o, b in zip(times["off"], times["bare"])]),
        "on/off": spread([n / o for n, o in zip(times["on"], times["off"])]),
    }
    # The epoch-end pass runs once per epoch: its share is of a real MNIST epoch at this batch size,
    # whose length the timed epochs (a fixed number of steps) do not have.
    mnist_steps = int(MNIST_TRAIN * (1 - run.dataset.val_fraction)) // run.trainer.batch_size
    off_ms = 1000 * statistics.median(times["off"]) / steps
    death_share = probe_ms["death on the data (epoch end)"] / (mnist_steps * off_ms)
    ratios["on/off with the epoch-end pass (MNIST epoch)"] = {
        key: value + death_share for key, value in ratios["on/off"].items()}
    return {
        "steps_per_epoch": steps,
        "mnist_steps_per_epoch": mnist_steps,
        "batch_size": run.trainer.batch_size,
        "probes": dataclasses.asdict(run.probes),
        "ms_per_step": {name: 1000 * statistics.median(values) / steps for name, values in times.items()},
        "ms_per_probe": probe_ms,
        "ratios": ratios,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="half the steps per epoch")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds after the warm-up (>= 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--out", default="bench_probes.json", help="where to write the results")
    args = parser.parse_args()
    steps = {"mlp": 1000, "convnet": 200}
    if args.quick:
        steps = {name: count // 2 for name, count in steps.items()}
    results = {
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(resolve_device(args.device)),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else None},
        "rounds": args.rounds,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for model_name in ("mlp", "convnet"):
            results["models"][model_name] = bench_model(model_name, steps[model_name], args.rounds, args.device,
                                                        Path(workdir))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    table = Table(title=f"probe and loop overhead, {results['machine']['device']}, {args.rounds} rounds")
    for column in ("model", "steps", "bare ms/step", "off ms/step", "on ms/step", "off/bare median [min, max]",
                   "on/off median [min, max]", "on/off + epoch-end pass, MNIST epoch", "ms per probe"):
        table.add_column(column, justify="right")
    for model_name, result in results["models"].items():
        ms, ratios = result["ms_per_step"], result["ratios"]
        cells = []
        for key, target in TARGETS.items():
            r = ratios[key]
            verdict = "ok" if r["median"] <= target else f"over {target}"
            cells.append(f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}] {verdict}")
        whole = ratios["on/off with the epoch-end pass (MNIST epoch)"]
        verdict = "ok" if whole["median"] <= TARGETS["on/off"] else f"over {TARGETS['on/off']}"
        cells.append(f"{whole['median']:.3f} [{whole['min']:.3f}, {whole['max']:.3f}] {verdict}")
        probe = result["ms_per_probe"]
        table.add_row(model_name, str(result["steps_per_epoch"]), f"{ms['bare']:.2f}", f"{ms['off']:.2f}", f"{ms['on']:.2f}",
                      *cells, f"{probe['defaults']:.1f}")
    Console(width=160).print(table)
    costs = Table(title="one probe on its own, ms: at the defaults, without each instrument, with sharpness")
    costs.add_column("model")
    labels = list(next(iter(results["models"].values()))["ms_per_probe"])
    for label in labels:
        costs.add_column(label, justify="right")
    for model_name, result in results["models"].items():
        costs.add_row(model_name, *(f"{result['ms_per_probe'][label]:.1f}" for label in labels))
    Console(width=160).print(costs)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

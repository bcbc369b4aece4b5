"""cnnlab's training speed against the loop a user would write, and against the machine's limit.

For the MLP and the ConvNet (default configs, batch 128, Adam) on MNIST-shaped (1x28x28) and
CIFAR-shaped (3x32x32) generated data, one process times training epochs of four loops, interleaved
(ABCD, ABCD, ...; the order rotates every round), after one warm-up round:

  (a) tutorial  torchvision dataset with per-sample ToTensor + Normalize, a DataLoader, and
                torch.optim.Adam with its defaults (MNIST-shaped: torchvision's own MNIST class
                reading generated IDX files; CIFAR-shaped: the same per-sample PIL path as
                torchvision's CIFAR10, from memory)
  (b) tensor    the same loop over the whole dataset held as one normalised tensor, with cnnlab's
                optimizer (fused Adam), so that (c)/(b) is the cost of cnnlab's loop alone
  (c) cnnlab    cnnlab's train_epoch, probes off
  (d) probes    cnnlab's train_epoch, probes on at the defaults

It reports images/s of each, the median and [min, max] of the per-round ratios (c)/(b), (d)/(c) and
(a)/(c), the float32 matrix-product rate of the device (2048 x 2048, measured in the same run) and
the ConvNet's training FLOP/s (counted by torch.utils.flop_counter) as a fraction of it, and peak
memory. Writes bench.json and prints a table.

    python scripts/bench.py             # 8 rounds, a few minutes on 2 CPU cores
    python scripts/bench.py --quick     # fewer images per epoch: under two minutes on 2 CPU cores
    python scripts/bench.py --options   # also cnnlab with bf16 autocast, with NCHW (trainer.channels_last=false,
                                        # ConvNet), and with torch.compile
    python scripts/bench.py --contention  # instead: the ConvNet's epochs with trainer.threads=null's choice,
                                          # 1 and 2 threads, idle and beside one busy process (a spinning
                                          # python started and killed here): images/s and default / best
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from rich.console import Console
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

from cnnlab.config import RunConfig, config_dir, validate
from cnnlab.train.data import Data, load_data
from cnnlab.train.models import build_model
from cnnlab.train.optim import build_optimizer
from cnnlab.instruments.probes import Probes
from cnnlab.cli.console import TrainingProgress
from cnnlab.train.loop import choose_threads, train_epoch
from cnnlab.train.state import NonfiniteWatch, Precision, TrainingLog, TrainState, resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_probes import cpu_model  # noqa: E402  (a sibling script)

TARGETS = {"cnnlab/tensor": 1.05, "probes/cnnlab": 1.10}
SHAPES = {"mnist": (1, 28), "cifar": (3, 32)}


def matmul_rate(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """float32 matrix-product FLOP/s: the practical compute ceiling of the device."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


class PerSampleImages(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: a PIL image from a uint8 array, then the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def tutorial_dataset(shape: str, images: np.ndarray, labels: np.ndarray, workdir: Path, mean, std):
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    if shape == "mnist":
        raw = workdir / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        write_idx(raw / "train-images-idx3-ubyte", images[:, 0])
        write_idx(raw / "train-labels-idx1-ubyte", labels)
        for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            write_idx(raw / name, (images[:1, 0] if "images" in name else labels[:1]))
        return datasets.MNIST(str(workdir), train=True, download=False, transform=transform)
    return PerSampleImages(images.transpose(0, 2, 3, 1), labels, transform)


def flops_per_image(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(labels)


def generated_run(model_name: str, shape: str, images_per_epoch: int, device_name: str) -> tuple[RunConfig, Data]:
    """The default config of model_name on generated data of the shape, and its data in memory."""
    channels, size = SHAPES[shape]
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("train", overrides=[f"model={model_name}", "dataset=fake", f"trainer.device={device_name}",
                                          f"dataset.image_size={size}", f"dataset.channels={channels}",
                                          "dataset.val_fraction=0.01"])
    run = validate(cfg)
    run.dataset.train_size = round(images_per_epoch / 0.99) + 1
    torch.manual_seed(0)
    data = load_data(run.dataset, run.trainer.batch_size, run.trainer.eval_batch_size,
                     resolve_device(run.trainer.device), seed=0)
    return run, data


def bench(model_name: str, shape: str, images_per_epoch: int, rounds: int, device_name: str, options: bool,
          workdir: Path) -> dict:
    run, data = generated_run(model_name, shape, images_per_epoch, device_name)
    batch_size = run.trainer.batch_size
    device = resolve_device(run.trainer.device)
    steps = len(data.train)
    base = build_model(run.model, run.activation, data.input_shape, data.num_classes).to(device)
    train_images = data.train.data.images
    labels = data.train.data.labels
    normalised = data.train.normalise(train_images)  # (b): the whole dataset as one float tensor
    mean = (-data.train.normalise.shift / (255 * data.train.normalise.scale)).flatten()  # in [0, 1] units
    std = (1 / (255 * data.train.normalise.scale)).flatten()
    tutorial = tutorial_dataset(shape, train_images.cpu().numpy(), labels.cpu().numpy().astype(np.uint8),
                                workdir / f"{model_name}-{shape}", mean.tolist(), std.tolist())
    tutorial_loader = torch.utils.data.DataLoader(tutorial, batch_size=batch_size, shuffle=True, drop_last=True,
                                                  pin_memory=device.type == "cuda")

    variants = ["tutorial", "tensor", "cnnlab", "probes"]
    settings = {name: run.trainer for name in variants}
    convnet = model_name == "convnet"
    for name in variants:  # cnnlab's default: NHWC for conv models (trainer.channels_last=true)
        settings[name] = dataclasses.replace(run.trainer, channels_last=convnet and name in ("cnnlab", "probes"))
    if options:
        variants += ["bf16"] + (["nchw"] if convnet else []) + ["compile"]
        settings["bf16"] = dataclasses.replace(settings["cnnlab"], amp="bf16")
        settings["nchw"] = dataclasses.replace(settings["cnnlab"], channels_last=False)
        settings["compile"] = dataclasses.replace(settings["cnnlab"], compile=True)
    state = {}
    for name in variants:
        model = copy.deepcopy(base)
        if settings[name].channels_last:
            model = model.to(memory_format=torch.channels_last)
        parameters = list(model.parameters())
        # (a) is what a user writes: torch.optim.Adam with its defaults. Every other loop uses
        # cnnlab's optimizer (fused Adam), so that (c)/(b) measures the loop and nothing else.
        optimizer = (torch.optim.Adam(parameters, lr=run.optimizer.lr) if name == "tutorial"
                     else build_optimizer(run.optimizer, parameters))
        log = TrainingLog(device, SummaryWriter(str(workdir / f"{model_name}-{shape}-{name}")))
        # (c), (d) and the options run cnnlab's own epoch on a state built like setup() builds it.
        probes = (Probes(model, data.train.sample(run.probes.batch_size, seed=0), run.probes, last_step=-1)
                  if name == "probes" else None)
        step_model = torch.compile(model) if settings[name].compile else model
        state[name] = {
            "optimizer": optimizer, "step_model": step_model, "log": log, "peak": 0,
            "train": TrainState(
                run=dataclasses.replace(run, trainer=settings[name]), config={}, run_dir=workdir, device=device,
                model=model, step_model=step_model,
                parameters=parameters, optimizer=optimizer, scheduler=None, data=data, probes=probes,
                precision=Precision(settings[name].amp, device), log=log, watch=NonfiniteWatch(device), metrics={}),
        }
    quiet = TrainingProgress(epochs=1, console=Console(file=io.StringIO()))
    generator = torch.Generator(device=device).manual_seed(0)

    def one_epoch(name: str) -> float:
        s = state[name]
        model, optimizer = s["step_model"], s["optimizer"]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        if name == "tutorial":
            for x, y in tutorial_loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        elif name == "tensor":
            order = torch.randperm(len(labels), device=device, generator=generator)
            for i in range(steps):
                index = order[i * batch_size:(i + 1) * batch_size]
                loss = F.cross_entropy(model(normalised[index]), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        else:
            data.train.normalise.channels_last = settings[name].channels_last
            quiet.start_epoch(1, steps)
            s["train"].batch = 0
            train_epoch(s["train"], quiet)
            data.train.normalise.channels_last = False
        sync(device)
        seconds = time.perf_counter() - start
        if device.type == "cuda":
            s["peak"] = max(s["peak"], torch.cuda.max_memory_allocated())
        return seconds

    for name in variants:  # warm-up: allocator, kernels, compilation
        one_epoch(name)
    times = {name: [] for name in variants}
    rates = [matmul_rate(device)]
    for round_ in range(rounds):
        for name in variants[round_ % len(variants):] + variants[:round_ % len(variants)]:
            times[name].append(one_epoch(name))
        rates.append(matmul_rate(device))
    for s in state.values():
        s["log"].writer.close()

    def spread(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    ratio = lambda a, b: spread([x / y for x, y in zip(times[a], times[b])])  # noqa: E731
    images = steps * batch_size
    result = {
        "model": model_name, "shape": shape, "images_per_epoch": images, "steps_per_epoch": steps,
        "images_per_second": {name: images / statistics.median(values) for name, values in times.items()},
        "ratios": {"cnnlab/tensor": ratio("cnnlab", "tensor"), "probes/cnnlab": ratio("probes", "cnnlab"),
                   "tutorial/cnnlab": ratio("tutorial", "cnnlab"),
                   **{f"{name}/cnnlab": ratio(name, "cnnlab") for name in variants[4:]}},
        "matmul_flops": statistics.median(rates),
    }
    x, y = next(iter(data.train))
    result["train_flops_per_image"] = flops_per_image(copy.deepcopy(base), x, y)
    achieved = result["train_flops_per_image"] * result["images_per_second"]["cnnlab"]
    result["fraction_of_matmul"] = achieved / result["matmul_flops"]
    if device.type == "cuda":
        result["peak_memory_mb"] = {name: s["peak"] / 2**20 for name, s in state.items()}
    return result


def busy_process() -> subprocess.Popen:
    """Another process that keeps one core busy, as a user's other work would."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # started and spinning before anything is timed or counted
    return busy


def bench_contention(rounds: int, images_per_epoch: int, device_name: str, workdir: Path) -> dict:
    """ConvNet epochs (cnnlab's train_epoch, probes off) with trainer.threads=null's choice, 1 and 2
    threads, idle and beside one busy process, interleaved: each round has an idle and a busy block
    (which comes first alternates), and the threads' order rotates within a block."""
    run, data = generated_run("convnet", "cifar", images_per_epoch, device_name)
    device = resolve_device(run.trainer.device)
    model = build_model(run.model, run.activation, data.input_shape, data.num_classes).to(device)
    model = model.to(memory_format=torch.channels_last)  # cnnlab's default for conv models
    data.train.normalise.channels_last = True
    parameters = list(model.parameters())
    optimizer = build_optimizer(run.optimizer, parameters)
    log = TrainingLog(device, SummaryWriter(str(workdir / "contention")))
    state = TrainState(run=run, config={}, run_dir=workdir, device=device, model=model, step_model=model,
                       parameters=parameters, optimizer=optimizer, scheduler=None, data=data, probes=None,
                       precision=Precision(run.trainer.amp, device), log=log, watch=NonfiniteWatch(device), metrics={})
    quiet = TrainingProgress(epochs=1, console=Console(file=io.StringIO()))
    steps = len(data.train)
    variants = ["default", "1", "2"]
    conditions = ["idle", "busy"]
    times = {(c, v): [] for c in conditions for v in variants}
    chosen = {c: [] for c in conditions}  # the default's thread count at each of its epochs

    def one_epoch(condition: str, variant: str) -> None:
        # Set between epochs, as the trainer's setup sets it; the default is computed now, as setup would.
        threads = choose_threads(None)[0] if variant == "default" else int(variant)
        torch.set_num_threads(threads)
        if variant == "default":
            chosen[condition].append(threads)
        quiet.start_epoch(1, steps)
        state.batch = 0
        sync(device)
        start = time.perf_counter()
        train_epoch(state, quiet)
        sync(device)
        times[(condition, variant)].append(time.perf_counter() - start)

    def block(condition: str, order: list[str]) -> None:
        busy = busy_process() if condition == "busy" else None
        try:
            for variant in order:
                one_epoch(condition, variant)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
                time.sleep(0.5)  # its core is free again before the next block counts

    for variant in variants:  # warm-up: allocator, kernels, each thread count's pool
        torch.set_num_threads(int(variant) if variant != "default" else 2)
        quiet.start_epoch(1, steps)
        state.batch = 0
        train_epoch(state, quiet)
    for round_ in range(rounds):
        order = variants[round_ % 3:] + variants[:round_ % 3]
        for condition in (conditions if round_ % 2 == 0 else conditions[::-1]):
            block(condition, order)
    log.writer.close()
    images = steps * run.trainer.batch_size
    result = {"images_per_epoch": images, "steps_per_epoch": steps, "conditions": {}}
    for condition in conditions:
        rates = {v: images / statistics.median(times[(condition, v)]) for v in variants}
        best = max(("1", "2"), key=lambda v: rates[v])
        per_round = [d / b for d, b in zip(times[(condition, "default")], times[(condition, best)])]
        result["conditions"][condition] = {
            "images_per_second": rates, "best_fixed": best,
            "default_over_best": {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)},
            "default_threads": {str(n): chosen[condition].count(n) for n in sorted(set(chosen[condition]))},
            "seconds": {v: times[(condition, v)] for v in variants},
        }
    return result


def main_contention(args: argparse.Namespace) -> None:
    images = 640 if args.quick else 1280  # beside a busy core 2 threads ran ~220 img/s: ~6 s an epoch
    with tempfile.TemporaryDirectory() as workdir:
        print(f"timing the ConvNet's threads, idle and beside a busy process, {args.rounds} rounds ...",
              file=sys.stderr, flush=True)
        result = bench_contention(args.rounds, images, args.device, Path(workdir))
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
               "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    out = args.out or "bench_contention.json"
    Path(out).write_text(json.dumps({"machine": machine, "rounds": args.rounds, "quick": args.quick, **result},
                                    indent=2) + "\n")
    table = Table(title=f"ConvNet / CIFAR-shaped, trainer.threads default vs fixed, {machine['cpu']}, "
                        f"{args.rounds} rounds, {result['images_per_epoch']} images an epoch")
    for column in ("condition", "default chose (epochs)", "images/s default | 1 | 2", "best fixed",
                   "time default / best, median [min, max]"):
        table.add_column(column, justify="right")
    for condition, r in result["conditions"].items():
        ips, q = r["images_per_second"], r["default_over_best"]
        mark = " ok" if q["median"] <= 1.2 else " > 1.2"
        table.add_row(condition, ", ".join(f"{n} threads: {count}" for n, count in r["default_threads"].items()),
                      " | ".join(f"{ips[v]:,.0f}" for v in ("default", "1", "2")), r["best_fixed"],
                      f"{q['median']:.3f} [{q['min']:.2f}, {q['max']:.2f}]{mark}")
    Console(width=170).print(table)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images per epoch (under two minutes on 2 CPU cores)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds after the warm-up (>= 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--options", action="store_true",
                        help="also time trainer.amp=bf16, trainer.channels_last=false (ConvNet), trainer.compile=true")
    parser.add_argument("--contention", action="store_true",
                        help="instead: the ConvNet with trainer.threads=null's choice, 1 and 2 threads, idle and "
                             "beside one busy process (writes bench_contention.json)")
    parser.add_argument("--out", default=None, help="bench.json, or bench_contention.json with --contention")
    args = parser.parse_args()
    if args.contention:
        return main_contention(args)
    args.out = args.out or "bench.json"
    device = resolve_device(args.device)
    # Images per timed epoch: enough that one epoch is long against timer noise, few enough for
    # the quick mode's budget on two CPU cores.
    sizes = {("mlp", "mnist"): 51200, ("mlp", "cifar"): 25600, ("convnet", "mnist"): 2560, ("convnet", "cifar"): 1920}
    if device.type == "cuda":
        sizes = {key: 25600 for key in sizes}
    if args.quick:
        sizes = {key: value // 4 for key, value in sizes.items()}
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for (model_name, shape), count in sizes.items():
            print(f"timing {model_name} on {shape}-shaped data ...", file=sys.stderr, flush=True)
            results.append(bench(model_name, shape, count, args.rounds, args.device, args.options, Path(workdir)))
    machine = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # the whole process
    }
    Path(args.out).write_text(json.dumps({"machine": machine, "rounds": args.rounds, "quick": args.quick,
                                          "results": results}, indent=2) + "\n")

    table = Table(title=f"cnnlab vs plain loops, {machine['device']} ({machine['gpu'] or machine['cpu']}), "
                        f"{args.rounds} rounds, median [min, max]")
    for column in ("model / data", "images/s tutorial | tensor | cnnlab | probes", "cnnlab / tensor",
                   "probes / cnnlab", "tutorial / cnnlab", "ConvNet FLOP/s of matmul"):
        table.add_column(column, justify="right")
    for r in results:
        ips = r["images_per_second"]
        cells = []
        for key in ("cnnlab/tensor", "probes/cnnlab", "tutorial/cnnlab"):
            q = r["ratios"][key]
            mark = "" if key not in TARGETS else (" ok" if q["median"] <= TARGETS[key] else f" > {TARGETS[key]}")
            cells.append(f"{q['median']:.3f} [{q['min']:.2f}, {q['max']:.2f}]{mark}")
        fraction = f"{r['fraction_of_matmul']:.0%}" if r["model"] == "convnet" else "-"
        table.add_row(f"{r['model']} / {r['shape']}",
                      " | ".join(f"{ips[k]:,.0f}" for k in ("tutorial", "tensor", "cnnlab", "probes")), *cells, fraction)
    console = Console(width=170)
    console.print(table)
    for r in results:
        extra = {k: v for k, v in r["ratios"].items() if k not in ("cnnlab/tensor", "probes/cnnlab", "tutorial/cnnlab")}
        if extra:
            console.print(f"{r['model']} / {r['shape']} options against cnnlab: " + ", ".join(
                f"{k} {v['median']:.3f} [{v['min']:.2f}, {v['max']:.2f}]" for k, v in extra.items()))
    console.print(f"matrix product: {statistics.median(r['matmul_flops'] for r in results) / 1e9:.0f} GFLOP/s; "
                  f"peak RSS {machine['peak_rss_mb']:.0f} MB; wrote {args.out}")


if __name__ == "__main__":
    main()

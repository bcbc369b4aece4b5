"""The tiny run every test starts from, and helpers that write tiny datasets in the real on-disk
formats (read back by torchvision's own code) and read a run's files back."""

from __future__ import annotations

import pickle
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cnnlab.config import config_dir, validate

# The tiny run: what every test that trains passes, in this process (the `tiny_run` fixture in
# conftest.py) or on the command line (`cnnlab train *TINY`). It comes in parts so that a test can
# swap one for another dataset or for TINY_CONVNET; a test that needs other sizes adds overrides after it.
# 300 generated 8x8 images: 30 validate and 270 train, 8 steps of 32 per epoch (the partial batch is dropped).
TINY_DATA = ["dataset=fake", "dataset.train_size=300", "dataset.test_size=50", "dataset.image_size=8"]
TINY_MLP = ["model.hidden=[32]"]  # one hidden layer: 64 -> 32 -> 10
TINY_CONVNET = ["model=convnet", "model.channels=[4]", "model.fc_hidden=8"]  # one conv block
TINY_TRAINER = ["trainer.batch_size=32", "trainer.epochs=1", "trainer.device=cpu", "probes.batch_size=16"]
TINY = [*TINY_DATA, *TINY_MLP, *TINY_TRAINER]


def compose_config(*overrides: str) -> DictConfig:
    """The config `cnnlab train OVERRIDES` would run with (without Hydra's own node)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose("train", overrides=list(overrides))


def dataset_config(*overrides: str):
    """The validated dataset section of `cnnlab train OVERRIDES`."""
    return validate(compose_config(*overrides)).dataset


def crop_flip_of(out, image, padding: int) -> list[int]:
    """The flips (0/1) for which `out` is a window of `image` zero-padded by `padding`."""
    import torch

    padded = torch.nn.functional.pad(image, (padding,) * 4)
    height, width = image.shape[-2:]
    windows = [(padded[:, dy:dy + height, dx:dx + width], flip)
               for dy in range(2 * padding + 1) for dx in range(2 * padding + 1) for flip in (0, 1)]
    return [flip for window, flip in windows if torch.equal(out, window.flip(-1) if flip else window)]


def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format: zero bytes, a uint8 type code, the rank, big-endian int32 dims, the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist(root: Path, folder: str = "MNIST", train: int = 60, test: int = 20, seed: int = 0) -> dict:
    """ROOT/FOLDER/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, as torchvision expects them."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return arrays


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, per_batch: int = 8, test: int = 10, seed: int = 0) -> dict:
    """ROOT/cifar-10-batches-py/ with five training pickles, the test pickle and batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for index, name in enumerate(names):
        count = test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8)  # rows: 1024 R, 1024 G, 1024 B
        labels = [int(v) for v in (np.arange(count) + index) % 10]
        with open(folder / name, "wb") as file:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, file)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch}, file)
    return batches


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 6, size: int = 12,
                       mode: str = "RGB", fmt: str = "png", seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(pixels, mode=mode).save(root / name / f"{i}.{fmt}")
    return root


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run directory's event files, read back by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def not_blank(path: Path) -> bool:
    """A PNG with more than a handful of colours: something was drawn."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    return len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


@contextmanager
def fails_after(seconds: int):
    """TimeoutError inside the block after `seconds`: a test of something that must not wait on a
    FIFO fails instead of hanging the suite."""
    def timed_out(signum, frame):
        raise TimeoutError(f"still waiting after {seconds} s")

    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

"""The datasets cnnlab reads, one row each in DATASETS: all that is known about a dataset.

A row holds its settings schema (the dataclass `dataset=NAME` is validated against), the side of its
images and its number of classes where they are fixed (None where the config or the folder says),
and how it is loaded: a kind of loader (a key of train/data.py's LOADERS) and, for torchvision's
own datasets, the class that reads them. No torch here: config mistakes answer fast.

Adding a dataset of a kind cnnlab already loads (another torchvision one) is its row here and its
configs/dataset/NAME.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


# --- settings --------------------------------------------------------------------------------------
@dataclass
class DatasetConfig:
    name: str = MISSING
    val_fraction: float = MISSING  # share of the training split held out for validation
    split_seed: int = MISSING  # seed of that split; fixed so that seed sweeps share one split
    augment: bool = MISSING  # random crop (padding 4) + horizontal flip, in bulk on the device


@dataclass
class TorchvisionDatasetConfig(DatasetConfig):
    root: str = MISSING  # where torchvision looks for (and downloads) the files
    download: bool = MISSING  # download missing files


@dataclass
class ImageFolderConfig(DatasetConfig):
    path: str = MISSING  # PATH/CLASS/IMAGE, or PATH/{train,val,test}/CLASS/IMAGE
    image_size: int = MISSING  # images are resized to image_size x image_size
    channels: int = MISSING  # 1 (greyscale) or 3 (RGB)
    max_memory_mb: int = MISSING  # decoded size up to which the images are held in memory
    num_workers: int = MISSING  # DataLoader workers when the images are streamed


@dataclass
class FakeDatasetConfig(DatasetConfig):
    train_size: int = MISSING
    test_size: int = MISSING
    image_size: int = MISSING
    channels: int = MISSING
    num_classes: int = MISSING
    noise: float = MISSING  # per-pixel noise relative to the class pattern


# --- the rows --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dataset:
    """One row of DATASETS."""

    schema: type[DatasetConfig]  # what dataset=NAME is validated against
    loader: str  # how it is read: "torchvision", "imagefolder" or "fake" (train/data.py's LOADERS)
    torchvision_class: str | None = None  # the torchvision.datasets class that reads it, by name
    # The side of its (square) images, known before reading them; None: dataset.image_size sets it.
    image_size: int | None = None
    classes: int | None = None  # its number of classes; None: the config (fake) or the folder says
    # Images in its training split, known before reading them (to check dataset.val_fraction before a
    # folder is made); None: dataset.train_size (fake) or the folder says.
    train_images: int | None = None


DATASETS: dict[str, Dataset] = {
    "mnist": Dataset(TorchvisionDatasetConfig, "torchvision", "MNIST", image_size=28, classes=10,
                     train_images=60000),
    "fashion_mnist": Dataset(TorchvisionDatasetConfig, "torchvision", "FashionMNIST", image_size=28, classes=10,
                             train_images=60000),
    "cifar10": Dataset(TorchvisionDatasetConfig, "torchvision", "CIFAR10", image_size=32, classes=10,
                       train_images=50000),
    "imagefolder": Dataset(ImageFolderConfig, "imagefolder"),
    "fake": Dataset(FakeDatasetConfig, "fake"),
}

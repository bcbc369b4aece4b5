"""Datasets decoded once into uint8 tensors on the training device, and the batches drawn from them.

torchvision reads (and downloads) MNIST, Fashion-MNIST, CIFAR-10 and folders of images. After that
everything happens in bulk on the device: shuffling with randperm, augmentation, normalisation.
Only image folders too large for `dataset.max_memory_mb` are streamed from disk by a DataLoader.
LOADERS has one loader per dataset name; load_data turns what it loads into batches.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from cnnlab.config import DatasetConfig, FakeDatasetConfig, ImageFolderConfig, TorchvisionDatasetConfig
from cnnlab.errors import UserError, one_line

log = logging.getLogger(__name__)

CROP_PADDING = 4
FAKE_DATA_SEED = 0  # fake images are the same for every run; trainer.seed only changes the order
MAX_LISTED_FILES = 10


@dataclass
class ImageSet:
    """Decoded images, uint8 [N, C, H, W], and their labels, int64 [N]."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])

    def to(self, device: torch.device) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device))


@dataclass
class FileSet:
    """Image files, streamed from disk because decoding them all would not fit the memory budget."""

    samples: list[tuple[str, int]]
    image_size: int
    channels: int

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, index: Tensor) -> FileSet:
        return FileSet([self.samples[i] for i in index.tolist()], self.image_size, self.channels)


Split = Union[ImageSet, FileSet]


@dataclass
class Splits:
    """What a dataset provides; val is None when it must be carved from train."""

    train: Split
    val: Split | None
    test: Split | None
    classes: list[str]


# --- batches -------------------------------------------------------------------------------------
def random_crop_flip(images: Tensor, generator: torch.Generator, padding: int = CROP_PADDING) -> Tensor:
    """Random crop after zero padding, and a horizontal flip for half the images, in one gather."""
    n, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    device = images.device
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=device, generator=generator)
    flip = torch.rand(n, 1, 1, device=device, generator=generator) < 0.5
    columns = torch.arange(width, device=device).view(1, 1, width)
    columns = torch.where(flip, width - 1 - columns, columns)
    rows = dy + torch.arange(height, device=device).view(1, height, 1)
    batch = torch.arange(n, device=device).view(n, 1, 1)
    # Advanced indices around a slice put the channel dimension last: [N, H, W, C].
    return padded[batch, :, rows, dx + columns].permute(0, 3, 1, 2).contiguous()


class Normalise:
    """uint8 pixels to float with the training split's per-channel mean and std, on the device."""

    def __init__(self, mean: Tensor, std: Tensor):
        self.scale = (1 / (255 * std)).view(1, -1, 1, 1)
        self.shift = (-mean / std).view(1, -1, 1, 1)
        self.channels_last = False  # NHWC output (trainer.channels_last)

    def __call__(self, images: Tensor) -> Tensor:
        if self.channels_last:  # reorder the bytes, not the floats: a quarter of the memory traffic
            images = images.contiguous(memory_format=torch.channels_last)
        return images.float().mul_(self.scale).add_(self.shift)


def _epoch_order(batches, count: int, device: torch.device, start: int) -> Tensor:
    """The permutation of an epoch. A fresh epoch draws it and remembers the generator state it drew
    it from; an epoch resumed at batch `start` redraws it from that state, then returns the
    generator to where the interrupted run had left it."""
    generator = batches.generator
    if start == 0:
        batches._epoch_start = generator.get_state()
        return torch.randperm(count, device=device, generator=generator)
    current = generator.get_state()
    generator.set_state(batches._epoch_start)
    order = torch.randperm(count, device=device, generator=generator)
    generator.set_state(current)
    return order


class TensorBatches:
    """Batches sliced from an ImageSet that already lives on the training device."""

    def __init__(self, data: ImageSet, batch_size: int, normalise: Normalise, *, shuffle: bool = False,
                 augment: bool = False, generator: torch.Generator | None = None):
        self.data, self.batch_size, self.normalise = data, batch_size, normalise
        self.shuffle, self.augment, self.generator = shuffle, augment, generator
        self._epoch_start: Tensor | None = None  # generator state before this epoch's permutation
        self._resume_at = 0  # batch to continue the current epoch from, after load_state_dict

    def __len__(self) -> int:
        if self.shuffle:
            # Training drops the last partial batch: equal-sized steps, and BatchNorm never sees a
            # batch of one.
            return max(1, len(self.data) // self.batch_size)
        return math.ceil(len(self.data) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        images, labels, size = self.data.images, self.data.labels, self.batch_size
        start, self._resume_at = self._resume_at, 0
        if self.shuffle:
            order = _epoch_order(self, len(self.data), images.device, start)
        for i in range(start, len(self)):
            if self.shuffle:
                index = order[i * size:(i + 1) * size]
                x, y = images[index], labels[index]
            else:
                x, y = images[i * size:(i + 1) * size], labels[i * size:(i + 1) * size]
            if self.augment:
                x = random_crop_flip(x, self.generator)
            yield self.normalise(x), y

    def state_dict(self) -> dict[str, Tensor]:
        if self.generator is None:
            return {}
        return {"generator": self.generator.get_state(), "epoch_start": self._epoch_start}

    def load_state_dict(self, state: dict[str, Tensor], resume_at: int = 0) -> None:
        """Restore the data order; with resume_at > 0 the next epoch continues the interrupted one
        from that batch, with the same permutation and the same augmentation draws."""
        if self.generator is not None:
            self.generator.set_state(state["generator"])
            self._epoch_start = state["epoch_start"]
        self._resume_at = resume_at

    def sample(self, count: int, seed: int) -> Tensor:
        """`count` normalised, unaugmented images, the same for a given seed; drawn with a generator
        of their own, so that drawing them leaves the training order untouched."""
        index = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(seed))[:count]
        return self.normalise(self.data.images[index.to(self.data.images.device)])


def decode_image(path: str, image_size: int, channels: int) -> Tensor:
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return pil_to_tensor(image)


class ImageFiles(torch.utils.data.Dataset):
    """Decodes one file per item; an unreadable file is reported and yields None."""

    def __init__(self, files: FileSet):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        path, label = self.files.samples[index]
        try:
            return decode_image(path, self.files.image_size, self.files.channels), label
        except Exception as error:  # a corrupt file must not end a long run
            log.warning("skipped unreadable image %s: %s", path, error)
            return None


def _collate_readable(items: list[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor]:
    items = [item for item in items if item is not None]
    if not items:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


class _EpochIndices(torch.utils.data.Sampler):
    """The indices of the current epoch, set before each pass: lets an epoch start mid-way."""

    def __init__(self):
        self.indices: list[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class StreamBatches:
    """Batches decoded from files by DataLoader workers, then augmented and normalised on the device.
    Training batches are shuffled, and augmented where the dataset's config asks for it."""

    def __init__(self, files: FileSet, batch_size: int, normalise: Normalise, device: torch.device,
                 cfg: ImageFolderConfig, *, training: bool = False, seed: int = 0):
        self.files, self.device, self.normalise = files, device, normalise
        self.batch_size, self.shuffle, self.augment = batch_size, training, training and cfg.augment
        self.drop_last = training and len(files) >= batch_size
        self.generator = torch.Generator().manual_seed(seed)  # the order of the files
        self.augment_generator = torch.Generator(device=device).manual_seed(seed)
        self._epoch_start: Tensor | None = None
        self._resume_at = 0
        self.indices = _EpochIndices()
        self.loader = torch.utils.data.DataLoader(
            ImageFiles(files), batch_size=batch_size, sampler=self.indices, drop_last=self.drop_last,
            num_workers=cfg.num_workers, collate_fn=_collate_readable, pin_memory=device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
        )

    def __len__(self) -> int:
        count = len(self.files)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        start, self._resume_at = self._resume_at, 0
        count = len(self.files)
        order = _epoch_order(self, count, torch.device("cpu"), start) if self.shuffle else torch.arange(count)
        self.indices.indices = order[start * self.batch_size:].tolist()
        for images, labels in self.loader:
            if len(labels) == 0:
                continue
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.augment:
                images = random_crop_flip(images, self.augment_generator)
            yield self.normalise(images), labels

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state(), "epoch_start": self._epoch_start,
                "augment": self.augment_generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor], resume_at: int = 0) -> None:
        self.generator.set_state(state["generator"])
        self._epoch_start = state["epoch_start"]
        self.augment_generator.set_state(state["augment"])
        self._resume_at = resume_at

    def sample(self, count: int, seed: int) -> Tensor:
        """Like TensorBatches.sample, decoded from the files."""
        index = torch.randperm(len(self.files), generator=torch.Generator().manual_seed(seed))[:count]
        return self.normalise(_decode_all(self.files.subset(index)).images.to(self.device))


Batches = Union[TensorBatches, StreamBatches]


@dataclass
class Data:
    train: Batches
    val: Batches
    test: Batches | None
    input_shape: tuple[int, int, int]
    classes: list[str]
    sizes: dict[str, int]  # images per split
    in_memory: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --- loading -------------------------------------------------------------------------------------
def _torchvision_classes():
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}


def expected_files(dataset_class: type, root: Path) -> tuple[Path, list[str]]:
    """The folder torchvision reads and the files it needs there."""
    from torchvision import datasets

    if issubclass(dataset_class, datasets.CIFAR10):
        names = [name for name, _ in dataset_class.train_list + dataset_class.test_list]
        return root / dataset_class.base_folder, names + [dataset_class.meta["filename"]]
    names = [os.path.splitext(name)[0] for name, _ in dataset_class.resources]
    return root / dataset_class.__name__ / "raw", names


def load_torchvision(cfg: TorchvisionDatasetConfig) -> Splits:
    dataset_class = _torchvision_classes()[cfg.name]
    root = Path(cfg.root).expanduser()
    try:
        train = dataset_class(str(root), train=True, download=cfg.download)
        test = dataset_class(str(root), train=False, download=cfg.download)
    except Exception as error:  # missing files, a failed download, an unwritable root: all the user's to fix
        folder, names = expected_files(dataset_class, root)
        files = ", ".join(names)
        if cfg.download:
            raise UserError(
                f"Could not download {cfg.name} into {folder} (dataset.root={cfg.root!r}): {one_line(error)}. "
                f"Without network access, copy the files ({files}) into {folder} yourself and set "
                f"dataset.download=false, or point dataset.root at a folder that has them."
            ) from None
        raise UserError(
            f"{cfg.name} files are missing or corrupt: looked for {files} in {folder} "
            f"(dataset.root={cfg.root!r}). Place the files there, or set dataset.download=true on a "
            f"machine with network access."
        ) from None

    def image_set(dataset) -> ImageSet:
        data = torch.as_tensor(dataset.data)  # MNIST: tensor [N, H, W]; CIFAR-10: array [N, H, W, C]
        images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
        return ImageSet(images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.int64))

    return Splits(train=image_set(train), val=None, test=image_set(test), classes=list(train.classes))


def _find_images(folder: Path, setting: str) -> tuple[list[tuple[str, int]], list[str]]:
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    try:
        found = ImageFolder(str(folder))
    except FileNotFoundError as error:
        raise UserError(
            f"{setting}: no images found in {folder}: {one_line(error)} Expected one sub-folder per class "
            f"holding image files ({', '.join(IMG_EXTENSIONS)})."
        ) from None
    return found.samples, found.classes


def _decode_all(files: FileSet, setting: str = "dataset.path") -> ImageSet:
    def decode(sample: tuple[str, int]):
        try:
            return decode_image(sample[0], files.image_size, files.channels)
        except Exception as error:
            return error

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # PIL decodes outside the GIL
        decoded = list(pool.map(decode, files.samples))
    failed = [(path, result) for (path, _), result in zip(files.samples, decoded) if isinstance(result, Exception)]
    if failed:
        listed = "; ".join(f"{path}: {one_line(error)}" for path, error in failed[:MAX_LISTED_FILES])
        more = f" (and {len(failed) - MAX_LISTED_FILES} more)" if len(failed) > MAX_LISTED_FILES else ""
        log.warning("skipped %d unreadable image file(s): %s%s", len(failed), listed, more)
    kept = [(image, label) for image, (_, label) in zip(decoded, files.samples) if not isinstance(image, Exception)]
    if not kept:
        raise UserError(f"{setting}: none of the {len(files)} image files could be read (first: {failed[0][0]}: "
                        f"{one_line(failed[0][1])}). Point it at a folder of readable images.")
    return ImageSet(torch.stack([image for image, _ in kept]), torch.tensor([label for _, label in kept]))


def load_imagefolder(cfg: ImageFolderConfig) -> Splits:
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise UserError(
            f"dataset.path={cfg.path!r} is not a folder. Point it at a folder of class folders "
            f"(PATH/CLASS/IMAGE) or at one holding train/ and val/ or test/ folders of class folders."
        )
    layout = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    if "train" not in layout:
        layout = {"train": root}
    train_samples, classes = _find_images(layout["train"], "dataset.path")
    if len(classes) < 2:
        raise UserError(
            f"dataset.path={cfg.path!r}: found {len(classes)} class folder ({', '.join(classes)}) in "
            f"{layout['train']}; a classifier needs at least two, one sub-folder per class."
        )
    splits: dict[str, FileSet] = {"train": FileSet(train_samples, cfg.image_size, cfg.channels)}
    for name in ("val", "test"):
        if name in layout:
            samples, split_classes = _find_images(layout[name], f"dataset.path ({name}/)")
            unknown = sorted(set(split_classes) - set(classes))
            if unknown:
                raise UserError(
                    f"dataset.path={cfg.path!r}: {name}/ has class folder(s) {', '.join(unknown)} that "
                    f"train/ does not have; the classes of train/ are {', '.join(classes)}."
                )
            index = {split_class: classes.index(split_class) for split_class in split_classes}
            relabelled = [(path, index[split_classes[label]]) for path, label in samples]
            splits[name] = FileSet(relabelled, cfg.image_size, cfg.channels)

    decoded_bytes = sum(len(s) for s in splits.values()) * cfg.channels * cfg.image_size**2
    if decoded_bytes <= cfg.max_memory_mb * 2**20:
        splits = {name: _decode_all(files, f"dataset.path={cfg.path!r} ({name})") for name, files in splits.items()}
    else:
        log.info("streaming %s from disk: %.0f MB decoded exceeds dataset.max_memory_mb=%d",
                 root, decoded_bytes / 2**20, cfg.max_memory_mb)
    return Splits(train=splits["train"], val=splits.get("val"), test=splits.get("test"), classes=classes)


def load_fake(cfg: FakeDatasetConfig) -> Splits:
    generator = torch.Generator().manual_seed(FAKE_DATA_SEED)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    patterns = torch.rand(cfg.num_classes, *shape, generator=generator)
    pattern_std = 1 / math.sqrt(12)  # of a uniform [0, 1] pixel

    def draw(count: int) -> ImageSet:
        labels = (torch.arange(count) % cfg.num_classes)[torch.randperm(count, generator=generator)]
        pixels = patterns[labels] + cfg.noise * pattern_std * torch.randn(count, *shape, generator=generator)
        return ImageSet(pixels.clamp_(0, 1).mul_(255).round_().to(torch.uint8), labels)

    classes = [f"class{i}" for i in range(cfg.num_classes)]
    return Splits(train=draw(cfg.train_size), val=None, test=draw(cfg.test_size), classes=classes)


LOADERS = {
    "mnist": load_torchvision,
    "fashion_mnist": load_torchvision,
    "cifar10": load_torchvision,
    "imagefolder": load_imagefolder,
    "fake": load_fake,
}


def split_off(data: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(train, val): a fixed random share of the training split held out for validation."""
    count = len(data)
    val_count = round(count * fraction)
    if not 1 <= val_count < count:
        raise UserError(
            f"Invalid setting dataset.val_fraction={fraction}: of {count} training images it would hold out "
            f"{val_count} for validation; choose a fraction that leaves at least one image on each side."
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return data.subset(order[val_count:].sort().values), data.subset(order[:val_count].sort().values)


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of uint8 images, scaled to [0, 1], in float64 chunks."""
    total = torch.zeros(images.shape[1], dtype=torch.float64, device=images.device)
    squares = torch.zeros_like(total)
    for chunk in images.split(4096):
        chunk = chunk.to(torch.float64)
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square().sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return (mean / 255).float(), (std / 255).clamp_min(1e-3).float()


def _sample_for_stats(files: FileSet, count: int = 256) -> ImageSet:
    step = max(1, len(files) // count)
    return _decode_all(files.subset(torch.arange(0, len(files), step)[:count]))


def load_data(cfg: DatasetConfig, batch_size: int, eval_batch_size: int, device: torch.device, seed: int) -> Data:
    splits = LOADERS[cfg.name](cfg)
    train, val = (splits.train, splits.val) if splits.val is not None else split_off(
        splits.train, cfg.val_fraction, cfg.split_seed)
    test = splits.test
    in_memory = isinstance(train, ImageSet)
    if in_memory:
        train, val = train.to(device), val.to(device)
        test = test.to(device) if test is not None else None
        stats_source = train
    else:
        stats_source = _sample_for_stats(train).to(device)
    normalise = Normalise(*channel_stats(stats_source.images))

    if in_memory:
        generator = torch.Generator(device=device).manual_seed(seed)

        def batches(split, size, training=False):
            return TensorBatches(split, size, normalise, shuffle=training, augment=training and cfg.augment,
                                 generator=generator if training else None)
    else:
        def batches(split, size, training=False):
            return StreamBatches(split, size, normalise, device, cfg, training=training, seed=seed)

    return Data(
        train=batches(train, batch_size, training=True),
        val=batches(val, eval_batch_size),
        test=batches(test, eval_batch_size) if test is not None else None,
        input_shape=tuple(stats_source.images.shape[1:]),
        classes=splits.classes,
        sizes={"train": len(train), "val": len(val), "test": len(test) if test is not None else 0},
        in_memory=in_memory,
    )

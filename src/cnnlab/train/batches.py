"""Batches on the training device, drawn from decoded images or streamed from image files.

An ImageSet (uint8 tensors) is shuffled with randperm, sliced, augmented in bulk and normalised on
the device (TensorBatches). A FileSet, too large to decode at once, is decoded by DataLoader workers
and then augmented and normalised on the device the same way (StreamBatches). Both can stop in the
middle of an epoch and go on from there after a resume.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from cnnlab.datasets import ImageFolderConfig
from cnnlab.errors import UserError, one_line

log = logging.getLogger(__name__)

CROP_PADDING = 4
MAX_LISTED_FILES = 10  # unreadable or skipped files named in a message


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


# --- batches of decoded images ------------------------------------------------------------------------
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

    def sample(self, count: int, seed: int) -> tuple[Tensor, Tensor]:
        """`count` normalised, unaugmented images and their labels, the same for a given seed; drawn
        with a generator of their own, so that drawing them leaves the training order untouched."""
        index = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(seed))[:count]
        index = index.to(self.data.images.device)
        return self.normalise(self.data.images[index]), self.data.labels[index]


# --- batches decoded from files -----------------------------------------------------------------------
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
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # the order of the files
        self.augment_generator = torch.Generator(device=device).manual_seed(seed)
        # Each pass over a DataLoader draws its workers' base seed, from torch's global generator
        # unless given one. Dropout draws from the global generator too, and a checkpoint restores it:
        # a draw there would make a resumed run's dropout masks differ. So the loader draws from a
        # generator of its own, reseeded before every pass: workers' seeds depend on `seed` alone.
        self.loader_generator = torch.Generator()
        self._epoch_start: Tensor | None = None
        self._resume_at = 0
        self.indices = _EpochIndices()
        self.loader = torch.utils.data.DataLoader(
            ImageFiles(files), batch_size=batch_size, sampler=self.indices, drop_last=self.drop_last,
            num_workers=cfg.num_workers, collate_fn=_collate_readable, pin_memory=device.type == "cuda",
            persistent_workers=cfg.num_workers > 0, generator=self.loader_generator,
        )

    def __len__(self) -> int:
        count = len(self.files)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        start, self._resume_at = self._resume_at, 0
        count = len(self.files)
        order = _epoch_order(self, count, torch.device("cpu"), start) if self.shuffle else torch.arange(count)
        self.indices.indices = order[start * self.batch_size:].tolist()
        self.loader_generator.manual_seed(self.seed)
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

    def sample(self, count: int, seed: int) -> tuple[Tensor, Tensor]:
        """Like TensorBatches.sample, decoded from the files."""
        index = torch.randperm(len(self.files), generator=torch.Generator().manual_seed(seed))[:count]
        decoded = decode_files(self.files.subset(index))
        return self.normalise(decoded.images.to(self.device)), decoded.labels.to(self.device)


Batches = Union[TensorBatches, StreamBatches]


def decode_files(files: FileSet, setting: str = "dataset.path") -> ImageSet:
    def decode(sample: tuple[str, int]):
        try:
            return decode_image(sample[0], files.image_size, files.channels)
        except Exception as error:
            return error

    # PIL warns per file (a DecompressionBombWarning for a huge image, palette transparency): one line
    # that counts them, instead of Python's raw warning text for each. Recorded for the pool's threads too.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # PIL decodes outside the GIL
            decoded = list(pool.map(decode, files.samples))
    if caught:
        kinds = Counter(f"{warning.category.__name__}: {one_line(str(warning.message), 160)}" for warning in caught)
        log.warning("decoding the images of %s: PIL warned %d time(s): %s", setting, len(caught),
                    "; ".join(f"{kind} (x{count})" for kind, count in kinds.most_common(3)))
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

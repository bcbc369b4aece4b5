"""Datasets decoded once into uint8 tensors on the training device, as train, validation and test
batches (train/batches.py).

torchvision reads (and downloads) MNIST, Fashion-MNIST and CIFAR-10; cnnlab scans folders of images
itself; fake images are generated. LOADERS has one loader per kind of dataset (cnnlab.datasets);
load_data splits off validation, computes the normalisation and turns the splits into batches.
Only image folders too large for `dataset.max_memory_mb` are streamed from disk.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cnnlab.datasets import DATASETS, DatasetConfig, FakeDatasetConfig, ImageFolderConfig, TorchvisionDatasetConfig
from cnnlab.errors import UserError, one_line
from cnnlab.train.batches import (
    MAX_LISTED_FILES,
    Batches,
    FileSet,
    ImageSet,
    Normalise,
    Split,
    StreamBatches,
    TensorBatches,
    decode_files,
)

log = logging.getLogger(__name__)

FAKE_DATA_SEED = 0  # fake images are the same for every run; trainer.seed only changes the order
MAX_SCANNED_ENTRIES = 20_000_000  # files and folders an image folder's scan may visit: a wrong path ends, not hangs
FLOAT_BYTES_PER_PIXEL = 12  # load_fake's float32 temporaries per pixel of a split, at their peak (measured)


@dataclass
class Splits:
    """What a dataset provides; val is None when it must be carved from train."""

    train: Split
    val: Split | None
    test: Split | None
    classes: list[str]


@dataclass
class Data:
    """The batches of each split, and what the model and the summary need to know about them."""

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
def expected_files(dataset_class: type, root: Path) -> tuple[Path, list[str]]:
    """The folder torchvision reads and the files it needs there."""
    from torchvision import datasets

    if issubclass(dataset_class, datasets.CIFAR10):
        names = [name for name, _ in dataset_class.train_list + dataset_class.test_list]
        return root / dataset_class.base_folder, names + [dataset_class.meta["filename"]]
    names = [os.path.splitext(name)[0] for name, _ in dataset_class.resources]
    return root / dataset_class.__name__ / "raw", names


def unpack_gzipped(dataset_class: type, root: Path) -> None:
    """Unpack MNIST-style files found only as NAME.gz (as published, and as torchvision's download
    leaves them before unpacking) beside themselves, keeping the .gz, as the download path does."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import extract_archive

    if issubclass(dataset_class, CIFAR10):  # a tar archive of pickles: torchvision's check_integrity decides
        return
    folder, names = expected_files(dataset_class, root)
    for name in names:
        packed = folder / f"{name}.gz"
        if not (folder / name).exists() and packed.is_file():
            extract_archive(str(packed), str(folder), remove_finished=False)


def _readable(dataset_class: type, path: Path) -> bool:
    """Whether a dataset file is there and whole, as torchvision checks it (CIFAR: its published md5;
    MNIST: an IDX file whose size its header explains), so that a message names only the bad ones.
    Never unpickled here: a CIFAR file that fails its md5 may be anything."""
    import struct

    from torchvision.datasets.utils import check_integrity

    md5s = dict(getattr(dataset_class, "train_list", []) + getattr(dataset_class, "test_list", []))
    if path.name in md5s:
        return check_integrity(str(path), md5s[path.name])
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if path.parent.name != "raw":  # batches.meta: torchvision checks its md5 too
        meta = getattr(dataset_class, "meta", {})
        return check_integrity(str(path), meta.get("md5")) if meta.get("filename") == path.name else True
    # MNIST's IDX: 0, 0, the type code 0x08 (unsigned bytes), the rank, then big-endian int32 sizes
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08 or len(data) < 4 + 4 * data[3]:
        return False
    rank = data[3]
    return len(data) == 4 + 4 * rank + math.prod(struct.unpack(f">{rank}I", data[4:4 + 4 * rank]))


def load_torchvision(cfg: TorchvisionDatasetConfig) -> Splits:
    from torchvision import datasets

    dataset_class = getattr(datasets, DATASETS[cfg.name].torchvision_class)
    root = Path(cfg.root).expanduser()
    try:
        unpack_gzipped(dataset_class, root)
        train = dataset_class(str(root), train=True, download=cfg.download)
        test = dataset_class(str(root), train=False, download=cfg.download)
    except Exception as error:  # missing files, a failed download, an unwritable root: all the user's to fix
        folder, names = expected_files(dataset_class, root)
        files = ", ".join(names)
        if cfg.download:
            raise UserError(
                f"Could not download {cfg.name} into {folder} (dataset.root={cfg.root!r}): {one_line(error)}. "
                f"Without network access, copy the files ({files}; or the published NAME.gz ones) into "
                f"{folder} yourself and set dataset.download=false, or point dataset.root at a folder that has them."
            ) from None
        bad = [name for name in names if not _readable(dataset_class, folder / name)] or names
        raise UserError(
            f"{cfg.name} files are missing or corrupt: {', '.join(bad)} in {folder} (of {files}; each may also be "
            f"NAME.gz; dataset.root={cfg.root!r}). Place the files there, or set dataset.download=true on a "
            f"machine with network access."
        ) from None

    def image_set(dataset) -> ImageSet:
        data = torch.as_tensor(dataset.data)  # MNIST: tensor [N, H, W]; CIFAR-10: array [N, H, W, C]
        images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
        labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
        _check_labels(images, labels, len(train.classes), _labels_file(dataset), cfg)
        return ImageSet(images.contiguous(), labels)

    return Splits(train=image_set(train), val=None, test=image_set(test), classes=list(train.classes))


def _labels_file(dataset) -> str:
    """Where torchvision read a split's labels from, for messages."""
    from torchvision import datasets

    if isinstance(dataset, datasets.CIFAR10):  # labels sit in the pickled batches beside the images
        names = [name for name, _ in (dataset.train_list if dataset.train else dataset.test_list)]
        folder = os.path.join(dataset.root, dataset.base_folder)
        return f"{'one of ' if len(names) > 1 else ''}{', '.join(names)} in {folder}"
    return os.path.join(dataset.raw_folder, f"{'train' if dataset.train else 't10k'}-labels-idx1-ubyte")


def _check_labels(images: Tensor, labels: Tensor, classes: int, source: str, cfg: TorchvisionDatasetConfig) -> None:
    """torchvision takes label values as the files give them: a value beyond the classes would end
    the run later, in cross_entropy (on a GPU, with a device-side assert), so a damaged file is caught here."""
    fix = f"Replace the damaged file, or point dataset.root={cfg.root!r} at intact {cfg.name} files."
    if len(labels) != len(images):
        raise UserError(f"{source}: {len(images)} images but {len(labels)} labels; each image needs one label. {fix}")
    wrong = labels[(labels < 0) | (labels >= classes)]
    if len(wrong):
        raise UserError(f"{source} holds label value {wrong[0].item()} ({len(wrong)} label(s) out of range); "
                        f"{cfg.name} has {classes} classes, so labels must be 0 to {classes - 1}. {fix}")


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _class_folders(folder: str, dataset_root: str, setting: str) -> list[str]:
    """The class folders of a split, named as torchvision's find_classes names them (a linked folder
    counts). A link is refused where it leads out of the dataset folder, around it (a loop), or onto
    another class folder (whose images would get two labels)."""
    entries = sorted((entry for entry in os.scandir(folder) if entry.is_dir()), key=lambda entry: entry.name)
    real = {entry.name: os.path.realpath(entry.path) for entry in entries}
    for entry in (entry for entry in entries if entry.is_symlink()):  # plain sub-folders sit side by side inside
        target = real[entry.name]
        overlaps = [name for name, path in real.items()
                    if name != entry.name and (_inside(path, target) or _inside(target, path))]
        if not _inside(target, dataset_root):
            problem = f"which is outside the dataset folder {dataset_root}"
        elif _inside(os.path.realpath(folder), target):
            problem = "which holds the dataset folder itself (a loop)"
        elif overlaps:
            problem = f"which overlaps class folder {overlaps[0]} (images in both would get two labels)"
        else:
            continue
        raise UserError(
            f"{setting}: class folder {entry.path} is a link to {target}, {problem}. Links to folders are "
            f"followed only within the dataset folder, each folder once; copy those images in, or link the "
            f"image files themselves.")
    return list(real)


def find_images(folder: Path, dataset_root: Path, setting: str,
                max_entries: int = MAX_SCANNED_ENTRIES) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) of every image below folder's class folders, in torchvision ImageFolder's
    order, and the classes. Unlike ImageFolder (os.walk with followlinks=True) the scan follows no
    linked folder inside a class folder: `cat/loop -> ..` would label the dog images cat, and a link
    to / would scan the machine. Linked image files are read like any other. The scan visits at
    most `max_entries` files and folders."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    folder, dataset_root = str(folder), os.path.realpath(dataset_root)
    expected = f"Expected one sub-folder per class holding image files ({', '.join(IMG_EXTENSIONS)})."
    if not _inside(os.path.realpath(folder), dataset_root):
        raise UserError(f"{setting}: {folder} is a link to {os.path.realpath(folder)}, outside the dataset folder "
                        f"{dataset_root}. {expected}")
    classes = _class_folders(folder, dataset_root, setting)
    if not classes:
        raise UserError(f"{setting}: no images found in {folder}: it has no class folders. {expected}")
    samples, not_followed, scanned = [], [], len(classes)
    for index, name in enumerate(classes):
        visited = []
        for parent, folders, files in os.walk(os.path.join(folder, name)):  # followlinks=False
            scanned += len(folders) + len(files)
            if scanned > max_entries:
                raise UserError(
                    f"{setting}: more than {max_entries:,} files and folders in {folder}, and still "
                    f"scanning. Point it at the dataset's own folder: one sub-folder per class, or train/, "
                    f"val/ and test/ folders of them.")
            not_followed += [path for path in (os.path.join(parent, f) for f in folders) if os.path.islink(path)]
            visited.append((parent, files))
        samples += [(path, index) for parent, files in sorted(visited)
                    for path in (os.path.join(parent, file) for file in sorted(files))
                    if has_file_allowed_extension(path, IMG_EXTENSIONS)]
    empty = sorted(set(classes) - {classes[label] for _, label in samples})
    if not_followed:
        listed = ", ".join(not_followed[:MAX_LISTED_FILES])
        more = f" (and {len(not_followed) - MAX_LISTED_FILES} more)" if len(not_followed) > MAX_LISTED_FILES else ""
        log.warning("%s: did not follow %d linked folder(s) inside class folders (links to image files are "
                    "read, links to folders are not): %s%s", setting, len(not_followed), listed, more)
    if empty and samples:  # the other classes have images: name the empty class folders themselves
        paths = ", ".join(os.path.join(folder, name) for name in empty)
        raise UserError(f"{setting}: the class folder(s) {paths} hold no image files ({', '.join(IMG_EXTENSIONS)}), "
                        f"while the other classes have images. Add images to them, or remove them.")
    if empty:
        raise UserError(f"{setting}: no images found in {folder}: no image files in the class folder(s) "
                        f"{', '.join(empty)}. {expected}")
    return samples, classes


def load_imagefolder(cfg: ImageFolderConfig, max_entries: int = MAX_SCANNED_ENTRIES) -> Splits:
    """PATH/CLASS/IMAGE, or PATH/{train,val,test}/CLASS/IMAGE: decoded when they fit
    dataset.max_memory_mb, else listed to be streamed. Each split's scan visits at most `max_entries`."""
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise UserError(
            f"dataset.path={cfg.path!r} is not a folder. Point it at a folder of class folders "
            f"(PATH/CLASS/IMAGE) or at one holding train/ and val/ or test/ folders of class folders."
        )
    layout = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    if "train" not in layout:
        layout = {"train": root}
    train_samples, classes = find_images(layout["train"], root, f"dataset.path={cfg.path!r}", max_entries)
    if len(classes) < 2:
        raise UserError(
            f"dataset.path={cfg.path!r}: found {len(classes)} class folder ({', '.join(classes)}) in "
            f"{layout['train']}; a classifier needs at least two, one sub-folder per class."
        )
    splits: dict[str, FileSet] = {"train": FileSet(train_samples, cfg.image_size, cfg.channels)}
    for name in ("val", "test"):
        if name in layout:
            samples, split_classes = find_images(layout[name], root, f"dataset.path={cfg.path!r} ({name}/)",
                                                 max_entries)
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
        splits = {name: decode_files(files, f"dataset.path={cfg.path!r} ({name})") for name, files in splits.items()}
    else:
        log.info("streaming %s from disk: %.0f MB decoded exceeds dataset.max_memory_mb=%d",
                 root, decoded_bytes / 2**20, cfg.max_memory_mb)
    return Splits(train=splits["train"], val=splits.get("val"), test=splits.get("test"), classes=classes)


def available_memory() -> int:
    """Bytes of memory this process can have now: what the machine can give, or less where an
    address-space limit (ulimit -v) leaves less (an allocation past it fails, however free the machine)."""
    return min(machine_memory(), address_space_left())


def machine_memory() -> int:
    """Bytes of memory the machine can give now: MemAvailable on Linux, else all of its memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def address_space_left(limit: int | None = None, used: int | None = None) -> int | float:
    """Bytes this process may still map under RLIMIT_AS (`limit`), having mapped `used` (VmSize);
    infinite without a limit."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_AS)[0] if limit is None else limit
    if limit == resource.RLIM_INFINITY:
        return math.inf
    if used is None:
        used = 0
        with contextlib.suppress(OSError), open("/proc/self/status") as status:
            used = next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:")), 0)
    return max(limit - used, 0)


def _memory(count: int) -> str:
    return f"{count / 2**30:,.1f} GB" if count >= 2**30 else f"{count / 2**20:,.1f} MB"


def load_fake(cfg: FakeDatasetConfig, available: int | None = None) -> Splits:
    """Generated images; refused before anything is allocated when they need more than `available`
    bytes (default: what the machine can give now): torch would fail with a traceback, or the
    kernel would kill the process."""
    pixels = cfg.channels * cfg.image_size**2
    images = (cfg.train_size + cfg.test_size) * pixels  # bytes of uint8 images, kept
    needed = images + FLOAT_BYTES_PER_PIXEL * (max(cfg.train_size, cfg.test_size) + cfg.num_classes) * pixels
    available = available_memory() if available is None else available
    if needed > available:
        raise UserError(
            f"dataset.train_size={cfg.train_size}, dataset.test_size={cfg.test_size}, dataset.image_size="
            f"{cfg.image_size}, dataset.channels={cfg.channels}: generating these images needs about "
            f"{_memory(needed)} of memory ({_memory(images)} as uint8 images, drawn in float32), but "
            f"{_memory(available)} is available. Lower dataset.train_size, dataset.test_size or dataset.image_size.")
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


# One loader per kind of dataset (cnnlab.datasets.DATASETS says which kind each dataset is).
LOADERS = {"torchvision": load_torchvision, "imagefolder": load_imagefolder, "fake": load_fake}


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
    return decode_files(files.subset(torch.arange(0, len(files), step)[:count]))


def load_data(cfg: DatasetConfig, batch_size: int, eval_batch_size: int, device: torch.device, seed: int) -> Data:
    splits = LOADERS[DATASETS[cfg.name].loader](cfg)
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

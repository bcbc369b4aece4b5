import math
import logging
from urllib.error import URLError

import pytest
import torch

from cnnlab.errors import UserError
from cnnlab.train.batches import Normalise, StreamBatches, TensorBatches
from cnnlab.train.data import find_images, load_data, load_fake, load_imagefolder, load_torchvision
from tests.helpers import (
    CIFAR_CLASSES,
    crop_flip_of,
    dataset_config,
    write_cifar10,
    write_idx,
    write_image_folder,
    write_mnist,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_files_are_read_by_torchvision(tmp_path, name, folder):
    arrays = write_mnist(tmp_path, folder=folder, train=30, test=12)
    splits = load_torchvision(dataset_config(f"dataset={name}", f"dataset.root={tmp_path}", "dataset.download=false"))
    images, labels = arrays["train"]
    assert splits.train.images.shape == (30, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(images))
    assert torch.equal(splits.train.labels, torch.from_numpy(labels).long())
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(arrays["t10k"][0]))
    assert splits.val is None and len(splits.classes) == 10


def test_mnist_files_found_only_gzipped_are_unpacked_beside_themselves_as_the_download_does(tmp_path):
    import gzip

    arrays = write_mnist(tmp_path, train=30, test=12)
    raw = tmp_path / "MNIST" / "raw"
    for path in list(raw.iterdir()):
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    splits = load_torchvision(dataset_config("dataset=mnist", f"dataset.root={tmp_path}", "dataset.download=false"))
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(arrays["train"][0]))
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        [name for prefix in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")
         for name in (f"{prefix}-{kind}-ubyte", f"{prefix}-{kind}-ubyte.gz")])  # the .gz files are kept

    (raw / "train-images-idx3-ubyte").unlink()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")  # a damaged download: the one message
    with pytest.raises(UserError, match=r"missing or corrupt: train-images-idx3-ubyte in .*each may also be NAME\.gz"):
        load_torchvision(dataset_config("dataset=mnist", f"dataset.root={tmp_path}", "dataset.download=false"))


def test_cifar10_pickle_batches_are_read_channel_first(tmp_path, accept_generated_cifar):
    batches = write_cifar10(tmp_path, per_batch=4, test=6)
    splits = load_torchvision(dataset_config("dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false"))
    assert splits.train.images.shape == (20, 3, 32, 32) and splits.test.images.shape == (6, 3, 32, 32)
    data, labels = batches["data_batch_2"]
    # Row layout: 1024 red, 1024 green, 1024 blue values, each row-major over 32x32.
    assert torch.equal(splits.train.images[4:8], torch.from_numpy(data.reshape(4, 3, 32, 32)))
    assert splits.train.labels[4:8].tolist() == labels
    assert splits.classes == CIFAR_CLASSES


@pytest.mark.parametrize("root_exists", [True, False])
def test_missing_files_without_download_name_the_files_and_the_fix(tmp_path, root_exists):
    root = tmp_path / "data"
    if root_exists:
        root.mkdir()  # an empty root fails as one that is not there
    with pytest.raises(UserError) as error:
        load_torchvision(dataset_config(f"dataset.root={root}", "dataset.download=false"))
    message = str(error.value)
    assert str(root / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "dataset.download=true" in message


def test_missing_cifar_files_are_named(tmp_path):
    with pytest.raises(UserError, match="data_batch_1.*test_batch.*batches.meta"):
        load_torchvision(dataset_config("dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false"))


def test_failed_download_is_a_user_error_with_the_reason(tmp_path, monkeypatch):
    from torchvision.datasets import mnist

    def no_network(url, *args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(mnist, "download_and_extract_archive", no_network)
    with pytest.raises(UserError) as error:
        load_torchvision(dataset_config(f"dataset.root={tmp_path}", "dataset.download=true"))
    assert "Could not download mnist" in str(error.value)
    assert "Name or service not known" in str(error.value)
    assert "dataset.download=false" in str(error.value)


def test_validation_split_is_fixed_by_split_seed_not_by_the_training_seed(mnist_root):
    cfg = dataset_config(f"dataset.root={mnist_root}", "dataset.download=false", "dataset.val_fraction=0.25")
    first = load_data(cfg, batch_size=8, eval_batch_size=100, device=CPU, seed=1)
    second = load_data(cfg, batch_size=8, eval_batch_size=100, device=CPU, seed=2)
    assert first.sizes == {"train": 45, "val": 15, "test": 20}
    assert torch.equal(first.val.data.images, second.val.data.images)
    # Train and val together are exactly the original training images.
    together = torch.cat([first.train.data.labels, first.val.data.labels]).sort().values
    assert torch.equal(together, (torch.arange(60) % 10).sort().values)
    other = load_data(dataset_config(f"dataset.root={mnist_root}", "dataset.download=false", "dataset.val_fraction=0.25",
                                     "dataset.split_seed=7"), 8, 100, CPU, seed=1)
    assert not torch.equal(first.val.data.images, other.val.data.images)


def test_training_batches_are_normalised_with_the_training_statistics(mnist_root):
    data = load_data(dataset_config(f"dataset.root={mnist_root}", "dataset.download=false"), 54, 100, CPU, seed=0)
    (images, labels), = list(data.train)
    assert images.dtype == torch.float32 and images.shape == (54, 1, 28, 28)
    assert images.mean().item() == pytest.approx(0, abs=1e-4)
    assert images.std().item() == pytest.approx(1, abs=1e-3)


def test_cifar10_training_batches_are_augmented_and_eval_batches_are_not(tmp_path, accept_generated_cifar):
    write_cifar10(tmp_path, per_batch=20, test=10)
    cfg = dataset_config("dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false")
    assert cfg.augment is True
    data = load_data(cfg, batch_size=90, eval_batch_size=100, device=CPU, seed=0)
    assert data.train.augment and not data.val.augment and not data.test.augment
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    # Same generator seed, so the same order: each augmented image is a crop/flip of the plain one.
    identity = Normalise(torch.zeros(3), torch.full((3,), 1 / 255))
    plain = TensorBatches(data.train.data, 90, identity, shuffle=True, generator=torch.Generator().manual_seed(5))
    augmented = TensorBatches(data.train.data, 90, identity, shuffle=True, augment=True,
                              generator=torch.Generator().manual_seed(5))
    (x_plain, y_plain), = list(plain)
    (x_aug, y_aug), = list(augmented)
    assert torch.equal(y_plain, y_aug)
    x_plain, x_aug = x_plain.round().to(torch.uint8), x_aug.round().to(torch.uint8)
    assert all(crop_flip_of(a, p, padding=4) for a, p in zip(x_aug[:12], x_plain[:12]))
    assert not torch.equal(x_aug, x_plain)


def test_image_folder_of_class_folders_is_split_by_val_fraction(tmp_path):
    root = write_image_folder(tmp_path / "pets", classes=("cat", "dog", "owl"), per_class=10, size=12)
    cfg = dataset_config("dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8", "dataset.val_fraction=0.2")
    data = load_data(cfg, 4, 100, CPU, seed=0)
    assert data.classes == ["cat", "dog", "owl"]
    assert data.sizes == {"train": 24, "val": 6, "test": 0} and data.test is None
    assert data.input_shape == (3, 8, 8) and data.in_memory


def test_image_folder_with_train_val_test_folders_uses_them(tmp_path):
    root = tmp_path / "set"
    write_image_folder(root / "train", classes=("a", "b"), per_class=5)
    write_image_folder(root / "val", classes=("a", "b"), per_class=2, seed=1)
    write_image_folder(root / "test", classes=("b",), per_class=3, seed=2, fmt="jpg")
    cfg = dataset_config("dataset=imagefolder", f"dataset.path={root}", "dataset.channels=1", "dataset.image_size=12")
    splits = load_imagefolder(cfg)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 4, 3)
    assert splits.test.labels.tolist() == [1, 1, 1]  # "b" keeps train/'s index even though test/ has one class
    assert splits.train.images.shape == (10, 1, 12, 12)


def test_unreadable_images_are_reported_and_skipped_and_other_files_ignored(tmp_path, caplog):
    root = write_image_folder(tmp_path / "pets", per_class=4)
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    (root / "dog" / "notes.txt").write_text("not an image")
    cfg = dataset_config("dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8")
    with caplog.at_level(logging.WARNING, logger="cnnlab.train.batches"):  # decode_files reports them
        splits = load_imagefolder(cfg)
    assert len(splits.train) == 8
    assert "broken.png" in caplog.text and "notes.txt" not in caplog.text


def test_pil_warnings_while_decoding_are_one_line_that_counts_them_not_raw_warnings(tmp_path, caplog, monkeypatch):
    import warnings

    from PIL import Image

    root = write_image_folder(tmp_path / "pets", per_class=3, size=16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 256-pixel images: a DecompressionBombWarning each
    cfg = dataset_config("dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8")
    with warnings.catch_warnings(record=True) as raw, caplog.at_level(logging.WARNING, logger="cnnlab.train.batches"):
        warnings.simplefilter("always")
        splits = load_imagefolder(cfg)
    assert len(splits.train) == 6 and not raw  # nothing reached Python's warning output
    (line,) = [record.getMessage() for record in caplog.records if "PIL warned" in record.getMessage()]
    assert "PIL warned 6 time(s)" in line and "DecompressionBombWarning" in line and "(x6)" in line


def test_image_folder_mistakes_are_user_errors_that_name_the_setting(tmp_path):
    def error(path) -> str:
        with pytest.raises(UserError) as raised:
            load_imagefolder(dataset_config("dataset=imagefolder", f"dataset.path={path}"))
        assert "dataset.path" in str(raised.value)
        return str(raised.value)

    (tmp_path / "empty").mkdir()
    assert "no images found" in error(tmp_path / "empty")
    assert "at least two" in error(write_image_folder(tmp_path / "one", classes=("cat",)))
    only_text = tmp_path / "text"
    for name in ("a", "b"):
        (only_text / name).mkdir(parents=True)
        (only_text / name / "x.txt").write_text("hello")
    assert "no images found" in error(only_text)
    one_empty = write_image_folder(tmp_path / "one_empty", classes=("cat", "dog"), per_class=2)
    (one_empty / "owl").mkdir()
    assert f"the class folder(s) {one_empty / 'owl'} hold no image files" in error(one_empty)
    assert "no images found" not in error(one_empty)
    corrupt = tmp_path / "corrupt"
    for name in ("a", "b"):
        (corrupt / name).mkdir(parents=True)
        (corrupt / name / "x.png").write_bytes(b"garbage")
    assert "could be read" in error(corrupt)
    mismatched = tmp_path / "mismatched"
    write_image_folder(mismatched / "train", classes=("a", "b"), per_class=2)
    write_image_folder(mismatched / "val", classes=("a", "zebra"), per_class=2)
    assert "zebra" in error(mismatched)


def test_large_image_folders_stream_the_same_images_as_memory(tmp_path):
    root = write_image_folder(tmp_path / "pets", per_class=9, size=10)
    common = ["dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=10", "dataset.num_workers=0"]
    in_memory = load_data(dataset_config(*common), 4, 5, CPU, seed=0)
    streamed = load_data(dataset_config(*common, "dataset.max_memory_mb=0"), 4, 5, CPU, seed=0)
    assert in_memory.in_memory and not streamed.in_memory
    assert isinstance(streamed.train, StreamBatches) and len(streamed.train) == len(in_memory.train)
    for (a, la), (b, lb) in zip(in_memory.val, streamed.val, strict=True):
        assert torch.equal(la, lb)
        assert torch.allclose(a, b, atol=1e-5)
    seen = torch.cat([labels for _, labels in streamed.train])
    assert len(seen) == 16 and set(seen.tolist()) == {0, 1}


def test_fake_data_is_fixed_and_learnable_shaped():
    cfg = dataset_config("dataset=fake", "dataset.train_size=100", "dataset.test_size=20", "dataset.channels=3",
                         "dataset.image_size=16", "dataset.num_classes=4")
    one, two = (load_data(cfg, 10, 50, CPU, seed=s) for s in (0, 1))
    assert torch.equal(one.train.data.images, two.train.data.images)
    assert one.input_shape == (3, 16, 16) and one.num_classes == 4
    assert one.sizes == {"train": 90, "val": 10, "test": 20}
    assert torch.bincount(one.test.data.labels).tolist() == [5, 5, 5, 5]


def test_val_fraction_that_leaves_nothing_of_an_image_folder_is_a_user_error(tmp_path):
    # a fake or torchvision dataset's size is known, and validate() refuses such a fraction (test_cli.py)
    root = write_image_folder(tmp_path / "pets", per_class=2, size=8)
    cfg = dataset_config("dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8",
                         "dataset.val_fraction=0.05")
    with pytest.raises(UserError, match="val_fraction"):
        load_data(cfg, 2, 2, CPU, seed=0)


# --- symbolic links in image folders ---------------------------------------------------------------
@pytest.mark.parametrize("target", ["..", "/", "outside"])
def test_linked_folders_inside_a_class_folder_are_not_followed(tmp_path, caplog, target):
    # `cat/link -> ..` once made 10 images 691 samples (dog images labelled cat); `-> /` scanned the machine.
    root = write_image_folder(tmp_path / "pets", per_class=5, size=8)
    outside = write_image_folder(tmp_path / "outside", classes=("more",), per_class=3, size=8)
    (root / "cat" / "link").symlink_to(outside / "more" if target == "outside" else target)
    (root / "dog" / "linked.png").symlink_to(outside / "more" / "0.png")  # a linked file is an image like any other
    cfg = dataset_config("dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8")
    with caplog.at_level(logging.WARNING, logger="cnnlab.train.data"):
        splits = load_imagefolder(cfg)
    assert splits.classes == ["cat", "dog"]
    assert torch.bincount(splits.train.labels).tolist() == [5, 6]
    assert str(root / "cat" / "link") in caplog.text


@pytest.mark.parametrize("target", ["/", "..", ".", "outside"])
def test_a_class_folder_linked_out_of_the_dataset_or_around_it_is_a_user_error(tmp_path, target):
    root = write_image_folder(tmp_path / "pets", per_class=2, size=8)
    outside = write_image_folder(tmp_path / "outside", classes=("owl",), per_class=2, size=8)
    (root / "owl").symlink_to(outside / "owl" if target == "outside" else target)
    with pytest.raises(UserError) as error:
        load_imagefolder(dataset_config("dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8"))
    assert "dataset.path" in str(error.value) and str(root / "owl") in str(error.value)


def test_a_class_folder_linked_within_the_dataset_folder_is_read(tmp_path):
    root = tmp_path / "set"
    write_image_folder(root / "pool", classes=("cat", "dog"), per_class=3, size=8)
    (root / "train").mkdir()
    for name in ("cat", "dog"):
        (root / "train" / name).symlink_to(root / "pool" / name)
    write_image_folder(root / "val", per_class=1, size=8)
    splits = load_imagefolder(dataset_config("dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8"))
    assert splits.classes == ["cat", "dog"] and torch.bincount(splits.train.labels).tolist() == [3, 3]


def test_an_image_folder_scan_stops_at_a_limit_with_the_setting_named(tmp_path):
    root = write_image_folder(tmp_path / "pets", per_class=5, size=8)
    cfg = dataset_config("dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8")
    with pytest.raises(UserError, match=r"dataset.path=.*more than 6 files and folders"):
        load_imagefolder(cfg, max_entries=6)
    assert len(load_imagefolder(cfg, max_entries=12).train) == 10  # 2 class folders and 10 images


# --- label values ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["value", "count"])
def test_mnist_labels_that_do_not_fit_name_the_labels_file(tmp_path, fault):
    arrays = write_mnist(tmp_path, train=30, test=12)
    labels = arrays["train"][1].copy()
    if fault == "value":
        labels[7] = 200
    labels_file = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    write_idx(labels_file, labels if fault == "value" else labels[:29])
    with pytest.raises(UserError) as error:
        load_torchvision(dataset_config(f"dataset.root={tmp_path}", "dataset.download=false"))
    message = str(error.value)
    assert str(labels_file) in message
    assert ("200" in message and "0 to 9" in message) if fault == "value" else "30 images but 29 labels" in message


def test_cifar_labels_that_do_not_fit_name_the_batch_files(tmp_path, accept_generated_cifar):
    import pickle

    write_cifar10(tmp_path, per_batch=4, test=6)
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(test_batch.read_bytes())
    batch["labels"][2] = -1
    test_batch.write_bytes(pickle.dumps(batch))
    with pytest.raises(UserError, match=r"test_batch.*-1.*0 to 9"):
        load_torchvision(dataset_config("dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false"))


# --- generated data --------------------------------------------------------------------------------
@pytest.mark.parametrize("setting, value", [("train_size", 10**11), ("test_size", 10**11), ("image_size", 10**6)])
def test_fake_data_larger_than_memory_is_refused_before_allocating(setting, value):
    with pytest.raises(UserError) as error:
        load_data(dataset_config("dataset=fake", f"dataset.{setting}={value}"), 2, 2, CPU, seed=0)
    assert f"dataset.{setting}={value}" in str(error.value) and "GB" in str(error.value)


def test_fake_data_is_measured_against_the_memory_available():
    cfg = dataset_config("dataset=fake", "dataset.train_size=10000", "dataset.test_size=10", "dataset.image_size=8")
    with pytest.raises(UserError, match=r"dataset.train_size=10000,.*available"):
        load_fake(cfg, available=2**20)
    small = dataset_config("dataset=fake", "dataset.train_size=100", "dataset.test_size=10", "dataset.image_size=8")
    assert len(load_fake(small, available=2**20).train) == 100  # small enough


def test_image_folder_listing_matches_torchvisions_without_links(tmp_path):
    from torchvision.datasets import ImageFolder

    root = write_image_folder(tmp_path / "pets", classes=("dog", "cat", "b"), per_class=3, size=8)
    write_image_folder(root / "cat" / "kittens", classes=("x", "y"), per_class=2, size=8, fmt="jpg")
    (root / "dog" / "UPPER.PNG").write_bytes((root / "dog" / "0.png").read_bytes())
    (root / "dog" / "notes.txt").write_text("not an image")
    samples, classes = find_images(root, root, "dataset.path")
    reference = ImageFolder(str(root))
    assert (samples, classes) == (reference.samples, reference.classes)


def test_the_memory_check_counts_an_address_space_limit():
    import resource

    from cnnlab.train.data import address_space_left, available_memory

    assert address_space_left(limit=10 * 2**30, used=4 * 2**30) == 6 * 2**30
    assert address_space_left(limit=resource.RLIM_INFINITY) == math.inf
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    room = 2**30  # beyond what this process has mapped: a few allocations of other threads still fit
    resource.setrlimit(resource.RLIMIT_AS, (_mapped() + room, hard))
    try:
        assert available_memory() <= room
        with pytest.raises(UserError, match=r"needs about 1\.2 GB of memory .* but (1,0\d\d\.\d MB|1\.0 GB) is available"):
            load_data(dataset_config("dataset=fake", "dataset.train_size=25000", "dataset.image_size=64"), 2, 2, CPU,
                      seed=0)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _mapped() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


def test_one_corrupt_mnist_file_is_named_alone(mnist_root):
    labels = mnist_root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-3])  # cut short
    with pytest.raises(UserError) as error:
        load_data(dataset_config(f"dataset.root={mnist_root}", "dataset.download=false"), 2, 2, CPU, seed=0)
    assert "missing or corrupt: train-labels-idx1-ubyte in" in str(error.value)

import logging
from urllib.error import URLError

import numpy as np
import pytest
import torch

from cnnlab.config import validate
from cnnlab.data import (
    FileSet,
    ImageSet,
    StreamBatches,
    TensorBatches,
    load_data,
    load_imagefolder,
    load_torchvision,
    random_crop_flip,
)
from cnnlab.errors import UserError
from tests.helpers import CIFAR_CLASSES, compose_config, write_cifar10, write_image_folder, write_mnist

CPU = torch.device("cpu")


def dataset_config(*overrides):
    return validate(compose_config(*overrides)).dataset


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


def test_shuffled_batches_cover_each_sample_once_per_epoch_in_a_new_order():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    data = ImageSet(images, torch.arange(10))
    from cnnlab.data import Normalise

    identity = Normalise(torch.tensor([0.0]), torch.tensor([1 / 255]))  # x -> x
    batches = TensorBatches(data, 3, identity, shuffle=True, generator=torch.Generator().manual_seed(0))
    epochs = [[y.tolist() for _, y in batches] for _ in range(2)]
    assert len(batches) == 3 and all(len(b) == 3 for b in epochs[0])  # the partial batch is dropped
    assert all(len(set(sum(e, []))) == 9 for e in epochs)
    assert epochs[0] != epochs[1]
    for x, y in batches:
        assert torch.equal(x.view(-1), y.float())  # images stay with their labels
    eval_batches = TensorBatches(data, 4, identity)
    assert [y.tolist() for _, y in eval_batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def crop_flip_of(out, image, padding):
    """The flips (0/1) for which `out` is a window of `image` zero-padded by `padding`."""
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    height, width = image.shape[-2:]
    windows = [(padded[:, dy:dy + height, dx:dx + width], flip)
               for dy in range(2 * padding + 1) for dx in range(2 * padding + 1) for flip in (0, 1)]
    return [flip for window, flip in windows if torch.equal(out, window.flip(-1) if flip else window)]


def test_crop_and_flip_take_one_window_of_the_padded_image_per_sample():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 6, 6), dtype=torch.uint8)
    out = random_crop_flip(images, torch.Generator().manual_seed(1), padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    flips = [crop_flip_of(out[i], images[i], padding=2) for i in range(16)]
    assert all(flips), "every sample is a crop of its own padded image"
    assert 0 < sum(f[0] for f in flips) < 16  # both flipped and unflipped samples occur


def test_flip_without_padding_mirrors_columns():
    images = torch.arange(2 * 1 * 2 * 3, dtype=torch.uint8).view(2, 1, 2, 3)
    out = random_crop_flip(images.repeat(32, 1, 1, 1), torch.Generator().manual_seed(0), padding=0)
    for sample, original in zip(out, images.repeat(32, 1, 1, 1)):
        assert torch.equal(sample, original) or torch.equal(sample, original.flip(-1))


def test_cifar10_training_batches_are_augmented_and_eval_batches_are_not(tmp_path, accept_generated_cifar):
    from cnnlab.data import Normalise

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
    with caplog.at_level(logging.WARNING, logger="cnnlab.data"):
        splits = load_imagefolder(cfg)
    assert len(splits.train) == 8
    assert "broken.png" in caplog.text and "notes.txt" not in caplog.text


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


def test_streaming_skips_unreadable_files(tmp_path, caplog):
    root = write_image_folder(tmp_path / "pets", per_class=3, size=8)
    bad = root / "dog" / "zz_bad.png"
    cfg = dataset_config("dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8",
                         "dataset.num_workers=0", "dataset.max_memory_mb=0", "dataset.val_fraction=0.5")
    data = load_data(cfg, 2, 10, CPU, seed=0)
    bad.write_bytes(b"broken after the scan")
    data.val.loader.dataset.files.samples.append((str(bad), 1))
    with caplog.at_level(logging.WARNING, logger="cnnlab.data"):
        labels = torch.cat([y for _, y in data.val])
    assert len(labels) == 3 and "zz_bad.png" in caplog.text


def test_fake_data_is_fixed_and_learnable_shaped():
    cfg = dataset_config("dataset=fake", "dataset.train_size=100", "dataset.test_size=20", "dataset.channels=3",
                         "dataset.image_size=16", "dataset.num_classes=4")
    one, two = (load_data(cfg, 10, 50, CPU, seed=s) for s in (0, 1))
    assert torch.equal(one.train.data.images, two.train.data.images)
    assert one.input_shape == (3, 16, 16) and one.num_classes == 4
    assert one.sizes == {"train": 90, "val": 10, "test": 20}
    assert torch.bincount(one.test.data.labels).tolist() == [5, 5, 5, 5]


def test_val_fraction_that_leaves_nothing_is_a_user_error():
    cfg = dataset_config("dataset=fake", "dataset.train_size=4", "dataset.val_fraction=0.05")
    with pytest.raises(UserError, match="val_fraction"):
        load_data(cfg, 2, 2, CPU, seed=0)

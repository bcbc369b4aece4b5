"""Batches on the device: shuffled, cropped and flipped in bulk, and streamed from image files
exactly as a resumed run needs them, without drawing from torch's global generator."""

import logging

import pytest
import torch

from cnnlab.train.batches import ImageFiles, ImageSet, Normalise, TensorBatches, random_crop_flip
from cnnlab.train.checkpoint import save_last
from cnnlab.train.data import load_data
from cnnlab.train.loop import train_step
from tests.helpers import crop_flip_of, dataset_config, write_image_folder

CPU = torch.device("cpu")


def test_shuffled_batches_cover_each_sample_once_per_epoch_in_a_new_order():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    data = ImageSet(images, torch.arange(10))
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


def test_streaming_skips_unreadable_files(tmp_path, caplog):
    root = write_image_folder(tmp_path / "pets", per_class=3, size=8)
    bad = root / "dog" / "zz_bad.png"
    cfg = dataset_config("dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8",
                         "dataset.num_workers=0", "dataset.max_memory_mb=0", "dataset.val_fraction=0.5")
    data = load_data(cfg, 2, 10, CPU, seed=0)
    bad.write_bytes(b"broken after the scan")
    data.val.loader.dataset.files.samples.append((str(bad), 1))
    with caplog.at_level(logging.WARNING, logger="cnnlab.train.batches"):
        labels = torch.cat([y for _, y in data.val])
    assert len(labels) == 3 and "zz_bad.png" in caplog.text


# --- streamed image folders: exact resume, no draws from torch's global generator -------------------
def streamed_pets(tmp_path, *overrides):
    """A streamed (max_memory_mb=0), augmented folder of 20 8x8 images: 2 validate, 18 train."""
    root = write_image_folder(tmp_path / "pets", per_class=10, size=8)
    return ["dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8", "dataset.max_memory_mb=0",
            "dataset.augment=true", *overrides]


def take_steps(state, batches, count):
    for _ in range(count):
        images, labels = next(batches)
        train_step(state, images, labels)
        state.step, state.batch = state.step + 1, state.batch + 1


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_epoch_resumed_mid_way_ends_with_the_same_weights(tmp_path, tiny_state, workers):
    # Dropout draws from torch's global generator, which the checkpoint restores: streaming must not draw from it.
    data, run = streamed_pets(tmp_path, f"dataset.num_workers={workers}"), ("model.dropout=0.3", "trainer.batch_size=4")
    state = tiny_state(*run, data=data)
    batches = iter(state.data.train)
    take_steps(state, batches, 2)
    save_last(state)
    take_steps(state, batches, 2)  # the rest of the epoch, in memory
    expected = state.model.state_dict()

    resumed = tiny_state(*run, data=data, resume=True)
    take_steps(resumed, iter(resumed.data.train), 2)
    assert all(torch.equal(expected[key], value) for key, value in resumed.model.state_dict().items())


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_draws_nothing_from_torchs_global_generator(tmp_path, workers):
    data = load_data(dataset_config(*streamed_pets(tmp_path, f"dataset.num_workers={workers}")), 4, 4, CPU, seed=0)
    before = torch.get_rng_state()
    for batches in (data.train, data.val, data.train):  # twice: persistent workers start on the first pass only
        assert len(list(batches)) == len(batches)
    assert torch.equal(torch.get_rng_state(), before)


def test_stream_workers_are_seeded_by_the_trainer_seed_alone(tmp_path, monkeypatch):
    # Decoding draws no random numbers today; should a worker ever draw, a resumed run's workers start
    # from the same seeds as the interrupted run's. Here each item's label is its worker's seed.
    def worker_seed(self, index):
        return torch.zeros(3, 8, 8, dtype=torch.uint8), torch.utils.data.get_worker_info().seed

    cfg = dataset_config(*streamed_pets(tmp_path, "dataset.num_workers=2"))
    monkeypatch.setattr(ImageFiles, "__getitem__", worker_seed)
    fresh = load_data(cfg, 4, 4, CPU, seed=0).train
    first_pass = {y for _, labels in fresh for y in labels.tolist()}
    torch.manual_seed(1234)  # the global generator has moved on, as it has in a resumed run
    resumed = load_data(cfg, 4, 4, CPU, seed=0).train
    resumed.load_state_dict(fresh.state_dict(), resume_at=1)
    assert len(first_pass) == 2 and {y for _, labels in resumed for y in labels.tolist()} == first_pass

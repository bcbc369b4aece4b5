import shutil

import pytest
import torch
import torch.utils.serialization
from omegaconf import OmegaConf

from cnnlab.train.checkpoint import CorruptCheckpoint, load_checkpoint, save_best, save_checkpoint, save_last
from cnnlab.train.resume import load_resumable
from cnnlab.errors import UserError
from cnnlab.rundir import best_checkpoint, last_checkpoint, previous_checkpoint
from cnnlab.train.loop import train_step
from tests.helpers import TINY, compose_config

# Dropout draws random numbers at every step: a restore must give the generators back too.
DROPOUT = ("model.dropout=0.3", "trainer.epochs=2")


def take_steps(state, batches, count):
    """`count` training steps from the iterator `batches`, counted as train_epoch counts them."""
    for _ in range(count):
        images, labels = next(batches)
        train_step(state, images, labels)
        state.step, state.batch = state.step + 1, state.batch + 1


def weights(state):
    return {key: value.clone() for key, value in state.model.state_dict().items()}


def zero_middle(path, count=5000):
    """Zero `count` bytes in the middle of a file, as a failing disk might (issue 20, D6)."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - count // 2)
    before = bytes(data[start:start + count])
    data[start:start + count] = bytes(len(before))
    assert bytes(data[start:start + count]) != before, "nothing changed"
    path.write_bytes(bytes(data))


def test_a_restored_state_continues_exactly_as_the_saved_one_would(tiny_state):
    state = tiny_state(*DROPOUT)
    batches = iter(state.data.train)
    take_steps(state, batches, 3)
    save_last(state)
    take_steps(state, batches, 2)  # the same epoch's order and dropout's draws, continued in memory
    expected = weights(state)

    resumed = tiny_state(*DROPOUT, resume=True)
    assert (resumed.epoch, resumed.step, resumed.batch) == (1, 3, 3)
    take_steps(resumed, iter(resumed.data.train), 2)
    assert all(torch.equal(expected[key], value) for key, value in weights(resumed).items())


def test_a_checkpoint_that_closed_its_epoch_resumes_at_the_start_of_the_next(tiny_state):
    state = tiny_state(*DROPOUT)
    take_steps(state, iter(state.data.train), len(state.data.train))
    save_last(state)
    assert load_checkpoint(last_checkpoint(state.run_dir))["metrics"]["epochs"] == 1

    resumed = tiny_state(*DROPOUT, resume=True)
    assert (resumed.epoch, resumed.step, resumed.batch) == (2, len(state.data.train), 0)


def test_a_mid_epoch_checkpoint_counts_only_finished_epochs(tiny_state):
    state = tiny_state()
    take_steps(state, iter(state.data.train), 2)
    save_last(state)
    saved = load_checkpoint(last_checkpoint(state.run_dir))
    assert (saved["epoch"], saved["step"], saved["batch"]) == (1, 2, 2)
    assert saved["metrics"]["epochs"] == 0 and saved["metrics"]["steps"] == 2


def test_an_incomplete_checkpoint_names_what_it_lacks(tmp_path):
    save_checkpoint(last_checkpoint(tmp_path), {"model": {}, "epoch": 1, "step": 3, "val_acc": 0.5, "config": {}})
    with pytest.raises(UserError, match="not a complete cnnlab checkpoint .*optimizer"):
        load_resumable(tmp_path, {}, torch.device("cpu"))


def test_a_checkpoint_of_another_configuration_names_every_setting_that_differs(tiny_state):
    state = tiny_state()
    save_last(state)
    other = OmegaConf.to_container(compose_config(*TINY, "activation=elu", "optimizer.lr=0.5", "trainer.seed=1",
                                                  "trainer.batch_size=64", "trainer.grad_clip=1"))
    with pytest.raises(UserError, match=r"\(activation.alpha, activation.name, optimizer.lr, trainer.batch_size, "
                                        r"trainer.grad_clip, trainer.seed differ\)"):
        load_resumable(state.run_dir, other, torch.device("cpu"))


def test_the_settings_a_resume_may_change_do_not_count_as_another_configuration(tiny_state):
    state = tiny_state()
    save_last(state)
    longer = OmegaConf.to_container(compose_config(*TINY, "trainer.epochs=5", "trainer.log_every=7",
                                                   "trainer.checkpoint_every=3", "trainer.threads=1"))
    assert load_resumable(state.run_dir, longer, torch.device("cpu"))["step"] == 0


def test_a_checkpoint_of_another_model_shape_is_refused_before_anything_changes(tiny_state):
    state = tiny_state()
    save_last(state)
    saved = load_checkpoint(last_checkpoint(state.run_dir))
    saved["model"]["fc1.weight"] = torch.zeros(3, 3)
    save_checkpoint(last_checkpoint(state.run_dir), saved)
    with pytest.raises(UserError, match="different model .*fc1.weight"):
        tiny_state(resume=True)


def test_best_and_last_live_in_the_run_directorys_checkpoints_folder(tmp_path):
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.pt"
    assert best_checkpoint(tmp_path) == tmp_path / "checkpoints" / "best.pt"


def test_a_checkpoint_with_zeroed_bytes_inside_a_tensor_is_refused_as_corrupt_naming_the_file(tiny_state):
    state = tiny_state()
    take_steps(state, iter(state.data.train), 2)  # Adam's moments are not zero any more
    save_last(state)
    path = last_checkpoint(state.run_dir)
    zero_middle(path)
    assert isinstance(torch.load(path, weights_only=True), dict)  # what torch alone would have resumed from
    with pytest.raises(CorruptCheckpoint, match=r"last\.pt is corrupt \(checksum mismatch in record .*data/"):
        load_checkpoint(path)


def test_a_checkpoint_written_without_checksums_still_loads(tmp_path):
    with torch.utils.serialization.config.patch({"save.compute_crc32": False}):
        save_checkpoint(tmp_path / "old.pt", {"model": {"w": torch.ones(3)}, "step": 7})
    assert load_checkpoint(tmp_path / "old.pt")["step"] == 7


def test_writing_the_last_checkpoint_keeps_the_one_before_it_as_last_prev(tiny_state):
    state = tiny_state()
    batches = iter(state.data.train)
    take_steps(state, batches, 2)
    save_last(state)
    assert not previous_checkpoint(state.run_dir).exists()
    take_steps(state, batches, 1)
    save_last(state)
    assert load_checkpoint(previous_checkpoint(state.run_dir))["step"] == 2
    assert load_checkpoint(last_checkpoint(state.run_dir))["step"] == 3
    assert previous_checkpoint(state.run_dir).name == "last.prev.pt"


def test_a_corrupt_last_checkpoint_is_refused_offering_the_intact_one_before_it(tiny_state):
    state = tiny_state()
    batches = iter(state.data.train)
    take_steps(state, batches, 2)
    save_last(state)
    take_steps(state, batches, 1)
    save_last(state)
    last, previous = last_checkpoint(state.run_dir), previous_checkpoint(state.run_dir)
    zero_middle(last)
    with pytest.raises(UserError) as refused:
        tiny_state(resume=True)
    message = str(refused.value)
    assert f"{last} is corrupt (checksum mismatch" in message
    assert f"{previous}, the checkpoint written before it (epoch 1, step 2), is intact" in message
    assert f"cp {previous} {last}" in message

    shutil.copy(previous, last)  # what the message says to do
    resumed = tiny_state(resume=True)
    assert (resumed.epoch, resumed.step, resumed.batch) == (1, 2, 2)


def test_without_an_intact_earlier_checkpoint_a_corrupt_last_one_names_what_best_lacks(tiny_state):
    state = tiny_state()
    take_steps(state, iter(state.data.train), 2)
    save_best(state, 0.25)
    save_last(state)
    zero_middle(last_checkpoint(state.run_dir))
    with pytest.raises(UserError, match=r"No intact earlier checkpoint is kept .*best\.pt \(epoch 1, val_acc 0\.25\) "
                                        r"is intact, but it holds only the model's weights, without the optimizer"):
        load_resumable(state.run_dir, state.config, torch.device("cpu"))
    best_checkpoint(state.run_dir).unlink()
    with pytest.raises(UserError, match="the run cannot be resumed; train it again in a new folder"):
        load_resumable(state.run_dir, state.config, torch.device("cpu"))

"""A run as compare reads it: its settings as text, from its composed config and its overrides."""

from __future__ import annotations

import os

from cnnlab.analysis.runs import event_files, readable_events, settings_of
from tests.helpers import fails_after


def test_settings_are_text_as_names_show_them():
    assert settings_of(None, {"model.batchnorm": "True", "model.hidden": "[32, 32]", "optimizer.lr": "1e-3"}) == \
        {"model.batchnorm": "true", "model.hidden": "[32,32]", "optimizer.lr": "0.001"}
    assert settings_of({"activation": {"name": "elu", "alpha": 1.0}, "optimizer": {"lr": 0.1}}, {"preset": "x"}) == \
        {"activation": "elu", "activation.alpha": "1", "optimizer.lr": "0.1", "preset": "x"}


def test_special_files_named_like_event_files_are_told_apart_and_left_out_of_the_readers_folder(tmp_path):
    (tmp_path / "events.out.tfevents.1.host").write_bytes(b"")
    os.mkfifo(tmp_path / "events.out.tfevents.2.fifo")
    (tmp_path / "events.out.tfevents.3.dir").mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    with fails_after(20):  # nothing is opened: a FIFO would wait for a writer for ever
        files, special = event_files(tmp_path)
        assert [path.name for path in files] == ["events.out.tfevents.1.host"]
        assert [path.name for path in special] == ["events.out.tfevents.2.fifo", "events.out.tfevents.3.dir"]
        with readable_events(tmp_path) as folder:
            assert folder != tmp_path and [path.name for path in folder.iterdir()] == ["events.out.tfevents.1.host"]
    with readable_events(tmp_path / "events.out.tfevents.3.dir") as folder:  # nothing special: the folder itself
        assert folder == tmp_path / "events.out.tfevents.3.dir"

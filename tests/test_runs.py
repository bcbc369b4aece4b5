"""A run as compare reads it: its settings as text, from its composed config and its overrides."""

from __future__ import annotations

from cnnlab.analysis.runs import settings_of


def test_settings_are_text_as_names_show_them():
    assert settings_of(None, {"model.batchnorm": "True", "model.hidden": "[32, 32]", "optimizer.lr": "1e-3"}) == \
        {"model.batchnorm": "true", "model.hidden": "[32,32]", "optimizer.lr": "0.001"}
    assert settings_of({"activation": {"name": "elu", "alpha": 1.0}, "optimizer": {"lr": 0.1}}, {"preset": "x"}) == \
        {"activation": "elu", "activation.alpha": "1", "optimizer.lr": "0.1", "preset": "x"}

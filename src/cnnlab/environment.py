"""Settings read from environment variables (`trainer.device: ${oc.env:DEVICE}`): their values may be
secrets, so messages and checkpoints show them as written, never resolved."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def environment_settings(cfg: DictConfig, sections: tuple[str, ...]) -> dict[str, Any]:
    """Each run setting whose value reads an environment variable (`${oc.env:...}`), as written."""
    written = {}
    for section in sections:
        node = cfg.get(section) if section in cfg else None
        settings = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else {}
        for key, value in settings.items():
            if "oc.env" in str(value):
                written[f"{section}.{key}"] = value
    return written


def hide_environment(message: str, cfg: DictConfig, written: dict[str, Any]) -> str:
    """A message about cfg with the values of the settings environment_settings() found replaced by
    how they are written."""
    for key, expression in written.items():
        try:
            value = OmegaConf.select(cfg, key)
            values = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
        except Exception:  # an unset variable: OmegaConf's message names the variable, not a value
            continue
        pairs = zip(values, expression) if isinstance(values, list) and isinstance(expression, list) else \
            [(values, expression)]
        for value, written_as in pairs:
            text, shown = str(value), repr(str(written_as))
            message = message.replace(repr(text), shown).replace(f"'{text}'", shown)
            message = message.replace(text, str(written_as)) if len(text) >= 4 else message
    return message

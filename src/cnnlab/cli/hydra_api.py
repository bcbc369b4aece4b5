"""What cnnlab needs from Hydra that Hydra 1.3 does not make public: the only module that imports
`hydra._internal`. Each use is one small function that says which public API is missing, so that
a Hydra upgrade is checked here, and nowhere else."""

from __future__ import annotations

import argparse
from typing import Any


def parse_arguments(args: list[str]) -> argparse.Namespace:
    """Hydra's reading of `cnnlab train`'s arguments (overrides, -m, --cfg, --config-dir, --help...),
    unknown flags left to Hydra. Missing public API: the parser hydra.main uses is not exported."""
    from hydra._internal.utils import get_args_parser

    parsed, _ = get_args_parser().parse_known_args(args)
    return parsed


def config_loader(config_path: str, prepend: list[str]) -> Any:
    """Hydra's config loader with the search path hydra.main builds: config_path (a folder), after
    the folders in `prepend` (--config-dir). Missing public API: hydra.compose() composes in RUN mode
    only (a sweep's overrides need MULTIRUN) and through a global instance (initialize_config_dir)
    that hydra.main would then find taken; it also hides Hydra's own node unless asked, and loses the
    exceptions that say which file or setting was wrong."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    search_path = create_automatic_config_search_path(__file__, __name__, config_path)
    for folder in prepend:
        search_path.prepend(provider="command-line", path=f"file://{folder}", anchor=SearchPathQuery(provider="schema"))
    return ConfigLoaderImpl(config_search_path=search_path)


def overrides_dirname(overrides: list, exclude_keys: list[str], item_sep: str, kv_sep: str) -> str:
    """hydra.job.override_dirname of a job with these (parsed) overrides, as Hydra computes it.
    Missing public API: Hydra sets it only inside a running job, and the summary must name the jobs
    of a sweep that never started."""
    from hydra._internal.config_loader_impl import get_overrides_dirname

    return get_overrides_dirname(overrides, exclude_keys, item_sep, kv_sep)


def file_that_sets(loader: Any, config_name: str, overrides: list[str], run_mode: Any, key: str) -> str | None:
    """The YAML file whose value of `key` (a dotted path from the root), or of the nearest section
    above it, a composition keeps (the last merged that sets it); None if no file does. Missing
    public API: Hydra keeps no record of which file gave a setting; its defaults list and repository
    (a loader's methods, its internal types) say which files were merged, and where."""
    parts = key.split(".")
    for end in range(len(parts), 1, -1):
        found = []
        for default in loader.compute_defaults_list(config_name, list(overrides), run_mode).defaults:
            result = loader.repository.load_config(default.config_path) if default.config_path else None
            package = f"{default.package}." if default.package else ""
            path = ".".join(parts[:end])
            if result is None or not result.path.startswith("file://") or not f"{path}.".startswith(package):
                continue
            if _holds(result.config, path[len(package):]):
                found.append(f"{result.path[len('file://'):]}/{default.config_path}.yaml")
        if found:
            return found[-1]
    return None


def _holds(node: Any, path: str) -> bool:
    """Whether a loaded file's config has the dotted path (interpolations left unresolved)."""
    from omegaconf import DictConfig

    for part in path.split(".") if path else ():
        node = node._get_node(part) if isinstance(node, DictConfig) else None
        if node is None:
            return False
    return True

"""`cnnlab train --help`: every option and setting with its meaning, read from the YAML files.

The comments in configs/ are the documentation: `key: value  # comment`, a comment continued on the
comment lines below it (indented past the key), and the comment lines at the top of a file, which
describe the option. Read as text (our own files, in this one style), so that help needs no torch
and no composition.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ConfigDoc:
    header: list[str] = field(default_factory=list)  # the comment lines at the top of the file
    # dotted key: (value as written, its comment); a section has the value ""
    settings: dict[str, tuple[str, str]] = field(default_factory=dict)
    defaults: list[tuple[str, str, str]] = field(default_factory=list)  # a defaults list: (group, option, comment)
    global_package: bool = False  # `# @package _global_`: sets things across groups (a preset, an experiment)


def read_config_doc(path: Path) -> ConfigDoc:
    """The header, settings, comments and defaults list of one of our YAML files, read as text."""
    doc = ConfigDoc()
    sections: list[tuple[int, str]] = []  # (indent, key) of the sections the current line is in
    last, last_indent, in_header = None, 0, True  # the setting that a comment line below it continues
    for line in path.read_text(encoding="utf-8").splitlines():
        code, *rest = re.split(r"(?:^|(?<=\s))#", line, maxsplit=1)
        comment = rest[0].strip() if rest else None
        if not code.strip():
            if comment is None:  # a blank line ends the header and a comment
                in_header, last = in_header and not doc.header, None
            elif in_header and comment.startswith("@package"):
                doc.global_package = "_global_" in comment
            elif in_header:
                doc.header.append(comment)
            elif last is not None and len(code) > last_indent and doc.settings[last][1]:
                value, previous = doc.settings[last]
                doc.settings[last] = (value, f"{previous} {comment}")
            continue
        in_header = False
        indent = len(code) - len(code.lstrip())
        match = re.fullmatch(r"(- )?([^:]+?):(?:\s+(.*))?", code.strip())
        last = None
        if match is None:
            continue
        item, key, value = match[1], match[2].strip(), (match[3] or "").strip()
        while sections and sections[-1][0] >= indent:
            sections.pop()
        if item:
            if [k for _, k in sections] == ["defaults"] and value:
                doc.defaults.append((key, value, comment or ""))
            continue
        dotted = ".".join([*(k for _, k in sections), key])
        doc.settings[dotted] = (value, comment or "")
        if not value:
            sections.append((indent, key))
        last, last_indent = dotted, indent
    return doc


TRAIN_HELP = """\
cnnlab train: train a classifier from a composed config and log the run to TensorBoard.

usage: cnnlab train [GROUP=OPTION ...] [KEY=VALUE ...] [-m] [--cfg job] [--config-dir DIR]
  cnnlab train model=convnet activation=leaky_relu activation.negative_slope=0.2 trainer.epochs=3
  cnnlab train dataset=imagefolder dataset.path=~/pictures/pets dataset.image_size=64 model=convnet
  cnnlab train -m activation=relu,elu,gelu trainer.seed=0,1,2    (a sweep: one job per combination)
  cnnlab train -m experiment=relu_variants                       (a named study)
  cnnlab train model=convnet --cfg job                           (print the config, run nothing)

GROUP=OPTION picks one option of each group below; KEY=VALUE changes one setting: the settings listed \
under the option chosen (activation.negative_slope=0.2 with activation=leaky_relu), and those of \
trainer, probes and findings. A value may start with ~ (dataset.path=~/pets). Quote a value with \
spaces or characters such as # ! & ; ' " so that the quotes reach Hydra, inside the shell's own: \
'dataset.path="my pets"'.
"""

TRAIN_HELP_FOOTER = """\
Hydra's own flags work too: -m/--multirun, --cfg job, --config-dir DIR (your own option files, \
DIR/GROUP/NAME.yaml, listed above with their options), --info, --hydra-help. Runs land in \
outputs/DATE/TIME (hydra.run.dir=PATH) and sweeps in outputs/multirun/DATE/TIME (hydra.sweep.dir=PATH); \
see them with `tensorboard --logdir outputs`. The config files: {where}
"""


def print_train_help(folders: list[Path]) -> None:
    """Every group with each option's description and settings, then trainer, probes and findings:
    the defaults and comments of the YAML files. `folders` in Hydra's search order: a --config-dir
    first, cnnlab's own configs/ last."""
    packaged = folders[-1]
    folders = [folder for folder in folders if folder.is_dir()]
    width = max(60, shutil.get_terminal_size().columns) - 1
    train = read_config_doc(next(folder / "train.yaml" for folder in folders if (folder / "train.yaml").is_file()))
    groups = []
    for group, default, about in train.defaults:
        options: dict[str, Path] = {}
        for folder in reversed(folders):  # the first folder's file wins, as in Hydra
            options.update({path.stem: path for path in sorted((folder / group).glob("*.yaml"))})
        groups.append((group, default, about, dict(sorted(options.items()))))
    out = [paragraph(part, width) if not part.startswith(("usage", "  ")) else part
           for part in TRAIN_HELP.split("\n")]
    out += ["groups (GROUP=OPTION):"]
    out += [paragraph(f"{group}: {', '.join(options)}" + (f" (default {default})" if default != "null" else ""),
                      width, "  ", "    ") for group, default, _, options in groups]
    for group, default, about, options in groups:
        out += group_help(group, default, about, options, packaged, width)
    out += sections_help(train, width)
    out += ["", paragraph(TRAIN_HELP_FOOTER.format(where=packaged), width)]
    print("\n".join(out))


def paragraph(text: str, width: int, indent: str = "", more: str = "") -> str:
    return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent + more)


def settings_block(rows: list[tuple[str, str, str]], indent: str, width: int) -> list[str]:
    """`key: value  # comment` rows, comments aligned and wrapped."""
    shown = [f"{indent}{key}: {value}" for key, value, _ in rows]
    column = min(max(map(len, shown), default=0), len(indent) + 34) + 2
    if width - column < 30:
        column = len(indent) + 4
    lines = []
    for text, (_, _, comment) in zip(shown, rows):
        if not comment:
            lines.append(text)
            continue
        wrapped = textwrap.wrap(" ".join(comment.split()), max(20, width - column - 2))
        start = text.ljust(column) if len(text) + 2 <= column else None
        if start is None:
            lines.append(text)
            start = " " * column
        lines += [start + "# " + wrapped[0], *(" " * column + "# " + more for more in wrapped[1:])]
    return lines


def group_help(group: str, default: str, about: str, options: dict[str, Path], packaged: Path,
               width: int) -> list[str]:
    """One group: each option's description and settings (a bundle across groups: its first sentence)."""
    chosen = f"default {default}" if default != "null" else "none by default"
    out = ["", paragraph(f"{group}=NAME: {about or group} ({chosen})", width, "", "    ")]
    bundles = False
    for name, path in options.items():
        doc = read_config_doc(path)
        header = " ".join(line for line in doc.header if not line.startswith("cnnlab "))  # not the usage lines
        where = "" if path.parent.parent == packaged else f" [{path}]"
        if doc.global_package:  # a bundle across groups (a preset, an experiment): its first sentence
            bundles = True
            first = re.split(r"(?<=[.!?])\s+(?=[A-Z])", header, maxsplit=1)[0]
            out.append(paragraph(f"{name}: {first}{where}", width, "  ", "      "))
            continue
        out.append(paragraph(f"{name}: {header}{where}", width, "  ", "      "))
        rows = [(key, value, comment) for key, (value, comment) in doc.settings.items()
                if "." not in key and value and not (key == "name" and value == name)]
        out += settings_block(rows, "      ", width)
    if bundles:
        out.append(paragraph(f"The whole description of each is at the top of its file, "
                             f"{packaged / group}/NAME.yaml.", width, "  ", "  "))
    return out


def sections_help(train: ConfigDoc, width: int) -> list[str]:
    """train.yaml's own sections (trainer, probes, findings) and top-level settings (resume)."""
    out = []
    for section, (value, about) in train.settings.items():
        if "." in section or section in ("defaults", "hydra"):
            continue
        if value:  # a top-level setting (resume)
            out += ["", *settings_block([(section, value, about)], "", width)]
            continue
        rows = [(key.partition(".")[2], child, comment) for key, (child, comment) in train.settings.items()
                if key.startswith(f"{section}.") and "." not in key.partition(".")[2]]
        out += ["", paragraph(f"{section}.KEY=VALUE: {about or section}", width, "", "  "),
                *settings_block(rows, "  ", width)]
    return out

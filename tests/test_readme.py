"""Every `cnnlab` command in README.md's ```bash blocks runs here, in README order, in one folder
that stands for the user's working directory and home, and does what the README says it does.

The commands are read from the README when the tests are collected, so a command added there is
tested without touching this file. Generated data in the real formats stands in for downloads
(MNIST and Fashion-MNIST IDX files and CIFAR-10 pickles under data/, PNG class folders under
~/pictures/pets), a few dozen images each. The only changes made to a command are the two tables
below: example folders replaced by the real folder an earlier command made, and the changes to
commands that cannot run as written here, or would take too long. The defaults in the README's
settings tables are checked against configs/ too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from cnnlab.config import config_dir
from tests.helpers import compose_config, not_blank, read_scalars, write_cifar10, write_image_folder, write_mnist

README = Path(__file__).resolve().parents[1] / "README.md"

# Example folders in the README's commands -> the real folder that replaces them: the newest one of
# that kind made by an earlier README command (so `cnnlab compare` gets the last sweep, `cnnlab
# inspect` and `resume=` the last single run).
EXAMPLE_FOLDERS = {
    r"outputs/multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{6}": "sweeps",
    r"(?<!multirun/)outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{6}": "runs",
}


@dataclass(frozen=True)
class Change:
    why: str
    replace: dict[str, str] = field(default_factory=dict)  # an argument -> the one run instead
    drop: tuple[str, ...] = ()  # arguments starting with these are left out
    append: tuple[str, ...] = ()  # overrides added at the end (Hydra: the last value of a key wins)


# Commands that cannot run as written here, or would take too long: a piece of the command -> what
# is run instead. Every change that matches a command applies, in this order; every other command
# runs exactly as the README writes it.
QUICK = ("trainer.epochs=1", "probes.density=false", "probes.noise_every=0")  # a job's costliest parts
CHANGES = {
    "cnnlab train -m ": Change(
        "sweeps run many jobs, each paying a run's fixed costs (density images and checkpoints at every "
        "epoch, per-example gradients): one epoch each, without those two probes", append=QUICK),
    "model.batchnorm=true,false trainer.seed=0,1,2": Change(
        "18 jobs: 8 (two activations, two seeds) still have the README's folder names and seed groups",
        append=("activation=relu,elu", "trainer.seed=0,1")),
    "optimizer.lr=0.0003,0.001,0.003 trainer.seed=0,1,2": Change(
        "27 jobs: 8 (two activations, two learning rates, two seeds) still give `--tune optimizer.lr` a choice",
        append=("activation=relu,elu", "optimizer.lr=0.001,0.003", "trainer.seed=0,1")),
    "hydra/launcher=joblib": Change(
        "each joblib worker imports torch afresh: 2 workers for 2 jobs instead of 4",
        append=("activation=relu,elu", "hydra.launcher.n_jobs=2")),
    "dataset.train_size=60000": Change(
        "the remedy example's MNIST-sized data: 600 images of 28x28, still ten sigmoid layers whose gradient vanishes",
        replace={"dataset.train_size=60000": "dataset.train_size=600", "dataset.test_size=10000": "dataset.test_size=100",
                 "trainer.epochs=3": "trainer.epochs=2"},
        append=("probes.density=false", "probes.noise_every=0", "probes.every=2")),
    "hydra/launcher=submitit_slurm": Change(
        "no SLURM cluster here: the same submitit code path on this machine (hydra/launcher=submitit_local, "
        "which has no `partition`), and 2 of the 33 jobs",
        replace={"hydra/launcher=submitit_slurm": "hydra/launcher=submitit_local"},
        drop=("hydra.launcher.partition=",),
        append=("activation=relu,elu", "trainer.seed=0")),
}


# --- reading the README ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    line: int  # where it starts in README.md
    args: tuple[str, ...]  # after `cnnlab`, as the shell passes them
    comment: str  # the `# ...` after it, if any

    @property
    def text(self) -> str:
        return shlex.join(["cnnlab", *self.args])

    @property
    def exit_code(self) -> int:
        """0, unless its comment says `exit N`."""
        said = re.search(r"\bexit (\d+)", self.comment)
        return int(said.group(1)) if said else 0


def split_shell_line(line: str) -> tuple[list[str], str]:
    """The words of one shell line as bash passes them (quotes removed, no expansion), and its comment:
    words from one that starts with `#` on (a `#` inside a word, `a#b`, is part of it, as in bash)."""
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    words = list(lexer)
    for i, word in enumerate(words):
        if word.startswith("#"):
            return words[:i], " ".join(words[i:])[1:].strip()
    return words, ""


def readme_commands(text: str) -> list[Command]:
    """The `cnnlab` lines of every ```bash block, `\\` continuations joined, comments split off."""
    commands, in_bash, joined, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_bash, joined = line.strip() == "```bash", ""
        elif in_bash:
            start = start if joined else number
            joined = f"{joined} {line.strip()}".strip()
            if joined.endswith("\\"):  # continued on the next line
                joined = joined[:-1]
                continue
            words, comment = split_shell_line(joined)
            if words[:1] == ["cnnlab"]:
                commands.append(Command(start, tuple(words[1:]), comment))
            joined = ""
    return commands


def readme_section(text: str, heading: str) -> str:
    """From the line `heading` to the next heading of the same or a higher level."""
    level = heading.split()[0]
    start = text.index("\n" + heading + "\n")
    ends = [m.start() for m in re.finditer(r"\n(#{1,%d}) " % len(level), text) if m.start() > start]
    return text[start:ends[0] if ends else len(text)]


def run_directory_files(text: str) -> dict[str, str | None]:
    """The files of the Run directory tree as globs (`<act>` -> `*`) -> None where every run has
    it, the setting that must be on for it (`(with probes.density)`), or "only" (`# only for ...`)."""
    tree = re.search(r"```\n(.*?)```", readme_section(text, "## Run directory"), re.S).group(1)
    files = {}
    for name, comment in re.findall(r"[├└]── (\S+)\s*#?\s*(.*)", tree):
        setting = re.search(r"\(with ([\w.]+)\)", comment)
        files[re.sub(r"<[^>]*>", "*", name)] = "only" if comment.startswith("only") else setting and setting.group(1)
    return files


def compare_figures(text: str) -> tuple[list[str], list[str]]:
    """The files of `cnnlab compare`'s table: (always written, only sometimes: `only when ...`)."""
    always, sometimes = [], []
    for name, what in re.findall(r"^\| `([\w.]+\.png)` \| (.*)", readme_section(text, "### `cnnlab compare`"), re.M):
        (sometimes if what.startswith("only") else always).append(name)
    return always, sometimes


README_TEXT = README.read_text()
COMMANDS = readme_commands(README_TEXT)


# --- the folder the commands run in ------------------------------------------------------------------
@dataclass
class Workspace:
    root: Path  # the working directory, and HOME
    runs: list[Path] = field(default_factory=list)  # single runs made by README commands, oldest first
    sweeps: list[Path] = field(default_factory=list)

    def folders(self) -> tuple[set[Path], set[Path]]:
        outputs = self.root / "outputs"
        sweeps = set(outputs.glob("multirun/*/*"))
        runs = {path for path in outputs.glob("*/*") if path.parent.name != "multirun"}
        return runs, sweeps

    def arguments(self, command: Command) -> tuple[list[str], list[Path]]:
        """What runs here: the README's words with example folders replaced, then CHANGES; and the
        folders put in for examples."""
        args, folders = [], []
        for arg in command.args:
            for pattern, kind in EXAMPLE_FOLDERS.items():
                if re.search(pattern, arg):
                    made = getattr(self, kind)
                    assert made, f"{command.text}: no earlier README command made a folder for {arg}"
                    folders.append(made[-1].relative_to(self.root))
                    arg = re.sub(pattern, str(folders[-1]), arg)
            args.append(arg)
        for piece, change in CHANGES.items():
            if piece in command.text:
                args = [change.replace.get(arg, arg) for arg in args if not arg.startswith(change.drop)]
                args += change.append
        return args, folders


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("readme")
    write_mnist(root / "data", train=96, test=32)  # as the mnist_root fixture does: one batch per epoch
    write_mnist(root / "data", folder="FashionMNIST", train=96, test=32)
    write_cifar10(root / "data", per_batch=16, test=16)
    write_image_folder(root / "pictures" / "pets", classes=("cat", "dog"), per_class=12, size=16)
    return Workspace(root)


@dataclass
class Outcome:
    command: Command
    args: list[str]  # what ran
    out: str
    runs: list[Path]  # single-run folders it made
    sweeps: list[Path]
    before: dict[Path, str]  # metrics.json of the folders the command names, before it ran


@pytest.mark.parametrize("command", COMMANDS, ids=[f"L{c.line} {c.text}" for c in COMMANDS])
def test_readme_command_runs_and_does_what_the_readme_says(command, workspace, run_cli, monkeypatch,
                                                           accept_generated_cifar):
    monkeypatch.chdir(workspace.root)  # after run_cli's chdir: every command shares the folder
    monkeypatch.setenv("HOME", str(workspace.root))
    args, examples = workspace.arguments(command)
    before = {path: (path / "metrics.json").read_text() for path in examples if (path / "metrics.json").is_file()}
    runs, sweeps = workspace.folders()
    code, out, err = run_cli(*args)
    assert code == command.exit_code, f"README.md:{command.line}: `cnnlab {shlex.join(args)}` exited {code}:\n{err}"
    new_runs, new_sweeps = (sorted(now - then) for now, then in zip(workspace.folders(), (runs, sweeps)))
    workspace.runs += new_runs
    workspace.sweeps += new_sweeps
    outcome = Outcome(command, args, out, new_runs, new_sweeps, before)
    for pattern, check in PROMISES:
        if command.exit_code == 0 and re.search(pattern, command.text):
            check(outcome)


def test_commands_are_read_from_bash_blocks_with_continuations_joined_and_comments_split_off():
    text = ("```bash\n# a comment line\ncnnlab train a=1 \\\n    'b=x y' c=#1  # refused: exit 2\n"
            "tensorboard --logdir outputs\n```\n```\ncnnlab train not=bash\n```\n")
    assert readme_commands(text) == [Command(3, ("train", "a=1", "b=x y", "c=#1"), "refused: exit 2")]
    assert readme_commands(text)[0].exit_code == 2


def test_every_change_names_a_command_of_the_readme():
    assert [piece for piece in CHANGES if not any(piece in command.text for command in COMMANDS)] == []


def test_the_defaults_in_the_readme_tables_are_those_of_configs():
    """`| `trainer.epochs` | `5` | ...` rows (trainer, probes, model), and the dataset table's
    `| `dataset.X` | OPTIONS | `DEFAULT` or one per option | ...` rows, against the composed config."""
    from omegaconf import OmegaConf

    composed = {}

    def default(key: str, *overrides: str):
        if overrides not in composed:
            composed[overrides] = compose_config(*overrides)
        found = OmegaConf.select(composed[overrides], key, default=KeyError)
        return OmegaConf.to_object(found) if OmegaConf.is_config(found) else found

    rows = re.findall(r"^\| `(\w+\.[\w.]+)` \| `([^`]*)` \|", README_TEXT, re.M)
    assert len(rows) > 25
    for key, written in rows:
        options = [(), ("model=convnet",)]  # model.channels and model.fc_hidden are the ConvNet's
        value = next(v for v in (default(key, *o) for o in options) if v is not KeyError)
        assert value == yaml.safe_load(written), (key, written, value)
    datasets = [path.stem for path in (config_dir() / "dataset").glob("*.yaml")]
    table = readme_section(README_TEXT, "### `dataset`")
    checked = 0
    for keys, where, written in re.findall(r"^\| ((?:`dataset\.\w+`(?:, )?)+) \| ([\w, ]+) \| (.*?) \|", table, re.M):
        keys, values = re.findall(r"`([\w.]+)`", keys), re.findall(r"`([^`]*)`", written)
        options = datasets if where == "all" else where.split(", ")
        if len(keys) == len(values) and len(options) == 1:  # `train_size`, `test_size` | fake | `2048`, `512`
            pairs = [(key, options[0], value) for key, value in zip(keys, values)]
        elif len(values) in (1, len(options)):  # one default for every option, or one per option
            pairs = [(keys[0], option, value) for option, value in zip(options, values * len(options))]
        else:  # `true` for cifar10, else `false`; required: read by hand
            continue
        for key, option, value in pairs:
            assert default(key, f"dataset={option}") == yaml.safe_load(value), (key, option, value)
            checked += 1
    assert checked > 20


# --- what the README promises, by command ------------------------------------------------------------
def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def config(run: Path) -> dict:
    return yaml.safe_load((run / ".hydra" / "config.yaml").read_text())


def has_run_directory_files(run: Path) -> None:
    def on(setting: str) -> bool:
        node = config(run)
        for part in setting.split("."):
            node = node[part]
        return bool(node)

    expected = [name for name, needs in run_directory_files(README_TEXT).items() if needs is None or
                needs != "only" and on(needs)]
    missing = [name for name in expected if not list(run.glob(name))]
    assert not missing, f"{run} lacks {missing}, which README's Run directory lists"
    assert metrics(run)["status"] == "completed"


def single_run(outcome: Outcome) -> None:
    """A new run folder, outputs/DATE/TIME, holding every file of README's Run directory tree, whose
    composed config has each `KEY=VALUE` of the command line."""
    assert len(outcome.runs) == 1 and not outcome.sweeps, (outcome.runs, outcome.sweeps)
    has_run_directory_files(outcome.runs[0])
    cfg = config(outcome.runs[0])
    for arg in outcome.args:
        key, _, value = arg.partition("=")
        if "." in key and not key.startswith("hydra.") and "~" not in value:
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == yaml.safe_load(value), (key, node, value)


def sweep(outcome: Outcome) -> None:
    """outputs/multirun/DATE/TIME/ with a folder per job (each a complete run folder), summary.csv
    and summary.json."""
    assert len(outcome.sweeps) == 1 and not outcome.runs, (outcome.runs, outcome.sweeps)
    folder = outcome.sweeps[0]
    assert (folder / "summary.csv").is_file() and (folder / "summary.json").is_file()
    jobs = job_folders(folder)
    assert jobs
    for job in jobs:
        has_run_directory_files(job)


def value(args: list[str], key: str) -> str:
    """The value of KEY=VALUE in args: the last one, as Hydra takes it."""
    return [arg.partition("=")[2] for arg in args if arg.startswith(key + "=")][-1]


def job_folders(sweep_folder: Path) -> list[Path]:
    return sorted(path for path in sweep_folder.iterdir() if (path / ".hydra").is_dir())


def defaults(outcome: Outcome) -> None:
    """`cnnlab train`: MNIST, MLP [256, 128], ReLU, Adam, 5 epochs."""
    run = outcome.runs[0]
    cfg = config(run)
    assert (cfg["dataset"]["name"], cfg["model"]["name"], cfg["model"]["hidden"], cfg["activation"]["name"],
            cfg["optimizer"]["name"], cfg["trainer"]["epochs"]) == ("mnist", "mlp", [256, 128], "relu", "adam", 5)
    assert metrics(run)["epochs"] == 5


def layer_names(outcome: Outcome) -> None:
    """The TensorBoard table's tags, and the probes' layer names: a ConvNet [32, 64] + fc has
    act01_conv, act02_conv, act03_fc and layer01_conv ... layer04_classifier."""
    tags = set(read_scalars(outcome.runs[0]))
    expected = {"train/loss", "train/acc", "grad_norm/total", "lr", "perf/images_per_second", "val/loss", "val/acc",
                "epoch", "test/loss", "test/acc", "dead_fraction/all"}
    expected |= {f"{stat}/{act}" for stat in ("act_mean", "act_std", "dead_fraction", "effective_rank")
                 for act in ("act01_conv", "act02_conv", "act03_fc")}
    expected |= {f"{stat}/{layer}" for stat in ("grad_norm", "update_ratio")
                 for layer in ("layer01_conv", "layer02_conv", "layer03_fc", "layer04_classifier")}
    assert expected <= tags, sorted(expected - tags)
    assert sorted(path.name for path in (outcome.runs[0] / "density").iterdir()) == [
        "act01_conv.png", "act02_conv.png", "act03_fc.png"]


def one_job_per_activation(outcome: Outcome) -> None:
    swept = value(outcome.args, "activation").split(",")
    assert [job.name for job in job_folders(outcome.sweeps[0])] == sorted(f"activation={name}" for name in swept)


def jobs_named_by_differing_overrides(outcome: Outcome) -> None:
    """The job folder name that README's Sweeps section gives as its example, and a table of seed
    groups: one per configuration."""
    folder = outcome.sweeps[0]
    example = re.search(r"\(`(activation=[^`]+)`", readme_section(README_TEXT, "## Sweeps")).group(1)
    assert (folder / example).is_dir(), (example, [job.name for job in job_folders(folder)])
    seeds = len(value(outcome.args, "trainer.seed").split(","))
    groups = json.loads((folder / "summary.json").read_text())["groups"]
    assert len(groups) == len(job_folders(folder)) // seeds


def joblib_threads(outcome: Outcome) -> None:
    """Each job gets cores / n_jobs CPU threads (at least one)."""
    n_jobs = int(value(outcome.args, "hydra.launcher.n_jobs"))
    for job in job_folders(outcome.sweeps[0]):
        assert metrics(job)["threads"] == max(1, (os.cpu_count() or 1) // n_jobs)


def submitit(outcome: Outcome) -> None:
    assert (outcome.sweeps[0] / ".submitit").is_dir()


def compared(outcome: Outcome) -> None:
    """summary.csv, summary.json, the figures of README's table (each drawn), and the same figures in
    TensorBoard under OUT/figures; into the sweep folder, or --out."""
    args = outcome.args
    out = Path(args[args.index("--out") + 1]) if "--out" in args else Path(args[1])
    always, _ = compare_figures(README_TEXT)  # those written `only when ...` depend on the runs
    assert always, "no figures found in README's `cnnlab compare` table"
    for name in ["summary.csv", "summary.json", *always]:
        assert (out / name).is_file(), out / name
    for name in always:
        assert not_blank(out / name), name
    assert not (out / "figures").exists()  # the figures are PNGs, not a run of their own in TensorBoard


def tuned(outcome: Outcome) -> None:
    """--tune KEY: per activation, the KEY value whose seeds have the best mean validation accuracy."""
    args = outcome.args
    key = args[args.index("--tune") + 1]
    summary = json.loads((Path(args[1]) / "summary.json").read_text())["tuned"]
    by_activation: dict[str, dict[float, list[float]]] = {}
    for job in job_folders(Path(args[1])):
        section, _, name = key.rpartition(".")
        setting = config(job)[section][name]
        by_activation.setdefault(config(job)["activation"]["name"], {}).setdefault(setting, []).append(
            metrics(job)["val_acc"])
    assert summary["key"] == key and len(summary["configurations"]) == len(by_activation)
    for activation, candidates in by_activation.items():
        (entry,) = [entry for name, entry in summary["configurations"].items() if f"activation={activation}" in name]
        best = max(candidates, key=lambda v: sum(candidates[v]) / len(candidates[v]))
        assert float(entry["chosen"]) == best and len(entry["tried"]) == len(candidates)


def inspected(outcome: Outcome) -> None:
    run = Path(outcome.args[1])
    if "--json" in outcome.args:
        report = json.loads(outcome.out)
        assert {"run", "status", "epochs", "steps", "val_acc", "test_acc", "layers", "findings", "notes"} <= set(report)
        assert report["status"] == metrics(run)["status"] and report["layers"]
    else:
        assert "completed" in outcome.out and "findings" in outcome.out


def remedied(outcome: Outcome) -> None:
    """One sweep in RUN/remedies: the baseline and each remedy for each seed, remedy.json with the
    fields the README names (printed with --json), remedy.png; the recommendation is one of the remedies."""
    run = Path(outcome.args[1])
    study = json.loads((run / "remedies" / "remedy.json").read_text())
    assert {"baseline", "remedies", "recommended", "cures_all", "verdict"} <= set(study) and study["remedies"]
    assert {"overrides", "warnings", "val_acc"} <= set(study["baseline"])
    assert all({"overrides", "cleared", "remaining", "new", "val_acc", "delta", "p"} <= set(r) for r in study["remedies"])
    jobs = [job for job in (run / "remedies").iterdir() if (job / "metrics.json").is_file()]
    assert len(jobs) == (1 + len(study["remedies"])) * len(study["seeds"])
    assert study["recommended"] is None or study["recommended"] in [r["overrides"] for r in study["remedies"]]
    assert not_blank(run / "remedies" / "remedy.png")
    if "--json" in outcome.args:
        assert json.loads(outcome.out) == study
    else:
        assert "recommended:" in outcome.out


def resumed(outcome: Outcome) -> None:
    """A completed run resumed as it is: nothing to do, nothing changed; with trainer.epochs=N:
    trained on to N epochs, in its own folder."""
    run = Path(value(outcome.args, "resume"))
    assert not outcome.runs and not outcome.sweeps
    if any(arg.startswith("trainer.epochs=") for arg in outcome.args):
        epochs = int(value(outcome.args, "trainer.epochs"))
        assert (metrics(run)["status"], metrics(run)["epochs"]) == ("completed", epochs)
        assert config(run)["trainer"]["epochs"] == epochs
    else:
        assert "nothing to do" in outcome.out
        assert (run / "metrics.json").read_text() == outcome.before[run]


def nothing_run(outcome: Outcome) -> None:
    """`--help` and `--cfg job` answer without running anything."""
    assert outcome.out.strip() and not outcome.runs and not outcome.sweeps


def activations_listed(outcome: Outcome) -> None:
    """The table names every activation of configs/activation/."""
    names = [path.stem for path in (config_dir() / "activation").glob("*.yaml")]
    assert len(names) == 13 and all(name in outcome.out for name in names)


def activations_plotted(outcome: Outcome) -> None:
    plot = Path(outcome.args[outcome.args.index("--plot") + 1])
    assert plot.is_file() and not_blank(plot)


# A regular expression searched in the command as the README writes it -> what to check afterwards.
# Several may match one command; a command that none matches, or that the README says fails, is
# checked for its exit status alone.
PROMISES = [
    (r"^cnnlab train(?!.* (-m|--multirun|-c|--cfg|-h|--help|--hydra-help|--info|resume=\S+)( |$))", single_run),
    (r"^cnnlab train -m ", sweep),
    (r"^cnnlab train$", defaults),
    (r"^cnnlab train model=convnet activation=leaky_relu$", layer_names),
    (r"^cnnlab train -m activation=\S+$", one_job_per_activation),
    (r"^cnnlab train -m activation=relu,elu,selu model.batchnorm=true,false trainer.seed=0,1,2$",
     jobs_named_by_differing_overrides),
    (r"hydra/launcher=joblib", joblib_threads),
    (r"hydra/launcher=submitit", submitit),
    (r"^cnnlab compare ", compared),
    (r"^cnnlab compare .* --tune ", tuned),
    (r"^cnnlab inspect ", inspected),
    (r"^cnnlab train resume=", resumed),
    (r"^cnnlab remedy ", remedied),
    (r"^cnnlab (train )?.*(-h|--help|-c job|--cfg job)( |$)", nothing_run),
    (r"^cnnlab activations( |$)", activations_listed),
    (r"^cnnlab activations --plot ", activations_plotted),
]

"""The command line, `cnnlab train | compare | activations | inspect`: the package that runs Hydra.
Each command is a function from its arguments to the exit code (cnnlab.status).

Nothing here imports torch: `--help`, `--cfg job` and config mistakes answer before it is loaded.
"""

from __future__ import annotations

import sys

from cnnlab import __version__
from cnnlab.cli.commands import activations_command, compare_command, inspect_command
from cnnlab.cli.remedy_command import remedy_command
from cnnlab.cli.console import QuietWhenClosed, print_error
from cnnlab.cli.train_command import train_command
from cnnlab.status import EXIT_OK, EXIT_USAGE

USAGE = f"""\
cnnlab {__version__}: train small classifiers from YAML configs and see why they train well or badly.

usage: cnnlab COMMAND [ARGS...]

commands:
  train        train a classifier; everything after `train` is Hydra's (overrides, -m, --cfg job, --help)
  compare      compare runs or sweeps: table, summary.csv/json, PNG figures (`cnnlab compare --help`)
  activations  the available activations, with --plot FILE to draw them and their derivatives
  inspect      one run: status, each layer at step 0 and at the last probe, findings (--json for JSON)
  remedy       rerun a run with each remedy its warnings propose, and say which one cures it

examples:
  cnnlab train model=convnet activation=leaky_relu
  cnnlab train -m activation=relu,leaky_relu,elu,selu,gelu trainer.seed=0,1,2
  cnnlab train -m experiment=relu_variants
  cnnlab compare outputs/multirun/2026-11-22/10-31-07-123456
  cnnlab remedy outputs/2026-11-22/10-40-12-345678_activation-sigmoid --seeds 2
  cnnlab train --help
  tensorboard --logdir outputs
"""

COMMANDS = {"train": train_command, "compare": compare_command, "activations": activations_command,
            "inspect": inspect_command, "remedy": remedy_command}


def main(argv: list[str] | None = None) -> None:
    """`cnnlab ARGS`; its output may be piped into a reader that stops early (`| head -1`)."""
    import logging

    logging.raiseExceptions = False  # a log line to a closed pipe is dropped, not a "Logging error" traceback
    stdout, sys.stdout = sys.stdout, QuietWhenClosed(sys.stdout)
    try:
        code = run_command(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # what is still buffered, while a closed pipe is still quiet
    finally:
        sys.stdout = stdout
    sys.exit(code)


def run_command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] == "--version":
        print(f"cnnlab {__version__}")
        return EXIT_OK
    command = COMMANDS.get(argv[0])
    if command is None:
        print_error(f"unknown command '{argv[0]}'. Valid commands: {', '.join(COMMANDS)}. See `cnnlab --help`.")
        return EXIT_USAGE
    return command(argv[1:])

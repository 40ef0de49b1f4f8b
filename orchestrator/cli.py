"""The ``lorafleet`` command line: a table of subcommands.

Each subcommand lives in its own module under ``orchestrator.commands`` and exposes

* ``HELP: str``: one line for ``lorafleet --help``;
* ``add_arguments(parser: argparse.ArgumentParser) -> None``;
* ``run(args: argparse.Namespace) -> int``: the exit code.

Modules are imported only when their subcommand runs, so ``lorafleet --help`` stays fast
(torch, transformers and Ray are heavy imports).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help). Keep the help here so --help imports nothing heavy.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("orchestrator.commands.train", "train one or more jobs together in this process (no cluster)"),
    "validate": ("orchestrator.commands.validate", "check job spec files and print every error"),
    "estimate": ("orchestrator.commands.estimate", "predict the peak memory of jobs trained together"),
    "simulate": ("orchestrator.commands.simulate", "compare scheduling policies on a job trace (simulated)"),
    "trace": ("orchestrator.commands.trace", "job traces for the simulator: 'trace synth' writes one"),
    "eval": ("orchestrator.commands.eval", "mean token loss and perplexity of adapters or the base model on a data file"),
    "up": ("orchestrator.commands.up", "start (or reattach to) the lorafleet controller on a Ray cluster"),
    "down": ("orchestrator.commands.down", "stop the controller (and with --local the local Ray cluster)"),
    "policy": ("orchestrator.commands.policy", "show the controller's scheduling policy, or set a new one at run time"),
    "admin": ("orchestrator.commands.admin", "users and API keys on a shared cluster: add-user, remove-user, users, whoami; prune old jobs"),
    "submit": ("orchestrator.commands.jobs", "submit job specs (and their data) to a cluster; --wait follows them"),
    "run": ("orchestrator.commands.run", "register one job and follow it to the end (inside `ray job submit`)"),
    "list": ("orchestrator.commands.jobs", "your jobs on the cluster (--all: every owner's)"),
    "status": ("orchestrator.commands.jobs", "state, step/total, loss, tokens/s, ETA of jobs (--json)"),
    "logs": ("orchestrator.commands.jobs", "a job's progress lines (-f follows)"),
    "cancel": ("orchestrator.commands.jobs", "cancel a job"),
    "retry": ("orchestrator.commands.jobs", "queue a failed or cancelled job again; it resumes from its newest checkpoint"),
    "wait": ("orchestrator.commands.jobs", "wait for a job to end; exit 1 unless it succeeded"),
    "fetch": ("orchestrator.commands.jobs", "copy a finished job's adapter to a local directory"),
    "plot": ("orchestrator.commands.jobs", "loss curves of jobs on one chart (PNG)"),
}


class UserError(Exception):
    """An error the user can act on: printed as one clear message, exit code 2, no traceback."""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one (still empty) sub-parser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="lorafleet",
        description="Fine-tune many LoRA and MixLoRA adapters together on one frozen base model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs = {
        name: sub.add_parser(name, help=help_text, description=help_text)
        for name, (_module, help_text) in COMMANDS.items()
    }
    return parser, subs


#: Ray loggers whose INFO lines every client call printed in Ray's own format ("Uploading package gcs://...",
#: "Creating a file package for local module ...")
RAY_CHATTER = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk", "ray._private.runtime_env.packaging")


def setup_logging(verbose: bool = False) -> None:
    """One stderr handler on the root logger (``HH:MM:SS LEVEL logger: message``), and every message
    printed once.

    huggingface_hub gives its logger its own stderr handler and still lets records propagate to the
    root: each of its warnings came out twice, raw and in our format. Its handler is removed, so its
    records (at its own level, WARNING unless ``HF_HUB_VERBOSITY`` says otherwise) print once, in our
    format. Any other library that prints a record itself and also propagates it (transformers with
    ``CI=1``) is skipped by our handler (:func:`_printed_by_library`).
    """
    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for handler in root.handlers:
        if handler not in before:
            handler.addFilter(_printed_by_library)
    if not verbose:  # Ray's INFO lines for every call's package (the API key rides in it): not the user's news
        for name in RAY_CHATTER:  # a filter, not a level: Ray's modules set their loggers' level when imported
            logging.getLogger(name).addFilter(_warnings_and_up)
    try:  # light (~15 ms); transformers' logging module is not imported here (~1 s)
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        return
    hub = hub_logging.get_logger()
    for handler in list(hub.handlers):
        if _prints_to_console(handler):
            hub.removeHandler(handler)
    hub.propagate = True


def _warnings_and_up(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def _prints_to_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return type(handler) is logging.StreamHandler and stream is not None and stream in (
        sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)  # fmt: skip


def _printed_by_library(record: logging.LogRecord) -> bool:
    """False for a record that a console handler of its own logger (or of a parent below the root)
    has already printed; True for everything else (file and null handlers print nothing here)."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    root = logging.getLogger()
    while logger is not None and logger is not root:
        if any(_prints_to_console(h) and record.levelno >= h.level for h in logger.handlers):
            return False
        if not logger.propagate:
            break
        logger = logger.parent
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lorafleet`` console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser()
    # The subcommand is the first argument naming one; only its module is imported, to add its options.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        parser.parse_args(argv)  # --help exits 0; an unknown command exits 2 with argparse's message
        parser.print_help()
        return 2 if argv else 0
    module = importlib.import_module(COMMANDS[command][0])
    module.add_arguments(subs[command])
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"lorafleet {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the dashboard went away mid-call (e.g. `logs -f` across `lorafleet down`)
        if not type(exc).__module__.startswith(("requests", "urllib3")):
            raise
        print(f"lorafleet {command}: error: lost the connection to the cluster: {type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)  # fmt: skip
        return 2


if __name__ == "__main__":
    # Run through the imported module so commands and this entry point share one UserError class.
    from orchestrator import cli

    sys.exit(cli.main())

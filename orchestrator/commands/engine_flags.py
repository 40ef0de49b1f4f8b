"""The fused-step flags shared by ``lorafleet train`` (this process's engine) and ``lorafleet up`` (every worker's)."""

from __future__ import annotations

import argparse


def add_engine_arguments(parser: argparse.ArgumentParser, whose: str = "") -> None:
    """``--no-packing``, ``--autocast``, ``--activation-checkpointing``; ``whose`` prefixes the help (e.g. "workers: ")."""
    parser.add_argument("--no-packing", action="store_true",
                        help=f"{whose}right-pad jobs' rows instead of packing sequences end to end (docs/performance.md)")
    parser.add_argument("--autocast", action="store_true",
                        help=f"{whose}bf16 autocast of the forward (GPU); adapter weights and optimizer stay fp32")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help=f"{whose}recompute decoder layers in backward: less memory, about 1/3 more compute")  # fmt: skip


def engine_options(args: argparse.Namespace) -> dict[str, bool]:
    """The ``EngineSettings`` fields the flags change from their defaults (missing attributes: defaults)."""
    options: dict[str, bool] = {}
    if getattr(args, "no_packing", False):
        options["packing"] = False
    if getattr(args, "autocast", False):
        options["autocast"] = True
    if getattr(args, "activation_checkpointing", False):
        options["activation_checkpointing"] = True
    return options

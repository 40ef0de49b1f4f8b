"""``lorafleet up``'s flags for the workers' fused step become ``TrainingWorker`` keyword arguments."""

from __future__ import annotations

import argparse
import inspect

import pytest

from actors.worker import TrainingWorker
from orchestrator.commands import up


def options(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    return up.worker_options_from(parser.parse_args(list(argv)))


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        ((), {}),
        (("--no-packing",), {"packing": False}),
        (("--autocast", "--activation-checkpointing"), {"autocast": True, "activation_checkpointing": True}),
        (("--memory-budget", "1000", "--autocast"), {"memory_budget_bytes": 1000, "autocast": True}),
    ],
)
def test_flags_become_worker_options(argv, want):
    got = options(*argv)
    assert got == want
    accepted = inspect.signature(TrainingWorker.__init__).parameters
    assert all(key in accepted for key in got)  # every option is a worker keyword argument

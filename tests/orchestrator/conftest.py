"""Fixtures shared by the orchestrator tests: a controller in this process behind ``client.call``, and
fake worker actors (no Ray)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import client
from orchestrator import controller as controller_mod
from orchestrator.controller import Controller
from tests.orchestrator.test_tenancy import _FakeActorClass


@pytest.fixture
def cli_controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Controller]:
    """A controller in this process; ``client.call`` (what ``admin`` uses over Ray) answers from it,
    JSON both ways, as over Ray."""
    c = Controller(str(tmp_path / "store" / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"},
                   start_loop=False, num_gpus=0)  # fmt: skip

    def call(method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(c, method)(*json.loads(json.dumps(args)), **json.loads(json.dumps(kwargs)))
        return json.loads(json.dumps(result))

    monkeypatch.setattr(client, "connect", lambda address: None)
    monkeypatch.setattr(client, "call", call)
    monkeypatch.delenv("LORAFLEET_API_KEY_FILE", raising=False)
    yield c
    c.store.close()


@pytest.fixture
def fake_workers(monkeypatch: pytest.MonkeyPatch) -> _FakeActorClass:
    fake = _FakeActorClass()
    monkeypatch.setattr(controller_mod, "worker_actor_class", lambda: fake)
    monkeypatch.setattr(Controller, "_poll", lambda self, now: None)  # no Ray: nothing to poll
    return fake

"""``lorafleet list --all`` / ``status --all`` and ``Client.list(all=True)``: every owner's jobs, another
owner's with public fields only unless the caller is an admin (the controller's ``list_jobs`` redaction)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator import agent
from orchestrator.cli import UserError, build_parser
from orchestrator.commands import jobs
from orchestrator.controller import PUBLIC_FIELDS, Controller
from orchestrator.remote import Client
from tests.orchestrator.test_tenancy import ctl, spec, users  # noqa: F401  (fixtures)


class KeyedClient(Client):
    """The real ``Client`` with its agent calls answered by ``ctl`` as the agent would: JSON both
    ways, the caller's API key added to the calls that take one (``agent.KEYED_CALLS``)."""

    def __init__(self, ctl: Controller, api_key: str | None, owner: str | None = None):  # noqa: F811
        self.ctl, self.api_key, self.owner = ctl, api_key, owner

    def _call(self, method: str, **kwargs: Any) -> Any:
        assert method in agent.ALLOWED_CALLS, method
        if method in agent.KEYED_CALLS:
            kwargs["api_key"] = self.api_key
        result = getattr(self.ctl, method)(**json.loads(json.dumps(kwargs)))
        return json.loads(json.dumps(result, default=str))


def cli(command: str, *argv: str):
    parser, subs = build_parser()
    jobs.add_arguments(subs[command])
    return parser.parse_args([command, *argv])


@pytest.fixture
def queue(ctl, users):  # noqa: F811
    return {owner: ctl.submit(spec(f"{owner}-job"), api_key=users[owner])["id"] for owner in ("alice", "bob")}


def test_client_list_all_shows_every_owner_redacting_others_for_a_non_admin(ctl, users, queue):  # noqa: F811
    bob = KeyedClient(ctl, users["bob"])
    assert [j["id"] for j in bob.list()] == [queue["bob"]]  # unchanged: only mine
    listed = {j["id"]: j for j in bob.list(all=True)}
    assert set(listed) == set(queue.values())
    assert "spec" in listed[queue["bob"]] and "redacted" not in listed[queue["bob"]]
    assert set(listed[queue["alice"]]) == {*PUBLIC_FIELDS, "redacted"}


def test_admin_list_all_shows_every_job_in_full(ctl, users, queue, capsys):  # noqa: F811
    root = KeyedClient(ctl, users["root"])
    assert root.list() == []  # root's own jobs: none (what the audit saw)
    assert jobs.do_list(root, cli("list", "--all", "--json")) == 0
    rows = {r["owner"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"alice", "bob"} and not any(r.get("redacted") for r in rows.values())
    assert rows["alice"]["id"] == queue["alice"] and "step" in rows["alice"]


def test_status_all_for_a_non_admin_marks_the_redacted_rows(ctl, users, queue, capsys):  # noqa: F811
    bob = KeyedClient(ctl, users["bob"])
    assert jobs.do_status(bob, cli("status", "--all", "--json")) == 0
    rows = {r["owner"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["alice"]["redacted"] is True and "loss" not in rows["alice"] and "output" not in rows["alice"]
    assert "redacted" not in rows["bob"] and "loss" in rows["bob"]
    assert jobs.do_list(bob, cli("list", "--all")) == 0  # the table: a redacted row prints without its progress
    table = capsys.readouterr().out.splitlines()
    alice_row = next(line for line in table if queue["alice"] in line).split("\t")
    assert alice_row[2] == "QUEUED" and alice_row[3:7] == ["-"] * 4 and alice_row[-1] == "alice"


def test_status_refuses_a_job_with_all(ctl, users):  # noqa: F811
    with pytest.raises(UserError, match=r"--all: .*takes no JOB \(got 'x'\)"):
        jobs.do_status(KeyedClient(ctl, users["bob"]), cli("status", "x", "--all"))


def test_single_user_mode_list_all_shows_everyone(ctl):  # noqa: F811
    a, b = ctl.submit(spec("a"), "carol")["id"], ctl.submit(spec("b"), "dave")["id"]
    client = KeyedClient(ctl, None, owner="carol")
    assert [j["id"] for j in client.list()] == [a]
    assert {j["id"] for j in client.list(all=True)} == {a, b}

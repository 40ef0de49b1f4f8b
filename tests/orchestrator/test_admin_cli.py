"""``lorafleet admin prune``: the ``--older-than`` parser, argument errors caught before connecting,
and the command against a real controller in this process (its calls answered without Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import cli, client
from orchestrator.cli import UserError
from orchestrator.commands.admin import parse_duration, parse_states
from orchestrator.controller import Controller
from tests.orchestrator.test_tenancy import spec

FORMS = "use 90s, 45m, 12h, 30d, or a bare number of seconds"


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90.0), ("45m", 2700.0), ("12h", 43200.0), ("30d", 2592000.0), ("3600", 3600.0), ("0", 0.0),
    ("1.5h", 5400.0), (" 7D ", 604800.0), ("0.5", 0.5),
])  # fmt: skip
def test_durations(text: str, seconds: float):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5d", "5w", "30 days", "d", "5dd", "1e3", "inf", "nan", "1,5h",
                                  ".5h", "5.h"])  # fmt: skip
def test_bad_durations_name_the_option_and_the_forms(text: str):
    with pytest.raises(UserError) as err:
        parse_duration(text)
    assert str(err.value) == f"--older-than: {text!r} is not a duration; {FORMS}"


def test_a_duration_too_large_for_a_float_is_refused():
    with pytest.raises(UserError, match=f"--older-than: '9+' is too large; {FORMS}"):
        parse_duration("9" * 400)


def test_states():
    assert parse_states("succeeded,FAILED, cancelled") == ["CANCELLED", "FAILED", "SUCCEEDED"]
    with pytest.raises(UserError, match=r"--state: 'running' is not an ended state; use a comma-separated list "
                                        r"of succeeded, failed, cancelled"):  # fmt: skip
        parse_states("succeeded,running")
    with pytest.raises(UserError, match="--state: no state given"):
        parse_states(",")


@pytest.mark.parametrize("argv, message", [
    (["prune"], "admin prune: give --older-than AGE (90s, 45m, 12h, 30d, or a bare number of seconds), "
                "e.g. --older-than 30d"),
    (["prune", "--older-than", "soon"], f"--older-than: 'soon' is not a duration; {FORMS}"),
    (["prune", "--older-than=-1d"], f"--older-than: '-1d' is not a duration; {FORMS}"),
    (["prune", "alice", "--older-than", "1d"],
     "admin prune: takes no NAME (got 'alice'); to prune one owner's jobs use --owner alice"),
    (["prune", "--older-than", "1d", "--state", "queued"], "--state: 'queued' is not an ended state"),
    (["remove-user", "bob", "--dry-run"], "admin remove-user: --dry-run applies only to prune"),
    (["users", "--older-than", "1d"], "admin users: --older-than applies only to prune"),
    (["remove-user"], "admin remove-user: give the user NAME"),  # unchanged
])  # fmt: skip
def test_argument_errors_are_one_line_before_connecting(monkeypatch, capsys, argv: list[str], message: str):
    monkeypatch.setattr(client, "connect", lambda address: pytest.fail("connected despite a bad argument"))
    assert cli.main(["admin", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorafleet admin: error: {message}") and err.count("\n") == 1, err


@pytest.fixture
def ctl(cli_controller: Controller) -> Controller:
    return cli_controller


def test_prune_command(ctl: Controller, monkeypatch, capsys):
    root = ctl.add_user("root", admin=True)["key"]
    alice = ctl.add_user("alice", api_key=root)["key"]
    done = [ctl.submit(spec(f"d{i}"), api_key=alice)["id"] for i in range(12)]
    for job in done:
        ctl.cancel(job, api_key=alice)
    live = ctl.submit(spec("live"), api_key=alice)["id"]

    monkeypatch.setenv("LORAFLEET_API_KEY", alice)
    assert cli.main(["admin", "prune", "--older-than", "0"]) == 2
    assert "only an admin may prune jobs (you are 'alice')" in capsys.readouterr().err

    monkeypatch.setenv("LORAFLEET_API_KEY", root)
    assert cli.main(["admin", "prune", "--older-than", "30d"]) == 0
    assert capsys.readouterr().out == "no job that ended more than 30d ago matches; nothing deleted\n"
    assert cli.main(["admin", "prune", "--older-than", "0", "--dry-run", "--owner", "alice"]) == 0
    assert capsys.readouterr().out == (f"would delete 12 jobs that ended more than 0 ago (dry run: nothing "
                                       f"deleted): {', '.join(done[:10])} and 2 more\n")  # fmt: skip
    assert len(ctl.store.list()) == 13
    assert cli.main(["admin", "prune", "--older-than", "0", "--state", "cancelled,failed"]) == 0
    assert capsys.readouterr().out == (f"deleted 12 jobs that ended more than 0 ago from the job store (their "
                                       f"files in the storage are kept): {', '.join(done[:10])} and 2 more\n")  # fmt: skip
    assert [r.id for r in ctl.store.list()] == [live]


def test_prune_uploads_flag(ctl: Controller, monkeypatch, capsys):
    """``--uploads`` reaches the controller and the summary counts the deleted upload areas."""

    root = ctl.add_user("root", admin=True)["key"]
    area = Path(ctl.uploads_root("root")) / "0123456789ab"
    area.mkdir(parents=True)
    (area / "data-d.jsonl").write_text('{"text": "x"}\n')
    doc = spec("up")
    doc["data"] = {"path": str(area / "data-d.jsonl")}
    job = ctl.submit(doc, api_key=root)["id"]
    ctl.cancel(job, api_key=root)
    monkeypatch.setenv("LORAFLEET_API_KEY", root)
    assert cli.main(["admin", "prune", "--older-than", "0", "--uploads"]) == 0
    assert capsys.readouterr().out == (f"deleted 1 job that ended more than 0 ago from the job store; and 1 upload "
                                       f"area (their outputs in the storage are kept): {job}\n")  # fmt: skip
    assert not area.exists()
    assert cli.main(["admin", "users", "--uploads"]) == 2
    assert "--uploads applies only to prune" in capsys.readouterr().err


def test_policy_set_warns_of_a_quota_of_zero_and_status_says_why_the_job_waits(
        ctl: Controller, fake_workers, monkeypatch, capsys, tmp_path: Path):  # fmt: skip
    """The audit: `quotas: {default: 0}` was set without a word, then every job stayed QUEUED and
    `status` showed only "submitted". Now `policy set` warns (and still sets it: 0 pauses owners),
    and `status JOB` says which rule holds the job, in the words `policy explain` uses."""
    ctl.num_gpus = 1
    path = tmp_path / "pol.yaml"
    path.write_text("policy: aspen\nquotas: {default: 0}\n")
    assert cli.main(["policy", "set", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("policy: aspen\n")
    assert err == (f"warning: {path}: quotas.default: 0 running jobs: no job of any owner will start; each stays "
                   "queued (`lorafleet status JOB` says why) until the quota is raised. Give at least 1 to limit "
                   "rather than block, or leave the entry out for no limit\n")  # fmt: skip
    job = ctl.submit(spec("held"), owner="root")["id"]
    for _ in range(3):
        ctl.tick()
    from types import SimpleNamespace

    from orchestrator.commands.jobs import do_status

    stub = SimpleNamespace(status=lambda job_id: json.loads(json.dumps(ctl.status(job_id))))  # as over Ray
    assert do_status(stub, SimpleNamespace(job=job, json=False, limit=20)) == 0  # `lorafleet status JOB`
    why = ("held by the policy's quota rule: owner root at quota (0/0 running; a quota of 0 lets none start until "
           f"an admin raises it); it starts once that changes (`lorafleet policy explain {job}` shows every "
           "worker's verdict)")  # fmt: skip
    assert f"  waiting: {why}\n" in capsys.readouterr().out
    import io

    from rich.console import Console

    from orchestrator.commands.jobs import do_list, print_jobs

    listed = json.loads(json.dumps(ctl.list_jobs()))  # `lorafleet list` has it too (README), as over Ray
    assert [r.get("waiting") for r in listed] == [why]
    assert do_list(SimpleNamespace(list=lambda **kw: listed), SimpleNamespace(json=True, limit=20, all=False)) == 0
    assert [r["waiting"] for r in json.loads(capsys.readouterr().out)] == [why]
    screen = io.StringIO()
    print_jobs(listed, Console(file=screen, force_terminal=True, width=100), notes=True)
    assert screen.getvalue().splitlines()[-1] == f"{job} (held) waiting: {why}"
    assert cli.main(["policy", "explain", job]) == 0
    assert "owner root at quota (0/0 running; a quota of 0 lets none start" in capsys.readouterr().out
    assert [line.split(" ", 1)[1] for line in ctl.logs(job) if "waiting:" in line] == [f"waiting: {why}"]  # once
    path.write_text("policy: aspen\n")
    assert cli.main(["policy", "set", str(path)]) == 0
    assert capsys.readouterr().err == ""
    ctl.tick()
    assert ctl.status(job)["state"] == "PROFILING" and "waiting" not in ctl.status(job)


def test_policy_show_prints_a_failing_policy_and_policy_set_refuses_one_that_raises_on_the_queue(
        ctl: Controller, fake_workers, capsys, tmp_path: Path):  # fmt: skip
    """The audit: `policy set` took a policy whose schedule() raises (exit 0), `policy show` showed it as
    normal while no job was placed. Now show prints the failure and the fallback to fifo, and set
    refuses such a policy while jobs are queued (its schedule() is dry-run on the current queue)."""
    import re

    from tests.orchestrator.test_controller_logic import HERE

    path = tmp_path / "pol.yaml"
    path.write_text(f"policy: {HERE}:Failing\n")
    assert cli.main(["policy", "set", str(path)]) == 0  # nothing queued: nothing to dry-run on
    capsys.readouterr()
    job = ctl.submit(spec("j"), owner="root")["id"]
    ctl.tick()
    assert cli.main(["policy", "show"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"policy: {HERE}:Failing", "# its name: failing"]  # YAML that policy set reads back
    assert re.fullmatch(rf"# policy {HERE}:Failing FAILING since \d\d:\d\d:\d\d: \S+: RuntimeError: boom; scheduling "
                        r"falls back to fifo until it is fixed or replaced \(lorafleet policy set\)", out[2])  # fmt: skip
    assert "# " + ctl.status(job)["waiting"] == out[2]
    path.write_text("policy: fifo\n")
    assert cli.main(["policy", "set", str(path)]) == 0  # replaced: the failure goes
    assert capsys.readouterr().out == "policy: fifo\n"
    path.write_text(f"policy: {HERE}:Failing\n")
    assert cli.main(["policy", "set", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"lorafleet policy: error: policy {HERE}:Failing: schedule\(\) failed on the current queue \(1 queued, 0 "
                        r"running jobs\): \S+: RuntimeError: boom; not set, policy fifo stays\n", err)  # fmt: skip
    assert ctl.get_policy()["name"] == "fifo"
    path.write_text(f"policy: {HERE}:BadDecisions\n")  # invalid decisions on the queue: set, each a warning
    assert cli.main(["policy", "set", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"policy: {HERE}:BadDecisions\n") and err.startswith(
        f"warning: policy {HERE}:BadDecisions: on the current queue, Start(job_id='no-such-job', worker_id='free-gpu-0'): "
        "job not queued: it is not in the view (unknown or ended) (such a decision is skipped)\n")  # fmt: skip

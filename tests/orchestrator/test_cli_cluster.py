"""``lorafleet up --local`` / ``policy`` / ``down --local`` as a user runs them (subprocesses).

Checks that ``down --local`` stops exactly the processes ``up --local`` started (and deletes its
temp dir), that laptop commands on that machine find the cluster with no address, and that the
client says clearly when no controller runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def lorafleet(home: Path, *args: str, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({"LORAFLEET_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", **extra_env})
    exe = Path(sys.executable).with_name("lorafleet")  # the console script, as users run it
    return subprocess.run([str(exe), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_up_policy_down_local(tmp_path):
    home = tmp_path / "home"
    # a shell that still exports the dashboard of an earlier `up --local` (as that one printed it)
    up = lorafleet(home, "up", "--local", "--num-gpus", "1", "--num-cpus", "1", "--activation-checkpointing",
                   RAY_ADDRESS="http://127.0.0.1:1")  # fmt: skip
    state_file = home / "local-cluster.json"
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert "started controller (policy fifo" in up.stdout
        # the controller holds the workers' engine options and reports them
        assert "workers' fused step: packing on, autocast off, activation checkpointing on" in up.stdout, up.stdout
        state = json.loads(state_file.read_text())
        assert state["address"].startswith("127.0.0.1:") and state["pids"]
        assert f"\nexport RAY_ADDRESS={state['dashboard']}\n" in up.stdout
        check_client_commands(home, state, tmp_path)
        again = lorafleet(home, "up")
        assert again.returncode == 0 and "reattached to controller" in again.stdout, again.stderr[-2000:]
        bad = tmp_path / "bad.yaml"
        bad.write_text("policy: nope\n")
        res = lorafleet(home, "policy", "set", str(bad))
        assert res.returncode == 2 and "policy: must be one of" in res.stderr, res.stderr[-2000:]
        res = lorafleet(home, "policy", "set", str(ROOT / "examples" / "policy.yaml"))
        assert res.returncode == 0 and "policy: aspen" in res.stdout, res.stderr[-2000:]
        res = lorafleet(home, "policy", "show")
        assert res.returncode == 0 and "policy: aspen" in res.stdout
        res = lorafleet(home, "policy", "explain", "no-such-job")
        assert res.returncode == 2 and "no-such-job" in res.stderr, res.stderr[-2000:]
    finally:
        down = lorafleet(home, "down", "--local")
    assert down.returncode == 0, down.stderr[-3000:]
    assert "controller stopped" in down.stdout and "local Ray cluster stopped" in down.stdout
    assert f"deleted its temp dir {state['temp_dir']}" in down.stdout
    assert not state_file.exists() and not Path(state["temp_dir"]).exists()
    for pid in state["pids"]:
        assert not Path(f"/proc/{pid}").exists() or ") Z " in Path(f"/proc/{pid}/stat").read_text()
    # the saved policy survives for the next `up`
    assert json.loads((home / "policy.json").read_text())["policy"] == "aspen"


def check_client_commands(home: Path, state: dict, tmp_path: Path) -> None:
    """README's laptop commands on the machine that ran `up --local`: no address needed; an explicit one
    wins over RAY_ADDRESS; RAY_ADDRESS=<the GCS address up printed> is a one-line error; submit errors
    name the spec file; whoami names the owner jobs get."""
    url = state["dashboard"]
    res = lorafleet(home, "list", timeout=120)  # its dashboard port is a free one, not 8265
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"(the local cluster `lorafleet up --local` started: {url})" in res.stderr
    assert res.stdout.startswith("id\tname\tstate\t")  # piped: plain rows
    nothing = f"127.0.0.1:{free_port()}"
    res = lorafleet(home, "list", "--address", url, timeout=120, RAY_ADDRESS=nothing)
    assert res.returncode == 0, res.stderr[-2000:]
    res = lorafleet(home, "status", timeout=60, RAY_ADDRESS=state["address"])
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert res.stderr.startswith(f"lorafleet status: error: RAY_ADDRESS={state['address']!r} is not a Ray "
                                 "dashboard URL: the lorafleet client talks to the Ray dashboard")  # fmt: skip
    assert f"(the local cluster's is {url})" in res.stderr

    spec = tmp_path / "c.yaml"
    spec.write_text("name: walkthrough-c\nbase_model: builtin:smollm2-135m-instruct\ndata: {path: tokens.jsonl}\n")
    res = lorafleet(home, "submit", str(spec), str(tmp_path / "missing.yaml"), timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"{tmp_path / 'missing.yaml'}: cannot read spec file" in res.stderr
    assert f"{spec}: data.path: file not found on this machine: tokens.jsonl" in res.stderr

    res = lorafleet(home, "admin", "whoami", timeout=120, LORAFLEET_OWNER="carol")
    assert res.returncode == 0 and res.stdout == "carol (admin, single-user mode)\n", res.stderr[-2000:]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_losing_the_dashboard_mid_call_is_one_line(monkeypatch, capsys):
    """`logs -f` across `lorafleet down` died with a 92-line requests traceback."""
    import requests

    from orchestrator import cli

    def gone(args):
        raise requests.exceptions.ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=8265): Max retries "
                                                  "exceeded\nCaused by NewConnectionError")  # fmt: skip

    module = type("M", (), {"add_arguments": staticmethod(lambda p: None), "run": staticmethod(gone)})
    real = cli.importlib.import_module  # only the command's module is replaced: libraries import lazily too
    monkeypatch.setattr(cli.importlib, "import_module",
                        lambda name, *a: module if name.startswith("orchestrator.commands") else real(name, *a))
    assert cli.main(["logs"]) == 2
    err = capsys.readouterr().err
    assert err == ("lorafleet logs: error: lost the connection to the cluster: ConnectionError: "
                   "HTTPConnectionPool(host='127.0.0.1', port=8265): Max retries exceeded\n")


def test_policy_show_and_explain_go_through_a_dashboard_url_and_gcs_commands_say_where_they_run(
        monkeypatch, capsys, tmp_path):  # fmt: skip
    """From a laptop (RAY_ADDRESS=http://HOST:PORT, as the README says to export) `policy explain` and
    `policy show` failed with Ray's multi-line 'Invalid Ray address'; they now go through the dashboard
    as `status` does, and the commands that need Ray's GCS refuse a dashboard URL in one line."""
    from orchestrator import cli, remote
    from orchestrator.client import ClusterError, connect

    asked = []

    class Dashboard:
        def __init__(self, address=None):
            asked.append(("address", address))

        def explain(self, job):
            asked.append(("explain", job))
            return f"job {job}: waits (fits no worker even alone)"

        def policy(self):
            return {"name": "aspen", "config": {"policy": "aspen", "margin": 0.2}, "failing": None, "skipped": []}

    monkeypatch.setattr(remote, "Client", Dashboard)
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    assert cli.main(["policy", "explain", "a"]) == 0
    assert capsys.readouterr().out == "job a: waits (fits no worker even alone)\n"
    assert cli.main(["policy", "show", "--address", "http://127.0.0.1:2"]) == 0
    assert capsys.readouterr().out == "policy: aspen\nmargin: 0.2\n"
    assert asked == [("address", None), ("explain", "a"), ("address", "http://127.0.0.1:2")]
    with pytest.raises(ClusterError, match=r"^--address http://127.0.0.1:2 is a Ray dashboard URL: `lorafleet up`, "
                                           r"`down`, `policy set` and `admin` talk to Ray itself"):  # fmt: skip
        connect("http://127.0.0.1:2")
    policy = tmp_path / "p.yaml"
    policy.write_text("policy: fifo\n")
    assert cli.main(["policy", "set", str(policy), "--address", "http://127.0.0.1:2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a Ray dashboard URL" in err[0] and "run them on the head node" in err[0]


def test_the_agent_serves_policy_show_and_explain_with_the_callers_key():
    from orchestrator.agent import ALLOWED_CALLS, KEYED_CALLS

    assert {"explain", "get_policy"} <= ALLOWED_CALLS and "explain" in KEYED_CALLS and "get_policy" not in KEYED_CALLS

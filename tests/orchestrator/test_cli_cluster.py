"""``lorafleet up --local`` / ``policy`` / ``down --local`` as a user runs them (subprocesses).

Checks that ``down --local`` stops exactly the processes ``up --local`` started, and that the
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


def lorafleet(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAFLEET_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    exe = Path(sys.executable).with_name("lorafleet")  # the console script, as users run it
    return subprocess.run([str(exe), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_up_policy_down_local(tmp_path):
    home = tmp_path / "home"
    up = lorafleet(home, "up", "--local", "--num-gpus", "1", "--num-cpus", "1", "--activation-checkpointing")
    state_file = home / "local-cluster.json"
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert "started controller (policy fifo" in up.stdout
        # the controller holds the workers' engine options and reports them
        assert "workers' fused step: packing on, autocast off, activation checkpointing on" in up.stdout, up.stdout
        state = json.loads(state_file.read_text())
        assert state["address"].startswith("127.0.0.1:") and state["pids"]
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
    assert not state_file.exists()
    for pid in state["pids"]:
        assert not Path(f"/proc/{pid}").exists() or ") Z " in Path(f"/proc/{pid}/stat").read_text()
    # the saved policy survives for the next `up`
    assert json.loads((home / "policy.json").read_text())["policy"] == "aspen"


def test_losing_the_dashboard_mid_call_is_one_line(monkeypatch, capsys):
    """`logs -f` across `lorafleet down` died with a 92-line requests traceback."""
    import requests

    from orchestrator import cli

    def gone(args):
        raise requests.exceptions.ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=8265): Max retries "
                                                  "exceeded\nCaused by NewConnectionError")  # fmt: skip

    module = type("M", (), {"add_arguments": staticmethod(lambda p: None), "run": staticmethod(gone)})
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: module)
    assert cli.main(["logs"]) == 2
    err = capsys.readouterr().err
    assert err == ("lorafleet logs: error: lost the connection to the cluster: ConnectionError: "
                   "HTTPConnectionPool(host='127.0.0.1', port=8265): Max retries exceeded\n")

"""Ray token authentication and lorafleet API keys end to end, on a local cluster on 127.0.0.1.

``lorafleet up --local --auth token`` starts Ray with ``RAY_AUTH_MODE=token`` and a fresh token
file (mode 600). Every process runs with its own ``HOME`` so no ``~/.ray/auth_token`` of the
machine's user can stand in for the token. Shown: the CLI with the token works; without it (or
with a wrong one) the laptop client and a Ray driver are refused with a clear message, not a hang;
with users registered, a job's owner comes from the API key and another user is refused its
details and its adapter.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.orchestrator.test_laptop import spec_file

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "LORAFLEET_API_KEY",
                 "LORAFLEET_API_KEY_FILE", "LORAFLEET_OWNER")  # fmt: skip


def run(home: Path, *args: str, timeout: float = 300, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in RAY_AUTH_VARS}
    full = {**base, "HOME": str(home.parent), "LORAFLEET_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": str(ROOT), **env}  # fmt: skip
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def cli(home: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return run(home, "-m", "orchestrator.cli", *args, **kw)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    head = tmp_path_factory.mktemp("head") / "lf"
    up = cli(head, "up", "--local", "--num-gpus", "1", "--num-cpus", "1", "--auth", "token",
             "--allow-path-prefix", str(tiny_model_dir.parent))  # fmt: skip
    state_file = head / "local-cluster.json"
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert "Ray token authentication on" in up.stdout
        state = json.loads(state_file.read_text())
        yield {"head": head, "state": state, "model": tiny_model_dir}
    finally:
        if state_file.is_file():
            key = head.parent / "root.key"
            extra = {"LORAFLEET_API_KEY_FILE": str(key)} if key.is_file() else {}
            down = cli(head, "down", "--local", **extra)
            assert down.returncode == 0, down.stderr[-2000:]


def test_token_file_is_private_and_recorded(cluster):
    state = cluster["state"]
    assert state["auth"] == "token"
    mode = stat.S_IMODE(Path(state["token_path"]).stat().st_mode)
    assert mode == 0o600 and len(Path(state["token_path"]).read_text().strip()) == 64


def test_commands_on_the_head_read_the_local_clusters_token_from_its_record(cluster):
    """`status` finds the `up --local` cluster through its record, and its token with it (it was
    refused without `--token` before)."""
    res = cli(cluster["head"], "status", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    res = cli(cluster["head"], "status", "--token", "0" * 64, timeout=120)  # an explicit token wins
    assert res.returncode == 2 and "Invalid authentication token" in res.stderr, res.stderr


def test_laptop_without_or_with_a_wrong_token_is_refused(cluster, tmp_path):
    laptop = tmp_path / "lf"
    url = cluster["state"]["dashboard"]
    start = time.monotonic()
    res = cli(laptop, "status", "--address", url, timeout=120)
    assert res.returncode == 2 and "refused this client: it requires a Ray auth token" in res.stderr, res.stderr
    assert "Missing authentication token" in res.stderr
    res = cli(laptop, "status", "--address", url, "--token", "0" * 64, timeout=120)
    assert res.returncode == 2 and "Invalid authentication token" in res.stderr, res.stderr
    assert time.monotonic() - start < 60  # refused at once, no retry loop


def test_ray_driver_without_token_is_refused(cluster, tmp_path):
    code = ("from orchestrator.client import ClusterError, connect\n"
            f"try:\n    connect({cluster['state']['address']!r})\nexcept ClusterError as e:\n    print('REFUSED', e)\n")  # fmt: skip
    res = run(tmp_path / "lf", "-c", code, timeout=150)
    assert "REFUSED" in res.stdout and "if the cluster uses Ray token auth" in res.stdout, res.stdout + res.stderr[-2000:]


def test_keys_decide_owner_and_access(cluster, tmp_path):
    head, url, token_path = cluster["head"], cluster["state"]["dashboard"], cluster["state"]["token_path"]
    keys = head.parent
    # On the head (the local state file supplies the token): the first user, an admin, then alice and bob.
    for name, extra in (("root", ["--admin"]), ("alice", []), ("bob", [])):
        env = {"LORAFLEET_API_KEY_FILE": str(keys / "root.key")} if name != "root" else {}
        res = cli(head, "admin", "add-user", name, *extra, "--key-file", str(keys / f"{name}.key"), timeout=120, **env)
        assert res.returncode == 0, res.stderr[-2000:]
        assert stat.S_IMODE((keys / f"{name}.key").stat().st_mode) == 0o600

    def laptop(who: str | None, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}
        if who:
            env["LORAFLEET_API_KEY"] = (keys / f"{who}.key").read_text().strip()
        return cli(tmp_path / "lf", *args, "--address", url, timeout=300, cwd=cwd, **env)

    res = laptop(None, "status")
    assert res.returncode == 2 and "this cluster requires an API key" in res.stderr, res.stderr[-2000:]

    spec = spec_file(tmp_path / "specs", "alice-job", cluster["model"], steps=2)
    res = laptop("alice", "submit", spec.name, "--wait", cwd=spec.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    res = laptop("alice", "status", "alice-job", "--json")
    rows = json.loads(res.stdout)
    assert rows[0]["owner"] == "alice" and rows[0]["state"] == "SUCCEEDED"

    job_id = rows[0]["id"]
    for args in (("status", job_id), ("fetch", job_id, str(tmp_path / "stolen")), ("cancel", job_id)):
        res = laptop("bob", *args)
        assert res.returncode == 2 and f"job {job_id} belongs to owner 'alice'" in res.stderr, (args, res.stderr[-2000:])
    assert not (tmp_path / "stolen").exists()
    res = laptop("root", "fetch", job_id, str(tmp_path / "admin-copy"))
    assert res.returncode == 0 and (tmp_path / "admin-copy" / "adapter_model.safetensors").is_file(), res.stderr[-2000:]

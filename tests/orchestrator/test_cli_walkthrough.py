"""What an independent walkthrough of README.md's "On a Ray cluster" and "From a laptop" tripped on,
checked without a Ray cluster (``test_cli_cluster.py`` runs the same paths against a real one):

* client commands with no ``--address`` find the local cluster ``lorafleet up --local`` recorded
  (its dashboard port is a random one, not 8265), while its processes run;
* an explicit address wins over ``RAY_ADDRESS`` (Ray's JobSubmissionClient preferred the variable),
  and a ``RAY_ADDRESS`` that is not a dashboard URL (``auto``, a GCS ``HOST:PORT``) is a one-line error;
* ``submit`` errors about local files name the spec file they come from;
* ``admin whoami`` names the owner jobs from this shell get (single-user mode);
* ``list`` / ``status`` never cut a job id or name;
* ``down --local`` deletes the temp dir ``up --local`` created, and prints the controller's warning.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from orchestrator import cli, client
from orchestrator.commands import jobs
from orchestrator.controller import Controller
from orchestrator.remote import DEFAULT_ADDRESS, Client, RemoteError, address_and_source, declared_owner
from orchestrator.spec import SpecError
from tests.orchestrator.test_cli_fixes_jobs import ControllerClient
from tests.orchestrator.test_tenancy import spec as tenancy_spec

ADDRESS_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


@pytest.fixture
def ctl(cli_controller: Controller) -> Controller:
    return cli_controller


@pytest.fixture(autouse=True)
def no_address_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ADDRESS_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def local_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``LORAFLEET_HOME/local-cluster.json`` of this test (``up --local`` writes it there)."""
    path = tmp_path / "home" / "local-cluster.json"
    monkeypatch.setattr(client, "LOCAL_STATE", path)
    return path


def cluster_process(temp_dir: Path) -> subprocess.Popen:
    """A process of the cluster of ``temp_dir`` as ``ray start`` leaves them: ``RAY_TMPDIR`` in its environment."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                            env={**os.environ, "RAY_TMPDIR": str(temp_dir)})  # fmt: skip


@pytest.fixture
def running_record(tmp_path: Path, local_state: Path) -> Iterator[dict]:
    """A record as ``up --local`` writes it, of a cluster whose process runs; its dashboard port is closed."""
    temp_dir = tmp_path / "lf-ray-test"
    proc = cluster_process(temp_dir)
    state = {"address": "127.0.0.1:1", "dashboard": f"http://127.0.0.1:{client.free_port()}",
             "temp_dir": str(temp_dir), "temp_dir_created": True, "pids": [proc.pid], "auth": "disabled"}  # fmt: skip
    local_state.parent.mkdir(parents=True, exist_ok=True)
    local_state.write_text(json.dumps(state))
    try:
        yield state
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------ 1. the local cluster's dashboard


def test_no_address_means_the_running_local_cluster_up_recorded(running_record, capsys):
    url = running_record["dashboard"]
    assert address_and_source(None) == (url, "local cluster")
    with pytest.raises(RemoteError) as err:  # the Python client resolves the same way
        Client()
    assert str(err.value).startswith(f"cannot reach the Ray dashboard at {url} (the local cluster "
                                     "`lorafleet up --local` recorded): ")  # fmt: skip
    assert cli.main(["status"]) == 2
    err_text = capsys.readouterr().err
    assert f"cannot reach the Ray dashboard at {url}" in err_text and "8265" not in err_text


def test_an_address_or_ray_address_wins_over_the_record(running_record, monkeypatch):
    assert address_and_source("http://head:8265") == ("http://head:8265", "address")
    assert address_and_source("head:8265") == ("http://head:8265", "address")
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert address_and_source(None) == ("http://head:8265", "RAY_ADDRESS")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://api:443")  # Ray's own order: this one first
    assert address_and_source("auto") == ("https://api:443", "RAY_API_SERVER_ADDRESS")


def test_a_record_whose_processes_are_gone_is_not_used(tmp_path, local_state):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    local_state.parent.mkdir(parents=True)
    local_state.write_text(json.dumps({"address": "127.0.0.1:1", "dashboard": "http://127.0.0.1:2",
                                       "temp_dir": str(tmp_path / "lf-ray-gone"), "pids": [dead.pid]}))  # fmt: skip
    assert address_and_source(None) == (DEFAULT_ADDRESS, "default")
    # a live process that is not of that cluster (a PID reused after a reboot) does not count either
    local_state.write_text(json.dumps({"dashboard": "http://127.0.0.1:2", "temp_dir": str(tmp_path / "lf-ray-x"),
                                       "pids": [os.getpid()]}))  # fmt: skip
    assert address_and_source(None) == (DEFAULT_ADDRESS, "default")
    local_state.write_text("{not json")
    assert address_and_source(None) == (DEFAULT_ADDRESS, "default")


# ------------------------------------------------------------------ 2. --address over RAY_ADDRESS


@pytest.mark.parametrize("ray_address", ["http://127.0.0.1:{other}", "127.0.0.1:{other}", "auto"])
def test_an_explicit_address_wins_over_ray_address(monkeypatch, ray_address: str):
    """Ray's JobSubmissionClient re-read RAY_ADDRESS over the address it was given: with a GCS address
    it spent ~35 s looking the dashboard up, then raised a raw RpcError."""
    mine, other = client.free_port(), client.free_port()
    monkeypatch.setenv("RAY_ADDRESS", ray_address.format(other=other))
    start = time.monotonic()
    with pytest.raises(RemoteError) as err:
        Client(f"http://127.0.0.1:{mine}")
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert message.startswith(f"cannot reach the Ray dashboard at http://127.0.0.1:{mine}: ") and str(other) not in message
    assert "\n" not in message
    assert os.environ["RAY_ADDRESS"] == ray_address.format(other=other)  # left as it was


@pytest.mark.parametrize("variable", ADDRESS_VARIABLES)
@pytest.mark.parametrize("value", ["auto", "127.0.0.1:32779", "ray://head:10001"])
def test_an_address_variable_that_is_not_a_dashboard_url_is_one_line(monkeypatch, capsys, variable: str, value: str):
    monkeypatch.setenv(variable, value)
    start = time.monotonic()
    assert cli.main(["list"]) == 2
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err
    assert err == (f"lorafleet list: error: {variable}={value!r} is not a Ray dashboard URL: the lorafleet client "
                   f"talks to the Ray dashboard (http://HOST:8265). Set {variable}=http://HOST:8265, unset it, or "
                   "pass --address\n")  # fmt: skip


def test_the_error_names_the_local_clusters_dashboard(running_record, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:32779")  # the GCS address `up --local` prints
    with pytest.raises(RemoteError, match=rf"\(the local cluster's is {running_record['dashboard']}\)$"):
        Client()


def test_the_gcs_address_given_as_address_names_the_dashboard(running_record):
    """``up --local`` prints the GCS address first; given to --address it said only "cannot reach"."""
    with pytest.raises(RemoteError, match=r"127.0.0.1:1 is the local cluster's GCS address \(for Ray drivers\); its "
                                          rf"dashboard, which lorafleet talks to, is {running_record['dashboard']}\. "):
        Client("127.0.0.1:1")
    import socket

    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", 6379)) == 0:
            pytest.skip("something listens on 127.0.0.1:6379 here")
    with pytest.raises(RemoteError, match=r"Port 6379 is Ray's GCS port .*port 8265 by default"):
        Client("http://127.0.0.1:6379")


def test_a_dashboard_port_with_403_in_it_is_not_an_auth_refusal():
    """Random dashboard ports (``up --local``) like 40311 made "cannot reach" read as "requires a Ray auth token"."""
    import socket

    for port in range(40300, 40400):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        break
    with pytest.raises(RemoteError, match=rf"^cannot reach the Ray dashboard at http://127.0.0.1:{port}: "):
        Client(f"http://127.0.0.1:{port}")


def test_a_non_http_address_is_refused():
    with pytest.raises(RemoteError, match=r"^address 'ray://head:10001' is not a Ray dashboard URL: the lorafleet "
                                          r"client talks to the Ray dashboard \(http://HOST:8265\)"):  # fmt: skip
        Client("ray://head:10001")


# ------------------------------------------------------------------ 3. submit errors name the spec file


def test_submit_errors_name_the_spec_file(ctl, tmp_path, monkeypatch):
    """``submit ../jobs/c.yaml missing.yaml`` said only ``data.path: file not found on this machine:
    tokens.jsonl``. Every spec is checked and every problem named by its file, nothing is queued."""
    jobs_dir, work = tmp_path / "jobs", tmp_path / "work"
    jobs_dir.mkdir()
    work.mkdir()
    (jobs_dir / "c.yaml").write_text(yaml.safe_dump(tenancy_spec("c", "tokens.jsonl")))
    (jobs_dir / "d.yaml").write_text(yaml.safe_dump({**tenancy_spec("d", "d.jsonl"),
                                                     "adapter": {"init_from": "no-such-adapter"}}))  # fmt: skip
    (work / "d.jsonl").write_text('{"text": "w1 w2"}\n')
    monkeypatch.chdir(work)  # relative data paths are read from the current directory
    with pytest.raises(RemoteError) as err:
        ControllerClient(ctl).submit_many(["../jobs/c.yaml", "missing.yaml", "../jobs/d.yaml"])
    assert str(err.value).splitlines() == [
        "missing.yaml: cannot read spec file: No such file or directory",
        "../jobs/c.yaml: data.path: file not found on this machine: tokens.jsonl",
        "../jobs/d.yaml: adapter.init_from: directory not found on this machine: no-such-adapter; to continue "
        "from an earlier job's adapter, fetch it (`lorafleet fetch JOB DIR`) and submit with "
        "adapter.init_from: DIR (a local adapter directory is uploaded with the spec)",
    ]
    assert ctl.list_jobs() == []  # nothing was queued
    with pytest.raises(SpecError) as spec_err:  # spec errors alone stay a SpecError, each naming its file
        ControllerClient(ctl).submit_many(["missing.yaml", "also-missing.yaml"])
    assert [e.split(":")[0] for e in spec_err.value.errors] == ["missing.yaml", "also-missing.yaml"]


# ------------------------------------------------------------------ 4. whoami names the owner jobs get


def test_whoami_names_the_owner_jobs_from_this_shell_get(ctl, monkeypatch, capsys, tmp_path):
    """Single-user mode printed ``default (admin, single-user mode)`` while jobs got the login name."""
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))  # no api_key file
    monkeypatch.delenv("LORAFLEET_API_KEY", raising=False)
    monkeypatch.setenv("LORAFLEET_OWNER", "carol")
    assert cli.main(["admin", "whoami"]) == 0
    assert capsys.readouterr().out == "carol (admin, single-user mode)\n"
    job = ctl.submit(tenancy_spec("j"), owner=declared_owner(None, None))  # the owner submit declares
    assert ctl.status(job["id"])["owner"] == "carol"
    monkeypatch.delenv("LORAFLEET_OWNER")
    monkeypatch.setenv("USER", "dave")  # the login name, as getpass reads it
    monkeypatch.setenv("LOGNAME", "dave")
    assert cli.main(["admin", "whoami"]) == 0
    assert capsys.readouterr().out == "dave (admin, single-user mode)\n"


def test_whoami_with_a_key_is_the_keys_user(ctl, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    monkeypatch.delenv("LORAFLEET_OWNER", raising=False)
    root = ctl.add_user("root", admin=True)["key"]
    alice = ctl.add_user("alice", api_key=root)["key"]
    monkeypatch.setenv("LORAFLEET_API_KEY", alice)
    assert cli.main(["admin", "whoami"]) == 0
    assert capsys.readouterr().out == "alice (user, api-keys mode)\n"


# ------------------------------------------------------------------ 5. ids and names are never cut

LONG = "reverse-words-with-a-rather-long-job-name-x"  # 42 characters


def records() -> list[dict]:
    return [{"id": "lf-f7a1b2c3d4", "name": LONG, "state": "SUCCEEDED", "step": 1000, "total_steps": 20000,
             "loss": 1.2345, "tokens_per_s": 12345.6, "worker": "gpu-worker-0-abcdef", "priority": 10,
             "owner": "alice-with-a-long-login"},
            {"id": "lf-0a1b2c3d4e", "name": "arith", "state": "RUNNING", "step": 3, "total_steps": None,
             "loss": None, "tokens_per_s": None, "worker": None, "priority": 0, "owner": "bob"}]  # fmt: skip


@pytest.mark.parametrize("width", [200, 80, 40])
def test_a_terminal_table_never_cuts_an_id_or_a_name(width: int):
    out = io.StringIO()
    jobs.print_jobs(records(), Console(file=out, width=width, force_terminal=True, color_system=None))
    text = out.getvalue()
    for r in records():
        assert any(line.startswith(f"{r['id']}  {r['name']} ") for line in text.splitlines()), text
    assert "…" not in text


def test_piped_rows_are_plain_and_whole(ctl, capsys):
    """`lorafleet list | ...` printed rich's 80-column table with ids cut to `lf-f7…`."""
    first = ctl.submit(tenancy_spec(LONG), owner="alice")
    second = ctl.submit(tenancy_spec("b"), owner="alice")
    parser, subs = cli.build_parser()
    jobs.add_arguments(subs["list"])
    args = parser.parse_args(["list"])
    assert jobs.do_list(ControllerClient(ctl, owner="alice"), args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["id", "name", "state", "step", "loss", "tok/s", "ETA", "worker", "prio", "owner"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[:3] for r in rows] == [[second["id"], "b", "QUEUED"], [first["id"], LONG, "QUEUED"]]
    assert all(len(r) == 10 and r[-1] == "alice" for r in rows)


# ------------------------------------------------------------------ 6. down --local cleans up


def test_stopping_the_local_cluster_deletes_the_temp_dir_it_created(running_record, local_state):
    temp_dir = Path(running_record["temp_dir"])
    (temp_dir / "ray" / "session_latest" / "logs").mkdir(parents=True)
    (temp_dir / "ray" / "session_latest" / "logs" / "gcs_server.out").write_text("x" * 1000)
    out = client.stop_local_cluster(timeout_s=10)
    assert out["pids"] == running_record["pids"] and out["removed"] is True and "warning" not in out
    assert not temp_dir.exists() and not local_state.exists()


def test_a_temp_dir_up_did_not_create_is_kept(tmp_path, local_state):
    temp_dir = tmp_path / "mine"  # a record without temp_dir_created, not /tmp/lf-ray-*: someone else's dir
    proc = cluster_process(temp_dir)
    local_state.parent.mkdir(parents=True)
    local_state.write_text(json.dumps({"address": "127.0.0.1:1", "dashboard": "http://127.0.0.1:2",
                                       "temp_dir": str(temp_dir), "pids": [proc.pid]}))  # fmt: skip
    try:
        out = client.stop_local_cluster(timeout_s=10)
    finally:
        proc.kill()
        proc.wait()
    assert out["removed"] is False and temp_dir.is_dir() and not local_state.exists()


def test_down_prints_the_controllers_warning(monkeypatch, capsys):
    """``stop_controller`` returns ``warning`` when the controller did not shut down cleanly (a Ray error
    or a timeout, which need a cluster to happen); ``down`` dropped it. Only the Ray calls are replaced."""
    monkeypatch.setattr(client, "connect", lambda address: None)
    monkeypatch.setattr(client, "stop_controller", lambda api_key=None: {
        "warning": "controller did not shut down cleanly: GetTimeoutError: Get timed out"})  # fmt: skip
    monkeypatch.delenv("LORAFLEET_API_KEY", raising=False)
    assert cli.main(["down"]) == 0
    out = capsys.readouterr()
    assert out.out == "controller stopped; 0 running jobs checkpointed and requeued\n"
    assert out.err == "warning: controller did not shut down cleanly: GetTimeoutError: Get timed out\n"


def test_an_address_resolved_while_another_client_connects_still_sees_ray_address(monkeypatch):
    """A client connecting hides RAY_ADDRESS from Ray's JobSubmissionClient; a Client built in another
    thread meanwhile resolved to the local cluster or http://127.0.0.1:8265 instead of RAY_ADDRESS."""
    import threading

    from orchestrator import remote

    monkeypatch.setenv("RAY_ADDRESS", "http://prod-head:8265")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    seen = []
    inside = threading.Event()

    def other() -> None:
        inside.wait(5)
        seen.append(remote.address_and_source(None))

    t = threading.Thread(target=other)
    t.start()
    with remote.without_address_variables():
        inside.set()
        t.join(0.3)  # the other thread waits for the variables to come back
        assert t.is_alive()
    t.join(5)
    assert seen == [("http://prod-head:8265", "RAY_ADDRESS")]

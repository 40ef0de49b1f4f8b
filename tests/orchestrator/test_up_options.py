"""``lorafleet up``'s flags for the workers' fused step become ``TrainingWorker`` keyword arguments."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

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


def test_a_local_clusters_processes_include_the_children_of_its_marked_ones(tmp_path):
    """Ray's dashboard and runtime-env agents are the raylet's children and at times carry neither
    the temp dir in their command line nor RAY_TMPDIR: `down --local` left them running. A marked
    process's descendants count as the cluster's; an unrelated process does not."""
    import subprocess
    import time

    from orchestrator.client import _pids_under

    marker = str(tmp_path / "lf-ray-marker")
    parent = subprocess.Popen(["bash", "-c", "sleep 300 & wait", marker])  # $0 = the temp dir: marked
    other = subprocess.Popen(["sleep", "300"])
    try:
        deadline = time.time() + 10
        child = None
        while child is None and time.time() < deadline:
            kids = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
            child = int(kids[0]) if kids else None
            time.sleep(0.05)
        assert child is not None
        found = _pids_under(marker)
        assert {parent.pid, child} <= found and other.pid not in found
    finally:
        for p in (parent, other):
            p.kill()
            p.wait()
        if child is not None:
            subprocess.run(["kill", "-9", str(child)], check=False)


def test_up_policy_refused_by_the_running_controller_is_one_line(tmp_path, monkeypatch, capsys):
    """The review: the head's dry-run refusal (a ValueError, not a PolicyConfigError) escaped as a traceback."""
    from orchestrator import cli, client

    path = tmp_path / "p.yaml"
    path.write_text("policy: fifo\n")

    def refuse(*args, **kwargs):
        raise ValueError("policy fifo: schedule() failed on the current queue (3 queued, 0 running jobs): boom; "
                         "not set, policy aspen stays")  # fmt: skip

    monkeypatch.setattr(client, "connect", lambda address: None)
    monkeypatch.setattr(client, "start_controller", refuse)
    assert cli.main(["up", "--policy", str(path)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{path}: policy fifo: schedule() failed on the current queue (3 queued, 0 running jobs): boom; not set, "
        "policy aspen stays")  # fmt: skip


def test_a_memory_budget_sizes_the_gpus_no_worker_runs_on_yet(monkeypatch, capsys):
    """`up --memory-budget 3 GiB`: the controller sized a GPU without a worker at its 80 GiB default,
    so a job over every budget got a fresh worker and groups past the budget were formed there."""
    from orchestrator import cli, client
    from orchestrator.controller import Controller

    seen = {}

    def start(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("seen")  # stops `up` here (one line, exit 2)

    monkeypatch.setattr(client, "connect", lambda address: None)
    monkeypatch.setattr(client, "start_controller", start)
    assert cli.main(["up", "--memory-budget", str(3 << 30)]) == 2
    assert seen["worker_memory_bytes"] == 3 << 30 and seen["worker_options"]["memory_budget_bytes"] == 3 << 30
    c = Controller(":memory:", "/tmp/unused-storage", {"policy": "fifo"}, start_loop=False, num_gpus=2,
                   worker_memory_bytes=seen["worker_memory_bytes"])  # fmt: skip
    try:
        assert c._clock_memories() == [float(3 << 30)] * 2  # the FIFO clock's servers and the free GPUs alike
    finally:
        c.store.close()


def test_a_local_cluster_does_not_inherit_this_shells_api_key(tmp_path, monkeypatch):
    """`ray start` got the whole environment: an admin's exported LORAFLEET_API_KEY reached every Ray
    job, and `ray job submit -- lorafleet run` with no key ran as the admin."""
    import subprocess

    from orchestrator import client

    seen = {}

    def ray_start(cmd, env=None, **kwargs):
        seen.update(env)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="stopped here")

    monkeypatch.setattr(client, "LOCAL_STATE", tmp_path / "local-cluster.json")
    monkeypatch.setattr(client.subprocess, "run", ray_start)
    monkeypatch.setenv("LORAFLEET_API_KEY", "lfk_admin")
    monkeypatch.setenv("LORAFLEET_API_KEY_FILE", "/root/.lorafleet/api_key")
    with pytest.raises(client.ClusterError, match="stopped here"):
        client.start_local_cluster(num_gpus=0)
    assert seen and "LORAFLEET_API_KEY" not in seen and "LORAFLEET_API_KEY_FILE" not in seen
    assert not Path(seen["RAY_TMPDIR"]).exists()  # a failed start leaves no temp dir behind

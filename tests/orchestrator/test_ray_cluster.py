"""The control plane on a real local Ray cluster: two nodes on 127.0.0.1, one fake GPU each.

One module-scoped cluster and controller serve every test (starting Ray and a worker costs
tens of seconds on a small box). Jobs are tiny random Llamas trained for a few steps in fp32
with dropout 0, so an interrupted run must end with the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_llama, token_records, write_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tempfile.mkdtemp(prefix="lf-ray-", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    os.environ.update(RAY_TMPDIR=tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.client import use_loopback

    use_loopback()  # also when ray was imported earlier in this process (the env var is read at import)

    c = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.1", "num_cpus": 1, "num_gpus": 1, "temp_dir": f"{tmp}/ray",
        "include_dashboard": False,
    })  # fmt: skip
    c.add_node(node_ip_address="127.0.0.1", num_cpus=1, num_gpus=1)
    ray.init(address=c.address, _node_ip_address="127.0.0.1", namespace="lorafleet", log_to_driver=False)
    try:
        yield c
    finally:
        from orchestrator import client

        try:
            client.stop_controller(timeout_s=60)
        except client.NoControllerError:
            pass
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def controller(cluster, tmp_path_factory):
    from orchestrator import client

    root = tmp_path_factory.mktemp("lf-control")
    handle, started = client.start_controller(
        root / "jobs.db", root / "storage", {"policy": "fifo"},
        loop_interval_s=0.3, worker_idle_s=600.0, worker_options={"device": "cpu", "profile": "off"},
        allowed_prefixes=[str(tmp_path_factory.getbasetemp())],  # data and adapters in pytest's temp dirs
    )  # fmt: skip
    assert started
    return handle


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lf-data")


def spec(name: str, model_dir: Path, data: Path, *, seed: int, steps: int = 8, checkpoint_every: int = 2) -> dict:
    return {
        "name": name,
        "base_model": str(model_dir),
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(data), "format": "tokens", "max_seq_len": 32},
        "train": {"max_steps": steps, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-2,
                  "seed": seed, "checkpoint_every": checkpoint_every},
    }  # fmt: skip


def make_specs(prefix: str, n: int, model_dir: Path, data_dir: Path, steps: int = 8, checkpoint_every: int = 2) -> list[dict]:
    out = []
    for i in range(n):
        data = write_jsonl(data_dir / f"{prefix}-{i}.jsonl", token_records(24, 100 + i, 6, 14))
        out.append(spec(f"{prefix}-{i}", model_dir, data, seed=i, steps=steps, checkpoint_every=checkpoint_every))
    return out


def submit_all(specs: list[dict]) -> list[str]:
    from orchestrator import client

    return [client.call("submit", s, "tester")["id"] for s in specs]


def wait_terminal(ids: list[str], timeout: float = 240.0, on_poll=None) -> dict[str, dict]:
    from orchestrator import client

    deadline = time.time() + timeout
    while True:
        recs = {i: client.call("status", i) for i in ids}
        if on_poll is not None:
            on_poll(recs)
        if all(r["state"] in TERMINAL for r in recs.values()):
            return recs
        if time.time() > deadline:
            raise AssertionError({i: (r["state"], r["step"], r["error"]) for i, r in recs.items()})
        time.sleep(0.5)


def wait_until(pred, timeout: float = 180.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def reference_adapters(specs: list[dict], out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each job trained uninterrupted in this process (the fused engine, all jobs together)."""
    from dataclasses import replace

    from actors.checkpoint import read_adapter
    from actors.engine import FusedEngine
    from actors.models import load_base_model
    from orchestrator.spec import parse_spec

    model, tok = load_base_model(specs[0]["base_model"], device="cpu", dtype=torch.float32)
    engine = FusedEngine(model, tok, base_model_id=specs[0]["base_model"])
    for s in specs:
        cfg = parse_spec(s).to_job_config()
        engine.add_job(replace(cfg, output=str(out / s["name"])), resume=False)
    engine.run()
    return {s["name"]: read_adapter(out / s["name"])[0] for s in specs}


def assert_same_adapters(recs: dict[str, dict], ref: dict[str, dict[str, torch.Tensor]]) -> None:
    from actors.checkpoint import read_adapter

    for rec in recs.values():
        assert rec["state"] == "SUCCEEDED", (rec["name"], rec["error"])
        got, _ = read_adapter(rec["output"])
        want = ref[rec["name"]]
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"{rec['name']} {key}")


# ------------------------------------------------------------------------------------------ tests


def test_jobs_spread_over_nodes_finish_and_load_in_peft(controller, tiny_model_dir, data_dir):
    from peft import PeftModel

    from orchestrator import client

    specs = make_specs("place", 3, tiny_model_dir, data_dir, steps=6)
    ids = submit_all(specs)
    nodes: set[str] = set()
    largest_group = 0

    def watch(_recs):
        nonlocal largest_group
        for w in client.call("workers"):
            if w["jobs"] and w["node_id"]:
                nodes.add(w["node_id"])
            largest_group = max(largest_group, len(w["jobs"]))

    # swap the policy while jobs run: nothing stops
    client.call("set_policy", {"policy": "sjf"})
    assert client.call("get_policy")["name"] == "sjf"
    recs = wait_terminal(ids, on_poll=watch)
    client.call("set_policy", {"policy": "fifo"})
    assert {r["state"] for r in recs.values()} == {"SUCCEEDED"}, recs
    assert len(nodes) == 2, f"jobs ran on nodes {nodes}"
    assert largest_group >= 2, "no fused group formed"
    for rec in recs.values():
        model = PeftModel.from_pretrained(make_tiny_llama(), rec["output"])
        assert any("lora_A" in n for n, _ in model.named_parameters())
        history = [e["to"] for e in client.call("status", rec["id"])["events"]]
        assert history[:3] == ["QUEUED", "PROFILING", "RUNNING"] and history[-1] == "SUCCEEDED"


def test_killed_worker_costs_only_work_since_checkpoint(controller, tiny_model_dir, data_dir, tmp_path):
    import ray

    from orchestrator import client

    # A step of these jobs takes 5-20 ms, and the controller and this test each poll every 0.3 s: the
    # window the kill must land in is hundreds of steps wide so no machine runs through it between polls.
    specs = make_specs("kw", 2, tiny_model_dir, data_dir, steps=600, checkpoint_every=10)
    ref = reference_adapters(specs, tmp_path / "ref")
    ids = submit_all(specs)

    def running_past_step_3():
        for i in ids:
            rec = client.call("status", i)
            if rec["state"] == "RUNNING" and 3 <= (rec["step"] or 0) <= 400:
                return rec
        return None

    victim = wait_until(running_past_step_3, what="a running job between steps 3 and 400")
    handle = client.call("worker_handle", victim["worker"])
    ray.kill(handle, no_restart=True)
    recs = wait_terminal(ids)
    assert_same_adapters(recs, ref)
    events = client.call("status", victim["id"])["events"]
    assert any("died" in (e["reason"] or "") for e in events), events


def _retry_once_it_has_left(job_id: str) -> dict:
    """``retry`` as a user would call it right after a cancel: refused while the worker still has the job."""
    from orchestrator import client

    def attempt():
        try:
            return client.call("retry", job_id)
        except ValueError as err:
            if "still leaving worker" not in str(err):
                raise
            return None

    return wait_until(attempt, timeout=60, what=f"retry of {job_id} (its worker to drop it)")


def test_cancelled_job_retried_resumes_to_the_uninterrupted_adapter(controller, tiny_model_dir, data_dir, tmp_path):
    from orchestrator import client

    specs = make_specs("rt", 1, tiny_model_dir, data_dir, steps=600, checkpoint_every=10)  # see the killed-worker test
    ref = reference_adapters(specs, tmp_path / "ref")
    [job] = submit_all(specs)
    wait_until(lambda: client.call("status", job)["state"] == "RUNNING" and 20 <= client.call("status", job)["step"]
               <= 400, what="the job between steps 20 and 400")  # fmt: skip
    assert client.call("cancel", job)["state"] == "CANCELLED"
    out = _retry_once_it_has_left(job)
    assert out["id"] == job and out["state"] == "QUEUED" and out["resume_step"] >= 10
    recs = wait_terminal([job])
    assert_same_adapters(recs, ref)  # the steps before the checkpoint are kept, the rest redone: same adapter
    events = client.call("status", job)["events"]
    assert [e["to"] for e in events].count("RUNNING") == 2
    joined = [e["reason"] for e in events if e["to"] == "RUNNING"][-1]
    assert int(joined.split("at step ")[1]) >= out["resume_step"] > 0  # resumed, not started over


def test_killed_controller_recovers_every_job(controller, tiny_model_dir, data_dir, tmp_path):
    import ray

    from orchestrator import client

    # long enough that the kill lands mid-run on a fast machine (see the killed-worker test): recovery is exercised
    specs = make_specs("kc", 2, tiny_model_dir, data_dir, steps=600, checkpoint_every=10)
    ref = reference_adapters(specs, tmp_path / "ref")
    ids = submit_all(specs)
    wait_until(lambda: any(3 <= client.call("status", i)["step"] <= 400 for i in ids), what="progress")
    before = client.call("ping")["pid"]
    ray.kill(client.get_controller(), no_restart=False)  # Ray restarts it; it recovers from the store
    wait_until(lambda: _ping_pid() not in (None, before), timeout=120, what="controller restart")
    recs = wait_terminal(ids)
    assert_same_adapters(recs, ref)
    restarted = 0
    for i in ids:
        reasons = [e["reason"] or "" for e in client.call("status", i)["events"]]
        assert any("controller restart" in r for r in reasons) or reasons[-1] == "finished"
        restarted += any("controller restart" in r for r in reasons)
    assert restarted >= 1  # at least the job seen mid-run was recovered, not finished before the kill


def _ping_pid():
    from orchestrator import client

    try:
        return client.call("ping", timeout=10)["pid"]
    except Exception:  # restarting: any Ray error means "not yet"
        return None


def test_forced_oom_evicts_one_job_group_mates_finish(controller, tiny_model_dir, data_dir):
    from orchestrator import client

    # long enough that the forced OOM lands mid-run on a fast machine (see the killed-worker test)
    specs = make_specs("oom", 4, tiny_model_dir, data_dir, steps=600, checkpoint_every=50)
    ids = submit_all(specs)

    def crowded():
        for w in client.call("workers"):
            running = [j for j in w["jobs"] if j in ids and client.call("status", j)["state"] == "RUNNING"]
            if len(running) >= 2:
                return w["worker_id"]
        return None

    wid = wait_until(crowded, what="a worker with two running jobs")
    client.call("worker_handle", wid).simulate_oom.remote()
    recs = wait_terminal(ids)
    assert {r["state"] for r in recs.values()} == {"SUCCEEDED"}, recs
    evicted = [r for r in recs.values() if r["extra"].get("ooms")]
    assert len(evicted) == 1, [r["extra"] for r in recs.values()]
    assert evicted[0]["extra"]["micro_batch_size"] == 1
    reasons = [e["reason"] for e in client.call("status", evicted[0]["id"])["events"]]
    assert any("out of memory" in (r or "") for r in reasons)


def test_broken_spec_and_missing_data_fail_alone(controller, tiny_model_dir, data_dir):
    from orchestrator import client

    good = make_specs("solo", 1, tiny_model_dir, data_dir, steps=4)[0]
    bad = spec("no-data", tiny_model_dir, data_dir / "missing.jsonl", seed=0, steps=4)
    broken = {**good, "name": "broken", "adapter": {"r": 0}, "train": {"batch_size": 3, "micro_batch_size": 2}}
    with pytest.raises(ValueError) as err:
        client.call("submit", broken, "tester")
    assert "adapter.r" in str(err.value) and "batch_size" in str(err.value)
    assert not client.call("list_jobs", None, "tester") or all(
        r["name"] != "broken" for r in client.call("list_jobs", None, "tester"))  # fmt: skip
    ids = submit_all([good, bad])
    recs = wait_terminal(ids)
    assert recs[ids[0]]["state"] == "SUCCEEDED"
    assert recs[ids[1]]["state"] == "FAILED" and "missing.jsonl" in recs[ids[1]]["error"]
    # the user puts the file in place and retries the failed job: it runs under its id
    write_jsonl(data_dir / "missing.jsonl", token_records(24, 300, 6, 14))
    assert _retry_once_it_has_left(ids[1])["state"] == "QUEUED"
    assert wait_terminal([ids[1]])[ids[1]]["state"] == "SUCCEEDED"

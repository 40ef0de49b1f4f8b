"""Per-owner GPU quota (``gpu_quotas``: the most distinct workers an owner's jobs occupy), on
hand-made snapshots: 3 workers of 80 GiB, model "m", jobs of 10 GiB static + 5 GiB dynamic (so
any number of them fit one worker: 10 + 5 n <= 80 for n <= 14), aspen with margin 0."""

from __future__ import annotations

import pytest

from policies.builtin import AspenSettings, aspen
from policies.config import PolicyConfigError, parse_policy_config, resolve_policy
from policies.interface import Start
from policies.plugins import OwnerGpuQuota
from tests.policies.helpers import job, view, worker

# alice already runs "r" on w0; w1 and w2 are idle. aspen's fusion score puts a job on an idle
# worker (100) before a busy one, so a job goes to w1 unless a quota keeps it on w0.
RUNNING = [job("r", owner="alice", dyn_gib=5, worker="w0")]
WORKERS = [worker("w0", model="m", running=("r",)), worker("w1"), worker("w2")]


@pytest.mark.parametrize(
    ("quotas", "queued", "want"),
    [
        # no quota: a -> idle w1
        ({}, ["a:alice"], [("a", "w1")]),
        # alice occupies 1 of 1 worker: w1, w2 refused; joining w0 adds no GPU: a -> w0
        ({"alice": 1}, ["a:alice"], [("a", "w0")]),
        # "default" applies to unlisted owners the same way
        ({"default": 1}, ["a:alice"], [("a", "w0")]),
        # 1 of 2: a -> w1 (now 2 of 2); b may only join w0 or w1, both busy with one 512-token
        # job and 80 - 10 - 5 = 65 GiB free: equal scores, the lower index wins: w0
        ({"alice": 2}, ["a:alice", "b:alice"], [("a", "w1"), ("b", "w0")]),
        # alice's quota does not limit bob
        ({"alice": 1}, ["a:alice", "b:bob"], [("a", "w0"), ("b", "w1")]),
        # quota 0: bob (no worker yet) starts nothing; alice, already on w0, may still join it
        # (that adds no GPU; a quota never preempts)
        ({"alice": 0, "bob": 0}, ["a:alice", "b:bob"], [("a", "w0")]),
        # bob (default 1, no worker yet) takes one idle worker, then joins it: 1 distinct worker
        ({"default": 1}, ["a:bob", "b:bob"], [("a", "w1"), ("b", "w1")]),
    ],
)
def test_gpu_quota_caps_distinct_workers_per_owner(quotas, queued, want):
    jobs = []
    for i, spec in enumerate(queued):
        name, owner = spec.split(":")
        jobs.append(job(name, owner=owner, dyn_gib=5, submit=float(i + 1)))
    policy = aspen(AspenSettings(margin=0.0, gpu_quotas=quotas))
    decisions = policy.schedule(view(jobs, RUNNING, WORKERS))
    assert [(d.job_id, d.worker_id) for d in decisions if isinstance(d, Start)] == want


def test_gpu_quota_reason_in_explain():
    policy = aspen(AspenSettings(margin=0.0, gpu_quotas={"alice": 1}))
    lines = policy.explain(view([job("a", owner="alice", dyn_gib=5)], RUNNING, WORKERS), "a").workers
    reasons = {w.worker_id: w.rejected_by for w in lines}
    assert reasons == {"w0": None, "w1": "owner alice at GPU quota (1/1 workers)",
                       "w2": "owner alice at GPU quota (1/1 workers)"}  # fmt: skip


def test_config_key_reaches_the_filter():
    policy = parse_policy_config({"policy": "aspen", "gpu_quotas": {"default": 4, "alice": 8}})
    (quota,) = [f for f in policy.filters if isinstance(f, OwnerGpuQuota)]
    assert quota.max_workers == {"alice": 8} and quota.default == 4
    assert not any(isinstance(f, OwnerGpuQuota) for f in parse_policy_config({"policy": "aspen"}).filters)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([4], "gpu_quotas: must be a mapping (got list)"),
        ({"alice": 1.5}, "gpu_quotas.alice: must be an integer >= 0 and <= 1,000,000,000 (got 1.5)"),
        ({"default": -1}, "gpu_quotas.default: must be an integer >= 0 and <= 1,000,000,000 (got -1)"),
        ({"bob": "4"}, "gpu_quotas.bob: must be an integer >= 0 and <= 1,000,000,000 (got '4')"),
        ({"bob": True}, "gpu_quotas.bob: must be an integer >= 0 and <= 1,000,000,000 (got True)"),
    ],
)
def test_config_errors_name_the_key(value, message):
    with pytest.raises(PolicyConfigError) as info:
        parse_policy_config({"policy": "aspen", "gpu_quotas": value}, "p.yaml")
    assert str(info.value) == f"p.yaml: {message}"


def test_gpu_quotas_only_for_aspen():
    with pytest.raises(PolicyConfigError, match=r"gpu_quotas: unknown field for policy fifo \(only for aspen\)"):
        parse_policy_config({"policy": "fifo", "gpu_quotas": {"default": 4}})


def test_owner_at_quota_finds_its_worker_beyond_the_examined_ones():
    # max_candidates 1: at most 4 busy workers are examined per job, most free memory first.
    # b0..b5 run bob's 5 GiB jobs (65 GiB free each); w0 runs alice's 30 GiB job (80 - 10 - 30 =
    # 40 GiB free), so it comes 7th. alice is at her GPU quota (1/1): her job's only worker is
    # w0, which the engine examines directly instead of rejecting b0..b3 and stopping there.
    running = [job("r", owner="alice", dyn_gib=30, worker="w0")]
    running += [job(f"x{i}", owner="bob", dyn_gib=5, worker=f"b{i}") for i in range(6)]
    workers = [worker(f"b{i}", model="m", running=(f"x{i}",)) for i in range(6)]
    workers.append(worker("w0", model="m", running=("r",)))
    policy = aspen(AspenSettings(margin=0.0, max_candidates=1, gpu_quotas={"alice": 1}))
    decisions = policy.schedule(view([job("a", owner="alice", dyn_gib=5)], running, workers))
    assert decisions == [Start("a", "w0")]
    # without the quota it joins a bob worker with more free memory (the fusion scores tie)
    decisions = aspen(AspenSettings(margin=0.0, max_candidates=1)).schedule(
        view([job("a", owner="alice", dyn_gib=5)], running, workers))
    assert decisions == [Start("a", "b0")]


@pytest.mark.parametrize(
    ("field", "caps", "owner", "words"),
    [
        ("quotas", {"default": 0}, "default", "0 running jobs: no job of any owner will start"),
        ("quotas", {"default": 0, "bob": 2, "alice": 1}, "default",
         "0 running jobs: no job of any owner not listed in quotas (alice, bob are) will start"),
        ("quotas", {"default": 3, "root": 0}, "root", "0 running jobs: no job of owner root will start"),
        ("gpu_quotas", {"alice": 0}, "alice", "0 workers (GPUs): no job of owner alice will start"),
    ],
)  # fmt: skip
def test_a_quota_of_zero_is_accepted_with_a_warning(field, caps, owner, words):
    """A quota of 0 left every job of its owners queued for good, and `policy set` said nothing. It
    is allowed (an admin may pause an owner) but every loader can now say so."""
    warnings: list[str] = []
    policy = parse_policy_config({"policy": "aspen", field: caps}, "p.yaml", warnings=warnings)
    assert policy.name == "aspen"
    assert len(warnings) == 1 and warnings[0].startswith(f"p.yaml: {field}.{owner}: {words}; each stays queued "
                                                         "(`lorafleet status JOB` says why) until the quota is raised")
    nothing: list[str] = []
    parse_policy_config({"policy": "aspen", field: {k: v or 1 for k, v in caps.items()}}, "p.yaml", warnings=nothing)
    assert nothing == []


def test_resolve_policy_passes_on_a_yaml_files_warnings(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("policy: aspen\nquotas: {default: 0}\ngpu_quotas: {bob: 0}\n")
    warnings: list[str] = []
    resolve_policy(str(path), warnings)
    assert [w.split(": ")[1] for w in warnings] == ["quotas.default", "gpu_quotas.bob"]


def test_held_names_the_quota_that_keeps_each_queued_job_off_workers():
    """ProfilePolicy.held: per queued job, the quota rule that keeps it off workers and the rule's own
    reason, the one explain shows for such a worker; jobs under their quotas are not listed."""
    policy = parse_policy_config({"policy": "aspen", "quotas": {"root": 0, "bob": 1}, "gpu_quotas": {"carol": 1}})
    running = [job("b1", owner="bob", dyn_gib=5, worker="w0", start=0.0),
               job("c1", owner="carol", dyn_gib=5, worker="w1", start=0.0)]  # fmt: skip
    queued = [job(j, owner=o, dyn_gib=5) for j, o in (("r", "root"), ("b2", "bob"), ("c2", "carol"), ("a", "alice"))]
    workers = [worker("w0", model="m", running=("b1",)), worker("w1", model="m", running=("c1",)), worker("w2")]
    snapshot = view(queued, running, workers)
    held = policy.held(snapshot)
    assert held == {
        "r": ("quota", "owner root at quota (0/0 running; a quota of 0 lets none start until an admin raises it)"),
        "b2": ("quota", "owner bob at quota (1/1 running)"),
        "c2": ("gpu_quota", "owner carol at GPU quota (1/1 workers)"),
    }
    for job_id, (_, reason) in held.items():  # explain's verdict for a worker the rule excludes: the same words
        verdicts = {line.worker_id: line.rejected_by for line in policy.explain(snapshot, job_id).workers}
        assert verdicts["w2"] == reason
    assert parse_policy_config({"policy": "aspen"}).held(snapshot) == {}  # no quotas, nothing held

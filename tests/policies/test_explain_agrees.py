"""``policy explain`` tells what ``schedule`` does, and two admin settings that did nothing.

Before: ``explain`` judged the workers on a fresh cycle, without the cycle's urgent jobs (whose
fusion rules are waived), reservations or earlier starts, so it said "no" to the worker an urgent
job was started on and "score 60" to a worker reserved for another job; ``starvation_s`` was
ignored for every job stamped with a FIFO-fair deadline (all jobs, in the simulator and the
controller); weights of 1e308 validated and then no job ever started.
"""

from __future__ import annotations

import pytest

from policies import ActivationFit, ClusterView, JobView, WorkerView, parse_policy_config
from policies.config import PolicyConfigError
from policies.interface import Preempt, Start

G = 2**30
SMALL = ActivationFit(0.25 * G, 1000.0, 0.0)


def run(job_id: str, work: float, worker: str = "w0") -> JobView:
    return JobView(job_id, "bob", 0, 0.0, "llama-2-7b", 14 * G, 1 * G, SMALL, 4, 512, work, 3000.0,
                   worker_id=worker, start_time_s=0.0)  # fmt: skip


def queued(job_id: str, submit: float, work: float, act: ActivationFit = SMALL, seq: int = 512,
           fair_start_s: float | None = None) -> JobView:  # fmt: skip
    return JobView(job_id, "alice", 0, submit, "llama-2-7b", 14 * G, 1 * G, act, 4, seq, work, work,
                   fair_start_s=fair_start_s)  # fmt: skip


def test_an_urgent_job_is_explained_with_the_fusion_rules_it_is_under():
    """q is past its FIFO-fair start: urgent, it may join m's group although fusing costs more
    than the token rule allows; explain said ``no (fusing adds ... tokens/step)``."""
    q = queued("q", 5000.0, 3000.0, seq=2048, fair_start_s=6000.0)
    view = ClusterView(10000.0, (q,), (run("m", 50000.0),), (WorkerView("w0", 80 * G, 312.0, "llama-2-7b", ("m",)),))
    policy = parse_policy_config({"policy": "aspen", "tail_delay_s": None})
    assert policy.schedule(view) == [Start("q", "w0")]
    exp = policy.explain(view, "q")
    assert exp.decision == "starts on w0 beside 1 running job(s)"
    assert exp.workers[0].rejected_by is None and exp.workers[0].total > 0
    assert "this cycle: starts on w0" in exp.format()


def test_a_worker_reserved_for_an_earlier_job_is_explained_as_held():
    """x cannot fit beside m and reserves w0 (it drains soonest); y would fit but must not take it."""
    big = ActivationFit(0.25 * G, 55.6 * G / 2048, 0.0)
    x, y = queued("x", 900.0, 100.0, act=big), queued("y", 950.0, 500.0)
    view = ClusterView(1000.0, (x, y), (run("m", 2000.0),), (WorkerView("w0", 80 * G, 312.0, "llama-2-7b", ("m",)),))
    policy = parse_policy_config({"policy": "aspen"})
    assert policy.schedule(view) == []
    assert policy.explain(view, "x").decision == "waits: no worker takes it now; reserves w0, the worker that drains soonest for it"
    exp = policy.explain(view, "y")
    assert exp.position == 1 and exp.decision == "waits: no worker takes it now"
    assert exp.workers[0].rejected_by == "held: reserved for x (it drains soonest for that job)"
    unreserved = parse_policy_config({"policy": "aspen", "reservations": 0})
    assert unreserved.schedule(view) == [Start("y", "w0")]
    assert unreserved.explain(view, "y").decision == "starts on w0 beside 1 running job(s)"


def test_a_job_behind_a_blocked_head_is_explained_as_not_reached():
    """fifo (no backfill) stops at a head that does not fit now (alone it would, 55.25 of 56 GiB; beside m
    it needs 56.25): the job behind it is not considered."""
    head, behind = queued("a", 1.0, 100.0, act=ActivationFit(0.25 * G, 40 * G / 2048, 0.0)), queued("b", 2.0, 100.0)
    view = ClusterView(10.0, (head, behind), (run("m", 2000.0),), (WorkerView("w0", 56 * G, 312.0, "llama-2-7b", ("m",)),))
    policy = parse_policy_config({"policy": "fifo"})
    assert policy.schedule(view) == []
    assert policy.explain(view, "a").decision.endswith("the queue stops here this cycle (no backfill)")
    exp = policy.explain(view, "b")
    assert exp.decision == "not considered this cycle: the cycle stopped at a, which could not start (no backfill)"
    assert exp.position == 1 and exp.workers[0].rejected_by is None  # w0 itself would take it


def test_starvation_s_applies_to_jobs_with_deadlines():
    """Every job the simulator or the controller sees carries a FIFO-fair deadline; ``starvation_s``
    must still put a job that has waited that long first."""
    act = ActivationFit(0.25 * G, 20 * G / 2048, 0.0)
    old = queued("old", 0.0, 7200.0, act=act, fair_start_s=70000.0)  # waited 20,000 s, deadline far ahead
    new = queued("new", 19990.0, 600.0, act=act, fair_start_s=70000.0)  # shorter: first by size
    view = ClusterView(20000.0, (old, new), (), (WorkerView("w0", 40 * G, 312.0, "llama-2-7b"),))
    assert parse_policy_config({"policy": "aspen"}).schedule(view) == [Start("new", "w0")]
    assert parse_policy_config({"policy": "aspen", "starvation_s": 600}).schedule(view) == [Start("old", "w0")]
    assert parse_policy_config({"policy": "aspen", "starvation_s": 30000}).schedule(view) == [Start("new", "w0")]


@pytest.mark.parametrize("field", ["weights", "shares", "quotas"])
def test_weights_shares_and_quotas_are_bounded(field):
    key = {"weights": "fusion", "shares": "alice", "quotas": "alice"}[field]
    with pytest.raises(PolicyConfigError, match=rf"{field}\.{key}: must be .* <= 1,000,000,000 \(got 1e\+308\)"):
        parse_policy_config({"policy": "aspen", field: {key: 1e308}})
    assert parse_policy_config({"policy": "aspen", field: {key: 10**9}}) is not None


def test_lower_priority_preemption_makes_room_a_filter_refuses_not_only_memory():
    """aspen with ``preemption: lower_priority``: a priority-9 job blocked by a token cap on the busy
    group (memory to spare) preempted nothing before; it preempts the priority-0 job now. A job blocked
    only by its owner's quota still preempts nothing."""
    low = JobView("lo", "bob", 0, 0.0, "llama-2-7b", 14 * G, 1 * G, SMALL, 2, 64, 5000.0, 6000.0,
                  worker_id="w0", start_time_s=10.0)  # fmt: skip
    high = JobView("hi", "alice", 9, 90.0, "llama-2-7b", 14 * G, 1 * G, SMALL, 2, 64, 3000.0, 3000.0)
    view = ClusterView(100.0, (high,), (low,), (WorkerView("w0", 80 * G, 312.0, "llama-2-7b", ("lo",)),))
    doc = {"policy": "aspen", "preemption": "lower_priority", "max_group_tokens": 100, "turn_max_s": None}
    policy = parse_policy_config(doc)
    assert policy.schedule(view) == [Preempt("lo")]
    assert "preempts lo" in policy.explain(view, "hi").decision
    assert parse_policy_config({**doc, "max_group_tokens": None}).schedule(view) == [Start("hi", "w0")]
    quota = parse_policy_config({**doc, "quotas": {"alice": 0}})
    assert quota.schedule(view) == []

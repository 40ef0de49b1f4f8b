"""Each built-in's rules on hand-made snapshots (memory in GiB; workers of 80 GiB unless noted)."""

import pytest

from policies.builtin import AspenSettings, CommonSettings, aspen, fifo, priority, sjf
from policies.interface import Preempt, Start
from tests.policies.helpers import job, view, worker


def test_fifo_packs_by_memory_in_submit_order():
    # each job: static 10 + dyn 30. w0: 10 + 30 + 30 = 70 <= 80 fits two; a third (100) does not.
    jobs = [job("c", submit=3, dyn_gib=30), job("a", submit=1, dyn_gib=30), job("b", submit=2, dyn_gib=30)]
    decisions = fifo().schedule(view(jobs, workers=[worker("w0")]))
    assert decisions == [Start("a", "w0"), Start("b", "w0")]


def test_fifo_head_of_line_blocks():
    # head "a" needs 10 + 80 > 80 everywhere; "b" would fit but fifo never bypasses the head
    jobs = [job("a", submit=1, dyn_gib=80), job("b", submit=2, dyn_gib=5)]
    assert fifo().schedule(view(jobs, workers=[worker("w0")])) == []


def test_fifo_picks_most_free_memory_ignores_locality():
    # w0 busy with model m: free after = 80 - (10 + 20 + 10) = 40 -> score 50
    # w1 idle holding another model: free after = 80 - (10 + 10) = 60 -> score 75 -> wins
    running = [job("r", dyn_gib=20, worker="w0", start=0)]
    workers = [worker("w0", model="m", running=("r",)), worker("w1", model="other")]
    assert fifo().schedule(view([job("a", dyn_gib=10)], running, workers)) == [Start("a", "w1")]


def test_one_base_model_per_worker():
    # w0 runs model m; job of model x can only use idle w1
    running = [job("r", dyn_gib=5, worker="w0")]
    workers = [worker("w0", model="m", running=("r",)), worker("w1")]
    assert fifo().schedule(view([job("a", model="x", dyn_gib=5)], running, workers)) == [Start("a", "w1")]


def test_not_accepting_worker_is_skipped():
    workers = [worker("w0", accepting=False), worker("w1")]
    assert fifo().schedule(view([job("a")], workers=workers)) == [Start("a", "w1")]


def test_margin_applies_to_dynamic_part():
    # 10 + 60 * 1.0 = 70 fits; with margin 0.2: 10 + 60 * 1.2 = 82 > 80 does not
    jobs = [job("a", dyn_gib=60)]
    assert fifo().schedule(view(jobs, workers=[worker("w0")])) == [Start("a", "w0")]
    assert fifo(CommonSettings(margin=0.2)).schedule(view(jobs, workers=[worker("w0")])) == []


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # order: priority 2 first, then FCFS among priority 1 ("b" before "c"); one slot each
        (priority(), ["d", "b"]),
        # shortest remaining work: c (50) then d (70)
        (sjf(), ["c", "d"]),
        (fifo(), ["a", "b"]),
    ],
)
def test_queue_orders(policy, expected):
    jobs = [job("a", submit=1, priority=0, work=300, dyn_gib=60), job("b", submit=2, priority=1, work=200, dyn_gib=60),
            job("c", submit=3, priority=1, work=50, dyn_gib=60), job("d", submit=4, priority=2, work=70, dyn_gib=60)]
    # two workers, each fits exactly one job (10 + 60 = 70; two would be 130)
    decisions = policy.schedule(view(jobs, workers=[worker("w0"), worker("w1")]))
    assert [d.job_id for d in decisions] == expected


def test_priority_preempts_lowest_priority_latest_started():
    # w0 holds r1 (prio 0, started 10) and r2 (prio 0, started 20): 10 + 30 + 30 = 70.
    # High job needs 40 dyn: 70 + 40 = 110 > 80; removing r2 (latest start): 10 + 30 + 40 = 80 fits.
    running = [job("r1", dyn_gib=30, worker="w0", start=10), job("r2", dyn_gib=30, worker="w0", start=20)]
    workers = [worker("w0", model="m", running=("r1", "r2"))]
    decisions = priority().schedule(view([job("h", priority=5, dyn_gib=40)], running, workers))
    assert decisions == [Preempt("r2")]


def test_priority_waits_for_pending_preemption():
    running = [job("r1", dyn_gib=30, worker="w0", start=10), job("r2", dyn_gib=30, worker="w0", start=20, pending=True)]
    workers = [worker("w0", model="m", running=("r1", "r2"))]
    assert priority().schedule(view([job("h", priority=5, dyn_gib=40)], running, workers)) == []


def test_priority_never_preempts_equal_priority():
    running = [job("r1", priority=5, dyn_gib=70, worker="w0", start=10)]
    workers = [worker("w0", model="m", running=("r1",))]
    assert priority().schedule(view([job("h", priority=5, dyn_gib=40)], running, workers)) == []


def test_priority_empties_worker_of_other_model():
    # w0 runs model x with two low jobs; the high job (model m) needs all of w0
    running = [job("x1", model="x", dyn_gib=20, worker="w0", start=1), job("x2", model="x", dyn_gib=20, worker="w0",
                                                                               start=2)]  # fmt: skip
    workers = [worker("w0", model="x", running=("x1", "x2"))]
    decisions = priority().schedule(view([job("h", priority=1, dyn_gib=40)], running, workers))
    assert sorted(d.job_id for d in decisions) == ["x1", "x2"]
    assert all(isinstance(d, Preempt) for d in decisions)


def _aspen(**kw) -> object:
    return aspen(AspenSettings(**kw))


def test_aspen_backfills_past_a_blocked_job():
    # "big" cannot fit (10 + 80); aspen skips it and starts "small" (fifo would block)
    jobs = [job("big", submit=1, dyn_gib=80), job("small", submit=2, dyn_gib=5)]
    assert _aspen(margin=0.0).schedule(view(jobs, workers=[worker("w0")])) == [Start("small", "w0")]


def test_aspen_margin_default_keeps_headroom():
    # 10 + 62 * 1.15 = 81.3 > 80: refused under the default margin 0.15, accepted at margin 0
    jobs = [job("a", dyn_gib=62)]
    assert aspen().schedule(view(jobs, workers=[worker("w0")])) == []
    assert _aspen(margin=0.0).schedule(view(jobs, workers=[worker("w0")])) == [Start("a", "w0")]


def test_aspen_prefers_worker_holding_the_model():
    # both idle; only locality differs: w1 holds m -> locality 100 vs 0
    workers = [worker("w0", model="other"), worker("w1", model="m")]
    assert aspen().schedule(view([job("a")], workers=workers)) == [Start("a", "w1")]


def test_aspen_groups_similar_lengths():
    # w0 runs seq 512, w1 runs seq 4096 (both model m, 1 row each). New job: seq 512, 1 row.
    # length: w0 (512 + 512) / (2 * 512) = 100; w1 (4096 + 512) / (2 * 4096) = 56.25
    # load:   w0 1/2 * 512/512 = 50;              w1 1/2 * 512/4096 = 6.25
    # weights locality 1, length 2, load 1 -> w0 (100 + 200 + 50) / 4 = 87.5; w1 (100 + 112.5 + 6.25) / 4 = 54.7
    running = [job("r0", seq=512, worker="w0"), job("r1", seq=4096, worker="w1")]
    workers = [worker("w0", model="m", running=("r0",)), worker("w1", model="m", running=("r1",))]
    policy = _aspen(max_group_tokens=None)
    assert policy.schedule(view([job("a", seq=512)], running, workers)) == [Start("a", "w0")]
    exp = policy.explain(view([job("a", seq=512)], running, workers), "a")
    totals = {w.worker_id: round(w.total, 1) for w in exp.workers}
    assert totals == {"w0": 87.5, "w1": 54.7}


def test_aspen_token_cap_filter():
    # w0 group: 4 rows x 2048 = 8192 tokens; adding 1 x 2048 -> 10240 > 8192 -> use idle w1
    running = [job("r0", mbs=4, seq=2048, dyn_gib=5, worker="w0")]
    workers = [worker("w0", model="m", running=("r0",)), worker("w1", model="other")]
    assert aspen().schedule(view([job("a", seq=2048, dyn_gib=5)], running, workers)) == [Start("a", "w1")]


def test_aspen_multifactor_breakdown():
    # now 1000. age = min(1, 1000/14400) = 0.0694 -> 69.4; size = 3600 / (3600 + 400) = 0.9 -> 1800
    # priority class: only job -> 0; fairshare: no usage -> 1 -> 500. total 69.4 + 1800 + 0 + 500 = 2369.4
    v = view([job("a", submit=0, work=400)], workers=[worker("w0")])
    exp = aspen().explain(v, "a")
    values = {f.name: round(f.weighted, 1) for f in exp.factors}
    assert values == {"age": 69.4, "fairshare": 500.0, "size": 1800.0, "priority": 0.0}
    assert exp.priority == pytest.approx(2369.4, abs=0.1)
    assert "age" in exp.format()


def test_aspen_size_and_priority_order():
    # x: prio 0, work 3600 -> size 0.5 * 2000 = 1000; y: prio 2 (factor 1 -> 1000), work 3600 -> 1000 + 1000
    # z: prio 0, work 0 -> size 2000. Order: y (2000 + ...), z (2000), x (1000); same submit, same age
    jobs = [job("x", work=3600, dyn_gib=60), job("y", priority=2, work=3600, dyn_gib=60),
            job("z", work=0.0, dyn_gib=60)]  # fmt: skip
    decisions = _aspen(margin=0.0).schedule(view(jobs, workers=[worker("w0"), worker("w1")]))
    # y and z tie at 2000 (+ equal age, fairshare): job id breaks the tie -> y, z
    assert [d.job_id for d in decisions] == ["y", "z"]


def test_aspen_fair_share_prefers_light_user():
    # alice used 900 s, bob 100 s; equal shares 0.5. alice 2^-(0.9/0.5) = 0.287, bob 2^-(0.1/0.5) = 0.871
    jobs = [job("a", owner="alice", dyn_gib=60), job("b", owner="bob", dyn_gib=60)]
    decisions = _aspen(margin=0.0).schedule(view(jobs, workers=[worker("w0")], usage={"alice": 900, "bob": 100}))
    assert decisions == [Start("b", "w0")]


def test_aspen_owner_quota():
    running = [job("r", owner="alice", dyn_gib=5, worker="w0")]
    workers = [worker("w0", model="m", running=("r",)), worker("w1")]
    jobs = [job("a", owner="alice", dyn_gib=5, submit=1), job("b", owner="bob", dyn_gib=5, submit=2)]
    decisions = _aspen(quotas={"alice": 1}).schedule(view(jobs, running, workers))
    assert [d.job_id for d in decisions] == ["b"]


def test_aspen_starvation_guard_puts_old_jobs_first():
    # "old" waited 5000 s > starvation_s 3600: goes first despite a worse multifactor score
    jobs = [job("old", submit=0, work=1e6, dyn_gib=60), job("new", submit=4000, work=1, priority=3, dyn_gib=60)]
    decisions = _aspen(starvation_s=3600, margin=0.0).schedule(view(jobs, workers=[worker("w0")], now=5000))
    assert decisions == [Start("old", "w0")]


def test_aspen_reservation_holds_back_draining_worker():
    # big (60) fits nowhere now. w0: r0 (40 dyn, 100 s left); w1: r1 (40 dyn, 5000 s left).
    # big reserves w0 (drains first); "s" (5) may only go to w1 (not w0).
    running = [job("r0", dyn_gib=40, work=100, worker="w0"), job("r1", dyn_gib=40, work=5000, worker="w1")]
    workers = [worker("w0", model="m", running=("r0",)), worker("w1", model="m", running=("r1",))]
    jobs = [job("big", submit=0, work=10, dyn_gib=60), job("s", submit=1, work=5000, dyn_gib=5)]
    decisions = _aspen(margin=0.0, max_group_tokens=None).schedule(view(jobs, running, workers))
    assert decisions == [Start("s", "w1")]
    no_res = _aspen(margin=0.0, max_group_tokens=None, reservations=0).schedule(view(jobs, running, workers))
    assert no_res == [Start("s", "w0")]  # w0 has more free memory: load score equal, length equal -> first


def test_schedule_is_pure():
    v = view([job("a"), job("b", submit=1)], workers=[worker("w0")])
    assert aspen().schedule(v) == aspen().schedule(v)
    assert len(v.queued) == 2 and v.workers[0].running == ()


def test_explain_unknown_job():
    with pytest.raises(KeyError):
        fifo().explain(view(workers=[worker("w0")]), "nope")

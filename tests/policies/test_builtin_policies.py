"""Each built-in's rules on hand-made snapshots (memory in GiB; workers of 80 GiB unless noted)."""

import random
from dataclasses import replace

import pytest

from policies.builtin import AspenSettings, CommonSettings, aspen, fifo, priority, sjf
from policies.framework import Cycle, fifo_wait_s
from policies.interface import Preempt, Start
from policies.plugins import FusionPays, class_tail_cut
from tests.policies.helpers import job, view, worker


def test_fifo_packs_by_memory_in_submit_order():
    # each job: static 10 + dyn 30. w0: 10 + 30 + 30 = 70 <= 80 fits two; a third (100) does not.
    jobs = [job("c", submit=3, dyn_gib=30), job("a", submit=1, dyn_gib=30), job("b", submit=2, dyn_gib=30)]
    decisions = fifo().schedule(view(jobs, workers=[worker("w0")]))
    assert decisions == [Start("a", "w0"), Start("b", "w0")]


def test_fifo_head_of_line_blocks():
    # w0 runs r: 10 + 50. Head "a" needs 40 more (100 > 80) but fits once w0 drains (10 + 40);
    # "b" would fit now (65) but fifo never bypasses the head
    running = [job("r", dyn_gib=50, worker="w0", start=0)]
    jobs = [job("a", submit=1, dyn_gib=40), job("b", submit=2, dyn_gib=5)]
    assert fifo().schedule(view(jobs, running, [worker("w0", model="m", running=("r",))])) == []


@pytest.mark.parametrize("make", [fifo, priority, sjf, aspen])
def test_a_job_that_fits_no_worker_even_alone_never_blocks_the_queue(make):
    """A job that no worker could take even empty (10 + 100 GiB on 80 and 40 GiB workers) waits
    without blocking the jobs behind it, preempting or reserving: a strict policy's head-of-line
    blocking would otherwise stop the cluster for good (one tenant's oversized job)."""
    running = [job("r", priority=0, dyn_gib=20, worker="w0", start=0)]
    workers = [worker("w0", model="m", running=("r",)), worker("w1", mem_gib=40)]
    jobs = [job("big", submit=1, priority=9, dyn_gib=100), job("b", submit=2, dyn_gib=5)]
    v = view(jobs, running, workers)
    decisions = make().schedule(v)
    assert decisions and all(isinstance(d, Start) and d.job_id == "b" for d in decisions)
    peak = 10 + (1 + make().margin) * 100  # 110 GiB, 125 with aspen's margin of 0.15
    assert (f"fits no worker even alone (predicted peak {peak:.1f} GiB with the margin; the largest worker has "
            "80.0 GiB)") in make().explain(v, "big").decision  # fmt: skip
    # the same job with 60 GiB (fits w0 once it drains) blocks fifo as before
    jobs[0] = job("big", submit=1, priority=9, dyn_gib=60)
    if make is fifo:
        assert fifo().schedule(view(jobs, running, workers)) == []


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


PREEMPTIVE_BACKFILL = [
    pytest.param(lambda: sjf(CommonSettings(preemption="lower_priority", backfill=True)), id="sjf"),
    pytest.param(lambda: aspen(AspenSettings(preemption="lower_priority", fair_slack_s=None)), id="aspen"),
]


@pytest.mark.parametrize("make", PREEMPTIVE_BACKFILL)
def test_job_started_this_cycle_is_never_a_victim(make):
    # Before 2026-12-07 "a" (shortest, first in the policy's order) took the idle w0 and "h" (priority 5),
    # fitting nowhere, must not preempt it: it would stop "a" before it ran, and the two would trade w0
    # at one instant forever. With lower_priority the queue now puts higher priorities first: "h" takes
    # w0 and "a", of lower priority, preempts nothing.
    jobs = [job("a", work=10, dyn_gib=60), job("h", priority=5, work=50, dyn_gib=60)]
    assert make().schedule(view(jobs, workers=[worker("w0")])) == [Start("h", "w0")]


@pytest.mark.parametrize("make", PREEMPTIVE_BACKFILL)
def test_job_started_at_this_instant_is_never_a_victim(make):
    running = [job("r", dyn_gib=60, worker="w0", start=1000.0)]  # the view's now is 1000
    workers = [worker("w0", model="m", running=("r",))]
    assert make().schedule(view([job("h", priority=5, dyn_gib=60)], running, workers)) == []
    running = [job("r", dyn_gib=60, worker="w0", start=999.0)]
    assert make().schedule(view([job("h", priority=5, dyn_gib=60)], running, workers)) == [Preempt("r")]


@pytest.mark.parametrize("make", PREEMPTIVE_BACKFILL)
def test_worker_being_emptied_takes_no_other_job(make):
    # "h" (model x) preempts "r" to empty w0; "b" (model m) would fit beside "r" but must not refill w0
    running = [job("r", dyn_gib=40, worker="w0", start=10)]
    workers = [worker("w0", model="m", running=("r",))]
    queued = [job("h", priority=5, model="x", work=10, dyn_gib=40), job("b", submit=5, work=20, dyn_gib=5)]
    assert make().schedule(view(queued, running, workers)) == [Preempt("r")]
    # while the preemption is pending, neither "b" nor "h" joins, and nothing more is preempted
    running = [job("r", dyn_gib=40, worker="w0", start=10, pending=True)]
    assert make().schedule(view(queued, running, workers)) == []
    assert make().explain(view(queued, running, workers), "b").workers[0].rejected_by == (
        "held: a preemption on it is pending")
    # the same worker without a pending preemption takes "b"
    running = [job("r", dyn_gib=40, worker="w0", start=10)]
    assert make().schedule(view([job("b", submit=5, work=20, dyn_gib=5)], running, workers)) == [Start("b", "w0")]


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


# The tail guard off, for tests of the multifactor order alone.
NO_GUARD = {"guard_backlog": None, "guard_long": None, "turn_max_s": None}  # order tests: no guard, no turns


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
    policy = _aspen(weights={"length": 2, "load": 1, "fusion": 0}, fusion_max_cost=None, max_slowdown=None)
    assert policy.schedule(view([job("a", seq=512)], running, workers)) == [Start("a", "w0")]
    exp = policy.explain(view([job("a", seq=512)], running, workers), "a")
    totals = {w.worker_id: round(w.total, 1) for w in exp.workers}
    assert totals == {"w0": 87.5, "w1": 54.7}


def test_aspen_token_cap_filter():
    # w0 group: 4 rows x 2048 = 8192 tokens; adding 1 x 2048 -> 10240 > 8192 -> use idle w1
    running = [job("r0", mbs=4, seq=2048, dyn_gib=5, worker="w0")]
    workers = [worker("w0", model="m", running=("r0",)), worker("w1", model="other")]
    policy = _aspen(max_group_tokens=8192, fusion_max_cost=None, max_slowdown=None, weights={"fusion": 0})
    assert policy.schedule(view([job("a", seq=2048, dyn_gib=5)], running, workers)) == [Start("a", "w1")]
    uncapped = _aspen(max_group_tokens=None, fusion_max_cost=None, max_slowdown=None, weights={"fusion": 0})
    assert uncapped.schedule(view([job("a", seq=2048, dyn_gib=5)], running, workers)) == [Start("a", "w0")]


def test_aspen_multifactor_breakdown():
    # now 1000. age = min(1, 1000/14400) = 0.0694 -> 69.4; size = 3600 / (3600 + 400) = 0.9 -> 1800
    # priority class: only job -> 0; fairshare: no usage -> 1 -> 500. total 69.4 + 1800 + 0 + 500 = 2369.4
    v = view([job("a", submit=0, work=400)], workers=[worker("w0")])
    exp = _aspen(weights={"age": 1000, "priority": 1000}).explain(v, "a")
    values = {f.name: round(f.weighted, 1) for f in exp.factors}
    assert values == {"age": 69.4, "fairshare": 500.0, "size": 1800.0, "priority": 0.0}
    assert exp.priority == pytest.approx(2369.4, abs=0.1)
    assert "age" in exp.format()


def test_aspen_size_and_priority_order():
    # x: prio 0, work 3600 -> size 0.5 * 2000 = 1000; y: prio 2 (factor 1 -> 1000), work 3600 -> 1000 + 1000
    # z: prio 0, work 0 -> size 2000. Order: y (2000 + ...), z (2000), x (1000); same submit, same age
    jobs = [job("x", work=3600, dyn_gib=60), job("y", priority=2, work=3600, dyn_gib=60),
            job("z", work=0.0, dyn_gib=60)]  # fmt: skip
    decisions = _aspen(margin=0.0, weights={"priority": 1000}, **NO_GUARD).schedule(
        view(jobs, workers=[worker("w0"), worker("w1")]))
    # y and z tie at 2000 (+ equal age, fairshare): job id breaks the tie -> y, z
    assert [d.job_id for d in decisions] == ["y", "z"]


def test_aspen_fair_share_prefers_light_user():
    # alice used 900 s, bob 100 s; equal shares 0.5. alice 2^-(0.9/0.5) = 0.287, bob 2^-(0.1/0.5) = 0.871
    jobs = [job("a", owner="alice", dyn_gib=60), job("b", owner="bob", dyn_gib=60)]
    decisions = _aspen(margin=0.0, **NO_GUARD).schedule(view(jobs, workers=[worker("w0")],
                                                             usage={"alice": 900, "bob": 100}))
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
    decisions = _aspen(starvation_s=3600, margin=0.0, **NO_GUARD).schedule(view(jobs, workers=[worker("w0")],
                                                                                now=5000))
    assert decisions == [Start("old", "w0")]


def test_aspen_reservation_holds_back_draining_worker():
    # big (60) fits nowhere now. w0: r0 (40 dyn, 100 s left); w1: r1 (40 dyn, 5000 s left).
    # big reserves w0 (drains first); "s" (5) may only go to w1 (not w0).
    running = [job("r0", dyn_gib=40, work=100, worker="w0"), job("r1", dyn_gib=40, work=5000, worker="w1")]
    workers = [worker("w0", model="m", running=("r0",)), worker("w1", model="m", running=("r1",))]
    jobs = [job("big", submit=0, work=10, dyn_gib=60), job("s", submit=1, work=5000, dyn_gib=5)]
    decisions = _aspen(margin=0.0, max_group_tokens=None).schedule(view(jobs, running, workers))
    assert decisions == [Start("s", "w1")]
    no_res = _aspen(margin=0.0, reservations=0).schedule(view(jobs, running, workers))
    assert no_res == [Start("s", "w0")]  # w0 has more free memory: load score equal, length equal -> first


def test_schedule_is_pure():
    v = view([job("a"), job("b", submit=1)], workers=[worker("w0")])
    assert aspen().schedule(v) == aspen().schedule(v)
    assert len(v.queued) == 2 and v.workers[0].running == ()


def test_explain_unknown_job():
    with pytest.raises(KeyError):
        fifo().explain(view(workers=[worker("w0")]), "nope")


# --- aspen's tail guard, fusion rules and the engine's fast paths --------------------------------------


def test_fifo_wait_estimate():
    # running: r (submitted 0, 500 s left). queued: a (submitted 10, 300 s), b (submitted 20, 200 s).
    # FIFO would run the 1 oldest job (r); its queue is a + b = 500 s over 2 accepting workers: 250 s.
    running = [job("r", submit=0, work=500, worker="w0")]
    v = view([job("a", submit=10, work=300), job("b", submit=20, work=200)], running,
             [worker("w0", model="m", running=("r",)), worker("w1")])  # fmt: skip
    assert fifo_wait_s(v) == pytest.approx(250.0)
    # a job older than a running one counts as FIFO's running set instead
    v2 = view([job("a", submit=-5, work=300)], running, [worker("w0", model="m", running=("r",)), worker("w1")])
    assert fifo_wait_s(v2) == pytest.approx(500 / 2)


def test_tail_guard_puts_jobs_waiting_longer_than_fifo_would_first():
    # now 1000. FIFO wait estimate: queued work (600 + 10) / 1 worker = 610 s.
    # "old" (long, 600 s) waited 1000 s >= 610 s: urgent, so it goes before the short "new".
    jobs = [job("old", submit=0, work=600, dyn_gib=60), job("new", submit=990, work=10, dyn_gib=60)]
    v = view(jobs, workers=[worker("w0")], now=1000)
    assert _aspen(margin=0.0).schedule(v) == [Start("old", "w0")]
    assert _aspen(margin=0.0, **NO_GUARD).schedule(v) == [Start("new", "w0")]  # size order alone
    # at now 500 it has waited 500 s < 610 s (and 600 s of work is not longer than 610 s): not urgent
    jobs = [job("old", submit=0, work=600, dyn_gib=60), job("new", submit=400, work=10, dyn_gib=60)]
    assert _aspen(margin=0.0).schedule(view(jobs, workers=[worker("w0")], now=500)) == [Start("new", "w0")]


def test_long_job_guard():
    # "long" (5000 s) is longer than the FIFO wait estimate (5010 s of queue / 2 workers = 2505 s) and
    # waited 1100 s >= 0.2 x 5000: urgent. With guard_long off (and guard_backlog 1: 1100 < 2505) it is not.
    jobs = [job("long", submit=0, work=5000, dyn_gib=60), job("short", submit=1090, work=10, dyn_gib=60)]
    v = view(jobs, workers=[worker("w0"), worker("w1", mem_gib=20)], now=1100)
    assert _aspen(margin=0.0).schedule(v) == [Start("long", "w0")]
    assert _aspen(margin=0.0, guard_long=None).schedule(v) == [Start("short", "w0")]


def test_fusion_pays_refuses_a_join_dearer_than_running_alone():
    # w0 runs 1 row x 4096. A 1 x 256 job would add 4096 padded tokens/step > 1.0 x (256 + 2048)
    # alone: it waits for (or takes) an idle worker instead. A 1 x 4096 job adds 4096 <= 6144: joins.
    running = [job("r", seq=4096, dyn_gib=5, worker="w0", work=10)]
    workers = [worker("w0", model="m", running=("r",))]
    policy = _aspen(max_slowdown=None, **NO_GUARD)
    assert policy.schedule(view([job("short", seq=256, dyn_gib=5)], running, workers)) == []
    assert policy.schedule(view([job("same", seq=4096, dyn_gib=5)], running, workers)) == [Start("same", "w0")]
    assert _aspen(fusion_max_cost=None, max_slowdown=None, **NO_GUARD).schedule(
        view([job("short", seq=256, dyn_gib=5)], running, workers)) == [Start("short", "w0")]


def test_urgent_jobs_are_exempt_from_fusion_rules():
    # the same refused join, but the job waited past the FIFO wait estimate: it joins anyway
    running = [job("r", seq=4096, dyn_gib=5, worker="w0", work=10)]
    workers = [worker("w0", model="m", running=("r",))]
    v = view([job("short", seq=256, dyn_gib=5, submit=0, work=1)], running, workers, now=1000)
    assert _aspen(max_slowdown=None).schedule(v) == [Start("short", "w0")]


def test_slowdown_cap_protects_long_members():
    # w0 runs a long job (1 x 2048 tokens, 10^6 s left, longer than the FIFO wait estimate).
    # Adding 1 x 2048: fused step 4096 + 2048 = 6144 > 1.25 x (2048 + 2048) = 5120 -> refused;
    # at a 1.6 cap (6553.6) it joins. A short member would not be protected. (The tail-delay rule,
    # tested below, is off here: r is its class's longest job and would refuse any newcomer.)
    nt = {**NO_GUARD, "tail_delay_s": None}
    running = [job("r", seq=2048, dyn_gib=5, worker="w0", work=1e6)]
    workers = [worker("w0", model="m", running=("r",))]
    v = view([job("a", seq=2048, dyn_gib=5, submit=999)], running, workers)
    assert _aspen(max_slowdown=1.25, **nt).schedule(v) == []
    assert _aspen(max_slowdown=1.6, **nt).schedule(v) == [Start("a", "w0")]
    short = [job("r", seq=2048, dyn_gib=5, worker="w0", work=1)]
    huge = job("huge", dyn_gib=90, work=1000, submit=998)  # fits nowhere; makes the FIFO wait 1010 s
    v = view([job("a", seq=2048, dyn_gib=5, submit=999, work=10), huge], short, workers)
    assert _aspen(max_slowdown=1.25, **nt).schedule(v) == [Start("a", "w0")]


def test_tail_delay_protects_the_longest_jobs_of_a_class():
    # w0 runs r (1 x 2048 tokens, own step 2048 + 2048 = 4096, 36000 s left) and, of priority 0,
    # only "s" (100 s left) is shorter: with tail_jobs 2 both are tail jobs, r sets the bound.
    # Newcomer "a" (1 x 256): fused step 2 x 2048 + 2048 = 6144 tokens, so r's remaining run grows
    # by 36000 x (6144 / 4096 - 1) = 18000 s. tail_delay_s 1800 refuses; 20000 lets it join.
    running = [job("r", seq=2048, dyn_gib=5, worker="w0", work=36000)]
    workers = [worker("w0", model="m", running=("r",))]
    queued = [job("a", seq=2048, dyn_gib=5, submit=999, work=100)]
    free = {"max_slowdown": None, "fusion_max_cost": None, **NO_GUARD}
    assert _aspen(tail_delay_s=1800, **free).schedule(view(queued, running, workers)) == []
    assert _aspen(tail_delay_s=20000, **free).schedule(view(queued, running, workers)) == [Start("a", "w0")]
    assert _aspen(tail_delay_s=None, **free).schedule(view(queued, running, workers)) == [Start("a", "w0")]
    # Two longer priority-0 jobs queued: r is no longer among the class's 2 longest, so it is not
    # protected; a job of another class does not count (its class has its own tail).
    longer = [job(f"x{i}", dyn_gib=90, work=50000, submit=900) for i in range(2)]  # fit nowhere
    assert _aspen(tail_delay_s=1800, **free).schedule(view(queued + longer, running, workers)) == [Start("a", "w0")]
    other = [job(f"y{i}", priority=1, dyn_gib=90, work=50000, submit=900) for i in range(2)]
    assert _aspen(tail_delay_s=1800, **free).schedule(view(queued + other, running, workers)) == []
    assert _aspen(tail_delay_s=1800, tail_jobs=3, **free).schedule(
        view(queued + longer, running, workers)) == []  # x0, x1, r: r is 3rd


def test_tail_ceiling_bounds_each_members_projected_jct_by_its_own_fifo_fair_jct():
    # now 1000. w0 runs r (priority 0, submitted at 0, 1 x 2048 tokens: own step 2048 + 2048 = 4096,
    # 3000 s left, deadline 0: FIFO-fair JCT 0 - 0 + 3000 = 3000). "a" (1 x 2048) is urgent (deadline
    # 900): urgency waives the other fusion rules, not this one. Joining makes the step 6144
    # tokens, so r's projected JCT is 1000 + 3000 x 6144 / 4096 = 5500 s > r's FIFO-fair JCT 3000:
    # refused; with tail_ceiling 2 (6000) or off, a joins. Another job of r's class allowed longer
    # (FIFO-fair JCT 6000) does not raise r's bound; r's own later deadline (2600: 5600 >= 5500)
    # does. An unstamped member is not bounded.
    running = [job("r", seq=2048, dyn_gib=5, worker="w0", work=3000, submit=0, fair=0)]
    workers = [worker("w0", model="m", running=("r",))]
    a = job("a", seq=2048, dyn_gib=5, submit=900, work=100, fair=900)
    free = {"max_slowdown": None, "fusion_max_cost": None, "tail_delay_s": None, **NO_GUARD}
    assert _aspen(**free).schedule(view([a], running, workers)) == []
    assert _aspen(**free, tail_ceiling=2.0).schedule(view([a], running, workers)) == [Start("a", "w0")]
    assert _aspen(**free, tail_ceiling=None).schedule(view([a], running, workers)) == [Start("a", "w0")]
    big = job("big", dyn_gib=90, work=5000, submit=500, fair=1500)  # fits nowhere; FIFO-fair JCT 6000
    assert _aspen(**free).schedule(view([a, big], running, workers)) == []
    later = [job("r", seq=2048, dyn_gib=5, worker="w0", work=3000, submit=0, fair=2600)]
    assert _aspen(**free).schedule(view([a], later, workers)) == [Start("a", "w0")]
    unstamped = [job("r", seq=2048, dyn_gib=5, worker="w0", work=3000, submit=0)]
    assert _aspen(**free).schedule(view([a], unstamped, workers)) == [Start("a", "w0")]
    reason = _aspen(**free).explain(view([a], running, workers), "a").workers[0].rejected_by
    assert "would end r past its FIFO-fair JCT" in reason


def test_fusion_score_prefers_an_idle_worker_then_the_cheapest_group():
    # idle w2 scores 100; of the busy ones, w0 (same length, 1 member) beats w1 (2 members)
    running = [job("r0", seq=512, dyn_gib=5, worker="w0"), job("r1", seq=512, dyn_gib=5, worker="w1"),
               job("r2", seq=512, dyn_gib=5, worker="w1")]  # fmt: skip
    busy = [worker("w0", model="m", running=("r0",)), worker("w1", model="m", running=("r1", "r2"))]
    policy = _aspen(**NO_GUARD)
    a = job("a", seq=512, dyn_gib=5, submit=999)
    assert policy.schedule(view([a], running, [*busy, worker("w2", model="m")])) == [Start("a", "w2")]
    assert policy.schedule(view([a], running, busy)) == [Start("a", "w0")]


def test_partial_sort_matches_the_full_order():
    rng = random.Random(3)
    jobs = [job(f"j{i}", owner=rng.choice("abc"), priority=rng.choice((0, 1, 2)), submit=rng.choice((0, 5, 9)),
                work=rng.choice((10.0, 100.0, 1000.0))) for i in range(300)]  # fmt: skip
    v = view(jobs, workers=[worker("w0")], usage={"a": 5, "b": 1})
    order = _aspen(weights={"age": 1000, "priority": 1000}).order
    full = [j.job_id for j in order.order(v.queued, v)]
    for k in (1, 7, 50, 300, 400):
        assert [j.job_id for j in order.top(v.queued, v, k)] == full[:k]


def test_queue_orders_match_their_documented_keys_and_lazy_heap_order():
    # Each built-in order's ``keys`` (heapified lazily by the engine) gives the documented order,
    # ties included: many equal submit times, priorities and work.
    rng = random.Random(5)
    jobs = [job(f"j{rng.randrange(1000):03d}-{i}", priority=rng.choice((0, 1, 2)), submit=rng.choice((0, 5, 9)),
                work=rng.choice((10.0, 100.0))) for i in range(200)]  # fmt: skip
    v = view(jobs, workers=[worker("w0")])
    documented = {
        "fifo": lambda j: (j.submit_time_s, j.job_id),
        "priority": lambda j: (-j.priority, j.submit_time_s, j.job_id),
        "sjf": lambda j: (j.remaining_work_s, j.submit_time_s, j.job_id),
    }
    for policy in (fifo(), priority(), sjf()):
        want = [j.job_id for j in sorted(jobs, key=documented[policy.name])]
        assert [j.job_id for j in policy.order.order(v.queued, v)] == want
        assert [j.job_id for j in policy._ordered(v)] == want  # the engine's lazy heap
        assert [j.job_id for j in policy._ordered(v, limit=17)] == want[:17]


class _NoShortcuts:
    """An order with only ``order`` and ``breakdown`` (as a custom policy may have): no keys, no top."""

    def __init__(self, inner):
        self.inner = inner

    def order(self, queued, view):
        return self.inner.order(queued, view)

    def breakdown(self, job, view):
        return self.inner.breakdown(job, view)


def test_lazy_ordering_gives_the_same_decisions_as_a_full_sort():
    rng = random.Random(11)
    running = [job(f"r{i}", dyn_gib=20, worker=f"w{i}", start=0.0, seq=rng.choice((256, 512))) for i in range(6)]
    workers = [worker(f"w{i}", model="m", running=(f"r{i}",)) for i in range(6)] + [worker("w6"), worker("w7")]
    queued = [job(f"q{i}", submit=rng.uniform(0, 900), dyn_gib=rng.choice((5, 15, 30, 60)), work=rng.uniform(10, 9000),
                  priority=rng.choice((0, 1)), seq=rng.choice((256, 512, 1024))) for i in range(400)]  # fmt: skip
    v = view(queued, running, workers)
    for policy in (fifo(), priority(), sjf(), _aspen(), _aspen(queue_depth=0)):
        plain = replace(policy, order=_NoShortcuts(policy.order))
        decisions = policy.schedule(v)
        assert decisions and decisions == plain.schedule(v), policy.name


def test_fifo_wait_estimate_with_tied_submit_times_matches_a_brute_force_count():
    # FIFO runs the n oldest (n = running jobs; among equal submit times the least work first, as
    # the estimate assumes) and queues the rest: their work over the accepting workers.
    rng = random.Random(2)
    for _ in range(30):
        n_run, n_q = rng.randrange(1, 6), rng.randrange(0, 12)
        running = [job(f"r{i}", submit=rng.choice((0, 1, 2)), work=rng.uniform(1, 100), worker="w0") for i in range(n_run)]
        queued = [job(f"q{i}", submit=rng.choice((0, 1, 2, 3)), work=rng.uniform(1, 100)) for i in range(n_q)]
        workers = [worker("w0", model="m", running=tuple(j.job_id for j in running)), worker("w1"),
                   worker("w2", accepting=False)]  # fmt: skip
        everyone = sorted(running + queued, key=lambda j: (j.submit_time_s, j.remaining_work_s))
        expected = sum(j.remaining_work_s for j in everyone[n_run:]) / 2
        assert fifo_wait_s(view(queued, running, workers)) == pytest.approx(expected)


def test_class_tail_cut_is_each_classs_kth_largest_remaining_work():
    rng = random.Random(4)
    running = [job(f"r{i}", priority=rng.choice((0, 2)), work=rng.uniform(1, 50), worker="w0") for i in range(7)]
    queued = [job(f"q{i}", priority=rng.choice((0, 1, 2)), work=rng.uniform(1, 50)) for i in range(40)]
    cycle = Cycle(view(queued, running, [worker("w0", model="m", running=tuple(j.job_id for j in running))]), 0.0)
    for k in (1, 2, 5, 100):
        cut = class_tail_cut(cycle, k)
        for p in (0, 1, 2):
            works = sorted((j.remaining_work_s for j in running + queued if j.priority == p), reverse=True)
            assert cut[p] == works[min(k, len(works)) - 1]
        assert set(cut) == {0, 1, 2}


def test_tail_ceiling_rejects_exactly_when_a_members_projected_jct_passes_its_fair_jct():
    # The filter checks a per-group bound on the fused step first; it must agree with the rule as
    # documented (member m: now - submit + remaining * step / own > ceiling * fair JCT) everywhere.
    rng = random.Random(9)
    pays = FusionPays(max_cost=None, max_slowdown=None, tail_delay_s=None, tail_ceiling=1.1)
    now, h, rejected = 5000.0, pays.half_tokens, 0
    for trial in range(300):
        members = [job(f"r{i}", submit=rng.uniform(0, 4000), work=rng.uniform(100, 20000), worker="w0", start=1.0,
                       fair=rng.uniform(0, 6000), mbs=rng.choice((1, 2, 4)), seq=rng.choice((256, 512, 1024)))
                   for i in range(rng.randrange(1, 4))]  # fmt: skip
        members = [replace(m, remaining_work_s=rng.uniform(0.05, 1.0) * m.total_work_s) for m in members]
        newcomer = job("a", mbs=rng.choice((1, 2, 4, 8)), seq=rng.choice((128, 512, 2048)))
        w = worker("w0", model="m", running=tuple(m.job_id for m in members))
        cycle = Cycle(view([newcomer], members, [w], now=now), 0.0)
        slot = cycle.slots[0]
        step = (slot.rows + newcomer.micro_batch_size) * max(slot.lmax, newcomer.seq_len) + h
        over = any(now - m.submit_time_s + m.remaining_work_s * step / (m.micro_batch_size * m.seq_len + h)
                   > 1.1 * (m.fair_start_s - m.submit_time_s + m.total_work_s) for m in members)  # fmt: skip
        reason = pays.filter(newcomer, slot, cycle)
        assert (reason is not None) == over, trial
        rejected += over
    assert 30 < rejected < 270  # both outcomes exercised


def test_queue_depth_considers_only_the_first_jobs_of_the_order():
    jobs = [job(f"j{i}", submit=i, work=100 + i, dyn_gib=1) for i in range(10)]
    policy = _aspen(queue_depth=3, **NO_GUARD)
    decisions = policy.schedule(view(jobs, workers=[worker("w0")], now=20))
    assert [d.job_id for d in decisions] == ["j0", "j1", "j2"]


def test_explain_of_a_running_job_says_running():
    """It said ``queue position -1``."""
    running = [job("r", dyn_gib=20, worker="w0", start=0)]
    text = aspen().explain(view([], running, [worker("w0", model="m", running=("r",))]), "r").format()
    assert text.splitlines()[0].startswith("job r under aspen: running, priority ")
    assert "position" not in text

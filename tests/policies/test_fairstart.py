"""FIFO-fair start deadlines: the virtual FIFO clock's arithmetic, aspen's use of ``fair_start_s``
(hand-made snapshots, memory in GiB, workers of 80 GiB unless noted) and the simulator's stamps."""

import pytest

from policies.builtin import AspenSettings, aspen
from policies.cluster import load_cluster, parse_cluster
from policies.config import PolicyConfigError, parse_policy_config
from policies.fairstart import FifoClock
from policies.interface import Start
from policies.simulator import Simulator
from policies.trace import synth_trace
from tests.policies.helpers import job, view, worker


def test_clock_fifo_start_is_list_scheduling_in_submission_order():
    # 2 servers. a (t 0, 100 s) -> server 1 at 0; b (t 0, 50 s) -> server 2 at 0;
    # c (t 10, 30 s) waits for the first free server: b's, at 50 (busy to 80); d (t 20) waits for
    # that one again, at 80 (a's frees at 100); e (t 500) finds both free: starts at 500.
    clock = FifoClock(2)
    starts = [clock.fifo_start(t, w) for t, w in ((0, 100), (0, 50), (10, 30), (20, 10), (500, 5))]
    assert starts == [0, 0, 50, 80, 500]


def test_clock_deadline_scales_the_wait_and_shares_the_class_tail():
    clock = FifoClock(1, wait_scale=0.5, tail_share=0.6, tail_quantile=1.0, tail_rank=None,  # tail: the largest
                      tight_wait_scale=None)  # waits scaled by 0.5 throughout
    # a (t 0, 1000 s): wait 0, class-0 tail 0 + 1000 = 1000; deadline 0 + max(0, 600 - 1000) = 0
    assert clock.stamp(0, 1000, priority=0) == 0
    # b (t 100, 10 s): FIFO start 1000, wait 900 x 0.5 = 450; tail max(1000, 460) = 1000;
    # deadline 100 + max(450, 600 - 10 = 590) = 690: it may wait for the class's tail share
    assert clock.stamp(100, 10, priority=0) == pytest.approx(690)
    # c (t 100, 10 s, class 1): FIFO start 1010, wait 910 x 0.5 = 455; class-1 tail 465;
    # deadline 100 + max(455, 0.6 x 465 - 10 = 269) = 555: classes keep their own tails
    assert clock.stamp(100, 10, priority=1) == pytest.approx(555)


@pytest.mark.parametrize(
    ("quantile", "rank", "deadline"),
    [
        # 10 servers, so nobody waits: FIFO JCT estimates = works 1000, 10, 20, 30 (class 0).
        # The 4th job's tail: the quantile of [10, 20, 30, 1000] at position 3 x q (interpolated),
        # at most the rank-th largest; deadline = 0 + max(wait 0, tail - 30).
        (1.0, None, 970.0),  # the largest: 1000 - 30 (one outlier licenses everyone to wait)
        (0.9, None, 679.0),  # position 2.7: 30 + 0.7 x (1000 - 30) = 709; 709 - 30
        (0.5, None, 0.0),  # position 1.5: 20 + 0.5 x 10 = 25; 25 - 30 < 0 -> its own FIFO start, 0
        (0.99, 2, 0.0),  # p99 997.1, capped at the 2nd largest, 30: 30 - 30 = 0, its own FIFO start
        (0.99, 4, 0.0),  # capped at the 4th largest, 10 (below its own 30): its own FIFO start
        (0.99, 1, 940.9),  # the largest caps nothing below it: p99 = 30 + 0.97 x 970 = 970.9; 970.9 - 30
    ],
)
def test_clock_class_tail_is_a_quantile_of_the_estimates(quantile, rank, deadline):
    clock = FifoClock(10, wait_scale=1.0, tail_share=1.0, tail_quantile=quantile, tail_rank=rank)
    for work in (1000, 10, 20):
        clock.stamp(0, work)
    assert clock.stamp(0, 30) == pytest.approx(deadline)
    with pytest.raises(ValueError, match="tail_quantile"):
        FifoClock(1, tail_quantile=0.0)
    with pytest.raises(ValueError, match="tail_rank"):
        FifoClock(1, tail_rank=0)


def test_clock_books_tighter_waits_once_the_load_leaves_room_for_the_mean():
    # 1 server, six 100 s jobs at t 0: virtual waits 0, 100, ..., 500. After each booking the
    # floor ratio (summed work / summed FIFO JCT) is 100/100, 200/300, 300/600, 400/1000 = 0.4,
    # 500/1500 = 0.333, 600/2100 = 0.286: the fifth and sixth are booked under 0.4, at 0.8 x
    # their wait instead of 0.9 x.
    clock = FifoClock(1)
    assert clock.floor_ratio() == 1.0
    assert [clock.book(0, 100) for _ in range(6)] == pytest.approx([0, 90, 180, 270, 320, 400])
    assert clock.floor_ratio() == pytest.approx(600 / 2100)
    off = FifoClock(1, tight_wait_scale=None)
    assert [off.book(0, 100) for _ in range(6)][-2:] == pytest.approx([360, 450])
    edge = FifoClock(1, tight_below=0.3)  # only the sixth (0.286) is under 0.3
    assert [edge.book(0, 100) for _ in range(6)][-2:] == pytest.approx([360, 400])
    with pytest.raises(ValueError, match="tight_wait_scale"):
        FifoClock(1, tight_wait_scale=0.0)
    with pytest.raises(ValueError, match="tight_below"):
        FifoClock(1, tight_below=1.5)


def test_clock_rank_cap_keeps_one_outlier_from_setting_the_class_tail():
    # 10 servers (no waits), default share 0.9 and rank 2. Class 0 holds one 100 h job and jobs of
    # 4 h: a 1 h job may wait until 0.9 x the 2nd largest estimate (4 h) less its work: 2.6 h, not
    # 0.9 x ~97 h. Another class's outlier does not move class 0's tail.
    h = 3600.0
    clock = FifoClock(10)
    clock.stamp(0, 100 * h, priority=0)
    clock.stamp(0, 4 * h, priority=0)
    clock.stamp(0, 500 * h, priority=1)
    assert clock.stamp(0, 1 * h, priority=0) == pytest.approx(0.9 * 4 * h - 1 * h)


def test_clock_of_servers_books_each_job_on_a_server_with_the_memory_for_it():
    # An 80 and a 40 (GiB, as bytes here) server. a (t 0, 100 s, needs 60) -> the 80 one at 0;
    # b (t 0, 50 s, needs 30) -> the 40 one, free at 0; c (t 10, needs 60) waits for the 80 one,
    # at 100, though the 40 one frees at 50; d (t 10, needs 30) takes the 40 one at 50; e needs
    # more than any server has: the earliest of all, the 40 one at 60. A memory-blind clock of 2
    # starts c at 50 (on the 40 one), d at 60 and e at 70.
    clock = FifoClock.of_servers([80, 40])
    jobs = ((0, 100, 60), (0, 50, 30), (10, 10, 60), (10, 10, 30), (10, 5, 100))
    assert [clock.fifo_start(t, w, need) for t, w, need in jobs] == [0, 0, 100, 50, 60]
    blind = FifoClock(2)
    assert [blind.fifo_start(t, w) for t, w, _ in jobs] == [0, 0, 50, 60, 70]
    assert clock.workers == 2
    with pytest.raises(ValueError, match="resize"):
        clock.resize(3)
    same = FifoClock.of_servers([80, 80, 80], wait_scale=1.0)  # equal memories: a plain clock of 3
    assert same.workers == 3 and same.wait_scale == 1.0
    same.resize(4)
    assert same.workers == 4
    with pytest.raises(ValueError, match="memories"):
        FifoClock.of_servers([])
    with pytest.raises(ValueError, match="memories"):
        FifoClock.of_servers([80, 0])


def test_simulator_books_jobs_on_workers_that_fit_them():
    # 1 worker of 80 GiB and 3 of 24 GiB: jobs of 7B-13B models need more than 24 GiB alone, so
    # they queue for the one worker that fits them; a memory-blind clock of 4 saw no such queue
    # (heterogeneous clusters: short jobs waited 48 h where fifo's waited 14 h, docs/policies-history.md).
    gib = 2**30
    cluster = parse_cluster({"workers": [{"count": 1, "gpu_memory_gib": 80, "tflops": 312},
                                         {"count": 3, "gpu_memory_gib": 24, "tflops": 312}]})  # fmt: skip
    trace = synth_trace(40, 3)
    sim = Simulator(trace, cluster, aspen())
    sim.run()
    order = sorted(trace, key=lambda t: (t.submit_time_s, t.job_id))
    assert sum(sim.jobs[t.job_id].solo_need > 24 * gib for t in trace) >= 20
    clock = FifoClock.of_servers([80 * gib] + [24 * gib] * 3)
    blind = FifoClock(4)
    for t in order:
        j = sim.jobs[t.job_id]
        assert j.fifo_wait == clock.book(t.submit_time_s, j.solo_s, t.priority, j.solo_need)
        blind.book(t.submit_time_s, j.solo_s, t.priority)
    assert clock.floor_ratio() < 0.5 * blind.floor_ratio()  # the queue a blind clock missed


def test_clock_resize_adds_free_servers_and_drops_the_busiest():
    clock = FifoClock(1)
    clock.fifo_start(0, 100)  # the one server is busy until 100
    clock.resize(2)  # the new one is free from the earliest free time (100: nothing freer exists)
    assert clock.fifo_start(0, 50) == 100 and clock.workers == 2
    clock.resize(1)  # keeps the server free earliest (100, the other is busy until 150)
    assert clock.fifo_start(0, 1) == 100
    with pytest.raises(ValueError, match="workers"):
        FifoClock(0)


def _aspen(**kw):
    kw.setdefault("turn_max_s", None)  # these tests are about deadlines; turns go before them (test_turns)
    return aspen(AspenSettings(margin=0.0, **kw))


def test_deadline_reached_goes_first_else_shortest_first():
    # One 80 GiB worker; each job takes 10 + 60 GiB, so only one starts. "long" (5000 s) has its
    # FIFO-fair deadline at 2000: at now 1000 it is not urgent (and the stateless guards no longer
    # apply to a stamped job: it waited 1000 >= 0.2 x 5000), so "short" wins on size. At now 2000
    # its deadline has come: it goes first. With fair_slack_s 1500 it is urgent from 500 (and
    # "short", deadline 3000, from 1500: not yet).
    jobs = [job("long", submit=0, work=5000, dyn_gib=60, fair=2000),
            job("short", submit=900, work=10, dyn_gib=60, fair=3000)]  # fmt: skip
    w = [worker("w0")]
    assert _aspen().schedule(view(jobs, workers=w, now=1000)) == [Start("short", "w0")]
    assert _aspen().schedule(view(jobs, workers=w, now=2000)) == [Start("long", "w0")]
    assert _aspen(fair_slack_s=1500).schedule(view(jobs, workers=w, now=1000)) == [Start("long", "w0")]
    # fair_slack_s None: deadlines ignored; the stateless guards do not flag "long" (its 5000 s are
    # not more than FIFO's wait estimate, 5010 s of queue / 1 worker, and it waited 1000 < 5010): size order
    assert _aspen(fair_slack_s=None).schedule(view(jobs, workers=w, now=1000)) == [Start("short", "w0")]


def test_urgent_jobs_go_earliest_deadline_first():
    # both urgent at now 3000 (deadlines 2500 and 2000): "b" (deadline 2000) first though submitted later
    jobs = [job("a", submit=0, work=100, dyn_gib=60, fair=2500), job("b", submit=50, work=900, dyn_gib=60, fair=2000)]
    assert _aspen().schedule(view(jobs, workers=[worker("w0")], now=3000)) == [Start("b", "w0")]


def test_unstamped_jobs_keep_the_stateless_guard():
    # no fair_start_s: "old" waited 1000 s >= 1 x FIFO's wait estimate (610 s of queue / 1 worker): urgent
    jobs = [job("old", submit=0, work=600, dyn_gib=60), job("new", submit=990, work=10, dyn_gib=60)]
    assert _aspen().schedule(view(jobs, workers=[worker("w0")], now=1000)) == [Start("old", "w0")]


def test_pressure_slowdown_caps_fusion_for_deadline_jobs():
    # w0 runs "r" (1 x 512 tokens, started at 1000 >= its deadline 900: under deadline pressure).
    # "a" (1 x 2048, deadline far off, not urgent) joining: step (2 x 2048) + 2048 = 6144 tokens vs
    # r's own 512 + 2048 = 2560: 2.4x > 1.1, refused; a takes idle w1. Without the cap it may join
    # w0 (fusion costs 4096 - 512 = 3584 <= 1.0 x (2048 + 2048) alone) but w1 (idle) scores higher
    # anyway, so make w1 too small for it (10 + 15 > 20 GiB; w0: 10 + 5 + 15 = 30 fits) to see the filter.
    running = [job("r", submit=0, seq=512, dyn_gib=5, worker="w0", start=1000, fair=900)]
    workers = [worker("w0", model="m", running=("r",)), worker("w1", mem_gib=20)]
    a = job("a", submit=1500, seq=2048, work=10, dyn_gib=15, fair=1e9)
    v = view([a], running, workers, now=2000)
    off = {"max_slowdown": None, "tail_ceiling": None}  # the pressure cap alone
    assert _aspen(**off).schedule(v) == [Start("a", "w0")]
    assert _aspen(**off, pressure_slowdown=1.1).schedule(v) == []
    # an urgent job is held to the cap on its own step too: "u" (1 x 256, own 2304) joining r's
    # group: step 2 x 512 + 2048 = 3072 = 1.33x its own > 1.1: refused; with cap 1.4 it joins
    # (r's own 2560 x 1.4 = 3584 >= 3072 as well)
    u = job("u", submit=0, seq=256, work=10, dyn_gib=15, fair=100)
    v = view([u], running, workers, now=2000)
    assert _aspen(**off, pressure_slowdown=1.1).schedule(v) == []
    assert _aspen(**off, pressure_slowdown=1.4).schedule(v) == [Start("u", "w0")]


def test_config_fields():
    p = parse_policy_config({"policy": "aspen", "fair_slack_s": 600, "pressure_slowdown": 1.1})
    assert p.fair_slack_s == 600.0
    assert parse_policy_config({"policy": "aspen", "fair_slack_s": None}).fair_slack_s is None
    assert parse_policy_config({"policy": "aspen"}).fair_slack_s == 0.0
    with pytest.raises(PolicyConfigError, match="pressure_slowdown"):
        parse_policy_config({"policy": "aspen", "pressure_slowdown": 0.9})
    with pytest.raises(PolicyConfigError, match="fair_slack_s"):
        parse_policy_config({"policy": "aspen", "fair_slack_s": -1})


def test_simulator_books_arrivals_in_order_and_gives_deadlines_with_the_current_tail():
    trace = synth_trace(20, 1)
    sim = Simulator(trace, load_cluster("examples/cluster.yaml"), aspen())
    sim.run()
    clock = FifoClock(len(sim.workers))
    for t in sorted(trace, key=lambda t: (t.submit_time_s, t.job_id)):
        j = sim.jobs[t.job_id]
        assert j.fifo_wait == clock.book(t.submit_time_s, j.solo_s, t.priority)
    for t in trace:  # a view now carries each job's deadline under its class's final tail
        j = sim.jobs[t.job_id]
        fair = clock.deadline(t.submit_time_s, j.fifo_wait, j.solo_s, t.priority)
        assert sim._job_view(j).fair_start_s == fair >= t.submit_time_s


def test_deadline_follows_the_class_tail_as_estimates_come_in():
    # 10 servers (no waits), share 0.9, p99 capped at the 2nd largest. A 1 h job booked after one
    # 10 h job of its class: the tail is min(p99, 2nd largest) = 1 h, deadline max(0, 0.9 h - 1 h) =
    # 0. A 3 h job of the class makes the tail 3 h and moves the deadline to 0.9 x 3 h - 1 h; a 6 h
    # one to 0.9 x 6 h - 1 h; another class's job moves nothing. A later FIFO wait wins over the
    # tail share. A class with no estimates has no deadline.
    h = 3600.0
    clock = FifoClock(10)
    assert clock.tail(0) is None and clock.deadline(0, 0, h, 0) is None
    clock.book(0, 10 * h, 0)
    wait = clock.book(0, 1 * h, 0)
    assert wait == 0
    assert clock.deadline(0, wait, 1 * h, 0) == 0  # tail 1 h (below): 0.9 h - 1 h < its FIFO wait 0
    assert clock.tail(0) == pytest.approx(1 * h)  # two estimates: p99 capped at the 2nd largest, 1 h
    clock.book(0, 3 * h, 0)
    assert clock.tail(0) == pytest.approx(3 * h)
    assert clock.deadline(0, wait, 1 * h, 0) == pytest.approx(0.9 * 3 * h - 1 * h)
    clock.book(0, 6 * h, 0)
    clock.book(0, 50 * h, 1)
    assert clock.deadline(0, wait, 1 * h, 0) == pytest.approx(0.9 * 6 * h - 1 * h)
    assert clock.deadline(100.0, 2 * h, 1 * h, 0) == pytest.approx(100.0 + 0.9 * 6 * h - 1 * h)
    assert clock.deadline(100.0, 5 * h, 1 * h, 0) == pytest.approx(100.0 + 5 * h)  # its own FIFO wait


def test_aspens_fair_clock_settings_reach_the_simulators_clock():
    # An admin's fair_clock settings (policy YAML) build the simulator's FIFO clock: every booked
    # wait and deadline is that clock's, and differs from the default clock's.
    settings = {"wait_scale": 0.5, "tight_wait_scale": None, "tail_rank": None, "tail_share": 0.7}
    policy = parse_policy_config({"policy": "aspen", "fair_clock": settings})
    assert dict(policy.fair_clock) == settings
    trace = synth_trace(60, 4)
    sim = Simulator(trace, load_cluster("examples/cluster.yaml"), policy)
    sim.run()
    clock, default = FifoClock(len(sim.workers), **settings), FifoClock(len(sim.workers))
    moved = 0
    for t in sorted(trace, key=lambda t: (t.submit_time_s, t.job_id)):
        j = sim.jobs[t.job_id]
        assert j.fifo_wait == clock.book(t.submit_time_s, j.solo_s, t.priority)
        moved += j.fifo_wait != default.book(t.submit_time_s, j.solo_s, t.priority)
    assert moved >= 10  # jobs that waited in the virtual FIFO: 0.5x instead of 0.9x (or 0.8x)
    for t in trace:
        j = sim.jobs[t.job_id]
        assert sim._job_view(j).fair_start_s == clock.deadline(t.submit_time_s, j.fifo_wait, j.solo_s, t.priority)


@pytest.mark.parametrize(
    ("clock", "message"),
    [
        ({"speed": 1}, r"fair_clock.speed: unknown setting \(allowed: wait_scale, tight_wait_scale, tight_below, "
                       r"tail_share, tail_quantile, tail_rank\)"),
        ({"wait_scale": 0}, r"fair_clock.wait_scale: must be a number > 0 \(got 0\)"),
        ({"wait_scale": None}, r"fair_clock.wait_scale: must be a number > 0 \(got None\)"),
        ({"wait_scale": "x"}, r"fair_clock.wait_scale: must be a number > 0 \(got 'x'\)"),
        ({"wait_scale": float("nan")}, r"fair_clock.wait_scale: must be a number > 0 \(got nan\)"),
        ({"tight_wait_scale": -1}, r"fair_clock.tight_wait_scale: must be a number > 0 or null \(got -1\)"),
        ({"tight_wait_scale": 0}, r"fair_clock.tight_wait_scale: must be a number > 0 or null \(got 0\)"),
        ({"tail_quantile": 0}, r"fair_clock.tail_quantile: must be a number in \(0, 1\] \(got 0\)"),
        ({"tight_below": 1.5}, r"fair_clock.tight_below: must be a number in \[0, 1\] \(got 1.5\)"),
        ({"tail_quantile": 2}, r"fair_clock.tail_quantile: must be a number in \(0, 1\] \(got 2\)"),
        ({"tail_rank": 0}, "fair_clock.tail_rank: must be an integer >= 1 or null"),
        ({"tail_rank": 1.5}, "fair_clock.tail_rank: must be an integer >= 1 or null"),
        ({"tail_share": -0.1}, "fair_clock.tail_share: must be a number >= 0"),
        ({"tail_share": float("inf")}, r"fair_clock.tail_share: must be a number >= 0 \(got inf\)"),
        ([0.9], "fair_clock: must be a mapping"),
    ],
)
def test_fair_clock_config_errors_name_the_setting(clock, message):
    with pytest.raises(PolicyConfigError, match=message):
        parse_policy_config({"policy": "aspen", "fair_clock": clock})


def test_fair_clock_is_only_for_aspen_and_checked_in_code_too():
    with pytest.raises(PolicyConfigError, match=r"fair_clock: unknown field for policy fifo \(only for aspen\)"):
        parse_policy_config({"policy": "fifo", "fair_clock": {}})
    with pytest.raises(ValueError, match=r"fair_clock\.wait: unknown setting"):
        aspen(AspenSettings(fair_clock={"wait": 0.5}))
    with pytest.raises(ValueError, match=r"fair_clock\.tail_quantile: must be a number in \(0, 1\] \(got 0\)"):
        aspen(AspenSettings(fair_clock={"tail_quantile": 0}))
    assert aspen().fair_clock == ()  # the clock's defaults


def test_a_custom_policys_fair_clock_attribute_is_checked_like_aspens():
    from policies.fairstart import clock_settings

    class Custom:
        name = "custom"

        def __init__(self, clock: dict) -> None:
            self.fair_clock = clock

    assert clock_settings(Custom({"wait_scale": 0.7})) == {"wait_scale": 0.7}
    with pytest.raises(ValueError, match=r"fair_clock\.wait_scale: must be a number > 0 \(got 0.0\)"):
        clock_settings(Custom({"wait_scale": 0.0}))
    with pytest.raises(ValueError, match=r"fair_clock\.colour: unknown setting"):
        clock_settings(Custom({"colour": 1}))
    with pytest.raises(ValueError, match=r"fair_clock\.tail_share: must be a number >= 0 \(got 'most'\)"):
        clock_settings(Custom({"wait_scale": 0.5, "tail_share": "most"}))
    with pytest.raises(ValueError, match=r"fair_clock: must be a mapping of settings \(got int\)"):
        clock_settings(Custom(7))
    assert clock_settings(object()) == {}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"wait_scale": 0}, r"fair_clock\.wait_scale: must be a number > 0 \(got 0\)"),
        ({"tail_share": float("inf")}, r"fair_clock\.tail_share: must be a number >= 0 \(got inf\)"),
        ({"tail_rank": 10**400}, r"fair_clock\.tail_rank: must be an integer >= 1 or null"),
        ({"tight_below": True}, r"fair_clock\.tight_below: must be a number in \[0, 1\] \(got True\)"),
    ],
)
def test_one_rule_table_gives_yaml_code_and_custom_policies_the_same_message(settings, message):
    # The YAML parser, a custom policy's fair_clock and FifoClock itself read one table of rules.
    from policies.fairstart import clock_settings

    class Custom:
        fair_clock = settings

    with pytest.raises(PolicyConfigError, match=message):
        parse_policy_config({"policy": "aspen", "fair_clock": settings})
    with pytest.raises(ValueError, match=message):
        clock_settings(Custom())
    with pytest.raises(ValueError, match=message):
        FifoClock(1, **settings)


def test_an_integral_tail_rank_from_yaml_is_an_int():
    policy = parse_policy_config({"policy": "aspen", "fair_clock": {"tail_rank": 3.0}})
    assert dict(policy.fair_clock) == {"tail_rank": 3} and isinstance(dict(policy.fair_clock)["tail_rank"], int)
    assert FifoClock(1, tail_rank=3.0).tail_rank == 3
    from fractions import Fraction  # any real number type (numpy's in a notebook too)

    assert FifoClock(1, wait_scale=Fraction(1, 2), tail_rank=Fraction(4, 2)).tail_rank == 2


def test_clock_reshape_follows_the_workers_memory_and_keeps_the_bookings():
    gib = 1 << 30

    def booked() -> FifoClock:
        clock = FifoClock(2)
        clock.book(0, 100)
        clock.book(0, 300)  # servers free at 100 and 300
        return clock

    same = booked()
    same.reshape([80 * gib] * 3)  # one size: a plain clock of 3 (as resize: the new one free at the earliest)
    assert same.workers == 3 and not same._pools and sorted(same._free) == [100.0, 100.0, 300.0]
    clock = booked()
    # two sizes: servers of unknown size are handed out earliest-free first, smallest size first;
    # one still missing starts at the earliest free time
    clock.reshape([24 * gib, 80 * gib, 80 * gib])
    assert [(m / gib, sorted(h)) for m, h in clock._pools] == [(24, [100.0]), (80, [100.0, 300.0])]
    # a job needing 30 GiB is booked only on an 80 GiB server (the earliest: free at 100, then 150)
    assert clock.fifo_start(0, 50, need_bytes=30 * gib) == 100.0
    # a size that stays keeps its servers; the one that goes hands its server to the one that comes
    clock.reshape([40 * gib, 80 * gib, 80 * gib, 80 * gib])
    assert [(m / gib, sorted(h)) for m, h in clock._pools] == [(40, [100.0]), (80, [100.0, 150.0, 300.0])]
    # back to one size: that size's servers are kept (the 40 GiB one goes)
    clock.reshape([80 * gib] * 3)
    assert not clock._pools and sorted(clock._free) == [100.0, 150.0, 300.0]
    # fewer of a size: its latest-freeing servers go, to a size that comes (earliest first)
    clock.reshape([80 * gib, 24 * gib])
    assert [(m / gib, sorted(h)) for m, h in clock._pools] == [(24, [150.0]), (80, [100.0])]
    with pytest.raises(ValueError, match="at least one server"):
        clock.reshape([])
    with pytest.raises(ValueError, match="must be > 0"):
        clock.reshape([80 * gib, 0])


def test_tail_is_recomputed_when_estimates_or_settings_change():
    # tail() remembers its last answer per class; a new estimate or a changed setting makes it stale
    h = 3600.0
    clock = FifoClock(10)
    for work in (1, 2, 10):
        clock.book(0, work * h, 0)
    assert clock.tail(0) == pytest.approx(2 * h)  # p99 of 3 capped at the 2nd largest
    clock.tail_rank = None
    assert clock.tail(0) == pytest.approx(2 * h + 0.98 * 8 * h)  # the p99 itself
    clock.tail_quantile = 0.5
    assert clock.tail(0) == pytest.approx(2 * h)
    clock.book(0, 20 * h, 0)
    assert clock.tail(0) == pytest.approx(6 * h)  # median of 1, 2, 10, 20 h
    assert clock.deadline_at(0, 0, 1 * h, clock.tail(0)) == clock.deadline(0, 0, 1 * h, 0)

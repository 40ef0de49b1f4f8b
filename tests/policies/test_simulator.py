import pytest

from policies.builtin import AspenSettings, CommonSettings, aspen, fifo, sjf
from policies.catalogue import CATALOGUE
from policies.cluster import default_cluster
from policies.costmodel import CostModel, Member
from policies.interface import Preempt, Start
from policies.memory_model import (
    GIB,
    adapter_bytes,
    adapter_param_count,
    analytic_activation,
    fused_group_peak_bytes,
    group_peak_bytes,
    loss_head_bytes_per_token,
    static_bytes,
)
from policies.metrics import percentile, summarise
from policies.simulator import SimulationError, simulate
from policies.trace import TraceJob, synth_trace

SMOL = CATALOGUE["smollm2-135m"]
LLAMA = CATALOGUE["llama-2-7b"]


def tj(job_id="a", submit=0.0, model="smollm2-135m", steps=10, batch=8, mbs=4, seq=512, prio=0, rank=8,
       owner="alice") -> TraceJob:  # fmt: skip
    return TraceJob(job_id, submit, owner, model, "lora", rank, 0, batch, mbs, seq, steps, prio)


def test_one_job_finishes_exactly_when_cost_model_says():
    job = tj(submit=5.0, model="llama-2-7b", steps=30, batch=16, mbs=4, seq=1024)
    cost = CostModel()
    member = Member(4, 1024, adapter_param_count(LLAMA, job.adapter_shape()))
    # finish = submit + load + steps * (batch / mbs) iterations * iteration time
    expected = 5.0 + cost.load_time_s(LLAMA) + 30 * 4 * cost.iteration_time_s(LLAMA, [member], 312.0)
    result = simulate([job], default_cluster(count=1), fifo())
    (rec,) = result.jobs
    assert rec.finish_s == pytest.approx(expected, rel=1e-9)
    assert rec.first_start_s == 5.0
    m = summarise(result)
    assert m.mean_jct_s == pytest.approx(expected - 5.0, rel=1e-9)
    assert m.oom_count == 0
    # busy time = iterations only (load excluded): utilisation = busy / makespan
    busy = expected - 5.0 - cost.load_time_s(LLAMA)
    assert m.utilisation == pytest.approx(busy / (expected - 5.0), rel=1e-9)


def test_cost_model_arithmetic():
    cost = CostModel(mfu=0.5, half_tokens=0.0, launch_s_per_layer=0.0, adapter_overhead_s=0.01)
    # 2 rows x 100 tokens; per token 4 * 134,515,008 + 12 * 30 * 576 * 100 + 6 * 1000
    per_token = 4 * 134_515_008 + 12 * 30 * 576 * 100 + 6 * 1000
    flops = 200 * per_token
    t = cost.iteration_time_s(SMOL, [Member(2, 100, 1000)], 100.0)
    assert t == pytest.approx(flops / (100e12 * 0.5) + 0.01)


def test_fusion_is_cheaper_than_running_alone():
    cost = CostModel()
    m = Member(1, 256, 1_000_000)
    together = cost.iteration_time_s(LLAMA, [m, m, m, m], 312.0)
    alone = 4 * cost.iteration_time_s(LLAMA, [m], 312.0)
    assert together < alone


def test_padding_costs_compute():
    cost = CostModel()
    short, long_ = Member(1, 256, 0), Member(1, 4096, 0)
    assert cost.iteration_flops(LLAMA, [short, long_]) == cost.iteration_flops(LLAMA, [Member(1, 4096, 0)] * 2)


def test_packing_pays_each_job_at_its_own_length():
    cost = CostModel(mfu=0.5, half_tokens=1000.0, launch_s_per_layer=0.0, adapter_overhead_s=0.0)
    short, long_ = Member(2, 256, 100), Member(1, 4096, 0)
    want = cost.iteration_flops(LLAMA, [short]) + cost.iteration_flops(LLAMA, [long_])
    assert cost.iteration_flops(LLAMA, [short, long_], packed=True) == pytest.approx(want)
    tokens = 2 * 256 + 4096  # no padding: T counts own lengths
    t = cost.iteration_time_s(LLAMA, [short, long_], 312.0, packed=True)
    assert t == pytest.approx(want / (312e12 * 0.5 * tokens / (tokens + 1000.0)))
    assert t < cost.iteration_time_s(LLAMA, [short, long_], 312.0)


@pytest.mark.parametrize("packing", [False, True])
def test_packing_cluster_runs_mixed_lengths_unpadded(packing):
    """Two jobs of 512 and 2048 tokens fused on one worker: with ``packing: true`` the group's step
    time and memory are each job's own, so both finish when the packed cost model says."""
    from policies.cluster import parse_cluster

    cluster = parse_cluster({"workers": [{"count": 1, "gpu_memory_gib": 141, "tflops": 312}],
                             "packing": packing, "cost_model": {"load_gbps": 1e9}})  # fmt: skip
    cluster = type(cluster)(cluster.workers, dict(CATALOGUE), cluster.cost, cluster.checkpoint_every_steps, packing)
    jobs = [tj("a", model="llama-2-7b", mbs=2, batch=2, seq=2048, steps=10),
            tj("b", model="llama-2-7b", mbs=2, batch=2, seq=512, steps=10)]  # fmt: skip
    result = simulate(jobs, cluster, fifo(), memory_noise=0.0)
    a, b = result.jobs
    assert a.first_start_s == b.first_start_s == 0.0 and result.oom_count == 0
    p = adapter_param_count(LLAMA, jobs[0].adapter_shape())
    iter_s = cluster.cost.iteration_time_s(LLAMA, [Member(2, 2048, p), Member(2, 512, p)], 312.0, packed=packing)
    load = cluster.cost.load_time_s(LLAMA)
    assert b.finish_s == pytest.approx(load + 10 * iter_s, rel=1e-9) and a.finish_s == pytest.approx(b.finish_s)
    padding = 1.0 - result.useful_tokens / result.padded_tokens
    assert padding == pytest.approx(0.0 if packing else (2 * 1536) / (2 * 2048 * 2), abs=1e-9)


def test_packing_must_be_a_boolean():
    from policies.cluster import ClusterError, parse_cluster

    with pytest.raises(ClusterError, match="packing: must be true or false"):
        parse_cluster({"workers": [{"count": 1, "gpu_memory_gib": 80, "tflops": 312}], "packing": "yes"})


def test_two_jobs_share_a_worker_and_the_second_waits_when_memory_is_short():
    # two llama-2-7b jobs of ~50 GiB each cannot share an 80 GiB worker: the second queues
    jobs = [tj("a", model="llama-2-7b", mbs=4, batch=4, seq=2048, steps=5),
            tj("b", submit=1.0, model="llama-2-7b", mbs=4, batch=4, seq=2048, steps=5)]  # fmt: skip
    result = simulate(jobs, default_cluster(count=1), fifo())
    a, b = result.jobs
    assert b.first_start_s == pytest.approx(a.finish_s)


@pytest.mark.parametrize(
    ("between", "shares"),
    [
        # memory halfway between the fused-group peak (b0 once, loss head at each job's own
        # length) and the older per-job sum (b0 twice, loss head padded too): the second job joins
        (0.5, True),
        # memory 1 MiB under the fused-group peak: it waits for the first to finish
        (None, False),
    ],
)
def test_memory_truth_is_the_fused_group_prediction(between, shares):
    # a (L 2048) and b (L 512, padded to 2048) on llama-2-7b, no prediction error, fifo (margin 0)
    shape = tj().adapter_shape()
    act, ab = analytic_activation(LLAMA, shape), adapter_bytes(LLAMA, shape)
    rows = [(ab, act, 2, 2048), (ab, act, 2, 512)]
    fused = fused_group_peak_bytes(static_bytes(LLAMA), rows, 0.0, loss_head_bytes_per_token(LLAMA))
    older = group_peak_bytes(static_bytes(LLAMA), rows, 0.0)
    # the older sum pays b0 (256 MiB) twice and b's loss head on 2 x 1536 padded tokens:
    # 256 MiB + 2 * 1536 * 32000 * (2 + 8) bytes = 0.25 + 0.92 GiB more
    assert older - fused == pytest.approx(256 * 2**20 + 2 * 1536 * 32000 * 10)
    memory = fused + between * (older - fused) if between is not None else fused - 2**20
    jobs = [tj("a", model="llama-2-7b", mbs=2, batch=2, seq=2048, steps=20),
            tj("b", submit=1.0, model="llama-2-7b", mbs=2, batch=2, seq=512, steps=20)]  # fmt: skip
    result = simulate(jobs, default_cluster(count=1, gpu_memory_gib=memory / GIB), fifo(), memory_noise=0.0)
    a, b = result.jobs
    assert result.oom_count == 0
    assert (b.first_start_s == 1.0) is shares
    assert (b.first_start_s == pytest.approx(a.finish_s)) is not shares


def test_oom_rolls_back_to_checkpoint_and_is_counted():
    # three jobs whose predicted group peak is 1% under the worker's memory: fifo (margin 0) packs
    # them; a true error of up to +-10% per job makes some seeds OOM
    shape = tj().adapter_shape()
    row = (adapter_bytes(LLAMA, shape), analytic_activation(LLAMA, shape), 2, 2048)
    gib = fused_group_peak_bytes(static_bytes(LLAMA), [row] * 3, 0.01, loss_head_bytes_per_token(LLAMA)) / GIB
    cluster = default_cluster(count=1, gpu_memory_gib=gib)
    jobs = [tj(x, model="llama-2-7b", mbs=2, batch=2, seq=2048, steps=200, submit=i * 100.0)
            for i, x in enumerate("abc")]  # fmt: skip
    noisy = [simulate(jobs, cluster, fifo(), seed=s, memory_noise=0.1) for s in range(8)]
    assert sum(r.oom_count > 0 for r in noisy) >= 2
    for r in noisy:
        assert sorted(j.job_id for j in r.jobs) == ["a", "b", "c"]  # every job still finishes
    clean = simulate(jobs, cluster, fifo(), seed=0, memory_noise=0.0)
    assert clean.oom_count == 0
    oom = next(r for r in noisy if r.oom_count)
    # an OOM costs time: lost progress since the checkpoint plus a 30 s restart and a reload
    assert max(j.finish_s for j in oom.jobs) > max(j.finish_s for j in clean.jobs)
    # aspen's 0.15 margin covers a 10% error: never an OOM
    assert all(simulate(jobs, cluster, aspen(), seed=s).oom_count == 0 for s in range(8))


def test_preempted_job_stops_at_checkpoint_and_resumes():
    from policies.builtin import priority

    # a: low priority, 200 steps, checkpoint every 50; h arrives later with high priority and needs w0
    jobs = [tj("a", model="llama-2-7b", mbs=4, batch=4, seq=2048, steps=200),
            tj("h", submit=60.0, model="llama-2-7b", mbs=4, batch=4, seq=2048, steps=10, prio=5)]  # fmt: skip
    result = simulate(jobs, default_cluster(count=1), priority(CommonSettings(preemption="lower_priority")))
    assert result.preemptions == 1
    a = next(j for j in result.jobs if j.job_id == "a")
    h = next(j for j in result.jobs if j.job_id == "h")
    assert h.finish_s < a.finish_s
    assert len(result.jobs) == 2


def test_unknown_model_is_an_error():
    with pytest.raises(SimulationError, match="base_model 'nope'"):
        simulate([tj(model="nope")], default_cluster(), fifo())


def test_job_too_big_for_every_worker():
    with pytest.raises(SimulationError, match=r"needs .* GiB alone"):
        simulate([tj(model="llama-2-13b", mbs=32, batch=32, seq=4096)], default_cluster(), fifo())


class _Bad:
    name = "bad"

    def schedule(self, view):
        return [Start(j.job_id, "nowhere") for j in view.queued]

    def explain(self, view, job_id):
        raise KeyError(job_id)


class _Idle(_Bad):
    name = "idle"

    def schedule(self, view):
        return []


def test_invalid_decision_and_stall_are_reported():
    with pytest.raises(SimulationError, match=r"no worker 'nowhere' \(workers: w000, w001, w002, ..., w007\)"):
        simulate([tj()], default_cluster(), _Bad())
    with pytest.raises(SimulationError, match="stalled"):
        simulate([tj()], default_cluster(), _Idle())


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert percentile([0, 100], 99) == 99


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["aspen", "sjf", "fifo"])
def test_preemption_with_backfill_finishes_every_job(name):
    # lower_priority preemption with backfill used to hang here: a job started in a cycle was
    # preempted (at its checkpoint, so at once) for one that the next start then beat to the worker
    common = {"preemption": "lower_priority"}
    policy = {"aspen": lambda: aspen(AspenSettings(**common)),
              "sjf": lambda: sjf(CommonSettings(backfill=True, **common)),
              "fifo": lambda: fifo(CommonSettings(backfill=True, **common))}[name]()  # fmt: skip
    trace = synth_trace(150, 201)
    result = simulate(trace, default_cluster(), policy)
    assert sorted(j.job_id for j in result.jobs) == sorted(t.job_id for t in trace)
    assert result.preemptions > 0


class _Churn:
    """Starts the first queued job on w000 and preempts it in the same decision list: it stops at
    once (it is at its checkpoint), so it is queued again at the same instant, forever."""

    name = "churn"

    def schedule(self, view):
        return [d for j in view.queued[:1] for d in (Start(j.job_id, "w000"), Preempt(j.job_id))]

    def explain(self, view, job_id):
        raise KeyError(job_id)


@pytest.mark.timeout(60)
def test_policy_that_never_lets_time_pass_is_an_error():
    with pytest.raises(SimulationError, match=r"churn: \d+ scheduling cycles at t=\d+s without time passing"):
        simulate([tj("a"), tj("b")], default_cluster(), _Churn())


@pytest.mark.parametrize("policy", [aspen(), aspen(AspenSettings(preemption="lower_priority", backfill=True)), fifo()],
                         ids=["aspen", "aspen-preempting", "fifo"])  # fmt: skip
def test_reused_job_views_equal_fresh_ones(policy):
    """The simulator reuses a job's view while nothing it shows changed; every view it hands a policy
    must equal one built from scratch (deadlines moving with the class tail, progress, preemption,
    OOM-corrected predictions)."""
    from policies.cluster import load_cluster
    from policies.simulator import Simulator

    class Checked(Simulator):
        cycles = reused = 0

        def view(self):
            before = {j: j.view_memo[1] for j in self.jobs.values() if j.view_memo is not None}
            got = super().view()
            for j in self.jobs.values():
                j.view_memo = None
            fresh = super().view()
            assert got == fresh
            Checked.cycles += 1
            Checked.reused += sum(v is before.get(self.jobs[v.job_id]) for v in got.queued)
            return got

    result = Checked(synth_trace(150, 5), load_cluster("examples/cluster.yaml"), policy, memory_noise=0.3).run()
    assert len(result.jobs) == 150 and Checked.cycles > 100
    assert Checked.reused > Checked.cycles  # the memo is used: queued jobs keep their views between cycles


def test_unix_epoch_submit_times_give_the_same_run():
    """A trace stamped in Unix time (1.7e9 s) replays as the same trace from 0: the simulator used to
    hang there (the last 5e-6 iterations of a job took less time than the spacing of floats)."""
    from dataclasses import replace

    trace = synth_trace(60, 3)
    shifted = [replace(t, submit_time_s=t.submit_time_s + 1.7e9) for t in trace]
    for policy in (fifo, aspen):
        want = {j.job_id: j for j in simulate(trace, default_cluster(), policy()).jobs}
        got = simulate(shifted, default_cluster(), policy()).jobs
        assert len(got) == len(want)
        for j in got:
            assert j.submit_s == want[j.job_id].submit_s + 1.7e9
            assert j.jct_s == pytest.approx(want[j.job_id].jct_s, rel=1e-6, abs=1e-3)
    one = simulate([tj(submit=1e12, steps=1, batch=1, mbs=1, seq=16)], default_cluster(), fifo()).jobs[0]
    alone = simulate([tj(submit=0.0, steps=1, batch=1, mbs=1, seq=16)], default_cluster(), fifo()).jobs[0]
    assert one.jct_s == pytest.approx(alone.jct_s, abs=1e-3)


def test_spellings_of_one_model_share_its_loaded_copy():
    """A hub id, another case and the catalogue name are one model: fused on one worker, one load."""
    from policies.cluster import parse_cluster

    cluster = parse_cluster({"workers": [{"count": 1, "gpu_memory_gib": 80, "tflops": 312}]})
    same = [tj("a", model="llama-2-7b"), tj("b", model="llama-2-7b")]
    mixed = [tj("a", model="meta-llama/Llama-2-7b-hf"), tj("b", model="LLaMA-2-7B")]
    want, got = simulate(same, cluster, fifo()), simulate(mixed, cluster, fifo())
    assert [j.finish_s for j in got.jobs] == [j.finish_s for j in want.jobs]
    assert got.jobs[0].first_start_s == got.jobs[1].first_start_s == 0.0  # fused, not one after the other
    # an override in the cluster file applies to every spelling of its model
    small = {"num_parameters": 1e9, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
             "intermediate_size": 5632, "vocab_size": 32000}  # fmt: skip
    override = parse_cluster({"workers": [{"count": 1, "gpu_memory_gib": 80, "tflops": 312}],
                              "models": {"Llama-2-7B": small}})  # fmt: skip
    for name in ("llama-2-7b", "meta-llama/llama-2-7b-hf", "LLAMA-2-7B"):
        assert override.model(name) is override.models["Llama-2-7B"]
    fast = simulate([tj("a", model="meta-llama/Llama-2-7b-hf")], override, fifo()).jobs[0]
    assert fast.jct_s < 0.5 * want.jobs[0].jct_s


def test_a_policy_that_returns_no_list_or_keeps_ooming_is_an_error():
    class _None(_Bad):
        name = "none"

        def schedule(self, view):
            return None

    class _AllOnOne(_Bad):  # every queued job onto the first worker, whatever its memory
        name = "all-on-one"

        def schedule(self, view):
            w = view.workers[0]
            return [Start(j.job_id, w.worker_id) for j in view.queued] if w.accepting else []

    with pytest.raises(SimulationError, match=r"none: schedule\(\) returned NoneType; it must return a list"):
        simulate([tj()], default_cluster(), _None())
    big = [tj(f"j{i}", model="llama-2-7b", batch=8, mbs=4, seq=2048) for i in range(6)]  # each fits alone, not all
    with pytest.raises(SimulationError, match=r"all-on-one: \d+ OOMs in a row with no job finishing .*0 of 6 jobs done"):
        simulate(big, default_cluster(count=1), _AllOnOne())


def test_aspen_priority_preemption_gives_the_freed_worker_to_the_job_it_was_freed_for():
    """aspen orders by deadlines and size (priority weight 0): the preempted job, queued again ahead of
    the high-priority one, took its worker straight back, and they traded it at every checkpoint."""
    jobs = [tj("lo", model="llama-2-7b", mbs=4, batch=4, seq=2048, steps=400),
            tj("hi", submit=60.0, model="llama-2-7b", mbs=4, batch=4, seq=2048, steps=300, prio=9)]  # fmt: skip
    policy = aspen(AspenSettings(preemption="lower_priority", max_group_tokens=1, turn_max_s=None))
    result = simulate(jobs, default_cluster(count=1), policy)
    lo, hi = (next(j for j in result.jobs if j.job_id == name) for name in ("lo", "hi"))
    assert result.preemptions == 1
    assert hi.finish_s < lo.finish_s  # before: lo retook the worker and hi waited for its end


class _NoWake:
    """aspen's decisions from a policy that cannot say when to wake (no ``wake_at``): the simulator
    runs it every ``tick_s`` while jobs wait."""

    def __init__(self):
        self.inner = aspen()
        self.name = "aspen-no-wake"

    def schedule(self, view):
        return self.inner.schedule(view)

    def explain(self, view, job_id):
        return self.inner.explain(view, job_id)


def _turn_trace():
    jobs = [tj(x, model="llama-2-7b", mbs=4, batch=4, seq=1024, steps=8000) for x in ("l1", "l2", "l3")]
    return [*jobs, tj("s", submit=100.0, model="mistral-7b", mbs=4, batch=4, seq=1024, steps=80)]


def test_turns_fire_on_waiting_time_alone():
    """A short job of another model becomes due for a turn 300 s after arriving, with no arrival or
    finish after it. The simulator used to run the policy only at events, so it waited ~10,000 s for
    the first long job; the controller's loop (every 0.5 s) would have given it its turn at once."""
    cluster = default_cluster(count=1, gpu_memory_gib=40)
    woken = simulate(_turn_trace(), cluster, aspen())  # aspen says when: wake_at, due at 400 s
    short = next(j for j in woken.jobs if j.job_id == "s")
    assert woken.preemptions == 1 and short.jct_s < 1000
    ticked = simulate(_turn_trace(), cluster, _NoWake(), tick_s=10)  # a policy that cannot say: every 10 s
    assert ticked.preemptions == 1
    assert abs(next(j for j in ticked.jobs if j.job_id == "s").first_start_s - short.first_start_s) <= 10
    untimed = simulate(_turn_trace(), cluster, _NoWake(), tick_s=0)  # at events only: the old replay
    assert untimed.preemptions == 0 and next(j for j in untimed.jobs if j.job_id == "s").jct_s > 9000
    with pytest.raises(SimulationError, match=r"tick_s: must be >= 0 \(got -1\)"):
        simulate(_turn_trace(), cluster, aspen(), tick_s=-1)


def test_wake_at_is_the_next_waiting_time_trigger_within_a_minute():
    from tests.policies.helpers import job, view, worker

    queued = [job("s", submit=0.0, work=100.0), job("long", submit=0.0, work=5000.0, fair=900.0)]
    v = lambda now: view(queued, (), [worker("w0")], now=now)  # noqa: E731
    assert fifo().wake_at(v(100.0)) is None and sjf().wake_at(v(100.0)) is None  # no rule reads the clock
    assert aspen().wake_at(v(100.0)) == 160.0  # the next minute: gradual changes
    assert aspen().wake_at(v(250.0)) == 300.0  # "s" is due a turn at max(300, 2 x 100) s
    assert aspen().wake_at(v(320.0)) == 380.0  # due already; "long" is urgent from 900 - slack
    slack = aspen().fair_slack_s
    assert aspen().wake_at(v(900.0 - slack - 30.0)) == 900.0 - slack


def test_a_start_that_fails_at_once_does_not_end_the_jobs_queueing():
    """fifo (margin 0) starts a and x1 together on 52 GiB: the group's first step runs out of memory.
    x1's only real start comes later; its queue delay runs until then, not 0."""
    jobs = [tj(x, model="llama-2-7b", mbs=4, batch=4, seq=1024, steps=200) for x in ("a", "x1")]
    result = simulate(jobs, default_cluster(count=1, gpu_memory_gib=52), fifo())
    assert result.oom_count == 1
    starts = sorted(j.first_start_s for j in result.jobs)
    assert starts[0] >= 30 and starts[1] > starts[0] + 60  # both start again after the 30 s restart; x1 after a
    assert summarise(result).mean_queue_s == pytest.approx(sum(starts) / 2)


class _NoLines(_Idle):
    name = "nolines"

    def explain(self, view, job_id):
        from policies.interface import Explanation

        return Explanation(job_id, self.name, (), 0.0, 0, ())


def test_a_stall_message_ends_cleanly_without_worker_lines():
    with pytest.raises(SimulationError) as info:
        simulate([tj()], default_cluster(), _NoLines())
    assert str(info.value).endswith("with 1 job(s) queued (a) and nothing running or arriving")


class _BadWake(_NoWake):
    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def wake_at(self, view):
        if self.answer == "raise":
            raise ValueError("no clock")
        return self.answer


@pytest.mark.parametrize(("answer", "words"), [
    ("soon", r"wake_at\(\) returned 'soon'; it must return a time in seconds \(the view's clock\) or None"),
    ("raise", r"wake_at\(\) raised at t=0s: .*test_simulator.py:\d+: ValueError: no clock")])  # fmt: skip
def test_a_custom_wake_at_that_raises_or_returns_no_time_is_a_clear_error(answer, words):
    with pytest.raises(SimulationError, match=r"^aspen-no-wake: " + words):
        simulate(_turn_trace(), default_cluster(count=1, gpu_memory_gib=40), _BadWake(answer))


class _HoldsThirtySeconds(_NoWake):
    """Starts a job only once it has waited 30 s, and says so with wake_at: nothing runs meanwhile."""

    name = "hold-30"

    def schedule(self, view):
        return [Start(j.job_id, view.workers[0].worker_id) for j in view.queued[:1]
                if view.now_s - j.submit_time_s >= 30 and not view.running]  # fmt: skip

    def wake_at(self, view):
        times = [j.submit_time_s + 30 for j in view.queued if j.submit_time_s + 30 > view.now_s]
        return min(times, default=None)


def test_a_policy_holding_a_job_on_an_idle_cluster_is_woken_not_reported_stalled():
    result = simulate([tj("a")], default_cluster(count=1), _HoldsThirtySeconds())
    assert result.jobs[0].first_start_s == pytest.approx(30.0)
    never = _HoldsThirtySeconds()
    never.wake_at = lambda view: view.now_s + 60  # wakes forever without deciding: a stall after IDLE_WAKES
    never.schedule = lambda view: []
    with pytest.raises(SimulationError, match="stalled at t=60000s"):
        simulate([tj("a")], default_cluster(count=1), never)
    early = _HoldsThirtySeconds()
    early.wake_at = lambda view: view.now_s
    with pytest.raises(SimulationError, match=r"wake_at\(\) returned 0, not after the view's now \(0\)"):
        simulate([tj("a")], default_cluster(count=1), early)

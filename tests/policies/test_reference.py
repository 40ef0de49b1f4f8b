"""The trace references printed by ``lorafleet simulate``: the solo floor and ideal preemptive SRPT."""

import json
import random

import pytest

from orchestrator.cli import main
from policies.builtin import aspen, fifo
from policies.cluster import parse_cluster
from policies.reference import reference, srpt_jcts
from policies.simulator import simulate
from policies.trace import COLUMNS, read_trace
from tests.policies.helpers import synth_files


def test_srpt_preempts_the_longest_for_a_shorter_arrival():
    # one worker: B (3 s) arrives at 2 s while A (10 s) has 8 s left: B runs 2-5, A finishes at 13
    assert srpt_jcts([(0.0, 10.0), (2.0, 3.0)], 1) == [13.0, 3.0]
    # equal remaining work does not preempt: A (4 s left at 1 s) keeps the worker over B (4 s)
    assert srpt_jcts([(0.0, 5.0), (1.0, 4.0)], 1) == [5.0, 8.0]


def test_srpt_on_two_workers_by_hand():
    # t=0: the 1 s and 2 s jobs run, the 4 s one waits; t=1: the 1 s job ends, the 0.5 s job arrives
    # and runs; t=1.5: it ends and the 4 s job starts (ends 5.5); t=2: the 2 s job ends.
    jobs = [(0.0, 4.0), (0.0, 2.0), (0.0, 1.0), (1.0, 0.5)]
    assert srpt_jcts(jobs, 2) == pytest.approx([5.5, 2.0, 1.0, 0.5])
    # a newcomer shorter than what is left of the longest running job takes its worker
    jobs = [(0.0, 6.0), (0.0, 5.0), (1.0, 1.0)]  # at t=1 the 6 s job (5 s left) yields; resumes at 2
    assert srpt_jcts(jobs, 2) == pytest.approx([7.0, 5.0, 1.0])


def _fifo_one_worker(jobs):
    t, out = 0.0, []
    for submit, work in sorted(jobs):
        t = max(t, submit) + work
        out.append(t - submit)
    return out


def test_srpt_properties_on_random_instances():
    rng = random.Random(7)
    for _ in range(300):
        jobs = [(rng.choice((0.0, 1.0, 2.5, 4.0)), rng.choice((0.5, 1.0, 3.0, 8.0))) for _ in range(rng.randint(1, 9))]
        workers = rng.randint(1, 4)
        jct = srpt_jcts(jobs, workers)
        assert all(j >= w - 1e-9 for j, (_, w) in zip(jct, jobs, strict=True))  # nobody beats running alone
        if workers >= len(jobs):
            assert jct == pytest.approx([w for _, w in jobs])  # a worker each: nobody waits
        # SRPT is optimal for the mean on one server: never worse than FIFO there
        one = srpt_jcts(jobs, 1)
        assert sum(one) <= sum(_fifo_one_worker(jobs)) + 1e-9
        # the total work done by each time is right: the last completion is the FIFO makespan
        assert max(s + j for (s, _), j in zip(jobs, one, strict=True)) == pytest.approx(
            max(s + j for (s, _), j in zip(sorted(jobs), _fifo_one_worker(jobs), strict=True)))


def test_reference_means_and_errors():
    ref = reference([(0.0, 10.0), (2.0, 3.0)], 1)
    assert (ref.jobs, ref.workers) == (2, 1)
    assert ref.floor_mean_jct_s == 6.5 and ref.srpt_mean_jct_s == 8.0
    with pytest.raises(ValueError, match="workers: must be >= 1"):
        srpt_jcts([(0.0, 1.0)], 0)
    with pytest.raises(ValueError, match="job 1: submit and work must be finite"):
        srpt_jcts([(0.0, 1.0), (0.0, -1.0)], 1)
    with pytest.raises(ValueError, match="no jobs"):
        reference([], 2)


def test_simulate_prints_and_returns_the_references(tmp_path, capsys):
    trace, cluster = synth_files(tmp_path, 30, 5)
    capsys.readouterr()
    assert main(["simulate", "--trace", str(trace), "--cluster", str(cluster), "--policy", "fifo,sjf,aspen",
                 "--json"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    floors = {r["floor_mean_jct_s"] for r in rows}
    assert len(floors) == 1 and len({r["srpt_mean_jct_s"] for r in rows}) == 1  # the trace's, not a policy's
    floor = floors.pop()
    for r in rows:
        assert floor <= r["mean_jct_s"] + 1e-6  # no policy beats every job alone on arrival
        assert r["srpt_mean_jct_s"] >= floor
    assert main(["simulate", "--trace", str(trace), "--cluster", str(cluster), "--policy", "fifo"]) == 0
    out = capsys.readouterr().out
    assert "What the trace allows" in out and "ideal preemptive SRPT on 2 workers" in out
    fifo = rows[0]["mean_jct_s"]
    assert f"= {floor / fifo:.2f}x fifo" in out


def test_simulate_says_when_a_trace_is_light(tmp_path, capsys):
    # 30 jobs on 2 workers: 15 per worker, under the 20 docs/policies.md measured as light
    trace, cluster = synth_files(tmp_path, 30, 5)
    capsys.readouterr()
    assert main(["simulate", "--trace", str(trace), "--cluster", str(cluster), "--policy", "fifo,aspen",
                 "--json"]) == 0  # fmt: skip
    fifo = json.loads(capsys.readouterr().out.splitlines()[0])
    assert main(["simulate", "--trace", str(trace), "--cluster", str(cluster), "--policy", "fifo,aspen"]) == 0
    out = capsys.readouterr().out
    assert "A light trace: 15.0 jobs per worker (under about 20)" in out
    assert f"none gets below {fifo['floor_mean_jct_s'] / fifo['mean_jct_s']:.2f}x here" in out
    # the same 30 jobs on one worker: 30 per worker, not light
    one = tmp_path / "one.yaml"
    one.write_text("workers: [{count: 1, gpu_memory_gib: 80, tflops: 312}]\n")
    assert main(["simulate", "--trace", str(trace), "--cluster", str(one), "--policy", "fifo"]) == 0
    out = capsys.readouterr().out
    assert "What the trace allows" in out and "light trace" not in out


def test_trace_synth_says_when_the_trace_it_wrote_is_light(tmp_path, capsys):
    out = tmp_path / "t.csv"
    assert main(["trace", "synth", "--jobs", "100", "-o", str(out)]) == 0  # 100 / 8 workers
    err = capsys.readouterr().err
    assert "note: 12.5 jobs per worker (--workers 8) makes a light trace" in err and "--jobs 160 or more" in err
    assert main(["trace", "synth", "--jobs", "100", "--workers", "4", "-o", str(out)]) == 0  # 25 per worker
    assert "light" not in capsys.readouterr().err
    assert main(["trace", "synth", "--jobs", "160", "-o", str(out)]) == 0  # exactly 20 per worker: not light
    assert "light" not in capsys.readouterr().err


def test_the_floor_is_a_bound_when_jobs_share_a_loaded_model(tmp_path):
    """Ten jobs of one model, one after another on one worker: only the first loads it. The floor
    counted a load for every job (1.50x fifo's mean here, "no policy beats it"); it is the run time
    alone now, which every job's JCT respects."""
    rows = [f"j{i},{1000 * i},alice,llama-2-13b,lora,8,0,8,4,256,10,0" for i in range(10)]
    path = tmp_path / "seq.csv"
    path.write_text(f"{','.join(COLUMNS)}\n" + "\n".join(rows) + "\n")
    cluster = parse_cluster({"workers": [{"count": 1, "gpu_memory_gib": 80, "tflops": 312}]})
    for policy in (fifo(), aspen()):
        jobs = simulate(read_trace(str(path)), cluster, policy).jobs
        assert all(j.jct_s >= j.run_s * (1 - 1e-9) > 0 for j in jobs)
        assert sum(j.jct_s < j.solo_s for j in jobs) == 9  # all but the first found the model loaded
        ref = reference([(j.submit_s, j.run_s) for j in jobs], 1)
        assert ref.floor_mean_jct_s <= sum(j.jct_s for j in jobs) / len(jobs)

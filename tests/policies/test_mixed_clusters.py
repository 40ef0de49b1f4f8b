"""The simulator's references on mixed and undersized clusters: solo time (and so the floor and
finish-time fairness) on the fastest worker a job fits on alone; workers too small for every job
named and left out of utilisation; ``--plot`` into a missing folder refused before the replay."""

from __future__ import annotations

import json

import pytest
import yaml

from orchestrator.cli import main
from policies.builtin import fifo
from policies.catalogue import CATALOGUE
from policies.cluster import ClusterSpec, WorkerClass
from policies.costmodel import CostModel, Member
from policies.memory_model import adapter_param_count
from policies.metrics import summarise
from policies.simulator import simulate
from policies.trace import TraceJob, format_trace

SMOL = CATALOGUE["smollm2-135m"]


def tj(job_id: str, submit: float = 0.0) -> TraceJob:
    return TraceJob(job_id, submit, "alice", "smollm2-135m", "lora", 8, 0, 8, 4, 512, 10, 0)


def cluster(*workers: tuple[int, float, float]) -> ClusterSpec:
    return ClusterSpec(tuple(WorkerClass(n, gib, tflops) for n, gib, tflops in workers), dict(CATALOGUE))


def test_solo_time_uses_the_fastest_worker_the_job_fits_on():
    """A fast GPU too small for the job used to be its reference: ftf_mean 331220783 on the audit's cluster."""
    job = tj("a")
    result = simulate([job], cluster((1, 0.001, 312.0), (1, 80, 1.0)), fifo())
    cost = CostModel()
    member = Member(4, 512, adapter_param_count(SMOL, job.adapter_shape()))
    run = 10 * 2 * cost.iteration_time_s(SMOL, [member], 1.0)  # on the 1 TFLOPS worker, the only one it fits
    (rec,) = result.jobs
    assert rec.run_s == pytest.approx(run, rel=1e-9)
    assert rec.solo_s == pytest.approx(cost.load_time_s(SMOL) + run, rel=1e-9)
    assert summarise(result).ftf_mean == pytest.approx(1.0, rel=1e-9)  # alone on an idle cluster: rho 1


def test_a_worker_too_small_for_every_job_is_named_and_not_counted_in_utilisation():
    jobs = [tj("a"), tj("b", 1.0)]
    mixed = simulate(jobs, cluster((1, 0.001, 312.0), (1, 80, 312.0)), fifo())
    alone = simulate(jobs, cluster((1, 80, 312.0)), fifo())
    assert mixed.unusable_workers == ("w000",) and mixed.usable_workers == 1
    assert alone.unusable_workers == ()
    m = summarise(mixed)
    assert m.unusable_workers == ("w000",)
    assert m.utilisation == pytest.approx(summarise(alone).utilisation, rel=1e-9)  # not halved by w000


def test_simulate_cli_notes_unusable_workers_under_the_table_and_in_json(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text(format_trace([tj("a"), tj("b", 5.0)]))
    spec = tmp_path / "c.yaml"
    spec.write_text(yaml.safe_dump({"workers": [{"count": 1, "gpu_memory_gib": 0.001, "tflops": 312},
                                                {"count": 1, "gpu_memory_gib": 80, "tflops": 1e-6}]}))  # fmt: skip
    args = ["simulate", "--trace", str(trace), "--cluster", str(spec), "--policy", "fifo"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert ("Note: 1 of 2 workers fit no job of this trace even alone and ran nothing: w000 (0.001 GiB); "
            "util and the SRPT reference leave them out") in " ".join(out.split())
    assert "ideal preemptive SRPT on 1 worker " in " ".join(out.split())
    assert main([*args, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["unusable_workers"] == ["w000"] and row["ftf_mean"] < 10 and row["utilisation"] > 0.5
    assert {"floor_mean_jct_s", "srpt_mean_jct_s", "utilisation", "ftf_max"} <= set(row)  # existing keys kept


def test_the_bundled_trace_is_unaffected(capsys):
    """On examples/cluster.yaml every worker is usable: README's aspen 0.51x fifo stands."""
    assert main(["simulate", "--trace", "examples/trace.csv", "--cluster", "examples/cluster.yaml",
                 "--policy", "fifo,aspen", "--json"]) == 0  # fmt: skip
    fifo_row, aspen_row = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert fifo_row["unusable_workers"] == [] == aspen_row["unusable_workers"]
    assert round(aspen_row["mean_jct_s"] / fifo_row["mean_jct_s"], 2) == 0.51


def test_plot_into_a_missing_folder_is_refused_before_the_replay(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text(format_trace([tj("a")]))
    spec = tmp_path / "c.yaml"
    spec.write_text(yaml.safe_dump({"workers": [{"count": 1, "gpu_memory_gib": 80, "tflops": 312}]}))
    missing = tmp_path / "nope" / "x.png"
    assert main(["simulate", "--trace", str(trace), "--cluster", str(spec), "--plot", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing simulated
    assert err.strip() == (f"lorafleet simulate: error: --plot: {missing}: folder {missing.parent} does not exist; "
                           "create it or name a file in an existing folder")  # fmt: skip
    (tmp_path / "file").write_text("")
    assert main(["simulate", "--trace", str(trace), "--cluster", str(spec), "--plot",
                 str(tmp_path / "file" / "x")]) == 2  # fmt: skip
    assert "folder " + str(tmp_path / "file") + " is not a directory" in capsys.readouterr().err

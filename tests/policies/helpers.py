"""Hand-made snapshots for policy tests: round numbers in GiB so the arithmetic fits in a comment."""

from __future__ import annotations

from policies.memory_model import GIB, ActivationFit
from policies.snapshot import ClusterView, JobView, WorkerView

ZERO = ActivationFit(0.0, 0.0, 0.0)


def job(job_id: str, *, owner: str = "alice", priority: int = 0, submit: float = 0.0, model: str = "m",
        static_gib: float = 10, dyn_gib: float = 10, mbs: int = 1, seq: int = 512, work: float = 100.0,
        worker: str | None = None, start: float | None = None, pending: bool = False,
        fair: float | None = None) -> JobView:  # fmt: skip
    """A job whose whole dynamic memory is ``dyn_gib`` (adapter bytes; activations zero)."""
    return JobView(job_id, owner, priority, submit, model, int(static_gib * GIB), int(dyn_gib * GIB), ZERO, mbs,
                   seq, work, work, worker, start, pending, fair)  # fmt: skip


def worker(wid: str, *, mem_gib: float = 80, model: str | None = None, running: tuple[str, ...] = (),
           accepting: bool = True) -> WorkerView:  # fmt: skip
    return WorkerView(wid, int(mem_gib * GIB), 312.0, model, running, accepting)


def view(queued=(), running=(), workers=(), now: float = 1000.0, usage=None) -> ClusterView:
    return ClusterView(now, tuple(queued), tuple(running), tuple(workers), dict(usage or {}))


def synth_files(tmp_path, jobs: int, seed: int, workers: int = 2) -> tuple:
    """``lorafleet trace synth`` into ``tmp_path/t.csv`` and a ``workers`` x 80 GiB cluster YAML."""
    import yaml

    from orchestrator.cli import main

    trace = tmp_path / "t.csv"
    assert main(["trace", "synth", "--jobs", str(jobs), "--seed", str(seed), "-o", str(trace)]) == 0
    cluster = tmp_path / "c.yaml"
    cluster.write_text(yaml.safe_dump({"workers": [{"count": workers, "gpu_memory_gib": 80, "tflops": 312}]}))
    return trace, cluster

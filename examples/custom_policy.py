"""A custom scheduling policy, complete and runnable: smallest job first, one job per worker,
preferring a worker that already holds the job's base model.

Try it offline (the module must be importable, hence ``PYTHONPATH``)::

    PYTHONPATH=examples lorafleet simulate --trace examples/trace.csv --cluster examples/cluster.yaml \\
        --policy fifo,aspen,custom_policy:SmallestFirst

or from a policy YAML (``policy: custom_policy:SmallestFirst`` with ``options: {max_jobs: 2}``).
On a live cluster the module must be importable by the controller on the head (install it
there, or put it on the head's ``PYTHONPATH`` before ``lorafleet up``), then ``lorafleet policy
set that.yaml``.

A policy is any object with ``name``, ``schedule(view)`` and ``explain(view, job_id)``
(``policies.interface.Policy``). ``schedule`` gets a frozen ``ClusterView`` and returns
``Start`` / ``Preempt`` decisions; it must not keep state between calls that changes its answer.
"""

from __future__ import annotations

from policies import ClusterView, JobView, Start, WorkerView
from policies.interface import Explanation, FactorLine, WorkerLine
from policies.memory_model import fused_group_peak_bytes


class SmallestFirst:
    """Queued jobs in order of remaining work (shortest first); each starts on an idle worker,
    one holding its model first. ``max_jobs`` > 1 also lets a job join a busy worker of its model
    with fewer than that many jobs, when the group's predicted peak fits (no margin)."""

    def __init__(self, max_jobs: int = 1):
        if not isinstance(max_jobs, int) or isinstance(max_jobs, bool) or max_jobs < 1:
            raise ValueError(f"max_jobs: must be an integer >= 1 (got {max_jobs!r})")
        self.max_jobs = max_jobs
        self.name = "smallest-first" if max_jobs == 1 else f"smallest-first-{max_jobs}"

    def _order(self, view: ClusterView) -> list[JobView]:
        return sorted(view.queued, key=lambda j: (j.remaining_work_s, j.submit_time_s, j.job_id))

    def _fits(self, job: JobView, worker: WorkerView, members: list[JobView]) -> bool:
        group = [*members, job]
        peak = fused_group_peak_bytes(job.static_bytes, [(j.adapter_bytes, j.activation, j.micro_batch_size,
                                                          j.seq_len) for j in group], 0.0)  # fmt: skip
        return peak <= worker.memory_bytes

    def _why_not(self, job: JobView, worker: WorkerView, members: list[JobView]) -> str | None:
        if not worker.accepting:
            return "not accepting"
        if members and members[0].base_model != job.base_model:  # one base model per worker
            return f"busy with {members[0].base_model}"
        if len(members) >= self.max_jobs:
            return f"has {len(members)} job(s), max_jobs {self.max_jobs}"
        if not self._fits(job, worker, members):
            return "not enough memory"
        return None

    def schedule(self, view: ClusterView) -> list[Start]:
        members = {w.worker_id: [j for j in view.running if j.worker_id == w.worker_id] for w in view.workers}
        decisions = []
        for job in self._order(view):
            ok = [w for w in view.workers if self._why_not(job, w, members[w.worker_id]) is None]
            if not ok:
                continue
            # a worker holding the model first (no load), then the emptiest, then the first listed
            best = min(ok, key=lambda w: (w.loaded_model != job.base_model, len(members[w.worker_id])))
            decisions.append(Start(job.job_id, best.worker_id))
            members[best.worker_id].append(job)
        return decisions

    def wake_at(self, view: ClusterView) -> float | None:
        """Optional. None: no rule here reads the clock, so only events (arrivals, finishes) change the
        decisions and the simulator need not run this policy in between (without this method it runs
        it every 10 s of simulated time while jobs wait). A policy with waiting-time rules returns the
        next time one could fire."""
        return None

    def explain(self, view: ClusterView, job_id: str) -> Explanation:
        order = self._order(view)
        position = next((i for i, j in enumerate(order) if j.job_id == job_id), -1)
        job = order[position] if position >= 0 else view.find_job(job_id)
        if job is None:
            raise KeyError(job_id)
        members = {w.worker_id: [j for j in view.running if j.worker_id == w.worker_id] for w in view.workers}
        workers = tuple(WorkerLine(w.worker_id, self._why_not(job, w, members[w.worker_id])) for w in view.workers)
        return Explanation(job_id, self.name, (FactorLine("work_s", job.remaining_work_s, 1.0),),
                           -job.remaining_work_s, position, workers)  # fmt: skip

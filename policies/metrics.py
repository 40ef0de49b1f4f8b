"""Summary metrics of a simulation run.

* JCT (job completion time) = finish - submit: mean, p50, p99 (linear interpolation between
  order statistics, as numpy's default).
* queueing delay = first start - submit (mean).
* makespan = last finish - first submit.
* utilisation = worker-seconds spent computing / (usable workers * makespan); loading, restarting
  and idle time count as not utilised. A worker too small for every job of the trace, even alone
  (``SimResult.unusable_workers``), is not counted: it could never run anything (listed in
  ``unusable_workers``; before 2026-12-08 it counted as idle).
* finish-time fairness (Themis) rho = JCT / solo time, where solo time is the job alone on the
  fastest worker it fits on, including its model load: mean and max (1 is running alone; larger is
  worse; a job that finds its model already loaded can come in under 1, by its load time).
* per priority: count, mean, p50 and p99 JCT of the jobs of that priority.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from policies.simulator import SimResult


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; raises ValueError for no values."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q: must be in [0, 100] (got {q})")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class ClassMetrics:
    count: int
    mean_jct_s: float
    p50_jct_s: float
    p99_jct_s: float


@dataclass(frozen=True)
class Metrics:
    policy: str
    jobs: int
    mean_jct_s: float
    p50_jct_s: float
    p99_jct_s: float
    mean_queue_s: float
    makespan_s: float
    utilisation: float
    oom_count: int
    preemptions: int
    ftf_mean: float
    ftf_max: float
    per_priority: dict[int, ClassMetrics]
    unusable_workers: tuple[str, ...] = ()  # too small for every job of the trace: not in utilisation

    def as_dict(self) -> dict:
        """JSON-ready; ``per_priority`` keys become strings."""
        d = asdict(self)
        d["per_priority"] = {str(k): v for k, v in d["per_priority"].items()}
        return d


def summarise(result: SimResult) -> Metrics:
    """Metrics of one run. Raises ValueError for a run with no finished jobs."""
    jobs = result.jobs
    if not jobs:
        raise ValueError("no finished jobs to summarise")
    jct = [j.jct_s for j in jobs]
    makespan = max(j.finish_s for j in jobs) - min(j.submit_s for j in jobs)
    rho = [j.jct_s / j.solo_s for j in jobs if j.solo_s > 0]
    classes: dict[int, ClassMetrics] = {}
    for p in sorted({j.priority for j in jobs}):
        xs = [j.jct_s for j in jobs if j.priority == p]
        classes[p] = ClassMetrics(len(xs), sum(xs) / len(xs), percentile(xs, 50), percentile(xs, 99))
    return Metrics(
        policy=result.policy,
        jobs=len(jobs),
        mean_jct_s=sum(jct) / len(jct),
        p50_jct_s=percentile(jct, 50),
        p99_jct_s=percentile(jct, 99),
        mean_queue_s=sum(j.queue_s for j in jobs) / len(jobs),
        makespan_s=makespan,
        utilisation=result.busy_s / (result.usable_workers * makespan) if makespan > 0 else 0.0,
        oom_count=result.oom_count,
        preemptions=result.preemptions,
        ftf_mean=sum(rho) / len(rho) if rho else 0.0,
        ftf_max=max(rho) if rho else 0.0,
        per_priority=classes,
        unusable_workers=tuple(result.unusable_workers),
    )

"""The policy interface: decisions out, and the small extension points a policy is built from.

A policy is any object with ``name``, ``schedule(view) -> list[Decision]`` and
``explain(view, job_id) -> Explanation`` (:class:`Policy`). Decisions are a closed set:

* :class:`Start` ``(job_id, worker_id)``: add a queued job to the worker's fused group
  (loading the job's base model first when the worker is idle with another model);
* :class:`Preempt` ``(job_id)``: stop a running job at its next checkpoint and queue it again.

"Leave as is" is no decision. Decisions apply in list order.

The built-in policies are :class:`policies.framework.ProfilePolicy` objects assembled from
plugins, modelled on the kube-scheduler framework and Slurm's multifactor priority:

* :class:`QueueOrder`: the order queued jobs are considered in;
* :class:`PriorityFactor`: one normalised factor (0..1) of a multifactor queue order;
* :class:`Filter`: can this job go on this worker? (a reason string when not);
* :class:`Score`: how good is this worker for this job, 0..100; a profile combines scores with
  admin weights;
* :class:`PreemptRule`: which running jobs to preempt for a job that cannot start.
* :class:`TurnRule`: which short queued jobs are due a turn on a busy worker, and whose group yields it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from policies.snapshot import ClusterView, JobView

if TYPE_CHECKING:
    from policies.framework import Cycle, Slot


@dataclass(frozen=True, slots=True)
class Start:
    """Start queued job ``job_id`` on worker ``worker_id`` (join its group)."""

    job_id: str
    worker_id: str


@dataclass(frozen=True, slots=True)
class Preempt:
    """Stop running job ``job_id`` at its next checkpoint and queue it again."""

    job_id: str


Decision = Start | Preempt


@dataclass(frozen=True)
class FactorLine:
    """One row of an explanation: a factor's normalised value, its weight, and the product."""

    name: str
    value: float
    weight: float

    @property
    def weighted(self) -> float:
        return self.value * self.weight


@dataclass(frozen=True)
class WorkerLine:
    """Why a worker would or would not take the job: a filter's reason, or its scores."""

    worker_id: str
    rejected_by: str | None
    scores: tuple[FactorLine, ...] = ()
    total: float = 0.0


@dataclass(frozen=True)
class Explanation:
    """The ``sprio``-like breakdown of a job's queue position and of the workers for it."""

    job_id: str
    policy: str
    factors: tuple[FactorLine, ...]
    priority: float
    position: int  # 0-based place in the queue order; -1 when running
    workers: tuple[WorkerLine, ...]
    decision: str = ""  # what this cycle does with a queued job, e.g. "starts on w0", "waits: ..."

    def format(self) -> str:
        """A few readable lines, e.g. ``age 0.50 x 1000 = 500``."""
        where = f"queue position {self.position}" if self.position >= 0 else "running"
        lines = [f"job {self.job_id} under {self.policy}: {where}, priority {self.priority:.1f}"]
        if self.decision:
            lines.append(f"  this cycle: {self.decision}")
        lines += [f"  {f.name:<10} {f.value:6.3f} x {f.weight:g} = {f.weighted:.1f}" for f in self.factors]
        for w in self.workers:
            if w.rejected_by:
                lines.append(f"  worker {w.worker_id}: no ({w.rejected_by})")
            else:
                parts = ", ".join(f"{s.name} {s.value:.0f}x{s.weight:g}" for s in w.scores)
                lines.append(f"  worker {w.worker_id}: score {w.total:.1f} ({parts})")
        return "\n".join(lines)


@runtime_checkable
class Policy(Protocol):
    """What the controller and the simulator call.

    ``schedule`` must be a pure function of the view: same view, same decisions. It returns
    Start decisions only for queued jobs and workers in the view, and Preempt only for running
    jobs. ``explain`` raises KeyError for a job not in the view.

    Optional: ``wake_at(view) -> float | None``, when the decisions could next change with nothing
    happening but time passing (a job's waiting time reaching a rule's threshold); None: only events
    change them. The simulator runs the policy then (the controller runs it every 0.5 s anyway); a
    policy without it is run every ``tick_s`` (10 s) of simulated time while jobs wait.
    """

    name: str

    def schedule(self, view: ClusterView) -> list[Decision]: ...

    def explain(self, view: ClusterView, job_id: str) -> Explanation: ...


class QueueOrder(Protocol):
    """Orders the queued jobs; ``breakdown`` gives the factors behind one job's place.

    Two optional methods let the engine avoid sorting the whole queue when a cycle only reaches
    its head (a strict policy stops at the first job that cannot start; ``queue_depth`` caps the
    jobs considered): ``keys(queued, view) -> list[tuple]``, one sortable key per job whose last
    item is the job's index in ``queued`` (ascending keys are :meth:`order`; the engine heapifies
    them and pops as it goes), and ``top(queued, view, k)``, the first ``k`` of :meth:`order`.
    """

    def order(self, queued: Sequence[JobView], view: ClusterView) -> list[JobView]: ...

    def breakdown(self, job: JobView, view: ClusterView) -> tuple[tuple[FactorLine, ...], float]: ...


class PriorityFactor(Protocol):
    """One normalised factor of a multifactor priority: a value in [0, 1] per job (1 = first)."""

    name: str

    def values(self, jobs: Sequence[JobView], view: ClusterView) -> list[float]: ...


class Filter(Protocol):
    """Returns None when ``job`` may join ``slot``'s group, else a short reason."""

    name: str

    def filter(self, job: JobView, slot: Slot, cycle: Cycle) -> str | None: ...


class WorkerSubset(Protocol):
    """Optional on a :class:`Filter` (kube-scheduler's PreFilter result): for a job in the cycle's
    current state, exactly the worker ids its ``filter`` passes (None: every worker). The engine
    then asks this once per job instead of calling ``filter`` per worker, and examines just those
    workers (an empty set: none). ``explain`` still calls ``filter``: the two must agree."""

    def allowed_workers(self, job: JobView, cycle: Cycle) -> frozenset[str] | None: ...


class Score(Protocol):
    """How good ``slot`` is for ``job``, in [0, 100] (100 best)."""

    name: str

    def score(self, job: JobView, slot: Slot, cycle: Cycle) -> float: ...


class PreemptRule(Protocol):
    """Running jobs to preempt so that ``job`` can start; empty: preempt nothing."""

    def victims(self, job: JobView, cycle: Cycle) -> list[str]: ...


class TurnRule(Protocol):
    """Turns (:class:`policies.plugins.ShortJobTurns`): ``due`` jobs go first in the queue and,
    blocked, may take a busy worker by preempting its group (``victims``; empty: none)."""

    def due(self, job: JobView, now_s: float) -> bool: ...

    def victims(self, job: JobView, cycle: Cycle) -> list[str]: ...

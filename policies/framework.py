"""The scheduling cycle shared by every built-in policy: order, filter, score, start, preempt.

One call of :meth:`ProfilePolicy.schedule` runs one cycle on a snapshot:

1. ``order`` sorts the queued jobs (:class:`~policies.interface.QueueOrder`). With
   ``starvation_s`` set, jobs that waited longer go first, oldest first.
2. For each job in that order (at most ``queue_depth`` of them), every worker is a candidate
   that passes the fixed filters

   * the worker is accepting;
   * it is idle, or its group trains the job's base model (one base model per worker);
   * the group's predicted peak with the job added fits: ``static + (1 + margin) * dynamic``
     <= ``memory_bytes`` (:func:`policies.memory_model.group_peak_bytes`, rows padded to the
     group's longest sequence);

   and the profile's own filters (e.g. owner quotas). Idle workers with the same loaded model,
   capacity and speed are interchangeable: one of them (the lowest id) stands for all.
   At most ``max_candidates`` feasible workers are scored (kube-scheduler's
   ``percentageOfNodesToScore``), idle ones first.
3. The candidate with the highest weighted score wins (ties: the worker listed first):
   ``total = sum(weight_i * score_i) / sum(weight_i)``, each score in 0..100.
4. A job with no candidate: ``preempt`` may name victims (Preempt decisions); then, without
   ``backfill`` (strict order), the cycle stops: head-of-line blocking. With backfill, the first
   ``reservations`` such jobs each reserve the busy worker expected to drain soonest for them
   (:meth:`Cycle.reserve_for`) and later jobs may start only elsewhere (EASY backfilling).

Within a cycle the engine tracks its own tentative starts in :class:`Slot` objects (never in
the view), so a later job sees the memory an earlier one took.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from policies.interface import (
    Decision,
    Explanation,
    FactorLine,
    Filter,
    Preempt,
    PreemptRule,
    QueueOrder,
    Score,
    Start,
    WorkerLine,
)
from policies.snapshot import ClusterView, JobView, WorkerView


class Slot:
    """A worker's group as the cycle sees it: the snapshot plus this cycle's tentative starts.

    Plugins read it; only the engine changes it. ``jobs`` includes running jobs with a pending
    preemption (their memory is still in use).
    """

    __slots__ = ("adapter_sum", "index", "jobs", "lmax", "model", "rows", "s0", "s1", "s2", "static", "worker")

    def __init__(self, worker: WorkerView, index: int, jobs: Sequence[JobView]):
        self.worker = worker
        self.index = index
        self.jobs: list[JobView] = []
        self.model: str | None = None  # the model of the group; None while empty
        self.static = 0
        self.adapter_sum = self.s0 = self.s1 = self.s2 = 0.0
        self.lmax = 0
        self.rows = 0
        for job in jobs:
            self.add(job)

    def add(self, job: JobView) -> None:
        """Record ``job`` in the group (engine only)."""
        if not self.jobs:
            self.model, self.static = job.base_model, job.static_bytes
        self.jobs.append(job)
        a, b = job.activation, job.micro_batch_size
        self.adapter_sum += job.adapter_bytes
        self.s0 += a.b0
        self.s1 += a.b1 * b
        self.s2 += a.b2 * b
        self.rows += b
        if job.seq_len > self.lmax:
            self.lmax = job.seq_len

    @property
    def idle(self) -> bool:
        return not self.jobs

    def dynamic_with(self, job: JobView | None) -> float:
        """Predicted dynamic bytes of the group (plus ``job``), rows padded to the longest."""
        if job is None:
            lp = self.lmax
            return self.adapter_sum + self.s0 + lp * self.s1 + lp * lp * self.s2
        a, b = job.activation, job.micro_batch_size
        lp = job.seq_len if job.seq_len > self.lmax else self.lmax
        return (self.adapter_sum + job.adapter_bytes + self.s0 + a.b0
                + lp * (self.s1 + a.b1 * b) + lp * lp * (self.s2 + a.b2 * b))  # fmt: skip

    def peak_with(self, job: JobView | None, margin: float) -> float:
        """Predicted peak bytes of the group with ``job`` added (None: as is)."""
        static = self.static if self.jobs else (job.static_bytes if job is not None else 0)
        return static + (1.0 + margin) * self.dynamic_with(job)

    def free_bytes(self, margin: float) -> float:
        """Capacity minus the predicted peak; for an idle worker, its whole capacity."""
        return self.worker.memory_bytes - self.peak_with(None, margin)

    def padded_tokens_with(self, job: JobView) -> tuple[int, int]:
        """(useful tokens, padded tokens) of one fused micro-batch with ``job`` added."""
        useful = sum(j.micro_batch_size * j.seq_len for j in self.jobs) + job.micro_batch_size * job.seq_len
        lp = max(self.lmax, job.seq_len)
        return useful, (self.rows + job.micro_batch_size) * lp


class Cycle:
    """The state of one scheduling cycle, readable by plugins.

    Attributes: ``view``; ``margin``; ``slots`` (one per worker, in view order); ``running_by_owner``
    (running plus started this cycle); ``pending`` (ids with a pending or new preemption).
    """

    def __init__(self, view: ClusterView, margin: float):
        self.view = view
        self.margin = margin
        by_worker: dict[str, list[JobView]] = {}
        self.running_by_owner: dict[str, int] = {}
        self.pending: set[str] = set()
        for job in view.running:
            by_worker.setdefault(job.worker_id or "", []).append(job)
            self.running_by_owner[job.owner] = self.running_by_owner.get(job.owner, 0) + 1
            if job.preempt_pending:
                self.pending.add(job.job_id)
        self.slots = [Slot(w, i, by_worker.get(w.worker_id, ())) for i, w in enumerate(view.workers)]
        # Busy accepting slots per model, and idle accepting slots per interchangeable class.
        self.busy_by_model: dict[str, list[Slot]] = {}
        self.idle_classes: dict[tuple[str | None, int, float], list[Slot]] = {}
        for s in self.slots:
            if not s.worker.accepting:
                continue
            if s.jobs:
                self.busy_by_model.setdefault(s.model or "", []).append(s)
            else:
                key = (s.worker.loaded_model, s.worker.memory_bytes, s.worker.tflops)
                self.idle_classes.setdefault(key, []).append(s)
        for members in self.idle_classes.values():
            members.reverse()  # pop() from the end yields the lowest index first
        self._max_free: dict[str, float] = {m: self._scan_max(m) for m in self.busy_by_model}
        self._max_idle = max((k[1] for k, v in self.idle_classes.items() if v), default=0)

    def _scan_max(self, model: str) -> float:
        return max((s.free_bytes(self.margin) for s in self.busy_by_model.get(model, ())), default=-1.0)

    def start(self, job: JobView, slot: Slot) -> None:
        """Record a tentative start (engine only)."""
        was_idle = slot.idle
        old_free = -2.0 if was_idle else slot.free_bytes(self.margin)
        slot.add(job)
        self.running_by_owner[job.owner] = self.running_by_owner.get(job.owner, 0) + 1
        model = job.base_model
        if was_idle:
            key = (slot.worker.loaded_model, slot.worker.memory_bytes, slot.worker.tflops)
            self.idle_classes[key].remove(slot)
            self.busy_by_model.setdefault(model, []).append(slot)
            self._max_idle = max((k[1] for k, v in self.idle_classes.items() if v), default=0)
            self._max_free[model] = max(self._max_free.get(model, -1.0), slot.free_bytes(self.margin))
        elif old_free >= self._max_free.get(model, -1.0):
            self._max_free[model] = self._scan_max(model)

    def reserve_for(self, job: JobView) -> Slot | None:
        """Take the busy worker that should drain soonest enough for ``job`` out of this cycle.

        Drain estimate: on a worker of the job's model, running jobs are removed shortest
        ``remaining_work_s`` first until the job fits, and the last one removed sets the time; on a
        worker of another model, all must finish (the longest sets the time). Lowest time wins
        (ties: first listed). Returns the reserved slot, or None when no worker could ever fit it.
        """
        best: Slot | None = None
        best_t = float("inf")
        for members in self.busy_by_model.values():
            for slot in members:
                jobs = sorted(slot.jobs, key=lambda j: j.remaining_work_s)
                if slot.model != job.base_model:
                    t = jobs[-1].remaining_work_s
                    trial = Slot(slot.worker, slot.index, ())
                else:
                    trial = Slot(slot.worker, slot.index, jobs)
                    t = 0.0
                    while jobs and trial.peak_with(job, self.margin) > slot.worker.memory_bytes:
                        t = jobs.pop(0).remaining_work_s
                        trial = Slot(slot.worker, slot.index, jobs)
                if trial.peak_with(job, self.margin) > slot.worker.memory_bytes:
                    continue
                if t < best_t or (t == best_t and best is not None and slot.index < best.index):
                    best, best_t = slot, t
        if best is not None:
            model = best.model or ""
            self.busy_by_model[model].remove(best)
            self._max_free[model] = self._scan_max(model)
        return best

    def may_fit(self, job: JobView) -> bool:
        """A cheap necessary condition for some worker to take ``job`` (padding ignored)."""
        need = (1.0 + self.margin) * (job.adapter_bytes + job.activation.predict(job.micro_batch_size, job.seq_len))
        if self._max_idle - job.static_bytes >= need:
            return True
        return self._max_free.get(job.base_model, -1.0) >= need

    def candidates(self, job: JobView) -> list[Slot]:
        """Idle class representatives, then busy workers of the job's model (unfiltered)."""
        reps = [members[-1] for members in self.idle_classes.values() if members]
        reps.sort(key=lambda s: s.index)
        return reps + self.busy_by_model.get(job.base_model, [])

    def fits(self, job: JobView, slot: Slot) -> str | None:
        """The fixed filters: None if the job may join the slot, else the reason."""
        if not slot.worker.accepting:
            return "not accepting"
        if slot.jobs and slot.model != job.base_model:
            return f"busy with {slot.model}"
        peak = slot.peak_with(job, self.margin)
        if peak > slot.worker.memory_bytes:
            gib = 1 << 30
            return f"memory {peak / gib:.1f} GiB > {slot.worker.memory_bytes / gib:.1f} GiB"
        return None


@dataclass(frozen=True)
class ProfilePolicy:
    """A policy assembled from plugins and admin weights (see the module docstring).

    Attributes:
        name: shown in reports.
        order: the queue order.
        filters: extra filters after the fixed ones.
        scores: ``(plugin, weight)`` pairs; weights >= 0, not all zero.
        margin: memory headroom as a fraction of the group's dynamic bytes (>= 0).
        backfill: True: a job that cannot start is skipped; False: the cycle stops there.
        preempt: the preemption rule, or None (never preempt).
        queue_depth: at most this many queued jobs are considered per cycle (0: all).
        max_candidates: at most this many feasible workers are scored per job (0: all).
        starvation_s: jobs waiting longer go first (oldest first); None: off.
        reservations: with backfill, the first this-many jobs that cannot start each reserve the
            worker that should drain soonest for them (no other job starts there this cycle): EASY
            backfilling, so big jobs are not starved by a stream of small ones.
    """

    name: str
    order: QueueOrder
    filters: tuple[Filter, ...] = ()
    scores: tuple[tuple[Score, float], ...] = ()
    margin: float = 0.0
    backfill: bool = False
    preempt: PreemptRule | None = None
    queue_depth: int = 0
    max_candidates: int = 0
    starvation_s: float | None = None
    reservations: int = 0

    def _ordered(self, view: ClusterView) -> list[JobView]:
        ordered = self.order.order(view.queued, view)
        if self.starvation_s is None:
            return ordered
        cutoff = view.now_s - self.starvation_s
        old = sorted((j for j in ordered if j.submit_time_s <= cutoff), key=lambda j: (j.submit_time_s, j.job_id))
        if not old:
            return ordered
        return old + [j for j in ordered if j.submit_time_s > cutoff]

    def _score(self, job: JobView, slot: Slot, cycle: Cycle) -> float:
        total = weights = 0.0
        for plugin, weight in self.scores:
            if weight:
                total += weight * plugin.score(job, slot, cycle)
                weights += weight
        return total / weights if weights else 0.0

    def _place(self, job: JobView, cycle: Cycle) -> Slot | None:
        if not cycle.may_fit(job):
            return None
        best: Slot | None = None
        best_score = -1.0
        found = 0
        for slot in cycle.candidates(job):
            if cycle.fits(job, slot) is not None:
                continue
            if any(f.filter(job, slot, cycle) is not None for f in self.filters):
                continue
            s = self._score(job, slot, cycle)
            if s > best_score or (s == best_score and best is not None and slot.index < best.index):
                best, best_score = slot, s
            found += 1
            if self.max_candidates and found >= self.max_candidates:
                break
        return best

    def schedule(self, view: ClusterView) -> list[Decision]:
        """One cycle on ``view``: Start decisions in order, then any Preempt decisions."""
        cycle = Cycle(view, self.margin)
        starts: list[Decision] = []
        preempts: list[Decision] = []
        reserve_left = self.reservations
        for n, job in enumerate(self._ordered(view)):
            if self.queue_depth and n >= self.queue_depth:
                break
            slot = self._place(job, cycle)
            if slot is not None:
                cycle.start(job, slot)
                starts.append(Start(job.job_id, slot.worker.worker_id))
                continue
            if self.preempt is not None:
                victims = self.preempt.victims(job, cycle)
                cycle.pending.update(victims)
                preempts.extend(Preempt(v) for v in victims)
            if not self.backfill:
                break
            if reserve_left > 0 and cycle.reserve_for(job) is not None:
                reserve_left -= 1
        return starts + preempts

    def explain(self, view: ClusterView, job_id: str) -> Explanation:
        """The job's priority factors, queue position and, if queued, every worker's verdict."""
        job = view.find_job(job_id)
        if job is None:
            raise KeyError(f"job {job_id!r} is neither queued nor running")
        factors, priority = self.order.breakdown(job, view)
        position = -1
        lines: list[WorkerLine] = []
        if not job.is_running:
            position = [j.job_id for j in self._ordered(view)].index(job_id)
            cycle = Cycle(view, self.margin)
            for slot in cycle.slots:
                reason = cycle.fits(job, slot)
                for f in self.filters:
                    reason = reason or f.filter(job, slot, cycle)
                if reason:
                    lines.append(WorkerLine(slot.worker.worker_id, f"{reason}"))
                    continue
                scores = tuple(FactorLine(p.name, p.score(job, slot, cycle), w) for p, w in self.scores)
                lines.append(WorkerLine(slot.worker.worker_id, None, scores, self._score(job, slot, cycle)))
        return Explanation(job_id, self.name, factors, priority, position, tuple(lines))

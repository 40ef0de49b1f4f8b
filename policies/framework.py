"""The scheduling cycle shared by every built-in policy: order, filter, score, start, preempt.

One call of :meth:`ProfilePolicy.schedule` runs one cycle on a snapshot:

1. ``order`` sorts the queued jobs (:class:`~policies.interface.QueueOrder`). With a tail guard
   (``starvation_s``, ``guard_backlog``, ``guard_long``, ``fair_slack_s``), the jobs it flags go
   first, earliest FIFO-fair start deadline (else submit time) first (:meth:`ProfilePolicy._urgent`). With ``queue_depth`` only the first that-many jobs are
   considered, found by a partial sort when the order has ``top(queued, view, k)``.
2. For each job in that order, every worker is a candidate that passes the fixed filters

   * the worker is accepting;
   * it is idle, or its group trains the job's base model (one base model per worker);
   * the group's predicted peak with the job added fits: ``static + (1 + margin) * dynamic``
     <= ``memory_bytes``, the fused-group prediction the engine was measured against
     (:func:`policies.memory_model.fused_group_peak_bytes`: rows padded to the group's longest
     sequence, the largest ``b0`` paid once, the loss head not padded; :class:`Slot`);

   and the profile's own filters (e.g. owner quotas). Idle workers with the same loaded model,
   capacity and speed are interchangeable: one of them (the lowest id) stands for all. Busy
   workers of the job's model are examined most predicted free memory first, skipping those with
   less free memory than the job alone needs; at most ``4 * max_candidates`` of them are
   examined and at most ``max_candidates`` feasible workers are scored (kube-scheduler's
   ``percentageOfNodesToScore``), idle ones first.
3. The candidate with the highest weighted score wins (ties: the worker listed first):
   ``total = sum(weight_i * score_i) / sum(weight_i)``, each score in 0..100.
4. A job that would not fit even alone on the largest worker (:meth:`Cycle.fits_nowhere`) is
   passed over by every policy, strict ones included: waiting cannot help it, so it never blocks
   the jobs behind it, preempts or reserves (``explain`` says so, with its predicted peak).
   Another job with no candidate: ``preempt`` may name victims (Preempt decisions); their worker is
   then held (:meth:`Cycle.hold`): no later job of the cycle may join it, nor any job of a later
   cycle while a preemption on it is pending, so the room goes to the job it was freed for. Then, without
   ``backfill`` (strict order), the cycle stops: head-of-line blocking. With backfill, the first
   ``reservations`` such jobs each reserve the busy worker expected to drain soonest for them
   (:meth:`Cycle.reserve_for`) and later jobs may start only elsewhere (EASY backfilling).

Within a cycle the engine tracks its own tentative starts in :class:`Slot` objects (never in
the view), so a later job sees the memory an earlier one took. Cost per cycle: one pass over the
queue and the running jobs, a partial sort of the queue, then per considered job at most
``4 * max_candidates`` busy workers plus one per idle class; busy workers are kept sorted by free
memory per model and updated in place after each start.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

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
    TurnRule,
    WorkerLine,
)
from policies.memory_model import GIB, fused_terms, packs
from policies.snapshot import ClusterView, JobView, WorkerView

#: at most this long between two runs of a policy with waiting-time rules in the simulator, for
#: what changes gradually (ProfilePolicy.wake_at): 60 s met the targets on the traces 10 s-periodic
#: runs did but one (0.708x against 0.684x mean), at a third of the replay time on 2,000 jobs
GRADUAL_S = 60.0


def fifo_wait_s(view: ClusterView) -> float:
    """About how long a job arriving now would wait under FIFO before it starts, in solo seconds.

    FIFO would be running the oldest jobs in the system, so its queue is all the remaining work
    (queued and running) less that of the ``len(view.running)`` oldest jobs, spread over the
    accepting workers. The tail guard and the slowdown cap measure against it.
    """
    accepting = sum(1 for w in view.workers if w.accepting) or 1
    jobs = view.queued + view.running
    n = len(view.running)
    if not n:
        return sum(j.remaining_work_s for j in jobs) / accepting
    times = [j.submit_time_s for j in jobs]
    ordered = sorted(times)
    cut = ordered[n - 1]  # the n-th oldest submit time
    queue = sum([j.remaining_work_s for t, j in zip(times, jobs, strict=True) if t > cut])
    older = bisect.bisect_left(ordered, cut)
    ties = bisect.bisect_right(ordered, cut) - older  # submitted exactly at ``cut``: beyond the n oldest, queued
    if ties > n - older:
        tied = sorted(j.remaining_work_s for j in jobs if j.submit_time_s == cut)
        queue += sum(tied[n - older:])
    return queue / accepting


def largest_memory(view: ClusterView) -> int:
    """The most memory of any worker in ``view``, accepting or not (0 with none)."""
    return max((w.memory_bytes for w in view.workers), default=0)


def alone_bytes(job: JobView, margin: float) -> float:
    """``job``'s predicted peak alone on an emptied worker, its dynamic part raised by ``margin``."""
    b0, c, d, e = job_terms(job)
    seq = job.seq_len
    return job.static_bytes + (1.0 + margin) * (b0 + c + d * seq + e * seq * seq)


def _deadline(job: JobView) -> tuple[float, float, str]:
    """Urgent jobs' order: FIFO-fair start (the submit time when not stamped), then submit, id."""
    fair = job.fair_start_s
    return (job.submit_time_s if fair is None else fair, job.submit_time_s, job.job_id)


_last_terms: tuple[JobView | None, tuple[float, float, float, float]] = (None, (0.0, 0.0, 0.0, 0.0))


def job_terms(job: JobView) -> tuple[float, float, float, float]:
    """``(b0, c, d, e)`` of :func:`policies.memory_model.fused_terms` for the job's prediction.

    The last job's terms are kept (job views are immutable): scoring asks for the same job once per
    candidate worker."""
    global _last_terms
    last = _last_terms
    if last[0] is job:
        return last[1]
    terms = fused_terms(job.adapter_bytes, job.activation, job.micro_batch_size, job.seq_len, job.loss_head_per_token)
    _last_terms = (job, terms)
    return terms


class Slot:
    """A worker's group as the cycle sees it: the snapshot plus this cycle's tentative starts.

    Plugins read it; only the engine changes it. ``jobs`` includes running jobs with a pending
    preemption (their memory is still in use). Memory: the group's dynamic bytes at padded length
    ``L`` are ``b0 + sc + sd * L + se * L**2`` (``b0`` the members' largest, the others sums of
    :func:`policies.memory_model.fused_terms`), which is
    :func:`policies.memory_model.fused_group_peak_bytes` (or, for a fit with ``b2 > 0`` and ``b1``
    below the loss head, an upper bound of it). On a worker that packs the group's longest row
    (``worker.packing_max_len``) they are ``b0 + sown``: every job at its own length, no padding.
    """

    __slots__ = ("b0", "index", "jobs", "lmax", "memo", "model", "rows", "sc", "sd", "se", "sown", "static",
                 "useful", "worker")  # fmt: skip

    def __init__(self, worker: WorkerView, index: int, jobs: Sequence[JobView]):
        self.worker = worker
        self.index = index
        self.jobs: list[JobView] = []
        self.model: str | None = None  # the model of the group; None while empty
        self.static = 0
        self.b0 = self.sc = self.sd = self.se = self.sown = 0.0
        self.lmax = 0
        self.rows = 0
        self.useful = 0  # tokens of one fused micro-batch without padding
        self.memo: dict = {}  # plugins may cache per-group values here; cleared when a job is added
        for job in jobs:
            self.add(job)

    def add(self, job: JobView) -> None:
        """Record ``job`` in the group (engine only)."""
        if not self.jobs:
            self.model, self.static = job.base_model, job.static_bytes
        if self.memo:
            self.memo = {}
        self.jobs.append(job)
        b0, c, d, e = job_terms(job)
        if b0 > self.b0:
            self.b0 = b0
        self.sc += c
        self.sd += d
        self.se += e
        seq = job.seq_len
        self.sown += c + seq * d + seq * seq * e
        self.rows += job.micro_batch_size
        self.useful += job.micro_batch_size * seq
        if seq > self.lmax:
            self.lmax = seq

    @property
    def idle(self) -> bool:
        return not self.jobs

    def dynamic_with(self, job: JobView | None) -> float:
        """Predicted dynamic bytes of the group (plus ``job``): rows packed where the worker packs
        the group's longest row, else padded to it."""
        if job is None:
            lp = self.lmax
            if 0 < lp <= self.worker.packing_max_len:  # policies.memory_model.packs, inlined: a hot path
                return self.b0 + self.sown
            return self.b0 + self.sc + lp * self.sd + lp * lp * self.se
        b0, c, d, e = job_terms(job)
        seq = job.seq_len
        lp = seq if seq > self.lmax else self.lmax
        if 0 < lp <= self.worker.packing_max_len:
            return max(self.b0, b0) + self.sown + c + seq * d + seq * seq * e
        return max(self.b0, b0) + self.sc + c + lp * (self.sd + d) + lp * lp * (self.se + e)

    def peak_with(self, job: JobView | None, margin: float) -> float:
        """Predicted peak bytes of the group with ``job`` added (None: as is)."""
        static = self.static if self.jobs else (job.static_bytes if job is not None else 0)
        return static + (1.0 + margin) * self.dynamic_with(job)

    def free_bytes(self, margin: float) -> float:
        """Capacity minus the predicted peak; for an idle worker, its whole capacity."""
        return self.worker.memory_bytes - self.peak_with(None, margin)

    def padded_tokens_with(self, job: JobView) -> tuple[int, int]:
        """(useful tokens, processed tokens) of one fused micro-batch with ``job`` added: the
        processed ones include the padding to the longest row, none where the worker packs."""
        useful = self.useful + job.micro_batch_size * job.seq_len
        lp = max(self.lmax, job.seq_len)
        if packs(self.worker.packing_max_len, lp):
            return useful, useful
        return useful, (self.rows + job.micro_batch_size) * lp


class Cycle:
    """The state of one scheduling cycle, readable by plugins.

    Attributes: ``view``; ``margin``; ``slots`` (one per worker, in view order); ``running_by_owner``
    (running plus started this cycle); ``workers_by_owner`` (ids of the workers each owner's
    running and this cycle's started jobs occupy); ``pending`` (ids with a pending or new preemption);
    ``backlog_s`` (:func:`fifo_wait_s` of the view); ``urgent`` (ids the tail guard or a short
    job's turn put first; with ``queue_depth``, due jobs beyond the considered ones may be left out);
    ``worker_of`` (running job id -> worker id); ``memo`` (plugins' per-cycle cache, e.g.
    :class:`~policies.plugins.FusionPays`'s tail cut).
    """

    def __init__(self, view: ClusterView, margin: float):
        self.view = view
        self.margin = margin
        by_worker: dict[str, list[JobView]] = {}
        self.running_by_owner: dict[str, int] = {}
        self.workers_by_owner: dict[str, set[str]] = {}
        self.pending: set[str] = set()
        self.urgent: set[str] = set()  # ids the tail guard put first (filled by the engine)
        self.fair_slack_s: float | None = None  # the policy's, for filters (set by the engine)
        self.filters: tuple = ()  # the policy's filters, for preemption rules (set by the engine)
        self.memo: dict = {}  # plugins may cache per-cycle values here
        self.worker_of: dict[str, str | None] = {}  # running job id -> its worker id
        for job in view.running:
            self.worker_of[job.job_id] = job.worker_id
            by_worker.setdefault(job.worker_id or "", []).append(job)
            self.running_by_owner[job.owner] = self.running_by_owner.get(job.owner, 0) + 1
            if job.worker_id is not None:
                self.workers_by_owner.setdefault(job.owner, set()).add(job.worker_id)
            if job.preempt_pending:
                self.pending.add(job.job_id)
        self.slots = [Slot(w, i, by_worker.get(w.worker_id, ())) for i, w in enumerate(view.workers)]
        self.slot_of = {s.worker.worker_id: s for s in self.slots}
        self.reserved: set[int] = set()  # slot indices reserve_for took out of this cycle
        self.held_why: dict[int, str] = {}  # slot index -> why it is held (for explain)
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
        self._ranked: dict[str, list[tuple[float, int, Slot]]] = {}  # busy slots by free memory, lazily
        self._reps: list[Slot] | None = None  # one idle slot per interchangeable class, lazily
        for s in self.slots:  # a group being preempted frees its room for the job it was preempted for
            if s.jobs and any(j.job_id in self.pending for j in s.jobs):
                self.hold(s, "a preemption on it is pending")

    @cached_property
    def backlog_s(self) -> float:
        """:func:`fifo_wait_s` of the view, computed on first use (a pass and a sort of the queue)."""
        return fifo_wait_s(self.view)

    def _scan_max(self, model: str) -> float:
        return max((s.free_bytes(self.margin) for s in self.busy_by_model.get(model, ())), default=-1.0)

    def start(self, job: JobView, slot: Slot) -> None:
        """Record a tentative start (engine only)."""
        was_idle = slot.idle
        old_free = -2.0 if was_idle else slot.free_bytes(self.margin)
        slot.add(job)
        self.running_by_owner[job.owner] = self.running_by_owner.get(job.owner, 0) + 1
        self.workers_by_owner.setdefault(job.owner, set()).add(slot.worker.worker_id)
        model = job.base_model
        ranked = self._ranked.get(model)
        if ranked is not None:
            if not was_idle:
                del ranked[bisect.bisect_left(ranked, (-old_free, slot.index))]
            bisect.insort(ranked, (-slot.free_bytes(self.margin), slot.index, slot))
        if was_idle:
            key = (slot.worker.loaded_model, slot.worker.memory_bytes, slot.worker.tflops)
            self.idle_classes[key].remove(slot)
            self._reps = None
            self.busy_by_model.setdefault(model, []).append(slot)
            self._max_idle = max((k[1] for k, v in self.idle_classes.items() if v), default=0)
            self._max_free[model] = max(self._max_free.get(model, -1.0), slot.free_bytes(self.margin))
        elif ranked is not None:
            self._max_free[model] = -ranked[0][0]
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
        scale = 1.0 + self.margin
        seq = job.seq_len
        jb0, jc, jd, je = job_terms(job)
        alone = self.alone_bytes(job)  # on an emptied worker
        for members in self.busy_by_model.values():
            for slot in members:
                mem = slot.worker.memory_bytes
                if slot.model != job.base_model:
                    if alone > mem:
                        continue
                    t = max(j.remaining_work_s for j in slot.jobs)
                else:
                    # remove the members with the least remaining work first until the job fits;
                    # the group's sums after each removal, without building trial slots
                    jobs = sorted(slot.jobs, key=lambda j: j.remaining_work_s)
                    sc, sd, se = slot.sc, slot.sd, slot.se
                    t, i, fits = 0.0, 0, False
                    while True:
                        rest = jobs[i:]
                        if rest:
                            lp = max(seq, max(j.seq_len for j in rest))
                            b0 = max(jb0, max(j.activation.b0 for j in rest))
                            peak = slot.static + scale * (b0 + sc + jc + lp * (sd + jd) + lp * lp * (se + je))
                        else:
                            peak = alone
                        if peak <= mem:
                            fits = True
                            break
                        if not rest or jobs[i].remaining_work_s > best_t:
                            break  # cannot fit, or cannot drain sooner than the best so far
                        gone = jobs[i]
                        t = gone.remaining_work_s
                        _, gc, gd, ge = job_terms(gone)
                        sc, sd, se = sc - gc, sd - gd, se - ge
                        i += 1
                    if not fits:
                        continue
                if t < best_t or (t == best_t and best is not None and slot.index < best.index):
                    best, best_t = slot, t
        if best is not None:
            self.hold(best, f"reserved for {job.job_id} (it drains soonest for that job)")
        return best

    @cached_property
    def largest_memory(self) -> int:
        """The most memory of any worker in the view, accepting or not (0 with none)."""
        return largest_memory(self.view)

    def alone_bytes(self, job: JobView) -> float:
        """``job``'s predicted peak alone on an emptied worker, with the margin."""
        return alone_bytes(job, self.margin)

    def fits_nowhere(self, job: JobView) -> bool:
        """True when ``job`` would not fit even alone on the largest worker: waiting cannot help it."""
        return self.alone_bytes(job) > self.largest_memory

    def hold(self, slot: Slot, why: str = "held") -> None:
        """Take a busy slot out of this cycle: no job may join it (a reservation, or a worker whose
        group is being preempted for another job)."""
        if slot.index in self.reserved:
            return
        self.reserved.add(slot.index)
        self.held_why[slot.index] = why
        model = slot.model or ""
        members = self.busy_by_model.get(model)
        if members is not None and slot in members:
            members.remove(slot)
            self._ranked.pop(model, None)
            self._max_free[model] = self._scan_max(model)

    def _need(self, job: JobView) -> tuple[float, float]:
        """(bytes the job needs on an idle worker beyond the model, the least it adds to a busy
        group), both with the margin: its dynamic bytes alone, and those without its ``b0``
        (the group pays the largest ``b0`` once; padding only adds)."""
        b0, c, d, e = job_terms(job)
        seq = job.seq_len
        joined = (1.0 + self.margin) * (c + d * seq + e * seq * seq)
        return joined + (1.0 + self.margin) * b0, joined

    def may_fit(self, job: JobView, need: tuple[float, float] | None = None) -> bool:
        """A cheap necessary condition for some worker to take ``job`` (``need``: :meth:`_need`)."""
        alone, joined = self._need(job) if need is None else need
        if self._max_idle - job.static_bytes >= alone:
            return True
        return self._max_free.get(job.base_model, -1.0) >= joined

    def candidates(self, job: JobView, need: float | None = None, limit: int = 0) -> list[Slot]:
        """Idle class representatives, then busy workers of the job's model (unfiltered): the busy
        ones with the most predicted free memory first, none with less free memory than the job
        adds at least (``need``, the second of :meth:`_need`: a necessary condition), and at
        most ``limit`` (0: all)."""
        if self._reps is None:
            self._reps = sorted((members[-1] for members in self.idle_classes.values() if members),
                                key=lambda s: s.index)  # fmt: skip
        reps = list(self._reps)
        busy = self.busy_by_model.get(job.base_model)
        if not busy:
            return reps
        if need is None:
            need = self._need(job)[1]
        ranked = self._ranked.get(job.base_model)
        if ranked is None:
            ranked = sorted((-s.free_bytes(self.margin), s.index, s) for s in busy)
            self._ranked[job.base_model] = ranked
        for neg_free, _, slot in ranked[:limit] if limit else ranked:
            if -neg_free < need:
                break
            reps.append(slot)
        return reps

    def subset_candidates(self, job: JobView, allowed: frozenset[str]) -> list[Slot]:
        """The slots among ``allowed`` worker ids that :meth:`candidates` could list (accepting,
        not reserved, idle or of the job's model), idle ones first, then by index."""
        out = []
        for wid in allowed:
            slot = self.slot_of.get(wid)
            if (slot is not None and slot.worker.accepting and slot.index not in self.reserved
                    and (slot.idle or slot.model == job.base_model)):  # fmt: skip
                out.append(slot)
        out.sort(key=lambda s: (not s.idle, s.index))
        return out

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


@dataclass
class _Trace:
    """What :meth:`ProfilePolicy._cycle` saw of one job (see :meth:`ProfilePolicy.explain`)."""

    position: int = -1
    workers: tuple[WorkerLine, ...] = ()
    decision: str = ""
    stopped_at: str | None = None  # the job a cycle without backfill stopped at before the target


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
        starvation_s: jobs waiting longer go first (among the urgent, earliest deadline first),
            deadlines or not; None: off.
        reservations: with backfill, the first this-many jobs that cannot start each reserve the
            worker that should drain soonest for them (no other job starts there this cycle): EASY
            backfilling, so big jobs are not starved by a stream of small ones.
        guard_backlog: tail guard: a job that has waited at least this many times the current
            FIFO wait estimate (:func:`fifo_wait_s`) goes first, oldest first; None: off. Such a
            job is worse off than one arriving now would be under FIFO.
        guard_long: tail guard for long jobs: a job with more remaining work than the FIFO wait
            estimate goes first once it has waited this fraction of its remaining work; None: off.
            (A long job's FIFO JCT is mostly its own run time, so each hour it is held back costs
            its class's tail directly.)
        fair_slack_s: FIFO-fair start deadlines: a job stamped with ``fair_start_s``
            (:class:`policies.fairstart.FifoClock`) is urgent once ``now >= fair_start_s -
            fair_slack_s``, and the stateless guards above no longer apply to it; urgent jobs go
            earliest deadline first. None: off (every job follows the stateless guards).
        turns: short jobs' turns on busy workers (:class:`policies.plugins.ShortJobTurns`): its due
            jobs go first (shortest first, before urgent ones) and, blocked, may preempt one busy
            worker's group; None: off.
        fair_clock: ``(name, value)`` settings of the FIFO clock that stamps ``fair_start_s``
            (:class:`policies.fairstart.FifoClock`, names in ``CLOCK_SETTINGS``); the simulator and
            the controller build their clock with them. Empty: the clock's defaults.

    Jobs flagged by a guard, and jobs due a turn, are listed in ``cycle.urgent`` for the filters
    (``FusionPays`` lets them join any group that has the memory).
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
    guard_backlog: float | None = None
    guard_long: float | None = None
    fair_slack_s: float | None = None
    turns: TurnRule | None = None
    fair_clock: tuple[tuple[str, Any], ...] = ()

    @cached_property
    def _active_scores(self) -> tuple[tuple[Score, float], ...]:
        return tuple((p, w) for p, w in self.scores if w)

    @cached_property
    def _subset_filters(self) -> tuple:
        """The filters that name their workers up front (:class:`~policies.interface.WorkerSubset`);
        :meth:`_place` asks them once per job instead of once per worker."""
        return tuple(f for f in self.filters if hasattr(f, "allowed_workers"))

    @cached_property
    def _plain_filters(self) -> tuple:
        return tuple(f for f in self.filters if not hasattr(f, "allowed_workers"))

    @cached_property
    def _weight_sum(self) -> float:
        return sum(w for _, w in self.scores if w)

    @property
    def guarded(self) -> bool:
        return not (self.starvation_s is None and self.guard_backlog is None and self.guard_long is None
                    and self.fair_slack_s is None)  # fmt: skip

    def wake_at(self, view: ClusterView) -> float | None:
        """When the simulator should run this policy again if nothing happens (no arrival, finish or
        checkpoint): the next time a queued job becomes urgent (:meth:`_urgent`) or due a turn by
        waiting alone, and at most ``GRADUAL_S`` from now for what changes gradually (the guards'
        FIFO wait estimate, the class tails and projected JCTs the fusion rules read). None when no
        rule of this policy reads the clock (fifo, priority and sjf as built): its decisions change
        only with events. The controller's loop runs every 0.5 s and needs none of this."""
        st, gb, gl, fs = self.starvation_s, self.guard_backlog, self.guard_long, self.fair_slack_s
        due_at = getattr(self.turns, "due_at", None)
        if not self.guarded and self.turns is None:
            return None
        now = view.now_s
        best = now + GRADUAL_S  # also the only wake-up for a turns rule that cannot say when a job is due
        backlog = None  # the guards' FIFO wait estimate (a pass and a sort of the queue): only if a job needs it
        for j in view.queued:
            times = []
            if st is not None:
                times.append(j.submit_time_s + st)
            if fs is not None and j.fair_start_s is not None:
                times.append(j.fair_start_s - fs)
            elif gb is not None or gl is not None:
                if backlog is None:
                    backlog = fifo_wait_s(view)
                if gb is not None:
                    times.append(j.submit_time_s + gb * backlog)
                if gl is not None and j.remaining_work_s >= backlog:
                    times.append(j.submit_time_s + gl * j.remaining_work_s)
            if due_at is not None:
                t = due_at(j)
                if t is not None:
                    times.append(t)
            for t in times:
                if now < t < best:
                    best = t
        return best

    def _urgent(self, view: ClusterView, backlog_s: float) -> list[JobView]:
        """The queued jobs the tail guard puts first, earliest deadline first (see the class docstring).

        With ``fair_slack_s`` set, a job stamped with ``fair_start_s`` is urgent once
        ``now >= fair_start_s - fair_slack_s`` (its FIFO-fair start deadline has come) or once it
        has waited ``starvation_s``; other jobs follow the stateless guards. Deadline: ``fair_start_s``, else the submit time.
        """
        now = view.now_s
        st, gb, gl, fs = self.starvation_s, self.guard_backlog, self.guard_long, self.fair_slack_s
        out = []
        for j in view.queued:
            waited = now - j.submit_time_s
            if fs is not None and j.fair_start_s is not None:  # the stateless guards give way to the deadline,
                if now >= j.fair_start_s - fs or (st is not None and waited >= st):  # the admin's bound does not
                    out.append(j)
                continue
            r = j.remaining_work_s
            if ((st is not None and waited >= st) or (gb is not None and waited >= gb * backlog_s)
                    or (gl is not None and r >= backlog_s and waited >= gl * r)):  # fmt: skip
                out.append(j)
        out.sort(key=_deadline)
        return out

    def _ordered(self, view: ClusterView, cycle: Cycle | None = None, limit: int = 0) -> Iterator[JobView]:
        """The queue in cycle order, lazily: urgent jobs (oldest first), then ``order``'s. With
        ``limit`` > 0 only the first ``limit`` (a partial sort when the order has ``top``); without,
        an order with ``keys`` is heapified and popped only as far as the cycle reads."""
        old: list[JobView] = []
        if self.guarded:
            old = self._urgent(view, cycle.backlog_s if cycle is not None else fifo_wait_s(view))
        if self.turns is not None:
            now, due = view.now_s, self.turns.due
            short = getattr(self.turns, "max_work_s", float("inf"))  # a cheap pre-check for ShortJobTurns
            keys = [(j.remaining_work_s, j.submit_time_s, j.job_id, i) for i, j in enumerate(view.queued)
                    if j.remaining_work_s <= short and due(j, now)]  # fmt: skip
            keys = heapq.nsmallest(limit, keys) if limit and len(keys) > limit else sorted(keys)
            first = [view.queued[k[3]] for k in keys]
            if first:
                ids = {j.job_id for j in first}
                old = first + [j for j in old if j.job_id not in ids]
        ids = {j.job_id for j in old}
        if cycle is not None:
            cycle.urgent = ids
        if limit and len(old) >= limit:
            return iter(old[:limit])
        rest = self._rest(view, limit + len(old) if limit else 0)  # the urgent ones may be among them
        if old:
            rest = itertools.chain(old, (j for j in rest if j.job_id not in ids))
        return itertools.islice(rest, limit) if limit else iter(rest)

    def _rest(self, view: ClusterView, limit: int) -> Iterable[JobView]:
        """``order``'s sequence of the queued jobs, at least its first ``limit`` (0: all)."""
        queued, order = view.queued, self.order
        top = getattr(order, "top", None)
        if limit and top is not None:
            return top(queued, view, limit)
        keys = getattr(order, "keys", None)
        if keys is None:
            return order.order(queued, view)
        heap = keys(queued, view)
        if limit:
            return [queued[k[-1]] for k in heapq.nsmallest(limit, heap)]
        heapq.heapify(heap)
        return (queued[heapq.heappop(heap)[-1]] for _ in range(len(heap)))

    def _score(self, job: JobView, slot: Slot, cycle: Cycle) -> float:
        total = weights = 0.0
        for plugin, weight in self.scores:
            if weight:
                total += weight * plugin.score(job, slot, cycle)
                weights += weight
        return total / weights if weights else 0.0

    def _place(self, job: JobView, cycle: Cycle) -> Slot | None:
        # The hot loop: one call per considered job. Candidates already pass "accepting" and
        # "same model or idle" (Cycle.candidates), so only memory is checked here.
        margin = cycle.margin
        scale = 1.0 + margin
        seq = job.seq_len
        jb0, jc, jd, je = job_terms(job)
        joined = scale * (jc + jd * seq + je * seq * seq)  # the least it adds to a busy group
        alone = job.static_bytes + joined + scale * jb0
        if not cycle.may_fit(job, (alone - job.static_bytes, joined)):
            return None
        best: Slot | None = None
        best_score = -1.0
        found = 0
        filters, cap = self._plain_filters, self.max_candidates
        scores = self._active_scores
        wsum = self._weight_sum
        allowed: frozenset[str] | None = None
        for f in self._subset_filters:
            sub = f.allowed_workers(job, cycle)
            if sub is not None:
                allowed = sub if allowed is None else allowed & sub
                if not allowed:
                    return None
        pool = cycle.candidates(job, joined, 4 * cap) if allowed is None else cycle.subset_candidates(job, allowed)
        for slot in pool:
            # slot.peak_with(job, margin), inlined: this line runs ~100 times per job
            if slot.jobs:
                lp = seq if seq > slot.lmax else slot.lmax
                if 0 < lp <= slot.worker.packing_max_len:  # packed: each job's rows at its own length
                    peak = slot.static + scale * ((slot.b0 if slot.b0 > jb0 else jb0) + slot.sown + jc
                                                  + seq * jd + seq * seq * je)  # fmt: skip
                else:
                    peak = slot.static + scale * ((slot.b0 if slot.b0 > jb0 else jb0) + slot.sc + jc
                                                  + lp * (slot.sd + jd) + lp * lp * (slot.se + je))  # fmt: skip
            else:
                peak = alone
            if peak > slot.worker.memory_bytes:
                continue
            rejected = False
            for f in filters:
                if f.filter(job, slot, cycle) is not None:
                    rejected = True
                    break
            if rejected:
                continue
            total = 0.0
            for plugin, weight in scores:
                total += weight * plugin.score(job, slot, cycle)
            sc = total / wsum if wsum else 0.0
            if sc > best_score or (sc == best_score and best is not None and slot.index < best.index):
                best, best_score = slot, sc
            found += 1
            if cap and found >= cap:
                break
        return best

    def schedule(self, view: ClusterView) -> list[Decision]:
        """One cycle on ``view``: Start decisions in order, then any Preempt decisions."""
        starts, preempts, _ = self._cycle(view)
        return starts + preempts

    def _cycle(self, view: ClusterView, target: str | None = None) -> tuple[list[Decision], list[Decision], _Trace]:
        """The cycle :meth:`schedule` runs. With ``target``, it stops once that job is decided and
        the trace holds what :meth:`explain` shows: its place, every worker's verdict as the cycle
        stood when its turn came (earlier starts, reservations, urgency), and the decision."""
        cycle = Cycle(view, self.margin)
        cycle.fair_slack_s = self.fair_slack_s
        cycle.filters = self.filters
        trace = _Trace()
        starts: list[Decision] = []
        preempts: list[Decision] = []
        reserve_left = self.reservations
        for position, job in enumerate(self._queue(view, cycle)):
            if job.job_id == target:
                trace.position, trace.workers = position, self._verdicts(job, cycle)
            slot = self._place(job, cycle)
            if slot is not None:
                cycle.start(job, slot)
                starts.append(Start(job.job_id, slot.worker.worker_id))
                if job.job_id == target:
                    trace.decision = f"starts on {slot.worker.worker_id}" + (
                        f" beside {len(slot.jobs) - 1} running job(s)" if len(slot.jobs) > 1 else "")
                    break
                continue
            if cycle.fits_nowhere(job):  # waiting cannot help it: never let it block the queue behind it
                if job.job_id == target:
                    trace.decision = (f"waits: fits no worker even alone (predicted peak {cycle.alone_bytes(job) / GIB:.1f} "
                                      f"GiB with the margin; the largest worker has {cycle.largest_memory / GIB:.1f} "
                                      "GiB): lower its micro_batch_size or max_seq_len; the jobs behind it go on")  # fmt: skip
                    break
                continue
            victims = self.preempt.victims(job, cycle) if self.preempt is not None else []
            turn = False
            if not victims and self.turns is not None:
                victims = self.turns.victims(job, cycle)
                turn = bool(victims)
            if victims:
                cycle.pending.update(victims)
                preempts.extend(Preempt(v) for v in victims)
                for v in victims:  # later jobs of this cycle must not refill the room being freed
                    wid = cycle.worker_of.get(v)
                    if wid in cycle.slot_of:
                        cycle.hold(cycle.slot_of[wid], f"a preemption for {job.job_id} is pending")
                if job.job_id == target:
                    trace.decision = (f"waits: no worker takes it now; preempts {', '.join(victims)} "
                                      "(at their next checkpoint) to make room")  # fmt: skip
                if turn:
                    if job.job_id == target:
                        break
                    continue  # the job waits for that worker: no reservation of another
            if not self.backfill:
                if job.job_id == target:
                    trace.decision = trace.decision or "waits: no worker takes it now"
                    trace.decision += "; the queue stops here this cycle (no backfill)"
                else:
                    trace.stopped_at = job.job_id
                break
            reserved = None
            if reserve_left > 0:
                reserved = cycle.reserve_for(job)
                if reserved is not None:
                    reserve_left -= 1
            if job.job_id == target:
                trace.decision = trace.decision or "waits: no worker takes it now"
                if reserved is not None:
                    trace.decision += f"; reserves {reserved.worker.worker_id}, the worker that drains soonest for it"
                break
        return starts, preempts, trace

    def _queue(self, view: ClusterView, cycle: Cycle, limit: int | None = None) -> Iterable[JobView]:
        """The cycle's order: :meth:`_ordered`; with a preemption rule that preempts by priority
        (``priority_first``), higher priorities first and the policy's order within a priority.
        Otherwise a job preempted for a higher-priority one, queued again ahead of it by the
        policy's order (aspen's deadlines; its priority weight is 0), took its worker straight back,
        and the two traded it at every checkpoint while the higher-priority job waited.
        ``limit``: at most this many jobs (0: all; None: ``queue_depth``)."""
        depth = self.queue_depth if limit is None else limit
        if self.preempt is None or not getattr(self.preempt, "priority_first", False) or getattr(
                self.order, "by_priority", False):  # fmt: skip
            return self._ordered(view, cycle, depth)
        jobs = sorted(self._ordered(view, cycle), key=lambda j: -j.priority)  # stable: the order within a priority
        return jobs[:depth] if depth else jobs

    def _verdicts(self, job: JobView, cycle: Cycle) -> tuple[WorkerLine, ...]:
        """Every worker's verdict for ``job`` in ``cycle`` as it stands: a reason, or the scores."""
        lines: list[WorkerLine] = []
        for slot in cycle.slots:
            reason = f"held: {cycle.held_why.get(slot.index, 'held')}" if slot.index in cycle.reserved else None
            reason = reason or cycle.fits(job, slot)
            for f in self.filters:
                reason = reason or f.filter(job, slot, cycle)
            if reason:
                lines.append(WorkerLine(slot.worker.worker_id, f"{reason}"))
                continue
            scores = tuple(FactorLine(p.name, p.score(job, slot, cycle), w) for p, w in self.scores)
            lines.append(WorkerLine(slot.worker.worker_id, None, scores, self._score(job, slot, cycle)))
        return tuple(lines)

    def held(self, view: ClusterView) -> dict[str, tuple[str, str]]:
        """The queued jobs a filter that names its workers up front (a
        :class:`~policies.interface.WorkerSubset`: aspen's ``quotas`` and ``gpu_quotas``) keeps off
        some worker as the view stands, each as ``job id -> (filter name, reason)``: the reason is
        the filter's own, the one :meth:`explain` shows for such a worker. Whether the job could
        have started elsewhere is not asked (the caller notes only jobs the cycle left queued); the
        decisions are not changed. Cost: one :class:`Cycle` of the view, then per queued job one
        ``allowed_workers`` call per such filter (and for a job held to some workers, at most that
        many more slots looked at for one it may not use): linear in the queue. A controller pass
        with 10,000 queued jobs can afford it; :meth:`explain` per job could not."""
        subset = self._subset_filters
        if not subset or not view.queued or not view.workers:
            return {}
        cycle = Cycle(view, self.margin)
        cycle.fair_slack_s = self.fair_slack_s
        cycle.filters = self.filters
        out: dict[str, tuple[str, str]] = {}
        for job in view.queued:
            for f in subset:
                allowed = f.allowed_workers(job, cycle)
                if allowed is None:
                    continue
                slot = next((s for s in cycle.slots if s.worker.worker_id not in allowed), None)
                reason = f.filter(job, slot, cycle) if slot is not None else None
                if reason:
                    out[job.job_id] = (getattr(f, "name", type(f).__name__), reason)
                    break
        return out

    def explain(self, view: ClusterView, job_id: str) -> Explanation:
        """The job's priority factors, queue position and, if queued, every worker's verdict as
        this cycle stands when the job's turn comes, and what the cycle decides for it."""
        job = view.find_job(job_id)
        if job is None:
            raise KeyError(f"job {job_id!r} is neither queued nor running")
        factors, priority = self.order.breakdown(job, view)
        if job.is_running:
            return Explanation(job_id, self.name, factors, priority, -1, ())
        _, _, trace = self._cycle(view, job_id)
        if trace.position >= 0:
            return Explanation(job_id, self.name, factors, priority, trace.position, trace.workers, trace.decision)
        cycle = Cycle(view, self.margin)  # not reached this cycle: its verdicts on an untouched cycle
        cycle.fair_slack_s = self.fair_slack_s
        cycle.filters = self.filters
        position = [j.job_id for j in self._queue(view, cycle, 0)].index(job_id)
        why = (f"the cycle stopped at {trace.stopped_at}, which could not start (no backfill)"
               if trace.stopped_at is not None else f"only the first {self.queue_depth} queued jobs are considered")  # fmt: skip
        return Explanation(job_id, self.name, factors, priority, position, self._verdicts(job, cycle),
                           f"not considered this cycle: {why}")  # fmt: skip

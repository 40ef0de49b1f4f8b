"""The built-in plugins: queue orders, priority factors, filters, scores and preemption rules.

Every factor is normalised to [0, 1] and every score to [0, 100], so admin weights compare
like with like (Slurm multifactor priority; kube-scheduler score plugins).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from policies.framework import Cycle, Slot
from policies.interface import FactorLine, PriorityFactor
from policies.snapshot import ClusterView, JobView

# --- queue orders ------------------------------------------------------------------------------


def _sorted_by_keys(queued: Sequence[JobView], keys: list[tuple]) -> list[JobView]:
    return [queued[k[-1]] for k in sorted(keys)]


@dataclass(frozen=True)
class FirstComeFirstServed:
    """Submit time, then job id."""

    def keys(self, queued: Sequence[JobView], view: ClusterView) -> list[tuple[float, str, int]]:
        return [(j.submit_time_s, j.job_id, i) for i, j in enumerate(queued)]

    def order(self, queued: Sequence[JobView], view: ClusterView) -> list[JobView]:
        return _sorted_by_keys(queued, self.keys(queued, view))

    def breakdown(self, job: JobView, view: ClusterView) -> tuple[tuple[FactorLine, ...], float]:
        return (FactorLine("submit_s", job.submit_time_s, 1.0),), -job.submit_time_s


@dataclass(frozen=True)
class StaticPriority:
    """Higher ``priority`` first; first come, first served within a priority."""

    by_priority = True  # the order already puts higher priorities first (see ProfilePolicy._queue)

    def keys(self, queued: Sequence[JobView], view: ClusterView) -> list[tuple[int, float, str, int]]:
        return [(-j.priority, j.submit_time_s, j.job_id, i) for i, j in enumerate(queued)]

    def order(self, queued: Sequence[JobView], view: ClusterView) -> list[JobView]:
        return _sorted_by_keys(queued, self.keys(queued, view))

    def breakdown(self, job: JobView, view: ClusterView) -> tuple[tuple[FactorLine, ...], float]:
        return (FactorLine("priority", float(job.priority), 1.0),), float(job.priority)


@dataclass(frozen=True)
class ShortestRemainingWork:
    """Least ``remaining_work_s`` first; submit time breaks ties."""

    def keys(self, queued: Sequence[JobView], view: ClusterView) -> list[tuple[float, float, str, int]]:
        return [(j.remaining_work_s, j.submit_time_s, j.job_id, i) for i, j in enumerate(queued)]

    def order(self, queued: Sequence[JobView], view: ClusterView) -> list[JobView]:
        return _sorted_by_keys(queued, self.keys(queued, view))

    def breakdown(self, job: JobView, view: ClusterView) -> tuple[tuple[FactorLine, ...], float]:
        return (FactorLine("remaining_s", job.remaining_work_s, 1.0),), -job.remaining_work_s


@dataclass(frozen=True)
class Multifactor:
    """Slurm-style: ``priority = sum(weight_f * factor_f(job))``, highest first, then submit time."""

    factors: tuple[tuple[PriorityFactor, float], ...]

    def _totals(self, jobs: Sequence[JobView], view: ClusterView) -> list[float]:
        totals: list[float] | None = None
        for factor, weight in self.factors:
            if weight:
                values = factor.values(jobs, view)
                if totals is None:
                    totals = [weight * v for v in values]
                else:
                    totals = [t + weight * v for t, v in zip(totals, values, strict=True)]
        return [0.0] * len(jobs) if totals is None else totals

    def keys(self, queued: Sequence[JobView], view: ClusterView) -> list[tuple[float, float, str, int]]:
        totals = self._totals(queued, view)
        return [(-t, j.submit_time_s, j.job_id, i) for i, (t, j) in enumerate(zip(totals, queued, strict=True))]

    def order(self, queued: Sequence[JobView], view: ClusterView) -> list[JobView]:
        return _sorted_by_keys(queued, self.keys(queued, view))

    def top(self, queued: Sequence[JobView], view: ClusterView, k: int) -> list[JobView]:
        """The first ``k`` of :meth:`order` (a partial sort: O(n log k)).

        The ``k``-th largest total is found among plain floats first; only the jobs at or above it
        (``k`` plus ties) get full sort keys, so the result is exactly :meth:`order`'s head.
        """
        if k <= 0:
            return []
        totals = self._totals(queued, view)
        if k >= len(totals):
            return self.order(queued, view)
        cut = heapq.nlargest(k, totals)[-1]
        head = [(-t, queued[i].submit_time_s, queued[i].job_id, i) for i, t in enumerate(totals) if t >= cut]
        head.sort()
        return [queued[key[3]] for key in head[:k]]

    def breakdown(self, job: JobView, view: ClusterView) -> tuple[tuple[FactorLine, ...], float]:
        # Factors normalise over the queue (e.g. priority class), so evaluate the job among it.
        others = [j for j in view.queued if j.job_id != job.job_id]
        jobs = [job, *others]
        lines = tuple(FactorLine(f.name, f.values(jobs, view)[0], w) for f, w in self.factors)
        return lines, sum(line.weighted for line in lines)


# --- priority factors (each in [0, 1]) ---------------------------------------------------------------


@dataclass(frozen=True)
class AgeFactor:
    """``min(1, waited / max_age_s)``: grows while a job waits (Slurm PriorityMaxAge)."""

    max_age_s: float = 4 * 3600.0
    name: str = "age"

    def values(self, jobs: Sequence[JobView], view: ClusterView) -> list[float]:
        now, cap = view.now_s, self.max_age_s
        return [min(1.0, max(0.0, now - j.submit_time_s) / cap) for j in jobs]


@dataclass(frozen=True)
class SizeFactor:
    """``half_s / (half_s + remaining_work_s)``: short jobs near 1, a job of ``half_s`` at 0.5."""

    half_s: float = 3600.0
    name: str = "size"

    def values(self, jobs: Sequence[JobView], view: ClusterView) -> list[float]:
        h = self.half_s
        return [h / (h + j.remaining_work_s) if j.remaining_work_s > 0 else 1.0 for j in jobs]


@dataclass(frozen=True)
class PriorityClassFactor:
    """``(priority - lowest) / (highest - lowest)`` over the queued and running jobs; 0 if all equal."""

    name: str = "priority"

    def values(self, jobs: Sequence[JobView], view: ClusterView) -> list[float]:
        prios = [j.priority for j in jobs] + [j.priority for j in view.running]
        if not prios:
            return []
        lo, hi = min(prios), max(prios)
        if hi == lo:
            return [0.0] * len(jobs)
        span = hi - lo
        return [(j.priority - lo) / span for j in jobs]


@dataclass(frozen=True)
class FairShareFactor:
    """Slurm's classic fair share: ``2 ** -(usage_fraction / share_fraction)``.

    ``usage_fraction``: the owner's part of all GPU-seconds used (``view.owner_usage_s``);
    ``share_fraction``: the owner's ``shares`` (``default_share`` when unlisted) over the shares of
    every owner in the view. An owner who used nothing gets 1; one who used exactly its share 0.5.
    """

    shares: Mapping[str, float] = field(default_factory=dict)
    default_share: float = 1.0
    name: str = "fairshare"

    def values(self, jobs: Sequence[JobView], view: ClusterView) -> list[float]:
        usage = view.owner_usage_s
        owned = [j.owner for j in jobs]
        queued_owners = set(owned)
        owners = queued_owners | {j.owner for j in view.running} | set(usage)
        total_share = sum(self.shares.get(o, self.default_share) for o in owners) or 1.0
        total_use = sum(usage.values())
        cache: dict[str, float] = {}
        for o in queued_owners:
            if total_use <= 0:
                cache[o] = 1.0
                continue
            share = self.shares.get(o, self.default_share) / total_share
            used = usage.get(o, 0.0) / total_use
            cache[o] = 0.0 if share <= 0 else 2.0 ** (-used / share)
        return [cache[o] for o in owned]


# --- filters ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnerQuota:
    """At most ``max_running[owner]`` (else ``default``; None: unlimited) running jobs per owner."""

    max_running: Mapping[str, int] = field(default_factory=dict)
    default: int | None = None
    name: str = "quota"

    def filter(self, job: JobView, slot: Slot, cycle: Cycle) -> str | None:
        cap = self.max_running.get(job.owner, self.default)
        if cap is None:
            return None
        running = cycle.running_by_owner.get(job.owner, 0)
        if running < cap:
            return None
        blocked = "; a quota of 0 lets none start until an admin raises it" if cap == 0 else ""
        return f"owner {job.owner} at quota ({running}/{cap} running{blocked})"

    def allowed_workers(self, job: JobView, cycle: Cycle) -> frozenset[str] | None:
        """No worker when the owner is at quota, else any."""
        cap = self.max_running.get(job.owner, self.default)
        return frozenset() if cap is not None and cycle.running_by_owner.get(job.owner, 0) >= cap else None


@dataclass(frozen=True)
class OwnerGpuQuota:
    """An owner's jobs may occupy at most ``max_workers[owner]`` (else ``default``; None:
    unlimited) distinct workers (GPUs). Joining a worker the owner already occupies adds none, so it
    always passes; a job pending preemption still occupies its worker until it stops. Counts
    include this cycle's starts (``cycle.workers_by_owner``)."""

    max_workers: Mapping[str, int] = field(default_factory=dict)
    default: int | None = None
    name: str = "gpu_quota"

    def filter(self, job: JobView, slot: Slot, cycle: Cycle) -> str | None:
        cap = self.max_workers.get(job.owner, self.default)
        if cap is None:
            return None
        occupied = cycle.workers_by_owner.get(job.owner, ())
        if slot.worker.worker_id in occupied or len(occupied) < cap:
            return None
        blocked = "; a GPU quota of 0 lets none start until an admin raises it" if cap == 0 else ""
        return f"owner {job.owner} at GPU quota ({len(occupied)}/{cap} workers{blocked})"

    def allowed_workers(self, job: JobView, cycle: Cycle) -> frozenset[str] | None:
        """At quota: only the workers the owner occupies; else any."""
        cap = self.max_workers.get(job.owner, self.default)
        occupied = cycle.workers_by_owner.get(job.owner, set())
        return frozenset(occupied) if cap is not None and len(occupied) >= cap else None


@dataclass(frozen=True)
class GroupTokenCap:
    """A busy worker's fused micro-batch may not exceed ``max_tokens`` padded tokens with the job.

    Past the point where the GPU is saturated, joining a group only time-shares it: every job
    of the group slows down. An idle worker always passes.
    """

    max_tokens: int = 16384
    name: str = "token_cap"

    def filter(self, job: JobView, slot: Slot, cycle: Cycle) -> str | None:
        if slot.idle:
            return None
        _, padded = slot.padded_tokens_with(job)
        return f"group would have {padded} tokens > {self.max_tokens}" if padded > self.max_tokens else None


def has_run(job: JobView, now_s: float) -> bool:
    """Running, and started before this instant. Only such a job may be preempted: one started in
    this cycle or at this instant would stop at once (it is at its checkpoint), so a job could be
    started and preempted again and again without time passing (the simulator hung so)."""
    return job.is_running and (job.start_time_s is None or job.start_time_s < now_s)


def class_tail_cut(cycle: Cycle, k: int) -> dict[int, float]:
    """Per priority class, the ``k``-th largest remaining work among the view's queued and running
    jobs (once per cycle and ``k``): jobs at or above it are their class's tail jobs, the ones that
    set its p99 JCT."""
    key = f"tail_cut.{k}"
    cut = cycle.memo.get(key)
    if cut is None:
        by_class: dict[int, list[float]] = {}
        for jobs in (cycle.view.queued, cycle.view.running):
            for j in jobs:
                work = by_class.get(j.priority)
                if work is None:
                    work = by_class[j.priority] = []
                work.append(j.remaining_work_s)
        k = max(1, k)
        cut = cycle.memo[key] = {p: heapq.nlargest(k, work)[-1] for p, work in by_class.items()}
    return cut


@dataclass(frozen=True)
class FusionPays:
    """A busy worker takes the job only when fusing costs at most ``max_cost`` of running it alone.

    Token model of the cost model (:mod:`policies.costmodel`): a fused iteration of ``T`` padded
    tokens takes time proportional to ``T + half_tokens`` (below ``half_tokens`` the GPU is not
    saturated). Alone the job costs ``T_j + h``; joining group ``G`` adds ``T_{G+j} - T_G``
    (its rows, plus the padding of everyone to the longer sequence). With ``max_cost`` 1 a job
    joins only where fusion is no dearer than a worker of its own. An idle worker always passes.

    ``pressure_slowdown`` (None: off): an urgent job joins only a group whose fused step is within
    that many times its own, and no job joins a group so that the step exceeds that many times the
    own step of a member started at its FIFO-fair deadline. Urgent jobs are otherwise exempt
    (``urgent_exempt``).

    ``tail_delay_s`` (None: off) protects the jobs that set their class's p99: a running member
    whose remaining work is among the ``tail_jobs`` largest of its priority class (queued and
    running jobs of the view) accepts a newcomer, urgent or not, only if the fused step adds at
    most ``tail_delay_s`` to its remaining run: ``remaining x (step / own - 1) <= tail_delay_s``,
    i.e. ``step <= own x (1 + tail_delay_s / remaining)`` (own step ``B x L + half_tokens``). The
    newcomer's own slowdown is not capped by it (joining beats waiting for an idle worker).

    ``tail_ceiling`` (None: off) bounds every member's JCT, urgent newcomer or not: a newcomer may
    join only if each stamped member's projected JCT, ``now - submit + remaining x step / own`` at
    the fused step with the newcomer, stays within ``tail_ceiling`` x the member's own FIFO-fair
    JCT (``fair_start_s - submit_time_s + total_work_s``: what its deadline allows, at least
    ``tail_share`` x its class's FIFO p99 estimate). It catches what the rank-based
    ``tail_delay_s`` misses: urgent jobs piling onto a group of jobs that are not their class's
    longest but would end above its p99 (100 jobs, seed 23: two 4.5-5.2 h jobs ran 12-13 h). The
    bound was the class's largest FIFO-fair JCT in the view until 2026-11-29 (docs/policies-history.md,
    "deadlines that follow the class tail": every #5 target on 800 instead of 761 of 1,000 traces).
    """

    half_tokens: float = 2048.0
    max_cost: float | None = 1.0
    max_slowdown: float | None = None
    urgent_exempt: bool = True
    pressure_slowdown: float | None = None
    tail_delay_s: float | None = None
    tail_jobs: int = 2
    tail_ceiling: float | None = None
    name: str = "fusion_pays"

    def _over_ceiling(self, slot: Slot, cycle: Cycle, step: float) -> JobView | None:
        """The first member whose projected JCT at fused ``step`` exceeds ``tail_ceiling`` x its own
        FIFO-fair JCT (unstamped members are not bounded)."""
        now, h, scale = cycle.view.now_s, self.half_tokens, self.tail_ceiling
        for m in slot.jobs:
            if m.fair_start_s is None or m.remaining_work_s <= 0:
                continue
            fair = m.fair_start_s - m.submit_time_s + m.total_work_s
            if now - m.submit_time_s + m.remaining_work_s * step / (m.micro_batch_size * m.seq_len + h) > scale * fair:
                return m
        return None

    def _ceiling_bound(self, slot: Slot, cycle: Cycle) -> float:
        """The fused step (tokens) at which a member's projected JCT reaches ``tail_ceiling`` x its
        FIFO-fair JCT, least over the members (once per group state; :meth:`_over_ceiling` confirms
        a step at or above it exactly)."""
        bound = slot.memo.get("fusion_pays.ceiling")
        if bound is None:
            now, h, scale = cycle.view.now_s, self.half_tokens, self.tail_ceiling or 0.0
            bound = float("inf")
            for m in slot.jobs:
                r = m.remaining_work_s
                if m.fair_start_s is None or r <= 0:
                    continue
                room = scale * (m.fair_start_s - m.submit_time_s + m.total_work_s) - (now - m.submit_time_s)
                b = room * (m.micro_batch_size * m.seq_len + h) / r
                if b < bound:
                    bound = b
            slot.memo["fusion_pays.ceiling"] = bound
        return bound

    def tail_cut(self, cycle: Cycle) -> dict[int, float]:
        """Per priority class, the ``tail_jobs``-th largest remaining work (:func:`class_tail_cut`)."""
        return class_tail_cut(cycle, self.tail_jobs)

    def _tail_bound(self, slot: Slot, cycle: Cycle, delay: float) -> float:
        """The largest fused step (tokens) the group's tail members tolerate (inf: none)."""
        bound = slot.memo.get("fusion_pays.tail_bound")
        if bound is None:
            cut, h = self.tail_cut(cycle), self.half_tokens
            bound = slot.memo["fusion_pays.tail_bound"] = min(
                ((j.micro_batch_size * j.seq_len + h) * (1.0 + delay / j.remaining_work_s) for j in slot.jobs
                 if j.remaining_work_s > 0 and j.remaining_work_s >= cut.get(j.priority, 0.0)),
                default=float("inf"))  # fmt: skip
        return bound

    def filter(self, job: JobView, slot: Slot, cycle: Cycle) -> str | None:
        if slot.idle:
            return None
        lp = slot.lmax if slot.lmax > job.seq_len else job.seq_len
        urgent = job.job_id in cycle.urgent
        delay = self.tail_delay_s
        if delay is not None:
            step = (slot.rows + job.micro_batch_size) * lp + self.half_tokens
            if step > self._tail_bound(slot, cycle, delay):
                return f"fused step {step:.0f} tokens would delay a tail member by more than {delay:g} s"
        if self.tail_ceiling is not None:
            step = (slot.rows + job.micro_batch_size) * lp + self.half_tokens
            bound = self._ceiling_bound(slot, cycle)
            member = self._over_ceiling(slot, cycle, step) if step >= bound - 1e-9 * (1.0 + abs(bound)) else None
            if member is not None:
                return f"fused step {step:.0f} tokens would end {member.job_id} past its FIFO-fair JCT"
        cap = self.pressure_slowdown
        if cap is not None:
            step = (slot.rows + job.micro_batch_size) * lp + self.half_tokens
            if urgent and step > cap * (job.micro_batch_size * job.seq_len + self.half_tokens):
                return f"urgent: fused step {step:.0f} tokens > {cap:g} x its own"
            least = slot.memo.get("fusion_pays.pressured")
            if least is None:  # the fewest own tokens among members started at their deadline
                least = slot.memo["fusion_pays.pressured"] = min(
                    (j.micro_batch_size * j.seq_len for j in slot.jobs if _pressured(j, cycle)), default=-1)
            if least >= 0 and step > cap * (least + self.half_tokens):
                return f"fused step {step:.0f} tokens > {cap:g} x a deadline member's own"
        if urgent and self.urgent_exempt:
            return None
        added = (slot.rows + job.micro_batch_size) * lp - slot.rows * slot.lmax
        alone = job.micro_batch_size * job.seq_len + self.half_tokens
        if self.max_cost is not None and added > self.max_cost * alone:
            return f"fusing adds {added} tokens/step > {self.max_cost:g} x {alone:.0f} alone"
        if self.max_slowdown is not None:
            step = (slot.rows + job.micro_batch_size) * lp + self.half_tokens
            key = ("fusion_pays.long_tokens", cycle.backlog_s)
            least = slot.memo.get(key)
            if least is None:  # the fewest own tokens among the group's long members (inf: none)
                long_tokens = [j.micro_batch_size * j.seq_len for j in slot.jobs if j.remaining_work_s >= cycle.backlog_s]
                least = slot.memo[key] = min(long_tokens, default=float("inf"))
            if job.remaining_work_s >= cycle.backlog_s:
                least = min(least, job.micro_batch_size * job.seq_len)
            if least == float("inf"):
                return None
            least += self.half_tokens
            if step > self.max_slowdown * least:
                return f"fused step {step:.0f} tokens > {self.max_slowdown:g} x a member's own {least:.0f}"
        return None


def _pressured(job: JobView, cycle: Cycle) -> bool:
    """A running job started at or after its FIFO-fair start deadline (less the slack)."""
    fs = cycle.fair_slack_s
    return (fs is not None and job.fair_start_s is not None and job.start_time_s is not None
            and job.start_time_s >= job.fair_start_s - fs)  # fmt: skip


# --- scores (each in [0, 100]) ------------------------------------------------------------------------


@dataclass(frozen=True)
class MostFreeMemory:
    """``100 * free_after / capacity``: spreads jobs (kube's LeastAllocated)."""

    name: str = "free_memory"

    def score(self, job: JobView, slot: Slot, cycle: Cycle) -> float:
        cap = slot.worker.memory_bytes
        return max(0.0, 100.0 * (cap - slot.peak_with(job, cycle.margin)) / cap)


@dataclass(frozen=True)
class ModelLocality:
    """100 when the worker already holds the job's base model (no load), else 0."""

    name: str = "locality"

    def score(self, job: JobView, slot: Slot, cycle: Cycle) -> float:
        return 100.0 if slot.worker.loaded_model == job.base_model else 0.0


@dataclass(frozen=True)
class LengthAffinity:
    """``100 * useful / padded`` tokens of the fused micro-batch with the job added (100: no padding)."""

    name: str = "length"

    def score(self, job: JobView, slot: Slot, cycle: Cycle) -> float:
        useful, padded = slot.padded_tokens_with(job)
        return 100.0 * useful / padded


@dataclass(frozen=True)
class LeastLoaded:
    """``100 * job_tokens / group_padded_tokens``: the job's share of the fused step (100: alone)."""

    name: str = "load"

    def score(self, job: JobView, slot: Slot, cycle: Cycle) -> float:
        lp = max(slot.lmax, job.seq_len)
        return 100.0 * job.micro_batch_size / (slot.rows + job.micro_batch_size) * job.seq_len / lp


@dataclass(frozen=True)
class FusionCost:
    """``100 * alone / (own + members * added)``: 100 on an idle worker; lower the more the job's
    fused step costs itself and slows the group's members (token model of :class:`FusionPays`)."""

    half_tokens: float = 2048.0
    name: str = "fusion"

    def score(self, job: JobView, slot: Slot, cycle: Cycle) -> float:
        if slot.idle:
            return 100.0
        h = self.half_tokens
        lp = slot.lmax if slot.lmax > job.seq_len else job.seq_len
        rows = slot.rows + job.micro_batch_size
        added = rows * lp - slot.rows * slot.lmax
        own = rows * lp + h
        return 100.0 * (job.micro_batch_size * job.seq_len + h) / (own + len(slot.jobs) * added)


# --- preemption -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LowerPriorityPreemption:
    """Preempt strictly lower-priority running jobs so that ``job`` fits on one worker: its memory
    and the policy's filters (before 2026-12-07 memory only, so under aspen a job blocked by its
    fusion rules or a token cap never preempted).

    Nothing is preempted when the jobs already pending preemption will make room. Otherwise, on
    each accepting worker, victims are taken lowest priority first (latest started first among
    equals) until the job fits (a worker of another model must be emptied entirely); the worker
    needing the fewest victims wins (ties: lowest index). No worker possible: no victims. A job
    started in this cycle, or at this instant (``start_time_s == now``), is never a victim: it has
    made no progress, and preempting it would let two jobs trade a worker forever at one instant.
    The engine holds the victims' worker (:meth:`Cycle.hold`) so that no other job refills the room.
    """

    min_priority_gap: int = 1
    priority_first = True  # the queue puts higher priorities first: the freed room goes to the job it was freed for

    def victims(self, job: JobView, cycle: Cycle) -> list[str]:
        pending, now = cycle.pending, cycle.view.now_s
        best: list[str] | None = None
        for slot in cycle.slots:
            if not slot.worker.accepting:
                continue
            keep = [j for j in slot.jobs if j.job_id not in pending]
            if self._fits(job, slot, keep, cycle):
                return []  # pending preemptions will make room: wait for them
            lower = [j for j in keep if j.priority <= job.priority - self.min_priority_gap and has_run(j, now)]
            lower.sort(key=lambda j: (j.priority, -(j.start_time_s or 0.0), j.job_id))
            chosen: list[str] = []
            for victim in lower:
                keep = [j for j in keep if j.job_id != victim.job_id]
                chosen.append(victim.job_id)
                if self._fits(job, slot, keep, cycle):
                    if best is None or len(chosen) < len(best):
                        best = list(chosen)
                    break
        return best or []

    @staticmethod
    def _fits(job: JobView, slot: Slot, keep: list[JobView], cycle: Cycle) -> bool:
        """``job`` fits beside ``keep`` on ``slot``'s worker: memory, and the policy's filters
        (``cycle.filters``: aspen's fusion rules or a token cap can block a job that has the memory;
        a filter that does not depend on the group, such as the owner's quota, never passes by preempting)."""
        if keep and keep[0].base_model != job.base_model:
            return False
        trial = Slot(slot.worker, slot.index, keep)
        if trial.peak_with(job, cycle.margin) > slot.worker.memory_bytes:
            return False
        return all(f.filter(job, trial, cycle) is None for f in cycle.filters)



@dataclass(frozen=True)
class ShortJobTurns:
    """A short job that has waited long for a worker gets a turn on one, at its group's next checkpoint.

    A job can only start on an idle worker or one training its own base model, so with more base
    models than free workers a job of a few minutes can wait hours for long groups of other models
    to drain (150 jobs / seed 204: jobs under 15 minutes waited 44 minutes on average under aspen).
    Fusion cannot help it; a turn does. A queued job is *due* when its remaining work is at most
    ``max_work_s`` and it has waited ``max(min_wait_s, wait_factor x its work)``. Due jobs go first
    in the queue (shortest first, before the tail guard's urgent jobs) and, blocked, may preempt
    the whole group of one busy worker (:meth:`victims`), which then stops at its next checkpoint
    and takes no other job until it has (the engine's hold); the due job takes the worker, and the
    preempted jobs are queued again with their progress.

    A group may be preempted only if every member has run since it started (:func:`has_run`), is not pending
    preemption, has at least ``min_victim_s`` of work left (a group about to finish is waited
    for), is not among the ``tail_jobs`` longest of its priority class (:func:`class_tail_cut`:
    the jobs that set the class's p99), and keeps, after waiting ``delay_s`` plus the due job's
    work, a projected JCT within ``own_slack`` x its own FIFO-fair JCT (``fair_start_s -
    submit_time_s + total_work_s``; unstamped jobs are never preempted); and the due job must fit
    on the emptied worker. Among such workers the one with the fewest members wins (ties: the
    most work left in its shortest member, then the lowest index). One turn at a time: nothing is
    preempted while another preemption is pending.

    Measured (docs/policies-history.md, "The change before: turns"): on 160 traces no choice had seen, every #5 target on 113
    instead of 104 (mean JCT met on 126 instead of 115, class p99 141 instead of 144), about 3-4
    preemptions per trace of 100-400 jobs then; since the simulator wakes the policy on waiting time
    as the controller does (2026-12-07), about one per 15-20 jobs (docs/admin.md).
    """

    max_work_s: float = 600.0
    min_wait_s: float = 300.0
    wait_factor: float = 2.0
    min_victim_s: float = 1800.0
    tail_jobs: int = 2
    own_slack: float = 0.8
    delay_s: float = 600.0
    name: str = "turns"

    def due(self, job: JobView, now_s: float) -> bool:
        """Queued, short, and waited long enough for a turn."""
        work = job.remaining_work_s
        return (job.worker_id is None and work <= self.max_work_s
                and now_s - job.submit_time_s >= max(self.min_wait_s, self.wait_factor * work))  # fmt: skip

    def due_at(self, job: JobView) -> float | None:
        """When the queued ``job`` becomes due (:meth:`due`), or None when it never will (too long)."""
        work = job.remaining_work_s
        if work > self.max_work_s:
            return None
        return job.submit_time_s + max(self.min_wait_s, self.wait_factor * work)

    def victims(self, job: JobView, cycle: Cycle) -> list[str]:
        """The members of the busy worker the due ``job`` may take (empty: none, or not due)."""
        view = cycle.view
        now = view.now_s
        if not self.due(job, now) or cycle.pending:
            return []
        cut = class_tail_cut(cycle, self.tail_jobs)
        delay = self.delay_s + job.remaining_work_s
        best: tuple[tuple[int, float, int], Slot] | None = None
        for slot in cycle.slots:
            if not slot.jobs or not slot.worker.accepting or slot.index in cycle.reserved:
                continue
            members = slot.jobs
            if not all(self._may_yield(m, now, delay, cut) for m in members):
                continue
            if Slot(slot.worker, slot.index, ()).peak_with(job, cycle.margin) > slot.worker.memory_bytes:
                continue
            key = (len(members), -min(m.remaining_work_s for m in members), slot.index)
            if best is None or key < best[0]:
                best = (key, slot)
        return [] if best is None else [m.job_id for m in best[1].jobs]

    def _may_yield(self, m: JobView, now: float, delay: float, cut: Mapping[int, float]) -> bool:
        if not has_run(m, now) or m.preempt_pending or m.fair_start_s is None:
            return False
        if m.remaining_work_s < self.min_victim_s or m.remaining_work_s >= cut.get(m.priority, float("inf")):
            return False
        fair_jct = m.fair_start_s - m.submit_time_s + m.total_work_s
        return now - m.submit_time_s + m.remaining_work_s + delay <= self.own_slack * fair_jct

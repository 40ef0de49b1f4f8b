"""Discrete-event replay of a trace on a described cluster, driving any :class:`Policy`.

The simulator keeps its own mutable state, builds a :class:`ClusterView` at every event (a job
arrives, finishes, reaches the checkpoint it was preempted at, a worker comes back after an
OOM) and, while jobs wait, whenever a rule could fire on waiting time alone (turns, deadlines: the
controller's loop runs every 0.5 s and sees those at once), asks the policy for decisions and
applies them. A policy says when with an optional ``wake_at(view)`` (the built-ins do:
:meth:`policies.framework.ProfilePolicy.wake_at`, at the next such threshold and at least every
minute for aspen, never for fifo, priority and sjf, whose rules do not read the clock); one
without it runs every ``tick_s`` (10 s) while jobs wait. Between events every worker's group runs
fused iterations at the cost model's rate (:mod:`policies.costmodel`); each job advances one
micro-batch per iteration.

Accounting rules:

* **Load.** Workers start empty. Starting a job on an idle worker that holds another (or no)
  base model loads it first: the group makes no progress for ``cost.load_time_s(model)``.
* **Memory truth and OOM.** Policies see the memory model's prediction (analytic activation
  estimate plus exact adapter bytes, and the model's loss-head bytes per token), the same one the
  controller hands them. A group's peak is
  :func:`policies.memory_model.fused_group_peak_bytes` (rows padded to the longest, the largest
  ``b0`` once, the loss head at each job's own length; with the cluster's ``packing: true`` every
  job at its own length, no padding, in memory and step time alike), the prediction ``lorafleet estimate``
  and the profiler make and the one measured on the engine. The *true* adapter and activation
  coefficients of job j are its predicted ones times ``1 + e_j``, ``e_j`` uniform in
  ``[-memory_noise, +memory_noise]`` drawn from ``(seed, job_id)``: the prediction error that a
  margin exists for. When a Start makes a group's true peak exceed
  the worker's memory, the group's next step fails: one OOM is counted, every job of the group
  rolls back to its last checkpoint and is queued again, and the worker restarts (empty, no model
  loaded, not accepting for ``oom_restart_s``). The jobs' predictions are then corrected to the
  truth (the controller re-profiles after an OOM), so the same mistake is not repeated.
* **Checkpoints** every ``cluster.checkpoint_every_steps`` optimizer steps. ``Preempt`` lets the
  job run to its next checkpoint, then queues it with that progress kept.
* **Usage** for fair share: a worker's busy time is split across its group by rows.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from policies.catalogue import canonical, known_names
from policies.cluster import ClusterSpec
from policies.costmodel import Member
from policies.decisions import InvalidSchedule, check_decisions, decision_list, raised_at
from policies.fairstart import FifoClock, clock_settings
from policies.interface import Policy, Start
from policies.memory_model import (
    PACK_ANY_LENGTH,
    ActivationFit,
    adapter_bytes,
    adapter_param_count,
    analytic_activation,
    fused_group_peak_bytes,
    loss_head_bytes_per_token,
    static_bytes,
)
from policies.snapshot import ClusterView, JobView, WorkerView
from policies.trace import TraceJob

EPS = 1e-9
#: seconds between the runs of a policy without ``wake_at`` while jobs wait and nothing else happens
#: (the controller's loop runs every 0.5 s; for aspen, 10 s gave the results of 2 s, to 0.001 of the
#: mean, on the four traces compared)
TICK_S = 10.0
#: wake-ups in a row with nothing running or arriving and no decision before the replay is a stall
#: (aspen wakes at least every minute: 1,000 of them is over 16 h of an idle cluster)
IDLE_WAKES = 1000


class SimulationError(RuntimeError):
    """The trace cannot be simulated (unknown model, a job too big for every worker) or a policy
    returned an invalid decision or stalled; the message says which job/worker/decision."""


@dataclass
class JobRecord:
    """The outcome of one job."""

    job_id: str
    owner: str
    priority: int
    submit_s: float
    first_start_s: float
    finish_s: float
    solo_s: float  # load + all iterations alone on the fastest worker it fits on
    run_s: float = 0.0  # all iterations alone on that worker, no load: no policy finishes the job sooner

    @property
    def jct_s(self) -> float:
        return self.finish_s - self.submit_s

    @property
    def queue_s(self) -> float:
        return self.first_start_s - self.submit_s


@dataclass
class SimResult:
    policy: str
    jobs: list[JobRecord]
    num_workers: int
    busy_s: float  # worker-seconds spent computing
    oom_count: int
    preemptions: int
    useful_tokens: float = 0.0  # tokens of real rows processed (per iteration summed)
    padded_tokens: float = 0.0  # tokens including padding to the group's longest row
    decisions_s: list[float] = field(default_factory=list)
    #: workers with too little memory for every job of the trace, even alone: they run nothing
    #: (left out of utilisation and the SRPT reference; ``lorafleet simulate`` names them)
    unusable_workers: tuple[str, ...] = ()

    @property
    def usable_workers(self) -> int:
        """Workers at least one job of the trace fits on alone."""
        return self.num_workers - len(self.unusable_workers)


class _Job:
    __slots__ = ("adapter_bytes", "adapter_params", "ckpt_iters", "done", "fifo_wait", "finish", "first_start", "head",
                 "iter_ref_s", "model", "pred_act", "pred_adapter", "preempt_pending", "solo_need", "solo_peak", "solo_s", "start",
                 "static", "t", "total", "true_act", "true_adapter", "view_memo", "worker")  # fmt: skip


class _Worker:
    __slots__ = ("device", "down_until", "iter_s", "jobs", "loaded", "memory", "ready_at", "tflops", "version", "wid")

    def __init__(self, wid: str, memory: int, tflops: float, device: str):
        self.wid, self.memory, self.tflops, self.device = wid, memory, tflops, device
        self.loaded: str | None = None
        self.jobs: list[_Job] = []
        self.ready_at = 0.0
        self.down_until = 0.0
        self.iter_s = 0.0
        self.version = 0


class Simulator:
    """One run of one policy over one trace. Use :func:`simulate`."""

    def __init__(self, trace: Sequence[TraceJob], cluster: ClusterSpec, policy: Policy, *, seed: int = 0,
                 memory_noise: float = 0.10, oom_restart_s: float = 30.0, tick_s: float = TICK_S):  # fmt: skip
        if not 0 <= memory_noise < 1:
            raise SimulationError(f"memory_noise: must be in [0, 1) (got {memory_noise})")
        if not (tick_s > 0 or tick_s == 0):
            raise SimulationError(f"tick_s: must be >= 0 (got {tick_s})")
        self.cluster, self.policy, self.cost = cluster, policy, cluster.cost
        self.oom_restart_s = oom_restart_s
        self.tick_s = tick_s
        self.workers = [_Worker(*w) for w in cluster.worker_list()]
        self.by_wid = {w.wid: w for w in self.workers}
        # Times run from the first submission (Unix-epoch submit times keep their precision: at 1.7e9 s
        # the spacing of floats is 2.4e-7 s) and are given back in the trace's own time in the records.
        self.t0 = min((t.submit_time_s for t in trace), default=0.0)
        self.jobs: dict[str, _Job] = {}
        for t in trace:
            name = canonical(t.base_model, cluster.models)
            if name is None:
                raise SimulationError(
                    f"job {t.job_id}: base_model {t.base_model!r} is neither in the cluster's models nor in the "
                    f"catalogue (known: {', '.join(known_names(cluster.models))}; hub ids of these are aliases)")
            t = replace(t, submit_time_s=t.submit_time_s - self.t0, base_model=name)
            self.jobs[t.job_id] = self._make_job(t, seed, memory_noise)
        # a worker smaller than every job's peak alone never runs anything (the same test as above)
        smallest = min((j.solo_peak for j in self.jobs.values()), default=None)
        self.unusable = tuple(w.wid for w in self.workers if smallest is not None and w.memory < smallest)
        # books arrivals (each on a server with the memory for it alone) and gives each job its
        # FIFO-fair start deadline
        self.clock = FifoClock.of_servers([w.memory for w in self.workers], **clock_settings(policy))
        self.arrivals = sorted(self.jobs.values(), key=lambda j: (j.t.submit_time_s, j.t.job_id))
        self.queued: dict[str, _Job] = {}
        self.usage: dict[str, float] = {}
        self.events: list[tuple[float, int, str]] = []  # (time, version, worker id)
        self.now = 0.0
        self.busy_s = 0.0
        self.useful_tokens = 0.0
        self.padded_tokens = 0.0
        self.oom_count = 0
        self.preemptions = 0
        self.finished: list[JobRecord] = []

    def _make_job(self, t: TraceJob, seed: int, noise: float) -> _Job:
        model = self.cluster.model(t.base_model)
        assert model is not None  # canonical names only (__init__)
        shape = t.adapter_shape()
        j = _Job()
        j.t, j.model, j.worker = t, model, None
        j.static = static_bytes(model)
        j.head = loss_head_bytes_per_token(model)
        j.adapter_params = adapter_param_count(model, shape)
        j.pred_adapter = adapter_bytes(model, shape)
        j.pred_act = analytic_activation(model, shape)
        factor = 1.0 + random.Random(f"{seed}:{t.job_id}").uniform(-noise, noise)
        j.true_adapter = j.pred_adapter * factor
        j.true_act = j.pred_act.scaled(factor)
        j.total = t.iterations
        j.ckpt_iters = self.cluster.checkpoint_every_steps * (t.batch_size // t.micro_batch_size)
        j.done = 0.0
        j.fifo_wait = None  # the FIFO clock's wait estimate, booked on arrival
        # its predicted peak alone: the FIFO clock books it only on workers with that much memory
        j.solo_need = fused_group_peak_bytes(j.static, [(j.pred_adapter, j.pred_act, t.micro_batch_size, t.seq_len)],
                                             0.0)  # fmt: skip
        j.start = j.first_start = j.finish = None
        j.preempt_pending = False
        j.view_memo = None  # (what the view depends on, the view): a queued job's view is rebuilt only on change
        solo_peak = fused_group_peak_bytes(j.static, [(j.true_adapter, j.true_act, t.micro_batch_size, t.seq_len)], 0.0)
        j.solo_peak = solo_peak
        biggest = max(w.memory for w in self.workers)
        if solo_peak > biggest:
            raise SimulationError(f"job {t.job_id}: needs {solo_peak / 2**30:.1f} GiB alone, more than any "
                                  f"worker has ({biggest / 2**30:.1f} GiB)")  # fmt: skip
        # its reference speed (solo time, the floor, finish-time fairness): the fastest worker it fits on
        # alone, not a faster one too small to hold it
        fastest = max(w.tflops for w in self.workers if solo_peak <= w.memory)
        member = Member(t.micro_batch_size, t.seq_len, j.adapter_params)
        j.iter_ref_s = self.cost.iteration_time_s(model, [member], fastest)
        j.solo_s = self.cost.load_time_s(model) + j.total * j.iter_ref_s
        # the prediction alone with the policy's margin (0 for fifo, priority, sjf and a policy without
        # one): every built-in policy passes over a job it says fits nowhere, so the replay would only
        # end in a stall (the true peak above may fit where the prediction does not)
        margin = getattr(self.policy, "margin", 0.0)
        if isinstance(margin, int | float) and not isinstance(margin, bool) and margin >= 0:
            need = j.static + (1.0 + margin) * (j.solo_need - j.static)
            if need > biggest:
                name = self.policy.name
                with_margin, lower = (f" with {name}'s margin {margin:g}", "the policy's margin, or ") if margin else ("", "")
                raise SimulationError(
                    f"job {t.job_id}: predicted peak alone {need / 2**30:.1f} GiB{with_margin}, more than any worker "
                    f"has ({biggest / 2**30:.1f} GiB): {name} would pass it over for good (a live cluster leaves it "
                    f"queued); lower {lower}the job's micro_batch_size or seq_len")  # fmt: skip
        return j

    # --- views ----------------------------------------------------------------------------------

    def _job_view(self, j: _Job, tails: dict[int, float | None] | None = None) -> JobView:
        """``tails``: the clock's class tails of this view, looked up once per class."""
        t = j.t
        if tails is None:
            tails = {}
        if t.priority not in tails:
            tails[t.priority] = self.clock.tail(t.priority)
        tail = tails[t.priority]
        # Every cycle views every queued job, and a long queue's jobs mostly wait unchanged: reuse
        # the view while nothing it shows has changed (a large trace spent most of its time here).
        key = (tail, j.fifo_wait, j.done, j.worker, j.start, j.preempt_pending, j.pred_adapter, j.pred_act)
        memo = j.view_memo
        if memo is not None and memo[0] == key:
            return memo[1]
        # The FIFO-fair deadline with the class's tail as estimated now (policies.fairstart).
        fair = (None if j.fifo_wait is None or tail is None
                else self.clock.deadline_at(t.submit_time_s, j.fifo_wait, j.solo_s, tail))  # fmt: skip
        view = JobView(t.job_id, t.owner, t.priority, t.submit_time_s, t.base_model, j.static,
                       math.ceil(j.pred_adapter), j.pred_act, t.micro_batch_size, t.seq_len,
                       (j.total - j.done) * j.iter_ref_s, j.total * j.iter_ref_s,
                       j.worker.wid if j.worker else None, j.start, j.preempt_pending, fair,
                       j.head)  # fmt: skip
        j.view_memo = (key, view)
        return view

    def view(self) -> ClusterView:
        """The snapshot the policy sees now."""
        running = [j for w in self.workers for j in w.jobs]
        packing_max_len = PACK_ANY_LENGTH if self.cluster.packing else 0
        workers = tuple(
            WorkerView(w.wid, w.memory, w.tflops, w.loaded, tuple(j.t.job_id for j in w.jobs),
                       accepting=w.down_until <= self.now, packing_max_len=packing_max_len)
            for w in self.workers
        )
        tails: dict[int, float | None] = {}
        queued = tuple(self._job_view(j, tails) for j in self.queued.values())
        return ClusterView(self.now, queued, tuple(self._job_view(j, tails) for j in running), workers,
                           dict(self.usage))  # fmt: skip

    # --- time -----------------------------------------------------------------------------------

    def _target(self, j: _Job) -> float:
        if not j.preempt_pending:
            return j.total
        return min(j.total, math.ceil(j.done / j.ckpt_iters - EPS) * j.ckpt_iters)

    def _reschedule(self, w: _Worker) -> None:
        """Recompute the group's iteration time and push the worker's next event."""
        w.version += 1
        if not w.jobs:
            w.iter_s = 0.0
            if w.down_until > self.now:
                heapq.heappush(self.events, (w.down_until, w.version, w.wid))
            return
        members = [Member(j.t.micro_batch_size, j.t.seq_len, j.adapter_params) for j in w.jobs]
        w.iter_s = self.cost.iteration_time_s(w.jobs[0].model, members, w.tflops, self.cluster.packing)
        begin = max(self.now, w.ready_at)
        left = min(self._target(j) - j.done for j in w.jobs)
        heapq.heappush(self.events, (begin + max(0.0, left) * w.iter_s, w.version, w.wid))

    def _advance(self, t1: float) -> None:
        for w in self.workers:
            if not w.jobs:
                continue
            dt = t1 - max(self.now, w.ready_at)
            if dt <= 0:
                continue
            self.busy_s += dt
            iters = dt / w.iter_s
            rows = sum(j.t.micro_batch_size for j in w.jobs)
            useful = sum(j.t.micro_batch_size * j.t.seq_len for j in w.jobs)
            self.padded_tokens += iters * (useful if self.cluster.packing else rows * max(j.t.seq_len for j in w.jobs))
            self.useful_tokens += iters * useful
            for j in w.jobs:
                j.done = min(self._target(j), j.done + iters)
                self.usage[j.t.owner] = self.usage.get(j.t.owner, 0.0) + dt * j.t.micro_batch_size / rows
        self.now = t1

    def _worker_event(self, w: _Worker) -> None:
        still = []
        for j in w.jobs:
            left = self._target(j) - j.done
            # at its target: within 1e-6 iterations, or what is left is too short to move the clock
            # at all (at Unix-epoch times the spacing of floats is 2.4e-7 s: it would never come)
            if left <= 1e-6 or self.now + left * w.iter_s <= self.now:
                if j.done >= j.total - 1e-6 or self._target(j) >= j.total:
                    j.done = j.total
                    j.finish = self.now
                    t0 = self.t0  # back to the trace's own time
                    self.finished.append(JobRecord(j.t.job_id, j.t.owner, j.t.priority, j.t.submit_time_s + t0,
                                                   j.first_start + t0, self.now + t0, j.solo_s,
                                                   j.total * j.iter_ref_s))  # fmt: skip
                else:  # reached the checkpoint it was preempted at
                    j.done = self._target(j)
                    self._requeue(j)
                j.worker = None
            else:
                still.append(j)
        w.jobs = still

    def _requeue(self, j: _Job) -> None:
        j.worker, j.start, j.preempt_pending = None, None, False
        self.queued[j.t.job_id] = j

    # --- decisions ----------------------------------------------------------------------------

    def _apply(self, decisions: list) -> None:
        """Apply decisions that :func:`policies.decisions.check_decisions` passed on this instant's view."""
        touched: list[_Worker] = []
        for d in decisions:
            if isinstance(d, Start):
                j, w = self.queued.pop(d.job_id), self.by_wid[d.worker_id]
                if not w.jobs:
                    w.ready_at = self.now
                    if w.loaded != j.t.base_model:
                        w.loaded = j.t.base_model
                        w.ready_at = self.now + self.cost.load_time_s(j.model)
                j.worker, j.start = w, self.now
                if j.first_start is None:
                    j.first_start = self.now
                w.jobs.append(j)
                if w not in touched:
                    touched.append(w)
            else:  # Preempt
                j = self.jobs[d.job_id]
                if not j.preempt_pending:
                    j.preempt_pending = True
                    self.preemptions += 1
                    if j.worker not in touched:
                        touched.append(j.worker)
        for w in touched:
            self._check_memory(w)
            self._reschedule(w)

    def _start_problem(self, job_id: str, worker_id: str) -> str:
        """Why a Start names no queued job or no worker: each part that is wrong."""
        problems = []
        if job_id not in self.queued:
            j = self.jobs.get(job_id)
            if j is None:
                problems.append(f"no job {job_id!r} in the trace")
            elif j.worker is not None:
                problems.append(f"job {job_id} is already running on {j.worker.wid}")
            elif j.finish is not None:
                problems.append(f"job {job_id} has finished")
            else:
                problems.append(f"job {job_id} has not arrived yet (submit time {j.t.submit_time_s:.0f}s)")
        if worker_id not in self.by_wid:
            ids = list(self.by_wid)
            shown = ", ".join(ids[:3]) + (f", ..., {ids[-1]}" if len(ids) > 3 else "")
            problems.append(f"no worker {worker_id!r} (workers: {shown})")
        return "; ".join(problems)

    def _check_memory(self, w: _Worker) -> None:
        if not w.jobs:
            return
        rows = [(j.true_adapter, j.true_act, j.t.micro_batch_size, j.t.seq_len) for j in w.jobs]
        peak = fused_group_peak_bytes(w.jobs[0].static, rows, 0.0, w.jobs[0].head, packed=self.cluster.packing)
        if peak <= w.memory:
            return
        self.oom_count += 1
        for j in w.jobs:
            if j.done <= EPS and j.first_start == j.start:
                j.first_start = None  # its first start failed at once: it is still waiting to run (queue delay)
            j.done = math.floor(j.done / j.ckpt_iters + EPS) * j.ckpt_iters
            j.pred_adapter = max(j.pred_adapter, j.true_adapter)
            j.pred_act = ActivationFit(max(j.pred_act.b0, j.true_act.b0), max(j.pred_act.b1, j.true_act.b1),
                                       max(j.pred_act.b2, j.true_act.b2))  # fmt: skip
            self._requeue(j)
        w.jobs, w.loaded = [], None
        w.down_until = self.now + self.oom_restart_s

    # --- main loop --------------------------------------------------------------------------------

    def run(self, *, time_decisions: bool = False) -> SimResult:
        """Replay the whole trace. Raises SimulationError on an invalid decision or a stall."""
        import time

        timings: list[float] = []
        next_arrival = 0
        n = len(self.arrivals)
        # cycles at one instant: each must start, finish or stop something, so more than this
        # many means a policy that starts and preempts the same jobs without time passing
        instant_limit, instant_cycles, last_now = 10 * n + 100, 0, -1.0
        # OOMs with no job finishing in between: each OOM corrects the predictions of the jobs in it,
        # so a policy that heeds them stops; more than this means one that does not (it would loop)
        oom_limit, ooms_at_finish, finished_before = 10 * n + 100, 0, 0
        wake = getattr(self.policy, "wake_at", None)
        wake = wake if callable(wake) else None
        next_wake: float | None = None
        idle_wakes = 0  # wake-ups in a row with nothing running or arriving and no decision
        while len(self.finished) < n:
            t_arr = self.arrivals[next_arrival].t.submit_time_s if next_arrival < n else math.inf
            while self.events and self.events[0][1] != self.by_wid[self.events[0][2]].version:
                heapq.heappop(self.events)
            t_ev = self.events[0][0] if self.events else math.inf
            # while jobs wait, the policy runs again as the controller's loop would: when the policy says
            # a rule fires on waiting time alone (its wake_at: turns, deadlines, guards), or every tick_s
            # for a policy that cannot say
            t_tick = math.inf
            if self.queued:
                if wake is not None:
                    t_tick = next_wake if next_wake is not None else math.inf
                elif self.tick_s > 0:
                    t_tick = last_now + self.tick_s
            if min(t_arr, t_ev) == math.inf:
                # nothing runs or arrives: only a wake-up can change anything (a policy holding a job
                # back on purpose); after IDLE_WAKES of them with no decision, it is a stall
                idle_wakes += 1
                if t_tick == math.inf or idle_wakes > IDLE_WAKES:
                    raise SimulationError(self._stall_message())
            else:
                idle_wakes = 0
            t_next = min(t_arr, t_ev, t_tick)
            self._advance(max(self.now, t_next))
            while next_arrival < n and self.arrivals[next_arrival].t.submit_time_s <= self.now + EPS:
                j = self.arrivals[next_arrival]
                j.fifo_wait = self.clock.book(j.t.submit_time_s, j.solo_s, j.t.priority, j.solo_need)
                self.queued[j.t.job_id] = j
                next_arrival += 1
            while self.events and self.events[0][0] <= self.now + EPS:
                _, version, wid = heapq.heappop(self.events)
                w = self.by_wid[wid]
                if version != w.version:
                    continue
                self._worker_event(w)
                self._reschedule(w)
            if self.queued:
                instant_cycles = instant_cycles + 1 if self.now <= last_now + EPS else 0
                last_now = self.now
                start = time.perf_counter() if time_decisions else 0.0
                view = self.view()
                call = "schedule()"
                try:
                    decisions = self.policy.schedule(view)
                    call = "wake_at()"
                    next_wake = wake(view) if wake is not None else None
                except Exception as err:  # a custom policy's bug: one clear line, not a traceback
                    raise SimulationError(f"{self.policy.name}: {call} raised at t={self.now:.0f}s: "
                                          f"{raised_at(err)}{type(err).__name__}: {err}") from err  # fmt: skip
                if next_wake is not None and (isinstance(next_wake, bool) or not isinstance(next_wake, int | float)
                                              or math.isnan(next_wake)):  # fmt: skip
                    raise SimulationError(f"{self.policy.name}: wake_at() returned {next_wake!r}; it must return a "
                                          "time in seconds (the view's clock) or None")  # fmt: skip
                if next_wake is not None and next_wake <= self.now + EPS:
                    raise SimulationError(f"{self.policy.name}: wake_at() returned {next_wake:.0f}, not after the view's "
                                          f"now ({self.now:.0f}); return a later time, or None for no wake-up")  # fmt: skip
                if decisions:
                    idle_wakes = 0
                if time_decisions:
                    timings.append(time.perf_counter() - start)
                try:
                    decisions = decision_list(decisions)
                except InvalidSchedule as err:
                    raise SimulationError(f"{self.policy.name}: {err}") from None
                if instant_cycles > instant_limit:
                    shown = ", ".join(map(repr, decisions[:4])) or "none"
                    raise SimulationError(
                        f"{self.policy.name}: {instant_cycles} scheduling cycles at t={self.now:.0f}s without time "
                        f"passing: the policy keeps starting and preempting jobs that have not run (last decisions: "
                        f"{shown})")  # fmt: skip
                valid, problems = check_decisions(decisions, view)
                if problems:  # a policy under test must be exact (the controller skips these and goes on)
                    first, detail = problems[0], ""
                    if isinstance(first.decision, Start):
                        detail = self._start_problem(first.decision.job_id, first.decision.worker_id)
                    raise SimulationError(f"{self.policy.name}: {first}" + (f" ({detail})" if detail else ""))
                self._apply(valid)
                if self.oom_count - ooms_at_finish > oom_limit:
                    raise SimulationError(
                        f"{self.policy.name}: {self.oom_count - ooms_at_finish} OOMs in a row with no job finishing "
                        f"(t={self.now:.0f}s): the policy keeps starting groups that do not fit their worker "
                        f"({len(self.finished)} of {n} jobs done)")
            if len(self.finished) != finished_before:
                finished_before, ooms_at_finish = len(self.finished), self.oom_count
        self.finished.sort(key=lambda r: r.job_id)
        return SimResult(self.policy.name, self.finished, len(self.workers), self.busy_s, self.oom_count,
                         self.preemptions, self.useful_tokens, self.padded_tokens, timings,
                         self.unusable)  # fmt: skip

    def _stall_message(self) -> str:
        stuck = sorted(self.queued)[:3]
        detail = ""
        if stuck:
            try:
                lines = self.policy.explain(self.view(), stuck[0]).workers[:2]
                detail = "; ".join(f"{w.worker_id}: {w.rejected_by or 'feasible'}" for w in lines)
            except Exception as err:  # explain is best effort in an error message
                detail = f"(explain failed: {err})"
        more = "..." if len(self.queued) > len(stuck) else ""
        return (f"{self.policy.name}: stalled at t={self.now:.0f}s with {len(self.queued)} job(s) queued "
                f"({', '.join(stuck)}{more}) and nothing running or arriving" + (f"; {detail}" if detail else ""))  # fmt: skip


def simulate(trace: Sequence[TraceJob], cluster: ClusterSpec, policy: Policy, *, seed: int = 0,
             memory_noise: float = 0.10, oom_restart_s: float = 30.0, tick_s: float = TICK_S) -> SimResult:  # fmt: skip
    """Replay ``trace`` on ``cluster`` under ``policy``; see the module docstring for the rules.

    ``seed`` fixes the per-job memory prediction errors (``memory_noise``: their bound as a
    fraction). Raises SimulationError for an unknown model, a job that fits no worker alone,
    an invalid decision, or a policy that leaves jobs queued with nothing running.
    """
    return Simulator(trace, cluster, policy, seed=seed, memory_noise=memory_noise,
                     oom_restart_s=oom_restart_s, tick_s=tick_s).run()  # fmt: skip

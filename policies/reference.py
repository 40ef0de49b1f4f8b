"""What a trace allows: reference mean JCTs no real policy is held to, to read a policy's result by.

A policy's mean JCT is compared with fifo's (issue 5 asks aspen for at most 0.70x), but how low
any policy can go depends on the trace: on a light trace fifo hardly queues, and no policy beats
the time jobs need running alone. Two references, both from a run's job records (submit time and
run time alone, ``JobRecord.run_s``, which every policy's run of one trace shares):

* ``floor``: every job starts on arrival and runs alone on a worker that already holds its model
  (mean run time, no model load). No policy beats it in the simulator: fusing never makes a job
  faster than running alone, and waiting and loading only add. (Before 2026-12-07 it counted each
  job's model load too, and a trace of jobs sharing one loaded model could beat it.)
* ``srpt``: preemptive shortest-remaining-processing-time on the cluster's workers at solo speed,
  with free, instant preemption, any job on any worker (no base-model switching), one job per
  worker. SRPT minimises mean completion time on one server; here it is an idealised target, not
  a bound: fusion can raise throughput above one job per worker. It ignores priority classes and
  tails entirely (its long jobs wait as long as short ones keep coming).

``lorafleet simulate`` prints both under the policies; docs/policies.md gives what they showed.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

# Under this many jobs per worker a synthetic trace is "light": fifo queues little and the mean target
# is often out of reach (docs/policies.md, "What makes a trace light"). `simulate` and `trace synth` say so.
LIGHT_JOBS_PER_WORKER = 20


@dataclass(frozen=True)
class Reference:
    """Reference mean JCTs of one trace on one cluster (seconds)."""

    jobs: int
    workers: int
    floor_mean_jct_s: float
    srpt_mean_jct_s: float


def srpt_jcts(jobs: Sequence[tuple[float, float]], workers: int) -> list[float]:
    """Each job's JCT (finish - submit) under preemptive SRPT on ``workers`` identical servers.

    ``jobs`` are ``(submit_s, work_s)`` pairs; the result is in the same order. A queued job
    preempts the running job with the most remaining work when it has strictly less; ties go to
    the earlier submission. Raises ValueError for ``workers < 1``, a negative or non-finite time.
    """
    if workers < 1:
        raise ValueError(f"workers: must be >= 1 (got {workers})")
    for k, (submit, work) in enumerate(jobs):
        if not (math.isfinite(submit) and math.isfinite(work)) or work < 0:
            raise ValueError(f"job {k}: submit and work must be finite and work >= 0 (got {submit}, {work})")
    n = len(jobs)
    arrivals = sorted(range(n), key=lambda i: (jobs[i][0], i))
    out = [0.0] * n
    waiting: list[tuple[float, float, int]] = []  # (remaining, submit, index)
    finish: dict[int, float] = {}  # running job -> its finish time (entries of the heaps below are checked against it)
    by_finish: list[tuple[float, int]] = []  # min-heap: next completion
    by_longest: list[tuple[float, float, int]] = []  # max-heap by finish time (most remaining work first)
    t, k = 0.0, 0

    def start(i: int, remaining: float) -> None:
        finish[i] = t + remaining
        heapq.heappush(by_finish, (finish[i], i))
        heapq.heappush(by_longest, (-finish[i], -jobs[i][0], i))

    while k < n or waiting or finish:
        while by_finish and finish.get(by_finish[0][1]) != by_finish[0][0]:
            heapq.heappop(by_finish)
        next_finish = by_finish[0][0] if by_finish else math.inf
        next_arrival = jobs[arrivals[k]][0] if k < n else math.inf
        if next_finish <= next_arrival:
            t, i = heapq.heappop(by_finish)
            del finish[i]
            out[i] = t - jobs[i][0]
        else:
            t, i = next_arrival, arrivals[k]
            k += 1
            heapq.heappush(waiting, (jobs[i][1], jobs[i][0], i))
        while waiting:
            if len(finish) < workers:
                remaining, _, i = heapq.heappop(waiting)
                start(i, remaining)
                continue
            while finish.get(by_longest[0][2]) != -by_longest[0][0]:
                heapq.heappop(by_longest)
            neg_finish, neg_submit, j = by_longest[0]
            if waiting[0][0] >= -neg_finish - t:
                break
            heapq.heappop(by_longest)
            del finish[j]
            heapq.heappush(waiting, (-neg_finish - t, -neg_submit, j))
            remaining, _, i = heapq.heappop(waiting)
            start(i, remaining)
    return out


def reference(submit_and_solo: Sequence[tuple[float, float]], workers: int) -> Reference:
    """The floor and SRPT mean JCTs of ``(submit_s, run_s)`` jobs on ``workers`` workers."""
    if not submit_and_solo:
        raise ValueError("reference of no jobs")
    n = len(submit_and_solo)
    floor = sum(run for _, run in submit_and_solo) / n
    return Reference(n, workers, floor, sum(srpt_jcts(submit_and_solo, workers)) / n)

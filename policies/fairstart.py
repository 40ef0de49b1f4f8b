"""FIFO-fair start deadlines (``JobView.fair_start_s``): each job is booked at submission, and its
deadline follows its class's FIFO tail as estimated at each decision.

:class:`FifoClock` keeps a virtual FIFO cluster of ``workers`` servers: jobs are taken in
submission order, each on the server that frees first, for its solo run time, so a job's *FIFO
start* is when that server frees (or its submit time, if later), and its estimated FIFO JCT is
``wait + work``. On workers of unequal memory (:meth:`FifoClock.of_servers`, what the simulator
builds; :meth:`FifoClock.reshape`, what the controller keeps up to date with its workers' reported
memory) a job takes only servers with the memory to run it alone: on 4 x 80 + 4 x 40 + 4 x 24 GiB a
memory-blind clock saw twelve servers where fifo had four for most jobs, and short jobs waited
48 h where fifo's waited 14 h (docs/policies-history.md, "a FIFO clock that knows which workers fit a
job"). Issue 5 bounds each priority class's p99 JCT by fifo's, so a job may be held back as long
as it stays within its class's FIFO tail. Its deadline is::

    fair_start = submit + max(wait_scale * wait, tail_share * tail - work)

``tail`` is the ``tail_quantile`` quantile (0.99: the class's p99, what the target bounds) of the
``wait_scale * wait + work`` estimates stamped in its class so far, linearly interpolated as
:func:`policies.metrics.percentile` does, and never above the ``tail_rank``-th largest estimate
(2). A class's p99 over fewer than 100 jobs lies between its two largest JCTs, so early in a
trace the interpolated p99 sits near the single largest estimate: one 74 h job in a class whose
FIFO p99 ended at 13.7 h let a 6.7 h job of that class wait 17.8 h (400 jobs, seed 61). The
second largest is a floor of the final p99 of any class of under 100 jobs, so the cap stays on
the safe side. ``tail_quantile`` 1 with ``tail_rank`` None takes the largest. aspen starts a job
first, in deadline order, once its deadline has come; before that, it competes shortest-first.

A job's ``wait`` is fixed when it is booked (:meth:`FifoClock.book`), but ``tail`` is the class's
as estimated *now* (:meth:`FifoClock.deadline`, called for each view by the simulator and the
controller): the estimate improves as the class's later jobs come in, and a deadline fixed at
submission kept an early, poor one. On 300 jobs / seed 335 a 10.5 h job stamped when its class's
2nd largest estimate was a 36.5 h job (the class's FIFO p99 ended at 21.3 h) was preempted by a
turn and then allowed to wait until 27 h (JCT 31.8 h, class p99 1.59x fifo's). Measured on 1,000
traces (docs/policies-history.md, "deadlines that follow the class tail"): every target on
761 instead of 747, average aspen/fifo mean 0.512 instead of 0.562.

How tightly waits are booked follows the load (``tight_wait_scale``, ``tight_below``). The clock
keeps the summed work and summed FIFO JCT estimates of every job booked so far; their ratio,
:meth:`FifoClock.floor_ratio`, is its estimate of the trace's floor (every job alone on arrival)
over fifo's mean JCT. Below ``tight_below`` (0.4) the mean target (0.70x fifo) has room to spare,
and a class's p99 is what a policy misses there (1.10-1.26x fifo's, with the mean at 0.3-0.5x, on
42 of the 680 traces of 200-600 jobs in docs/policies.md's set of 1,000), so waits are booked at
``tight_wait_scale`` (0.8) instead of ``wait_scale``: deadlines come earlier and the long jobs that
set a class's p99 start nearer their FIFO start. Light traces (ratio 0.4 and up) keep
``wait_scale``: their mean target is the tight one. Measured (docs/policies-history.md, "waits booked tighter"):
every target on 830 instead of 800 of the 1,000 and on 360 instead of 345 of 440 held out.
``tight_wait_scale`` None turns it off.

Accuracy of the FIFO start, against the simulator's fifo (bundled trace, seeds 1-3 at 100 and 400
jobs, 8 workers): 0.2-1.1 h late on average where fifo's mean wait is 0.2-10 h (fifo runs some
jobs side by side when memory allows, so it starts them a little earlier; hence ``wait_scale``
0.9). Ten or more servers for 8 workers was 0.1-9 h early; the fluid approximation
``start_j = max(arrival_j, start_(j-1) + work_(j-1) / workers)`` was 1-6.6 h late. ``wait_scale``
0.9 was tuned on seeds 1-4; ``tail_rank`` 2 with ``tail_share`` 0.9 (before: no rank cap, 0.8)
was chosen on 360 fresh traces (seeds 21-80 x 100-400 jobs) and checked on 80 held-out ones
(docs/policies.md, "Status"). Cost: O(log workers) per booking, plus an O(n) sorted insert into the
class's list of estimates (one float per booked job) when ``tail_quantile`` < 1; O(1) per deadline.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Sequence
from typing import Any

from policies.values import finite_number

#: The clock's settings an admin may set (aspen's ``fair_clock`` in the policy YAML), each with
#: what it must be: one table read by the YAML parser, :func:`clock_settings` and :class:`FifoClock`.
#: A value is a finite real number (not a bool; numpy's too); ``nullable`` ones may be None.
_RULES: dict[str, tuple[str, bool, Callable[[float], bool]]] = {  # name: (allowed, nullable, in range)
    "wait_scale": ("a number > 0", False, lambda x: x > 0),
    "tight_wait_scale": ("a number > 0 or null", True, lambda x: x > 0),
    "tight_below": ("a number in [0, 1]", False, lambda x: 0 <= x <= 1),
    "tail_share": ("a number >= 0", False, lambda x: x >= 0),
    "tail_quantile": ("a number in (0, 1]", False, lambda x: 0 < x <= 1),
    "tail_rank": ("an integer >= 1 or null", True, lambda x: x >= 1 and float(x).is_integer()),
}
CLOCK_SETTINGS = tuple(_RULES)


def check_clock_setting(name: str, value: Any) -> Any:
    """``value`` checked against setting ``name``'s rule: the value (``tail_rank`` as an int), or
    ValueError ``"fair_clock.<name>: must be <what> (got <value>)"``, or for an unknown name one
    that lists the settings."""
    rule = _RULES.get(name)
    if rule is None:
        raise ValueError(f"fair_clock.{name}: unknown setting (allowed: {', '.join(CLOCK_SETTINGS)})")
    allowed, nullable, in_range = rule
    if value is None and nullable:
        return None
    number = finite_number(value)
    if number is None or not in_range(number):
        raise ValueError(f"fair_clock.{name}: must be {allowed} (got {value!r})")
    return int(number) if name == "tail_rank" else value


def clock_settings(policy: object) -> dict[str, Any]:
    """The FIFO clock settings a policy asks for (its ``fair_clock`` pairs or mapping; none: the
    defaults), checked: ValueError naming the setting (``fair_clock.wait_scale: must be ...``)."""
    raw = getattr(policy, "fair_clock", ()) or ()
    try:
        settings = dict(raw)
    except (TypeError, ValueError):
        raise ValueError(f"fair_clock: must be a mapping of settings (got {type(raw).__name__})") from None
    return {str(k): check_clock_setting(str(k), v) for k, v in settings.items()}


class FifoClock:
    """The virtual FIFO cluster (see the module docstring). Stamp jobs in submission order."""

    __slots__ = ("_free", "_jct_sum", "_jcts", "_pools", "_size", "_tail", "_tail_memo", "_work_sum", "tail_quantile",
                 "tail_rank", "tail_share", "tight_below", "tight_wait_scale", "wait_scale")  # fmt: skip

    def __init__(self, workers: int, *, wait_scale: float = 0.9, tail_share: float = 0.9,
                 tail_quantile: float = 0.99, tail_rank: int | None = 2, tight_wait_scale: float | None = 0.8,
                 tight_below: float = 0.4):  # fmt: skip
        if workers < 1:
            raise ValueError(f"workers: must be >= 1 (got {workers})")
        for name, value in (("wait_scale", wait_scale), ("tight_wait_scale", tight_wait_scale),
                            ("tight_below", tight_below), ("tail_share", tail_share), ("tail_quantile", tail_quantile)):
            check_clock_setting(name, value)
        tail_rank = check_clock_setting("tail_rank", tail_rank)  # an int (3.0 given in code: 3)
        self._free = [0.0] * workers  # a min-heap of the servers' free times
        # servers of unequal memory (of_servers): (memory, min-heap of free times) per memory size,
        # smallest first; empty: the identical servers of _free
        self._pools: list[tuple[float, list[float]]] = []
        self._size: float | None = None  # the memory of _free's servers, when known (of_servers, reshape)
        self._tail: dict[int, float] = {}  # per priority class: the largest FIFO JCT estimate so far
        self._jcts: dict[int, list[float]] = {}  # per class, sorted: every estimate (quantile < 1 or a rank cap)
        # per class: ((estimates, quantile, rank), tail) of the last tail() -- a view asks once per job
        self._tail_memo: dict[int, tuple[tuple, float]] = {}
        self.wait_scale, self.tail_share, self.tail_quantile = wait_scale, tail_share, tail_quantile
        self.tail_rank = tail_rank
        self.tight_wait_scale, self.tight_below = tight_wait_scale, tight_below
        self._work_sum = self._jct_sum = 0.0  # every booked job's work and virtual FIFO JCT, summed

    @classmethod
    def of_servers(cls, memories: Sequence[float], **settings: Any) -> FifoClock:
        """A clock of one server per worker, with that worker's memory in bytes: a job is then booked
        only on servers with the memory to run it alone (``need_bytes`` of :meth:`book`), as fifo
        can only start it on such a worker. With equal memories it is ``FifoClock(len(memories))``.
        Speeds are not modelled: on 8 workers of two speeds, booking each job at its worker's speed
        met every target on 27 of 60 traces instead of 33 (longer FIFO estimates, later deadlines)."""
        clock = cls(max(1, len(memories)), **settings)
        clock.reshape(memories)  # checks the memories; all servers free at 0
        return clock

    @property
    def workers(self) -> int:
        return sum(len(h) for _, h in self._pools) if self._pools else len(self._free)

    def resize(self, workers: int) -> None:
        """Add servers (free from the earliest free time) or drop the latest-freeing ones (min 1).
        Identical servers only (not a clock of :meth:`of_servers` with several memory sizes)."""
        if self._pools:
            raise ValueError("resize: a clock of unequal servers cannot be resized")
        workers = max(1, workers)
        free = self._free
        if workers > len(free):
            free.extend([free[0]] * (workers - len(free)))
        elif workers < len(free):
            free.sort()
            del free[workers:]
        heapq.heapify(free)

    def reshape(self, memories: Sequence[float]) -> None:
        """Make the servers those of ``memories`` (bytes, one per worker), keeping the bookings: a
        memory size that stays keeps its servers' free times (fewer: the latest-freeing go, more:
        see below); servers of a size that goes, and those of a plain clock built without sizes, are
        handed earliest-free first to the sizes that need servers; any still missing start free at
        the earliest free time. One size for all makes a plain clock (:meth:`resize`; memory is
        then not looked at), as :meth:`of_servers` does. What the controller calls before each
        booking, with its workers' reported memory (the configured size for GPUs without one)."""
        if not memories:
            raise ValueError("memories: at least one server is needed")
        if any(m <= 0 for m in memories):
            raise ValueError(f"memories: every server's memory must be > 0 bytes (got {min(memories)})")
        want: dict[float, int] = {}
        for m in memories:
            want[float(m)] = want.get(float(m), 0) + 1
        if len(want) == 1 and not self._pools:
            self.resize(len(memories))
            self._size = next(iter(want))
            return
        if self._pools:
            have, spare = {m: sorted(heap) for m, heap in self._pools}, []
        elif self._size is not None:
            have, spare = {self._size: sorted(self._free)}, []
        else:
            have, spare = {}, sorted(self._free)
        earliest = min([*spare[:1], *(h[0] for h in have.values() if h)], default=0.0)
        kept: list[tuple[float, list[float], int]] = []
        for m, n in sorted(want.items()):
            mine = have.pop(m, [])
            kept.append((m, mine[:n], n))
            spare += mine[n:]
        spare += [t for heap in have.values() for t in heap]
        spare.sort(reverse=True)  # pop() hands out the earliest-free first
        pools = []
        for m, mine, n in kept:
            while len(mine) < n:
                mine.append(spare.pop() if spare else earliest)
            heapq.heapify(mine)
            pools.append((m, mine))
        if len(pools) == 1:
            self._pools, self._free, self._size = [], pools[0][1], pools[0][0]
        else:
            self._pools = pools

    def fifo_start(self, submit_time_s: float, work_s: float, need_bytes: float = 0.0) -> float:
        """The job's start in the virtual FIFO cluster; books its server for ``work_s`` from then."""
        work_s = max(0.0, work_s)
        if not self._pools:
            free = self._free
        else:  # the server freeing first among those with the memory (ties: the least memory)
            free = None
            for memory, heap in self._pools:
                if memory >= need_bytes and (free is None or heap[0] < free[0]):
                    free = heap
            if free is None:  # no server has the memory (the job cannot run): the earliest of all
                free = min((heap for _, heap in self._pools), key=lambda heap: heap[0])
        start = max(submit_time_s, free[0])
        heapq.heapreplace(free, start + work_s)
        return start

    def book(self, submit_time_s: float, work_s: float, priority: int = 0, need_bytes: float = 0.0) -> float:
        """Book the job on its virtual server and add its FIFO JCT estimate to its class; return its
        FIFO wait (the virtual wait x ``wait_scale``, or x ``tight_wait_scale`` while
        :meth:`floor_ratio` is below ``tight_below``), what :meth:`deadline` takes."""
        work_s = max(0.0, work_s)
        raw = self.fifo_start(submit_time_s, work_s, need_bytes) - submit_time_s
        self._work_sum += work_s
        self._jct_sum += raw + work_s
        tight = self.tight_wait_scale is not None and self.floor_ratio() < self.tight_below
        wait = (self.tight_wait_scale if tight else self.wait_scale) * raw
        if self.tail_quantile >= 1.0 and self.tail_rank is None:
            self._tail[priority] = max(self._tail.get(priority, 0.0), wait + work_s)
        else:
            bisect.insort(self._jcts.setdefault(priority, []), wait + work_s)
        return wait

    def floor_ratio(self) -> float:
        """Summed work over summed virtual FIFO JCTs of the jobs booked so far (1.0 before any):
        the clock's estimate of the floor's mean JCT over fifo's (:mod:`policies.reference`)."""
        return self._work_sum / self._jct_sum if self._jct_sum > 0 else 1.0

    def tail(self, priority: int) -> float | None:
        """The class's FIFO tail as estimated now (module docstring); None before its first job."""
        if self.tail_quantile >= 1.0 and self.tail_rank is None:
            return self._tail.get(priority)
        xs = self._jcts.get(priority)
        if not xs:
            return None
        key = (len(xs), self.tail_quantile, self.tail_rank)  # estimates are only ever added (book)
        memo = self._tail_memo.get(priority)
        if memo is not None and memo[0] == key:
            return memo[1]
        pos = (len(xs) - 1) * self.tail_quantile  # linear interpolation, as metrics.percentile
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        tail = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
        if self.tail_rank is not None and len(xs) >= self.tail_rank:
            tail = min(tail, xs[-self.tail_rank])  # one outlier does not set the class's tail
        self._tail_memo[priority] = (key, tail)
        return tail

    def deadline(self, submit_time_s: float, wait_s: float, work_s: float, priority: int = 0) -> float | None:
        """The FIFO-fair start deadline of a booked job, with its class's tail as estimated *now*
        (it moves as the class's estimates come in); None if the class has none (a new clock)."""
        tail = self.tail(priority)
        return None if tail is None else self.deadline_at(submit_time_s, wait_s, work_s, tail)

    def stamp(self, submit_time_s: float, work_s: float, priority: int = 0) -> float:
        """Book the job and return its FIFO-fair start deadline as of now."""
        wait = self.book(submit_time_s, work_s, priority)
        return self.deadline_at(submit_time_s, wait, work_s, self.tail(priority) or 0.0)  # the class has its estimate

    def deadline_at(self, submit_time_s: float, wait_s: float, work_s: float, tail: float) -> float:
        """The deadline for a given class tail (:meth:`deadline` with ``tail(priority)``), for callers
        that view many jobs of one class at once."""
        return submit_time_s + max(wait_s, self.tail_share * tail - max(0.0, work_s))

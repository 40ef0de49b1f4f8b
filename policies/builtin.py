"""The built-in policies: ``fifo``, ``priority``, ``sjf`` and ``aspen``, as plugin profiles.

All four admit jobs by the same memory model (the engine's fixed filters, see
:mod:`policies.framework`); they differ in order, worker choice, margin, backfill and preemption.

* ``fifo``: first come, first served, strictly in order: the head job goes to the feasible worker
  with the most free predicted memory (ties: first listed); when the head fits nowhere now, nothing
  behind it starts (head-of-line blocking; a job that fits no worker even alone is passed over). Several jobs share a worker when memory allows. No
  preference for workers holding the model, no grouping by length, margin 0, never preempts.
* ``priority``: like ``fifo`` but ordered by priority (highest first; FCFS within a priority),
  and preemptive: when the head fits nowhere, strictly lower-priority running jobs are preempted
  (at their next checkpoint) on the worker needing the fewest victims.
* ``sjf``: like ``fifo`` but ordered by least remaining work (non-preemptive).
* ``aspen``: multifactor priority (size and fair share by default; age and priority class
  weights available, default 0), a tail guard (a job whose FIFO-fair start deadline
  ``fair_start_s`` has come goes first, earliest deadline first; for jobs not stamped with one,
  jobs that waited longer than FIFO's current wait estimate, and long jobs held back more than
  ``guard_long`` of their own work, go first, oldest first), backfill (a job that cannot start is skipped), EASY-style reservations (the first
  ``reservations`` jobs that cannot start each hold back the worker expected to drain soonest),
  fusion rules from the cost model's token view (a busy group is joined only when that costs
  at most ``fusion_max_cost`` of running alone and keeps the fused step within ``max_slowdown``
  of any long member's own step), memory margin (default 0.15), owner quotas, and weighted
  worker scores: fusion cost (an idle worker first, then the group the job slows least) and
  model locality. Per-owner quotas: running jobs (``quotas``) and distinct workers occupied
  (``gpu_quotas``). A running job among the ``tail_jobs`` longest remaining of its priority
  class accepts a newcomer only if the fused step adds at most ``tail_delay_s`` to its run, and
  no newcomer may project a member's JCT above ``tail_ceiling`` x the member's own FIFO-fair
  JCT. Turns (``turn_max_s``): a job of at most 10 minutes that has waited 5 minutes (and twice
  its work) goes first and, when no worker can take it, may preempt one busy
  worker's group at its next checkpoint (not a class's longest jobs, nor jobs it would push past
  0.8 x their FIFO-fair JCT). Priority preemption off by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from policies.fairstart import clock_settings
from policies.framework import ProfilePolicy
from policies.interface import PreemptRule
from policies.plugins import (
    AgeFactor,
    FairShareFactor,
    FirstComeFirstServed,
    FusionCost,
    FusionPays,
    GroupTokenCap,
    LeastLoaded,
    LengthAffinity,
    LowerPriorityPreemption,
    ModelLocality,
    MostFreeMemory,
    Multifactor,
    OwnerGpuQuota,
    OwnerQuota,
    PriorityClassFactor,
    ShortestRemainingWork,
    ShortJobTurns,
    SizeFactor,
    StaticPriority,
)

PRIORITY_FACTORS = ("age", "fairshare", "size", "priority")
WORKER_SCORES = ("locality", "length", "load", "free_memory", "fusion")
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "age": 0.0, "fairshare": 500.0, "size": 2000.0, "priority": 0.0,
    "locality": 1.0, "length": 0.0, "load": 0.0, "free_memory": 0.0, "fusion": 4.0,
}  # fmt: skip


@dataclass(frozen=True)
class CommonSettings:
    """Settings every built-in takes (see docs/policies.md for each one's meaning)."""

    margin: float = 0.0
    preemption: str = "never"  # never | lower_priority
    backfill: bool = False
    queue_depth: int = 0
    max_candidates: int = 64


@dataclass(frozen=True)
class AspenSettings:
    """aspen's knobs; every field has the documented default."""

    margin: float = 0.15
    preemption: str = "never"
    backfill: bool = True
    queue_depth: int = 128
    max_candidates: int = 8
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    max_age_s: float = 4 * 3600.0
    size_half_s: float = 3600.0
    starvation_s: float | None = None
    guard_backlog: float | None = 1.0
    guard_long: float | None = 0.2
    reservations: int = 4
    shares: Mapping[str, float] = field(default_factory=dict)
    quotas: Mapping[str, int] = field(default_factory=dict)  # owner -> max running jobs; "default" key
    gpu_quotas: Mapping[str, int] = field(default_factory=dict)  # owner -> max workers occupied; "default" key
    max_group_tokens: int | None = None
    fusion_max_cost: float | None = 1.0
    half_tokens: float = 2048.0
    max_slowdown: float | None = 1.6
    fair_slack_s: float | None = 0.0
    pressure_slowdown: float | None = None
    tail_delay_s: float | None = 1800.0
    tail_jobs: int = 2
    tail_ceiling: float | None = 1.0
    turn_max_s: float | None = 600.0  # ShortJobTurns: most work a job may have to be due a turn (None: off)
    turn_min_wait_s: float = 300.0  # ... least it must have waited (and twice its work)
    turn_own_slack: float = 0.8  # ... victims keep their projected JCT within this x their FIFO-fair JCT
    fair_clock: Mapping[str, Any] = field(default_factory=dict)  # FifoClock settings (policies.fairstart)


def _preempt_rule(name: str) -> PreemptRule | None:
    return LowerPriorityPreemption() if name == "lower_priority" else None


def fifo(settings: CommonSettings | None = None) -> ProfilePolicy:
    s = settings or CommonSettings()
    return ProfilePolicy("fifo", FirstComeFirstServed(), scores=((MostFreeMemory(), 1.0),), margin=s.margin,
                         backfill=s.backfill, preempt=_preempt_rule(s.preemption), queue_depth=s.queue_depth,
                         max_candidates=s.max_candidates)  # fmt: skip


def priority(settings: CommonSettings | None = None) -> ProfilePolicy:
    s = settings or CommonSettings(preemption="lower_priority")
    return ProfilePolicy("priority", StaticPriority(), scores=((MostFreeMemory(), 1.0),), margin=s.margin,
                         backfill=s.backfill, preempt=_preempt_rule(s.preemption), queue_depth=s.queue_depth,
                         max_candidates=s.max_candidates)  # fmt: skip


def sjf(settings: CommonSettings | None = None) -> ProfilePolicy:
    s = settings or CommonSettings()
    return ProfilePolicy("sjf", ShortestRemainingWork(), scores=((MostFreeMemory(), 1.0),), margin=s.margin,
                         backfill=s.backfill, preempt=_preempt_rule(s.preemption), queue_depth=s.queue_depth,
                         max_candidates=s.max_candidates)  # fmt: skip


def aspen(settings: AspenSettings | None = None) -> ProfilePolicy:
    s = settings or AspenSettings()
    clock_settings(s)  # the simulator and the controller build a FifoClock from these: check them now
    w = {**DEFAULT_WEIGHTS, **s.weights}
    factors = (
        (AgeFactor(s.max_age_s), w["age"]),
        # `default`: every unlisted owner's share, as quotas' `default` is their cap (else 1)
        (FairShareFactor({k: v for k, v in s.shares.items() if k != "default"}, s.shares.get("default", 1.0)),
         w["fairshare"]),
        (SizeFactor(s.size_half_s), w["size"]),
        (PriorityClassFactor(), w["priority"]),
    )
    scores = ((ModelLocality(), w["locality"]), (LengthAffinity(), w["length"]), (LeastLoaded(), w["load"]),
              (MostFreeMemory(), w["free_memory"]), (FusionCost(s.half_tokens), w["fusion"]))  # fmt: skip
    quotas = {k: v for k, v in s.quotas.items() if k != "default"}
    filters: tuple = (OwnerQuota(quotas, s.quotas.get("default")),) if s.quotas else ()
    if s.gpu_quotas:
        gpu = {k: v for k, v in s.gpu_quotas.items() if k != "default"}
        filters += (OwnerGpuQuota(gpu, s.gpu_quotas.get("default")),)
    if s.max_group_tokens:
        filters += (GroupTokenCap(s.max_group_tokens),)
    if (s.fusion_max_cost is not None or s.max_slowdown is not None or s.pressure_slowdown is not None
            or s.tail_delay_s is not None or s.tail_ceiling is not None):  # fmt: skip
        filters += (FusionPays(s.half_tokens, s.fusion_max_cost, s.max_slowdown,
                               pressure_slowdown=s.pressure_slowdown, tail_delay_s=s.tail_delay_s,
                               tail_jobs=s.tail_jobs, tail_ceiling=s.tail_ceiling),)  # fmt: skip
    return ProfilePolicy("aspen", Multifactor(factors), filters=filters, scores=scores, margin=s.margin,
                         backfill=s.backfill, preempt=_preempt_rule(s.preemption), queue_depth=s.queue_depth,
                         max_candidates=s.max_candidates, starvation_s=s.starvation_s,
                         reservations=s.reservations, guard_backlog=s.guard_backlog,
                         guard_long=s.guard_long, fair_slack_s=s.fair_slack_s,
                         turns=None if s.turn_max_s is None else ShortJobTurns(
                             s.turn_max_s, s.turn_min_wait_s, own_slack=s.turn_own_slack),
                         fair_clock=tuple(sorted(s.fair_clock.items())))  # fmt: skip


BUILTINS = ("fifo", "priority", "sjf", "aspen")

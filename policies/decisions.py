"""Checks of a policy's ``schedule()`` result against the view it was given, shared by the simulator
and the controller (pure Python).

Two levels:

* :func:`decision_list`: the result as a whole must be a list (or tuple) of :class:`Start` and
  :class:`Preempt`; anything else (None, a generator, a dict, a string among the items) raises
  :class:`InvalidSchedule`: the policy is broken, not one of its decisions.
* :func:`check_decisions`: each decision must be possible in the view, in list order (a Start takes
  its job out of the queue and puts the job's base model on the worker, for the decisions after
  it). It returns the valid decisions and a :class:`DecisionProblem` per invalid one: a Start of a
  job that is not queued (unknown, running, or started by an earlier decision), on a worker not in
  the view, not accepting jobs, or running another base model; a Preempt of a job that is not
  running, or a second Preempt of the same job.

The simulator raises on the first problem (a policy under test must be exact); the controller skips
the invalid decisions, logs each, and applies the rest (a live cluster must keep scheduling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from policies.interface import Decision, Preempt, Start
from policies.snapshot import ClusterView

#: the contract in one phrase, for the messages
CONTRACT = "it must return a list of Start and Preempt decisions (an empty list leaves everything as it is)"


class InvalidSchedule(TypeError):
    """``schedule()`` returned something that is not a list of decisions; the message says what."""


@dataclass(frozen=True)
class DecisionProblem:
    """One invalid decision: its place in the list, the decision, and why it cannot apply."""

    index: int
    decision: Decision
    reason: str

    def __str__(self) -> str:
        return f"{self.decision}: {self.reason}"


def decision_list(result: object) -> list[Decision]:
    """``result`` as a list of decisions, or :class:`InvalidSchedule` saying what it is instead."""
    if not isinstance(result, list | tuple):
        raise InvalidSchedule(f"schedule() returned {type(result).__name__}; {CONTRACT}")
    for i, d in enumerate(result):
        if not isinstance(d, Start | Preempt):
            shown = repr(d)
            shown = shown if len(shown) <= 80 else f"{shown[:77]}..."
            raise InvalidSchedule(f"schedule() returned {shown} ({type(d).__name__}) at index {i}, which is not a "
                                  f"decision; {CONTRACT}")  # fmt: skip
    return list(result)


def check_decisions(decisions: Sequence[Decision], view: ClusterView) -> tuple[list[Decision], list[DecisionProblem]]:
    """Split ``decisions`` (already a :func:`decision_list`) into the valid ones, in order, and the
    problems of the others. Linear in the decisions and the view."""
    queued = {j.job_id: j for j in view.queued}
    running = {j.job_id: j for j in view.running}
    workers = {w.worker_id: w for w in view.workers}
    # the base model each worker runs (its group's, or a job started on it by an earlier decision)
    runs: dict[str, str] = {}
    for w in view.workers:
        for job_id in w.running:
            job = running.get(job_id)
            if job is not None:
                runs.setdefault(w.worker_id, job.base_model)
                break
    started: dict[str, str] = {}  # job id -> worker id, by an earlier decision of this list
    preempted: set[str] = set()
    valid: list[Decision] = []
    problems: list[DecisionProblem] = []

    def bad(i: int, d: Decision, reason: str) -> None:
        problems.append(DecisionProblem(i, d, reason))

    for i, d in enumerate(decisions):
        if isinstance(d, Start):
            if not isinstance(d.job_id, str) or not isinstance(d.worker_id, str):
                bad(i, d, "job_id and worker_id must be strings")
                continue
            job, w = queued.get(d.job_id), workers.get(d.worker_id)
            if d.job_id in started:
                bad(i, d, f"job not queued: an earlier decision of this pass starts it on {started[d.job_id]}")
            elif job is None:
                where = "running" if d.job_id in running else "not in the view (unknown or ended)"
                bad(i, d, f"job not queued: it is {where}")
            elif w is None:
                bad(i, d, "worker unknown: not in the view")
            elif not w.accepting:
                bad(i, d, "worker is not accepting jobs (restarting, loading or draining)")
            elif runs.get(d.worker_id, job.base_model) != job.base_model:
                bad(i, d, f"worker runs {runs[d.worker_id]}, the job needs {job.base_model}")
            else:
                del queued[d.job_id]
                started[d.job_id] = d.worker_id
                runs.setdefault(d.worker_id, job.base_model)
                valid.append(d)
        else:
            if not isinstance(d.job_id, str):
                bad(i, d, "job_id must be a string")
            elif d.job_id in preempted:
                bad(i, d, "duplicate: an earlier decision of this pass preempts it")
            elif d.job_id not in running and d.job_id not in started:
                bad(i, d, "job is not running")
            else:
                preempted.add(d.job_id)
                valid.append(d)
    return valid, problems


def raised_at(err: BaseException) -> str:
    """``file:line: `` of the innermost frame of ``err``'s traceback (where a policy's code raised)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}: " if tb is not None else ""


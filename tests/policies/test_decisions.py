"""policies.decisions: the checks of a policy's result that the simulator and the controller share."""

from __future__ import annotations

import pytest

from policies.decisions import InvalidSchedule, check_decisions, decision_list
from policies.interface import Preempt, Start
from tests.policies.helpers import job, view, worker


def test_a_result_that_is_not_a_list_of_decisions_is_refused_whole():
    assert decision_list(()) == [] and decision_list([Preempt("a")]) == [Preempt("a")]
    with pytest.raises(InvalidSchedule, match=r"^schedule\(\) returned NoneType; it must return a list of Start "
                                              r"and Preempt decisions \(an empty list"):  # fmt: skip
        decision_list(None)
    with pytest.raises(InvalidSchedule, match=r"^schedule\(\) returned generator;"):
        decision_list(d for d in ())
    with pytest.raises(InvalidSchedule, match=r"^schedule\(\) returned 'w0' \(str\) at index 1, which is not a "
                                              r"decision; it must return a list"):  # fmt: skip
        decision_list([Start("a", "w0"), "w0"])


def test_each_invalid_decision_is_named_and_the_valid_ones_kept_in_order():
    v = view(queued=[job("q1"), job("q2"), job("q3", model="other")],
             running=[job("r1", worker="w1", start=0)],
             workers=[worker("w0"), worker("w1", model="m", running=("r1",)), worker("w2", accepting=False)])  # fmt: skip
    decisions = [
        Start("q1", "w0"),     # valid
        Start("q1", "w0"),     # duplicate
        Start("ghost", "w0"),  # no such job
        Start("r1", "w0"),     # running
        Start("q2", "nowhere"),
        Start("q2", "w2"),     # not accepting
        Start("q3", "w1"),     # w1 runs m
        Start("q3", "w0"),     # w0 now runs m (q1 started on it above)
        Start("q2", "w1"),     # valid: joins r1's group
        Preempt("r1"),         # valid
        Preempt("r1"),         # duplicate
        Preempt("q3"),         # queued, not running
        Preempt("q1"),         # started above: running now
    ]  # fmt: skip
    valid, problems = check_decisions(decisions, v)
    assert valid == [Start("q1", "w0"), Start("q2", "w1"), Preempt("r1"), Preempt("q1")]
    assert [(p.index, p.reason) for p in problems] == [
        (1, "job not queued: an earlier decision of this pass starts it on w0"),
        (2, "job not queued: it is not in the view (unknown or ended)"),
        (3, "job not queued: it is running"),
        (4, "worker unknown: not in the view"),
        (5, "worker is not accepting jobs (restarting, loading or draining)"),
        (6, "worker runs m, the job needs other"),
        (7, "worker runs m, the job needs other"),
        (10, "duplicate: an earlier decision of this pass preempts it"),
        (11, "job is not running"),
    ]
    assert str(problems[3]) == "Start(job_id='q2', worker_id='nowhere'): worker unknown: not in the view"
    assert check_decisions([Start(["unhashable"], "w0")], v)[1][0].reason == "job_id and worker_id must be strings"

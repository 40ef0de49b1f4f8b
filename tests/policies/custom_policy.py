"""A custom policy for the import-path test: start every queued job on the first idle worker."""

from typing import ClassVar

from policies.interface import Explanation, Start


class FirstIdle:
    def __init__(self, label: str = "first-idle"):
        self.name = label

    def schedule(self, view):
        idle = [w.worker_id for w in view.workers if not w.running and w.accepting]
        return [Start(j.job_id, w) for j, w in zip(sorted(view.queued, key=lambda j: j.submit_time_s), idle, strict=False)]

    def explain(self, view, job_id):
        return Explanation(job_id, self.name, (), 0.0, 0, ())


class Raises(FirstIdle):
    """A policy with a bug: ``lorafleet simulate`` must say where, in one line."""

    def schedule(self, view):
        raise RuntimeError("boom in schedule")


class BadClock(FirstIdle):
    """Asks for a FIFO clock setting out of range: refused when the policy is loaded."""

    fair_clock: ClassVar[dict] = {"wait_scale": -1}


class NeedsSetup:
    """A constructor that raises with no options: the error must say the constructor raised, and why."""

    def __init__(self, path: str | None = None):
        if path is None:
            raise RuntimeError("set LORAFLEET_POLICY_DB first")
        self.name = "needs-setup"

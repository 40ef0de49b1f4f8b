"""Scheduling policies, the memory model, a cost model and a trace-driven simulator: pure Python.

Nothing here imports torch, Ray or numpy (stdlib and PyYAML only), so an admin can try a policy
in a notebook. The controller and :mod:`policies.simulator` call the same policy objects::

    from policies import ClusterView, JobView, WorkerView, load_policy_config
    policy = load_policy_config("examples/policy.yaml")      # or resolve_policy("aspen")
    decisions = policy.schedule(view)                          # [Start(job, worker), Preempt(job)]
    print(policy.explain(view, "job-7").format())              # sprio-like breakdown

See docs/policies.md.
"""

from policies.builtin import AspenSettings, CommonSettings, aspen, fifo, priority, sjf
from policies.config import PolicyConfigError, load_policy_config, parse_policy_config, resolve_policy
from policies.framework import ProfilePolicy
from policies.interface import Decision, Explanation, Policy, Preempt, Start
from policies.memory_model import ActivationFit, AdapterShape, ModelShape, ProfileCache, fit_activation
from policies.snapshot import ClusterView, JobView, WorkerView

__all__ = [
    "ActivationFit", "AdapterShape", "AspenSettings", "ClusterView", "CommonSettings", "Decision", "Explanation",
    "JobView", "ModelShape", "Policy", "PolicyConfigError", "Preempt", "ProfileCache", "ProfilePolicy", "Start",
    "WorkerView", "aspen", "fifo", "fit_activation", "load_policy_config", "parse_policy_config", "priority",
    "resolve_policy", "sjf",
]  # fmt: skip

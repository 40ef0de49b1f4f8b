"""Admin policy configuration (YAML) and building a policy from it.

::

    policy: aspen          # fifo | priority | sjf | aspen | a custom class "package.module:ClassName"
    margin: 0.15           # memory headroom, fraction of a group's dynamic bytes
    preemption: never      # never | lower_priority
    backfill: true
    weights: {age: 1000, size: 2000, priority: 1000, fairshare: 500, locality: 1, length: 2, load: 1}
    shares: {alice: 2, bob: 1}
    quotas: {default: 16, alice: 32}   # max running jobs per owner
    gpu_quotas: {default: 4, alice: 8} # max distinct workers (GPUs) an owner's jobs occupy

Every field and its default is listed in docs/policies.md. Unknown fields, wrong types and
out-of-range values raise :class:`PolicyConfigError` naming the field and the allowed values.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from policies import builtin
from policies.builtin import PRIORITY_FACTORS, WORKER_SCORES, AspenSettings, CommonSettings
from policies.fairstart import check_clock_setting, clock_settings
from policies.interface import Policy
from policies.values import finite_number, read_yaml

MAX_COUNT = 10**9  # the most jobs a count setting may name
COMMON_FIELDS = ("margin", "preemption", "backfill", "queue_depth", "max_candidates")
ASPEN_FIELDS = ("weights", "max_age_s", "size_half_s", "starvation_s", "guard_backlog", "guard_long",
                "reservations", "max_group_tokens", "fusion_max_cost", "max_slowdown", "half_tokens", "shares",
                "quotas", "gpu_quotas", "fair_slack_s", "pressure_slowdown", "tail_delay_s", "tail_jobs",
                "tail_ceiling", "turn_max_s", "turn_min_wait_s", "turn_own_slack", "fair_clock")  # fmt: skip
PREEMPTION = ("never", "lower_priority")


class PolicyConfigError(ValueError):
    """An invalid policy configuration; the message names the field and what is allowed."""


def _num(field: str, value: Any, *, lo: float = 0.0, integer: bool = False, nullable: bool = False,
         hi: float | None = None, positive: bool = False) -> Any:  # fmt: skip
    """``positive``: must be > ``lo`` (not >=), e.g. a time or a factor that 0 makes meaningless."""
    if value is None and nullable:
        return None
    number = finite_number(value)
    low_ok = number is not None and (number > lo if positive else number >= lo)
    if not low_ok or number is None or (integer and not number.is_integer()) or (hi is not None and number > hi):
        kind = "an integer" if integer else "a number"
        extra = " or null" if nullable else ""
        bound = f" and <= {hi:,.0f}" if hi is not None else ""
        raise PolicyConfigError(f"{field}: must be {kind} {'>' if positive else '>='} {lo:g}{bound}{extra} "
                                f"(got {value!r})")  # fmt: skip
    return int(value) if integer else number


def _mapping(field: str, value: Any, *, integer: bool = False) -> dict[str, Any]:
    """Weights, shares or quotas: each a number (or integer) from 0 to 10^9. Weights of 1e308
    passed and their sum overflowed to inf: every worker scored NaN and nothing ever started."""
    if not isinstance(value, Mapping):
        raise PolicyConfigError(f"{field}: must be a mapping (got {type(value).__name__})")
    return {str(k): _num(f"{field}.{k}", v, integer=integer, hi=MAX_COUNT) for k, v in value.items()}


def _common(doc: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "margin" in doc:
        out["margin"] = _num("margin", doc["margin"])
    if "preemption" in doc:
        if doc["preemption"] not in PREEMPTION:
            raise PolicyConfigError(f"preemption: must be one of {', '.join(PREEMPTION)} (got {doc['preemption']!r})")
        out["preemption"] = doc["preemption"]
    if "backfill" in doc:
        if not isinstance(doc["backfill"], bool):
            raise PolicyConfigError(f"backfill: must be true or false (got {doc['backfill']!r})")
        out["backfill"] = doc["backfill"]
    for key in ("queue_depth", "max_candidates"):  # counts of jobs: 1e19 passed and broke every pass
        if key in doc:
            out[key] = _num(key, doc[key], integer=True, hi=MAX_COUNT)
    return out


def _aspen(doc: Mapping[str, Any]) -> AspenSettings:
    s = AspenSettings()
    out = _common(doc)
    if "weights" in doc:
        weights = _mapping("weights", doc["weights"])
        allowed = PRIORITY_FACTORS + WORKER_SCORES
        for key in weights:
            if key not in allowed:
                raise PolicyConfigError(f"weights.{key}: unknown weight (allowed: {', '.join(allowed)})")
        merged = {**s.weights, **weights}
        if not any(merged[k] for k in WORKER_SCORES):
            raise PolicyConfigError(f"weights: at least one of {', '.join(WORKER_SCORES)} must be > 0")
        out["weights"] = merged
    for key in ("max_age_s", "size_half_s"):
        if key in doc:
            out[key] = _num(key, doc[key], positive=True)
    for key in ("starvation_s", "guard_backlog", "guard_long", "fusion_max_cost", "fair_slack_s", "tail_delay_s"):
        if key in doc:
            out[key] = _num(key, doc[key], nullable=True)
    for key in ("max_slowdown", "pressure_slowdown"):
        if key in doc:
            out[key] = _num(key, doc[key], lo=1.0, nullable=True)
    if "half_tokens" in doc:
        out["half_tokens"] = _num("half_tokens", doc["half_tokens"])
    if "tail_ceiling" in doc:
        out["tail_ceiling"] = _num("tail_ceiling", doc["tail_ceiling"], nullable=True)
    if "turn_max_s" in doc:
        out["turn_max_s"] = _num("turn_max_s", doc["turn_max_s"], positive=True, nullable=True)
    if "turn_min_wait_s" in doc:
        out["turn_min_wait_s"] = _num("turn_min_wait_s", doc["turn_min_wait_s"])
    if "turn_own_slack" in doc:
        out["turn_own_slack"] = _num("turn_own_slack", doc["turn_own_slack"], positive=True)
    if "tail_jobs" in doc:
        out["tail_jobs"] = _num("tail_jobs", doc["tail_jobs"], lo=1, integer=True)
    if "reservations" in doc:
        out["reservations"] = _num("reservations", doc["reservations"], integer=True)
    if "max_group_tokens" in doc:
        out["max_group_tokens"] = _num("max_group_tokens", doc["max_group_tokens"], lo=1, integer=True,
                                       nullable=True)  # fmt: skip
    if "fair_clock" in doc:
        out["fair_clock"] = _fair_clock(doc["fair_clock"])
    if "shares" in doc:
        out["shares"] = _mapping("shares", doc["shares"])
    if "quotas" in doc:
        out["quotas"] = _mapping("quotas", doc["quotas"], integer=True)
    if "gpu_quotas" in doc:
        out["gpu_quotas"] = _mapping("gpu_quotas", doc["gpu_quotas"], integer=True)
    return replace(s, **out)


def _fair_clock(value: Any) -> dict[str, Any]:
    """aspen's ``fair_clock``: settings of the FIFO clock behind its deadlines, checked by the
    clock's own rules (:func:`policies.fairstart.check_clock_setting`)."""
    if not isinstance(value, Mapping):
        raise PolicyConfigError(f"fair_clock: must be a mapping (got {type(value).__name__})")
    try:
        return {str(key): check_clock_setting(str(key), v) for key, v in value.items()}
    except ValueError as err:
        raise PolicyConfigError(str(err)) from None


def _custom(path: str, options: Any) -> Policy:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise PolicyConfigError(f"policy: a custom policy is 'package.module:ClassName' (got {path!r})")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise PolicyConfigError(f"options: must be a mapping of keyword arguments (got {type(options).__name__})")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, TypeError ('.x': relative), or whatever the module raised
        raise PolicyConfigError(f"policy: cannot import module {module_name!r}: {err}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise PolicyConfigError(f"policy: module {module_name!r} has no attribute {attr!r}")
    try:
        policy = cls(**options)
    except Exception as err:  # the class's own code judges its options: any refusal is a config error
        raise PolicyConfigError(f"options: {path} rejected them: {type(err).__name__}: {err}") from None
    if not isinstance(policy, Policy):
        raise PolicyConfigError(f"policy: {path} does not implement the Policy protocol "
                                f"(name, schedule(view), explain(view, job_id))")  # fmt: skip
    if not isinstance(getattr(policy, "name", None), str) or not policy.name:
        raise PolicyConfigError(f"policy: {path}'s name must be a non-empty string "
                                f"(got {getattr(policy, 'name', None)!r})")  # fmt: skip
    try:  # the FIFO clock's settings, checked here and not minutes into a replay or in the controller's loop
        clock_settings(policy)
    except ValueError as err:
        raise PolicyConfigError(f"{path}: {err}") from None
    return policy


def parse_policy_config(doc: Any, source: str = "<policy>") -> Policy:
    """Build a policy from a parsed YAML document. Raises PolicyConfigError ``source: field: problem``."""
    try:
        return _parse(doc)
    except PolicyConfigError as err:
        raise PolicyConfigError(f"{source}: {err}") from None


def _parse(doc: Any) -> Policy:
    if not isinstance(doc, Mapping):
        raise PolicyConfigError("must be a mapping with at least 'policy'")
    name = doc.get("policy")
    if not isinstance(name, str) or not name:
        raise PolicyConfigError(f"policy: required: one of {', '.join(builtin.BUILTINS)} or 'module:Class'")
    if ":" in name:
        extra = sorted(set(doc) - {"policy", "options"}, key=str)
        if extra:
            raise PolicyConfigError(f"{extra[0]}: not used by a custom policy (pass it in options)")
        return _custom(name, doc.get("options"))
    if name not in builtin.BUILTINS:
        raise PolicyConfigError(f"policy: must be one of {', '.join(builtin.BUILTINS)} or 'module:Class' (got {name!r})")
    allowed = {"policy", *COMMON_FIELDS} | (set(ASPEN_FIELDS) if name == "aspen" else set())
    for key in doc:
        if key not in allowed:
            where = "only for aspen" if key in ASPEN_FIELDS else f"allowed: {', '.join(sorted(allowed))}"
            raise PolicyConfigError(f"{key}: unknown field for policy {name} ({where})")
    if name == "aspen":
        return builtin.aspen(_aspen(doc))
    defaults = CommonSettings(preemption="lower_priority") if name == "priority" else CommonSettings()
    settings = replace(defaults, **_common(doc))
    return getattr(builtin, name)(settings)


def load_policy_config(path: str | Path) -> Policy:
    """Read an admin YAML file and build its policy. Raises PolicyConfigError."""
    return parse_policy_config(read_yaml(path, PolicyConfigError), str(path))


def resolve_policy(spec: str) -> Policy:
    """A built-in name, a ``module:Class`` path, or a path to a policy YAML file."""
    if spec in builtin.BUILTINS:
        return getattr(builtin, spec)()
    if spec.endswith((".yaml", ".yml")):
        return load_policy_config(spec)
    if ":" in spec:
        return _custom(spec, None)
    raise PolicyConfigError(
        f"policy: {spec!r} is not one of {', '.join(builtin.BUILTINS)}, a 'module:Class' path or a .yaml file"
    )


__all__ = ["PolicyConfigError", "load_policy_config", "parse_policy_config", "resolve_policy"]

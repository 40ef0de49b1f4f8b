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
out-of-range values raise one :class:`PolicyConfigError` listing every problem of the document, each
naming the field and the allowed values (``did you mean`` for a near miss of a name).
"""

from __future__ import annotations

import difflib
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
    """An invalid policy configuration; the message names the field and what is allowed.

    ``errors`` holds one ``"source: field: problem"`` line per problem: a configuration is checked
    whole, so a file with three mistakes lists all three (as ``orchestrator.spec.SpecError`` does);
    the message is those lines, one per line."""

    def __init__(self, errors: str | list[str]):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray (set_policy) with its lines intact
        return (type(self), (self.errors,))


class _Problems:
    """Collects every problem of one document, each ``field: problem``, instead of stopping at the first."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def in_order(self, ranks: list[float]) -> list[str]:
        """The lines sorted by ``ranks`` (one per line; stable: a field's own lines keep their order)."""
        return [line for _, _, line in sorted(zip(ranks, range(len(ranks)), self.lines, strict=True))]

    def check(self, check: Any, *args: Any, **kwargs: Any) -> Any:
        """``check(*args, **kwargs)``; a PolicyConfigError it raises is recorded and ``_BAD`` returned."""
        try:
            return check(*args, **kwargs)
        except PolicyConfigError as err:
            self.lines.extend(err.errors)
            return _BAD


_BAD = object()  # what _Problems.check returns for a value it recorded a problem for


def _hint(word: str, allowed: Any, sep: str = " ") -> str:
    """``did you mean 'x'?`` and ``sep`` for a near miss among ``allowed``, else empty."""
    close = difflib.get_close_matches(str(word), [str(a) for a in allowed], n=1)
    return f"did you mean {close[0]!r}?{sep}" if close else ""


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
    problems = _Problems()
    out = {str(k): problems.check(_num, f"{field}.{k}", v, integer=integer, hi=MAX_COUNT) for k, v in value.items()}
    if problems.lines:
        raise PolicyConfigError(problems.lines)
    return out


def _choice(field: str, value: Any, *, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        hint = _hint(value, allowed, "") if isinstance(value, str) else ""
        raise PolicyConfigError(f"{field}: must be one of {', '.join(allowed)} (got {value!r}{'; ' if hint else ''}{hint})")
    return value


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PolicyConfigError(f"{field}: must be true or false (got {value!r})")
    return value


class _Fields:
    """One document's settings as they are checked: ``out`` holds each good value, ``problems``
    every bad one (a bad field is left out of ``out`` and checking goes on)."""

    def __init__(self, doc: Mapping[str, Any], problems: _Problems):
        self.doc, self.problems = doc, problems
        self.out: dict[str, Any] = {}
        self._position = {key: i for i, key in enumerate(doc)}
        self.ranks: list[float] = []  # per problem line: its field's position in the document

    def rank(self, key: Any) -> None:
        """Mark the problem lines added since the last call as ``key``'s."""
        self.ranks += [self._position.get(key, len(self._position))] * (len(self.problems.lines) - len(self.ranks))

    def take(self, key: str, check: Any, **kwargs: Any) -> None:
        if key in self.doc:
            value = self.problems.check(check, key, self.doc[key], **kwargs)
            self.rank(key)
            if value is not _BAD:
                self.out[key] = value


def _common(fields: _Fields) -> None:
    fields.take("margin", _num)
    fields.take("preemption", _choice, allowed=PREEMPTION)
    fields.take("backfill", _bool)
    for key in ("queue_depth", "max_candidates"):  # counts of jobs: 1e19 passed and broke every pass
        fields.take(key, _num, integer=True, hi=MAX_COUNT)


def _weights(field: str, value: Any) -> dict[str, float]:
    """aspen's ``weights`` merged over the defaults: every unknown name and bad value is reported."""
    if not isinstance(value, Mapping):
        raise PolicyConfigError(f"{field}: must be a mapping (got {type(value).__name__})")
    allowed = PRIORITY_FACTORS + WORKER_SCORES
    problems = _Problems()
    weights: dict[str, float] = {}
    for key, v in value.items():
        if key not in allowed:
            problems.add(f"{field}.{key}: unknown weight ({_hint(key, allowed)}allowed: {', '.join(allowed)})")
            continue
        number = problems.check(_num, f"{field}.{key}", v, hi=MAX_COUNT)
        if number is not _BAD:
            weights[key] = number
    if problems.lines:
        raise PolicyConfigError(problems.lines)
    merged = {**AspenSettings().weights, **weights}
    if not any(merged[k] for k in WORKER_SCORES):
        raise PolicyConfigError(f"{field}: at least one of {', '.join(WORKER_SCORES)} must be > 0")
    return merged


def _aspen(fields: _Fields) -> None:
    _common(fields)
    fields.take("weights", _weights)
    for key in ("max_age_s", "size_half_s"):
        fields.take(key, _num, positive=True)
    for key in ("starvation_s", "guard_backlog", "guard_long", "fusion_max_cost", "fair_slack_s", "tail_delay_s"):
        fields.take(key, _num, nullable=True)
    for key in ("max_slowdown", "pressure_slowdown"):
        fields.take(key, _num, lo=1.0, nullable=True)
    fields.take("half_tokens", _num)
    fields.take("tail_ceiling", _num, nullable=True)
    fields.take("turn_max_s", _num, positive=True, nullable=True)
    fields.take("turn_min_wait_s", _num)
    fields.take("turn_own_slack", _num, positive=True)
    fields.take("tail_jobs", _num, lo=1, integer=True)
    fields.take("reservations", _num, integer=True)
    fields.take("max_group_tokens", _num, lo=1, integer=True, nullable=True)
    fields.take("fair_clock", _fair_clock)
    fields.take("shares", _mapping)
    fields.take("quotas", _mapping, integer=True)
    fields.take("gpu_quotas", _mapping, integer=True)


def _fair_clock(field: str, value: Any) -> dict[str, Any]:
    """aspen's ``fair_clock``: settings of the FIFO clock behind its deadlines, checked by the
    clock's own rules (:func:`policies.fairstart.check_clock_setting`), every bad one reported."""
    if not isinstance(value, Mapping):
        raise PolicyConfigError(f"{field}: must be a mapping (got {type(value).__name__})")
    problems = _Problems()
    out: dict[str, Any] = {}
    for key, v in value.items():
        try:
            out[str(key)] = check_clock_setting(str(key), v)
        except ValueError as err:
            problems.add(str(err))
    if problems.lines:
        raise PolicyConfigError(problems.lines)
    return out


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
        if options:
            raise PolicyConfigError(f"options: {path}'s constructor raised {type(err).__name__} with options "
                                    f"{', '.join(map(str, options))}: {err}") from None  # fmt: skip
        raise PolicyConfigError(f"policy: {path}'s constructor raised {type(err).__name__} (no options "
                                f"given): {err}") from None  # fmt: skip
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


def parse_policy_config(doc: Any, source: str = "<policy>", warnings: list[str] | None = None) -> Policy:
    """Build a policy from a parsed YAML document. Raises PolicyConfigError listing every problem,
    one ``source: field: problem`` line each. ``warnings``, when given, receives one ``source: field:
    ...`` line per setting that is valid but probably not meant (:func:`config_warnings`)."""
    try:
        policy, settings = _parse(doc)
    except PolicyConfigError as err:
        raise PolicyConfigError([f"{source}: {line}" for line in err.errors]) from None
    if warnings is not None and settings is not None:
        warnings.extend(f"{source}: {line}" for line in config_warnings(settings))
    return policy


def config_warnings(settings: AspenSettings) -> list[str]:
    """What a valid aspen configuration allows but an admin probably did not mean: a quota of 0
    (``quotas`` or ``gpu_quotas``) lets no job of that owner (``default``: of every owner not listed)
    start. It stays allowed (it is how an admin pauses an owner); callers print these as warnings."""
    out = []
    for field, unit in (("quotas", "running jobs"), ("gpu_quotas", "workers (GPUs)")):
        caps = getattr(settings, field)
        for owner, cap in caps.items():
            if cap != 0:
                continue
            if owner == "default":
                listed = sorted(k for k in caps if k != "default")
                who = f"any owner not listed in {field} ({', '.join(listed)} are)" if listed else "any owner"
            else:
                who = f"owner {owner}"
            out.append(f"{field}.{owner}: 0 {unit}: no job of {who} will start; each stays queued (`lorafleet "
                       f"status JOB` says why) until the quota is raised. Give at least 1 to limit rather "
                       f"than block, or leave the entry out for no limit")  # fmt: skip
    return out


def _parse(doc: Any) -> tuple[Policy, AspenSettings | None]:
    """The policy and, for aspen, its settings (for :func:`config_warnings`)."""
    if not isinstance(doc, Mapping):
        raise PolicyConfigError("must be a mapping with at least 'policy'")
    name = doc.get("policy")
    problems = _Problems()
    fields = _Fields(doc, problems)
    if "policy" not in doc:
        problems.add(f"policy: required: one of {', '.join(builtin.BUILTINS)} or 'module:Class'")
        fields.ranks.append(-1)  # first: what the rest is checked against
    elif not isinstance(name, str) or (name not in builtin.BUILTINS and ":" not in name):
        hint = _hint(name, builtin.BUILTINS, "") if isinstance(name, str) and name else ""
        problems.add(f"policy: must be one of {', '.join(builtin.BUILTINS)} or 'module:Class' "
                     f"(got {name!r}{'; ' if hint else ''}{hint})")  # fmt: skip
        fields.rank("policy")
    if problems.lines:  # no policy to check the rest against: every field any built-in takes, all at once
        known = {"policy", "options", *COMMON_FIELDS, *ASPEN_FIELDS}
        for key in doc:
            if key not in known:
                problems.add(f"{key}: unknown field ({_hint(key, sorted(known))}allowed: "
                             f"{', '.join(sorted(known))})")  # fmt: skip
                fields.rank(key)
        _aspen(fields)
        raise PolicyConfigError(problems.in_order(fields.ranks))
    assert isinstance(name, str)
    if ":" in name:
        for key in sorted(set(doc) - {"policy", "options"}, key=str):
            problems.add(f"{key}: not used by a custom policy (pass it in options)")
        policy = problems.check(_custom, name, doc.get("options"))
        if problems.lines:
            raise PolicyConfigError(problems.lines)
        return policy, None
    allowed = {"policy", *COMMON_FIELDS} | (set(ASPEN_FIELDS) if name == "aspen" else set())
    for key in doc:
        if key not in allowed:
            where = "only for aspen" if key in ASPEN_FIELDS else f"{_hint(key, sorted(allowed))}allowed: {', '.join(sorted(allowed))}"
            problems.add(f"{key}: unknown field for policy {name} ({where})")
            fields.rank(key)
    if name == "aspen":
        _aspen(fields)
    else:
        _common(fields)
    if problems.lines:  # in the document's order
        raise PolicyConfigError(problems.in_order(fields.ranks))
    if name == "aspen":
        settings = replace(AspenSettings(), **fields.out)
        return builtin.aspen(settings), settings
    defaults = CommonSettings(preemption="lower_priority") if name == "priority" else CommonSettings()
    return getattr(builtin, name)(replace(defaults, **fields.out)), None


def load_policy_config(path: str | Path, warnings: list[str] | None = None) -> Policy:
    """Read an admin YAML file and build its policy. Raises PolicyConfigError; ``warnings``: as
    :func:`parse_policy_config`'s."""
    return parse_policy_config(read_yaml(path, PolicyConfigError), str(path), warnings)


def resolve_policy(spec: str, warnings: list[str] | None = None) -> Policy:
    """A built-in name, a ``module:Class`` path, or a path to a policy YAML file (``warnings``: as
    :func:`parse_policy_config`'s)."""
    if spec in builtin.BUILTINS:
        return getattr(builtin, spec)()
    if spec.endswith((".yaml", ".yml")):
        return load_policy_config(spec, warnings)
    if ":" in spec:
        return _custom(spec, None)
    raise PolicyConfigError(
        f"policy: {spec!r} is not one of {', '.join(builtin.BUILTINS)}, a 'module:Class' path or a .yaml file"
    )


__all__ = ["PolicyConfigError", "config_warnings", "load_policy_config", "parse_policy_config", "resolve_policy"]

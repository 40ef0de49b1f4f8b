"""Durable job store of the control plane: one SQLite file holding every job and its history.

The controller is the only writer in normal operation; it calls the store from several
threads. Every state change is committed (WAL journal, ``synchronous=FULL``) before
``transition`` returns, so a transition the controller acknowledged survives a crash of
the controller process. Progress updates use the same durable commit but write no event.

Job lifecycle (``ALLOWED_TRANSITIONS``; anything not listed is refused)::

    from        allowed targets                               why
    ---------   -------------------------------------------   ------------------------------------
    QUEUED      PROFILING RUNNING CANCELLED FAILED            FAILED: rejected before it ran
    PROFILING   RUNNING QUEUED FAILED CANCELLED PREEMPTED     QUEUED: probe lost its worker
    RUNNING     SUCCEEDED FAILED CANCELLED PREEMPTED QUEUED   QUEUED: worker lost / OOM requeue
    PREEMPTED   QUEUED CANCELLED FAILED                       FAILED: requeue refused (attempts)
    SUCCEEDED   -                                             terminal
    FAILED      -                                             terminal
    CANCELLED   -                                             terminal

No state transitions to itself. PREEMPTED is not terminal: the scheduler requeues the
job (PREEMPTED -> QUEUED), or the user cancels it meanwhile. One way out of FAILED and
CANCELLED is not a ``transition``: ``reopen`` (``lorafleet retry``) queues the job again under
its id, so it resumes from its own checkpoints.

Side effects of ``transition`` (in the same transaction as the state and its event row):
entering RUNNING increments ``attempts`` and sets ``start_time`` the first time; entering
a terminal state sets ``end_time``; entering QUEUED or PREEMPTED clears ``worker``.
Explicit ``**fields`` win over these defaults.

Ended jobs are kept until ``prune`` deletes them (their rows and events only, never files).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2  # 2: the users table (API key hashes)
DEFAULT_PATH = Path(os.environ.get("LORAFLEET_HOME", Path.home() / ".lorafleet")) / "jobs.db"


class JobState(str, Enum):
    QUEUED = "QUEUED"
    PROFILING = "PROFILING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    PREEMPTED = "PREEMPTED"

    def is_terminal(self) -> bool:
        """True for SUCCEEDED, FAILED and CANCELLED: no transition leaves them (``reopen``, the retry of a
        FAILED or CANCELLED job, is the one way out)."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
_S = JobState
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    _S.QUEUED: frozenset({_S.PROFILING, _S.RUNNING, _S.CANCELLED, _S.FAILED}),
    _S.PROFILING: frozenset({_S.RUNNING, _S.QUEUED, _S.FAILED, _S.CANCELLED, _S.PREEMPTED}),
    _S.RUNNING: frozenset({_S.SUCCEEDED, _S.FAILED, _S.CANCELLED, _S.PREEMPTED, _S.QUEUED}),
    _S.PREEMPTED: frozenset({_S.QUEUED, _S.CANCELLED, _S.FAILED}),
    _S.SUCCEEDED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}


class JobStoreError(Exception):
    """Base class of every error raised by the store."""


class UnknownJobError(JobStoreError, LookupError):
    """No job has this id (or name, for ``find``)."""


class AmbiguousJobError(JobStoreError, LookupError):
    """A name matches jobs of several owners; pass ``owner=`` or the job id."""


class DuplicateJobError(JobStoreError, ValueError):
    """The owner already has a non-terminal job with this name."""


class InvalidTransitionError(JobStoreError, ValueError):
    """The transition is not in ``ALLOWED_TRANSITIONS`` (or the job is terminal)."""


class StaleStateError(JobStoreError):
    """``transition(expect=...)`` found the job in another state (compare-and-set lost)."""


class UserExistsError(JobStoreError, ValueError):
    """A user with this name is already registered."""


class SchemaVersionError(JobStoreError):
    """The store file was written by a newer lorafleet, or is not a lorafleet store."""


@dataclass(frozen=True)
class JobRecord:
    """One job as stored. Returned by value: mutating ``spec``/``extra`` changes nothing stored."""

    id: str
    name: str
    owner: str
    priority: int
    state: JobState
    spec: dict[str, Any]
    submit_time: float
    start_time: float | None = None
    end_time: float | None = None
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    worker: str | None = None
    error: str | None = None
    output: str | None = None
    attempts: int = 0
    checkpoint_step: int | None = None
    updated_time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (state as its string value)."""
        d = asdict(self)
        d["state"] = self.state.value
        return d


@dataclass(frozen=True)
class User:
    """A registered identity: jobs it submits are owned by ``name``; ``admin`` may act on every job."""

    name: str
    admin: bool
    created: float


@dataclass(frozen=True)
class Event:
    """One state change. ``from_state`` is None for the creation event (-> QUEUED)."""

    job_id: str
    time: float
    from_state: JobState | None
    to_state: JobState
    reason: str | None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE, name TEXT NOT NULL, owner TEXT NOT NULL,
    priority INTEGER NOT NULL, state TEXT NOT NULL, spec TEXT NOT NULL,
    submit_time REAL NOT NULL, start_time REAL, end_time REAL,
    step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER, loss REAL, tokens_per_s REAL,
    worker TEXT, error TEXT, output TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    checkpoint_step INTEGER, updated_time REAL NOT NULL, extra TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner);
CREATE INDEX IF NOT EXISTS jobs_name ON jobs(name);
CREATE INDEX IF NOT EXISTS jobs_updated ON jobs(updated_time);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_live_name ON jobs(owner, name)
    WHERE state NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED');
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, time REAL NOT NULL,
    from_state TEXT, to_state TEXT NOT NULL, reason TEXT);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, admin INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL);
"""

_COLUMNS = [f for f in JobRecord.__dataclass_fields__]
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"


def _opt_int(name: str, value: Any, minimum: int) -> int | None:
    if value is None:
        return None
    return _int(name, value, minimum)


INT64_MAX = 2**63 - 1  # SQLite's INTEGER


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum} (got {value!r})")
    if value > INT64_MAX:
        raise ValueError(f"{name}: must be at most {INT64_MAX}, what the store holds (got {value!r})")
    return value


def _opt_float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: must be a number or None (got {value!r})")
    return float(value)


def _opt_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name}: must be a string or None (got {value!r})")
    return value


def _json(name: str, value: Any) -> str:
    if not isinstance(value, dict):
        raise ValueError(f"{name}: must be a dict (got {type(value).__name__})")
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: must be JSON-serialisable: {e}") from e


# Fields ``transition(**fields)`` may set, with their validators.
TRANSITION_FIELDS = {
    "worker": lambda v: _opt_str("worker", v),
    "error": lambda v: _opt_str("error", v),
    "output": lambda v: _opt_str("output", v),
    "attempts": lambda v: _int("attempts", v, 0),
    "step": lambda v: _int("step", v, 0),
    "total_steps": lambda v: _opt_int("total_steps", v, 1),
    "checkpoint_step": lambda v: _opt_int("checkpoint_step", v, 0),
}


def _state(value: JobState | str, what: str) -> JobState:
    try:
        return JobState(value)
    except ValueError:
        allowed = ", ".join(s.value for s in JobState)
        raise ValueError(f"{what}: unknown job state {value!r} (allowed: {allowed})") from None


def _names(states: Iterable[JobState]) -> str:
    return ", ".join(sorted(s.value for s in states)) or "none (terminal)"


class JobStore:
    """SQLite-backed job store, safe to share between threads of one process.

    ``path`` is created (with its directory) if missing; ``":memory:"`` gives a throwaway
    store. Raises ``SchemaVersionError`` if the file was written by a newer schema.
    A second process may open the same file (WAL); writes use ``BEGIN IMMEDIATE`` and the
    per-owner name rule is enforced by a unique index, so it holds across processes too.
    """

    def __init__(self, path: str | Path = DEFAULT_PATH, *, timeout_s: float = 30.0):
        self.path = Path(path) if str(path) != ":memory:" else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        target = str(self.path) if self.path is not None else ":memory:"
        self._conn = sqlite3.connect(target, timeout=timeout_s, isolation_level=None,
                                     check_same_thread=False)
        try:
            self._conn.execute("PRAGMA synchronous=FULL")
            self._init_schema()  # first: a file it refuses (another application's) is left as it was
            self._conn.execute("PRAGMA journal_mode=WAL")  # persistent: written into the file's header
        except sqlite3.OperationalError:
            self._conn.close()
            raise
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise SchemaVersionError(f"{target}: not a lorafleet job store ({e})") from e
        except SchemaVersionError:
            self._conn.close()
            raise

    def _init_schema(self) -> None:
        with self._tx() as c:
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "meta" in tables:
                try:
                    row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                    found = int(row[0]) if row else None
                except (sqlite3.Error, ValueError, TypeError):
                    found = None
                if found is None:  # another application's "meta" table: never write into its database
                    raise SchemaVersionError(f"{self.path}: has a meta table without a lorafleet schema_version; "
                                             "not a lorafleet job store")  # fmt: skip
                if found > SCHEMA_VERSION:
                    raise SchemaVersionError(
                        f"{self.path}: job store schema version {found} is newer than this "
                        f"lorafleet supports ({SCHEMA_VERSION}); upgrade lorafleet or use a backup")
            elif tables - {"sqlite_sequence"}:
                raise SchemaVersionError(f"{self.path}: has tables {sorted(tables)} but no meta "
                                         "table; not a lorafleet job store")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                c.execute(statement)
            c.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """Thread lock held; raises ``JobStoreError`` if the store is closed."""
        with self._lock:
            if self._conn is None:
                raise JobStoreError(f"job store {self.path or ':memory:'} is closed")
            yield self._conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Thread lock + ``BEGIN IMMEDIATE`` (one writer across processes); commit or roll back."""
        with self._read() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    # ---- writes -------------------------------------------------------------------------

    def create_job(self, *, spec: dict[str, Any], name: str, owner: str, priority: int,
                   total_steps: int | None = None) -> JobRecord:
        """Insert a QUEUED job with a fresh id (``lf-`` + 10 hex chars) and return it.

        Raises ``DuplicateJobError`` if ``owner`` has a non-terminal job named ``name``;
        ``ValueError`` (naming the field) for an empty name/owner, a non-int priority, a
        ``total_steps`` < 1 or a spec that is not a JSON-serialisable dict.
        """
        for fname, v in (("name", name), ("owner", owner)):
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{fname}: must be a non-empty string (got {v!r})")
        int64 = isinstance(priority, int) and -INT64_MAX - 1 <= priority <= INT64_MAX
        if isinstance(priority, bool) or not int64:
            raise ValueError(f"priority: must be an integer of at most 64 bits (got {priority!r})")
        total_steps = _opt_int("total_steps", total_steps, 1)
        spec_json = _json("spec", spec)
        with self._tx() as c:
            now = time.time()  # under the write lock, as every write's updated_time (see changed_since)
            live = c.execute(
                "SELECT id, state FROM jobs WHERE owner=? AND name=? AND state NOT IN (?,?,?)",
                (owner, name, *sorted(s.value for s in TERMINAL_STATES))).fetchone()
            if live is not None:
                raise DuplicateJobError(
                    f"owner {owner!r} already has job {live[0]} named {name!r} in state {live[1]}; "
                    "cancel it or wait for it to finish, or choose another name")
            while True:
                job_id = "lf-" + secrets.token_hex(5)
                if c.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone() is None:
                    break
            c.execute("INSERT INTO jobs (id, name, owner, priority, state, spec, submit_time, "
                      "total_steps, updated_time) VALUES (?,?,?,?,?,?,?,?,?)",
                      (job_id, name, owner, priority, JobState.QUEUED.value, spec_json, now,
                       total_steps, now))  # the check above holds: BEGIN IMMEDIATE serialises writers
            c.execute("INSERT INTO events (job_id, time, from_state, to_state, reason) "
                      "VALUES (?,?,NULL,?,?)", (job_id, now, JobState.QUEUED.value, "submitted"))
            return self._get(c, job_id)

    def transition(self, job_id: str, new_state: JobState | str, *, reason: str | None = None,
                   expect: JobState | str | Iterable[JobState | str] | None = None,
                   **fields: Any) -> JobRecord:
        """Move ``job_id`` to ``new_state``, durably, and return the updated record.

        ``expect`` (a state or a set of states) makes it a compare-and-set: raises
        ``StaleStateError`` if the job's current state is not among them. ``fields`` may set
        any of ``TRANSITION_FIELDS``, atomically with the state and its event row.
        Raises ``UnknownJobError``, ``InvalidTransitionError`` (not in the table, or the job
        is terminal), ``ValueError`` for an unknown state or a bad/unknown field.
        """
        target = _state(new_state, "new_state")
        unknown = set(fields) - set(TRANSITION_FIELDS)
        if unknown:
            raise ValueError(f"transition({job_id}): unknown field(s) {sorted(unknown)}; "
                             f"allowed: {sorted(TRANSITION_FIELDS)}")
        updates = {k: TRANSITION_FIELDS[k](v) for k, v in fields.items()}
        _opt_str("reason", reason)
        expected = None
        if expect is not None:
            items = [expect] if isinstance(expect, (str, JobState)) else list(expect)
            expected = {_state(s, "expect") for s in items}
        with self._tx() as c:
            now = time.time()  # once the write lock is held: events and start/end times in commit order
            cur = self._get(c, job_id)
            if expected is not None and cur.state not in expected:
                raise StaleStateError(f"job {job_id}: expected state {_names(expected)} but it is "
                                      f"{cur.state.value}; not moving it to {target.value}")
            allowed = ALLOWED_TRANSITIONS[cur.state]
            if target not in allowed:
                why = " (a terminal state)" if cur.state.is_terminal() else ""
                raise InvalidTransitionError(
                    f"job {job_id}: cannot go from {cur.state.value}{why} to {target.value}; "
                    f"allowed from {cur.state.value}: {_names(allowed)}")
            sets: dict[str, Any] = {"state": target.value, "updated_time": now}
            if target is JobState.RUNNING:
                sets["attempts"] = cur.attempts + 1
                if cur.start_time is None:
                    sets["start_time"] = now
            if target.is_terminal():
                sets["end_time"] = now
            if target in (JobState.QUEUED, JobState.PREEMPTED):
                sets["worker"] = None
            sets.update(updates)
            c.execute(f"UPDATE jobs SET {', '.join(f'{k}=?' for k in sets)} WHERE id=?",
                      (*sets.values(), job_id))
            c.execute("INSERT INTO events (job_id, time, from_state, to_state, reason) "
                      "VALUES (?,?,?,?,?)", (job_id, now, cur.state.value, target.value, reason))
            return self._get(c, job_id)

    def reopen(self, job_id: str, *, reason: str, step: int | None = None,
               extra: dict[str, Any] | None = None) -> JobRecord:
        """Queue a FAILED or CANCELLED job again under its id, durably, and return it.

        The job keeps its spec, output, step and checkpoint step (it resumes from its own
        checkpoints); it becomes the newest job (``find`` by name, ``list``) and its ``submit_time``
        becomes now (it queues behind the jobs already waiting),
        ``start_time``, ``end_time``, ``error`` and ``worker`` are cleared, ``step`` and ``extra``
        (when given) replace the stored ones, and the event row records ``reason``.
        Raises ``UnknownJobError``; ``InvalidTransitionError`` for a job that is not FAILED or
        CANCELLED (a SUCCEEDED job is done; a live one needs nothing); ``DuplicateJobError`` when
        the owner has another live job of the same name.
        """
        _opt_str("reason", reason)
        step = _opt_int("step", step, 0)
        extra_json = None if extra is None else _json("extra", extra)
        with self._tx() as c:
            now = time.time()
            cur = self._get(c, job_id)
            if cur.state not in (JobState.FAILED, JobState.CANCELLED):
                raise InvalidTransitionError(
                    f"job {job_id}: only a FAILED or CANCELLED job can be queued again; it is {cur.state.value}")
            live = c.execute(
                "SELECT id, state FROM jobs WHERE owner=? AND name=? AND id<>? AND state NOT IN (?,?,?)",
                (cur.owner, cur.name, job_id, *sorted(s.value for s in TERMINAL_STATES))).fetchone()
            if live is not None:
                raise DuplicateJobError(
                    f"owner {cur.owner!r} already has job {live[0]} named {cur.name!r} in state {live[1]}; "
                    f"cancel it or wait for it to finish before queueing {job_id} again")
            # the newest job again (``seq``): ``find`` by name and ``list`` (newest first) show it, not a
            # job of that name submitted after it and ended since
            # past every seq ever used, as AUTOINCREMENT's inserts go (its counter moves with it: never reused)
            counter = c.execute("SELECT seq FROM sqlite_sequence WHERE name='jobs'").fetchone()
            newest = max(c.execute("SELECT MAX(seq) FROM jobs").fetchone()[0], counter[0] if counter else 0)
            c.execute("UPDATE sqlite_sequence SET seq=? WHERE name='jobs'", (newest + 1,))
            sets: dict[str, Any] = {"state": JobState.QUEUED.value, "submit_time": now, "start_time": None,
                                    "end_time": None, "error": None, "worker": None, "updated_time": now,
                                    "seq": newest + 1}
            if step is not None:
                sets["step"] = step
            if extra_json is not None:
                sets["extra"] = extra_json
            c.execute(f"UPDATE jobs SET {', '.join(f'{k}=?' for k in sets)} WHERE id=?",
                      (*sets.values(), job_id))
            c.execute("INSERT INTO events (job_id, time, from_state, to_state, reason) "
                      "VALUES (?,?,?,?,?)", (job_id, now, cur.state.value, JobState.QUEUED.value, reason))
            return self._get(c, job_id)

    def update_progress(self, job_id: str, *, step: int, total_steps: int | None = None,
                        loss: float | None = None, tokens_per_s: float | None = None,
                        worker: str | None = None, checkpoint_step: int | None = None,
                        extra: dict[str, Any] | None = None) -> bool:
        """Record training progress (frequent; writes no event row).

        Arguments left at None keep their stored value; ``extra`` is merged key by key into
        the stored ``extra``. Returns True if stored, False (and stores nothing) if the job is
        already terminal: a late report from a worker racing a cancel is harmless.
        Raises ``UnknownJobError``, ``ValueError`` for a bad value (naming the argument).
        """
        sets: dict[str, Any] = {"step": _int("step", step, 0)}
        optional = {"total_steps": _opt_int("total_steps", total_steps, 1),
                    "loss": _opt_float("loss", loss),
                    "tokens_per_s": _opt_float("tokens_per_s", tokens_per_s),
                    "worker": _opt_str("worker", worker),
                    "checkpoint_step": _opt_int("checkpoint_step", checkpoint_step, 0)}
        sets.update({k: v for k, v in optional.items() if v is not None})
        if extra is not None:
            _json("extra", extra)
        with self._tx() as c:
            cur = self._get(c, job_id)
            if cur.state.is_terminal():
                return False
            if extra:
                sets["extra"] = _json("extra", {**cur.extra, **extra})
            sets["updated_time"] = time.time()
            c.execute(f"UPDATE jobs SET {', '.join(f'{k}=?' for k in sets)} WHERE id=?",
                      (*sets.values(), job_id))
            return True

    def record_checkpoint(self, job_id: str, step: int) -> bool:
        """Record the newest checkpoint a worker reported for a job, also once it has ended (a cancelled
        job's worker reports it when it drops the job, after the cancel was committed): where a retry
        resumes. Never moves the step back; writes no event. Returns True if stored."""
        step = _int("checkpoint_step", step, 0)
        with self._tx() as c:
            cur = self._get(c, job_id)
            if cur.checkpoint_step is not None and cur.checkpoint_step >= step:
                return False
            c.execute("UPDATE jobs SET checkpoint_step=?, updated_time=? WHERE id=?", (step, time.time(), job_id))
            return True

    # ---- reads --------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        """The job with this id. Raises ``UnknownJobError``."""
        with self._read() as c:
            return self._get(c, job_id)

    def find(self, id_or_name: str, *, owner: str | None = None) -> JobRecord:
        """The job with this id, else the newest job with this name (of ``owner`` if given).

        Raises ``UnknownJobError`` if nothing matches, ``AmbiguousJobError`` if ``owner`` is
        None and the name is used by several owners.
        """
        with self._read() as c:
            rows = c.execute(_SELECT + " WHERE id=?", (id_or_name,)).fetchall()
            if rows and (owner is None or rows[0][2] == owner):
                return _record(rows[0])
            q, args = _SELECT + " WHERE name=?", [id_or_name]
            if owner is not None:
                q, args = q + " AND owner=?", [*args, owner]
            rows = c.execute(q + " ORDER BY seq DESC", args).fetchall()
        if not rows:
            whose = f" of owner {owner!r}" if owner is not None else ""
            raise UnknownJobError(f"no job{whose} with id or name {id_or_name!r}")
        owners = sorted({r[2] for r in rows})
        if len(owners) > 1:
            ids = ", ".join(f"{r[0]} ({r[2]})" for r in rows[:10])
            raise AmbiguousJobError(f"name {id_or_name!r} is used by owners {owners}: {ids}; "
                                    "pass the job id or an owner")
        return _record(rows[0])

    def changed_since(self, since: float) -> list[JobRecord]:
        """Jobs written at or after ``since`` (their ``updated_time``), in any state, oldest write first.

        Every write (create, transition, progress) sets ``updated_time`` under the write lock, so
        writes are stamped in commit order: a reader that keeps the live jobs reads only what changed
        since its last read (less a margin for clock steps; ``Controller._live_records``).
        """
        with self._read() as c:
            rows = c.execute(_SELECT + " WHERE updated_time >= ? ORDER BY updated_time", (since,)).fetchall()
        return [_record(r) for r in rows]

    def list(self, *, states: Iterable[JobState | str] | None = None, owner: str | None = None,
             limit: int | None = None) -> list[JobRecord]:
        """Jobs newest first, filtered by ``states`` and ``owner``, at most ``limit`` of them."""
        where, args = [], []
        if states is not None:
            if isinstance(states, str | JobState):  # one state (a string was read letter by letter: 'Q')
                states = [states]
            wanted = sorted({_state(s, "states").value for s in states})
            where.append(f"state IN ({','.join('?' * len(wanted))})")
            args += wanted
        if owner is not None:
            where.append("owner=?")
            args.append(owner)
        q = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq DESC"
        if limit is not None:
            q += " LIMIT ?"
            args.append(_int("limit", limit, 0))
        with self._read() as c:
            rows = c.execute(q, args).fetchall()
        return [_record(r) for r in rows]

    def events(self, job_id: str) -> list[Event]:
        """State changes of ``job_id``, oldest first (creation first). Raises ``UnknownJobError``."""
        with self._read() as c:
            self._get(c, job_id)
            rows = c.execute("SELECT job_id, time, from_state, to_state, reason FROM events "
                                      "WHERE job_id=? ORDER BY seq", (job_id,)).fetchall()
        return [Event(r[0], r[1], JobState(r[2]) if r[2] else None, JobState(r[3]), r[4]) for r in rows]

    def recover(self) -> list[JobRecord]:
        """Non-terminal jobs, oldest first, for a controller that just (re)started.

        Changes nothing: the caller decides what to do with each, typically requeue RUNNING and
        PROFILING jobs (``transition(id, QUEUED, expect=RUNNING, reason="controller restart")``)
        and PREEMPTED ones, and keep QUEUED ones in line.
        """
        live = [s for s in JobState if not s.is_terminal()]
        return list(reversed(self.list(states=live)))

    def counts(self) -> dict[JobState, int]:
        """Number of jobs in each state (every state present, zero if none)."""
        with self._read() as c:
            rows = c.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(JobState, 0)
        out.update({JobState(s): n for s, n in rows})
        return out

    # ---- users (API key hashes; orchestrator.auth makes and checks the keys) -------------

    def add_user(self, name: str, key_hash: str, *, admin: bool = False) -> User:
        """Register ``name`` with the SHA-256 hex digest of its API key (the key itself is never stored).

        Raises ``UserExistsError`` if the name is taken, ``ValueError`` for an empty name or hash.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: must be a non-empty string (got {name!r})")
        if not isinstance(key_hash, str) or len(key_hash) != 64:
            raise ValueError("key_hash: must be a SHA-256 hex digest (64 characters)")
        user = User(name, bool(admin), time.time())
        with self._tx() as c:
            if c.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
                raise UserExistsError(f"user {name!r} already exists; remove it first to issue a new key")
            c.execute("INSERT INTO users (name, key_hash, admin, created) VALUES (?,?,?,?)",
                      (name, key_hash, int(user.admin), user.created))
        return user

    def remove_user(self, name: str) -> bool:
        """Forget ``name`` and its key; returns whether it existed. Its jobs keep their owner.

        Raises ``ValueError`` for the only admin: without one nobody could add users, set the
        policy or shut the cluster down (and with no user left every caller would be admin again).
        """
        with self._tx() as c:
            row = c.execute("SELECT admin FROM users WHERE name=?", (name,)).fetchone()
            if row is None:
                return False
            if row[0] and c.execute("SELECT COUNT(*) FROM users WHERE admin=1").fetchone()[0] <= 1:
                raise ValueError(f"name: {name!r} is the only admin; add another admin first (lorafleet admin "
                                 "add-user NAME --admin): without one nobody could add users, set the policy or "
                                 "shut the cluster down")  # fmt: skip
            return c.execute("DELETE FROM users WHERE name=?", (name,)).rowcount > 0

    def user_by_key_hash(self, key_hash: str) -> User | None:
        """The user whose API key hashes to ``key_hash``, or None."""
        with self._read() as c:
            row = c.execute("SELECT name, admin, created FROM users WHERE key_hash=?", (key_hash,)).fetchone()
        return User(row[0], bool(row[1]), row[2]) if row else None

    def users(self) -> list[User]:
        """Every registered user, by name (no key material)."""
        with self._read() as c:
            rows = c.execute("SELECT name, admin, created FROM users ORDER BY name").fetchall()
        return [User(n, bool(a), t) for n, a, t in rows]

    def has_users(self) -> bool:
        """True once any user is registered (the controller then requires an API key on every call)."""
        with self._read() as c:
            return c.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None

    # ---- maintenance --------------------------------------------------------------------

    def prune(self, *, older_than_s: float, states: JobState | str | Iterable[JobState | str] | None = None,
              owner: str | None = None, dry_run: bool = False) -> list[str]:
        """Delete ended jobs whose ``end_time`` is more than ``older_than_s`` seconds ago, with their events.

        Only SUCCEEDED, FAILED and CANCELLED jobs are ever deleted (``states`` narrows them, ``owner``
        keeps only that owner's), so a live job is never touched. The rows and their event rows go in
        one write transaction; ``dry_run`` deletes nothing and returns what would go. Returns the
        deleted ids, oldest ``end_time`` first. No file is deleted: adapters, checkpoints and outputs
        in the artifact storage stay where they are (they belong to the users).

        A controller keeps the live jobs it last read (``changed_since``); a job that ended since its
        last pass is still live there, so prune a running controller's store through its
        ``prune_jobs`` (``lorafleet admin prune``), which also drops the ids from that view.

        Raises ``ValueError`` for an ``older_than_s`` that is not a finite number >= 0, an unknown
        or non-terminal state in ``states``, or an empty ``owner``.
        """
        if (isinstance(older_than_s, bool) or not isinstance(older_than_s, (int, float))
                or not math.isfinite(older_than_s) or older_than_s < 0):
            raise ValueError(f"older_than_s: must be a finite number of seconds >= 0 (got {older_than_s!r})")
        allowed = _names(TERMINAL_STATES)
        if states is None:
            wanted = set(TERMINAL_STATES)
        else:
            items = [states] if isinstance(states, (str, JobState)) else list(states)
            wanted = {_state(s, "states") for s in items}
            live = sorted(s.value for s in wanted - TERMINAL_STATES)
            if live:
                what = "is not a terminal state" if len(live) == 1 else "are not terminal states"
                raise ValueError(f"states: {', '.join(live)} {what}; prune deletes only ended jobs "
                                 f"(allowed: {allowed})")  # fmt: skip
            if not wanted:
                raise ValueError(f"states: empty; give at least one of {allowed}, or None for all of them")
        if owner is not None and (not isinstance(owner, str) or not owner.strip()):
            raise ValueError(f"owner: must be a non-empty string or None (got {owner!r})")
        names = sorted(s.value for s in wanted)
        where = f"state IN ({','.join('?' * len(names))}) AND end_time IS NOT NULL AND end_time < ?"
        if owner is not None:
            where += " AND owner=?"
        with (self._read() if dry_run else self._tx()) as c:
            # The cutoff is taken once the lock is held, as every write's time is.
            params = [*names, time.time() - older_than_s, *([owner] if owner is not None else [])]
            ids = [r[0] for r in c.execute(f"SELECT id FROM jobs WHERE {where} ORDER BY end_time, seq",
                                           params).fetchall()]  # fmt: skip
            if ids and not dry_run:
                c.execute(f"DELETE FROM events WHERE job_id IN (SELECT id FROM jobs WHERE {where})", params)
                deleted = c.execute(f"DELETE FROM jobs WHERE {where}", params).rowcount
                if deleted != len(ids):  # cannot happen under BEGIN IMMEDIATE; never commit a partial prune
                    raise JobStoreError(f"prune: selected {len(ids)} jobs but deleted {deleted}; rolled back")
        return ids

    def spec_matches(self, pattern: str | re.Pattern[str], *, exclude: Iterable[str] = (),
                     page: int = 500) -> set[str]:  # fmt: skip
        """Every text ``pattern`` matches in the stored specs (as JSON) of the jobs not in ``exclude``: its
        first group where it has one, else the whole match (a lookahead group finds overlapping ones).

        One pass over the jobs, ``page`` rows per read: the store's lock is held for each read only, not
        while the texts are searched, so other callers wait at most one page.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        skip = set(exclude)
        found: set[str] = set()
        last = 0
        while True:
            with self._read() as c:
                rows = c.execute("SELECT seq, id, spec FROM jobs WHERE seq > ? ORDER BY seq LIMIT ?",
                                 (last, page)).fetchall()  # fmt: skip
            for _seq, job_id, text in rows:
                if job_id not in skip:
                    found.update(m.group(1) if regex.groups else m.group(0) for m in regex.finditer(text))
            if len(rows) < page:
                return found
            last = rows[-1][0]

    def backup(self, dest_path: str | Path) -> Path:
        """Write a consistent copy of the store to ``dest_path`` with SQLite's online backup API.

        Safe while other threads/processes write. The copy is a self-contained file (no WAL
        needed). ``dest_path`` is replaced if it exists; its directory is created. Returns it.
        Raises ``ValueError`` if it is the store's own file.
        """
        dest = Path(dest_path)
        if self.path is not None and dest.resolve() == self.path.resolve():
            raise ValueError(f"backup: destination {dest} is the store file itself")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        out = sqlite3.connect(str(tmp))
        try:
            with self._read() as c:
                c.backup(out)
            out.execute("PRAGMA journal_mode=DELETE")
        finally:
            out.close()
        for stale in (dest.with_name(dest.name + "-wal"), dest.with_name(dest.name + "-shm")):
            stale.unlink(missing_ok=True)  # a WAL left by whoever last opened the old copy would replay onto this one
        os.replace(tmp, dest)
        return dest

    def close(self) -> None:
        """Close the connection (the last one to close checkpoints the WAL into the main file).

        Later calls raise ``JobStoreError``; calling ``close`` again does nothing.
        """
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _get(c: sqlite3.Connection, job_id: str) -> JobRecord:
        row = c.execute(_SELECT + " WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJobError(f"no job with id {job_id!r}")
        return _record(row)


def _record(row: tuple[Any, ...]) -> JobRecord:
    d = dict(zip(_COLUMNS, row, strict=True))
    d["state"] = JobState(d["state"])
    d["spec"] = json.loads(d["spec"])
    d["extra"] = json.loads(d["extra"])
    return JobRecord(**d)

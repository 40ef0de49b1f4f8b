"""Tests of the durable job store (orchestrator/store.py)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.store import (
    ALLOWED_TRANSITIONS,
    SCHEMA_VERSION,
    AmbiguousJobError,
    DuplicateJobError,
    InvalidTransitionError,
    JobState,
    JobStore,
    JobStoreError,
    SchemaVersionError,
    StaleStateError,
    UnknownJobError,
)

S = JobState
REPO = Path(__file__).resolve().parents[2]

# The lifecycle as specified, written out independently of the module's table.
EXPECTED = {
    S.QUEUED: {S.PROFILING, S.RUNNING, S.CANCELLED, S.FAILED},
    S.PROFILING: {S.RUNNING, S.QUEUED, S.FAILED, S.CANCELLED, S.PREEMPTED},
    S.RUNNING: {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.PREEMPTED, S.QUEUED},
    S.PREEMPTED: {S.QUEUED, S.CANCELLED, S.FAILED},
    S.SUCCEEDED: set(),
    S.FAILED: set(),
    S.CANCELLED: set(),
}
# How to reach each state from QUEUED.
PATH_TO = {
    S.QUEUED: [],
    S.PROFILING: [S.PROFILING],
    S.RUNNING: [S.RUNNING],
    S.SUCCEEDED: [S.RUNNING, S.SUCCEEDED],
    S.FAILED: [S.FAILED],
    S.CANCELLED: [S.CANCELLED],
    S.PREEMPTED: [S.RUNNING, S.PREEMPTED],
}
PAIRS = [(a, b) for a in S for b in S]


@pytest.fixture
def store(tmp_path: Path):
    with JobStore(tmp_path / "jobs.db") as s:
        yield s


def make(store: JobStore, name: str = "job", owner: str = "alice", priority: int = 0, **kw):
    return store.create_job(spec={"name": name, "lr": 2e-4}, name=name, owner=owner, priority=priority, **kw)


def reach(store: JobStore, state: JobState, name: str = "job"):
    job = make(store, name)
    for step in PATH_TO[state]:
        job = store.transition(job.id, step)
    assert job.state is state
    return job


# ---- transition table ------------------------------------------------------------------


def test_module_table_matches_spec():
    assert {k: set(v) for k, v in ALLOWED_TRANSITIONS.items()} == EXPECTED
    assert {s for s in S if s.is_terminal()} == {S.SUCCEEDED, S.FAILED, S.CANCELLED}


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_every_pair(store: JobStore, src: JobState, dst: JobState):
    job = reach(store, src)
    n_events = len(store.events(job.id))
    if dst in EXPECTED[src]:
        out = store.transition(job.id, dst, reason="table")
        assert out.state is dst
        assert store.get(job.id).state is dst
        last = store.events(job.id)[-1]
        assert (last.from_state, last.to_state, last.reason) == (src, dst, "table")
    else:
        with pytest.raises(InvalidTransitionError) as e:
            store.transition(job.id, dst)
        msg = str(e.value)
        assert job.id in msg and src.value in msg and dst.value in msg
        assert store.get(job.id).state is src
        assert len(store.events(job.id)) == n_events


def test_refusal_names_allowed_targets_and_terminal(store: JobStore):
    job = reach(store, S.PREEMPTED)
    with pytest.raises(InvalidTransitionError, match=r"allowed from PREEMPTED: CANCELLED, FAILED, QUEUED"):
        store.transition(job.id, S.SUCCEEDED)
    done = reach(store, S.SUCCEEDED, name="done")
    with pytest.raises(InvalidTransitionError, match=r"SUCCEEDED \(a terminal state\).*none \(terminal\)"):
        store.transition(done.id, "QUEUED")


def test_unknown_state_and_field(store: JobStore):
    job = make(store)
    with pytest.raises(ValueError, match=r"unknown job state 'DONE'.*QUEUED"):
        store.transition(job.id, "DONE")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['gpu'\].*allowed"):
        store.transition(job.id, S.RUNNING, gpu=3)
    with pytest.raises(ValueError, match=r"attempts: must be an integer >= 0 \(got -1\)"):
        store.transition(job.id, S.RUNNING, attempts=-1)
    with pytest.raises(UnknownJobError, match="lf-nope"):
        store.transition("lf-nope", S.RUNNING)
    assert store.get(job.id).state is S.QUEUED and len(store.events(job.id)) == 1


# ---- create ------------------------------------------------------------------------------


def test_create_job(store: JobStore):
    job = store.create_job(spec={"a": [1, 2], "b": {"c": None}}, name="rev", owner="bob", priority=3,
                           total_steps=100)
    assert job.id.startswith("lf-") and len(job.id) == 13 and int(job.id[3:], 16) >= 0
    assert (job.name, job.owner, job.priority, job.state) == ("rev", "bob", 3, S.QUEUED)
    assert job.spec == {"a": [1, 2], "b": {"c": None}}
    assert job.total_steps == 100 and job.step == 0 and job.attempts == 0
    assert job.start_time is None and job.end_time is None and job.submit_time > 0
    assert store.get(job.id) == job
    (ev,) = store.events(job.id)
    assert (ev.from_state, ev.to_state, ev.reason) == (None, S.QUEUED, "submitted")
    assert len({make(store, name=f"n{i}").id for i in range(50)}) == 50


def test_duplicate_name_rules(store: JobStore):
    first = make(store, "x", owner="alice")
    with pytest.raises(DuplicateJobError, match=rf"{first.id}.*'x'.*QUEUED"):
        make(store, "x", owner="alice")
    make(store, "x", owner="bob")  # another owner: fine
    store.transition(first.id, S.RUNNING)
    store.transition(first.id, S.PREEMPTED)  # still live
    with pytest.raises(DuplicateJobError):
        make(store, "x", owner="alice")
    store.transition(first.id, S.CANCELLED)
    second = make(store, "x", owner="alice")  # the old one is terminal now
    assert second.id != first.id
    assert len(store.list(owner="alice")) == 2


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"name": ""}, r"name: must be a non-empty string"),
    ({"owner": "  "}, r"owner: must be a non-empty string"),
    ({"priority": True}, r"priority: must be an integer"),
    ({"priority": 1.5}, r"priority: must be an integer"),
    ({"total_steps": 0}, r"total_steps: must be an integer >= 1 \(got 0\)"),
    ({"total_steps": 2**63}, r"total_steps: must be at most 9223372036854775807, what the store holds"),
    ({"priority": -(2**63) - 1}, r"priority: must be an integer of at most 64 bits"),
    ({"spec": {"f": {1, 2}}}, r"spec: must be JSON-serialisable"),
    ({"spec": {"x": float("nan")}}, r"spec: must be JSON-serialisable"),
    ({"spec": [1]}, r"spec: must be a dict"),
])
def test_create_validation(store: JobStore, kwargs, pattern):
    args = {"spec": {}, "name": "n", "owner": "o", "priority": 0, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        store.create_job(**args)
    assert store.list() == []


# ---- transition details -------------------------------------------------------------------


def test_transition_side_effects_and_fields(store: JobStore):
    job = make(store)
    run = store.transition(job.id, S.RUNNING, worker="w1", reason="placed")
    assert run.attempts == 1 and run.worker == "w1" and run.start_time is not None
    requeued = store.transition(job.id, S.QUEUED, reason="OOM", error="CUDA OOM")
    assert requeued.worker is None and requeued.error == "CUDA OOM"
    assert requeued.start_time == run.start_time  # first start is kept
    run2 = store.transition(job.id, S.RUNNING, worker="w2", checkpoint_step=40, step=40)
    assert run2.attempts == 2 and (run2.worker, run2.checkpoint_step, run2.step) == ("w2", 40, 40)
    done = store.transition(job.id, S.SUCCEEDED, output="/out/job", error=None)
    assert done.end_time is not None and done.end_time >= done.start_time
    assert (done.output, done.error, done.worker) == ("/out/job", None, "w2")
    assert [(e.from_state, e.to_state, e.reason) for e in store.events(job.id)] == [
        (None, S.QUEUED, "submitted"), (S.QUEUED, S.RUNNING, "placed"), (S.RUNNING, S.QUEUED, "OOM"),
        (S.QUEUED, S.RUNNING, None), (S.RUNNING, S.SUCCEEDED, None)]
    explicit = store.transition(make(store, "other").id, S.RUNNING, attempts=7)
    assert explicit.attempts == 7


def test_expect_compare_and_set(store: JobStore):
    job = make(store)
    assert store.transition(job.id, S.RUNNING, expect=S.QUEUED).state is S.RUNNING
    with pytest.raises(StaleStateError, match=rf"{job.id}: expected state QUEUED but it is RUNNING"):
        store.transition(job.id, S.CANCELLED, expect=S.QUEUED)
    with pytest.raises(StaleStateError, match="expected state PREEMPTED, QUEUED"):
        store.transition(job.id, S.CANCELLED, expect={"QUEUED", S.PREEMPTED})
    assert store.get(job.id).state is S.RUNNING and len(store.events(job.id)) == 2
    assert store.transition(job.id, S.CANCELLED, expect={S.RUNNING, S.PROFILING}).state is S.CANCELLED


# ---- progress --------------------------------------------------------------------------------


def test_update_progress(store: JobStore):
    job = store.transition(make(store).id, S.RUNNING, worker="w1")
    assert store.update_progress(job.id, step=5, total_steps=100, loss=2.5, tokens_per_s=900.0,
                                 extra={"lr": 1e-4})
    assert store.update_progress(job.id, step=6, loss=2.4, checkpoint_step=5, extra={"gpu_mem": 3})
    got = store.get(job.id)
    assert (got.step, got.total_steps, got.loss, got.tokens_per_s) == (6, 100, 2.4, 900.0)
    assert got.checkpoint_step == 5 and got.worker == "w1"
    assert got.extra == {"lr": 1e-4, "gpu_mem": 3}
    assert got.updated_time >= job.updated_time
    assert len(store.events(job.id)) == 2  # progress writes no events
    with pytest.raises(ValueError, match=r"loss: must be a number or None \(got 'x'\)"):
        store.update_progress(job.id, step=7, loss="x")
    with pytest.raises(ValueError, match=r"step: must be an integer >= 0"):
        store.update_progress(job.id, step=-1)
    with pytest.raises(ValueError, match="extra: must be JSON-serialisable"):
        store.update_progress(job.id, step=7, extra={"o": object()})
    assert store.get(job.id).step == 6
    with pytest.raises(UnknownJobError, match="lf-0000000000"):
        store.update_progress("lf-0000000000", step=1)


def test_update_progress_ignored_when_terminal(store: JobStore):
    job = store.transition(make(store).id, S.CANCELLED)
    assert store.update_progress(job.id, step=99, loss=0.1) is False
    assert store.get(job.id) == job


# ---- reads ----------------------------------------------------------------------------------


def test_get_and_find(store: JobStore):
    with pytest.raises(UnknownJobError, match="lf-abc"):
        store.get("lf-abc")
    old = make(store, "train", owner="alice")
    store.transition(old.id, S.FAILED)
    new = make(store, "train", owner="alice")
    assert store.find(old.id) == store.get(old.id)
    assert store.find("train").id == new.id  # newest of that name
    assert store.find("train", owner="alice").id == new.id
    bob = make(store, "train", owner="bob")
    with pytest.raises(AmbiguousJobError, match=r"owners \['alice', 'bob'\]"):
        store.find("train")
    assert store.find("train", owner="bob").id == bob.id
    with pytest.raises(UnknownJobError, match="of owner 'carol' with id or name 'train'"):
        store.find("train", owner="carol")
    with pytest.raises(UnknownJobError, match="'nothing'"):
        store.find("nothing")


def test_list_and_counts_and_recover(store: JobStore):
    jobs = [make(store, f"j{i}", owner="alice" if i % 2 else "bob") for i in range(6)]
    store.transition(jobs[0].id, S.RUNNING)
    store.transition(jobs[1].id, S.PROFILING)
    store.transition(jobs[2].id, S.CANCELLED)
    store.transition(jobs[3].id, S.RUNNING)
    store.transition(jobs[3].id, S.SUCCEEDED)
    assert [j.id for j in store.list()] == [j.id for j in reversed(jobs)]
    assert [j.id for j in store.list(limit=2)] == [jobs[5].id, jobs[4].id]
    assert {j.id for j in store.list(owner="alice")} == {jobs[1].id, jobs[3].id, jobs[5].id}
    assert {j.id for j in store.list(states=["RUNNING", S.PROFILING])} == {jobs[0].id, jobs[1].id}
    assert store.list(states=[S.QUEUED], owner="bob") == [store.get(jobs[4].id)]
    assert store.list(states=[]) == []
    with pytest.raises(ValueError, match="unknown job state 'RUN'"):
        store.list(states=["RUN"])
    counts = store.counts()
    assert set(counts) == set(S)
    assert counts == {S.QUEUED: 2, S.RUNNING: 1, S.PROFILING: 1, S.CANCELLED: 1, S.SUCCEEDED: 1,
                      S.FAILED: 0, S.PREEMPTED: 0}
    before = store.list()
    assert [j.id for j in store.recover()] == [jobs[0].id, jobs[1].id, jobs[4].id, jobs[5].id]
    assert store.list() == before  # recover changes nothing


def test_to_dict_is_json(store: JobStore):
    job = store.transition(make(store).id, S.RUNNING)
    store.update_progress(job.id, step=1, loss=1.0, extra={"k": [1]})
    d = store.get(job.id).to_dict()
    assert d["state"] == "RUNNING" and d["extra"] == {"k": [1]} and d["spec"]["name"] == "job"
    assert json.loads(json.dumps(d)) == d


def test_many_jobs_listing(store: JobStore):
    for i in range(1000):
        store.create_job(spec={"i": i}, name=f"job-{i}", owner=f"u{i % 7}", priority=i % 3)
    assert len(store.list()) == 1000
    assert sum(store.counts().values()) == 1000
    assert len(store.list(owner="u3", states=[S.QUEUED])) == len(range(3, 1000, 7))
    with sqlite3.connect(store.path) as c:
        idx = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"jobs_state", "jobs_owner", "jobs_name", "events_job"} <= idx


# ---- file, schema, lifecycle -----------------------------------------------------------------


def test_creates_directory_and_pragmas(tmp_path: Path):
    path = tmp_path / "a" / "b" / "jobs.db"
    with JobStore(path) as s:
        make(s)
        assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)


def test_refuses_newer_schema(tmp_path: Path):
    path = tmp_path / "jobs.db"
    JobStore(path).close()
    with sqlite3.connect(path) as c:
        c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(SchemaVersionError, match=rf"version {SCHEMA_VERSION + 1} is newer.*\({SCHEMA_VERSION}\)"):
        JobStore(path)


def test_refuses_foreign_files(tmp_path: Path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SchemaVersionError, match="not a lorafleet job store"):
        JobStore(junk)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE things (x)")
    with pytest.raises(SchemaVersionError, match=r"\['things'\].*not a lorafleet job store"):
        JobStore(other)


def test_close_and_reopen(tmp_path: Path):
    path = tmp_path / "jobs.db"
    s = JobStore(path)
    job = make(s)
    s.transition(job.id, S.RUNNING, worker="w")
    s.close()
    s.close()  # idempotent
    with pytest.raises(JobStoreError, match="closed"):
        s.get(job.id)
    with pytest.raises(JobStoreError, match="closed"):
        make(s, "again")
    with JobStore(path) as again:
        assert again.get(job.id).state is S.RUNNING and again.get(job.id).worker == "w"
        assert len(again.events(job.id)) == 2


def test_second_store_sees_commits_and_name_rule(tmp_path: Path):
    path = tmp_path / "jobs.db"
    with JobStore(path) as a, JobStore(path) as b:
        job = make(a, "shared")
        assert b.get(job.id) == job
        with pytest.raises(DuplicateJobError, match=job.id):
            make(b, "shared")
        b.transition(job.id, S.RUNNING)
        assert a.get(job.id).state is S.RUNNING


def test_backup(tmp_path: Path, store: JobStore):
    jobs = [make(store, f"b{i}") for i in range(5)]
    store.transition(jobs[0].id, S.RUNNING)
    dest = store.backup(tmp_path / "backups" / "copy.db")
    make(store, "after-backup")
    with JobStore(dest) as copy:
        assert {j.id for j in copy.list()} == {j.id for j in jobs}
        assert copy.get(jobs[0].id).state is S.RUNNING
        assert len(copy.events(jobs[0].id)) == 2
    with pytest.raises(ValueError, match="is the store file itself"):
        store.backup(store.path)
    memory = JobStore(":memory:")
    make(memory)
    with JobStore(memory.backup(tmp_path / "mem.db")) as copy:
        assert len(copy.list()) == 1
    memory.close()


# ---- concurrency and crashes -------------------------------------------------------------------


def run_threads(n: int, target) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            target(i)
        except BaseException as e:  # collected and re-checked by the test
            errors.append(e)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_never_lose_updates(store: JobStore):
    shared = store.transition(make(store, "shared").id, S.RUNNING)

    def work(i: int) -> None:
        for k in range(15):
            job = store.create_job(spec={"t": i, "k": k}, name=f"t{i}-{k}", owner=f"o{i}", priority=k)
            store.transition(job.id, S.RUNNING, worker=f"w{i}")
            store.update_progress(job.id, step=k + 1, loss=float(k))
            store.update_progress(shared.id, step=k, extra={f"t{i}_{k}": k})
            store.transition(job.id, S.SUCCEEDED if k % 2 else S.FAILED, expect=S.RUNNING)
            store.list(states=[S.RUNNING])

    assert run_threads(8, work) == []
    counts = store.counts()
    assert counts[S.SUCCEEDED] == 8 * 7 and counts[S.FAILED] == 8 * 8 and counts[S.RUNNING] == 1
    assert store.get(shared.id).extra == {f"t{i}_{k}": k for i in range(8) for k in range(15)}
    for job in store.list(states=[S.SUCCEEDED, S.FAILED]):
        assert job.step == job.spec["k"] + 1 and job.worker == f"w{job.spec['t']}"
        assert [e.to_state for e in store.events(job.id)] == [S.QUEUED, S.RUNNING, job.state]
    with sqlite3.connect(store.path) as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_threads_compare_and_set_has_one_winner(store: JobStore):
    job = make(store)
    winners: list[int] = []

    def claim(i: int) -> None:
        try:
            store.transition(job.id, S.RUNNING, expect=S.QUEUED, worker=f"w{i}")
            winners.append(i)
        except StaleStateError:
            pass

    assert run_threads(10, claim) == []
    assert len(winners) == 1
    assert store.get(job.id).worker == f"w{winners[0]}" and len(store.events(job.id)) == 2


def test_threads_duplicate_names_have_one_winner(store: JobStore):
    created: list[str] = []

    def submit(i: int) -> None:
        try:
            created.append(make(store, "same").id)
        except DuplicateJobError:
            pass

    assert run_threads(10, submit) == []
    assert len(created) == 1 and [j.id for j in store.list()] == created


def test_two_connections_race_safely(tmp_path: Path):
    """Two stores on one file (like two processes): writers serialise, no busy errors, one winner."""
    path = tmp_path / "jobs.db"
    with JobStore(path) as a, JobStore(path) as b:
        job = make(a)
        winners: list[int] = []
        created: list[str] = []

        def race(i: int) -> None:
            s = a if i % 2 else b
            for k in range(10):
                s.update_progress(job.id, step=k, extra={f"t{i}_{k}": k})
            try:
                s.transition(job.id, S.RUNNING, expect=S.QUEUED, worker=f"w{i}")
                winners.append(i)
            except StaleStateError:
                pass
            try:
                created.append(make(s, "dup").id)
            except DuplicateJobError:
                pass

        assert run_threads(8, race) == []
        assert len(winners) == 1 and len(created) == 1
        assert b.get(job.id).extra == {f"t{i}_{k}": k for i in range(8) for k in range(10)}
        assert [e.to_state for e in a.events(job.id)] == [S.QUEUED, S.RUNNING]


CHILD = textwrap.dedent("""
    import sys
    from orchestrator.store import JobStore
    store = JobStore(sys.argv[1])  # never closed: the parent kills this process
    i = 0
    while True:
        job = store.create_job(spec={"i": i}, name=f"c{i}", owner="crash", priority=0)
        print("C", job.id, flush=True)
        for state in ("RUNNING", "PREEMPTED", "QUEUED", "RUNNING", "SUCCEEDED"):
            store.transition(job.id, state, reason=f"r{i}")
            print("T", job.id, state, flush=True)
            if state == "RUNNING":
                store.update_progress(job.id, step=i + 1, loss=0.5)
                print("P", job.id, i + 1, flush=True)
        i += 1
""")


def test_acknowledged_writes_survive_sigkill(tmp_path: Path):
    path = tmp_path / "jobs.db"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                             text=True, env=env, cwd=REPO)
    acked: dict[str, list[str]] = {}
    steps: dict[str, int] = {}
    try:
        for _ in range(400):
            line = child.stdout.readline()
            assert line, "child exited early"
            kind, job_id, *rest = line.split()
            acked.setdefault(job_id, ["QUEUED"])
            if kind == "T":
                acked[job_id].append(rest[0])
            elif kind == "P":
                steps[job_id] = int(rest[0])
        child.send_signal(signal.SIGKILL)  # mid-stream: it is still writing
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with JobStore(path) as store:
        for job_id, states in acked.items():
            stored = [e.to_state.value for e in store.events(job_id)]
            assert stored[: len(states)] == states, job_id  # every acknowledged step is there
            assert store.get(job_id).state.value == stored[-1]
        for job_id, step in steps.items():
            assert store.get(job_id).step == step and store.get(job_id).loss == 0.5
        assert len(store.list()) >= len(acked)
        assert store._conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_backup_over_a_copy_someone_opened_is_not_mixed_with_its_leftover_wal(tmp_path: Path, store: JobStore):
    """Whoever opened the old copy (as the docs allow) and was killed left copy.db-wal beside it; the new
    backup was renamed in place and SQLite replayed that WAL onto it: old job states, broken indexes."""
    a = make(store, "a")
    dest = store.backup(tmp_path / "backups" / "copy.db")
    inspector = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from orchestrator.store import JobState, JobStore
        s = JobStore({str(dest)!r})
        s.transition({a.id!r}, JobState.RUNNING, reason="inspector")
        os._exit(0)  # killed: its WAL stays beside the copy
    """)], capture_output=True, text=True)  # fmt: skip
    assert inspector.returncode == 0, inspector.stderr
    assert dest.with_name("copy.db-wal").exists()
    for i in range(21):
        make(store, f"c{i}")
    store.transition(a.id, S.CANCELLED)
    store.backup(dest)
    with JobStore(dest) as copy:
        assert copy.get(a.id).state == S.CANCELLED and len(copy.list()) == 22
        assert copy._conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.parametrize("columns", ["key TEXT PRIMARY KEY, value TEXT NOT NULL", "k TEXT, v TEXT"])
def test_another_applications_meta_table_is_refused_and_left_alone(tmp_path: Path, columns: str):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as c:
        c.execute(f"CREATE TABLE meta ({columns})")
        c.execute("CREATE TABLE customers (id INTEGER)")
    before = path.read_bytes()
    with pytest.raises(SchemaVersionError, match="has a meta table without a lorafleet schema_version; not a lorafleet"):
        JobStore(path)
    assert path.read_bytes() == before  # not a byte: its journal mode was switched to WAL before the refusal
    with sqlite3.connect(path) as c:
        assert {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")} == {"meta", "customers"}
        assert c.execute("SELECT COUNT(*) FROM meta").fetchone() == (0,)
        assert c.execute("PRAGMA journal_mode").fetchone() == ("delete",)


def test_transition_times_are_taken_once_the_write_lock_is_held(tmp_path: Path):
    """Two stores on one file: a cancel that waited for the write lock was stamped with the time it
    began, before a placement that committed first (end_time before start_time)."""
    path = tmp_path / "jobs.db"
    with JobStore(path) as a, JobStore(path) as b:
        job = make(a, "j")
        blocker = sqlite3.connect(path, timeout=30)
        blocker.execute("BEGIN IMMEDIATE")
        released = {}

        def cancel() -> None:
            a.transition(job.id, S.CANCELLED, reason="cancel")

        waiting = threading.Thread(target=cancel)
        waiting.start()
        time.sleep(0.3)  # the cancel now waits for the lock
        released["t"] = time.time()
        blocker.execute("ROLLBACK")
        blocker.close()
        waiting.join(10)
        events = b.events(job.id)
        assert events[-1].to_state == S.CANCELLED and events[-1].time >= released["t"]


def test_changed_since_gives_every_job_written_since(tmp_path: Path, store: JobStore):
    a, b = make(store, "a"), make(store, "b")
    mark = time.time()
    store.transition(a.id, S.CANCELLED)
    c = make(store, "c")
    store.update_progress(b.id, step=3)
    got = store.changed_since(mark)
    assert [r.id for r in got] == [a.id, c.id, b.id]  # oldest write first, ended jobs included
    assert got[0].state == S.CANCELLED and got[2].step == 3
    assert store.changed_since(time.time() + 1) == []


# ---- retention (prune) -------------------------------------------------------------------

DAY = 86400.0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The store's clock (its ``time.time()``), set by the test: ``clock[0] = t``."""
    import orchestrator.store as store_module

    now = [1_000_000.0]
    monkeypatch.setattr(store_module, "time", SimpleNamespace(time=lambda: now[0]))
    return now


def ended(store: JobStore, clock: list[float], name: str, state: JobState, at: float, owner: str = "alice"):
    """A job created a second before ``at`` that reaches ``state`` (terminal) at time ``at``."""
    clock[0] = at - 1
    job = make(store, name, owner=owner)
    path = PATH_TO[state]
    for step in path[:-1]:
        job = store.transition(job.id, step)
    clock[0] = at
    return store.transition(job.id, path[-1], reason="done")


def event_rows(store: JobStore, job_id: str) -> int:
    with sqlite3.connect(store.path) as c:
        return c.execute("SELECT COUNT(*) FROM events WHERE job_id=?", (job_id,)).fetchone()[0]


def test_prune_deletes_only_ended_jobs_older_than_the_cutoff(store: JobStore, clock: list[float]):
    t0 = clock[0]
    old_ok = ended(store, clock, "old-ok", S.SUCCEEDED, t0)
    old_failed = ended(store, clock, "old-failed", S.FAILED, t0 + 10)
    old_cancelled = ended(store, clock, "old-cancelled", S.CANCELLED, t0 + 20, owner="bob")
    new_ok = ended(store, clock, "new-ok", S.SUCCEEDED, t0 + 29 * DAY)
    clock[0] = t0 + 5  # live jobs, created long ago (every live state)
    live = {s: reach(store, s, f"live-{s.value.lower()}") for s in S if not s.is_terminal()}
    assert event_rows(store, old_ok.id) == 3
    clock[0] = t0 + 30 * DAY + 15  # 30 days after: old-ok and old-failed ended > 30 d ago, old-cancelled 5 s less
    dry = store.prune(older_than_s=30 * DAY, dry_run=True)
    assert dry == [old_ok.id, old_failed.id]  # oldest end_time first
    assert len(store.list()) == 8 and event_rows(store, old_ok.id) == 3  # dry run deleted nothing
    assert store.prune(older_than_s=30 * DAY) == [old_ok.id, old_failed.id]
    for gone in (old_ok, old_failed):
        with pytest.raises(UnknownJobError):
            store.get(gone.id)
        assert event_rows(store, gone.id) == 0
    remaining = {r.id for r in store.list()}
    assert remaining == {old_cancelled.id, new_ok.id, *(j.id for j in live.values())}
    for s, job in live.items():
        assert store.get(job.id).state is s and len(store.events(job.id)) == len(PATH_TO[s]) + 1
    assert store.prune(older_than_s=30 * DAY) == []  # nothing left that old
    clock[0] = t0 + 40 * DAY
    assert store.prune(older_than_s=0) == [old_cancelled.id, new_ok.id]  # 0: every ended job
    assert {r.id for r in store.list()} == {j.id for j in live.values()}
    assert [r.id for r in store.recover()] == [j.id for j in live.values()]


def test_prune_filters_by_state_and_owner(store: JobStore, clock: list[float]):
    t0 = clock[0]
    a_ok = ended(store, clock, "a-ok", S.SUCCEEDED, t0)
    a_failed = ended(store, clock, "a-failed", S.FAILED, t0 + 1)
    b_failed = ended(store, clock, "b-failed", S.FAILED, t0 + 2, owner="bob")
    b_cancelled = ended(store, clock, "b-cancelled", S.CANCELLED, t0 + 3, owner="bob")
    clock[0] = t0 + DAY
    assert store.prune(older_than_s=60, states=["FAILED"], dry_run=True) == [a_failed.id, b_failed.id]
    assert store.prune(older_than_s=60, states=[S.FAILED, "CANCELLED"], owner="bob") == [b_failed.id, b_cancelled.id]
    assert store.prune(older_than_s=60, states="SUCCEEDED", owner="bob") == []  # bob has none left
    assert store.prune(older_than_s=60, owner="carol") == []
    assert {r.id for r in store.list()} == {a_ok.id, a_failed.id}
    assert store.prune(older_than_s=60, states=[S.SUCCEEDED]) == [a_ok.id]
    assert [r.id for r in store.list()] == [a_failed.id]


@pytest.mark.parametrize("kwargs, pattern", [
    ({"older_than_s": -1}, r"older_than_s: must be a finite number of seconds >= 0 \(got -1\)"),
    ({"older_than_s": float("inf")}, r"older_than_s: must be a finite number .*\(got inf\)"),
    ({"older_than_s": float("nan")}, r"older_than_s: must be a finite number .*\(got nan\)"),
    ({"older_than_s": "30d"}, r"older_than_s: must be a finite number .*\(got '30d'\)"),
    ({"older_than_s": True}, r"older_than_s: must be a finite number"),
    ({"older_than_s": 1, "states": ["RUNNING"]},
     r"states: RUNNING is not a terminal state; prune deletes only ended jobs \(allowed: CANCELLED, FAILED, SUCCEEDED\)"),
    ({"older_than_s": 1, "states": ["FAILED", "PREEMPTED", "QUEUED"]},
     r"states: PREEMPTED, QUEUED are not terminal states; .*\(allowed: CANCELLED, FAILED, SUCCEEDED\)"),
    ({"older_than_s": 1, "states": ["DONE"]}, r"states: unknown job state 'DONE'"),
    ({"older_than_s": 1, "states": []}, r"states: empty; give at least one of CANCELLED, FAILED, SUCCEEDED"),
    ({"older_than_s": 1, "owner": ""}, r"owner: must be a non-empty string or None"),
])  # fmt: skip
def test_prune_refuses_bad_arguments_and_deletes_nothing(store: JobStore, clock: list[float], kwargs, pattern):
    job = ended(store, clock, "j", S.SUCCEEDED, clock[0])
    clock[0] += DAY
    with pytest.raises(ValueError, match=pattern):
        store.prune(**kwargs)
    assert store.get(job.id).state is S.SUCCEEDED and event_rows(store, job.id) == 3


def test_changed_since_and_names_after_prune(store: JobStore, clock: list[float]):
    t0 = clock[0]
    old = ended(store, clock, "reused", S.CANCELLED, t0)
    clock[0] = t0 + 100
    live = make(store, "live")
    clock[0] = t0 + 200
    newer = ended(store, clock, "newer", S.FAILED, t0 + 200)
    clock[0] = t0 + 300
    assert store.prune(older_than_s=150) == [old.id]
    assert [r.id for r in store.changed_since(t0)] == [live.id, newer.id]  # the pruned row is simply gone
    clock[0] = t0 + 400
    store.update_progress(live.id, step=2)
    again = make(store, "reused")  # the name of a pruned job is free; so it was before (it had ended)
    assert again.id != old.id and store.find("reused").id == again.id
    assert [r.id for r in store.changed_since(t0 + 350)] == [live.id, again.id]
    assert [e.to_state for e in store.events(again.id)] == [S.QUEUED]
    assert store.list()[0].id == again.id  # newest first, as before


def test_prune_waits_for_another_writer_and_leaves_a_sound_file(tmp_path: Path, clock: list[float]):
    path = tmp_path / "jobs.db"
    with JobStore(path) as store, JobStore(path, timeout_s=0.2) as impatient:
        ids = [ended(store, clock, f"j{i}", S.SUCCEEDED, clock[0] + 1).id for i in range(50)]
        clock[0] += DAY
        blocker = sqlite3.connect(path, timeout=30)
        blocker.execute("BEGIN IMMEDIATE")  # another process is writing: prune takes the write lock or nothing
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            impatient.prune(older_than_s=0)
        assert impatient.prune(older_than_s=0, dry_run=True) == ids  # a dry run only reads
        blocker.execute("ROLLBACK")
        blocker.close()
        assert len(store.list()) == 50
        assert impatient.prune(older_than_s=0) == ids
        assert store.list() == []  # the other connection sees the commit
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert c.execute("SELECT COUNT(*) FROM jobs").fetchone() == (0,)
        assert c.execute("SELECT COUNT(*) FROM events").fetchone() == (0,)


def test_spec_matches_finds_overlapping_marks_in_one_paged_pass(tmp_path):
    """``spec_matches`` (what prune --uploads uses to find the upload areas still named): every match of a
    pattern in the specs of the jobs not excluded, a lookahead group finding overlapping ones, read a
    page of rows at a time."""
    mark = r"(?=(/[a-z]+/[0-9a-f]{4}/))"
    with JobStore(tmp_path / "j.db") as s:
        a = s.create_job(spec={"data": {"path": "/up/u/abcd/beef/x.jsonl"}}, name="a", owner="u", priority=0).id
        s.create_job(spec={"data": {"path": "/up/v/0123/y%z.jsonl"}}, name="b", owner="u", priority=0)
        s.create_job(spec={"eval": {"data": "/up/w/4567/e.jsonl"}}, name="c", owner="u", priority=0)
        every = {"/u/abcd/", "/abcd/beef/", "/v/0123/", "/w/4567/"}
        assert s.spec_matches(mark) == every  # '/u/abcd/' and '/abcd/beef/' overlap
        assert s.spec_matches(mark, page=1) == s.spec_matches(mark, page=2) == every
        assert s.spec_matches(mark, exclude=[a], page=2) == {"/v/0123/", "/w/4567/"}
        assert s.spec_matches(r"y%z") == {"y%z"} and s.spec_matches("/nothing/") == set()


def test_list_takes_one_state_as_prune_does(tmp_path: Path):
    with JobStore(tmp_path / "jobs.db") as s:
        job = make(s, "j")
        assert [r.id for r in s.list(states="QUEUED")] == [job.id] == [r.id for r in s.list(states=JobState.QUEUED)]
        assert s.list(states="FAILED") == []

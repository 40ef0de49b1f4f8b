"""``lorafleet retry``: a FAILED or CANCELLED job queued again under its id (store, controller, CLI).

The controller runs in this process with fake worker actors (no Ray); the worker's events are fed
to it as ``progress()`` would deliver them. ``tests/orchestrator/test_ray_cluster.py`` retries a
cancelled job on a real cluster and checks it ends with the adapter of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.auth import AccessError
from orchestrator.controller import RETRIED, WORKER_LOST, Controller, _losses_since_retry
from orchestrator.store import DuplicateJobError, Event, InvalidTransitionError, JobState, JobStore
from tests.orchestrator.test_tenancy import _FakeActorClass
from tests.orchestrator.test_tenancy import spec as tenancy_spec

# ------------------------------------------------------------------------------------------ store


@pytest.fixture
def store():
    with JobStore(":memory:") as s:
        yield s


def _failed(store: JobStore, name: str = "a", owner: str = "u") -> str:
    rec = store.create_job(spec={"name": name}, name=name, owner=owner, priority=0, total_steps=100)
    store.transition(rec.id, JobState.PROFILING, worker="w-1", output="/out/" + rec.id)
    store.transition(rec.id, JobState.RUNNING)
    store.update_progress(rec.id, step=37, checkpoint_step=30, extra={"ooms": 1})
    store.transition(rec.id, JobState.FAILED, error="disk full", reason="failed on worker")
    return rec.id


def test_reopen_queues_a_failed_job_under_its_id_and_keeps_its_output(store):
    job = _failed(store)
    before = store.get(job)
    time.sleep(0.01)
    rec = store.reopen(job, reason="retried by u", step=30, extra={"ooms": 1, "retries": 1})
    assert rec.state == JobState.QUEUED and rec.id == job
    assert (rec.error, rec.worker, rec.start_time, rec.end_time) == (None, None, None, None)
    assert rec.submit_time > before.submit_time  # it queues behind the jobs already waiting
    assert (rec.step, rec.checkpoint_step, rec.output) == (30, 30, "/out/" + job)
    assert rec.extra == {"ooms": 1, "retries": 1} and rec.attempts == before.attempts
    last = store.events(job)[-1]
    assert (last.from_state, last.to_state, last.reason) == (JobState.FAILED, JobState.QUEUED, "retried by u")
    # live again: the store's usual transitions apply, and it can end again
    store.transition(job, JobState.PROFILING, worker="w-2")
    assert store.get(job).worker == "w-2"


@pytest.mark.parametrize("state", ["SUCCEEDED", "QUEUED", "RUNNING"])
def test_reopen_refuses_a_job_that_succeeded_or_is_live(store, state):
    rec = store.create_job(spec={}, name="a", owner="u", priority=0)
    if state != "QUEUED":
        store.transition(rec.id, JobState.RUNNING)
    if state == "SUCCEEDED":
        store.transition(rec.id, JobState.SUCCEEDED)
    with pytest.raises(InvalidTransitionError, match=f"only a FAILED or CANCELLED job can be queued again; it is {state}"):
        store.reopen(rec.id, reason="retried by u")
    assert store.get(rec.id).state == JobState(state)


def test_reopen_refuses_while_the_owner_has_a_live_job_of_that_name(store):
    job = _failed(store)
    other = store.create_job(spec={}, name="a", owner="u", priority=0)  # submitted again meanwhile
    with pytest.raises(DuplicateJobError, match=f"already has job {other.id} named 'a' in state QUEUED"):
        store.reopen(job, reason="retried by u")
    assert store.get(job).state == JobState.FAILED
    store.create_job(spec={}, name="a", owner="v", priority=0)  # another owner's job of that name is no obstacle
    store.transition(other.id, JobState.CANCELLED)
    assert store.reopen(job, reason="retried by u").state == JobState.QUEUED


def test_a_reopened_job_is_the_newest_for_names_and_lists(store):
    """Retried after a later job of the same name ended: the name and the newest-first list reach the
    retried job, which is the live one."""
    old = _failed(store, "x")
    later = store.create_job(spec={}, name="x", owner="u", priority=0).id
    store.transition(later, JobState.CANCELLED)
    assert store.find("x", owner="u").id == later
    store.reopen(old, reason="retried by u")
    assert store.find("x", owner="u").id == old
    assert [r.id for r in store.list(owner="u")] == [old, later]
    assert store.list(owner="u", limit=1)[0].state == JobState.QUEUED
    fresh = store.create_job(spec={}, name="y", owner="u", priority=0).id  # ids after it still count up
    assert [r.id for r in store.list(owner="u")] == [fresh, old, later]
    # a retried job pruned before the next submission: its seq is never handed out again (AUTOINCREMENT)
    store.transition(old, JobState.CANCELLED)
    with store._read() as c:
        retried_seq = c.execute("SELECT seq FROM jobs WHERE id=?", (old,)).fetchone()[0]
    store.reopen(old, reason="retried by u")
    with store._read() as c:
        bumped = c.execute("SELECT seq FROM jobs WHERE id=?", (old,)).fetchone()[0]
        c.execute("DELETE FROM jobs WHERE id=?", (old,))
    after = store.create_job(spec={}, name="z", owner="u", priority=0).id
    with store._read() as c:
        assert c.execute("SELECT seq FROM jobs WHERE id=?", (after,)).fetchone()[0] == bumped + 1 > retried_seq


def test_a_checkpoint_reported_after_the_job_ended_is_recorded_never_moved_back(store):
    job = _failed(store)  # checkpoint step 30
    assert store.record_checkpoint(job, 40) and store.get(job).checkpoint_step == 40
    assert not store.record_checkpoint(job, 20) and store.get(job).checkpoint_step == 40
    assert store.get(job).state == JobState.FAILED and store.events(job)[-1].to_state == JobState.FAILED


def test_worker_losses_count_from_the_last_retry():
    def ev(reason: str) -> Event:
        return Event("j", 0.0, None, JobState.QUEUED, reason)

    lost = ev(f"{WORKER_LOST}: node gone; resumes from its last checkpoint")
    assert _losses_since_retry([ev("submitted"), lost, ev("requeued"), lost]) == 2
    assert _losses_since_retry([lost, lost, lost, ev(f"{RETRIED} alice (was FAILED)"), lost]) == 1
    assert _losses_since_retry([lost, ev(f"{RETRIED} alice (was FAILED)")]) == 0


# ------------------------------------------------------------------------------------- controller


@pytest.fixture
def ctl(tmp_path: Path, fake_workers: _FakeActorClass):
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   num_gpus=1, max_attempts=2)  # fmt: skip
    data = Path(c.uploads_root("alice")) / "d.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text('{"text": "x"}\n')
    yield c
    c.store.close()


def _placed(c: Controller, job: str) -> tuple[Any, dict[str, Any]]:
    """Tick until ``job`` is assigned; its worker and the config it was assigned with (the last assign)."""
    for _ in range(3):
        c.tick()
        if c.store.get(job).state == JobState.PROFILING:
            break
    w = next(w for w in c._workers.values() if job in w.assigned)
    args = [a for name, a, _ in w.handle.calls if name == "assign" and a[0] == job][-1]
    return w, {"config": args[1], "remote": args[2]}


def _run_to(c: Controller, w: Any, job: str, step: int, checkpoint: int) -> None:
    c._on_event(w, {"job": job, "kind": "joined", "step": 0, "total_steps": 10})
    c.store.update_progress(job, step=step, checkpoint_step=checkpoint)


def test_a_failed_job_is_retried_under_its_id_and_placed_with_its_own_output(ctl):
    job = ctl.submit(tenancy_spec("a"), "alice")["id"]
    w, first = _placed(ctl, job)
    _run_to(ctl, w, job, 7, 6)
    ctl._on_event(w, {"job": job, "kind": "failed", "message": "checkpoint step 8: disk full"})
    assert ctl.store.get(job).state == JobState.FAILED

    out = ctl.retry("a", "alice")
    assert (out["id"], out["state"], out["resume_step"], out["step"], out["error"]) == (job, "QUEUED", 6, 6, None)
    assert out["extra"]["retries"] == 1
    reasons = [e["reason"] for e in ctl.status(job)["events"]]
    assert reasons[-1] == "retried by alice (was FAILED: checkpoint step 8: disk full)"
    assert any(line.endswith("retried by alice: queued again, resumes from checkpoint step 6") for line in ctl.logs(job))

    _w, again = _placed(ctl, job)  # the same job name and output: the worker resumes from its checkpoints
    assert again["config"].name == first["config"].name == job
    assert again["config"].output == first["config"].output
    assert ctl.store.get(job).state == JobState.PROFILING
    _run_to(ctl, _w, job, 10, 10)
    ctl._on_event(_w, {"job": job, "kind": "finished", "step": 10, "output": first["config"].output})
    assert ctl.store.get(job).state == JobState.SUCCEEDED


def test_a_failed_job_resumes_from_the_checkpoint_its_failed_event_names(ctl):
    job = ctl.submit(tenancy_spec("a"), "alice")["id"]
    w, _ = _placed(ctl, job)
    _run_to(ctl, w, job, 3, 2)  # the last poll saw checkpoint 2; the worker wrote 6 before it failed at 7
    ctl._on_event(w, {"job": job, "kind": "failed", "message": "step 7: loss is nan", "checkpoint_step": 6})
    assert ctl.store.get(job).checkpoint_step == 6
    booked = ctl.store.get(job).extra["fifo_work_s"]
    ctl.store.update_progress(job, step=3, tokens_per_s=0.5)  # measured in a group: far slower than alone
    out = ctl.retry(job, "alice")
    assert out["resume_step"] == 6
    # the FIFO-fair clock books the 4 steps left of 10 of its booking alone, not the whole job again, nor
    # the steps left at the rate measured in its group
    assert out["extra"]["fifo_work_s"] == pytest.approx(booked * 4 / 10)


def test_what_retry_refuses_and_what_it_leaves_as_it_is(ctl):
    job = ctl.submit(tenancy_spec("a"), "alice")["id"]
    assert ctl.retry(job, "alice")["already_live"] is True  # queued: nothing to do
    w, _ = _placed(ctl, job)
    _run_to(ctl, w, job, 10, 10)
    ctl._on_event(w, {"job": job, "kind": "finished", "step": 10, "output": "/o"})
    with pytest.raises(ValueError, match=r"SUCCEEDED: nothing to retry; .* adapter.init_from"):
        ctl.retry(job, "alice")

    # its data file is gone: it would fail the same way (named as the user named it, not its uploaded copy)
    copy = Path(ctl.uploads_root("alice")) / "d.jsonl"
    gone = ctl.submit_many([tenancy_spec("c")], "alice", sources=[{str(copy): "laptop/d.jsonl"}])[0]["id"]
    ctl.cancel(gone, "alice")
    copy.unlink()
    with pytest.raises(ValueError, match=r"^data.path: the copy of laptop/d.jsonl uploaded when the job was submitted "
                                         r"is gone from the cluster .* submit it again"):
        ctl.retry(gone, "alice")
    assert ctl.store.get(gone).state == JobState.CANCELLED
    # a file the spec names in place (an admin-allowed prefix, the uploads area) is named as it is
    in_place = Path(ctl.uploads_root("alice")) / "e.jsonl"
    in_place.write_text('{"text": "x"}\n')
    other = ctl.submit(tenancy_spec("d", data="e.jsonl"), "alice")["id"]
    ctl.cancel(other, "alice")
    in_place.unlink()
    with pytest.raises(ValueError, match=r"^data.path: .*/uploads/alice/e.jsonl does not exist .* put the file back"):
        ctl.retry(other, "alice")


def test_a_cancelled_job_is_retried_only_once_it_has_left_its_worker(ctl):
    job = ctl.submit(tenancy_spec("a"), "alice")["id"]
    w, _ = _placed(ctl, job)
    _run_to(ctl, w, job, 5, 4)
    ctl.cancel(job, "alice")
    with pytest.raises(ValueError, match=f"still leaving worker {w.worker_id}: .* retry when it has"):
        ctl.retry(job, "alice")
    # the worker dropped it between two steps, two checkpoints after the last poll: that is where it resumes
    ctl._on_event(w, {"job": job, "kind": "cancelled", "checkpoint_step": 8})
    out = ctl.retry(job, "alice")
    assert (out["state"], out["resume_step"], out["step"]) == ("QUEUED", 8, 8)
    assert ctl.status(job)["events"][-1]["reason"] == "retried by alice (was CANCELLED)"


def test_the_old_runs_late_events_change_nothing_once_the_job_runs_elsewhere(ctl):
    """A cancelled job whose worker is gone (lost, reaped) can be retried at once; should the old run
    still report (a late poll), its events neither end the new run nor move its checkpoint."""
    job = ctl.submit(tenancy_spec("a"), "alice")["id"]
    old, _ = _placed(ctl, job)
    _run_to(ctl, old, job, 5, 4)
    ctl.cancel(job, "alice")
    with pytest.raises(ValueError, match="still leaving worker"):
        ctl.retry(job, "alice")
    ctl._workers.pop(old.worker_id)  # the worker ended before it reported the cancel
    assert ctl.retry(job, "alice")["state"] == "QUEUED"
    new, _ = _placed(ctl, job)
    assert new.worker_id != old.worker_id
    ctl._on_event(old, {"job": job, "kind": "finished", "step": 10, "output": "/o"})
    ctl._on_event(old, {"job": job, "kind": "failed", "message": "late", "checkpoint_step": 9})
    ctl._on_event(old, {"job": job, "kind": "cancelled", "checkpoint_step": 9})
    rec = ctl.store.get(job)
    assert (rec.state, rec.worker, rec.checkpoint_step, rec.error) == (JobState.PROFILING, new.worker_id, 4, None)
    ctl._on_event(new, {"job": job, "kind": "joined", "step": 4, "total_steps": 10})
    assert ctl.store.get(job).state == JobState.RUNNING


def test_a_retried_job_gets_max_attempts_worker_losses_again(ctl):
    job = ctl.submit(tenancy_spec("a"), "alice")["id"]
    w, _ = _placed(ctl, job)
    _run_to(ctl, w, job, 3, 2)
    ctl._worker_lost(w, "worker w died")
    w, _ = _placed(ctl, job)
    _run_to(ctl, w, job, 3, 2)
    ctl._worker_lost(w, "worker w died")  # max_attempts 2: it fails
    rec = ctl.store.get(job)
    assert rec.state == JobState.FAILED and "gave up after losing its worker 2 times" in rec.error
    ctl.retry(job, "alice")
    w, _ = _placed(ctl, job)
    _run_to(ctl, w, job, 3, 2)
    ctl._worker_lost(w, "worker w died")  # the first loss since the retry: requeued, not failed
    assert ctl.store.get(job).state == JobState.QUEUED


def test_only_the_owner_or_an_admin_may_retry(tmp_path: Path, fake_workers: _FakeActorClass):
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   num_gpus=1)  # fmt: skip
    try:
        root = c.add_user("root", admin=True)["key"]
        alice, bob = (c.add_user(u, api_key=root)["key"] for u in ("alice", "bob"))
        data = Path(c.uploads_root("alice")) / "d.jsonl"
        data.parent.mkdir(parents=True)
        data.write_text('{"text": "x"}\n')
        job = c.submit(tenancy_spec("a"), api_key=alice)["id"]
        c.cancel(job, api_key=alice)
        with pytest.raises(AccessError, match=f"job {job} belongs to owner 'alice': only its owner or an admin may retry"):
            c.retry(job, api_key=bob)
        assert c.retry(job, api_key=root)["state"] == "QUEUED"
        assert c.status(job, api_key=alice)["events"][-1]["reason"] == "retried by root (was CANCELLED)"
    finally:
        c.store.close()


# -------------------------------------------------------------------------------------------- CLI


class _Client:
    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer, self.asked = answer, []

    def retry(self, job: str) -> dict[str, Any]:
        self.asked.append(job)
        return self.answer


@pytest.mark.parametrize(("answer", "line"), [
    ({"id": "lf-1", "name": "a", "state": "QUEUED", "resume_step": 40},
     "lf-1\ta\tQUEUED\tresumes from checkpoint step 40; follow it with `lorafleet logs -f lf-1`"),
    ({"id": "lf-1", "name": "a", "state": "QUEUED", "resume_step": 0},
     "lf-1\ta\tQUEUED\tstarts from step 0 (it wrote no checkpoint); follow it with `lorafleet logs -f lf-1`"),
    ({"id": "lf-1", "name": "a", "state": "RUNNING", "already_live": True},
     "lf-1\ta\tRUNNING\t(still live: nothing to retry)"),
])  # fmt: skip
def test_the_retry_command_says_where_the_job_resumes(capsys, answer, line):
    from orchestrator.cli import build_parser
    from orchestrator.commands.jobs import do_retry

    _parser, subs = build_parser()
    assert "resumes from its newest checkpoint" in subs["retry"].format_help()
    client = _Client(answer)
    assert do_retry(client, argparse.Namespace(jobs=["a"])) == 0
    assert client.asked == ["a"] and capsys.readouterr().out.strip() == line


def test_the_agent_passes_retry_with_the_callers_key():
    from orchestrator.agent import ALLOWED_CALLS, KEYED_CALLS

    assert "retry" in ALLOWED_CALLS and "retry" in KEYED_CALLS


def test_retry_of_several_jobs_reports_each_refusal_and_retries_the_rest(capsys):
    from orchestrator.commands.jobs import do_retry
    from orchestrator.remote import RemoteError

    class Some(_Client):
        def retry(self, job: str) -> dict[str, Any]:
            self.asked.append(job)
            if job == "b":
                raise RemoteError("job lf-2 (b) SUCCEEDED: nothing to retry")
            return {"id": f"lf-{job}", "name": job, "state": "QUEUED", "resume_step": 10}

    client = Some({})
    assert do_retry(client, argparse.Namespace(jobs=["a", "b", "c"])) == 2
    out = capsys.readouterr()
    assert client.asked == ["a", "b", "c"]
    assert [line.split("\t")[0] for line in out.out.splitlines()] == ["lf-a", "lf-c"]
    assert out.err.strip() == "b: job lf-2 (b) SUCCEEDED: nothing to retry"
    with pytest.raises(RemoteError, match="SUCCEEDED"):  # one job: the CLI's one-line error, exit 2
        do_retry(client, argparse.Namespace(jobs=["b"]))


@pytest.mark.parametrize(("state", "checkpoint", "line"), [
    ("FAILED", 40, "  retry: `lorafleet retry lf-9` queues it again, from checkpoint step 40"),
    ("CANCELLED", None, "  retry: `lorafleet retry lf-9` queues it again, from step 0 (no checkpoint)"),
    ("SUCCEEDED", 40, None),
])  # fmt: skip
def test_status_of_an_ended_job_says_how_to_retry_it(capsys, state, checkpoint, line):
    from orchestrator.commands.jobs import do_status

    class One:
        def status(self, job: str) -> dict[str, Any]:
            return {"id": "lf-9", "name": "a", "state": state, "checkpoint_step": checkpoint, "step": 45,
                    "total_steps": 100, "events": [], "error": "x" if state == "FAILED" else None}

    assert do_status(One(), argparse.Namespace(job="a", json=False, all=False, limit=100)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x for x in lines if x.startswith("  retry:")] == ([line] if line else [])


def test_wait_on_a_failed_job_says_how_to_retry_it(capsys):
    from orchestrator.commands.jobs import do_wait

    class Waits:
        def wait(self, job: str) -> dict[str, Any]:
            return {"id": "lf-9", "name": "a", "state": "FAILED", "error": "step 7: loss is nan"}

    assert do_wait(Waits(), argparse.Namespace(job="a")) == 1
    out = capsys.readouterr()
    assert out.out.strip() == "lf-9\ta\tFAILED\tstep 7: loss is nan"
    assert "`lorafleet retry lf-9` queues each failed job again; it resumes from its newest checkpoint" in out.err


def test_a_job_failed_on_its_own_spec_is_not_retried_and_the_hints_say_to_resubmit(ctl, capsys):
    """A target its base model lacks fails at join with the worker's spec_error: a retry runs the same
    spec, so it would fail the same way; the hints pointed at retry (an audit's finding)."""
    from orchestrator.commands.jobs import do_status, do_wait

    job = ctl.submit(tenancy_spec("a"), "alice")["id"]
    w, _ = _placed(ctl, job)
    error = "adapter.target_modules: 'zzz_proj' matches no linear layer of m; available: q_proj, v_proj"
    ctl._on_event(w, {"job": job, "kind": "failed", "message": error, "spec_error": True})
    rec = ctl.store.get(job)
    assert rec.state == JobState.FAILED and rec.extra["spec_error"] is True
    with pytest.raises(ValueError, match=rf"^job {job} \(a\) failed on its spec \(adapter.target_modules: 'zzz_proj' "
                                         r"matches .*\): a retry runs the same spec and would fail the same way; "
                                         r"submit a corrected spec as a new job$"):  # fmt: skip
        ctl.retry(job, "alice")
    assert ctl.store.get(job).state == JobState.FAILED

    status = json.loads(json.dumps(ctl.status(job)))
    assert do_status(type("C", (), {"status": lambda self, j: status})(),
                     argparse.Namespace(job=job, json=False, all=False, limit=100)) == 0  # fmt: skip
    assert "  retry: none; it failed on the spec itself: fix it and submit it as a new job" in capsys.readouterr().out
    assert do_wait(type("C", (), {"wait": lambda self, j: status})(), argparse.Namespace(job=job)) == 1
    assert capsys.readouterr().err.strip() == (f"{job}: failed on the spec itself (see the error); a retry would run "
                                               "the same spec: fix it and submit it as a new job")  # fmt: skip

"""A finished job's held-out evaluation (the spec's ``eval:``, run on the worker) reaches the job
store and ``lorafleet status``. The controller runs without Ray: fake worker handles, events fed
to it as a worker's progress snapshot would carry them."""

from pathlib import Path

import pytest

import orchestrator.controller as controller_mod
from orchestrator.commands.jobs import _row, eval_lines
from orchestrator.controller import Controller
from orchestrator.store import JobState
from tests.orchestrator.test_tenancy import _FakeActorClass, spec


@pytest.fixture
def ctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(controller_mod, "worker_actor_class", lambda: _FakeActorClass())
    monkeypatch.setattr(Controller, "_poll", lambda self, now: None)
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   num_gpus=1)  # fmt: skip
    yield c
    c.store.close()


def _finish(c: Controller, job_id: str, evaluation: dict | None) -> None:
    worker = next(iter(c._workers.values()))
    events = [{"job": job_id, "kind": "joined", "step": 0, "total_steps": 10},
              {"job": job_id, "kind": "finished", "output": "out", "step": 10, "loss": 0.5, "eval": evaluation,
               "tokens_per_s": 123.0}]
    c._apply_snapshot(worker, {"events": events, "jobs": {}}, 0.0)  # fmt: skip


def test_eval_metrics_are_stored_and_shown_by_status(ctl: Controller):
    job = ctl.submit(spec("a", eval={"data": "d.jsonl", "metrics": ["loss", "exact_match"]}), "alice")["id"]
    ctl.tick()
    evaluation = {"examples": 24, "metrics": {"loss": {"base": 3.9, "adapter": 1.25, "tokens": 300},
                                              "exact_match": {"base": 0.0, "adapter": 0.625}}}  # fmt: skip
    _finish(ctl, job, evaluation)
    record = ctl.status(job)
    assert record["state"] == JobState.SUCCEEDED.value
    assert (record["loss"], record["tokens_per_s"]) == (0.5, 123.0)  # a job done before any poll shows its speed
    assert record["extra"]["eval"] == evaluation and _row(record)["eval"] == evaluation
    assert eval_lines(record["extra"]["eval"]) == [
        "eval on 24 held-out examples (base -> adapter):", "  loss: 3.9000 -> 1.2500", "  exact_match: 0.0000 -> 0.6250",
    ]  # fmt: skip
    timed = {**evaluation, "seconds": 61.4, "trained_steps_meanwhile": 12}  # as a worker reports it
    assert eval_lines(timed)[0] == ("eval on 24 held-out examples in 61 s, jobs beside it trained 12 steps meanwhile "
                                    "(base -> adapter):")  # fmt: skip


def test_failed_or_non_finite_eval_is_kept_without_breaking_the_job(ctl: Controller):
    a = ctl.submit(spec("a"), "alice")["id"]
    ctl.tick()
    _finish(ctl, a, {"examples": 2, "metrics": {"loss": {"base": float("nan"), "adapter": float("inf")}}})
    stored = ctl.status(a)
    assert stored["state"] == JobState.SUCCEEDED.value
    assert stored["extra"]["eval"]["metrics"]["loss"] == {"base": None, "adapter": None}  # strict JSON in the store
    assert eval_lines({"error": "evaluation failed: eval.data: gone.jsonl: no such file"}) == [
        "eval: evaluation failed: eval.data: gone.jsonl: no such file"]
    assert eval_lines(None) == []


def test_down_during_an_evaluation_records_the_finished_job(ctl: Controller, monkeypatch: pytest.MonkeyPatch):
    """``lorafleet down`` while a finished job is evaluated: the worker's drain waits for the evaluation
    and reports ``finished``; the controller read no event after the drain, so the job was requeued
    (and trained and evaluated again at the next ``up``). The other job's drain checkpoint is kept."""
    import ray

    a = ctl.submit(spec("a", eval={"data": "d.jsonl"}), "alice")["id"]
    b = ctl.submit(spec("b"), "alice")["id"]
    ctl.tick()
    worker = next(iter(ctl._workers.values()))
    joined = [{"job": j, "kind": "joined", "step": 0, "total_steps": 10} for j in (a, b)]
    ctl._apply_snapshot(worker, {"events": joined, "jobs": {}}, 0.0)
    evaluation = {"examples": 3, "metrics": {"loss": {"base": 3.0, "adapter": 1.0, "tokens": 30}}}
    last = {"events": [{"job": a, "kind": "finished", "output": "out/a", "step": 10, "loss": 0.4, "eval": evaluation},
                       {"job": b, "kind": "stopped", "checkpoint_step": 7}], "jobs": {}}  # fmt: skip
    monkeypatch.setattr(type(worker.handle), "progress", property(lambda self: type("M", (), {
        "remote": staticmethod(lambda: "progress-ref")})), raising=False)  # fmt: skip
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: last if ref == "progress-ref" else [b])
    monkeypatch.setattr(ray, "kill", lambda handle: None)
    assert ctl.shutdown()["requeued"] == [b]  # was [] (`down` said "0 running jobs checkpointed and requeued")
    ctl.store = type(ctl.store)(ctl.store.path)  # shutdown closed it
    assert ctl.store.get(a).state == JobState.SUCCEEDED and ctl.store.get(a).extra["eval"] == evaluation
    rec = ctl.store.get(b)
    assert rec.state == JobState.QUEUED and rec.checkpoint_step == 7
    assert "stopped (lorafleet down)" in ctl.status(b)["events"][-2]["reason"]


def test_a_preemption_whose_checkpoint_failed_keeps_the_last_checkpoint_step(ctl: Controller):
    a = ctl.submit(spec("a"), "alice")["id"]
    ctl.tick()
    worker = next(iter(ctl._workers.values()))
    ctl._apply_snapshot(worker, {"events": [{"job": a, "kind": "joined", "step": 0, "total_steps": 100}],
                                 "jobs": {a: {"step": 57, "total_steps": 100, "checkpoint_step": 50}}}, 0.0)  # fmt: skip
    assert ctl.store.get(a).checkpoint_step == 50
    ctl._apply_snapshot(worker, {"events": [{"job": a, "kind": "preempted", "checkpoint_step": None}], "jobs": {}}, 1.0)
    rec = ctl.store.get(a)
    assert rec.state == JobState.QUEUED and rec.checkpoint_step == 50  # was erased to None

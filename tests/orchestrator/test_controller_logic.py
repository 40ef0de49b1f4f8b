"""Controller logic without Ray: store records -> ClusterView, OOM back-off, overhead share, recovery."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from orchestrator.controller import (
    FREE_PREFIX,
    GIB,
    Controller,
    adapter_shape_of,
    build_view,
    effective_spec,
    model_shape_for,
    oom_backoff,
    overhead_share,
)
from orchestrator.store import JobState, JobStore
from policies import Preempt, Start, WorkerView, resolve_policy


def spec(name: str, micro: int = 2, batch: int = 4, base: str = "builtin:smollm2-135m-instruct") -> dict:
    return {"name": name, "base_model": base, "data": {"path": "/data/x.jsonl", "max_seq_len": 64},
            "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "train": {"max_steps": 10, "batch_size": batch, "micro_batch_size": micro}}  # fmt: skip


@pytest.fixture
def store():
    with JobStore(":memory:") as s:
        yield s


def test_view_from_records(store):
    a = store.create_job(spec=spec("a"), name="a", owner="u", priority=0)
    b = store.create_job(spec=spec("b"), name="b", owner="u", priority=0)
    store.transition(b.id, JobState.PROFILING, worker="w-1")
    store.transition(b.id, JobState.RUNNING)
    workers = [WorkerView("w-1", 80 << 30, 100.0, loaded_model="builtin:smollm2-135m-instruct", running=(b.id,))]
    view = build_view(store.list(), workers, now=1e9, free_gpus=1)
    assert [j.job_id for j in view.queued] == [a.id]
    assert [j.job_id for j in view.running] == [b.id] and view.running[0].worker_id == "w-1"
    assert [w.worker_id for w in view.workers] == ["w-1", f"{FREE_PREFIX}0"]
    job = view.queued[0]
    assert job.micro_batch_size == 2 and job.seq_len == 64 and job.adapter_bytes > 0 and job.static_bytes > 0
    decisions = resolve_policy("fifo").schedule(view)
    assert decisions and isinstance(decisions[0], Start) and decisions[0].job_id == a.id


def test_running_job_starts_at_its_current_run(store):
    # a job resumed after a preemption: its record keeps the first start, the view the current run's
    b = store.create_job(spec=spec("b"), name="b", owner="u", priority=0)
    store.transition(b.id, JobState.PROFILING, worker="w-1")
    store.transition(b.id, JobState.RUNNING)
    first = store.get(b.id).start_time
    assert first is not None
    workers = [WorkerView("w-1", 80 << 30, 100.0, loaded_model="builtin:smollm2-135m-instruct", running=(b.id,))]
    assert build_view(store.list(), workers, now=1e9).running[0].start_time_s == first
    view = build_view(store.list(), workers, now=1e9, run_starts={b.id: first + 500.0})
    assert view.running[0].start_time_s == first + 500.0


def test_running_job_on_unknown_worker_is_left_out(store):
    b = store.create_job(spec=spec("b"), name="b", owner="u", priority=0)
    store.transition(b.id, JobState.PROFILING, worker="gone")
    view = build_view(store.list(), [], now=0.0, free_gpus=0)
    assert view.running == () and view.queued == ()


def test_oom_backoff_halves_micro_batch_then_fails(store):
    rec = store.create_job(spec=spec("a", micro=4, batch=8), name="a", owner="u", priority=0)
    extra, reason = oom_backoff(rec, group_size=2)
    assert extra == {"micro_batch_size": 2, "activation_scale": 2.0} and "micro_batch_size 2" in reason
    store.update_progress(rec.id, step=0, extra=extra)
    assert effective_spec(store.get(rec.id)).train.micro_batch_size == 2
    one = store.create_job(spec=spec("b", micro=1, batch=4), name="b", owner="u", priority=0)
    extra, reason = oom_backoff(one, group_size=1)
    assert extra is None and "train.micro_batch_size 1" in reason
    extra, _ = oom_backoff(one, group_size=3)
    assert extra == {"activation_scale": 2.0}


def test_oom_backoff_says_when_a_mixlora_job_s_steps_change_with_the_micro_batch(store):
    mix = spec("m", micro=4, batch=8)
    mix["adapter"] = {**mix["adapter"], "type": "mixlora", "num_experts": 4}
    extra, reason = oom_backoff(store.create_job(spec=mix, name="m", owner="u", priority=0), group_size=2)
    assert extra is not None and "load-balance loss is computed per micro-batch" in reason
    assert "differ slightly from a run at 4" in reason
    mix["adapter"]["router_aux_loss_coef"] = 0.0  # no router loss, but dropout (0.05 by default)
    _, reason = oom_backoff(store.create_job(spec=mix, name="n", owner="u", priority=0), group_size=2)
    assert reason == ("out of memory: requeued with train.micro_batch_size 2 (was 4) (its dropout masks are drawn "
                      "per micro-batch: the steps from here differ slightly from a run at 4)")  # fmt: skip
    mix["adapter"]["dropout"] = 0.0  # nothing drawn or computed per micro-batch: the same steps
    _, reason = oom_backoff(store.create_job(spec=mix, name="o", owner="u", priority=0), group_size=2)
    assert reason == "out of memory: requeued with train.micro_batch_size 2 (was 4)"


def test_overhead_share():
    assert overhead_share({"wall_s": 10.0, "idle_s": 2.0, "step_s": 6.0}) == pytest.approx(0.25)
    assert overhead_share({}) == 0.0


def test_other_families_target_names_count_as_the_llama_projections_they_equal():
    from orchestrator.spec import parse_spec
    from policies.catalogue import CATALOGUE
    from policies.memory_model import adapter_param_count

    def shape(targets):
        doc = spec("j")
        doc["adapter"]["target_modules"] = targets
        return adapter_shape_of(parse_spec(doc))

    llama = shape(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    phi3 = shape(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    assert phi3.target_modules == llama.target_modules  # the same memory estimate, not q and v only
    assert shape(["dense", "fc1", "fc2"]).target_modules == ("o_proj", "up_proj", "down_proj")
    assert shape(["wq_unknown"]).target_modules == ("q_proj", "v_proj")  # nothing known: the q, v default
    model = CATALOGUE["llama-2-7b"]
    assert adapter_param_count(model, phi3) == adapter_param_count(model, llama)


def test_model_shape_from_local_config(tiny_model_dir):
    shape = model_shape_for(str(tiny_model_dir))
    assert (shape.hidden_size, shape.num_hidden_layers, shape.num_key_value_heads) == (32, 2, 2)
    reported = {"m": {"num_parameters": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "intermediate_size": 8, "vocab_size": 16, "num_key_value_heads": 0, "dtype_bytes": 4}}  # fmt: skip
    assert model_shape_for("m", reported).hidden_size == 8


def test_restart_requeues_running_and_keeps_policy(tmp_path):
    path = tmp_path / "jobs.db"
    c = Controller(str(path), str(tmp_path / "storage"), {"policy": "sjf"}, start_loop=False,
                   allowed_prefixes=["/data"])  # spec() names /data/x.jsonl
    job = c.submit(spec("a"), "alice")
    with pytest.raises(ValueError, match=r"adapter\.r"):
        c.submit({**spec("bad"), "adapter": {"r": 0}})
    c.store.transition(job["id"], JobState.PROFILING, worker="w-x")
    c.store.transition(job["id"], JobState.RUNNING)
    c.store.close()
    again = Controller(str(path), str(tmp_path / "storage"), None, start_loop=False)
    assert again.get_policy()["name"] == "sjf"
    assert again.recovered == [job["id"]]
    rec = again.status(job["id"])
    assert rec["state"] == "QUEUED" and "controller restart" in rec["events"][-1]["reason"]
    assert [r["name"] for r in again.list_jobs()] == ["a"]
    assert again.cancel("a")["state"] == "CANCELLED"
    events = again.status(job["id"])["events"]
    again_cancelled = again.cancel(job["id"])  # an ended job: left as it is, no error
    assert again_cancelled["state"] == "CANCELLED" and again_cancelled["already_ended"] is True
    assert again.status(job["id"])["events"] == events
    again.set_policy({"policy": "fifo"})
    with pytest.raises(ValueError):
        again.set_policy({"policy": "nope"})
    assert again.get_policy()["name"] == "fifo"
    again.store.close()


def test_view_uses_the_parsed_spec_cache(store):
    from orchestrator.spec import parse_spec

    a = store.create_job(spec=spec("a"), name="a", owner="u", priority=0)
    cached = parse_spec({**spec("a"), "data": {"path": "/data/x.jsonl", "max_seq_len": 48}})
    view = build_view(store.list(), [], now=0.0, specs={a.id: cached})
    assert view.queued[0].seq_len == 48  # the cached spec, not a fresh parse of the record (64)
    assert build_view(store.list(), [], now=0.0).queued[0].seq_len == 64


def test_worker_views_carry_the_packing_the_worker_reports(tmp_path):
    """The policy predicts a worker's groups packed only once the worker reported that its engine
    packs the loaded model (``packing_max_len`` in its progress); before that, padded (safe)."""
    from orchestrator.controller import _Worker

    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), None, start_loop=False)
    try:
        c._workers["w-1"] = _Worker("w-1", None, "m", 0.0, last={"state": "loading"})
        c._workers["w-2"] = _Worker("w-2", None, "m", 0.0, last={"state": "ready", "packing_max_len": 4096})
        views = {v.worker_id: v for v in c._worker_views()}
        assert views["w-1"].packing_max_len == 0 and views["w-2"].packing_max_len == 4096
    finally:
        c.store.close()


def test_fifo_fair_deadlines_follow_the_class_tail(tmp_path):
    """Each submission books the FIFO clock and keeps its wait and work; each pass's view gives the
    deadline with the class's tail as estimated then, so it moves as later jobs of the class come
    in. Without the controller's clock (a restart) the stamp from submission is kept."""
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "aspen"}, start_loop=False,
                   allowed_prefixes=["/data"], num_gpus=8)  # fmt: skip
    try:
        short = c.submit(spec("short"), "alice")
        rec = c.store.get(short["id"])
        wait, work, stamped = rec.extra["fifo_wait_s"], rec.extra["fifo_work_s"], rec.extra["fair_start_s"]
        assert wait == 0 and work > 0
        assert stamped == pytest.approx(rec.submit_time + max(0.0, 0.9 * work - work))  # its own estimate only
        for name, steps in (("long", 4000), ("longer", 8000)):  # the same class, much longer
            c.submit({**spec(name), "train": {"max_steps": steps, "batch_size": 4, "micro_batch_size": 2}}, "bob")
        view = c._view(rec.submit_time + 1.0)
        fair = {j.job_id: j.fair_start_s for j in view.queued}
        longs = sorted(c.store.get(j.job_id).extra["fifo_work_s"] for j in view.queued if j.job_id != short["id"])
        # three estimates, all FIFO waits 0 (8 servers): the tail is their 2nd largest, the 4000-step job
        assert fair[short["id"]] == pytest.approx(rec.submit_time + 0.9 * longs[0] - work)
        assert fair[short["id"]] > stamped
        restarted = build_view(c.store.list(), [], now=rec.submit_time + 1.0)
        assert {j.job_id: j.fair_start_s for j in restarted.queued}[short["id"]] == stamped
    finally:
        c.store.close()


def test_fifo_clock_books_jobs_only_on_gpus_with_the_memory_for_them(tmp_path):
    """The controller's FIFO clock has one server per GPU with the memory its worker reports (the
    configured size for GPUs without a worker): a job is booked only where it fits alone, so on
    a GPU too small for it the second job waits for the first in the virtual FIFO, as the simulator
    books it; with equal GPUs both start at once."""
    from orchestrator.controller import _Worker

    def waits(small_total: int) -> list[float]:
        db = tmp_path / f"jobs-{small_total}.db"
        c = Controller(str(db), str(tmp_path / "storage"), {"policy": "aspen"}, start_loop=False,
                       allowed_prefixes=["/data"], num_gpus=2)  # fmt: skip
        try:
            c._workers["w-big"] = _Worker("w-big", None, "m", 0.0, last={"memory": {"total": 80 * GIB}})
            c._workers["w-small"] = _Worker("w-small", None, "m", 0.0, last={"memory": {"total": small_total}})
            ids = [c.submit(spec(name), "alice")["id"] for name in ("first", "second")]
            return [c.store.get(i).extra["fifo_wait_s"] for i in ids]
        finally:
            c.store.close()

    first, second = waits(1 << 20)  # 1 MiB: too small for the job
    assert first == 0.0 and second > 0.0
    assert waits(80 * GIB) == [0.0, 0.0]


def test_policy_fair_clock_settings_build_the_controllers_clock(tmp_path):
    """aspen's ``fair_clock`` (policy YAML) sets the controller's FIFO clock at start and on
    ``set_policy``; a policy with the same settings keeps the clock and its bookings."""
    from policies.fairstart import FifoClock

    settings = {"wait_scale": 0.5, "tight_wait_scale": None}
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "aspen", "fair_clock": settings},
                   start_loop=False, allowed_prefixes=["/data"], num_gpus=1)  # fmt: skip
    try:
        first = c.store.get(c.submit(spec("first"), "alice")["id"])
        second = c.store.get(c.submit(spec("second"), "alice")["id"])
        work = first.extra["fifo_work_s"]
        # one server: the second waits for the first in the virtual FIFO, booked at 0.5x
        expected = FifoClock(1, **settings)
        expected.book(first.submit_time, work)
        raw = max(0.0, first.submit_time + work - second.submit_time)
        assert second.extra["fifo_wait_s"] == pytest.approx(0.5 * raw) and raw > 0
        assert second.extra["fifo_wait_s"] == pytest.approx(expected.book(second.submit_time, work))
        clock = c._fifo_clock
        c.set_policy({"policy": "aspen", "fair_clock": settings, "margin": 0.2})
        assert c._fifo_clock is clock  # same settings: same clock, bookings kept
        c.set_policy({"policy": "aspen"})
        assert c._fifo_clock is not clock and c._fifo_clock.wait_scale == 0.9  # the defaults again
        third = c.store.get(c.submit(spec("third"), "alice")["id"])
        assert third.extra["fifo_wait_s"] == 0.0  # a new clock: no bookings ahead of it
    finally:
        c.store.close()


def test_the_controller_reads_only_the_jobs_written_since_its_last_pass(tmp_path):
    """At 10,000 queued jobs a pass read and parsed every live row (0.4 s) and built every job's view
    (0.34 s) while holding the controller's lock; now a pass reads what changed and reuses the other
    views. The view must be the one a full read gives, whatever changed in between."""
    from orchestrator.spec import parse_spec

    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   num_gpus=0)  # fmt: skip
    try:
        jobs = [c.store.create_job(spec=spec(f"j{i}"), name=f"j{i}", owner="u", priority=0) for i in range(6)]
        calls = []
        original = c.store.changed_since
        c.store.changed_since = lambda since: calls.append(since) or original(since)

        def fresh():
            records = c.store.list(states=[JobState.QUEUED, JobState.PROFILING, JobState.RUNNING])
            specs = {r.id: parse_spec(r.spec, source=r.id) for r in records}
            return build_view(records, c._worker_views(), now=0.0, specs=specs, free_gpus=c._free_gpus(0.0))

        def same(view, want):
            assert [(j.job_id, j.remaining_work_s, j.micro_batch_size) for j in view.queued] == [
                (j.job_id, j.remaining_work_s, j.micro_batch_size) for j in want.queued]

        first = c._view(0.0)
        fresh_first = first.queued
        same(first, fresh())
        assert not calls  # the first pass reads everything
        c.store.update_progress(jobs[1].id, step=4)  # progress of a queued job (resumed elsewhere before)
        c.store.transition(jobs[2].id, JobState.CANCELLED)  # leaves the live set
        c.store.update_progress(jobs[4].id, step=0, extra={"micro_batch_size": 1})  # an OOM back-off's requeue
        late = c.store.create_job(spec=spec("late"), name="late", owner="u", priority=0)
        view = c._view(0.0)
        assert len(calls) == 1
        same(view, fresh())
        assert late.id in {j.job_id for j in view.queued} and jobs[2].id not in {j.job_id for j in view.queued}
        assert next(j for j in view.queued if j.job_id == jobs[4].id).micro_batch_size == 1
        before = next(j for j in fresh_first if j.job_id == jobs[1].id).remaining_work_s
        assert next(j for j in view.queued if j.job_id == jobs[1].id).remaining_work_s < before  # progress seen
        assert set(c._view_cache) == {j.job_id for j in view.queued}  # views of ended jobs are dropped
    finally:
        c.store.close()


def test_pruned_jobs_leave_the_controllers_live_view(tmp_path):
    """The controller keeps the live jobs it read and learns of changes from changed_since, which
    never reports a deleted row: a job cancelled after the last pass and pruned before the next one
    would stay QUEUED in that view for good (and a pass placing it would raise on the missing row)."""
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   num_gpus=0)  # fmt: skip
    try:
        a, b = (c.store.create_job(spec=spec(n), name=n, owner="u", priority=0).id for n in ("a", "b"))
        assert {j.job_id for j in c._view(0.0).queued} == {a, b}
        c.cancel(a, owner="u")
        assert c.prune_jobs(0) == {"deleted": 1, "ids": [a], "dry_run": False, "uploads_deleted": []}
        assert [j.job_id for j in c._view(0.0).queued] == [b]
        assert a not in c._live and a not in c._view_cache and a not in c._spec_cache and a not in c._logs
    finally:
        c.store.close()


def test_ended_jobs_progress_lines_are_trimmed_oldest_first(tmp_path, monkeypatch):
    """A long-lived controller kept every job's progress lines and samples it had ever run (about 50 KB
    a job in a soak). It keeps the live jobs' and the ENDED_LOGS_KEPT most recent ended ones'; ``logs``
    of a dropped job reads its metrics.jsonl instead."""
    import orchestrator.controller as controller_mod

    monkeypatch.setattr(controller_mod, "ENDED_LOGS_KEPT", 3)
    monkeypatch.setattr(controller_mod, "LOG_TRIM_BATCH", 2)
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   num_gpus=0)  # fmt: skip
    try:
        ids = [c.store.create_job(spec=spec(f"j{i}"), name=f"j{i}", owner="u", priority=0).id for i in range(8)]
        live = c.store.create_job(spec=spec("live"), name="live", owner="u", priority=0).id
        c._log(live, "placed")
        for job_id in ids:
            c._sample(job_id, {"step": 1, "loss": 1.0})
            c.cancel(job_id, owner="u")
        c.tick()
        kept = set(c._logs)
        assert kept == {*ids[-3:], live}  # the 5 oldest ended ones went; the live one and the 3 newest stay
        assert set(c._samples) == set(ids[-3:])
        assert c.logs(ids[0]) == [] and c.logs(ids[-1])[-1].endswith("cancelled by u")
        c.tick()
        assert set(c._logs) == kept  # under the batch: nothing more to do
    finally:
        c.store.close()


def test_a_job_queued_since_the_last_pass_keeps_its_lines_when_they_are_trimmed(tmp_path, monkeypatch):
    """The trim runs between passes: a job submitted (or retried) since the pass read the store is not in
    its live view yet, and must not lose its lines for it (``is_terminal`` was read without calling it)."""
    import orchestrator.controller as controller_mod

    monkeypatch.setattr(controller_mod, "ENDED_LOGS_KEPT", 0)
    monkeypatch.setattr(controller_mod, "LOG_TRIM_BATCH", 1)
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   num_gpus=0)  # fmt: skip
    try:
        ended = c.store.create_job(spec=spec("e"), name="e", owner="u", priority=0).id
        c.cancel(ended, owner="u")
        c.tick()
        fresh = c.store.create_job(spec=spec("f"), name="f", owner="u", priority=0).id
        c._log(fresh, "submitted by u")
        assert fresh not in c._live
        c._trim_logs()
        assert ended not in c._logs and c.logs(fresh)[-1].endswith("submitted by u")
    finally:
        c.store.close()


def test_trimmed_jobs_read_their_metrics_through_the_storage_layer(tmp_path, monkeypatch):
    """With ``file://`` (or ``s3://``) storage, a job whose lines were trimmed had empty logs and plot data:
    only a local output's metrics.jsonl was read. A URI output's is read through the storage layer, its
    last ``METRICS_READ_LIMIT`` bytes from the first whole line; a missing file gives nothing, as before."""
    import orchestrator.controller as controller_mod

    monkeypatch.setattr(controller_mod, "ENDED_LOGS_KEPT", 1)
    monkeypatch.setattr(controller_mod, "LOG_TRIM_BATCH", 1)
    storage = f"file://{tmp_path}/storage"
    c = Controller(str(tmp_path / "jobs.db"), storage, {"policy": "fifo"}, start_loop=False, num_gpus=0)
    try:
        records = [{"step": i, "total_steps": 30, "loss": 3.0 - i / 10} for i in range(1, 31)]
        ids = []
        for i in range(4):
            job_id = c.store.create_job(spec=spec(f"j{i}"), name=f"j{i}", owner="u", priority=0).id
            ids.append(job_id)
            c._append_log(job_id, f"step 30/30 loss 0.1 (job {i})")
            c._sample(job_id, {"step": 30, "loss": 0.1})
            c.store.transition(job_id, JobState.PROFILING, worker="w0")
            c.store.transition(job_id, JobState.RUNNING)
            c.store.transition(job_id, JobState.SUCCEEDED, output=f"{storage}/jobs/u/{job_id}")
        for job_id in ids[:2]:
            out = tmp_path / "storage" / "jobs" / "u" / job_id
            out.mkdir(parents=True)
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        assert c.job_metrics(ids[0]) == [{"step": 30, "total_steps": None, "loss": 0.1, "tokens_per_s": None,
                                          "time": c._samples[ids[0]].records[0]["time"]}]  # fmt: skip
        c.tick()
        assert set(c._logs) == {ids[-1]} and set(c._samples) == {ids[-1]}  # the older three were trimmed
        assert c.logs(ids[0], lines=2) == [json.dumps(r) for r in records[-2:]]
        assert c.job_metrics(ids[0]) == records
        assert c.logs_since(ids[1])["lines"] == [json.dumps(r) for r in records[-50:]]
        assert c.logs(ids[2]) == [] and c.job_metrics(ids[2]) == []  # no metrics.jsonl: nothing, no error
        limit = sum(len(json.dumps(r)) + 1 for r in records[-3:]) + 5  # three whole lines and part of one more
        monkeypatch.setattr(controller_mod, "METRICS_READ_LIMIT", limit)
        assert c.job_metrics(ids[0]) == records[-3:]  # the cut line is dropped
        assert c.logs(ids[0]) == [json.dumps(r) for r in records[-3:]]
        from actors.storage import read_tail

        with pytest.raises(FileNotFoundError, match="a directory"):
            read_tail(storage, 10)
        with pytest.raises(OSError, match="Cannot parse URI"):
            read_tail(f"file://{tmp_path}/sp ace", 10)  # pyarrow's ArrowInvalid, as an OSError
        size = (tmp_path / "storage" / "jobs" / "u" / ids[0] / "metrics.jsonl").stat().st_size
        assert read_tail(f"{storage}/jobs/u/{ids[0]}/metrics.jsonl", 10 * size) == (
            (tmp_path / "storage" / "jobs" / "u" / ids[0] / "metrics.jsonl").read_bytes(), 0)
    finally:
        c.store.close()


def test_prune_with_uploads_deletes_the_areas_only_pruned_jobs_named(tmp_path):
    """Every ``lorafleet submit`` copies the laptop's data into ``uploads/<owner>/<id>/``; nothing ever
    deleted them (a soak: one area per submission). ``prune_jobs(uploads=True)`` deletes the areas of the
    pruned jobs that no remaining job names; a dry run lists them and deletes nothing."""
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   num_gpus=0)  # fmt: skip
    try:
        root = Path(c.uploads_root("u"))
        areas = {}
        for area_id in ("aaaaaaaaaaa1", "aaaaaaaaaaa2", "aaaaaaaaaaa3"):
            (root / area_id).mkdir(parents=True)
            (root / area_id / "data-d.jsonl").write_text('{"text": "x"}\n')
            areas[area_id] = root / area_id
        (root / "not-an-area").mkdir()  # not made by the agent: never touched

        def job(name: str, area_id: str, end: bool) -> str:
            doc = spec(name)
            doc["data"]["path"] = str(areas[area_id] / "data-d.jsonl")
            job_id = c.submit(doc, "u")["id"]
            if end:
                c.cancel(job_id, owner="u")
            return job_id

        old = job("old", "aaaaaaaaaaa1", end=True)  # its area is named by no one else: goes
        job("shared-ended", "aaaaaaaaaaa2", end=True)
        job("shared-live", "aaaaaaaaaaa2", end=False)  # submitted with it, still queued: the area stays
        job("live", "aaaaaaaaaaa3", end=False)
        dry = c.prune_jobs(0, dry_run=True, uploads=True)
        assert dry["deleted"] == 2 and dry["uploads_deleted"] == [str(areas["aaaaaaaaaaa1"])]
        assert all(p.is_dir() for p in areas.values())
        assert c.prune_jobs(0)["uploads_deleted"] == [] and all(p.is_dir() for p in areas.values())  # not asked
        job("old2", "aaaaaaaaaaa1", end=True)
        out = c.prune_jobs(0, uploads=True)
        assert out["deleted"] == 1 and out["uploads_deleted"] == [str(areas["aaaaaaaaaaa1"])]
        assert not areas["aaaaaaaaaaa1"].exists() and areas["aaaaaaaaaaa2"].is_dir() and areas["aaaaaaaaaaa3"].is_dir()
        assert (root / "not-an-area").is_dir() and old not in c._live
    finally:
        c.store.close()


def _lock_held(lock) -> bool:
    """Whether some thread holds ``lock``, probed from a new thread (an RLock, which the thread holding it
    could acquire again, and which has no ``locked()`` before Python 3.14)."""
    got: list[bool] = []

    def probe() -> None:
        got.append(lock.acquire(blocking=False))
        if got[0]:
            lock.release()

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return not got[0]


def test_prune_scans_and_deletes_upload_areas_outside_the_loop_lock(tmp_path, monkeypatch):
    """``prune_jobs(uploads=True)`` held the policy loop's lock while it scanned every spec once per area
    and deleted each area (network I/O on an object store): with 6000 jobs another caller waited 9 s.
    Only the store prune and dropping the ids from the live view are done under the lock; the areas
    still named are found in one pass over the remaining specs."""
    import actors.storage

    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   num_gpus=0)  # fmt: skip
    try:
        root = Path(c.uploads_root("u"))
        ids = []
        for i in range(6):
            area = root / f"{i:012x}"
            area.mkdir(parents=True)
            (area / "data-d.jsonl").write_text('{"text": "x"}\n')
            doc = spec(f"j{i}")
            doc["data"]["path"] = str(area / "data-d.jsonl")
            ids.append(c.submit(doc, "u")["id"])
        for job_id in ids[:3]:
            c.cancel(job_id, owner="u")
        c._lock.acquire()  # held by this thread: prune_jobs, in another thread, must wait for it
        try:
            out: list[dict] = []
            t = threading.Thread(target=lambda: out.append(c.prune_jobs(0, uploads=True)))
            t.start()
            t.join(0.5)
            assert t.is_alive() and not out  # waits for the lock, to prune
        finally:
            c._lock.release()
        t.join(10)
        assert out[0]["deleted"] == 3
        seen: list[tuple[str, bool]] = []
        scan, delete = c.store.spec_matches, actors.storage.delete_tree

        def spec_matches(*args, **kwargs):
            seen.append(("scan", _lock_held(c._lock)))
            return scan(*args, **kwargs)

        def delete_tree(target):
            seen.append(("delete", _lock_held(c._lock)))
            return delete(target)

        monkeypatch.setattr(c.store, "spec_matches", spec_matches)
        monkeypatch.setattr(actors.storage, "delete_tree", delete_tree)
        for job_id in ids[3:5]:
            c.cancel(job_id, owner="u")
        out = c.prune_jobs(0, uploads=True)
        assert out["deleted"] == 2 and out["uploads_deleted"] == [str(root / f"{i:012x}") for i in (3, 4)]
        assert seen == [("scan", False), ("delete", False), ("delete", False)]  # one scan; the lock is free
        assert [p.name for p in sorted(root.iterdir())] == [f"{5:012x}"]
    finally:
        c.store.close()


def test_a_job_no_worker_can_run_even_alone_says_why_in_status_and_its_log(tmp_path, fake_workers):
    """With 2 GiB GPUs, a job of 32 x 4,096 tokens on SmolLM2 fits nowhere: every policy passes it
    over (the small job behind it starts), and ``status``/``logs`` say why, once, until a worker
    large enough joins."""
    from tests.orchestrator.test_tenancy import spec as small_spec

    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   num_gpus=2, worker_memory_bytes=2 * GIB)  # fmt: skip
    try:
        big = c.submit({**small_spec("big"), "data": {"path": "d.jsonl", "max_seq_len": 4096},
                        "train": {"max_steps": 10, "batch_size": 32, "micro_batch_size": 32}}, "alice")  # fmt: skip
        small = c.submit(small_spec("small"), "alice")
        for _ in range(3):
            c.tick()
        assert c.store.get(small["id"]).state == JobState.PROFILING
        assert c.store.get(big["id"]).state == JobState.QUEUED
        waiting = c.status(big["id"])["waiting"]
        assert re.fullmatch(r"fits no worker even alone: predicted peak [0-9.]+ GiB with the policy's margin, the "
                            r"largest worker has 2\.0 GiB; it waits for a larger worker \(cancel it and submit "
                            r"with a smaller micro_batch_size or max_seq_len\)", waiting)  # fmt: skip
        assert float(waiting.split("peak ")[1].split(" ")[0]) > 2.0
        assert [line for line in c.logs(big["id"]) if "fits no worker" in line] != []
        assert sum("fits no worker" in line for line in c.logs(big["id"])) == 1  # once, not every pass
        assert "waiting" not in c.status(small["id"])
        peak = float(waiting.split("peak ")[1].split(" ")[0])
        middle = int((2.0 + peak) / 2)
        c.worker_memory_bytes = middle * GIB  # larger GPUs, still too small: today's numbers
        c.tick()
        assert f"the largest worker has {middle:.1f} GiB" in c.status(big["id"])["waiting"]
        assert sum("fits no worker" in line for line in c.logs(big["id"])) == 1
        c.worker_memory_bytes = 4096 * GIB  # a large GPU joins: the reason goes
        c.tick()
        assert "waiting" not in c.status(big["id"])
    finally:
        c.store.close()


def test_fair_share_usage_is_accounted_saved_and_reaches_the_policy(tmp_path):
    """The controller gave the policy no usage (``owner_usage_s`` empty), so aspen's fair share never
    acted on a live cluster. Each pass now adds each worker's time, split by rows, to its owners, at
    the loop's real cadence (0.5 s), decays it, and keeps it across a restart."""
    import time

    from policies.builtin import AspenSettings, aspen
    from policies.snapshot import ClusterView
    from tests.policies.helpers import job, worker

    store = tmp_path / "jobs.db"
    c = Controller(str(store), str(tmp_path / "storage"), {"policy": "aspen"}, start_loop=False, num_gpus=2)
    t0 = time.time() - 3600.0
    try:
        running = (job("a1", owner="alice", mbs=3, worker="w0", start=0), job("b1", owner="bob", mbs=1, worker="w0",
                   start=0), job("a2", owner="alice", mbs=2, worker="w1", start=0))  # fmt: skip
        workers = (worker("w0"), worker("w1"))
        for i in range(7201):  # one hour of passes every 0.5 s (a first cut dropped owners under 1 s each pass)
            c._account_usage(ClusterView(t0 + 0.5 * i, (), running, workers))
        decay = 0.5 ** (1800.0 / (7 * 86400.0))  # on average half an hour old
        assert c._usage["alice"] == pytest.approx(3600 * (3 / 4 + 1) * decay, rel=1e-3)
        assert c._usage["bob"] == pytest.approx(3600 * (1 / 4) * decay, rel=1e-3)
        c._account_usage(ClusterView(t0 + 3600.0 + 3600.0, (), running, workers))  # a stalled hour: 60 s of use
        assert c._usage["bob"] == pytest.approx(900 * decay * 0.5 ** (3600.0 / (7 * 86400.0)) + 15, rel=1e-3)
        saved = json.loads((tmp_path / "usage.json").read_text())
        assert set(saved) == {"at", "usage"} and saved["usage"].keys() == {"alice", "bob"}
        assert c._view(time.time()).owner_usage_s == c._usage
    finally:
        c.store.close()
    # saved two weeks ago: back at a quarter
    (tmp_path / "usage.json").write_text(json.dumps({"at": time.time() - 14 * 86400.0, "usage": {"alice": 1000.0}}))
    again = Controller(str(store), str(tmp_path / "storage"), {"policy": "aspen"}, start_loop=False, num_gpus=2)
    try:
        assert again._usage == {"alice": pytest.approx(250.0, rel=1e-3)}
    finally:
        again.store.close()
    # what it changes: alice's job waits behind bob's later one under fair share alone
    queued = (job("a", owner="alice", submit=0), job("b", owner="bob", submit=10))
    policy = aspen(AspenSettings(weights={"fairshare": 1.0, "size": 0.0, "age": 0.0, "priority": 0.0}))
    free = (worker("w0"),)
    assert policy.schedule(ClusterView(100.0, queued, (), free))[0] == Start("a", "w0")  # who goes first
    busy = ClusterView(100.0, queued, (), free, {"alice": 175.0, "bob": 25.0})
    assert policy.schedule(busy)[0] == Start("b", "w0")


def test_a_job_held_by_a_quota_says_why_in_status_and_once_in_its_log(tmp_path, fake_workers):
    """aspen with quotas {alice: 1}: alice's second job waits for her first, with free GPUs. Its
    status said nothing; now ``waiting`` names the rule and its reason (the words of ``policy
    explain``), its log says so once, and both go when the job starts."""
    from tests.orchestrator.test_tenancy import spec as small_spec

    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "aspen", "quotas": {"alice": 1}},
                   start_loop=False, num_gpus=3)  # fmt: skip
    try:
        first, second = (c.submit(small_spec(n), "alice")["id"] for n in ("a1", "a2"))
        bob = c.submit(small_spec("b1"), "bob")["id"]
        for _ in range(4):
            c.tick()
        assert [c.store.get(j).state for j in (first, second, bob)] == [JobState.PROFILING, JobState.QUEUED,
                                                                       JobState.PROFILING]  # fmt: skip
        waiting = c.status(second)["waiting"]
        assert waiting.startswith("held by the policy's quota rule: owner alice at quota (1/1 running); it starts "
                                  "once that changes")  # fmt: skip
        assert "owner alice at quota (1/1 running)" in c.explain(second)
        assert "waiting" not in c.status(first) and "waiting" not in c.status(bob)
        assert sum("waiting: held by the policy's quota rule" in line for line in c.logs(second)) == 1
        c.store.transition(first, JobState.RUNNING)
        c.store.transition(first, JobState.SUCCEEDED)
        for w in c._workers.values():
            w.assigned.discard(first)
        c.tick()
        assert c.store.get(second).state == JobState.PROFILING and "waiting" not in c.status(second)
    finally:
        c.store.close()


def test_set_policy_returns_and_logs_the_warnings_of_a_quota_of_zero(tmp_path, caplog):
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   num_gpus=0)  # fmt: skip
    try:
        with caplog.at_level("WARNING", logger="orchestrator.controller"):
            out = c.set_policy({"policy": "aspen", "gpu_quotas": {"root": 0}})
        assert out["name"] == "aspen" and len(out["warnings"]) == 1
        assert out["warnings"][0].startswith("policy: gpu_quotas.root: 0 workers (GPUs): no job of owner root will")
        assert out["warnings"][0] in caplog.text
        assert c.set_policy({"policy": "aspen", "gpu_quotas": {"root": 1}})["warnings"] == []
    finally:
        c.store.close()


# --- a faulty custom policy must not stop scheduling (the admin audit) --------------------------------------------
# Custom policies set by import path (``policy: tests.orchestrator.test_controller_logic:Failing``).

HERE = "tests.orchestrator.test_controller_logic"


class Failing:
    """Raises while ``failing`` (the tests flip it on the controller's instance), else fifo's decisions."""

    name = "failing"

    def __init__(self) -> None:
        from policies import fifo

        self.failing, self.error, self._fifo = True, "boom", fifo()

    def schedule(self, view):
        if self.failing:
            raise RuntimeError(self.error)
        return self._fifo.schedule(view)

    def explain(self, view, job_id):
        return self._fifo.explain(view, job_id)


class FailsLater(Failing):
    """Works until flipped: `policy set` takes it (its dry run passes), then it fails on a later state."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False


class ReturnsNone(Failing):
    def schedule(self, view):
        return None


class ReturnsWorkerIds(Failing):
    def schedule(self, view):
        return [w.worker_id for w in view.workers]


class BadDecisions(Failing):
    """While nothing runs, one valid Start (the first queued job on the free GPU) and its duplicate; in
    every pass an unknown job, and for the other queued jobs an unknown worker and a preempt."""

    def schedule(self, view):
        chosen = None if view.running else view.queued[0]
        out = [Start("no-such-job", "free-gpu-0")]
        if chosen is not None:
            out += [Start(chosen.job_id, "free-gpu-0"), Start(chosen.job_id, "free-gpu-0")]
        for j in view.queued:
            if j is not chosen:
                out += [Start(j.job_id, "no-such-worker"), Preempt(j.job_id)]
        return out


def _failing_controller(tmp_path, policy: str, num_gpus: int = 0) -> Controller:
    return Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": f"{HERE}:{policy}"},
                      start_loop=False, num_gpus=num_gpus)  # fmt: skip


FAILING = (rf"policy {HERE}:Failing FAILING since \d\d:\d\d:\d\d: \S+test_controller_logic\.py:\d+: RuntimeError: "
           r"boom; scheduling falls back to fifo until it is fixed or replaced \(lorafleet policy set\)")  # fmt: skip


def test_a_policy_whose_schedule_raises_falls_back_to_fifo_logs_once_and_says_so(tmp_path, fake_workers, caplog):
    """The audit: schedule() raising failed every pass (a traceback every 0.5 s), every job stayed
    QUEUED without a word, and only ping() held the error. Now fifo places jobs for that pass, the error
    is logged once per distinct error, status's waiting note and policy show (get_policy) say so, and it
    clears when the policy works again."""
    from tests.orchestrator.test_tenancy import spec as small_spec

    c = _failing_controller(tmp_path, "Failing")
    try:
        job = c.submit(small_spec("a"), "alice")["id"]
        with caplog.at_level("INFO", logger="orchestrator.controller"):
            for _ in range(5):
                c.tick()  # raised before
        failed = [r for r in caplog.records if "schedule() failed" in r.getMessage()]
        assert len(failed) == 1 and failed[0].levelname == "ERROR" and failed[0].exc_info  # once, with traceback
        assert re.fullmatch(FAILING, c.get_policy()["failing"])
        assert c.ping()["policy_failing"] == c.get_policy()["failing"]
        assert re.fullmatch(FAILING, c.status(job)["waiting"])  # no GPU: fifo cannot place it either
        assert sum("FAILING since" in line for line in c.logs(job)) == 1
        c.policy.error = "another boom"  # a distinct error: logged too
        c.tick()
        c.tick()
        assert sum("schedule() failed" in r.getMessage() for r in caplog.records) == 2
        assert "RuntimeError: another boom;" in c.get_policy()["failing"]
        c.num_gpus = 1  # a GPU: fifo places the job although the policy still fails
        c.tick()
        assert c.store.get(job).state == JobState.PROFILING
        queued = c.submit(small_spec("b"), "alice")["id"]
        c.policy.failing = False  # fixed: the error and the notes go
        caplog.clear()
        with caplog.at_level("INFO", logger="orchestrator.controller"):
            c.tick()
        assert c.get_policy()["failing"] is None and c.ping()["policy_failing"] is None
        assert "works again after 8 failed passes" in caplog.text
        assert "FAILING" not in c.status(queued).get("waiting", "")
    finally:
        c.store.close()


@pytest.mark.parametrize("policy, error", [
    ("ReturnsNone", r"schedule\(\) returned NoneType; it must return a list of Start and Preempt decisions"),
    ("ReturnsWorkerIds", r"schedule\(\) returned 'free-gpu-0' \(str\) at index 0, which is not a decision"),
])  # fmt: skip
def test_a_policy_returning_no_list_of_decisions_falls_back_to_fifo(tmp_path, fake_workers, policy, error):
    """None raised TypeError in every pass, blocking every job; it is the policy's failure now, and fifo places the job."""
    from tests.orchestrator.test_tenancy import spec as small_spec

    c = _failing_controller(tmp_path, policy, num_gpus=1)
    try:
        job = c.submit(small_spec("a"), "alice")["id"]
        c.tick()
        assert c.store.get(job).state == JobState.PROFILING
        assert re.fullmatch(rf"policy {HERE}:{policy} FAILING since \S+: {error}.*; scheduling "
                            r"falls back to fifo until it is fixed or replaced \(lorafleet policy set\)",
                            c.get_policy()["failing"])  # fmt: skip
    finally:
        c.store.close()


def test_invalid_decisions_are_skipped_once_each_and_the_valid_ones_still_apply(tmp_path, fake_workers, caplog):
    """A Start of a job id that does not exist failed the whole pass (UnknownJobError) every time, a
    Start on an unknown worker was dropped without a word. Now each invalid decision is skipped with
    one log line while it repeats, the valid Start of the same pass is applied, and no fallback."""
    from tests.orchestrator.test_tenancy import spec as small_spec

    c = _failing_controller(tmp_path, "BadDecisions", num_gpus=1)
    try:
        jobs = [c.submit(small_spec(n), "alice")["id"] for n in ("a", "b")]
        with caplog.at_level("WARNING", logger="orchestrator.controller"):
            for _ in range(3):
                c.tick()
        states = {j: c.store.get(j).state for j in jobs}
        assert sorted(states.values()) == [JobState.PROFILING, JobState.QUEUED]
        placed = next(j for j, s in states.items() if s == JobState.PROFILING)
        other = next(j for j, s in states.items() if s == JobState.QUEUED)
        assert c.get_policy()["failing"] is None
        skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        assert sorted(skipped) == sorted([
            f"policy {HERE}:BadDecisions: skipped Start(job_id='no-such-job', worker_id='free-gpu-0'): job not "
            "queued: it is not in the view (unknown or ended)",
            f"policy {HERE}:BadDecisions: skipped Start(job_id='{placed}', worker_id='free-gpu-0'): job not "
            "queued: an earlier decision of this pass starts it on free-gpu-0",
            f"policy {HERE}:BadDecisions: skipped Start(job_id='{other}', worker_id='no-such-worker'): worker "
            "unknown: not in the view",
            f"policy {HERE}:BadDecisions: skipped Preempt(job_id='{other}'): job is not running",
        ])  # fmt: skip   (the duplicate of the first pass only: later passes start nothing new)
        assert c.status(other)["waiting"] == (
            f"the policy's decision Start(job_id='{other}', worker_id='no-such-worker'): worker unknown: not in "
            "the view was skipped; it waits for a valid one (`lorafleet policy show` lists "
            "the skipped decisions)")  # fmt: skip
        assert any("no-such-worker" in line for line in c.get_policy()["skipped"])
    finally:
        c.store.close()


def test_housekeeping_runs_when_the_pass_fails(tmp_path, fake_workers, monkeypatch):
    """Log trimming and metrics export were skipped on every failed pass."""
    from tests.orchestrator.test_tenancy import spec as small_spec

    c = _failing_controller(tmp_path, "Failing")
    chores: list[str] = []
    monkeypatch.setattr(c, "_trim_logs", lambda: chores.append("trim"))
    monkeypatch.setattr(c, "_export_metrics", lambda: chores.append("metrics"))
    try:
        c.submit(small_spec("a"), "alice")
        c.tick()  # the policy fails: the pass goes on with fifo
        assert chores == ["trim", "metrics"]

        def broken(now):
            raise RuntimeError("store unreadable")

        monkeypatch.setattr(c, "_view", broken)  # the pass itself fails: still the chores, then the error
        with pytest.raises(RuntimeError, match="store unreadable"):
            c.tick()
        assert chores == ["trim", "metrics"] * 2
    finally:
        c.store.close()


def test_a_stale_waiting_note_of_the_previous_policy_goes_when_the_new_one_fails(tmp_path, fake_workers):
    """aspen's quota note stayed on the queued job after a policy that then failed: the note code was
    not reached. Now the note says the policy fails and fifo schedules."""
    from tests.orchestrator.test_tenancy import spec as small_spec

    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "aspen", "quotas": {"default": 0}},
                   start_loop=False, num_gpus=1)  # fmt: skip
    try:
        job = c.submit(small_spec("a"), "alice")["id"]
        c.tick()
        assert c.status(job)["waiting"].startswith("held by the policy's quota rule")
        c.set_policy({"policy": f"{HERE}:FailsLater"})  # works on the current queue: set
        c.policy.failing = True
        c.num_gpus = 0  # nor can fifo place it
        c.tick()
        assert "FailsLater FAILING since" in c.status(job)["waiting"]
        assert "quota" not in c.status(job)["waiting"]
    finally:
        c.store.close()


def test_policy_set_dry_runs_the_new_policy_on_the_current_queue(tmp_path, fake_workers):
    """`policy set` of a policy whose schedule() raises on the current queue is refused, naming the error
    (the loop would hit it on this very view); with nothing queued it is set, and the fallback covers it."""
    from tests.orchestrator.test_tenancy import spec as small_spec

    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   num_gpus=0)  # fmt: skip
    try:
        assert c.set_policy({"policy": f"{HERE}:Failing"})["name"] == "failing"  # empty queue: no dry run
        c.set_policy({"policy": "fifo"})
        c.submit(small_spec("a"), "alice")
        with pytest.raises(ValueError, match=rf"^policy {HERE}:Failing: schedule\(\) failed on the current queue "
                                             r"\(1 queued, 0 running jobs\): \S+: RuntimeError: boom; not set, "
                                             r"policy fifo stays$"):  # fmt: skip
            c.set_policy({"policy": f"{HERE}:Failing"})
        assert c.get_policy()["name"] == "fifo" and c.policy_doc == {"policy": "fifo"}
        c.num_gpus = 1
        out = c.set_policy({"policy": f"{HERE}:BadDecisions"})  # invalid decisions: set, with warnings
        assert out["name"] == "failing" and out["warnings"] == []
        assert out["dry_run"][0] == (f"policy {HERE}:BadDecisions: on the current queue, Start(job_id='no-such-job', "
                                     "worker_id='free-gpu-0'): job not queued: it is not in the view (unknown or "
                                     "ended) (such a decision is skipped)")  # fmt: skip
    finally:
        c.store.close()


# --- the policy's view of a job's size: the simulator's cost model, the catalogue, the data's records


def _solo_step_s(shape, doc: dict, tflops: float) -> float:
    """One step of ``doc`` alone at ``tflops``, as the simulator estimates it (Simulator._make_job)."""
    from orchestrator.controller import COST_MODEL
    from orchestrator.spec import parse_spec
    from policies.costmodel import Member
    from policies.memory_model import adapter_param_count

    parsed = parse_spec(doc)
    train = parsed.train
    member = Member(train.micro_batch_size, parsed.data.max_seq_len,
                    adapter_param_count(shape, adapter_shape_of(parsed)))  # fmt: skip
    return train.batch_size // train.micro_batch_size * COST_MODEL.iteration_time_s(shape, [member], tflops)


def test_a_hub_id_base_model_is_sized_from_the_catalogue_and_an_unknown_one_is_warned_once(caplog):
    from orchestrator.controller import FALLBACK_SHAPE, _unreported_shape
    from policies.catalogue import CATALOGUE

    _unreported_shape.cache_clear()
    assert model_shape_for("meta-llama/Llama-2-7b-hf") == CATALOGUE["llama-2-7b"]  # an alias, any case
    assert model_shape_for("mistralai/Mistral-7B-v0.1") == CATALOGUE["mistral-7b"]
    assert model_shape_for("llama-3-8b") == CATALOGUE["llama-3-8b"]  # a catalogue name
    with caplog.at_level("WARNING", logger="orchestrator.controller"):
        for _ in range(3):
            assert model_shape_for("someone/not-a-known-model") == FALLBACK_SHAPE
    warned = [r.getMessage() for r in caplog.records if "not-a-known-model" in r.getMessage()]
    assert len(warned) == 1 and "135M" in warned[0] and "until a worker loads it" in warned[0]
    # a worker's report comes first
    reported = {"meta-llama/Llama-2-7b-hf": {**CATALOGUE["smollm2-135m"].__dict__}}
    assert model_shape_for("meta-llama/Llama-2-7b-hf", reported) == CATALOGUE["smollm2-135m"]


def test_job_view_of_a_7b_hub_id_job_against_a_135m_one(store):
    from orchestrator.controller import DEFAULT_WORKER_TFLOPS
    from policies.catalogue import CATALOGUE
    from policies.memory_model import static_bytes

    big_doc, small_doc = spec("big", base="meta-llama/Llama-2-7b-hf"), spec("small")
    big = store.create_job(spec=big_doc, name="big", owner="u", priority=0, total_steps=10)
    small = store.create_job(spec=small_doc, name="small", owner="u", priority=0, total_steps=10)
    view = build_view(store.list(), [], now=1e9, free_gpus=1)
    jobs = {j.job_id: j for j in view.queued}
    assert jobs[big.id].static_bytes == static_bytes(CATALOGUE["llama-2-7b"])  # not the 135M fallback's
    assert jobs[small.id].static_bytes == static_bytes(CATALOGUE["smollm2-135m"])
    assert jobs[big.id].static_bytes > 10 * jobs[small.id].static_bytes  # 13.6 GiB against 1.25
    for job_id, shape, doc in ((big.id, CATALOGUE["llama-2-7b"], big_doc), (small.id, CATALOGUE["smollm2-135m"], small_doc)):
        want = 10 * _solo_step_s(shape, doc, DEFAULT_WORKER_TFLOPS)
        assert jobs[job_id].total_work_s == pytest.approx(want) and jobs[job_id].remaining_work_s == pytest.approx(want)
    assert jobs[big.id].remaining_work_s > 10 * jobs[small.id].remaining_work_s
    # the workers' TFLOP/s is a setting: the free GPU shows it and the cost model runs at it
    fast = build_view(store.list(), [], now=1e9, free_gpus=1, worker_tflops=4 * DEFAULT_WORKER_TFLOPS)
    assert fast.workers[0].tflops == 4 * DEFAULT_WORKER_TFLOPS
    big_fast = next(j for j in fast.queued if j.job_id == big.id)
    assert big_fast.remaining_work_s == pytest.approx(10 * _solo_step_s(CATALOGUE["llama-2-7b"], big_doc, 4 * DEFAULT_WORKER_TFLOPS))
    assert big_fast.remaining_work_s < jobs[big.id].remaining_work_s / 3


def test_a_reporting_job_s_remaining_work_follows_its_measured_tokens_per_s(store):
    rec = store.create_job(spec=spec("a", micro=2, batch=4), name="a", owner="u", priority=0, total_steps=50)
    store.transition(rec.id, JobState.PROFILING, worker="w-1")
    store.transition(rec.id, JobState.RUNNING)
    workers = [WorkerView("w-1", 80 << 30, 100.0, loaded_model="builtin:smollm2-135m-instruct", running=(rec.id,))]
    before = build_view(store.list(), workers, now=1e9).running[0]
    store.update_progress(rec.id, step=10, total_steps=50, tokens_per_s=32.0)
    after = build_view(store.list(), workers, now=1e9).running[0]
    per_step = 4 * 64 / 32.0  # batch_size x max_seq_len tokens at the measured rate
    assert after.remaining_work_s == pytest.approx(40 * per_step) and after.total_work_s == pytest.approx(50 * per_step)
    assert after.remaining_work_s != pytest.approx(before.remaining_work_s * 40 / 50)  # not the cost model's
    store.update_progress(rec.id, step=20, tokens_per_s=64.0)  # twice as fast now: half the time per step
    assert build_view(store.list(), workers, now=1e9).running[0].remaining_work_s == pytest.approx(30 * per_step / 2)


@pytest.mark.parametrize(("records", "held_out", "want"), [(1000, None, 750), (1001, None, 753), (1000, 0.1, 675)])
def test_an_epochs_spec_s_work_counts_its_data_records(tmp_path, records, held_out, want):
    from orchestrator.controller import DEFAULT_WORKER_TFLOPS
    from policies.catalogue import CATALOGUE

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"r{i}"}) + "\n" for i in range(records)) + "\n")
    doc = spec("ep", micro=2, batch=4)
    doc["data"]["path"] = str(data)
    doc["train"] = {"epochs": 3, "batch_size": 4, "micro_batch_size": 2}  # no max_steps
    if held_out is not None:
        doc["eval"] = {"held_out_fraction": held_out}
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "sjf"}, start_loop=False,
                   num_gpus=1, allowed_prefixes=[str(tmp_path)])  # fmt: skip
    try:
        job = c.submit(doc, "alice")
        rec = c.store.get(job["id"])
        # 3 epochs of ceil(examples / 4) steps, the last batch of an epoch partial (DataPlan's arithmetic)
        assert rec.extra["planned_steps"] == want and rec.total_steps is None
        view = c._view(1e9).queued[0]
        assert view.total_work_s == pytest.approx(want * _solo_step_s(CATALOGUE["smollm2-135m"], doc, DEFAULT_WORKER_TFLOPS))
    finally:
        c.store.close()


def test_planned_steps_agree_with_the_worker_s_data_plan():
    from actors.data import DataPlan, held_out_indices
    from orchestrator.checks import planned_steps
    from orchestrator.spec import parse_spec

    for n, fraction, epochs, batch in ((10, 0.0, 1, 4), (9, 0.2, 2, 4), (1000, 0.05, 3, 16), (2, 0.5, 1, 8)):
        doc = spec("p", micro=2, batch=batch)
        doc["train"] = {"epochs": epochs, "batch_size": batch, "micro_batch_size": 2}
        if fraction:
            doc["eval"] = {"held_out_fraction": fraction}
        parsed = parse_spec(doc)
        examples = n - len(held_out_indices(n, fraction, parsed.train.seed))
        assert planned_steps(parsed, n) == DataPlan.create(examples, parsed.to_job_config().train, True).total_steps


def test_record_count_is_cheap_and_says_none_when_it_cannot_tell(tmp_path):
    from orchestrator.checks import record_count

    lines = tmp_path / "a.jsonl"
    lines.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    listed = tmp_path / "b.json"
    listed.write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"text": "c"}], indent=2))
    pretty = tmp_path / "c.json"
    pretty.write_text(json.dumps({"text": "a"}, indent=2))
    table = tmp_path / "d.csv"
    table.write_text('text,label\n"multi\nline",1\n\nb,2\n')
    assert [record_count(str(p)) for p in (lines, listed, pretty, table)] == [2, 3, None, 2]
    assert record_count(str(tmp_path / "missing.jsonl")) is None and record_count("s3://bucket/x.jsonl") is None


def test_record_count_reads_a_file_once_per_version_and_no_large_json_list(tmp_path, monkeypatch):
    """The review: every submission re-read a shared dataset, and a JSON list was parsed whole on the head."""
    import os

    from orchestrator import checks

    calls = []
    real = checks.count_records
    monkeypatch.setattr(checks, "count_records", lambda path: calls.append(path) or real(path))
    data = tmp_path / "shared.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [checks.record_count(str(data)) for _ in range(3)] == [2, 2, 2] and len(calls) == 1
    data.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
    os.utime(data, ns=(1, 1))  # another version: counted again
    assert checks.record_count(str(data)) == 3 and len(calls) == 2
    listed = tmp_path / "big.json"
    listed.write_text(json.dumps([{"text": "a"}] * 3))
    monkeypatch.setattr(checks, "JSON_LIST_COUNT_LIMIT", 10)
    assert checks.record_count(str(listed)) is None  # the documented fallback rather than a parse


def test_an_epochs_spec_whose_data_is_not_counted_keeps_the_documented_fallback(tmp_path):
    from orchestrator.controller import DEFAULT_WORKER_TFLOPS, UNKNOWN_STEPS
    from policies.catalogue import CATALOGUE

    doc = spec("ep")
    doc["data"]["path"] = str(tmp_path / "later.jsonl")  # not there (yet) at submission: not counted
    doc["train"] = {"epochs": 3, "batch_size": 4, "micro_batch_size": 2}
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "sjf"}, start_loop=False,
                   num_gpus=1, allowed_prefixes=[str(tmp_path)])  # fmt: skip
    try:
        job = c.submit(doc, "alice")
        assert "planned_steps" not in c.store.get(job["id"]).extra
        view = c._view(1e9).queued[0]
        step_s = _solo_step_s(CATALOGUE["smollm2-135m"], doc, DEFAULT_WORKER_TFLOPS)
        assert view.total_work_s == pytest.approx(UNKNOWN_STEPS * step_s)
    finally:
        c.store.close()


def test_the_workers_tflops_is_a_controller_setting(tmp_path):
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), None, start_loop=False, num_gpus=2,
                   worker_tflops=312.0)  # fmt: skip
    try:
        assert [w.tflops for w in c._view(1e9).workers] == [312.0, 312.0]
        assert c.ping()["worker_tflops"] == 312.0
    finally:
        c.store.close()
    with pytest.raises(ValueError, match="worker_tflops"):
        Controller(str(tmp_path / "j2.db"), str(tmp_path / "storage"), None, start_loop=False, worker_tflops=0)


class BadHeld(FailsLater):
    """Schedules as fifo, but its held() (the waiting notes' hook) answers garbage; its margin raises."""

    answer: object = ["not", "a", "dict"]

    @property
    def margin(self) -> float:
        raise RuntimeError("margin boom")

    def held(self, view):
        return self.answer


@pytest.mark.parametrize("answer", [["not", "a", "dict"], {"x": "no pair"}, None])
def test_a_custom_policys_broken_held_costs_only_its_notes(tmp_path, fake_workers, answer):
    """The review: held()'s result was unpacked outside its try, so a bad one failed every pass."""
    from tests.orchestrator.test_tenancy import spec as small_spec

    c = _failing_controller(tmp_path, "BadHeld", num_gpus=1)
    try:
        c.policy.answer = answer
        job = c.submit(small_spec("a"), "alice")["id"]
        c.tick()
        assert c.status(job)["state"] == "PROFILING"  # placed by the policy as if held() were absent
    finally:
        c.store.close()


def test_a_stored_spec_this_version_refuses_fails_that_job_alone(tmp_path, fake_workers):
    """A job queued under an older version whose checks were looser (`max_steps: true` parsed as 1
    before it was refused) made every scheduling pass raise after the upgrade: nothing was placed."""
    db = str(tmp_path / "jobs.db")
    with JobStore(db) as s:
        old = s.create_job(spec={**spec("old"), "train": {"max_steps": True, "batch_size": 4, "micro_batch_size": 2}},
                           name="old", owner="u", priority=0).id  # fmt: skip
    c = Controller(db, str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False, num_gpus=1,
                   allowed_prefixes=["/data"])  # fmt: skip
    try:
        good = c.submit(spec("good"), "u")["id"]
        c.tick()
        rec = c.store.get(old)
        assert rec.state == JobState.FAILED
        assert rec.error.startswith("its stored spec is refused by this version of lorafleet: ") and "max_steps" in rec.error
        assert c.store.get(good).state == JobState.PROFILING  # the pass went on
        assert any("failed: its stored spec is refused" in line for line in c.logs(old))
    finally:
        c.store.close()

"""The worker actor's class, driven in-process (no Ray): joins, progress, failures, OOM, preemption."""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from actors.checkpoint import read_adapter
from actors.config import AdapterSettings, DataSettings, EvalSettings, JobConfig, LoraSettings, TrainSettings
from actors.worker import TrainingWorker
from tests.conftest import token_records, write_jsonl


def job_config(
    tmp: Path,
    name: str,
    *,
    seed: int = 0,
    steps: int = 4,
    data: Path | None = None,
    checkpoint_every: int = 2,
    output: Path | None = None,
) -> JobConfig:
    if data is None:
        data = write_jsonl(tmp / f"{name}.jsonl", token_records(16, seed, 6, 12))
    return JobConfig(
        name=name,
        base_model="",
        adapter=AdapterSettings("lora", LoraSettings(r=4, alpha=8, dropout=0.0), ("q_proj", "v_proj")),
        data=DataSettings(path=str(data), format="tokens", max_seq_len=32),
        train=TrainSettings(
            max_steps=steps,
            batch_size=4,
            micro_batch_size=2,
            learning_rate=1e-2,
            seed=seed,
            checkpoint_every=checkpoint_every,
        ),
        output=str(output or tmp / "out" / name),
    )


# Events ``progress`` drained but the waiting call did not ask for: the next call sees them first. A
# job that joins and finishes between two polls reports both at once, and a test waiting for
# "joined" and then "finished" must not lose the second.
_UNCLAIMED: weakref.WeakKeyDictionary[TrainingWorker, list[dict]] = weakref.WeakKeyDictionary()


def wait_events(worker: TrainingWorker, want: dict[str, str], timeout: float = 120.0) -> dict[str, dict]:
    """Poll ``progress`` until every job in ``want`` reported the given event kind (each job's first
    such event); other events are kept for the next call."""
    seen: dict[str, dict] = {}
    backlog = _UNCLAIMED.setdefault(worker, [])
    deadline = time.time() + timeout
    while time.time() < deadline:
        snap = worker.progress()
        if snap["state"] == "failed":
            raise AssertionError(snap["error"])
        events, backlog[:] = backlog + snap["events"], []
        for ev in events:
            if want.get(ev["job"]) == ev["kind"] and ev["job"] not in seen:
                seen[ev["job"]] = ev
            elif ev["kind"] in ("failed", "oom") and want.get(ev["job"]) != ev["kind"]:
                raise AssertionError(f"unexpected {ev}")
            else:
                backlog.append(ev)
        if set(seen) == set(want):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"timed out; got {seen} of {want}")


@pytest.fixture
def worker(tiny_model_dir):
    w = TrainingWorker("w0", str(tiny_model_dir), device="cpu", profile="off")
    yield w
    w.shutdown(checkpoint=False)


def test_group_trains_and_reports(worker, tmp_path):
    a, b = job_config(tmp_path, "a", seed=1), job_config(tmp_path, "b", seed=2, steps=6)
    worker.assign("a", replace(a, base_model=worker.base_model))
    worker.assign("b", replace(b, base_model=worker.base_model))
    done = wait_events(worker, {"a": "finished", "b": "finished"})
    assert done["a"]["output"] == a.output
    state, _ = read_adapter(a.output)
    assert state and all(torch.isfinite(t).all() for t in state.values())
    snap = worker.progress()
    assert snap["jobs"] == {} and snap["timing"]["steps"] >= 6
    assert snap["timing"]["step_s"] <= snap["timing"]["wall_s"]
    assert snap["model_shape"]["hidden_size"] == 32
    assert snap["model_shape"]["attn_implementation"] == "sdpa"  # what the memory model reads: no (L, L) scores


def test_missing_data_fails_alone(worker, tmp_path):
    bad = job_config(tmp_path, "bad", data=tmp_path / "nope.jsonl")
    good = job_config(tmp_path, "good")
    worker.assign("bad", bad)
    worker.assign("good", good)
    ev = wait_events(worker, {"bad": "failed", "good": "finished"})
    assert "nope.jsonl" in ev["bad"]["message"]
    assert ev["bad"]["spec_error"] is False  # a file can be written and the job retried


def test_a_target_the_model_lacks_fails_alone_as_a_spec_error(worker, tmp_path):
    """The spec itself cannot run on its base model: the event says so, and retry refuses it."""
    import dataclasses

    bad = job_config(tmp_path, "bad")
    bad = dataclasses.replace(bad, adapter=dataclasses.replace(bad.adapter, target_modules=("q_proj", "zzz_proj")))
    worker.assign("bad", bad)
    worker.assign("good", job_config(tmp_path, "good"))
    ev = wait_events(worker, {"bad": "failed", "good": "finished"})
    assert "'zzz_proj' matches no linear layer" in ev["bad"]["message"] and ev["bad"]["spec_error"] is True


def test_a_job_that_cannot_join_fails_alone_whatever_it_raises(worker, tmp_path, monkeypatch):
    """A damaged init_from adapter, and any error type a library raises while a job joins: that job
    fails, the worker's training thread lives on (it used to die silently, leaving the job and every
    job placed after it PROFILING while the worker still answered 'ready')."""
    import dataclasses

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}')
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    bad = job_config(tmp_path, "bad")
    bad = dataclasses.replace(bad, adapter=dataclasses.replace(bad.adapter, init_from=str(broken)))
    worker.assign("bad", bad)
    worker.assign("good", job_config(tmp_path, "good"))
    ev = wait_events(worker, {"bad": "failed", "good": "finished"})
    assert "adapter_model.safetensors: not a readable safetensors file" in ev["bad"]["message"]

    class LibraryError(Exception):  # not a ValueError / OSError / RuntimeError
        pass

    def raises(*args, **kwargs):
        raise LibraryError("its own error type")

    monkeypatch.setattr(worker.engine, "add_job", raises)
    worker.assign("odd", job_config(tmp_path, "odd"))
    ev = wait_events(worker, {"odd": "failed"})
    assert ev["odd"]["message"] == "cannot start: LibraryError: its own error type"
    monkeypatch.undo()
    worker.assign("after", job_config(tmp_path, "after"))
    wait_events(worker, {"after": "finished"})


def test_eval_section_runs_after_training_and_reports(worker, tmp_path, tiny_model_dir):
    """A finished job with ``eval:`` is scored before it leaves the engine: the event carries base vs
    adapter loss, ``eval.json`` lands next to the adapter, and the numbers equal a fresh evaluation of
    the exported adapter. A job whose eval data is missing fails when it joins, naming eval.data (it
    used to train to the end first), and the other job trains on."""
    from actors.data import load_examples
    from actors.engine import FusedEngine
    from actors.models import load_base_model

    held_out = write_jsonl(tmp_path / "held.jsonl", token_records(6, 9, 6, 12))
    good = replace(job_config(tmp_path, "good", seed=3), eval=EvalSettings(data=str(held_out), metrics=("loss",)))
    bad = replace(job_config(tmp_path, "bad", seed=4), eval=EvalSettings(data=str(tmp_path / "gone.jsonl")))
    worker.assign("good", replace(good, base_model=worker.base_model))
    worker.assign("bad", replace(bad, base_model=worker.base_model))
    done = wait_events(worker, {"good": "finished", "bad": "failed"})
    got = done["good"]["eval"]
    assert got["examples"] == 6 and set(got["metrics"]["loss"]) == {"base", "adapter", "tokens"}
    assert done["bad"]["message"] == f"eval.data: file not found: {tmp_path / 'gone.jsonl'}"
    assert not Path(bad.output, "adapter_config.json").exists()
    stored = json.loads(Path(good.output, "eval.json").read_text())
    assert stored["metrics"] == got["metrics"]

    model, tok = load_base_model(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    engine = FusedEngine(model, tok)
    engine.attach_adapter("again", good.output)
    examples = load_examples(DataSettings(path=str(held_out), format="tokens", max_seq_len=32), tok)
    (base, _), (adapter, count) = engine.evaluate([None, "again"], examples)
    assert count == got["metrics"]["loss"]["tokens"]
    assert base == pytest.approx(got["metrics"]["loss"]["base"], rel=1e-5)
    assert adapter == pytest.approx(got["metrics"]["loss"]["adapter"], rel=1e-5)
    assert abs(adapter - base) > 1e-4  # the adapter trained at lr 1e-2: the comparison bites


def test_simulated_oom_evicts_newest_only(worker, tmp_path):
    a, b = job_config(tmp_path, "a", steps=6), job_config(tmp_path, "b", steps=6)
    worker.assign("a", a)
    worker.assign("b", b)
    # queued behind the two joins, so it lands on their first fused step whatever the machine's speed
    # (waiting for `joined` first let a fast machine finish both 6-step jobs before the OOM was sent)
    worker.simulate_oom()
    ev = wait_events(worker, {"b": "oom", "a": "finished"})
    assert ev["b"]["group_size"] == 2 and ev["b"]["micro_batch_size"] == 2 and worker.progress()["ooms"] == 1


def test_cpu_budget_counts_as_oom(tiny_model_dir, tmp_path):
    w = TrainingWorker("w1", str(tiny_model_dir), device="cpu", profile="off", memory_budget_bytes=1)
    try:
        w.assign("a", job_config(tmp_path, "a"))
        ev = wait_events(w, {"a": "oom"})
        assert "exceeds the worker budget" in ev["a"]["message"]
    finally:
        w.shutdown(checkpoint=False)


def test_preempt_checkpoints_and_resume_matches(worker, tmp_path, tiny_model_dir):
    # room to preempt before the end: a step takes ~10 ms, and a fast machine runs a few between polls
    ref = job_config(tmp_path, "ref", seed=3, steps=40, checkpoint_every=100)
    cut = replace(ref, name="cut", output=str(tmp_path / "out" / "cut"))
    worker.assign("ref", ref)
    wait_events(worker, {"ref": "finished"})
    worker.assign("cut", cut)
    deadline = time.time() + 60
    while worker.progress()["jobs"].get("cut", {}).get("step", 0) < 2 and time.time() < deadline:
        time.sleep(0.02)
    worker.preempt("cut")
    ev = wait_events(worker, {"cut": "preempted"})
    assert 2 <= ev["cut"]["checkpoint_step"] < 40
    worker.assign("cut", cut)
    ev = wait_events(worker, {"cut": "finished"})
    s_ref, _ = read_adapter(ref.output)
    s_cut, _ = read_adapter(cut.output)
    for key in s_ref:
        torch.testing.assert_close(s_cut[key], s_ref[key], rtol=1e-5, atol=1e-6)


def test_broken_base_model_fails_jobs(tmp_path):
    w = TrainingWorker("w2", str(tmp_path / "no-model"), device="cpu", profile="off")
    try:
        w.assign("a", job_config(tmp_path, "a"))
        deadline = time.time() + 60
        events = []
        while time.time() < deadline and not events:
            snap = w.progress()
            events = snap["events"]
            time.sleep(0.05)
        assert snap["state"] == "failed" and "cannot load base model" in snap["error"]
        assert events[0]["kind"] == "failed" and "base_model" in events[0]["message"]
    finally:
        w.shutdown(checkpoint=False)


def test_remote_storage_roundtrip(tmp_path):
    from actors.storage import job_output, sync_down, sync_up

    local = tmp_path / "local"
    (local / "checkpoints" / "step-000002").mkdir(parents=True)
    (local / "checkpoints" / "step-000002" / "x.bin").write_bytes(b"abc")
    (local / "adapter_config.json").write_text("{}")
    uri = job_output(f"file://{tmp_path}/remote", "lf-1")
    sync_up(local, uri)
    back = tmp_path / "back"
    assert sync_down(uri, back)
    assert (back / "checkpoints" / "step-000002" / "x.bin").read_bytes() == b"abc"
    assert (back / "adapter_config.json").read_text() == "{}"
    assert not sync_down(job_output(f"file://{tmp_path}/remote", "lf-none"), tmp_path / "x")


def preempt_after(worker: TrainingWorker, job: str, step: int, timeout: float = 60.0) -> dict[str, dict]:
    """Let ``job`` reach ``step``, preempt it and return its ``preempted`` event (by job)."""
    deadline = time.time() + timeout
    while worker.progress()["jobs"].get(job, {}).get("step", 0) < step and time.time() < deadline:
        time.sleep(0.02)
    worker.preempt(job)
    return wait_events(worker, {job: "preempted"})


def test_remote_output_uploads_and_resumes_elsewhere(worker, tmp_path):
    """A job whose output is a URI trains in staging, uploads, and resumes from the URI on a clean node."""
    uri = f"file://{tmp_path}/remote/jobs/r"
    cfg = job_config(tmp_path, "r", steps=40, checkpoint_every=2, output=tmp_path / "stage1" / "r")  # room to preempt
    worker.assign("r", cfg, uri)
    ev = preempt_after(worker, "r", 3)
    remote_ckpts = sorted(p.name for p in (tmp_path / "remote/jobs/r/checkpoints").iterdir())
    assert f"step-{ev['r']['checkpoint_step']:06d}" in remote_ckpts
    moved = replace(cfg, output=str(tmp_path / "stage2" / "r"))  # another node: empty staging dir
    worker.assign("r", moved, uri)
    ev = wait_events(worker, {"r": "joined"})
    assert ev["r"]["step"] >= 3
    ev = wait_events(worker, {"r": "finished"})
    assert ev["r"]["output"] == uri
    state, _ = read_adapter(tmp_path / "remote/jobs/r")
    assert state


def test_engine_settings_reach_the_fused_step_and_train_the_same_adapter(worker, tmp_path, tiny_model_dir):
    """``lorafleet up --no-packing --activation-checkpointing`` becomes these worker options: the worker
    reports them, its engine uses them, and the adapters equal the default worker's (same math)."""
    plain = job_config(tmp_path, "p", seed=3, output=tmp_path / "plain")
    worker.assign("p", plain)
    wait_events(worker, {"p": "finished"})
    assert worker.progress()["engine"] == {"packing": True, "autocast": False, "activation_checkpointing": False}
    assert worker.progress()["packing_max_len"] > 1 << 20  # for the controller's memory model: packs any length
    other = TrainingWorker("w5", str(tiny_model_dir), device="cpu", profile="off", packing=False,
                           activation_checkpointing=True)  # fmt: skip
    try:
        other.assign("p", replace(plain, output=str(tmp_path / "ckpt")))
        wait_events(other, {"p": "finished"})
        assert other.progress()["engine"] == {"packing": False, "autocast": False, "activation_checkpointing": True}
        assert other.progress()["packing_max_len"] == 0  # padded rows: predicted padded
        assert other.engine.fused.activation_checkpointing and not other.engine.settings.packing
    finally:
        other.shutdown(checkpoint=False)
    want, _ = read_adapter(tmp_path / "plain")
    got, _ = read_adapter(tmp_path / "ckpt")
    assert got.keys() == want.keys()
    moved = max(float(t.abs().max()) for k, t in want.items() if "lora_B" in k)
    assert moved > 1e-4  # training moved B away from zero, so equality means something
    for key, value in want.items():
        assert float((got[key] - value).norm() / value.norm().clamp_min(1e-12)) < 1e-5, key


def test_evaluation_does_not_stall_the_other_jobs(worker, tmp_path):
    """A job's ``eval:`` runs batch by batch with a training step of the other jobs in between: the
    long job keeps training while the short one is scored."""
    held_out = write_jsonl(tmp_path / "held.jsonl", token_records(8, 9, 6, 12))
    short = replace(job_config(tmp_path, "short", seed=3, steps=2),
                    eval=EvalSettings(data=str(held_out), metrics=("loss",), batch_size=1))  # fmt: skip
    long = job_config(tmp_path, "long", seed=4, steps=40, checkpoint_every=100)
    worker.assign("long", replace(long, base_model=worker.base_model))
    worker.assign("short", replace(short, base_model=worker.base_model))
    done = wait_events(worker, {"short": "finished", "long": "finished"})
    got = done["short"]["eval"]
    # 8 examples one at a time: a training step of "long" between consecutive batches (7 gaps)
    assert got["trained_steps_meanwhile"] == 7, got
    assert got["examples"] == 8 and json.loads(Path(short.output, "eval.json").read_text())["metrics"] == got["metrics"]
    assert done["long"]["step"] == 40
    state, _ = read_adapter(long.output)
    assert state and all(torch.isfinite(t).all() for t in state.values())


def test_commands_apply_during_an_evaluation(worker, tmp_path, monkeypatch):
    """Commands sent while a job is being evaluated take effect between its batches: another job
    is cancelled and a new one joins before the evaluated job's ``finished`` event; a cancel of the
    evaluated job itself waits for the evaluation (it has finished training by then)."""
    import actors.evaluate as evaluate

    held_out = write_jsonl(tmp_path / "held.jsonl", token_records(6, 9, 6, 12))
    short = replace(job_config(tmp_path, "short", seed=3, steps=2),
                    eval=EvalSettings(data=str(held_out), metrics=("loss",), batch_size=1))  # fmt: skip
    victim = job_config(tmp_path, "victim", seed=4, steps=200, checkpoint_every=1000)
    late = job_config(tmp_path, "late", seed=5, steps=3)
    real = evaluate.evaluate_job
    sent = []

    def evaluate_job(engine, job_id, config, between=None):
        def hook() -> None:
            if not sent:  # at the first gap between batches: queue the commands, then let one gap pass
                worker.cancel("victim")
                worker.assign("late", replace(late, base_model=worker.base_model))
                worker.cancel("short")
                sent.append(True)
            between()

        return real(engine, job_id, config, between=hook)

    monkeypatch.setattr(evaluate, "evaluate_job", evaluate_job)
    worker.assign("victim", replace(victim, base_model=worker.base_model))
    worker.assign("short", replace(short, base_model=worker.base_model))
    events: list[tuple[str, str]] = []
    deadline = time.time() + 120
    while ("late", "finished") not in events and time.time() < deadline:
        events += [(e["job"], e["kind"]) for e in worker.progress()["events"]]
        time.sleep(0.05)
    kinds = [e for e in events if e[1] != "joined" or e[0] == "late"]
    assert kinds.index(("victim", "cancelled")) < kinds.index(("short", "finished")), events
    assert kinds.index(("late", "joined")) < kinds.index(("short", "finished")), events
    assert ("short", "cancelled") not in events  # it had finished training: the late cancel finds nothing
    assert ("victim", "finished") not in events and ("late", "finished") in events
    summary = json.loads(Path(victim.output, "job.json").read_text())  # every output has one, a cancelled one too
    assert summary["state"] == "cancelled" and summary["name"] == "victim"


def test_keep_checkpoints_0_deletes_them_after_the_finished_event(worker, tmp_path):
    """``train.keep_checkpoints: 0``: the worker deletes a finished job's checkpoints once it has reported
    ``finished``; the job beside it (default 3) keeps its own."""
    import time
    from dataclasses import replace

    from actors.checkpoint import list_checkpoints

    cfg = job_config(tmp_path, "k0", steps=4, checkpoint_every=1)
    worker.assign("k0", replace(cfg, base_model=worker.base_model,
                                train=replace(cfg.train, keep_checkpoints=0)))  # fmt: skip
    other = job_config(tmp_path, "k3", steps=4, checkpoint_every=1)
    worker.assign("k3", replace(other, base_model=worker.base_model))
    wait_events(worker, {"k0": "finished", "k3": "finished"})
    deadline = time.monotonic() + 30
    while list_checkpoints(cfg.output) and time.monotonic() < deadline:  # right after the event
        time.sleep(0.05)
    assert list_checkpoints(cfg.output) == [] and (Path(cfg.output) / "adapter_model.safetensors").is_file()
    assert [p.name for p in list_checkpoints(other.output)] == ["step-000001", "step-000002", "step-000003"]


def test_a_hub_id_shadowed_by_a_folder_in_the_workers_directory_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    """transformers loads ``org/tiny`` from the current directory when a folder of that name is there:
    on a worker (Ray's directory) that would pick the weights a job trains on. The worker refuses."""
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "org" / "tiny")  # a loadable decoy
    monkeypatch.chdir(tmp_path)
    w = TrainingWorker("w-hub", "org/tiny", device="cpu", profile="off")
    try:
        deadline = time.time() + 60
        while time.time() < deadline and w.progress()["state"] not in ("failed", "ready"):
            time.sleep(0.05)
        snap = w.progress()
        assert snap["state"] == "failed", snap
        assert snap["error"] == (f"cannot load base model 'org/tiny': 'org/tiny' is taken as a hub id here, but this "
                                 f"worker's current directory ({tmp_path}) has a folder of that name, which "
                                 "transformers would load instead; give the model's absolute path, or remove that "
                                 "entry")  # fmt: skip
    finally:
        w.shutdown(checkpoint=False)
    from actors.models import load_base_model

    model, _ = load_base_model("org/tiny")  # `lorafleet train` on a laptop: a relative folder is the user's own
    assert model.config.num_hidden_layers > 0

"""A run interrupted after a checkpoint and resumed ends with the same adapter as an uninterrupted one."""

from __future__ import annotations

import copy

import torch
from safetensors.torch import load_file

from actors.checkpoint import latest_checkpoint, list_checkpoints
from actors.config import AdapterSettings, DataSettings, JobConfig, LoraSettings, TrainSettings
from actors.engine import FusedEngine
from tests.conftest import make_tiny_llama, make_tokenizer, token_records, write_jsonl


def job(tmp, name, out, data, steps=6, seed=5, dropout=0.2):
    return JobConfig(
        name=name,
        base_model="tiny",
        adapter=AdapterSettings("lora", LoraSettings(4, 8, dropout), ("q_proj", "v_proj", "down_proj")),
        data=DataSettings(str(data), format="tokens"),
        train=TrainSettings(max_steps=steps, batch_size=4, micro_batch_size=2, learning_rate=1e-2,
                            lr_scheduler="cosine", warmup_steps=2, checkpoint_every=2, seed=seed),
        output=str(tmp / out),
    )


def test_resume_equals_uninterrupted_run_with_dropout(tmp_path):
    base = make_tiny_llama(seed=1)
    tok = make_tokenizer()
    data = write_jsonl(tmp_path / "d.jsonl", token_records(10, seed=3, min_len=5, max_len=14))
    other = write_jsonl(tmp_path / "o.jsonl", token_records(12, seed=4, min_len=8, max_len=20))

    # Uninterrupted, beside another job.
    eng = FusedEngine(copy.deepcopy(base), tok)
    eng.add_job(job(tmp_path, "a", "full", data))
    eng.add_job(job(tmp_path, "b", "other-full", other, seed=9))
    eng.run()
    full = load_file(tmp_path / "full" / "adapter_model.safetensors")

    # Interrupted after step 3 (last checkpoint: step 2), then resumed in a new engine alone.
    eng = FusedEngine(copy.deepcopy(base), tok)
    first = eng.add_job(job(tmp_path, "a", "resumed", data))
    eng.add_job(job(tmp_path, "b", "other-resumed", other, seed=9))
    while first.step < 3:
        eng.step()
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000002"
    first.write_summary("cancelled")  # as a cancel (or a failure) leaves the output
    del eng

    eng = FusedEngine(copy.deepcopy(base), tok)
    again = eng.add_job(job(tmp_path, "a", "resumed", data))
    assert again.step == 2
    assert not (tmp_path / "resumed" / "job.json").exists()  # the stopped run's summary no longer holds
    eng.run()
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert '"state": "succeeded"' in (tmp_path / "resumed" / "job.json").read_text()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-6, atol=1e-7)
    # The metrics log has each step once, even though steps 3 was run twice.
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in
             (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-000002", "step-000004"]


def test_jobs_join_and_leave_between_steps(tmp_path):
    base = make_tiny_llama(seed=2)
    tok = make_tokenizer()
    data = write_jsonl(tmp_path / "d.jsonl", token_records(8, seed=1, min_len=5, max_len=9))
    eng = FusedEngine(base, tok)
    a = eng.add_job(job(tmp_path, "a", "a", data, steps=4, dropout=0.0))
    eng.step()
    b = eng.add_job(job(tmp_path, "b", "b", data, steps=2, dropout=0.0))
    eng.run()
    assert a.step == 4 and b.step == 2
    layer = eng.fused.linears["model.layers.0.self_attn.q_proj"]
    eng.remove_job("b")
    assert set(layer.adapters) == {"a"}
    # Same model object throughout: nothing reloaded.
    assert eng.fused.model is base


def test_keep_checkpoints(tmp_path):
    """``train.keep_checkpoints``: the newest N are kept while training, and at least one. Export keeps
    that one even for 0: a worker lost between the export and its ``finished`` event has the job
    requeued, and it must resume from there, not from step 0 (the worker and ``lorafleet train`` delete
    it once the job is recorded finished: tests/actors/test_worker.py, tests/orchestrator/test_train_cli.py)."""
    from dataclasses import replace

    from actors.checkpoint import drop_checkpoints

    base = make_tiny_llama(seed=1)
    data = write_jsonl(tmp_path / "d.jsonl", token_records(10, seed=3, min_len=5, max_len=14))
    eng = FusedEngine(copy.deepcopy(base), make_tokenizer())
    configs = {}
    for keep in (0, 2):
        cfg = job(tmp_path, f"k{keep}", f"k{keep}", data, steps=7, dropout=0.0)
        configs[keep] = replace(cfg, train=replace(cfg.train, keep_checkpoints=keep, checkpoint_every=1))
        eng.add_job(configs[keep])
    while eng.jobs["k0"].step < 5:
        eng.step()
    assert [p.name for p in list_checkpoints(tmp_path / "k0")] == ["step-000005"]  # one while training
    assert [p.name for p in list_checkpoints(tmp_path / "k2")] == ["step-000004", "step-000005"]
    eng.run()
    assert [p.name for p in list_checkpoints(tmp_path / "k0")] == ["step-000006"]  # export keeps it
    assert [p.name for p in list_checkpoints(tmp_path / "k2")] == ["step-000005", "step-000006"]
    again = FusedEngine(copy.deepcopy(base), make_tokenizer()).add_job(configs[0], resume=True)
    assert again.step == 6  # a requeue after the export resumes there
    assert drop_checkpoints(tmp_path / "k0") == 1
    assert list_checkpoints(tmp_path / "k0") == [] and (tmp_path / "k0" / "checkpoints").is_dir()
    assert (tmp_path / "k0" / "adapter_model.safetensors").is_file()


def test_a_run_stopped_before_its_first_checkpoint_starts_over_without_its_summary(tmp_path):
    """Cancelled (or failed) before step ``checkpoint_every``: the retried run starts from step 0, and the
    stopped run's job.json ("cancelled") goes; the new run writes its own at the end."""
    data = write_jsonl(tmp_path / "d.jsonl", token_records(8, seed=1, min_len=5, max_len=9))
    eng = FusedEngine(make_tiny_llama(seed=2), make_tokenizer())
    first = eng.add_job(job(tmp_path, "a", "out", data, steps=4, dropout=0.0))
    eng.step()  # step 1: no checkpoint yet (every 2)
    first.write_summary("cancelled")
    eng.remove_job("a")
    assert (tmp_path / "out" / "job.json").exists()
    again = eng.add_job(job(tmp_path, "a", "out", data, steps=4, dropout=0.0))
    assert again.step == 0 and not (tmp_path / "out" / "job.json").exists()
    eng.run()
    assert '"state": "succeeded"' in (tmp_path / "out" / "job.json").read_text()

"""Resume edge cases an audit found (2026-12-07):

* a preemption or drain between two micro-batches of a step (``TrainingWorker._preempt``) saved the
  dropout RNG after the partial window's draws, and the resumed window drew other masks;
* a checkpoint past the spec's steps (``max_steps`` lowered) left a job that never exported, reported
  as succeeded;
* a run stopped before its first checkpoint left its steps twice in ``metrics.jsonl``;
* a torn last line of ``metrics.jsonl`` made resuming fail with a JSON error naming no file;
* a changed learning rate or weight decay was silently ignored on resume (the optimizer state wins);
* a damaged newest checkpoint blocked resuming, with an error naming no file, while an older one was intact;
* (2026-12-08) with ``max_steps`` grown, the first resumed step ran at the old schedule's rate.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from actors.checkpoint import CheckpointError, list_checkpoints
from actors.config import (
    AdapterSettings,
    DataSettings,
    JobConfig,
    LoraSettings,
    MixLoraSettings,
    TrainSettings,
)
from actors.engine import FusedEngine
from actors.worker import TrainingWorker
from tests.conftest import make_tiny_llama, make_tokenizer, token_records, write_jsonl

BASE = make_tiny_llama(seed=2)


def config(tmp_path, out: str, kind: str = "lora", **train) -> JobConfig:
    data = tmp_path / "d.jsonl"
    if not data.exists():
        write_jsonl(data, token_records(16, seed=3, min_len=5, max_len=12))
    lora = LoraSettings(4, 8, 0.2)
    mix = MixLoraSettings(num_experts=4, top_k=2, jitter_noise=0.1, expert=LoraSettings(4, 8, 0.2)) if kind == "mixlora" else None
    settings = {"max_steps": 6, "batch_size": 4, "micro_batch_size": 1, "learning_rate": 1e-2, "checkpoint_every": 100,
                "lr_scheduler": "linear", "seed": 4, **train}  # fmt: skip
    return JobConfig("a", "tiny", AdapterSettings(kind, lora, ("q_proj", "v_proj"), mix),
                     DataSettings(str(data), format="tokens"), TrainSettings(**settings), str(tmp_path / out))  # fmt: skip


def steps_logged(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["lora", "mixlora"])
def test_a_preemption_between_micro_batches_resumes_with_the_same_dropout_draws(kind, tiny_model_dir, tmp_path):
    """LoRA dropout 0.2 (MixLoRA: also router jitter), 4 micro-batches per step, preempted after 2 of step 3."""
    worker = TrainingWorker("w", str(tiny_model_dir), device="cpu", profile="off", start=False)
    worker._load()
    worker._join("a", config(tmp_path, "full", kind), None)
    worker.engine.run()
    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    worker._leave("a")
    worker._join("a", config(tmp_path, "pre", kind), None)
    job = worker.engine.jobs["a"]
    assert job.step == 0
    while not (job.step == 2 and job.micro == 2):
        worker.engine.step()
    assert worker._preempt("a")  # checkpoints, then leaves (a policy preemption, or `lorafleet down`)
    worker._join("a", config(tmp_path, "pre", kind), None)
    assert worker.engine.jobs["a"].step == 2
    worker.engine.run()
    resumed = load_file(tmp_path / "pre" / "adapter_model.safetensors")
    assert set(resumed) == set(full)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0, msg=key)
    assert steps_logged(tmp_path / "pre") == [1, 2, 3, 4, 5, 6]


def interrupted(tmp_path, out: str, steps: int, **train) -> None:
    engine = FusedEngine(copy.deepcopy(BASE), make_tokenizer())
    job = engine.add_job(config(tmp_path, out, **train))
    while job.step < steps:
        engine.step()


def test_a_checkpoint_past_the_specs_steps_is_refused_when_the_job_joins(tmp_path):
    interrupted(tmp_path, "o", 5, max_steps=20, checkpoint_every=4)
    engine = FusedEngine(copy.deepcopy(BASE), make_tokenizer())
    with pytest.raises(ValueError, match=r"the newest checkpoint, .*step-000004, is at step 4, but this spec trains 3 "
                                         r"steps .*raise train.max_steps above 4 to continue"):  # fmt: skip
        engine.add_job(config(tmp_path, "o", max_steps=3, checkpoint_every=4))
    assert not engine.jobs
    job = engine.add_job(config(tmp_path, "o", max_steps=8, checkpoint_every=4))  # more steps: goes on
    assert job.step == 4
    engine.run()
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file() and steps_logged(tmp_path / "o") == list(range(1, 9))


def test_a_run_stopped_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    interrupted(tmp_path, "o", 3)
    assert steps_logged(tmp_path / "o") == [1, 2, 3] and not list_checkpoints(tmp_path / "o")
    engine = FusedEngine(copy.deepcopy(BASE), make_tokenizer())
    assert engine.add_job(config(tmp_path, "o")).step == 0
    engine.run()
    assert steps_logged(tmp_path / "o") == [1, 2, 3, 4, 5, 6]  # was [1, 2, 3, 1, 2, ...]


def test_a_torn_metrics_line_does_not_block_resuming(tmp_path):
    interrupted(tmp_path, "o", 3, checkpoint_every=2)
    with open(tmp_path / "o" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "loss"')  # a crash or a full disk mid-append
    engine = FusedEngine(copy.deepcopy(BASE), make_tokenizer())
    assert engine.add_job(config(tmp_path, "o", checkpoint_every=2)).step == 2
    engine.run()
    assert steps_logged(tmp_path / "o") == [1, 2, 3, 4, 5, 6]


def test_a_changed_optimizer_setting_is_refused_and_a_smaller_micro_batch_is_not(tmp_path):
    interrupted(tmp_path, "o", 3, checkpoint_every=2)
    engine = FusedEngine(copy.deepcopy(BASE), make_tokenizer())
    with pytest.raises(ValueError, match=r"train.learning_rate: 0.01 when step-000002 was written, now 0.05; "
                                         r"train.weight_decay: 0.0 when step-000002 was written, now 0.5: resuming "
                                         r"would mix the two"):  # fmt: skip
        engine.add_job(config(tmp_path, "o", checkpoint_every=2, learning_rate=0.05, weight_decay=0.5))
    with pytest.raises(ValueError, match=r"train.betas: \[0.9, 0.999\] when .* now \[0.8, 0.9\]"):
        engine.add_job(config(tmp_path, "o", checkpoint_every=2, betas=(0.8, 0.9)))
    assert engine.add_job(config(tmp_path, "o", checkpoint_every=2, micro_batch_size=2)).step == 2  # an OOM's halving


def test_a_damaged_newest_checkpoint_falls_back_to_an_older_one(tmp_path):
    interrupted(tmp_path, "o", 5, checkpoint_every=2)
    older, newest = list_checkpoints(tmp_path / "o")[-2:]
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    engine = FusedEngine(copy.deepcopy(BASE), make_tokenizer())
    assert engine.add_job(config(tmp_path, "o", checkpoint_every=2)).step == 2  # step-000002, not step-000004
    engine.remove_job("a")
    (older / "trainer_state.json").write_text('{"step": 2,')
    with pytest.raises(CheckpointError, match=rf"checkpoint {newest}: optimizer.pt is missing or damaged .*; no older "
                                              rf"checkpoint is readable: delete {tmp_path / 'o' / 'checkpoints'} to "
                                              "start over"):  # fmt: skip
        engine.add_job(config(tmp_path, "o", checkpoint_every=2))


def test_a_checkpoint_write_cut_off_by_kill_leaves_nothing_behind_once_the_next_one_is_written(tmp_path):
    from actors.checkpoint import save_checkpoint

    stale = tmp_path / "o" / "checkpoints" / ".tmp-step-000001-abcd"  # a process killed mid-write (kill -9)
    stale.mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"partial")
    save_checkpoint(tmp_path / "o", 2, adapter_state={"w": torch.zeros(2)}, adapter_config={"r": 1},
                    optimizer_state={}, tensors={}, trainer_state={"job": "a", "step": 2})  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "o" / "checkpoints").iterdir()) == ["step-000002"]


def test_a_resume_with_more_steps_takes_the_new_schedules_rate_from_its_first_step(tmp_path):
    """max_steps 6 -> 10 at a checkpoint of step 2 (linear, 1 warmup step): the optimizer's saved rate
    was the 6-step schedule's for step 3 (0.008), and the resumed step 3 ran at it; every step from
    the resume takes the 10-step schedule's rate, as transformers' schedule gives it."""
    from transformers import get_linear_schedule_with_warmup

    interrupted(tmp_path, "o", 3, max_steps=6, checkpoint_every=2, warmup_steps=1)
    engine = FusedEngine(copy.deepcopy(BASE), make_tokenizer())
    job = engine.add_job(config(tmp_path, "o", max_steps=10, checkpoint_every=2, warmup_steps=1))
    assert job.step == 2
    engine.run()
    rates = {json.loads(line)["step"]: json.loads(line)["lr"] for line in (tmp_path / "o" / "metrics.jsonl").open()}
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    schedule = get_linear_schedule_with_warmup(optimizer, 1, 10)
    want = []
    for _ in range(10):
        want.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [rates[s] for s in range(3, 11)] == pytest.approx(want[2:], rel=1e-9)  # step 3: 0.008889, was 0.008
    assert [rates[1], rates[2]] == pytest.approx([0.0, 1e-2])  # the first run's warmup, as it ran

"""A fused step that raises fails only the job whose own micro-batch raises.

Before, any exception in a fused step (one the join checks cannot foresee: a library's error on
one job's rows, a hook, a bad kernel for one shape) failed every job of the step. Now the engine
undoes the step (dropout draws, extra metrics, and once the backward pass has begun the whole
accumulation window's gradients) and runs each job alone: the culprit fails with its error, the
others give the adapters they give when the culprit never joined.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from actors.config import (
    AdapterSettings,
    DataSettings,
    EngineSettings,
    JobConfig,
    LoraSettings,
    MixLoraSettings,
    TrainSettings,
)
from actors.engine import FusedEngine
from tests.conftest import make_tiny_llama, make_tokenizer, token_records, write_jsonl

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


def configs(tmp_path, out: str) -> dict[str, JobConfig]:
    """Three jobs: LoRA with dropout and 3 micro-batches per step, MixLoRA with 2, and the job
    that will fail (1 per step, so its failures land in the others' windows at every position)."""
    data = {name: write_jsonl(tmp_path / f"{name}.jsonl", token_records(24, seed, 4, 12))
            for seed, name in enumerate(("lora", "mix", "bad"))}  # fmt: skip
    mix = MixLoraSettings(num_experts=4, top_k=2, router_aux_loss_coef=0.01, expert=LoraSettings(4, 8, 0.1))
    return {
        "lora": JobConfig("lora", "tiny", AdapterSettings("lora", LoraSettings(4, 8, 0.1), LINEARS),
                          DataSettings(str(data["lora"]), format="tokens"),
                          TrainSettings(max_steps=4, batch_size=6, micro_batch_size=2, learning_rate=1e-2,
                                        lr_scheduler="cosine", warmup_steps=1, seed=3),
                          str(tmp_path / out / "lora")),
        "mix": JobConfig("mix", "tiny", AdapterSettings("mixlora", LoraSettings(4, 8, 0.0), ("q_proj", "v_proj"), mix),
                         DataSettings(str(data["mix"]), format="tokens"),
                         TrainSettings(max_steps=5, batch_size=4, micro_batch_size=2, learning_rate=1e-2, seed=5),
                         str(tmp_path / out / "mix")),
        "bad": JobConfig("bad", "tiny", AdapterSettings("lora", LoraSettings(4, 8, 0.0), ("q_proj",)),
                         DataSettings(str(data["bad"]), format="tokens"),
                         TrainSettings(max_steps=20, batch_size=2, micro_batch_size=2, learning_rate=1e-2),
                         str(tmp_path / out / "bad")),
    }  # fmt: skip


def adapters(engine_jobs) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach().clone() for k, v in job.adapter.export_state().items()}
            for name, job in engine_jobs.items()}  # fmt: skip


def train(tmp_path, out: str, names: list[str], packing: bool, sabotage=None):
    """Train ``names`` fused to the end; ``sabotage(engine)`` arms a failure. Returns the final
    adapters of the jobs that succeeded, the events and the engine."""
    cfg = configs(tmp_path, out)
    engine = FusedEngine(copy.deepcopy(BASE), make_tokenizer(), settings=EngineSettings(packing=packing))
    for name in names:
        engine.add_job(cfg[name])
    if sabotage is not None:
        sabotage(engine)
    events = []
    while any(not job.done for job in engine.jobs.values()):
        events += engine.step().events
    finished = {e.job for e in events if e.kind == "finished"}
    return adapters({n: j for n, j in engine.jobs.items() if n in finished}), events, engine


BASE = make_tiny_llama(seed=1)


def in_forward(engine) -> None:
    """Raise inside the base model's forward whenever the bad job's rows are in it, from its 3rd step."""
    original = engine.fused.hidden_states
    bad = engine.jobs["bad"]

    def hidden_states(input_ids, attention_mask, layout, **kw):
        if bad.step >= 2 and any(s.job == "bad" for s in layout.segments):
            raise IndexError("index 9999 is out of bounds for dimension 0 with size 128")
        return original(input_ids, attention_mask, layout, **kw)

    engine.fused.hidden_states = hidden_states


def in_backward(engine) -> None:
    """Raise in the backward pass at the bad job's 3rd step, after the other jobs' layers (nearer
    the output) have already received part of their gradients."""
    bad = engine.jobs["bad"]

    def hook(grad):
        if bad.step >= 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return grad

    bad.params[0].register_hook(hook)  # a layer-0 LoRA weight: reached last by the backward pass


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        assert set(got[name]) == set(want[name])
        for key, value in want[name].items():
            torch.testing.assert_close(got[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("where", [in_forward, in_backward], ids=["forward", "backward"])
def test_only_the_job_whose_step_raises_fails(where, packing, tmp_path):
    reference, _, _ = train(tmp_path, "ref", ["lora", "mix"], packing)
    got, events, engine = train(tmp_path, "run", ["lora", "mix", "bad"], packing, sabotage=where)
    failed = [e for e in events if e.kind == "failed"]
    assert [e.job for e in failed] == ["bad"]
    error = "IndexError: index 9999" if where is in_forward else "RuntimeError: CUDA error: an illegal memory access"
    assert failed[0].message.startswith(f"training step 3 failed: {error}")
    assert "the other 2 job(s) of its fused step train on" in failed[0].message
    assert engine.jobs["bad"].step == 2
    assert json.loads((tmp_path / "run" / "bad" / "job.json").read_text())["state"] == "failed"
    assert_same(got, reference)  # the neighbours' adapters: as if "bad" had never joined
    for name in ("lora", "mix"):  # and their metrics, MixLoRA's router statistics included
        ref = [json.loads(x) for x in (tmp_path / "ref" / name / "metrics.jsonl").read_text().splitlines()]
        run = [json.loads(x) for x in (tmp_path / "run" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in run] == [r["step"] for r in ref]
        for a, b in zip(run, ref, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert ("aux_loss" in a) == ("aux_loss" in b) == (name == "mix")
            if name == "mix":
                assert a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-5)
                assert a["expert_load"] == b["expert_load"]


def test_a_step_that_fails_only_fused_goes_on(tmp_path):
    """No job's micro-batch raises alone: every job trains on, with the adapters of an undisturbed run."""
    reference, _, _ = train(tmp_path, "ref", ["lora", "mix"], packing=True)
    calls = {"n": 0}

    def once_fused(engine) -> None:
        original = engine.fused.hidden_states

        def hidden_states(input_ids, attention_mask, layout, **kw):
            calls["n"] += 1
            if calls["n"] in (3, 6) and len(layout.segments) > 1:  # two fused steps, one mid-window
                raise RuntimeError("cuBLAS error for this fused shape")
            return original(input_ids, attention_mask, layout, **kw)

        engine.fused.hidden_states = hidden_states

    got, events, _ = train(tmp_path, "run", ["lora", "mix"], packing=True, sabotage=once_fused)
    assert [e.kind for e in events] == ["finished", "finished"]
    assert_same(got, reference)


def test_a_lone_job_whose_step_raises_fails_with_its_error(tmp_path):
    """Without neighbours the job fails with an event (no exception out of ``step``)."""
    cfg = configs(tmp_path, "run")
    engine = FusedEngine(copy.deepcopy(BASE), make_tokenizer())
    engine.add_job(cfg["bad"])
    in_forward(engine)
    events = []
    while any(not job.done for job in engine.jobs.values()):
        events += engine.step().events
    assert [(e.job, e.kind) for e in events] == [("bad", "failed")]
    assert events[0].message == "training step 3 failed: IndexError: index 9999 is out of bounds for dimension 0 with size 128"


def test_when_every_job_fails_alone_no_message_says_the_others_train_on(tmp_path):
    def always(engine) -> None:
        def hidden_states(input_ids, attention_mask, layout, **kw):
            raise RuntimeError("CUDA error: device-side assert triggered")

        engine.fused.hidden_states = hidden_states

    _, events, _ = train(tmp_path, "run", ["lora", "mix"], packing=True, sabotage=always)
    assert [(e.job, e.kind) for e in events] == [("lora", "failed"), ("mix", "failed")]
    assert all(e.message == "training step 1 failed: RuntimeError: CUDA error: device-side assert triggered"
               for e in events)  # fmt: skip


def test_a_checkpoint_that_cannot_be_written_fails_its_job_saying_what_is_left(tmp_path, monkeypatch):
    """A disk error at a checkpoint was a bare ``[Errno 28] ...``: now which checkpoint, where, and what is intact."""
    import dataclasses

    from actors import checkpoint as ckpt

    cfg = configs(tmp_path, "disk")
    bad = dataclasses.replace(cfg["bad"], train=dataclasses.replace(cfg["bad"].train, checkpoint_every=2))
    engine = FusedEngine(copy.deepcopy(BASE), make_tokenizer())
    engine.add_job(cfg["lora"])
    engine.add_job(bad)
    real = ckpt.save_checkpoint

    def full_disk(output, *args, **kwargs):
        if str(output).endswith("bad") and engine.jobs["bad"].step == 4:
            raise OSError(28, "No space left on device")
        return real(output, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", full_disk)
    events = []
    while any(not job.done for job in engine.jobs.values()):
        events += engine.step().events
    (failed,) = [e for e in events if e.kind == "failed"]
    assert failed.job == "bad" and failed.message == (
        f"output: cannot write the step-4 checkpoint in {tmp_path / 'disk' / 'bad' / 'checkpoints'}: No space left "
        "on device (OSError); the checkpoints before it are intact (newest: step-000002)")
    assert {e.job for e in events if e.kind == "finished"} == {"lora"}


def test_a_non_finite_loss_from_an_init_from_adapter_names_it(tmp_path):
    import dataclasses

    from actors import checkpoint as ckpt

    cfg = configs(tmp_path, "nan")["bad"]
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, target_modules=("q_proj", "v_proj", "down_proj")))
    engine = FusedEngine(copy.deepcopy(BASE), make_tokenizer())
    seed = engine.add_job(cfg)
    with torch.no_grad():
        for name, p in seed.adapter.named_parameters().items():
            p.add_(1.0).mul_(1e30) if "lora_B" in name else p.mul_(1e6)  # finite, but the activations overflow
    init = ckpt.write_adapter(tmp_path / "huge", seed.adapter.export_state(), seed.adapter.export_config("tiny"))
    engine.remove_job("bad")
    job = engine.add_job(dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, init_from=str(init)),
                                             output=str(tmp_path / "nan-out")))  # fmt: skip
    while not job.done:
        engine.step()
    assert "lower train.learning_rate, or check adapter.init_from (" in job.error and str(init) in job.error

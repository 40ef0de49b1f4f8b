"""A record the model cannot take is refused when its job joins, naming the record, and the jobs
beside it train on: before, an empty record or a token id outside the vocabulary passed
``load_examples`` and then failed the whole fused step deep in torch (every job in it stopped)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from actors.config import (
    AdapterSettings,
    DataSettings,
    EngineSettings,
    JobConfig,
    LoraSettings,
    TrainSettings,
)
from actors.data import DataError, Example, load_examples, model_vocab_size
from actors.engine import FusedEngine
from tests.conftest import make_tiny_llama, make_tokenizer, token_records, write_jsonl

BAD = {  # record -> words the error must contain
    "empty": ({"input_ids": [], "labels": []}, "record 3: input_ids is empty"),
    "token-id-over": ({"input_ids": [5, 6, 7, 128, 9]},
                      r"input_ids has a token id 128 outside the model's vocabulary \(allowed: 0 to 127\)"),
    "token-id-negative": ({"input_ids": [5, -7, 8]}, "token id -7 outside"),
    "label-over": ({"input_ids": [5, 6, 7], "labels": [5, 900, 7]}, r"label 900 outside .* or -100 \(ignored\)"),
    "not-an-integer": ({"input_ids": [5, 6.5, 7]}, "input_ids has 6.5, not an integer token id"),
    "a-bool": ({"input_ids": [5, True, 7]}, "input_ids has True, not an integer token id"),
    "a-string": ({"input_ids": "5 6 7"}, "input_ids must be a list of integer token ids"),
}


def job(name: str, path, out) -> JobConfig:
    return JobConfig(name, "tiny", AdapterSettings("lora", LoraSettings(4, 8, 0.0), ("q_proj", "v_proj")),
                     DataSettings(str(path), format="tokens", shuffle=False),
                     TrainSettings(max_steps=3, batch_size=2, micro_batch_size=2), str(out))  # fmt: skip


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_record_is_refused_by_name(kind, tmp_path):
    record, words = BAD[kind]
    path = write_jsonl(tmp_path / "bad.jsonl", [*token_records(3, 1, 4, 8), record])
    with pytest.raises(DataError, match=words) as err:
        load_examples(DataSettings(str(path), format="tokens"), make_tokenizer(), vocab_size=128)
    assert str(path) in str(err.value)


def test_ids_in_range_and_ignored_labels_pass(tmp_path):
    record = {"input_ids": [0, 5, 127], "labels": [-100, 5, 127]}
    path = write_jsonl(tmp_path / "ok.jsonl", [record])
    got = load_examples(DataSettings(str(path), format="tokens"), make_tokenizer(), vocab_size=128)
    assert got == [Example([0, 5, 127], [-100, 5, 127])]


def test_vocab_is_the_smaller_of_the_embedding_and_the_head():
    model = make_tiny_llama()
    assert model_vocab_size(model) == 128
    model.lm_head = torch.nn.Linear(model.config.hidden_size, 120, bias=False)
    assert model_vocab_size(model) == 120


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("kind", ["empty", "token-id-over", "label-over"])
def test_the_job_with_the_bad_record_fails_alone(kind, packing, tmp_path):
    """The engine refuses the job when it joins; the healthy job beside it trains to the end and
    gives the adapter it gives alone."""
    base = make_tiny_llama()
    good = write_jsonl(tmp_path / "good.jsonl", token_records(6, 2, 4, 10))
    bad = write_jsonl(tmp_path / "bad.jsonl", [*token_records(3, 1, 4, 8), BAD[kind][0]])
    engine = FusedEngine(copy.deepcopy(base), make_tokenizer(), settings=EngineSettings(packing=packing))
    healthy = engine.add_job(job("healthy", good, tmp_path / "healthy"))
    with pytest.raises(DataError, match="record 3"):
        engine.add_job(job("bad", bad, tmp_path / "bad"))
    assert set(engine.jobs) == {"healthy"}
    attached = [m for m in engine.fused.model.modules() if hasattr(m, "adapters")]
    assert attached and all(set(m.adapters) == {"healthy"} for m in attached)  # nothing of "bad" stays
    engine.run()
    assert healthy.step == 3 and healthy.error is None
    alone = FusedEngine(copy.deepcopy(base), make_tokenizer(), settings=EngineSettings(packing=packing))
    ref = alone.add_job(job("healthy", good, tmp_path / "alone"))
    alone.run()
    got, want = healthy.adapter.export_state(), ref.adapter.export_state()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_examples_handed_to_the_engine_are_checked_too(tmp_path):
    engine = FusedEngine(make_tiny_llama(), make_tokenizer())
    with pytest.raises(DataError, match=r"bad: examples: record 1: input_ids has a token id 300"):
        engine.add_job(job("bad", tmp_path / "unused.jsonl", tmp_path / "bad"),
                       examples=[Example([1, 2, 3], [1, 2, 3]), Example([1, 300], [1, 300])])  # fmt: skip
    assert engine.jobs == {}


# ------------------------------------------------------------------ init_from with other settings

def saved_adapter(tmp_path, settings: AdapterSettings, name: str = "init") -> str:
    """An exported adapter of ``settings`` (what a finished job leaves), as ``init_from`` reads it."""
    from actors import checkpoint as ckpt
    from tests.actors.test_mixlora import examples, job_config

    engine = FusedEngine(make_tiny_llama(), make_tokenizer(), base_model_id="tiny")
    seed = engine.add_job(job_config("s", settings, tmp_path / "s"), examples=examples(4, 1, 5, 9))
    return str(ckpt.write_adapter(tmp_path / name, seed.adapter.export_state(), seed.adapter.export_config("tiny")))


def lora(r=4, alpha=8.0, rslora=False, dora=False, init_from=None) -> AdapterSettings:
    return AdapterSettings("lora", LoraSettings(r, alpha, 0.0, use_rslora=rslora, use_dora=dora), ("q_proj", "v_proj"),
                           init_from=init_from)  # fmt: skip


@pytest.mark.parametrize(
    ("saved", "asked", "words"),
    [
        (lora(alpha=32.0, rslora=True), lora(alpha=8.0, rslora=True),
         "adapter.alpha: 8, but adapter.init_from .* was trained with lora_alpha 32; set adapter.alpha: 32"),
        (lora(rslora=True), lora(), "adapter.use_rslora: false, .* use_rslora true; set adapter.use_rslora: true"),
        (lora(dora=True), lora(), "adapter.use_dora: false"),
        (lora(r=8), lora(r=4), "adapter.r: 4, .* r 8"),
    ],
    ids=["alpha", "rslora", "dora", "r"],
)  # fmt: skip
def test_init_from_trained_with_other_settings_is_refused(saved, asked, words, tmp_path):
    """An adapter whose tensors fit but whose scaling differs would load and silently become
    another adapter (before: alpha 32 + rsLoRA read as alpha 16, scaling 2.0 instead of 11.3)."""
    from actors.adapter import AdapterLoadError
    from tests.actors.test_mixlora import examples, job_config

    source = saved_adapter(tmp_path, saved)
    asked = AdapterSettings(asked.kind, asked.lora, asked.target_modules, init_from=source)
    engine = FusedEngine(make_tiny_llama(), make_tokenizer(), base_model_id="tiny")
    with pytest.raises(AdapterLoadError, match=words):
        engine.add_job(job_config("j", asked, tmp_path / "j"), examples=examples(4, 1, 5, 9))
    assert engine.jobs == {}
    attached = [m for m in engine.fused.model.modules() if hasattr(m, "adapters")]
    assert all(len(m.adapters) == 0 for m in attached)


def test_init_from_mixlora_checks_experts_and_routing(tmp_path):
    from actors.adapter import AdapterLoadError
    from tests.actors.test_mixlora import examples, job_config, mix_settings

    source = saved_adapter(tmp_path, mix_settings(experts=4, top_k=2))
    engine = FusedEngine(make_tiny_llama(), make_tokenizer(), base_model_id="tiny")
    cases = [(mix_settings(experts=4, top_k=1, init_from=source), "adapter.top_k: 1, .* top_k 2"),
             (mix_settings(experts=4, top_k=2, routing="switch", init_from=source), "adapter.routing: 'switch'"),
             (mix_settings(experts=4, top_k=2, alpha=16, init_from=source), "adapter.alpha: 16"),
             (lora(init_from=source), "adapter.type: 'lora', but .* is a mixlora adapter")]  # fmt: skip
    for settings, words in cases:
        with pytest.raises(AdapterLoadError, match=words):
            engine.add_job(job_config("j", settings, tmp_path / "j"), examples=examples(4, 1, 5, 9))
    # the same settings (dropout and loss coefficients may differ) continue from it
    same = mix_settings(experts=4, top_k=2, aux=0.05, dropout=0.1, init_from=source)
    job = engine.add_job(job_config("j", same, tmp_path / "j"), examples=examples(4, 1, 5, 9))
    from actors.checkpoint import read_adapter

    want = read_adapter(source)[0]
    got = job.adapter.export_state()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_an_adapter_with_a_nan_weight_is_refused_by_name(tmp_path):
    """Before, ``init_from`` a damaged adapter failed at step 1 with "loss is nan; lower
    train.learning_rate", and attaching it for evaluation gave NaN metrics."""
    from safetensors.torch import load_file, save_file

    from actors.adapter import AdapterLoadError

    good = write_jsonl(tmp_path / "good.jsonl", token_records(6, 2, 4, 10))
    engine = FusedEngine(copy.deepcopy(make_tiny_llama()), make_tokenizer())
    engine.add_job(job("src", good, tmp_path / "src"))
    engine.run()
    weights = tmp_path / "src" / "adapter_model.safetensors"
    state = load_file(weights)
    name = sorted(state)[0]
    state[name].view(-1)[3] = float("nan")
    save_file(state, weights)
    config = job("cont", good, tmp_path / "cont")
    config = dataclasses.replace(config, adapter=dataclasses.replace(config.adapter, init_from=str(tmp_path / "src")))
    with pytest.raises(AdapterLoadError, match=rf"adapter.init_from: .*src: tensor {name} has 1 NaN or infinite value"):
        engine.add_job(config)
    with pytest.raises(AdapterLoadError, match=rf"src: tensor {name} has 1 NaN or infinite value"):
        engine.attach_adapter("eval", tmp_path / "src")
    assert "cont" not in engine.jobs and "eval" not in engine.inference

"""``lorafleet eval``: per-adapter loss and perplexity, LoRA and MixLoRA fused, clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from actors import checkpoint as ckpt
from actors.config import AdapterSettings, LoraSettings
from actors.data import Example
from actors.engine import FusedEngine
from orchestrator.cli import main
from tests.actors.test_mixlora import ALL, FFN, job_config, mix_settings, randomize
from tests.conftest import make_tiny_llama, make_tokenizer, token_records, write_jsonl


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """A LoRA and a MixLoRA adapter exported for the tiny model, plus a data file."""
    from transformers import AutoModelForCausalLM

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("eval-cli")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = FusedEngine(model, make_tokenizer(), base_model_id=str(tiny_model_dir))
    dirs = []
    for k, (name, settings) in enumerate(
        [("l", AdapterSettings("lora", LoraSettings(4, 8), ALL)), ("m", mix_settings(targets=("q_proj", *FFN)))]
    ):
        job = engine.add_job(job_config(name, settings, tmp / name), examples=[Example([5, 6, 7], [5, 6, 7])])
        randomize(job.adapter, seed=k)
        dirs.append(str(ckpt.write_adapter(tmp / name, job.adapter.export_state(),
                                           job.adapter.export_config(str(tiny_model_dir)))))  # fmt: skip
    data = write_jsonl(tmp / "data.jsonl", token_records(7, seed=3, min_len=4, max_len=12))
    yield engine, dirs, data
    torch.set_num_threads(before)


def test_eval_json_lists_every_adapter(adapters, tiny_model_dir, capsys):
    engine, (lora_dir, mix_dir), data = adapters
    rc = main(["eval", "--base-model", str(tiny_model_dir), "--adapter", lora_dir, "--adapter", mix_dir,
               "--data", str(data), "--json", "--batch-size", "3"])  # fmt: skip
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["adapter"] for r in rows] == [lora_dir, mix_dir]
    examples = [Example(r["input_ids"], r["labels"]) for r in token_records(7, seed=3, min_len=4, max_len=12)]
    want = engine.evaluate(["l", "m"], examples)
    for row, (loss, tokens) in zip(rows, want, strict=True):
        assert row["tokens"] == tokens > 0
        assert row["loss"] == pytest.approx(loss, rel=1e-5)
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]), rel=1e-9)


def test_eval_without_adapter_is_the_base_model(adapters, tiny_model_dir, capsys):
    _engine, _dirs, data = adapters
    assert main(["eval", "--base-model", str(tiny_model_dir), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "(base model)" in out and "perplexity" in out
    assert main(["eval", "--base-model", str(tiny_model_dir), "--data", str(data), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["adapter"] is None and row["loss"] > 0


def test_eval_errors_name_the_adapter(adapters, tiny_model_dir, tmp_path, capsys):
    _engine, (_lora_dir, mix_dir), data = adapters
    missing = tmp_path / "nope"
    assert main(["eval", "--base-model", str(tiny_model_dir), "--adapter", str(missing), "--data", str(data)]) == 2
    assert str(missing) in capsys.readouterr().err
    other = tmp_path / "wider"
    make_tiny_llama(hidden_size=48, intermediate_size=64).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    assert main(["eval", "--base-model", str(other), "--adapter", mix_dir, "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert mix_dir in err and "shape" in err


def test_eval_on_another_base_model_says_which_the_adapter_was_trained_on(adapters, tiny_model_dir, tmp_path, capsys):
    """An adapter of the 2-layer model on a 3-layer one: its tensors are missing, and the error names both models."""
    _engine, (lora_dir, _mix_dir), data = adapters
    deeper = tmp_path / "deeper"
    make_tiny_llama(num_hidden_layers=3).save_pretrained(deeper)
    make_tokenizer().save_pretrained(deeper)
    assert main(["eval", "--base-model", str(deeper), "--adapter", lora_dir, "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"--adapter: {lora_dir}: {lora_dir} does not match" in err and "tensors missing" in err
    assert (f"the adapter was trained on {tiny_model_dir} (adapter_config.json: base_model_name_or_path), and the "
            f"base model here is {deeper}") in err  # fmt: skip


def test_eval_data_errors_name_the_flag_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A missing --data was reported after the model had loaded, as ``data.path: ...`` (a spec field)."""
    import actors.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load before --data is checked")

    monkeypatch.setattr(actors.models, "load_base_model", no_load)
    assert main(["eval", "--base-model", "builtin:smollm2-135m-instruct", "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--data: file not found: {tmp_path / 'nope.jsonl'}")


def test_eval_data_record_errors_name_the_flag(adapters, tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": null}\n')
    assert main(["eval", "--base-model", str(tiny_model_dir), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "error: --format: cannot detect the format" in err and "or give --format" in err and "data." not in err
    bad.write_text('{"text": "fine"}\n{"text": null}\n')
    assert main(["eval", "--base-model", str(tiny_model_dir), "--data", str(bad), "--format", "text"]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: record 1: field 'text'" in err and "(--format: text)" in err and "data." not in err

"""``orchestrator.checks``: ``data.max_seq_len`` against the base model's positions, read from its
``config.json`` without loading it, as ``validate``, ``train`` and ``submit`` report it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from actors.models import PositionLimit, local_model_config, position_limit
from orchestrator.checks import SpecWarning, max_seq_len_check
from orchestrator.cli import main
from orchestrator.commands import validate
from orchestrator.remote import Client, RemoteError
from orchestrator.spec import load_spec
from tests.conftest import write_jsonl

LLAMA = {"model_type": "llama", "max_position_embeddings": 256, "rope_theta": 10000.0}
GPT2 = {"model_type": "gpt2", "n_positions": 1024, "n_ctx": 1024}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (LLAMA, PositionLimit("max_position_embeddings", 256, fixed=False)),
        (GPT2, PositionLimit("n_positions", 1024, fixed=True)),  # GPT-2 configs name it n_positions
        ({"model_type": "opt", "max_position_embeddings": 2048}, PositionLimit("max_position_embeddings", 2048, True)),
        ({"model_type": "gptj", "n_positions": 2048, "rotary_dim": 64}, PositionLimit("n_positions", 2048, True)),
        ({"model_type": "bloom", "n_embed": 64}, None),  # ALiBi: no field, nothing to say
        ({"model_type": "falcon", "alibi": True, "max_position_embeddings": 2048}, None),  # ALiBi: no limit
        # Qwen2.5 with YaRN: 32768 x 4 = 131072 positions
        ({"model_type": "qwen2", "max_position_embeddings": 32768,
          "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
         PositionLimit("max_position_embeddings with its rope scaling factor 4", 131072, False)),
        # Llama 3.1: the field already counts the scaling (8192 x 8 = 65536 < 131072)
        ({"model_type": "llama", "max_position_embeddings": 131072,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}},
         PositionLimit("max_position_embeddings", 131072, False)),
        ({"model_type": "llama", "max_position_embeddings": "lots"}, None),
    ],
)  # fmt: skip
def test_position_limit_from_a_config(config, expected):
    assert position_limit(config) == expected


def model_dir(tmp_path: Path, name: str, config: dict) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_spec(tmp_path: Path, name: str, base_model: str, max_seq_len: int) -> Path:
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a b c"}, {"text": "d e f"}])
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({"name": name, "base_model": base_model,
                                    "data": {"path": "d.jsonl", "max_seq_len": max_seq_len}}))  # fmt: skip
    return spec


def test_validate_warns_past_a_rope_models_positions_and_refuses_past_a_position_table(tmp_path, monkeypatch,
                                                                                       capsys):  # fmt: skip
    """max_seq_len: 100000 on a model of 256 positions passed validate and train without a word."""
    monkeypatch.chdir(tmp_path)
    llama = write_spec(tmp_path, "llama", "./llama", 100000)
    model_dir(tmp_path, "llama", LLAMA)
    assert validate.run(SimpleNamespace(specs=[str(llama)])) == 0  # a warning: RoPE extrapolates, nothing fails
    out = capsys.readouterr().out
    assert (f"{llama}: warning: data.max_seq_len: 100000 is more than the 256 positions of base model ./llama "
            "(max_position_embeddings in its config.json)") in out, out  # fmt: skip
    assert f"{llama}: ok" in out

    gpt2 = write_spec(tmp_path, "gpt2", "./gpt2", 2048)
    model_dir(tmp_path, "gpt2", GPT2)
    assert validate.run(SimpleNamespace(specs=[str(gpt2)])) == 1  # a record that long would fail the job
    out = capsys.readouterr().out
    assert (f"{gpt2}: data.max_seq_len: 2048 is more than the 1024 positions of base model ./gpt2 (n_positions in "
            "its config.json); its positions index a fixed table (gpt2), so a record that long would fail the job; "
            "set data.max_seq_len: 1024 or less") in out, out  # fmt: skip

    within = write_spec(tmp_path, "within", "./llama", 256)
    assert validate.run(SimpleNamespace(specs=[str(within)])) == 0
    assert "warning" not in capsys.readouterr().out
    assert max_seq_len_check(load_spec(write_spec(tmp_path, "hub", "org/not-cached-here", 100000))) is None


def test_a_builtin_models_config_is_read_once_converted(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path / "cache"))
    assert local_model_config("builtin:smollm2-135m-instruct") is None  # not converted yet: nothing to say
    (tmp_path / "cache" / "models").mkdir(parents=True)
    model_dir(tmp_path / "cache" / "models", "smollm2-135m-instruct", LLAMA)
    assert local_model_config("builtin:smollm2-135m-instruct") == LLAMA


def test_train_warns_or_refuses_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import actors.models

    loads = []

    def load(name, **_kwargs):
        loads.append(name)
        raise OSError("stopped here: the test loads no model")

    monkeypatch.setattr(actors.models, "load_base_model", load)
    monkeypatch.chdir(tmp_path)
    model_dir(tmp_path, "llama", LLAMA)
    model_dir(tmp_path, "gpt2", GPT2)
    gpt2 = write_spec(tmp_path, "gpt2", "./gpt2", 2048)
    assert main(["train", gpt2.name, "--plain"]) == 1
    err = capsys.readouterr().err
    assert loads == [] and "data.max_seq_len: 2048 is more than the 1024 positions" in err, err
    llama = write_spec(tmp_path, "llama", "./llama", 100000)
    main(["train", llama.name, "--plain"])
    err = capsys.readouterr().err
    assert loads == ["./llama"]  # a warning, and the job goes on
    assert "warning llama.yaml: data.max_seq_len: 100000 is more than the 256 positions" in " ".join(err.split())


def test_submit_warns_or_refuses_as_validate_does(tmp_path, monkeypatch, capsys):
    from orchestrator.commands import jobs

    monkeypatch.chdir(tmp_path)
    model_dir(tmp_path, "llama", LLAMA)
    model_dir(tmp_path, "gpt2", GPT2)
    write_spec(tmp_path, "llama", "./llama", 100000)
    (tmp_path / "w").mkdir()
    with pytest.warns(SpecWarning, match=r"^llama.yaml: data.max_seq_len: 100000 is more than the 256 positions"):
        Client._stage("llama.yaml", tmp_path / "w", 0)
    client = object.__new__(Client)
    client._agent = lambda *a, **k: pytest.fail("sent to the cluster")
    client.owner = None
    write_spec(tmp_path, "gpt2", "./gpt2", 2048)
    with pytest.raises(RemoteError, match=r"^gpt2.yaml: data.max_seq_len: 2048 is more than the 1024 positions"):
        client.submit_many(["gpt2.yaml"])

    client._agent = lambda *a, **k: [{"id": "lf-1", "name": "llama"}]  # the CLI prints the warning as a line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none escapes as Python's own warning
        assert jobs.do_submit(client, SimpleNamespace(specs=["llama.yaml"], wait=False)) == 0
    captured = capsys.readouterr()
    assert captured.out == "lf-1\tllama\n"
    assert captured.err.startswith("lorafleet submit: warning: llama.yaml: data.max_seq_len: 100000 is more than")

"""Inputs that gave tracebacks or were silently misread, now one-line errors naming the flag or field.

``lorafleet eval --device``; the policy YAML of ``up --policy`` / ``policy set`` (read as ``simulate``
reads it); booleans and numbers in a job spec; duplicate keys; an ``output`` that is a file; the
spec module's documented defaults; a custom policy whose ``explain`` raises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import cli
from orchestrator.spec import JobSpec, SpecError, load_spec, parse_spec

GOOD = {"name": "job-1", "data": {"path": "d.jsonl"}}


def lorafleet(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def spec_errors(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(doc)
    return info.value.errors


# ------------------------------------------------------------------------ 1. eval --device


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device is checked before the base model loads: loading it would be a test failure."""
    import actors.models

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the base model must not load with a bad --device")

    monkeypatch.setattr(actors.models, "load_base_model", refuse)


def test_eval_device_cuda_without_cuda_is_a_device_error(monkeypatch, capsys, no_model_load):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = lorafleet(capsys, "eval", "--base-model", "m", "--data", "d.jsonl", "--device", "cuda")
    assert code == 2
    assert err == "lorafleet eval: error: --device cuda: no CUDA device is visible to torch\n"


def test_eval_unknown_device_names_the_device_flag(capsys, no_model_load):
    code, _, err = lorafleet(capsys, "eval", "--base-model", "m", "--data", "d.jsonl", "--device", "foo")
    assert code == 2
    assert err == "lorafleet eval: error: --device: must be auto, cpu, cuda or cuda:N (got 'foo')\n"


def test_eval_cuda_index_past_the_devices(monkeypatch, capsys, no_model_load):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = lorafleet(capsys, "eval", "--base-model", "m", "--data", "d.jsonl", "--device", "cuda:3")
    assert code == 2
    assert err == "lorafleet eval: error: --device cuda:3: torch sees 1 CUDA device(s): cuda:0 to cuda:0\n"


# ------------------------------------------------------------------------ 2. policy YAML of up / policy set

BAD_POLICY_FILES = [
    (b"policy: fifo\n# \xff\xfe\n", "not valid UTF-8: invalid start byte at byte 15"),
    (b"[" * 5000 + b"]" * 5000 + b"\n", "not valid YAML: maximum recursion depth exceeded"),
    (b"policy: fifo\nmargin: 1" + b"0" * 5000 + b"\n", "not valid YAML: Exceeds the limit (4300 digits)"),
]


@pytest.mark.parametrize(("raw", "words"), BAD_POLICY_FILES, ids=["non-utf8", "deep", "bigint"])
@pytest.mark.parametrize("argv", [("up", "--policy"), ("policy", "set")], ids=["up", "policy-set"])
def test_unreadable_policy_file_is_one_line_error(tmp_path: Path, capsys, raw: bytes, words: str, argv):
    path = tmp_path / "policy.yaml"
    path.write_bytes(raw)
    code, _, err = lorafleet(capsys, *argv, str(path))
    assert code == 2
    assert err.startswith(f"lorafleet {argv[0]}: error: {path}: {words}")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_policy_file_reads_numbers_as_simulate_does(tmp_path: Path):
    from orchestrator.commands.up import read_policy

    path = tmp_path / "policy.yaml"
    path.write_text("policy: aspen\nmargin: 1e9\n")  # YAML 1.1 would read 1e9 as a string
    assert read_policy(str(path)) == {"policy": "aspen", "margin": 1e9}


def test_missing_policy_file(capsys, tmp_path: Path):
    code, _, err = lorafleet(capsys, "up", "--policy", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert err == f"lorafleet up: error: {tmp_path / 'nope.yaml'}: cannot read: No such file or directory\n"


# ------------------------------------------------------------------------ 3. booleans are not numbers


def test_booleans_are_refused_as_numbers():
    errors = spec_errors({**GOOD, "adapter": {"r": True, "alpha": True},
                          "train": {"learning_rate": True, "epochs": False}})  # fmt: skip
    assert errors == [
        "<spec>: adapter.r: must be an integer, not true/false (got true)",
        "<spec>: adapter.alpha: must be a number, not true/false (got true)",
        "<spec>: train.epochs: must be an integer, not true/false (got false)",
        "<spec>: train.learning_rate: must be a number, not true/false (got true)",
    ]


@pytest.mark.parametrize(
    ("section", "changes", "field", "message"),
    [
        ("data", {"path": "d.jsonl", "max_seq_len": True}, "data.max_seq_len", "must be an integer, not true/false (got true)"),
        ("train", {"betas": [True, 0.9]}, "train.betas.0", "must be a number, not true/false (got true)"),
        ("train", {"max_steps": True}, "train.max_steps", "must be an integer, not true/false (got true)"),
        ("train", {"max_grad_norm": False}, "train.max_grad_norm", "must be a number, not true/false (got false)"),
        ("adapter", {"type": "mixlora", "num_experts": True}, "adapter.num_experts",
         "must be an integer, not true/false (got true)"),
        ("adapter", {"type": "mixlora", "expert": {"r": True}}, "adapter.expert.r",
         "must be an integer, not true/false (got true)"),
        ("eval", {"held_out_fraction": True}, "eval.held_out_fraction", "must be a number, not true/false (got true)"),
        ("priority", True, "priority", "must be an integer, not true/false (got true)"),
        ("data", {"path": "d.jsonl", "shuffle": 1}, "data.shuffle", "must be true or false (got 1)"),
        ("data", {"path": "d.jsonl", "train_on_inputs": "yes"}, "data.train_on_inputs",
         "must be true or false (got 'yes')"),
        ("adapter", {"use_dora": 0}, "adapter.use_dora", "must be true or false (got 0)"),
        ("trust_remote_code", 1, "trust_remote_code", "must be true or false (got 1)"),
    ],
)
def test_number_and_boolean_fields_keep_their_type(section: str, changes: Any, field: str, message: str):
    assert spec_errors({**GOOD, section: changes}) == [f"<spec>: {field}: {message}"]


def test_numeric_strings_and_ints_still_count_as_numbers():
    # PyYAML reads ``2e-4`` as a string: users write it all the time.
    doc = yaml.safe_load("learning_rate: 2e-4\nweight_decay: 0\nmax_steps: '10'\n")
    assert doc["learning_rate"] == "2e-4"
    spec = parse_spec({**GOOD, "train": doc, "data": {"path": "d.jsonl", "max_seq_len": "512", "shuffle": False}})
    assert spec.train.learning_rate == 2e-4 and spec.train.weight_decay == 0.0
    assert spec.train.max_steps == 10 and spec.data.max_seq_len == 512 and spec.data.shuffle is False


def test_bool_field_errors_come_with_the_line(tmp_path: Path):
    path = tmp_path / "a.yaml"
    path.write_text("name: a\ndata:\n  path: d.jsonl\n  shuffle: 1\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.errors == [f"{path}:4: data.shuffle: must be true or false (got 1)"]


# ------------------------------------------------------------------------ 4. duplicate keys


@pytest.mark.parametrize(
    ("text", "line", "field", "first"),
    [
        ("name: a\ndata: {path: d.jsonl}\ntrain:\n  max_steps: 10\nadapter: {r: 4}\ntrain:\n  epochs: 2\n",
         6, "train", 3),
        ("name: a\nname: b\ndata: {path: d.jsonl}\n", 2, "name", 1),
        ("name: a\ndata:\n  path: d.jsonl\n  path: e.jsonl\n", 4, "data.path", 3),
        ("name: a\ndata: {path: d.jsonl}\nadapter:\n  target_modules: [q_proj]\n  r: 4\n  r: 8\n", 6, "adapter.r", 5),
    ],
    ids=["section", "top-level", "nested", "nested-later"],
)
def test_yaml_duplicate_key_is_refused_with_its_line(tmp_path: Path, text: str, line: int, field: str, first: int):
    path = tmp_path / "a.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.errors == [
        f"{path}:{line}: {field}: key given twice (first on line {first}); give each key once (the second would "
        f"replace the first)"
    ]


def test_json_duplicate_key_is_refused(tmp_path: Path):
    path = tmp_path / "a.json"
    path.write_text('{"name":"a","data":{"path":"d.jsonl"},"train":{"learning_rate":0.0002},"train":{"epochs":3}}')
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.errors == [
        f"{path}: train: key given twice; give each key once (the second would replace the first)"
    ]


def test_duplicate_key_through_the_cli_is_one_line(tmp_path: Path, capsys):
    path = tmp_path / "a.yaml"
    path.write_text("name: a\nname: b\ndata: {path: d.jsonl}\n")
    code, out, _ = lorafleet(capsys, "validate", str(path))
    assert code == 1
    assert out == (f"{path}:2: name: key given twice (first on line 1); give each key once (the second would "
                   f"replace the first)\n")  # fmt: skip


def test_merge_keys_are_not_duplicates(tmp_path: Path):
    # a key beside a merge (<<) overrides the merged one, as YAML intends
    path = tmp_path / "a.yaml"
    path.write_text("name: a\ndata: {path: d.jsonl}\n"
                    "eval:\n  <<: {max_examples: 5, batch_size: 2}\n  held_out_fraction: 0.1\n  batch_size: 4\n")
    spec = load_spec(path)
    assert spec.eval is not None and spec.eval.batch_size == 4 and spec.eval.max_examples == 5


# ------------------------------------------------------------------------ 5. trust_remote_code (spec side)


def test_trust_remote_code_is_a_strict_boolean():
    assert parse_spec({**GOOD, "trust_remote_code": True}).trust_remote_code is True
    assert spec_errors({**GOOD, "trust_remote_code": "yes"}) == [
        "<spec>: trust_remote_code: must be true or false (got 'yes')"
    ]


# ------------------------------------------------------------------------ 6. output that is a file


def _spec_file(tmp_path: Path, output: str | None) -> Path:
    doc: dict[str, Any] = {"name": "a", "data": {"path": "d.jsonl"}}
    if output is not None:
        doc["output"] = output
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_output_naming_a_file_is_refused(tmp_path: Path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    path = _spec_file(tmp_path, str(precious))
    code, out, _ = lorafleet(capsys, "validate", str(path))
    assert code == 1
    assert out == f"{path}:4: output: {precious} is a file, not a directory\n"
    assert precious.read_text() == "keep me\n"


def test_output_under_a_file_is_refused(tmp_path: Path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    path = _spec_file(tmp_path, f"{precious}/sub/dir")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.errors == [
        f"{path}:4: output: {precious}/sub/dir is under {precious}, which is a file, not a directory"
    ]


def test_default_output_that_is_a_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").write_text("not a directory\n")
    path = _spec_file(tmp_path, None)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.errors == [
        f"{path}: output: out/a is under out, which is a file, not a directory (output is unset: the default is "
        f"out/NAME)"
    ]


def test_output_directory_new_or_existing_is_fine(tmp_path: Path):
    (tmp_path / "exists").mkdir()
    assert load_spec(_spec_file(tmp_path, str(tmp_path / "exists"))).output == str(tmp_path / "exists")
    assert load_spec(_spec_file(tmp_path, str(tmp_path / "new" / "deeper"))).output == str(tmp_path / "new" / "deeper")


# ------------------------------------------------------------------------ 7. the documented defaults


def test_docstring_example_shows_the_defaults():
    import orchestrator.spec as spec_module

    doc = spec_module.__doc__ or ""
    block = doc.split("Example (defaults shown", 1)[1].split("::\n", 1)[1]
    example = yaml.safe_load("\n".join(line for line in block.split("\n\n", 1)[0].splitlines()))
    assert example["adapter"]["target_modules"] == "all-linear"
    minimal = {"name": example["name"], "data": {"path": example["data"]["path"]}}
    assert parse_spec(example) == parse_spec(minimal)  # every value shown is the default
    assert parse_spec(minimal).output_dir() == "out/reverse-words"
    assert JobSpec.model_fields["priority"].default == example["priority"]


# ------------------------------------------------------------------------ 8. a custom policy's explain raises


class BrokenExplain:
    """Schedules nothing; ``explain`` fails as a buggy custom policy would."""

    name = "broken"

    def __init__(self, error: Exception):
        self.error = error

    def schedule(self, view: Any) -> list:
        return []

    def explain(self, view: Any, job_id: str) -> Any:
        raise self.error


def _job_spec(name: str) -> dict:
    return {"name": name, "base_model": "builtin:smollm2-135m-instruct", "data": {"path": "d.jsonl", "max_seq_len": 64},
            "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "train": {"max_steps": 10, "batch_size": 4, "micro_batch_size": 2}}  # fmt: skip


@pytest.fixture
def ctl(tmp_path: Path):
    from orchestrator.controller import Controller

    c = Controller(str(tmp_path / "store" / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"},
                   start_loop=False, num_gpus=0)  # fmt: skip
    yield c
    c.store.close()


def test_explain_error_of_a_policy_is_one_line_naming_it(ctl, capsys, monkeypatch: pytest.MonkeyPatch):
    from orchestrator import auth, client

    job = ctl.submit(_job_spec("a"), "carol")
    ctl.policy = BrokenExplain(ZeroDivisionError("division by zero"))
    want = f"policy 'broken' could not explain job {job['id']}: ZeroDivisionError: division by zero"
    with pytest.raises(ValueError) as info:
        ctl.explain("a")
    assert str(info.value) == want
    # Through the CLI, as `client.call` re-raises the controller's exception.
    monkeypatch.setattr(client, "connect", lambda address: None)
    monkeypatch.setattr(client, "call", lambda method, *args, **kwargs: getattr(ctl, method)(*args, **kwargs))
    monkeypatch.setattr(auth, "client_api_key", lambda: None)
    code, _, err = lorafleet(capsys, "policy", "explain", "a")
    assert code == 2
    assert err == f"lorafleet policy: error: {want}\n"


def test_explain_keyerror_of_a_queued_job_is_a_policy_error(ctl):
    job = ctl.submit(_job_spec("a"), "carol")
    ctl.policy = BrokenExplain(KeyError("weights"))
    with pytest.raises(ValueError) as info:
        ctl.explain("a")
    assert str(info.value) == f"policy 'broken' could not explain job {job['id']}: KeyError: 'weights'"


def test_explain_of_a_job_neither_queued_nor_running_says_its_state(ctl):
    """It raised the policy's KeyError, which the CLI printed in Python's quotes:
    ``error: "job 'lf-...' is neither queued nor running"``."""
    job = ctl.submit(_job_spec("a"), "carol")
    ctl.cancel(job["id"], owner="carol")
    with pytest.raises(LookupError) as info:
        ctl.explain(job["id"])
    assert not isinstance(info.value, KeyError)
    assert str(info.value) == f"job {job['id']} is CANCELLED: explain covers queued and running jobs"


def test_explain_multiline_message_is_one_line(ctl):
    ctl.submit(_job_spec("a"), "carol")
    ctl.policy = BrokenExplain(RuntimeError("first line\n  second line"))
    with pytest.raises(ValueError, match=r"could not explain job \S+: RuntimeError: first line second line$"):
        ctl.explain("a")


def test_json_spec_without_duplicates_still_loads(tmp_path: Path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"name": "a", "data": {"path": "d.jsonl"}, "train": {"learning_rate": "2e-4"}}))
    assert load_spec(path).train.learning_rate == 2e-4


def _valid_job(tmp_path: Path, **changes: Any) -> Path:
    """A spec with a real data file, so that validate reaches the base model and init_from checks."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    doc: dict[str, Any] = {"name": "a", "data": {"path": str(data)}, "output": str(tmp_path / "out")}
    for key, value in changes.items():
        doc[key] = value
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("base_model", "words"),
    [("builtin:smollm2-135m", "base_model: unknown builtin model 'smollm2-135m'; available: builtin:smollm2-135m-instruct"),
     ("{tmp}/tinyy", "base_model: directory not found: {tmp}/tinyy"),
     ("./no-such-model-dir", "base_model: directory not found: ./no-such-model-dir"),
     ("{tmp}/d.jsonl", "base_model: {tmp}/d.jsonl is a file; give a transformers model directory (with config.json)"),
     ("{tmp}", "base_model: {tmp} has no config.json; give a transformers model directory")],
)  # fmt: skip
def test_validate_checks_the_base_model_without_loading_it(tmp_path: Path, capsys, base_model: str, words: str):
    """These passed validate; train then failed with a hub repo-id error (a missing directory) or a doubled
    ``base_model: base_model:`` prefix (a builtin typo)."""
    path = _valid_job(tmp_path, base_model=base_model.format(tmp=tmp_path))
    code, out, _ = lorafleet(capsys, "validate", str(path))
    assert code == 1 and out == f"{path}: {words.format(tmp=tmp_path)}\n"


def test_a_missing_local_base_model_fails_train_with_one_base_model_prefix(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a short path: the summary table does not wrap it
    path = _valid_job(tmp_path, base_model="./tinyy")
    code, out, err = lorafleet(capsys, "train", str(path), "--plain")
    text = out + err
    assert code == 1
    assert "base_model: directory not found: ./tinyy" in text and "base_model: base_model" not in text
    assert "Repo id" not in text


def test_validate_refuses_an_init_from_trained_with_other_settings(tmp_path: Path, capsys):
    """An r mismatch passed validate and failed only on the worker."""
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "use_rslora": False, "use_dora": False, "base_model_name_or_path": "m"}))  # fmt: skip
    path = _valid_job(tmp_path, adapter={"type": "lora", "r": 8, "alpha": 8, "init_from": str(saved)})
    code, out, _ = lorafleet(capsys, "validate", str(path))
    assert code == 1
    assert out == (f"{path}: adapter.r: 8, but adapter.init_from {saved} was trained with r 4; set adapter.r: 4 "
                   "to continue from it\n")  # fmt: skip
    path = _valid_job(tmp_path, adapter={"type": "lora", "r": 4, "alpha": 8, "init_from": str(saved)})
    code, out, _ = lorafleet(capsys, "validate", str(path))
    assert code == 0 and out.endswith("ok (a, lora, base builtin:smollm2-135m-instruct)\n")


def test_exact_match_on_text_records_is_refused(tmp_path: Path, capsys):
    """A ``{text}`` record has no answer: exact match scored 0.00 whatever the model wrote."""
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "a b c"}\n{"text": "d e f"}\n')
    path = _valid_job(tmp_path, data={"path": str(text)}, eval={"data": str(text), "metrics": ["exact_match"]})
    code, out, _ = lorafleet(capsys, "validate", str(path))
    assert code == 1
    assert out == (f"{path}: eval.data: record 0: exact_match needs a prompt and an answer ({{prompt, completion}}, "
                   "alpaca or chat records); a {text} record has none (it scored 0 whatever the model wrote); use "
                   "loss for it\n")  # fmt: skip


def test_validate_lists_every_bad_record_up_to_ten(tmp_path: Path, capsys):
    """Only record 0 was reported; a user fixed the file one record per run."""
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' + '{"prompt": "a"}\n' * 12)
    path = _valid_job(tmp_path, data={"path": str(data), "format": "text"})
    code, out, _ = lorafleet(capsys, "validate", str(path))
    lines = out.splitlines()
    assert code == 1 and len(lines) == 11
    assert [line.split(": record ")[1].split(":")[0] for line in lines[:10]] == [str(i) for i in range(1, 11)]
    assert lines[-1] == f"{path}: {data}: ... and 2 more bad record(s)"

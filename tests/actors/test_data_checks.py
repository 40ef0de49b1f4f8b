"""Data and ``eval:`` problems are refused when a job joins (and by ``lorafleet validate``), naming the
file, record and field. Before: a ``{text}`` record among ``{prompt, completion}`` records trained on
the text "None"; a JSON list of numbers trained as text; a chat message that is not an object, a
template's own error and a non-UTF-8 file gave bare Python errors; a malformed multiple-choice record
scored 0; a one-record file held out nothing; a format/metric mismatch and a record longer than a
GPT-2-style position table were found only mid-training or after it.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from actors.config import (
    AdapterSettings,
    DataSettings,
    EvalSettings,
    JobConfig,
    LoraSettings,
    TrainSettings,
)
from actors.data import DataError, check_records, load_examples, model_max_positions
from actors.engine import FusedEngine
from actors.evaluate import check_eval
from tests.conftest import make_tiny_llama, make_tokenizer, token_records, write_jsonl


def settings(path, fmt: str = "auto") -> DataSettings:
    return DataSettings(str(path), format=fmt, max_seq_len=32)


def test_a_text_record_among_prompt_completion_records_trains_on_its_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2 w3"}, {"prompt": "w4", "completion": "w5"}])
    tok = make_tokenizer()
    first, second = load_examples(settings(path), tok)
    assert tok.decode(first.input_ids) == "<s> w1 w2 w3 </s>"  # was "<s> <unk> <unk> </s>": str(None) twice
    assert tok.decode(second.input_ids) == "w4 w5 </s>"  # this tokenizer adds no BOS to a prompt


@pytest.mark.parametrize(("records", "words"), [
    ([{"text": "w1"}, {"text": None}], r"record 1: field 'text' \(or 'prompt' and 'completion'\) is missing or null"),
    ([{"prompt": "w1", "completion": "w2"}, {"prompt": "w3"}], "record 1: field 'text'"),
    ([{"text": None}], r"record keys \[\] \(null values count as absent\)"),
    ([{"messages": [{"role": "user", "content": "w1"}, "w2"]}],
     r"record 0: messages\[1\] must be an object with a string 'role' and a string 'content' \(got 'w2'\)"),
    ([{"messages": [{"role": "user", "content": ["w1"]}, {"role": "assistant", "content": "w2"}]}],
     r"messages\[0\] must be an object"),
    ([{"messages": [{"role": "user", "content": "w1"}]}], "must end with an assistant turn \\(the last role is 'user'\\)"),
    ([{"messages": {"role": "user"}}], "'messages' must be a non-empty list"),
])  # fmt: skip
def test_records_missing_what_their_format_needs_are_refused(records, words, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=words):
        load_examples(settings(path), make_tokenizer())
    with pytest.raises(DataError, match=words):  # lorafleet validate's check: no tokenizer needed
        check_records(settings(path))


def test_a_json_list_of_numbers_is_not_records(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(DataError, match=r"d.json: item 0 of the JSON list is 1, not a record \(a JSON object\)"):
        check_records(settings(path))


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "w1 \xff w2"}\n')
    with pytest.raises(DataError, match=r"data.path: .*d.jsonl is not UTF-8 text \(invalid start byte at byte 13\)"):
        check_records(settings(path))


def test_a_ragged_csv_says_which_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nw1,w2\nw3,w4,w5,w6\n")
    with pytest.raises(DataError, match=r"cannot read .*d.csv as csv: .*Expected 2 fields in line 3, saw 4"):
        check_records(settings(path))


def test_a_chat_template_error_names_the_record(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                         "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}{{ m['content'] }} {% endfor %}")  # fmt: skip
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "w1"},
                                                            {"role": "assistant", "content": "w2"}]},
                                              {"messages": [{"role": "wizard", "content": "w1"},
                                                            {"role": "assistant", "content": "w2"}]}])  # fmt: skip
    with pytest.raises(DataError, match=r"d.jsonl: record 1: TemplateError: Unknown role: wizard"):
        load_examples(settings(path), tok)


def job(tmp_path, data, eval_settings: EvalSettings | None, fmt: str = "auto") -> JobConfig:
    return JobConfig("j", "tiny", AdapterSettings("lora", LoraSettings(4, 8, 0.0), ("q_proj",)),
                     DataSettings(str(data), format=fmt, max_seq_len=32), TrainSettings(max_steps=2, batch_size=2,
                     micro_batch_size=2), str(tmp_path / "out"), eval=eval_settings)  # fmt: skip


TEXT = [{"prompt": "w1 w2", "completion": "w3"}, {"prompt": "w4", "completion": "w5"}, {"prompt": "w6", "completion": "w7"}]


@pytest.mark.parametrize(("record", "words"), [
    ({"question": "w1", "choices": "w2", "answer": 0}, r"choices must be a list of at least two texts \(got 'w2'\)"),
    ({"question": "w1", "choices": ["w2", "w3"], "answer": 7}, r"answer 7 is not a choice index \(allowed: 0 to 1\)"),
    ({"question": "w1", "choices": ["w2", "w3"], "answer": True}, "answer must be the 0-based index of the right choice or its text"),
    ({"question": "w1", "choices": ["w2", "w3"], "answer": "w9"}, r"answer must be .* \(got 'w9'; choices \['w2', 'w3'\]\)"),
    ({"question": "w1", "choices": ["w2", "w3"]}, r"multiple_choice needs question, choices, answer \(answer missing\)"),
])  # fmt: skip
def test_malformed_multiple_choice_records_are_refused_before_training(record, words, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", TEXT)
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "w1", "choices": ["w2", "w3"], "answer": 1}, record])
    with pytest.raises(DataError, match=rf"eval.data: record 1: {words}"):
        check_eval(job(tmp_path, data, EvalSettings(data=str(mc), metrics=("multiple_choice",))))


def test_a_choice_answer_may_be_the_text_of_the_right_choice_or_its_index_as_text(tmp_path):
    from actors.evaluate import _choice_fields

    data = write_jsonl(tmp_path / "d.jsonl", TEXT)
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "w1", "choices": ["w2", "w3"], "answer": "w3"}])
    check_eval(job(tmp_path, data, EvalSettings(data=str(mc), metrics=("multiple_choice",))))
    assert _choice_fields({"question": "q", "choices": ["a", "b"], "answer": "1"}, 0, "x")[2] == 1  # as int("1") was
    assert _choice_fields({"question": "q", "choices": ["a", "b"], "answer": 1.0}, 0, "x")[2] == 1
    assert _choice_fields({"question": "q", "choices": ["0", "1", "2"], "answer": "2"}, 0, "x")[2] == 2  # its text


def test_held_out_fraction_of_a_one_record_file_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", TEXT[:1])
    with pytest.raises(DataError, match=r"eval.held_out_fraction: .*d.jsonl has 1 record\(s\), too few to hold one out"):
        check_eval(job(tmp_path, data, EvalSettings(held_out_fraction=0.5)))


def test_a_metric_the_format_cannot_give_fails_the_job_when_it_joins(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", token_records(6, 1, 4, 8))
    engine = FusedEngine(copy.deepcopy(make_tiny_llama()), make_tokenizer())
    config = job(tmp_path, data, EvalSettings(held_out_fraction=0.3, metrics=("loss", "exact_match")), fmt="tokens")
    with pytest.raises(DataError, match=r"eval.metrics: exact_match needs text records \(data.format is tokens\)"):
        engine.add_job(config)  # before training, not after it
    assert not engine.jobs


def test_a_record_longer_than_a_learned_position_table_is_refused_when_its_job_joins(tmp_path):
    """GPT-BigCode with 16 positions: a 20-token record failed at its step with an index error."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=128, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    assert model_max_positions(model) == 16
    assert model_max_positions(make_tiny_llama()) is None  # rotary: no hard limit
    records = [*token_records(4, 1, 4, 8), {"input_ids": list(range(4, 24))}]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    engine = FusedEngine(model, make_tokenizer())
    with pytest.raises(DataError, match=r"d.jsonl: record 4: 20 tokens, more than the 16 positions of the model's "
                                        r"position table; set data.max_seq_len: 16 or less"):  # fmt: skip
        engine.add_job(job(tmp_path, data, None, fmt="tokens"))


def test_an_exact_match_prompt_that_generation_would_run_past_the_position_table_is_refused_at_join(tmp_path):
    """A prompt of 9 tokens and max_new_tokens 8 on 16 positions: generation failed in torch with an
    IndexError after the whole training, and every metric of that evaluation was lost."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=128, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    data = write_jsonl(tmp_path / "d.jsonl", TEXT)
    long = {"prompt": " ".join(["w1"] * 9), "completion": "w2"}  # 9 tokens (this tokenizer adds no BOS)
    ev = write_jsonl(tmp_path / "ev.jsonl", [TEXT[0], long])
    engine = FusedEngine(model, make_tokenizer())
    with pytest.raises(DataError, match=r"^eval.data: record 1: its prompt \(9 tokens\) and eval.max_new_tokens \(8\) "
                                        r"need 17 positions, more than the 16 of the model's position table"):  # fmt: skip
        engine.add_job(job(tmp_path, data, EvalSettings(data=str(ev), metrics=("exact_match",), max_new_tokens=8),
                           fmt="text"))  # fmt: skip
    assert not engine.jobs
    fits = job(tmp_path, data, EvalSettings(data=str(ev), metrics=("exact_match",), max_new_tokens=6), fmt="text")
    fits = dataclasses.replace(fits, adapter=dataclasses.replace(fits.adapter, target_modules=("c_attn",)))
    assert engine.add_job(fits).name == "j"  # 15 positions: fits


def test_gptj_precomputed_positions_are_a_hard_limit_too():
    """GPT-J (and CodeGen) index a buffer of precomputed sinusoids by position: a longer sequence is an
    IndexError (on CUDA a device-side assert); the engine's record check missed it (no nn.Embedding)."""
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, rotary_dim=8)
    assert model_max_positions(GPTJForCausalLM(config)) == 16


def test_validate_reports_data_and_eval_problems(tmp_path, capsys):
    import yaml

    from orchestrator.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1"}, {"text": None}])
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "w1", "choices": "w2", "answer": 0}])
    good = write_jsonl(tmp_path / "good.jsonl", TEXT)
    spec = {"name": "a", "base_model": "tiny", "data": {"path": str(data)}, "output": str(tmp_path / "out" / "a")}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(spec))
    spec = {**spec, "name": "b", "data": {"path": str(good)}, "output": str(tmp_path / "out" / "b"),
            "eval": {"data": str(mc), "metrics": ["multiple_choice"]}}  # fmt: skip
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(spec))
    assert main(["validate", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]) == 1
    out = capsys.readouterr().out
    assert "a.yaml: " in out and "d.jsonl: record 1: field 'text' (or 'prompt' and 'completion') is missing" in out
    assert "b.yaml: eval.data: record 0: choices must be a list of at least two texts" in out
    assert json.loads(data.read_text().splitlines()[0]) == {"text": "w1"}  # nothing rewritten


@pytest.mark.parametrize(("fmt", "records", "words"), [
    ("alpaca", [{"instruction": "w1", "output": "w2"}, {"instruction": "w3"}],
     r"record 1: field 'output' is missing or null \(data.format: alpaca\)"),  # it was scored against "None"
    ("alpaca", [{"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}],
     r"record 0: field 'instruction' is missing or null \(data.format: alpaca\)"),  # chat records read as empty
    ("chat", [{"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": None}]}],
     r"record 0: messages\[1\] must be an object with a string 'role' and a string 'content'"),  # failed after training
    ("chat", [{"messages": [{"role": "assistant", "content": "w1"}, {"role": "user", "content": "w2"}]}],
     r"record 0: 'messages' must end with an assistant turn"),
])  # fmt: skip
def test_eval_data_records_are_checked_against_the_jobs_format_before_training(tmp_path, fmt, records, words):
    """eval.data's records were never checked: a missing answer was scored as the text 'None', chat
    records under an alpaca job as empty prompts, and a malformed chat record failed the evaluation
    only after training."""
    train = [{"instruction": "w1", "output": "w2"}] * 3 if fmt == "alpaca" else [
        {"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}] * 3
    data = write_jsonl(tmp_path / "d.jsonl", train)
    ev = write_jsonl(tmp_path / "ev.jsonl", records)
    with pytest.raises(DataError, match=rf"^eval.data: {ev}: {words}"):
        check_eval(job(tmp_path, data, EvalSettings(data=str(ev), metrics=("loss", "exact_match")), fmt=fmt))

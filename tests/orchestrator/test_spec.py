"""Every malformed spec field gets a specific error naming the field, the problem and what is allowed."""

from __future__ import annotations

import pytest

from orchestrator.spec import SpecError, load_spec, parse_spec

GOOD = {"name": "job-1", "data": {"path": "d.jsonl"}}


def spec_with(**changes):
    out = {"name": "job-1", "data": {"path": "d.jsonl"}, "adapter": {}, "train": {}}
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            out.setdefault(section, {})[key] = value
        else:
            out[section] = value
    return out


CASES = [
    # (field=value, the field named in the error, words the message must contain)
    ({"name": "has space"}, "name", "must match"),
    ({"name": "x" * 65}, "name", "must match"),
    ({"adapter__type": "qlora"}, "adapter.type", "one of lora, mixlora (got 'qlora')"),
    ({"adapter__r": 0}, "adapter.r", "must be >= 1 (got 0)"),
    ({"adapter__r": "eight"}, "adapter.r", "integer"),
    ({"adapter__alpha": -1}, "adapter.alpha", "must be > 0"),
    ({"adapter__dropout": 1.0}, "adapter.dropout", "must be < 1"),
    ({"adapter__target_modules": []}, "adapter.target_modules", "at least 1"),
    ({"adapter__target_modules": ["q_proj", "q_proj"]}, "adapter.target_modules", "twice"),
    ({"adapter__target_modules": ["q proj"]}, "adapter.target_modules", "not a module name"),
    ({"adapter__num_experts": 4}, "adapter.num_experts", "only valid with type: mixlora"),
    ({"adapter__lerning": 1}, "adapter.lerning", "unknown field"),
    ({"data__format": "xml"}, "data.format", "one of auto, alpaca, text, chat, tokens"),
    ({"data__max_seq_len": 1}, "data.max_seq_len", ">= 2"),
    ({"data": {}}, "data.path", "required"),
    ({"train__batch_size": 10, "train__micro_batch_size": 4}, "train.batch_size", "multiple of micro_batch_size"),
    ({"train__batch_size": 2, "train__micro_batch_size": 4}, "train.micro_batch_size", "<= batch_size"),
    ({"train__learning_rate": 0}, "train.learning_rate", "> 0"),
    ({"train__optimizer": "adam"}, "train.optimizer", "one of adamw, sgd"),
    ({"train__lr_scheduler": "step"}, "train.lr_scheduler", "one of constant, linear, cosine"),
    ({"train__epochs": 0}, "train.epochs", ">= 1"),
    ({"train__max_steps": 0}, "train.max_steps", ">= 1"),
    ({"train__max_steps": 10**30}, "train.max_steps", "<= 1000000000"),
    ({"train__epochs": 10**7}, "train.epochs", "<= 1000000"),
    ({"train__batch_size": 10**9, "train__micro_batch_size": 4}, "train.batch_size", "<= 1000000"),
    ({"train__seed": 2**64}, "train.seed", "<= 9223372036854775807"),  # was accepted, then torch refused it at job start
    ({"train__warmup_steps": -1}, "train.warmup_steps", ">= 0"),
    ({"train__max_grad_norm": 0}, "train.max_grad_norm", "> 0"),
    ({"train__betas": [0.9, 1.5]}, "train.betas", "[0, 1)"),
    ({"train__checkpoint_every": 0}, "train.checkpoint_every", ">= 1"),
    ({"train__learning_rat": 1e-3}, "train.learning_rat", "did you mean 'learning_rate'"),
    ({"priority": 5000}, "priority", "<= 1000"),
    ({"colour": "red"}, "colour", "unknown field"),
]


@pytest.mark.parametrize(("changes", "field", "words"), CASES, ids=[c[1] + ":" + c[2][:12] for c in CASES])
def test_each_bad_field_gets_a_specific_error(changes, field, words):
    base = spec_with()
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            base[section][key] = value
        else:
            base[section] = value
    with pytest.raises(SpecError) as info:
        parse_spec(base, source="job.yaml")
    text = str(info.value)
    assert f"job.yaml: {field}: " in text, text
    assert words in text, text


def test_mixlora_top_k_cannot_exceed_experts():
    with pytest.raises(SpecError, match=r"adapter.top_k: must be <= num_experts \(4\) \(got 5\)"):
        parse_spec({**GOOD, "adapter": {"type": "mixlora", "num_experts": 4, "top_k": 5}})


def test_all_errors_are_reported_at_once_with_lines(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: ok\ndata:\n  path: d.jsonl\ntrain:\n  epochs: 0\n  optimizer: adam\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.errors == [
        f"{path}:5: train.epochs: must be >= 1 (got 0)",
        f"{path}:6: train.optimizer: must be one of adamw, sgd (got 'adam')",
    ]


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "broken.yaml")


def test_defaults_and_conversion():
    spec = parse_spec({"name": "j", "data": {"path": "d.jsonl"}, "adapter": {"type": "mixlora", "expert": {"r": 4}}})
    cfg = spec.to_job_config()
    assert cfg.output == "out/j"
    assert cfg.adapter.lora.r == 8 and cfg.adapter.lora.scaling == 2.0
    assert cfg.adapter.mixlora.num_experts == 8 and cfg.adapter.mixlora.top_k == 2
    assert cfg.adapter.mixlora.expert.r == 4 and cfg.adapter.mixlora.expert.alpha == 16
    assert cfg.train.accumulation == 4
    assert cfg.adapter.target_modules == ("all-linear",)  # the model's own names, expanded when the job joins


def test_all_linear_is_accepted_alone_or_in_a_list():
    for value in ("all-linear", ["all-linear"], ["all-linear", "lm_proj"]):
        spec = parse_spec({**GOOD, "adapter": {"target_modules": value}})
        assert "all-linear" in spec.to_job_config().adapter.target_modules
    with pytest.raises(SpecError, match=r"adapter\.target_modules.*not a module name"):
        parse_spec({**GOOD, "adapter": {"target_modules": "all linear"}})


def test_batch_size_errors_are_reported_beside_the_sections_other_errors():
    """The micro-batch checks used to run only once every other train field was valid, so a user fixed
    one error and met the next."""
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(train__batch_size=6, train__micro_batch_size=4, train__learning_rate=-1,
                             adapter__r=0), source="job.yaml")  # fmt: skip
    assert info.value.errors == [
        "job.yaml: adapter.r: must be >= 1 (got 0)",
        "job.yaml: train.batch_size: must be a multiple of micro_batch_size (4) (got 6)",
        "job.yaml: train.learning_rate: must be > 0.0 (got -1)",
    ]
    with pytest.raises(SpecError) as info:  # the default batch_size (16) counts; an invalid one is its own error
        parse_spec(spec_with(train__micro_batch_size=32, train__eps=0), source="job.yaml")
    assert info.value.errors == ["job.yaml: train.micro_batch_size: must be <= batch_size (16) (got 32)",
                                 "job.yaml: train.eps: must be > 0.0 (got 0)"]  # fmt: skip
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(train__batch_size=0, train__micro_batch_size=3), source="job.yaml")
    assert info.value.errors == ["job.yaml: train.batch_size: must be >= 1 (got 0)"]


def test_a_sections_own_check_still_points_into_that_section():
    """eval's "no data source" check names ``data``, which is also a top-level field: it must stay
    ``eval.data`` (the sibling-field rule of the batch-size check moved it to the top level)."""
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(eval={}), source="job.yaml")
    assert info.value.errors == ["job.yaml: eval.data: set eval.data or eval.held_out_fraction > 0"]

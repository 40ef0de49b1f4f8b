"""Admin-facing wording of the policies package: YAML errors naming the file and line, a policy
config's every problem at once (its name included), a custom constructor's own error, the
simulator's refused Start, the trace checker's empty columns and priority range, and cluster
values that were silently accepted."""

from __future__ import annotations

import pytest
import yaml

from orchestrator.cli import main
from policies.builtin import AspenSettings, aspen
from policies.cluster import ClusterError, default_cluster, load_cluster, parse_cluster
from policies.config import PolicyConfigError, load_policy_config, parse_policy_config
from policies.interface import Start
from policies.plugins import FairShareFactor
from policies.simulator import SimulationError, simulate
from policies.trace import TraceError, TraceJob, format_trace, parse_trace

WORKERS = {"workers": [{"count": 1, "gpu_memory_gib": 80, "tflops": 312}]}


# ------------------------------------------------------------------------------------ YAML errors


def test_yaml_errors_name_the_file_and_line_in_one_line(tmp_path):
    bad = tmp_path / "pol.yaml"
    bad.write_text("policy: aspen\nmargin: 0.1\n  bad: [\n")
    with pytest.raises(PolicyConfigError) as err:
        load_policy_config(bad)
    assert str(err.value) == f"{bad}: line 3, column 6: not valid YAML: mapping values are not allowed here"
    cluster = tmp_path / "c.yaml"
    cluster.write_text("workers: [{count: 1\n")
    with pytest.raises(ClusterError) as err:
        load_cluster(cluster)
    assert "<unicode string>" not in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"{cluster}: line 2, column 1: not valid YAML: ")
    dup = tmp_path / "dup.yaml"
    dup.write_text("policy: fifo\nmargin: 0.1\nmargin: 0.2\n")
    with pytest.raises(PolicyConfigError) as err:
        load_policy_config(dup)
    assert str(err.value) == (f"{dup}: line 3, column 1: not valid YAML: key 'margin' given twice (line 2 and "
                              "line 3); keep one")  # fmt: skip


def test_a_job_specs_yaml_error_names_the_file_and_line(tmp_path):
    from orchestrator.spec import SpecError, load_spec

    path = tmp_path / "job.yaml"
    path.write_text("name: x\nbase_model: a\n  bad: [\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert err.value.errors == [f"{path}: line 3, column 6: not valid YAML: mapping values are not allowed here"]


# ------------------------------------------------------------------------------------ policy config


def test_a_policy_name_that_is_not_a_string_says_what_it_got():
    with pytest.raises(PolicyConfigError) as err:
        parse_policy_config({"policy": 5}, "p.yaml")
    assert err.value.errors == ["p.yaml: policy: must be one of fifo, priority, sjf, aspen or 'module:Class' (got 5)"]


def test_a_wrong_policy_name_is_reported_with_every_other_problem():
    with pytest.raises(PolicyConfigError) as err:
        parse_policy_config({"policy": "aspne", "margin": -1, "colour": 1, "quotas": {"bob": 1.5}}, "p.yaml")
    lines = err.value.errors
    assert lines[0] == ("p.yaml: policy: must be one of fifo, priority, sjf, aspen or 'module:Class' (got 'aspne'; "
                        "did you mean 'aspen'?)")  # fmt: skip
    assert lines[1] == "p.yaml: margin: must be a number >= 0 (got -1)"
    assert lines[2].startswith("p.yaml: colour: unknown field (")
    assert lines[3].startswith("p.yaml: quotas.bob: must be an integer") and len(lines) == 4
    with pytest.raises(PolicyConfigError) as err:  # a missing name comes first, then the rest
        parse_policy_config({"margin": -1}, "p.yaml")
    assert [line.split(": ")[1] for line in err.value.errors] == ["policy", "margin"]


def test_a_custom_constructor_that_raises_says_so_with_its_error():
    with pytest.raises(PolicyConfigError) as err:
        parse_policy_config({"policy": "tests.policies.custom_policy:NeedsSetup"}, "p.yaml")
    assert err.value.errors == ["p.yaml: policy: tests.policies.custom_policy:NeedsSetup's constructor raised "
                                "RuntimeError (no options given): set LORAFLEET_POLICY_DB first"]  # fmt: skip
    with pytest.raises(PolicyConfigError) as err:
        parse_policy_config({"policy": "tests.policies.custom_policy:FirstIdle", "options": {"bad": 1}}, "p.yaml")
    assert err.value.errors[0].startswith("p.yaml: options: tests.policies.custom_policy:FirstIdle's constructor "
                                          "raised TypeError with options bad: ")  # fmt: skip


def test_shares_default_is_every_unlisted_owners_share():
    policy = parse_policy_config({"policy": "aspen", "shares": {"default": 0.5, "alice": 2}})
    (fair,) = [f for f, _ in policy.order.factors if isinstance(f, FairShareFactor)]
    assert fair.shares == {"alice": 2} and fair.default_share == 0.5
    (plain,) = [f for f, _ in aspen(AspenSettings()).order.factors if isinstance(f, FairShareFactor)]
    assert plain.default_share == 1.0


# ------------------------------------------------------------------------------------ simulator / trace


class _StartsNothing:
    name = "bad"

    def __init__(self, decision):
        self.decision = decision

    def schedule(self, view):
        return [self.decision]

    def explain(self, view, job_id):
        raise NotImplementedError


def _job(job_id="a", submit=0.0, priority=0):
    return TraceJob(job_id, submit, "alice", "smollm2-135m", "lora", 8, 0, 8, 4, 512, 10, priority)


@pytest.mark.parametrize("decision, detail", [
    (Start("nope", "w000"), "no job 'nope' in the trace"),
    (Start("a", "w9"), "no worker 'w9' (workers: w000)"),
    (Start("b", "w000"), "job b has not arrived yet (submit time 500s)"),
    (Start("nope", "w9"), "no job 'nope' in the trace; no worker 'w9' (workers: w000)"),
])  # fmt: skip
def test_a_refused_start_says_which_part_is_wrong(decision, detail):
    with pytest.raises(SimulationError) as err:
        simulate([_job("a"), _job("b", 500.0)], default_cluster(count=1), _StartsNothing(decision))
    assert str(err.value).startswith(f"bad: {decision}: ") and str(err.value).endswith(f" ({detail})")


def test_the_trace_checker_names_the_empty_columns_and_the_line():
    text = format_trace([_job("a"), _job("b")]).replace("\nb,0.0,alice,smollm2-135m", "\nb,0.0,,")
    with pytest.raises(TraceError) as err:
        parse_trace(text, "t.csv")
    assert str(err.value) == "t.csv:3: owner, base_model: must not be empty"


@pytest.mark.parametrize("priority", ["99999999999999999999999", "-1001", "1001"])
def test_a_trace_priority_out_of_range_is_refused(priority):
    text = format_trace([_job("a")]).rstrip("\n").rsplit(",", 1)[0] + f",{priority}\n"
    with pytest.raises(TraceError) as err:
        parse_trace(text, "t.csv")
    assert str(err.value) == f"t.csv:2: priority: must be an integer in [-1000, 1000] (got {int(priority)})"
    assert parse_trace(format_trace([_job("a", priority=-1000), _job("b", priority=1000)]))


# ------------------------------------------------------------------------------------ cluster values


@pytest.mark.parametrize("extra, message", [
    ({"cost_model": ""}, "c: cost_model: must be a mapping of mfu"),
    ({"models": ""}, "c: models: must be a mapping from model name to its shape (got '')"),
    ({"workers": [{"count": 1, "gpu_memory_gib": 80, "tflops": 312, "device_kind": ["a", "b"]}]},
     "c: workers[0].device_kind: must be a non-empty name such as A100-80GB (got ['a', 'b'])"),
    ({"models": {"m": {"num_parameters": 1, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                       "intermediate_size": 8, "vocab_size": 8, "attn_implementation": "eagr"}}},
     "c: models.m.attn_implementation: must be one of eager, sdpa, flash_attention_2, flash_attention_3, "
     "flex_attention (got 'eagr')"),
])  # fmt: skip
def test_cluster_values_once_accepted_silently_are_refused(extra, message):
    with pytest.raises(ClusterError) as err:
        parse_cluster({**WORKERS, **extra}, "c")
    assert str(err.value).startswith(message)


def test_attn_implementation_case_is_normalised_and_empty_sections_are_the_defaults():
    shape = {"num_parameters": 1, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
             "intermediate_size": 8, "vocab_size": 8, "attn_implementation": " Eager "}  # fmt: skip
    spec = parse_cluster({**WORKERS, "models": {"m": shape}, "cost_model": None}, "c")
    assert spec.models["m"].attn_implementation == "eager" and spec.models["m"].eager_attention
    assert parse_cluster({**WORKERS, "models": None}, "c").models == {}


def test_simulate_refuses_an_empty_policy_entry(tmp_path, capsys):
    trace, cluster = tmp_path / "t.csv", tmp_path / "c.yaml"
    trace.write_text(format_trace([_job()]))
    cluster.write_text(yaml.safe_dump(WORKERS))
    assert main(["simulate", "--trace", str(trace), "--cluster", str(cluster), "--policy", "fifo,,aspen"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("lorafleet simulate: error: --policy: 'fifo,,aspen' has an empty entry (position 2); "
                                 "give comma-separated names with nothing between two commas or at either end\n")  # fmt: skip

"""The bundled example tasks (examples/data) and demo job specs (examples/jobs)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from orchestrator.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DATA = EXAMPLES / "data"
JOBS = sorted((EXAMPLES / "jobs").glob("*.yaml"))
TASKS = ["reverse", "arith", "caps", "fanoutqa", "mix"]
SYNTHETIC = ["reverse", "arith", "caps"]
ALPACA_KEYS = ["instruction", "input", "output"]


def _load_make_data() -> ModuleType:
    spec = importlib.util.spec_from_file_location("examples_make_data", EXAMPLES / "make_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


make_data = _load_make_data()
needs_fanoutqa = pytest.mark.skipif(
    importlib.util.find_spec("fanoutqa") is None, reason="the fanoutqa package (demo extra) is not installed"
)


def _read(name: str) -> list[dict[str, Any]]:
    with open(DATA / name, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _key(rec: dict[str, Any]) -> tuple[str, str]:
    return rec["instruction"], rec["input"]


# ---------------------------------------------------------------- job specs


def test_the_four_demo_jobs_exist() -> None:
    assert [p.name for p in JOBS] == ["arith.yaml", "fanoutqa.yaml", "mix-mixlora.yaml", "reverse.yaml"]


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_job_spec_validates_and_its_data_exists(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.base_model == "builtin:smollm2-135m-instruct"
    assert spec.data.format == "alpaca"
    assert (ROOT / spec.data.path).is_file(), spec.data.path
    assert re.fullmatch(r"examples/data/[a-z]+\.train\.jsonl", spec.data.path)
    assert spec.output_dir() == f"out/{spec.name}"
    assert spec.adapter.type == ("mixlora" if spec.name == "mix-mixlora" else "lora")
    # A short, bounded demo run that still writes a checkpoint before it ends.
    assert spec.train.max_steps is not None and spec.train.max_steps <= 50
    assert spec.train.checkpoint_every < spec.train.max_steps
    # Held-out evaluation on the task's own test split.
    assert spec.eval is not None and spec.eval.data == spec.data.path.replace(".train.", ".test.")
    assert (ROOT / spec.eval.data).is_file()
    assert path.read_text(encoding="utf-8").startswith("#"), "each job has a comment header"
    spec.to_job_config()  # the engine's view builds too


# ---------------------------------------------------------------- generator


@needs_fanoutqa
def test_generator_is_deterministic_and_matches_committed_files(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    counts = make_data.main(out_dir=first)
    assert make_data.main(out_dir=second) == counts
    names = sorted(counts)
    assert sorted(p.name for p in first.iterdir()) == names
    for name in names:
        generated = (first / name).read_bytes()
        assert generated == (second / name).read_bytes(), name
        assert generated == (DATA / name).read_bytes(), f"{name} is stale: rerun examples/make_data.py"
    assert sorted(p.name for p in DATA.glob("*.jsonl")) == names


def test_files_are_small_alpaca_records() -> None:
    for task in TASKS:
        for split in ("train", "test"):
            path = DATA / f"{task}.{split}.jsonl"
            assert path.stat().st_size < 300_000, path
            records = _read(path.name)
            assert records, path
            for rec in records:
                assert list(rec) == ALPACA_KEYS, rec
                assert all(isinstance(rec[k], str) for k in ALPACA_KEYS), rec
                assert rec["instruction"] and rec["output"], rec
            assert len({_key(r) for r in records}) == len(records), f"{path.name} has duplicates"


def test_sizes() -> None:
    for task in SYNTHETIC:
        assert 400 <= len(_read(f"{task}.train.jsonl")) <= 800
        assert len(_read(f"{task}.test.jsonl")) == 100
    train, test = _read("fanoutqa.train.jsonl"), _read("fanoutqa.test.jsonl")
    assert len(test) >= 100
    assert 0.15 <= len(test) / (len(train) + len(test)) <= 0.25


@pytest.mark.parametrize("task", TASKS)
def test_train_and_test_are_disjoint(task: str) -> None:
    train = {_key(r) for r in _read(f"{task}.train.jsonl")}
    test = {_key(r) for r in _read(f"{task}.test.jsonl")}
    assert not train & test
    if task in SYNTHETIC:  # same instruction everywhere: the inputs themselves never repeat
        assert not {i for _, i in train} & {i for _, i in test}
    if task == "fanoutqa":
        assert not {q for q, _ in train} & {q for q, _ in test}


def test_mix_draws_from_the_task_splits() -> None:
    for split in ("train", "test"):
        mix = _read(f"mix.{split}.jsonl")
        by_task = {t: {json.dumps(r) for r in _read(f"{t}.{split}.jsonl")} for t in TASKS if t != "mix"}
        counts = dict.fromkeys(by_task, 0)
        for rec in mix:
            owners = [t for t, recs in by_task.items() if json.dumps(rec) in recs]
            assert len(owners) == 1, rec
            counts[owners[0]] += 1
        assert len(set(counts.values())) == 1 and min(counts.values()) > 0, counts
        head = {t for rec in mix[:20] for t, recs in by_task.items() if json.dumps(rec) in recs}
        assert len(head) > 1, "the mix is shuffled, not task after task"


# ---------------------------------------------------------------- answers


@pytest.mark.parametrize("split", ["train", "test"])
def test_synthetic_answers_are_correct(split: str) -> None:
    vocab = set(make_data.VOCAB)
    for rec in _read(f"reverse.{split}.jsonl"):
        words = rec["input"].split()
        assert 3 <= len(words) <= 6 and set(words) <= vocab, rec
        assert rec["output"] == " ".join(words[::-1]), rec
        assert rec["instruction"] == "Reverse the order of the words."
    for rec in _read(f"arith.{split}.jsonl"):
        m = re.fullmatch(r"(0|[1-9]\d{0,2}) \+ (0|[1-9]\d{0,2})", rec["input"])
        assert m, rec
        assert rec["output"] == str(int(m[1]) + int(m[2])), rec
    for rec in _read(f"caps.{split}.jsonl"):
        assert set(rec["input"].split()) <= vocab, rec
        assert rec["output"] == rec["input"].upper() and rec["output"].isupper(), rec


def test_fanoutqa_answers_are_short() -> None:
    for split in ("train", "test"):
        for rec in _read(f"fanoutqa.{split}.jsonl"):
            assert rec["input"] == ""
            assert 0 < len(rec["output"]) <= 40 and rec["output"] == rec["output"].strip(), rec


def test_arith_multiple_choice() -> None:
    mc = _read("arith_mc.test.jsonl")
    test = _read("arith.test.jsonl")
    assert len(mc) == len(test) == 100
    positions = set()
    for item, rec in zip(mc, test, strict=True):
        assert list(item) == ["question", "choices", "answer"]
        assert item["question"] == f"What is {rec['input']}?"
        choices = item["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4 and all(isinstance(c, str) for c in choices)
        assert choices[item["answer"]] == rec["output"]
        right = int(rec["output"])
        for i, c in enumerate(choices):
            if i != item["answer"]:
                assert int(c) >= 0 and 0 < abs(int(c) - right) <= 100, item
        positions.add(item["answer"])
    assert positions == {0, 1, 2, 3}


def test_the_example_custom_policy_runs_by_import_path_and_from_yaml(tmp_path, monkeypatch, capsys):
    """examples/custom_policy.py, as its docstring says to run it: by import path with the examples
    folder on the path, and from a policy YAML with options; every job finishes, explain works."""
    from orchestrator.cli import main
    from policies.cluster import load_cluster
    from policies.config import PolicyConfigError, parse_policy_config, resolve_policy
    from policies.simulator import Simulator
    from policies.trace import read_trace

    monkeypatch.syspath_prepend(str(EXAMPLES))
    assert main(["simulate", "--trace", "examples/trace.csv", "--cluster", "examples/cluster.yaml", "--json",
                 "--policy", "fifo,custom_policy:SmallestFirst"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["policy"] for r in rows] == ["fifo", "smallest-first"] and rows[1]["jobs"] == 200
    assert rows[1]["oom_count"] == 0 and rows[1]["mean_jct_s"] < rows[0]["mean_jct_s"]  # shortest first
    fused = parse_policy_config({"policy": "custom_policy:SmallestFirst", "options": {"max_jobs": 2}})
    sim = Simulator(read_trace(EXAMPLES / "trace.csv"), load_cluster(EXAMPLES / "cluster.yaml"), fused)
    result = sim.run()
    assert len(result.jobs) == 200 and result.oom_count == 0
    trace = read_trace(EXAMPLES / "trace.csv")[:12]
    sim = Simulator(trace, load_cluster(EXAMPLES / "cluster.yaml"), resolve_policy("custom_policy:SmallestFirst"))
    sim.queued = {j: sim.jobs[j] for j in list(sim.jobs)}
    text = sim.policy.explain(sim.view(), trace[0].job_id).format()
    assert text.startswith(f"job {trace[0].job_id} under smallest-first: queue position ")
    with pytest.raises(PolicyConfigError, match=r"max_jobs: must be an integer >= 1 \(got 0\)"):
        parse_policy_config({"policy": "custom_policy:SmallestFirst", "options": {"max_jobs": 0}})

"""``make quality``'s pieces that run without training: the job specs it writes and the report arithmetic."""

import json

from orchestrator import quality
from orchestrator.spec import parse_spec


def test_job_specs_are_valid_and_budget_matched(tmp_path):
    specs = quality.job_specs(tmp_path, steps=30, batch=4, lr=1e-3)
    assert sorted(specs) == sorted(f"{t}-{k}" for t in [*quality.TASKS, "multi"] for k in ("lora", "mixlora"))
    for name, data in specs.items():
        spec = parse_spec(data, source=name)  # the same validation as `lorafleet train`
        rows = 12 if name.startswith("multi") else 4  # 3 tasks x 4: the same examples per task
        assert spec.train.batch_size == rows and spec.train.max_steps == 30
        assert spec.adapter.type == name.rsplit("-", 1)[1]
    mix = [json.loads(line) for line in (tmp_path / "data" / "mix3.train.jsonl").read_text().splitlines()]
    sizes = {t: len((quality.DATA / f"{t}.train.jsonl").read_text().splitlines()) for t in quality.TASKS}
    assert len(mix) == sum(sizes.values())  # every train record of the three tasks, none of the tests
    tests = {json.dumps(r, sort_keys=True) for t in quality.TASKS
             for r in map(json.loads, (quality.DATA / f"{t}.test.jsonl").read_text().splitlines())}  # fmt: skip
    assert not tests & {json.dumps(r, sort_keys=True) for r in mix}


def _results(em: dict[str, dict[str, float]]) -> dict:
    tasks = {t: {"examples": 10, "exact_match": v, "loss": dict.fromkeys(v, 1.0)} for t, v in em.items()}
    cols = next(iter(em.values()))
    return {"tasks": tasks, "average": {c: sum(v[c] for v in em.values()) / len(em) for c in cols}}


def test_report_verdicts_follow_the_numbers():
    cols = ["base", "lora/single", "mixlora/single", "lora/multi", "mixlora/multi"]
    em = {
        "reverse": dict(zip(cols, [0.0, 0.9, 0.8, 0.31, 0.5], strict=True)),  # every gain >= 30 points
        "arith": dict(zip(cols, [0.1, 0.5, 0.6, 0.39, 0.7], strict=True)),  # lora/multi: +29 points
        "fanoutqa": dict(zip(cols, [0.0, 0.1, 0.1, 0.1, 0.0], strict=True)),  # real text: no 30-point rule
    }
    text = quality.report_markdown(_results(em), {"steps": 1})
    assert "reverse: every adapter beats the base model by >= 30 points: **yes**" in text
    assert "arith: every adapter beats the base model by >= 30 points: **NO**" in text
    assert "lora/multi +29.0" in text
    assert "fanoutqa: every" not in text
    # multi-task average: MixLoRA (0.5 + 0.7 + 0.0) / 3 = 40.0, LoRA (0.31 + 0.39 + 0.1) / 3 = 26.7
    assert "MixLoRA beats LoRA on average exact match (40.0 vs 26.7, +13.3 points)" in text
    assert "| arith (n=10) | 10.0 | 50.0 | 60.0 | 39.0 | 70.0 |" in text


def test_plot_writes_a_png(tmp_path):
    cols = ["base", "lora/single", "mixlora/single", "lora/multi", "mixlora/multi"]
    em = {t: dict.fromkeys(cols, 0.5) for t in quality.TASKS}
    path = quality.plot(_results(em), tmp_path / "q.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

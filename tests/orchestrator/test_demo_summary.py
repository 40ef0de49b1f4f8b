"""The demo's summary reads each job's stored held-out evaluation (``extra.eval``)."""

from orchestrator.demo import before_after, spec_paths


def test_before_after_formats_stored_eval():
    record = {"extra": {"eval": {"examples": 24, "metrics": {
        "loss": {"base": 3.9561, "adapter": 1.3662, "tokens": 300}, "exact_match": {"base": 0.0, "adapter": 0.625}}}}}
    assert before_after(record, "loss") == "3.956 -> 1.366"
    assert before_after(record, "exact_match", "{:.0%}") == "0% -> 62%"
    assert before_after(record, "multiple_choice") == "-"
    assert before_after({"extra": {"eval": {"error": "evaluation failed: x"}}}, "loss") == "-"
    assert before_after({}, "loss") == "-"


def test_demo_specs_exist_and_evaluate_after_training():
    from orchestrator.spec import load_spec

    for path in spec_paths():
        spec = load_spec(path)
        assert spec.eval is not None and "exact_match" in spec.eval.metrics, path

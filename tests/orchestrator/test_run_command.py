"""``lorafleet run`` (inside ``ray job submit``) ends with the job's evaluation, as ``submit --wait`` does."""

from __future__ import annotations

import argparse

import pytest

from orchestrator import agent, client
from orchestrator.commands import run as run_command
from orchestrator.progress import eval_summary


def follow(monkeypatch, tmp_path, final: dict) -> int:
    """Run ``lorafleet run spec.yaml`` against a controller whose job goes RUNNING, then ``final``."""
    answers = [{"id": "lf-1", "name": "rj-a", "state": "RUNNING", "step": 1, "total_steps": 2}, final]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(client, "connect", lambda address: None)
    monkeypatch.setattr(agent, "register", lambda owner, specs, api_key: [{"id": "lf-1", "name": "rj-a"}])
    monkeypatch.setattr(client, "call", lambda method, *a, **k: answers.pop(0) if method == "status" else None)
    monkeypatch.setattr(run_command.signal, "signal", lambda *a: None)
    args = argparse.Namespace(spec="spec.yaml", owner="me", poll=0.0, api_key_file=None)
    return run_command.run(args)


def finished(**extra) -> dict:
    return {"id": "lf-1", "name": "rj-a", "state": "SUCCEEDED", "step": 2, "total_steps": 2, "loss": 0.5,
            "tokens_per_s": 10.0, "output": "/storage/lf-1", "extra": extra}  # fmt: skip


def test_run_prints_the_evaluation_as_submit_wait_does(monkeypatch, tmp_path, capsys):
    evaluation = {"examples": 24, "metrics": {"exact_match": {"base": 0.0, "adapter": 0.12},
                                              "loss": {"base": 3.17, "adapter": 0.9, "tokens": 300}}}  # fmt: skip
    assert follow(monkeypatch, tmp_path, finished(eval=evaluation)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == ["[rj-a] adapter: /storage/lf-1", f"[rj-a] eval: {eval_summary(evaluation)}"]
    assert out[-1] == "[rj-a] eval: EM 0.00->0.12 loss 3.17->0.90"


@pytest.mark.parametrize("extra", [{}, {"eval": {"error": "evaluation failed: eval.data: record 0: no text"}}],
                         ids=["no-eval", "eval-failed"])  # fmt: skip
def test_run_without_an_evaluation_or_with_a_failed_one(monkeypatch, tmp_path, capsys, extra):
    assert follow(monkeypatch, tmp_path, finished(**extra)) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    if extra:
        assert last == "[rj-a] eval: evaluation failed: eval.data: record 0: no text"
    else:
        assert last == "[rj-a] adapter: /storage/lf-1"

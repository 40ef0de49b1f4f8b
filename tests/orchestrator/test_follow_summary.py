"""``lorafleet submit --wait``'s closing summary shows each job's held-out evaluation from the job store."""

from __future__ import annotations

from orchestrator.commands import jobs


class StoreClient:
    """Answers ``status`` as the controller does for finished jobs (records with ``extra.eval``)."""

    def __init__(self, records: dict[str, dict]):
        self.records = records

    def status(self, job_id: str) -> dict:
        return self.records[job_id]


def record(job_id: str, name: str, evaluation: dict | None) -> dict:
    return {"id": job_id, "name": name, "state": "SUCCEEDED", "step": 25, "total_steps": 25, "loss": 0.5,
            "tokens_per_s": 12.0, "output": f"/storage/{job_id}", "extra": {"eval": evaluation} if evaluation else {}}


def test_summary_shows_the_stored_eval(capsys):
    evaluation = {"examples": 24, "metrics": {"exact_match": {"base": 0.0, "adapter": 0.33},
                                              "loss": {"base": 3.17, "adapter": 0.9, "tokens": 300}}}  # fmt: skip
    client = StoreClient({"j1": record("j1", "arith", evaluation), "j2": record("j2", "plain", None)})
    assert jobs.follow(client, ["j1", "j2"], poll_s=0.0) == 0
    err = capsys.readouterr().err
    rows = [line for line in err.splitlines() if "│" in line]  # the summary table
    row = next(line for line in rows if "arith" in line)
    assert "EM 0.00->0.33" in row and "loss 3.17->0.90" in row
    plain = next(line for line in rows if "plain" in line)
    assert "EM" not in plain


class ListClient:
    """Answers ``list`` as the controller does: newest first, at most ``limit``."""

    def __init__(self, n: int):
        self.records = [record(f"j{i}", f"job{i}", None) for i in range(n, 0, -1)]
        self.limits: list = []

    def list(self, limit=None):
        self.limits.append(limit)
        return self.records[:limit] if limit else list(self.records)


def test_list_and_status_show_the_newest_jobs_by_default(capsys):
    """The store keeps every job; listing 10^4 took ~1 s and 10^5 ~10 s through the controller's lock."""
    import argparse

    client = ListClient(150)
    assert jobs.do_list(client, argparse.Namespace(json=True, limit=jobs.LIST_LIMIT)) == 0
    out, err = capsys.readouterr()
    import json

    shown = json.loads(out)
    assert len(shown) == 100 and shown[0]["id"] == "j150" and client.limits == [101]
    assert err == "(the newest 100 jobs; --limit 0 lists all)\n"
    assert jobs.do_status(client, argparse.Namespace(job=None, json=True, limit=0)) == 0
    assert len(json.loads(capsys.readouterr().out)) == 150 and client.limits[-1] is None

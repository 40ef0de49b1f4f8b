"""``lorafleet fetch`` never mixes two adapters in one directory, nor overwrites files it did not write."""

from __future__ import annotations

import base64
import json

import pytest

from orchestrator.commands.jobs import load_hint
from orchestrator.remote import FETCH_MARKER, Client, RemoteError


def fake_client(results: dict[str, dict]) -> Client:
    """A Client whose agent answers ``fetch JOB`` from ``results`` (no cluster)."""
    client = object.__new__(Client)
    client.owner = None
    client.api_key = None
    client._agent = lambda args, **kw: results[args[-1]]  # type: ignore[method-assign]
    return client


def adapter(job_id: str, name: str, peft_type: str = "LORA", evaluated: bool = False) -> dict:
    files = {"adapter_config.json": json.dumps({"peft_type": peft_type, "r": 4}),
             "adapter_model.safetensors": f"weights of {job_id}", "job.json": json.dumps({"name": name})}  # fmt: skip
    if evaluated:
        files["eval.json"] = json.dumps({"job": job_id})
    return {"id": job_id, "name": name, "source": f"/storage/jobs/{job_id}",
            "files": {k: base64.b64encode(v.encode()).decode() for k, v in files.items()}}


def test_fetch_refuses_another_jobs_adapter_and_foreign_files_unless_replace(tmp_path):
    client = fake_client({"lf-1": adapter("lf-1", "a", evaluated=True), "lf-2": adapter("lf-2", "a", "MIXLORA"),
                          "a": adapter("lf-2", "a", "MIXLORA")})  # fmt: skip
    dest = tmp_path / "adapters" / "a"
    assert client.fetch("lf-1", dest) == dest
    assert (dest / "adapter_model.safetensors").read_text() == "weights of lf-1"
    assert json.loads((dest / FETCH_MARKER).read_text())["id"] == "lf-1"
    (dest / "NOTES.txt").write_text("mine")
    client.fetch("lf-1", dest)  # the same job again: refreshed in place, the user's file stays
    assert (dest / "NOTES.txt").read_text() == "mine"
    # "a" now names a newer job: refused, nothing written
    with pytest.raises(RemoteError, match=r"already holds the adapter of job lf-1 \(a\), not lf-2 \(a\); "
                                          r"nothing was written.*--replace"):  # fmt: skip
        client.fetch("a", dest)
    assert (dest / "adapter_model.safetensors").read_text() == "weights of lf-1"
    assert client.fetch("a", dest, replace=True) == dest
    assert (dest / "adapter_model.safetensors").read_text() == "weights of lf-2"
    assert not (dest / "eval.json").exists()  # the other job's evaluation did not come along
    (previous,) = [p for p in dest.parent.iterdir() if p.name.startswith("a.previous-")]
    assert (previous / "eval.json").exists() and (previous / "NOTES.txt").read_text() == "mine"
    assert sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(".")) == []  # no temp left
    assert load_hint(dest).startswith("MixLoRA: lorafleet eval") and "peft" not in load_hint(dest)
    assert load_hint(previous).startswith("load with peft.PeftModel.from_pretrained")
    # a directory of other files is refused before anything is downloaded
    other = tmp_path / "mine"
    other.mkdir()
    (other / "data.jsonl").write_text("{}")
    client._agent = lambda *a, **k: pytest.fail("downloaded")  # type: ignore[method-assign]
    with pytest.raises(RemoteError, match="already holds files lorafleet did not fetch"):
        client.fetch("lf-1", other)
    empty = tmp_path / "empty"
    empty.mkdir()
    client._agent = lambda args, **kw: adapter("lf-1", "a")  # type: ignore[method-assign]
    assert (client.fetch("lf-1", empty) / "job.json").exists()


def test_fetch_keeps_the_umask_mode_renames_twice_a_second_and_names_an_unmarked_adapter(tmp_path):
    """The review: the fetched folder came out 0700 (mkdtemp), a second --replace within one second
    failed with a raw OSError, and a folder fetched before fetches were marked read as foreign files."""
    import os

    client = fake_client({"lf-1": adapter("lf-1", "a"), "lf-2": adapter("lf-2", "b")})
    old = os.umask(0o022)
    try:
        dest = client.fetch("lf-1", tmp_path / "a")
        assert dest.stat().st_mode & 0o777 == 0o755
        for job in ("lf-2", "lf-1", "lf-2"):  # three moves aside within a second or two
            client.fetch(job, dest, replace=True)
    finally:
        os.umask(old)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("a.previous-")]) == 3
    (dest / FETCH_MARKER).unlink()  # as lorafleet before the marker left it
    with pytest.raises(RemoteError, match=r"already holds an adapter fetched before lorafleet marked its "
                                          r"fetches \(job b\); nothing was written"):  # fmt: skip
        client.fetch("lf-2", dest)

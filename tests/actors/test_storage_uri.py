"""URI storage roots (``file://``, the same pyarrow code path as ``s3://``): single-file upload and
download, and a worker that stages a job's URI inputs (``data.path``, ``eval.data``,
``adapter.init_from``) into a local folder before its engine reads them. Real files, no Ray."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from actors.checkpoint import read_adapter
from actors.config import EvalSettings
from actors.storage import download_file, job_output, sync_up, upload_file
from actors.worker import TrainingWorker
from tests.actors.test_worker import job_config, wait_events
from tests.conftest import token_records, write_jsonl


def test_upload_file_and_download_file_roundtrip(tmp_path: Path):
    src = write_jsonl(tmp_path / "d.jsonl", token_records(3, 0, 4, 6))
    uri = f"file://{tmp_path}/remote/uploads/alice/u1/data-d.jsonl"
    upload_file(src, uri)
    target = tmp_path / "remote/uploads/alice/u1/data-d.jsonl"
    assert target.is_file() and target.read_bytes() == src.read_bytes()
    assert [p.name for p in target.parent.iterdir()] == ["data-d.jsonl"]  # no temporary file left
    back = download_file(uri, tmp_path / "back" / "d.jsonl")
    assert back.read_bytes() == src.read_bytes()
    with pytest.raises(FileNotFoundError, match=r"u1: a directory"):
        download_file(f"file://{tmp_path}/remote/uploads/alice/u1", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl: no such file"):
        download_file(f"file://{tmp_path}/remote/nope.jsonl", tmp_path / "y")
    with pytest.raises(FileNotFoundError, match="not a file"):
        upload_file(tmp_path / "missing.jsonl", uri)


def test_sync_up_of_a_single_file_uploads_that_file(tmp_path: Path):
    """The agent staged a laptop's data file with ``sync_up``, which walked it as a directory:
    ``[Errno 20] Not a directory``, and left a directory named after the file."""
    src = write_jsonl(tmp_path / "d.jsonl", token_records(2, 0, 4, 6))
    sync_up(src, f"file://{tmp_path}/remote/f/data-d.jsonl")
    assert (tmp_path / "remote/f/data-d.jsonl").read_bytes() == src.read_bytes()


@pytest.fixture
def staged_worker(tiny_model_dir, tmp_path):
    w = TrainingWorker("w-uri", str(tiny_model_dir), device="cpu", profile="off", staging_dir=str(tmp_path / "staging"))
    yield w
    w.shutdown(checkpoint=False)


def test_worker_stages_uri_data_eval_and_init_from(staged_worker: TrainingWorker, tmp_path: Path):
    """Object-store storage: data, eval data and the init_from adapter are URIs; the worker downloads
    them into ``<staging>/.inputs/<worker>/<job>`` and trains from the copies; the output stays remote."""
    w = staged_worker
    src = job_config(tmp_path, "src", steps=2, seed=5)
    w.assign("src", replace(src, base_model=w.base_model))
    wait_events(w, {"src": "finished"})

    remote = tmp_path / "remote"
    up = f"file://{remote}/uploads/alice/u1"
    upload_file(write_jsonl(tmp_path / "train.jsonl", token_records(16, 1, 6, 12)), f"{up}/data-train.jsonl")
    upload_file(write_jsonl(tmp_path / "held.jsonl", token_records(4, 2, 6, 12)), f"{up}/eval-held.jsonl")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        upload_file(Path(src.output) / name, f"{up}/init_from/{name}")
    cfg = job_config(tmp_path, "j", steps=3, output=tmp_path / "staging" / "j")
    cfg = replace(cfg, base_model=w.base_model, data=replace(cfg.data, path=f"{up}/data-train.jsonl"),
                  adapter=replace(cfg.adapter, init_from=f"{up}/init_from"),
                  eval=EvalSettings(data=f"{up}/eval-held.jsonl", metrics=("loss",)))  # fmt: skip
    out_uri = job_output(f"file://{remote}", "j")
    w.assign("j", cfg, out_uri)
    ev = wait_events(w, {"j": "finished"})["j"]
    assert ev["output"] == out_uri
    assert "error" not in ev["eval"] and ev["eval"]["examples"] == 4
    state, _ = read_adapter(remote / "jobs" / "j")
    assert state
    assert json.loads((remote / "jobs" / "j" / "eval.json").read_text())["examples"] == 4
    # the engine read the copies (it cannot read a URI); they are gone once the job has left (after its eval)
    inputs = tmp_path / "staging" / ".inputs" / "w-uri"
    assert not (inputs / "j").exists() and list(inputs.iterdir()) == []
    assert not (remote / "jobs" / "j" / "data").exists()  # inputs are not uploaded with the output

    # copies left by a worker that died are cleared at the next join
    leftover = inputs / "dead" / "data"
    leftover.mkdir(parents=True)
    (leftover / "x.jsonl").write_text("{}\n")
    w.assign("k", replace(job_config(tmp_path, "k", steps=1, output=tmp_path / "staging" / "k"),
                          base_model=w.base_model), None)  # fmt: skip
    wait_events(w, {"k": "finished"})
    assert not (inputs / "dead").exists()


@pytest.mark.parametrize(
    ("field", "words"),
    [("data", "data.path: file not found: file://{remote}/uploads/alice/u1/none.jsonl"),
     ("init_from", "adapter.init_from: file://{remote}/uploads/alice/u1/init_from: no adapter_config.json"),
     ("eval", "eval.data: file not found: file://{remote}/uploads/alice/u1/none.jsonl")],
)  # fmt: skip
def test_a_missing_uri_input_fails_its_job_by_field(staged_worker: TrainingWorker, tmp_path: Path, field: str,
                                                    words: str):  # fmt: skip
    remote = tmp_path / "remote"
    up = f"file://{remote}/uploads/alice/u1"
    upload_file(write_jsonl(tmp_path / "train.jsonl", token_records(8, 1, 6, 12)), f"{up}/data-train.jsonl")
    cfg = replace(job_config(tmp_path, "m", steps=1), base_model=staged_worker.base_model)
    missing = f"{up}/none.jsonl"
    if field == "data":
        cfg = replace(cfg, data=replace(cfg.data, path=missing))
    elif field == "eval":
        cfg = replace(cfg, data=replace(cfg.data, path=f"{up}/data-train.jsonl"),
                      eval=EvalSettings(data=missing, metrics=("loss",)))  # fmt: skip
    else:
        cfg = replace(cfg, adapter=replace(cfg.adapter, init_from=f"{up}/init_from"))
    staged_worker.assign("m", cfg, None)
    ev = wait_events(staged_worker, {"m": "failed"})["m"]
    assert ev["message"] == words.format(remote=remote)
    assert not (tmp_path / "staging" / ".inputs" / "w-uri" / "m").exists()  # what it had staged is gone

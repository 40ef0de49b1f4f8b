"""``s3://`` storage roots against a real S3 API: moto's server on 127.0.0.1 (the ``test`` extra
installs ``moto[server]``). Object stores cannot rename a directory, so checkpoints are written in
place with their marker last (``actors.storage``); ``file://`` tests do not see that difference.
Real files and a real worker, no Ray."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from actors.checkpoint import read_adapter
from actors.storage import (
    CHECKPOINT_MARKER,
    delete_tree,
    download_file,
    job_output,
    read_tail,
    sync_down,
    sync_up,
    upload_file,
)
from tests.actors.test_worker import job_config, preempt_after, wait_events
from tests.conftest import token_records, write_jsonl

BUCKET = "lorafleet-test"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``s3://lorafleet-test``: a bucket on a moto server bound to loopback, for this module."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if server is None:
        pytest.skip("moto_server not installed: pip install -e '.[test]' installs moto[server]")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("moto") / "server.log").open("w")
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(f"{url}/{BUCKET}", method="PUT"), timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start on {url}") from None
                time.sleep(0.3)
        os.environ.update({**AWS_ENV, "AWS_ENDPOINT_URL": url})
        yield f"s3://{BUCKET}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _remote_files(s3_root: str, prefix: str) -> dict[str, int]:
    """Every object under ``prefix`` of the bucket -> its size."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(f"{s3_root}/{prefix}")
    infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path.removeprefix(root + "/"): i.size for i in infos if i.type == fs.FileType.File}


def test_single_files_tails_and_deletes_on_s3(s3_root: str, tmp_path: Path):
    src = write_jsonl(tmp_path / "d.jsonl", token_records(40, 0, 4, 6))
    uri = f"{s3_root}/uploads/alice/u1/data-d.jsonl"
    upload_file(src, uri)
    assert _remote_files(s3_root, "uploads/alice/u1") == {"data-d.jsonl": src.stat().st_size}
    assert download_file(uri, tmp_path / "back" / "d.jsonl").read_bytes() == src.read_bytes()
    with pytest.raises(FileNotFoundError, match=r"u1: a directory"):
        download_file(f"{s3_root}/uploads/alice/u1", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl: no such file"):
        download_file(f"{s3_root}/uploads/nope.jsonl", tmp_path / "y")
    data = src.read_bytes()
    assert read_tail(uri, 100) == (data[-100:], len(data) - 100)  # a ranged read
    assert read_tail(uri, 10**9) == (data, 0)
    assert delete_tree(f"{s3_root}/uploads/alice") is True
    assert _remote_files(s3_root, "uploads/alice") == {}
    assert delete_tree(f"{s3_root}/uploads/alice") is False


def _checkpoint(local: Path, step: int) -> Path:
    d = local / "checkpoints" / f"step-{step:06d}"
    d.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "state.pt", CHECKPOINT_MARKER):
        (d / name).write_bytes(f"{name}@{step}".encode())
    return d


def test_checkpoints_upload_in_place_and_an_interrupted_one_is_completed(s3_root: str, tmp_path: Path):
    """The directory rename the local path relies on does not exist on S3 (it failed with NO_SUCH_KEY
    at the first checkpoint): files go in place, the marker last; a checkpoint left without its marker
    by an interrupted upload is uploaded again; pruned ones are deleted."""
    local = tmp_path / "job"
    for step in (2, 4):
        _checkpoint(local, step)
    (local / "metrics.jsonl").write_text('{"step": 4}\n')
    uri = job_output(s3_root, "lf-ckpt")
    sync_up(local, uri)
    files = _remote_files(s3_root, "jobs/lf-ckpt")
    assert {k for k in files if k.startswith("checkpoints/")} == {
        f"checkpoints/step-{s:06d}/{n}" for s in (2, 4)
        for n in ("adapter_model.safetensors", "optimizer.pt", "state.pt", CHECKPOINT_MARKER)}  # fmt: skip
    assert "metrics.jsonl" in files and not any(".tmp" in k for k in files)

    # an upload of step 6 that stopped before its marker: the next sync_up completes it
    six = _checkpoint(local, 6)
    upload_file(six / "optimizer.pt", f"{uri}/checkpoints/step-000006/optimizer.pt")
    (six / "optimizer.pt").write_bytes(b"the whole file")
    shutil.rmtree(local / "checkpoints" / "step-000002")  # pruned locally (keep_checkpoints)
    sync_up(local, uri)
    back = tmp_path / "back"
    assert sync_down(uri, back)
    assert sorted(p.name for p in (back / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    for d in (local / "checkpoints").iterdir():
        for f in d.iterdir():
            assert (back / "checkpoints" / d.name / f.name).read_bytes() == f.read_bytes()
    assert not sync_down(job_output(s3_root, "lf-none"), tmp_path / "none")


@pytest.fixture
def worker(tiny_model_dir, tmp_path):
    from actors.worker import TrainingWorker

    w = TrainingWorker("w-s3", str(tiny_model_dir), device="cpu", profile="off", staging_dir=str(tmp_path / "staging"))
    yield w
    w.shutdown(checkpoint=False)


def test_a_job_on_s3_reads_its_data_from_s3_and_resumes_on_a_clean_node(s3_root: str, worker, tmp_path: Path):
    """The worker stages the job's data from S3, trains in a local folder, uploads each checkpoint;
    preempted, the job joins again from an empty folder (another node) at its checkpoint and its
    adapter lands on S3, where PEFT-format files load."""
    data_uri = f"{s3_root}/uploads/alice/u2/data-train.jsonl"
    upload_file(write_jsonl(tmp_path / "train.jsonl", token_records(32, 1, 6, 12)), data_uri)
    uri = job_output(s3_root, "lf-r")
    cfg = job_config(tmp_path, "r", steps=40, checkpoint_every=2, output=tmp_path / "stage1" / "r")  # room to preempt
    cfg = replace(cfg, base_model=worker.base_model, data=replace(cfg.data, path=data_uri))
    worker.assign("r", cfg, uri)
    step = preempt_after(worker, "r", 3)["r"]["checkpoint_step"]
    assert f"checkpoints/step-{step:06d}/{CHECKPOINT_MARKER}" in _remote_files(s3_root, "jobs/lf-r")
    worker.assign("r", replace(cfg, output=str(tmp_path / "stage2" / "r")), uri)  # an empty staging folder
    assert wait_events(worker, {"r": "joined"})["r"]["step"] == step
    assert wait_events(worker, {"r": "finished"})["r"]["output"] == uri
    assert sync_down(uri, tmp_path / "fetched")
    state, config = read_adapter(tmp_path / "fetched")
    assert state and config["peft_type"] == "LORA"
    assert "metrics.jsonl" in _remote_files(s3_root, "jobs/lf-r")

"""What a laptop uploads with a spec, end to end without Ray: ``Client._stage`` (the laptop) writes the
upload directory, ``agent.register`` (the cluster side, here answered by an in-process controller)
stages it into the owner's upload area, the controller admits it, and a worker trains from what was
stored. Covers ``adapter.init_from`` directories and object-store (``file://``) storage roots."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from actors.storage import job_output
from actors.worker import TrainingWorker
from orchestrator import agent
from orchestrator.controller import Controller, effective_spec
from orchestrator.paths import PathError
from orchestrator.remote import Client, RemoteError
from tests.actors.test_worker import job_config, wait_events
from tests.conftest import token_records, write_jsonl

ADAPTER = ["adapter_config.json", "adapter_model.safetensors"]


def controller(tmp_path: Path, storage: str, monkeypatch: pytest.MonkeyPatch) -> Controller:
    """A controller without Ray that answers the agent's ``orchestrator.client.call``."""
    import orchestrator.client

    ctl = Controller(str(tmp_path / "store" / "jobs.db"), storage, {"policy": "fifo"}, start_loop=False, num_gpus=0)
    monkeypatch.setattr(orchestrator.client, "call",
                        lambda method, *a, timeout=60.0, **kw: getattr(ctl, method)(*a, **kw))  # fmt: skip
    return ctl


@pytest.fixture
def worker(tiny_model_dir, tmp_path):
    w = TrainingWorker("w-up", str(tiny_model_dir), device="cpu", profile="off", staging_dir=str(tmp_path / "staging"))
    yield w
    w.shutdown(checkpoint=False)


@pytest.fixture
def laptop(tmp_path: Path, worker: TrainingWorker, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A laptop folder (the current directory) with data, held-out data, and ``adapters/src``: an
    adapter as ``lorafleet fetch`` writes it (adapter files plus job.json and metrics.jsonl)."""
    home = tmp_path / "laptop"
    src = job_config(tmp_path, "src", steps=2, seed=5, output=home / "adapters" / "src")
    worker.assign("src", replace(src, base_model=worker.base_model))
    wait_events(worker, {"src": "finished"})
    assert {"job.json", "metrics.jsonl", *ADAPTER} <= {p.name for p in (home / "adapters" / "src").iterdir()}
    write_jsonl(home / "d.jsonl", token_records(16, 1, 6, 12))
    write_jsonl(home / "held.jsonl", token_records(4, 2, 6, 12))
    monkeypatch.chdir(home)
    return home


def write_spec(home: Path, name: str, base_model: str, *, init_from: str | None = "adapters/src",
               eval_data: str | None = None) -> Path:  # fmt: skip
    spec = {"name": name, "base_model": base_model,
            "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "data": {"path": "d.jsonl", "format": "tokens", "max_seq_len": 32},
            "train": {"max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-2,
                      "checkpoint_every": 2}}  # fmt: skip
    if init_from is not None:
        spec["adapter"]["init_from"] = init_from
    if eval_data is not None:
        spec["eval"] = {"data": eval_data, "metrics": ["loss"]}
    path = home / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def submit(ctl: Controller, spec: Path, tmp_path: Path) -> dict:
    """``Client.submit`` minus the Ray transport: the laptop's staging, then the agent's register."""
    workdir = tmp_path / f"upload-{spec.stem}"
    workdir.mkdir()
    name, given = Client._stage(str(spec), workdir, 0)
    return agent.register("alice", [str(workdir / name)], base_dir=workdir, given=[given])[0]


def start(worker: TrainingWorker, ctl: Controller, job: dict, tmp_path: Path) -> tuple[dict, str | None]:
    """Hand the stored job to the worker as ``Controller._start`` does; wait for it to end."""
    rec = ctl.store.get(job["id"])
    remote = job_output(ctl.storage, rec.id) if "://" in ctl.storage else None
    local = str(tmp_path / "staging" / rec.id) if remote else job_output(ctl.storage, rec.id)
    config = replace(effective_spec(rec).to_job_config(), name=rec.id, output=local)
    worker.assign(rec.id, config, remote)
    return wait_events(worker, {rec.id: "finished"})[rec.id], remote


def test_a_local_init_from_directory_is_uploaded_and_the_job_continues_from_it(laptop, worker, tmp_path,
                                                                             monkeypatch):  # fmt: skip
    """``init_from: adapters/src`` (a fetched adapter on the laptop) was sent as it was and failed on
    the cluster with '<storage>/uploads/alice/adapters/src: no adapter_config.json'."""
    ctl = controller(tmp_path, str(tmp_path / "storage"), monkeypatch)
    try:
        spec = write_spec(laptop, "cont", worker.base_model)
        job = submit(ctl, spec, tmp_path)
        stored = Path(ctl.store.get(job["id"]).spec["adapter"]["init_from"])
        assert stored.is_relative_to(tmp_path / "storage" / "uploads" / "alice") and stored.name == "init_from"
        assert sorted(p.name for p in stored.iterdir()) == ADAPTER  # only the adapter files travel
        for name in ADAPTER:
            assert (stored / name).read_bytes() == (laptop / "adapters" / "src" / name).read_bytes()
        ev, _ = start(worker, ctl, job, tmp_path)
        assert ev["output"] == job_output(ctl.storage, job["id"])
    finally:
        ctl.store.close()


def test_an_init_from_without_adapter_config_is_refused_before_anything_is_queued(laptop, worker, tmp_path,
                                                                                monkeypatch):  # fmt: skip
    ctl = controller(tmp_path, str(tmp_path / "storage"), monkeypatch)
    try:
        (laptop / "adapters" / "src" / "adapter_config.json").unlink()
        spec = write_spec(laptop, "cont", worker.base_model)
        with pytest.raises(RemoteError) as err:
            Client._stage(str(spec), tmp_path, 0)  # the laptop refuses before it sends anything
        assert str(err.value) == ("adapter.init_from: adapters/src has no adapter_config.json: name a PEFT LoRA or "
                                  "MixLoRA adapter directory (as `lorafleet fetch` writes it). Nothing was queued")
        # `ray job submit ... -- lorafleet run` reaches the agent directly: it refuses too
        with pytest.raises(ValueError, match=r"^adapter.init_from: 'adapters/src' has no adapter_config.json"):
            agent.register("alice", [str(spec)], base_dir=laptop)
        (laptop / "adapters" / "src" / "adapter_config.json").write_text("{}")
        (laptop / "adapters" / "src" / "adapter_model.safetensors").unlink()
        with pytest.raises(RemoteError, match=r"^adapter.init_from: adapters/src has no adapter_model.safetensors "
                                              r"or adapter_model.bin"):  # fmt: skip
            Client._stage(str(spec), tmp_path, 0)
        (laptop / "weights.safetensors").write_bytes(b"x")
        with pytest.raises(RemoteError, match=r"^adapter.init_from: weights.safetensors is a file; name the adapter "
                                              r"directory"):  # fmt: skip
            Client._stage(str(write_spec(laptop, "f", worker.base_model, init_from="weights.safetensors")), tmp_path, 1)
        assert ctl.list_jobs() == []
    finally:
        ctl.store.close()


def test_an_earlier_jobs_output_on_the_cluster_is_refused_with_what_to_do(laptop, worker, tmp_path, monkeypatch):
    """Nothing promises ``init_from: <storage>/jobs/<id>``; the refusal says how to continue from it."""
    ctl = controller(tmp_path, str(tmp_path / "storage"), monkeypatch)
    try:
        hint = ("to continue from an earlier job's adapter, fetch it (`lorafleet fetch JOB DIR`) and submit with "
                "adapter.init_from: DIR (a local adapter directory is uploaded with the spec)")
        on_cluster = str(tmp_path / "storage" / "jobs" / "lf-0123456789")
        spec = write_spec(laptop, "c1", worker.base_model, init_from=on_cluster)
        with pytest.raises(PathError) as err:
            submit(ctl, spec, tmp_path)
        assert str(err.value) == (f"adapter.init_from: {on_cluster!r} is an absolute path outside the job area "
                                  f"(no absolute prefixes are allowed); {hint}")
        spec = write_spec(laptop, "c2", worker.base_model, init_from="lf-0123456789")
        with pytest.raises(RemoteError) as err:
            Client._stage(str(spec), tmp_path, 0)
        assert str(err.value) == f"adapter.init_from: directory not found on this machine: lf-0123456789; {hint}"
        assert ctl.list_jobs() == []
    finally:
        ctl.store.close()


def test_object_store_storage_takes_a_laptop_submission_end_to_end(laptop, worker, tmp_path, monkeypatch):
    """``lorafleet up --storage file://...`` (the code path of s3://): the agent uploaded a data file
    with ``sync_up`` ('[Errno 20] Not a directory'), and workers read a URI as a local path."""
    remote = tmp_path / "remote"
    ctl = controller(tmp_path, f"file://{remote}", monkeypatch)
    try:
        spec = write_spec(laptop, "uri", worker.base_model, eval_data="held.jsonl")
        job = submit(ctl, spec, tmp_path)
        stored = ctl.store.get(job["id"]).spec
        uploads = f"file://{remote}/uploads/alice/"
        data, held, init = stored["data"]["path"], stored["eval"]["data"], stored["adapter"]["init_from"]
        assert all(v.startswith(uploads) for v in (data, held, init))
        assert Path(data.removeprefix("file://")).read_bytes() == (laptop / "d.jsonl").read_bytes()  # a file
        assert Path(held.removeprefix("file://")).read_bytes() == (laptop / "held.jsonl").read_bytes()
        assert sorted(p.name for p in Path(init.removeprefix("file://")).iterdir()) == ADAPTER
        ev, out = start(worker, ctl, job, tmp_path)
        assert ev["output"] == out == f"file://{remote}/jobs/{job['id']}"
        assert ev["eval"]["examples"] == 4 and "error" not in ev["eval"]
        assert {"adapter_config.json", "adapter_model.safetensors", "eval.json"} <= {
            p.name for p in (remote / "jobs" / job["id"]).iterdir()}  # fmt: skip
    finally:
        ctl.store.close()


def test_unreadable_or_directory_data_and_bad_fetch_targets_are_one_line_errors(tmp_path, monkeypatch):
    """An unreadable data file raised a bare PermissionError from submit (and validate printed a
    traceback); a directory was "file not found"; fetch into an existing file failed after the
    download; submit_many([]) sent a Ray job that failed on its arguments."""
    import shutil

    from actors.data import DataError, load_records

    data = write_jsonl(tmp_path / "d.jsonl", token_records(2, 0, 4, 6))
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "data": {"path": str(data)}}))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(shutil, "copyfile", denied)
        with pytest.raises(RemoteError, match=rf"^data.path: cannot read {data} on this machine: Permission denied$"):
            Client._stage(str(spec), tmp_path / "w", 0)
    with monkeypatch.context() as m:
        m.setattr(Path, "read_text", denied)
        with pytest.raises(DataError, match=rf"^eval.data: cannot read {data}: Permission denied$"):
            load_records(str(data), field="eval.data")
    (tmp_path / "w").mkdir()
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    spec.write_text(yaml.safe_dump({"name": "s", "data": {"path": "folder"}}))
    with pytest.raises(RemoteError, match=r"^data.path: .*folder is a directory on this machine; give a data file$"):
        Client._stage(str(spec), tmp_path / "w", 0)
    with pytest.raises(DataError, match=r"is a directory; give a .json, .jsonl, .csv or .parquet file$"):
        load_records(str(tmp_path))

    client = object.__new__(Client)  # no cluster: both are refused before anything is sent
    client._agent = lambda *a, **k: pytest.fail("sent to the cluster")
    with pytest.raises(RemoteError, match=r"^submit_many: no specs given"):
        client.submit_many([])
    with pytest.raises(RemoteError, match=rf"^fetch: {data} is a file; give a directory"):
        client.fetch("lf-x", data)


def test_a_data_error_names_the_users_file_not_its_uploaded_copy(laptop, worker, tmp_path, monkeypatch):
    """A bad record in an uploaded data file failed the job with '.../uploads/alice/<id>/data-0-data-d.jsonl:
    record 2: ...': the user's file is ``data/bad d.jsonl``, and that is what the error names now. (The
    record's token id is past the model's vocabulary: only the worker, with the model, can tell; a line
    that is no JSON is refused at submit.)"""
    from types import SimpleNamespace

    from orchestrator.store import JobState

    ctl = controller(tmp_path, str(tmp_path / "storage"), monkeypatch)
    try:
        (laptop / "data").mkdir()
        lines = (laptop / "d.jsonl").read_text().splitlines()
        lines[2] = '{"input_ids": [1, 2, 3, 4, 100000]}'  # record 2: a token id the tiny model does not have
        (laptop / "data" / "bad d.jsonl").write_text("\n".join(lines) + "\n")
        spec = write_spec(laptop, "bad", worker.base_model, init_from=None)
        doc = yaml.safe_load(spec.read_text())
        doc["data"]["path"] = "data/bad d.jsonl"
        spec.write_text(yaml.safe_dump(doc))
        job = submit(ctl, spec, tmp_path)
        stored = ctl.store.get(job["id"])
        copy = stored.spec["data"]["path"]
        assert Path(copy).is_relative_to(tmp_path / "storage" / "uploads" / "alice")
        assert stored.extra["sources"] == {copy: "data/bad d.jsonl"}
        rec = ctl.store.get(job["id"])
        config = replace(effective_spec(rec).to_job_config(), name=rec.id, output=job_output(ctl.storage, rec.id))
        worker.assign(rec.id, config)
        ev = wait_events(worker, {rec.id: "failed"})[rec.id]
        assert copy in ev["message"] and "record 2" in ev["message"]  # the worker only knows the copy
        ctl.store.transition(rec.id, JobState.RUNNING, expect=JobState.QUEUED, worker="w-up", reason="test")
        ctl._on_event(SimpleNamespace(worker_id="w-up", assigned=set()), ev)
        failed = ctl.store.get(rec.id)
        assert failed.state is JobState.FAILED
        assert "data/bad d.jsonl: record 2" in failed.error and "uploads" not in failed.error, failed.error
        assert failed.error == ev["message"].replace(copy, "data/bad d.jsonl")
    finally:
        ctl.store.close()


def test_a_refusal_at_submit_names_the_users_file(laptop, worker, tmp_path, monkeypatch):
    """The controller's refusals of an uploaded file (here: over its upload limit) name the user's path."""
    ctl = controller(tmp_path, str(tmp_path / "storage"), monkeypatch)
    try:
        spec = write_spec(laptop, "big", worker.base_model, init_from=None)
        ctl.max_upload_bytes = 10  # the agent's staging reads the limit from ping(); refuse on the controller side
        monkeypatch.setattr(ctl, "ping", lambda: {"allowed_prefixes": [], "max_upload_bytes": None})
        with pytest.raises(ValueError) as err:
            submit(ctl, spec, tmp_path)
        assert "d.jsonl" in str(err.value) and "uploads" not in str(err.value), str(err.value)
    finally:
        ctl.store.close()


def test_submit_refuses_the_data_validate_refuses_and_queues_nothing(tmp_path, monkeypatch, capsys):
    """A JSON Lines file with a non-JSON line 2, an empty file, records without their format's fields:
    ``lorafleet validate`` refused them, ``submit`` queued them and the job failed once its base model
    had loaded. Now submit runs validate's checks on the local files it uploads, prints the same lines
    and sends nothing; a data file on the cluster (an absolute path not on this machine) is not read."""
    from types import SimpleNamespace

    from orchestrator.commands import validate

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "badline.jsonl").write_text('{"text": "a"}\nnot json\n{"text": "b"}\n')
    (tmp_path / "data" / "empty.jsonl").write_text("")
    (tmp_path / "data" / "columns.jsonl").write_text('{"question": "a"}\n{"question": "b"}\n')
    specs = []
    for name, fmt in (("badline", "auto"), ("empty", "auto"), ("columns", "text")):
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(yaml.safe_dump({"name": name, "data": {"path": f"./data/{name}.jsonl", "format": fmt}}))
        specs.append(str(spec.name))
    client = object.__new__(Client)  # no cluster: refused before anything is sent
    client._agent = lambda *a, **k: pytest.fail("sent to the cluster")
    client.owner = None
    with pytest.raises(RemoteError) as err:
        client.submit_many(specs)
    lines = str(err.value).splitlines()
    assert lines[0] == "badline.yaml: data.path: cannot read ./data/badline.jsonl line 2 as JSON: Expecting value"
    assert lines[1] == "empty.yaml: data.path: ./data/empty.jsonl has no records"
    assert lines[2].startswith("columns.yaml: ./data/columns.jsonl: record 0: "), lines
    assert validate.run(SimpleNamespace(specs=specs)) == 1
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if "base_model" not in line] == lines  # the lines validate prints
    with pytest.raises(RemoteError, match="record 0"):
        client.submit(specs[2])  # one spec alone: the same

    good = tmp_path / "good.yaml"  # local data fine; eval data on the cluster, which checks it
    (tmp_path / "data" / "good.jsonl").write_text('{"text": "a b c"}\n{"text": "d e f"}\n')
    good.write_text(yaml.safe_dump({"name": "good", "data": {"path": "data/good.jsonl"},
                                    "eval": {"data": "/cluster/held.jsonl", "metrics": ["loss"]}}))  # fmt: skip
    (tmp_path / "w").mkdir()
    _name, given = Client._stage(str(good), tmp_path / "w", 0)
    assert given == {"data.path": "data/good.jsonl"}
    remote = tmp_path / "remote.yaml"  # the training data itself on the cluster: nothing read here
    remote.write_text(yaml.safe_dump({"name": "remote", "data": {"path": "/cluster/badline.jsonl"}}))
    assert Client._stage(str(remote), tmp_path / "w", 1)[1] == {}

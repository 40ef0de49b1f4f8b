"""Fixes for what a security audit reproduced against the real controller (users root, alice, bob):

1. a percent-encoded ``..`` in a URI (pyarrow decodes ``%2E%2E``) got past ``confine_uri``;
2. the agent uploaded a file under its own name, and a ``%2F`` in that name (decoded to ``/``) wrote
   into another job's output;
3. ``base_model`` was not confined (``/etc``, another owner's uploads, another job's output, ``~root``);
4. ``workers`` and ``worker_handle`` took no key (another owner's private model path, any worker's handle);
5. the spec size check serialised first: shared references expanded exponentially in ``json.dumps``;
6. ``lorafleet run --api-key-file`` read any path on the head (the admin's key file).

Everything runs in-process: the controller with ``start_loop=False`` and ``file://`` or local storage
in ``tmp_path``, the agent's ``stage_data``, and ``job_api_key`` in a temporary working directory.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator import agent
from orchestrator.auth import AccessError, write_secret
from orchestrator.controller import MAX_SPEC_DEPTH, MAX_SPEC_NODES, Controller, confine_uri
from orchestrator.paths import PathError
from orchestrator.store import JobState
from tests.orchestrator.test_tenancy import _FakeActorClass, spec


def make_controller(tmp_path: Path, storage: str, prefixes: list[str] | None = None) -> Controller:
    return Controller(str(tmp_path / "store" / "jobs.db"), storage, {"policy": "fifo"}, start_loop=False,
                      num_gpus=1, allowed_prefixes=prefixes or [])  # fmt: skip


def add_users(c: Controller) -> dict[str, str]:
    """root (admin), alice, bob: name -> API key."""
    keys = {"root": c.add_user("root", admin=True)["key"]}
    for name in ("alice", "bob"):
        keys[name] = c.add_user(name, api_key=keys["root"])["key"]
    return keys


def with_path(doc: dict, field: str, value: str) -> dict:
    section, key = field.split(".")
    doc = json.loads(json.dumps(doc))
    if section == "eval":
        doc["eval"] = {"data": value}
    else:
        doc.setdefault(section, {})[key] = value
    return doc


@pytest.fixture
def uri_cluster(tmp_path: Path):
    """A controller on ``file://<tmp>/storage`` with alice's secret upload and alice's job output there."""
    root = tmp_path / "X"
    storage = f"file://{root}/storage"
    c = make_controller(tmp_path, storage)
    keys = add_users(c)
    secret = root / "storage" / "uploads" / "alice" / "u1" / "data-secret.jsonl"
    secret.parent.mkdir(parents=True)
    secret.write_text('{"text": "alice only"}\n')
    output = root / "storage" / "jobs" / "lf-alice1" / "adapter_config.json"
    output.parent.mkdir(parents=True)
    output.write_text('{"owner": "alice"}')
    yield c, keys, storage, root
    c.store.close()


# ---------------------------------------------------------------------------------- 1. URIs


@pytest.mark.parametrize("field", ["data.path", "eval.data", "adapter.init_from"])
@pytest.mark.parametrize("escape", ["%2E%2E", "%2e%2e", "%2e."])
def test_percent_encoded_dot_dot_in_a_uri_is_refused(uri_cluster, field: str, escape: str):
    c, keys, storage, _root = uri_cluster
    uri = f"{storage}/uploads/bob/{escape}/alice/u1/data-secret.jsonl"
    from pyarrow import fs

    assert "/../alice/" in fs.FileSystem.from_uri(uri)[1]  # what a worker would have opened: alice's file
    doc = with_path(spec("steal", data=f"{storage}/uploads/bob/u1/d.jsonl"), field, uri)
    with pytest.raises(PathError) as err:
        c.submit(doc, api_key=keys["bob"])
    assert str(err.value) == (f"{field}: {uri!r} has a segment {escape!r} that the storage layer decodes to '..'; "
                              "'.' and '..' are not allowed in a URI path, escaped or not")  # fmt: skip
    assert sum(c.store.counts().values()) == 0


@pytest.mark.parametrize(
    ("tail", "words"),
    [("bob/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "has a segment '%2e%2e' that the storage layer decodes to '..'"),
     ("bob/x%2F..%2F..%2Falice/u1/data-secret.jsonl", "has a segment 'x%2F..%2F..%2Falice' that the storage layer "
                                                      "decodes to text with a '/' ('x/../../alice')"),
     ("bob/%2E/u1/d.jsonl", "has a segment '%2E' that the storage layer decodes to '.'"),
     ("bob/u1%5C..%5Calice/d.jsonl", "decodes to text with a backslash"),
     ("bob/u1/d.jsonl%3Fendpoint_override=evil", "decodes to text with a '?'"),
     ("bob/u1/d%23x.jsonl", "decodes to text with a '#'"),
     ("bob/u1/d%00.jsonl", "decodes to text with a control character"),
     ("bob/u1/d%0A.jsonl", "decodes to text with a control character"),
     ("bob/u1/%FF.jsonl", "has a percent-escape that is not UTF-8 text (in '%FF.jsonl')"),
     ("bob/u1/50%.jsonl", "has a '%' that starts no percent-escape (two hex digits); write a '%' in a name as '%25'"),
     ("bob/u1/d%zz.jsonl", "has a '%' that starts no percent-escape"),
     ("bob/team a/d.jsonl", "contains a space, which the storage layer cannot parse in a URI; percent-encode it as "
                            "'%20' (UTF-8)"),
     ("bob/u1/donn\u00e9es.jsonl", "contains '\u00e9', which the storage layer cannot parse in a URI; percent-encode it "
                                 "as '%C3%A9' (UTF-8)"),
     ("bob/u1/a|b.jsonl", "contains '|', which the storage layer cannot parse in a URI; percent-encode it as '%7C'"),
     ("bob/u1/d\tx.jsonl", "contains a control character ('\\t'), which no URI here may hold"),
     ("bob/u1/d.jsonl?endpoint_override=evil", "contains a '?', after which the storage layer reads options"),
     ("bob/u1/d.jsonl#x", "contains a '#'"),
     ("bob/../alice/u1/data-secret.jsonl", "escapes the job area ('..' is not allowed in a URI path)"),
     ("bob/./u1/d.jsonl", "has a '.' segment; URI paths must be normalised"),
     ("bob//u1/d.jsonl", "has an empty segment ('//'); URI paths must be normalised"),
     ("bob2/u1/d.jsonl", "is outside your uploads and the allowed prefixes"),
     ("bob", "is outside your uploads and the allowed prefixes")],
)  # fmt: skip
def test_uri_paths_are_checked_as_the_storage_layer_opens_them(uri_cluster, tail: str, words: str):
    c, keys, storage, _root = uri_cluster
    uri = f"{storage}/uploads/{tail}"
    with pytest.raises(PathError) as err:
        c.submit(spec("j", data=uri), api_key=keys["bob"])
    assert str(err.value).startswith(f"data.path: {uri!r} ") and words in str(err.value)
    ok = c.submit(spec("ok", data=f"{storage}/uploads/bob/u1/d.jsonl"), api_key=keys["bob"])
    assert c.store.get(ok["id"]).spec["data"]["path"] == f"{storage}/uploads/bob/u1/d.jsonl"


def test_percent_encoded_spaces_and_non_ascii_name_their_objects(tmp_path: Path):
    """pyarrow parses no space or non-ASCII character in a URI, so a file named ``d é.jsonl`` is named
    ``d%20%C3%A9.jsonl``; refusing every '%' had made it impossible to name. The escaped form is admitted
    (stored in one spelling) and opens the file; the literal form is refused at admission with the hint,
    not later by the worker ("Cannot parse URI")."""
    from pyarrow import ArrowInvalid, fs

    allowed = tmp_path / "allowed"
    target = allowed / "sp ace" / "d \u00e9.jsonl"
    target.parent.mkdir(parents=True)
    target.write_text('{"text": "x"}\n')
    c = make_controller(tmp_path, f"file://{tmp_path}/storage", prefixes=[f"file://{allowed}"])
    try:
        keys = add_users(c)
        uri = f"file://{allowed}/sp%20ace/d%20%c3%a9.jsonl"
        job = c.submit(spec("encoded", data=uri), api_key=keys["bob"])
        stored = c.store.get(job["id"]).spec["data"]["path"]
        assert stored == f"file://{allowed}/sp%20ace/d%20%C3%A9.jsonl"
        filesystem, path = fs.FileSystem.from_uri(stored)
        assert path == str(target)
        with filesystem.open_input_stream(path) as f:
            assert f.read() == b'{"text": "x"}\n'
        literal = f"file://{allowed}/sp ace/d \u00e9.jsonl"
        with pytest.raises(ArrowInvalid, match="Cannot parse URI"):
            fs.FileSystem.from_uri(literal)  # what the worker would have met
        with pytest.raises(PathError) as err:
            c.submit(spec("literal", data=literal), api_key=keys["bob"])
        assert str(err.value) == (f"data.path: {literal!r} contains a space, which the storage layer cannot parse "
                                  "in a URI; percent-encode it as '%20' (UTF-8), as in "
                                  "'s3://bucket/team%20a/donn%C3%A9es.jsonl'")  # fmt: skip
        assert sum(c.store.counts().values()) == 1  # the literal form was not queued
        assert confine_uri("s3://b/d/team%20a/donn%C3%A9es.jsonl", ["s3://b/d"], "data.path") == \
            "s3://b/d/team%20a/donn%C3%A9es.jsonl"  # fmt: skip
        assert confine_uri("s3://b/d/%7Ex/a+b%2B(1)%25.jsonl", ["s3://b/d"], "data.path") == \
            "s3://b/d/~x/a+b+(1)%25.jsonl"  # fmt: skip
    finally:
        c.store.close()


def test_percent_escapes_never_reach_another_owners_area(tmp_path: Path):
    """Escapes are compared decoded: with an admin prefix over the whole storage, ``uploads/%61lice``
    is alice's area and ``%6Aobs`` the jobs' output area, refused as their plain spellings are; bob's
    own area written with escapes is his, and is stored plainly."""
    c = make_controller(tmp_path, "s3://b/lf", prefixes=["s3://b/"])
    try:
        keys = add_users(c)
        for uri, words in (("s3://b/lf/uploads/%61lice/u1/data-secret.jsonl", "is in another owner's upload area"),
                           ("s3://b/lf/upl%6Fads/alice/u1/data-secret.jsonl", "is in another owner's upload area"),
                           ("s3://b/lf/%6Aobs/lf-alice1/adapter_model.safetensors", "is in the jobs' output area"),
                           ("s3://b/lf/uploads/bob%2F..%2Falice/u1/d.jsonl", "decodes to text with a '/'"),
                           ("s3://b/lf/uploads/bob/%2E%2E/alice/u1/d.jsonl", "decodes to '..'")):
            with pytest.raises(PathError, match=f"^data.path: '{uri}' .*{words}"):
                c.submit(spec("x", data=uri), api_key=keys["bob"])
        job = c.submit(spec("mine", data="s3://b/lf/uploads/%62ob/u/d.jsonl"), api_key=keys["bob"])
        assert c.store.get(job["id"]).spec["data"]["path"] == "s3://b/lf/uploads/bob/u/d.jsonl"
        assert sum(c.store.counts().values()) == 1
    finally:
        c.store.close()


def test_uri_prefixes_match_whole_segments_and_never_cover_the_storage_areas(tmp_path: Path):
    """An allowed ``s3://b/datasets`` admits ``s3://b/datasets/x``, not ``s3://b/datasets2/x``; and an
    admin prefix over the whole bucket still keeps other owners' uploads and the jobs' outputs out."""
    c = make_controller(tmp_path, "s3://b/lf", prefixes=["s3://b/datasets", "s3://b/"])
    try:
        keys = add_users(c)
        assert confine_uri("s3://b/datasets/x.jsonl", ["s3://b/datasets"], "data.path") == "s3://b/datasets/x.jsonl"
        assert confine_uri("s3://b/datasets/ad/", ["s3://b/datasets"], "adapter.init_from") == "s3://b/datasets/ad"
        with pytest.raises(PathError, match=r"^data.path: 's3://b/datasets2/x' is outside your uploads and the "
                                            r"allowed prefixes \(s3://b/datasets/\)$"):  # fmt: skip
            confine_uri("s3://b/datasets2/x", ["s3://b/datasets"], "data.path")
        with pytest.raises(PathError, match="outside your uploads"):
            confine_uri("s3://other/datasets/x", ["s3://b/datasets"], "data.path")
        c.submit(spec("mine", data="s3://b/lf/uploads/bob/u/d.jsonl"), api_key=keys["bob"])
        c.submit(spec("shared", data="s3://b/elsewhere/d.jsonl"), api_key=keys["bob"])  # under s3://b/
        for uri, words in (("s3://b/lf/uploads/alice/u1/data-secret.jsonl", "is in another owner's upload area"),
                           ("s3://b/lf/jobs/lf-alice1/adapter_model.safetensors", "is in the jobs' output area")):
            with pytest.raises(PathError, match=f"^data.path: '{uri}' {words}"):
                c.submit(spec("x", data=uri), api_key=keys["bob"])
    finally:
        c.store.close()


# ---------------------------------------------------------------------------------- 2. upload names


EVIL_NAME = "x%2F..%2F..%2F..%2F..%2Fjobs%2Flf-alice1%2Fadapter_config.json"


def test_an_uploaded_file_name_cannot_write_outside_the_uploads(uri_cluster, tmp_path: Path):
    """bob's laptop file named ``x%2F..%2F..%2F..%2F..%2Fjobs%2Flf-alice1%2Fadapter_config.json``: pyarrow
    decoded the ``%2F`` and the upload replaced alice's job output."""
    _c, _keys, storage, root = uri_cluster
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    (laptop / EVIL_NAME).write_text('{"owner": "bob"}')
    doc = agent.stage_data({"data": {"path": EVIL_NAME}}, laptop, f"{storage}/uploads/bob")
    alice_output = root / "storage" / "jobs" / "lf-alice1" / "adapter_config.json"
    assert alice_output.read_text() == '{"owner": "alice"}'
    uploaded = doc["data"]["path"]
    safe = "data-x_2F.._2F.._2F.._2F.._2Fjobs_2Flf-alice1_2Fadapter_config.json"
    assert uploaded.startswith(f"{storage}/uploads/bob/") and uploaded.endswith(f"/{safe}")
    assert Path(uploaded.removeprefix("file://")).read_text() == '{"owner": "bob"}'


def test_normal_upload_names_are_kept_and_others_made_safe(tmp_path: Path):
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    for name in ("d.jsonl", "held out é.parquet"):
        (laptop / name).write_text("{}\n")
    doc = agent.stage_data({"data": {"path": "d.jsonl"}, "eval": {"data": "held out é.parquet"}}, laptop,
                           str(tmp_path / "storage" / "uploads" / "bob"))  # fmt: skip
    assert Path(doc["data"]["path"]).name == "data-d.jsonl"
    assert Path(doc["eval"]["data"]).name == "eval-held_out__.parquet"
    assert agent.safe_upload_name("data", ".hidden") == "data-.hidden"  # never a leading dot, never empty
    long = agent.safe_upload_name("data", "a" * 300 + ".jsonl.gz")
    assert len(long) == agent.UPLOAD_NAME_MAX and long.endswith(".jsonl.gz") and long.startswith("data-aaa")


def test_the_final_upload_uri_is_checked_before_anything_is_written(uri_cluster, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    """Should a name still carry an escape, the agent refuses it as the controller would."""
    _c, _keys, storage, root = uri_cluster
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    (laptop / "d.jsonl").write_text("{}\n")
    monkeypatch.setattr(agent, "safe_upload_name", lambda section, name: f"{section}-{EVIL_NAME}")
    with pytest.raises(PathError, match=r"^data.path: 'file://.*/uploads/bob/[0-9a-f]+/data-x%2F\.\..*' has a segment "
                                        r"'data-x%2F\.\..*' that the storage layer decodes to text with a '/'"):  # fmt: skip
        agent.stage_data({"data": {"path": "d.jsonl"}}, laptop, f"{storage}/uploads/bob")
    assert (root / "storage" / "jobs" / "lf-alice1" / "adapter_config.json").read_text() == '{"owner": "alice"}'
    assert not (root / "storage" / "uploads" / "bob").exists()


# ---------------------------------------------------------------------------------- 3. base_model


@pytest.fixture
def model_cluster(tmp_path: Path):
    """Local storage under ``tmp_path/X`` with the admin prefix ``tmp_path/X`` (it covers the storage root),
    a model directory ``X/models/m``, alice's uploads and alice's job output."""
    x = tmp_path / "X"
    (x / "models" / "m").mkdir(parents=True)
    (x / "models" / "m" / "config.json").write_text("{}")
    (x / "storage" / "uploads" / "alice" / "u1").mkdir(parents=True)
    (x / "storage" / "jobs" / "lf-alicejob").mkdir(parents=True)
    c = make_controller(tmp_path, str(x / "storage"), prefixes=[str(x)])
    keys = add_users(c)
    yield c, keys, x
    c.store.close()


@pytest.mark.parametrize(
    ("model", "words"),
    [("/etc", "'/etc' is a local path outside your uploads and the allowed prefixes ("),
     ("{X}/storage/jobs/lf-alicejob", "'{X}/storage/jobs/lf-alicejob' is in the jobs' output area ({X}/storage/jobs/), "
                                      "which no spec may name; a job reads no other job's output"),
     ("{X}/storage/uploads/alice/u1", "'{X}/storage/uploads/alice/u1' is in another owner's upload area (under "
                                      "{X}/storage/uploads/)"),
     ("~root/.lorafleet", "'~root/.lorafleet' (= '/root/.lorafleet') is a local path outside your uploads"),
     ("{X}/models/../../etc", "'{X}/models/../../etc' has a '..' component, which is not allowed"),
     ("./models/m", "'./models/m' is neither builtin:NAME, a hub id (NAME or ORG/NAME: letters, digits and '._-') "
                    "nor an absolute path"),
     ("a/b/c", "'a/b/c' is neither builtin:NAME, a hub id"),
     ("{X}/models/link", "'{X}/models/link' leaves the allowed prefix")],
)  # fmt: skip
def test_base_model_paths_are_confined_once_users_exist(model_cluster, model: str, words: str):
    c, keys, x = model_cluster
    (x / "models" / "link").symlink_to("/etc")
    model, words = model.replace("{X}", str(x)), words.replace("{X}", str(x))
    with pytest.raises(PathError) as err:
        c.submit({**spec("m"), "base_model": model}, api_key=keys["bob"])
    assert str(err.value).startswith(f"base_model: {words}"), str(err.value)
    assert sum(c.store.counts().values()) == 0


def test_allowed_base_models_are_admitted(model_cluster):
    c, keys, x = model_cluster
    for i, (model, stored) in enumerate([("builtin:smollm2-135m-instruct", "builtin:smollm2-135m-instruct"),
                                         ("org/model", "org/model"), ("gpt2", "gpt2"),
                                         (f"{x}/models/m", str((x / "models" / "m").resolve())),
                                         (f"{x}/models/m/", str((x / "models" / "m").resolve()))]):  # fmt: skip
        job = c.submit({**spec(f"m{i}"), "base_model": model}, api_key=keys["bob"])
        assert c.store.get(job["id"]).spec["base_model"] == stored


def test_base_model_in_the_jobs_area_of_file_uri_storage_is_refused(tmp_path: Path):
    """The audit's case: ``--storage file:///X/storage`` and an admin prefix ``/X``."""
    x = tmp_path / "X"
    (x / "storage" / "jobs" / "lf-alicejob").mkdir(parents=True)
    c = make_controller(tmp_path, f"file://{x}/storage", prefixes=[str(x)])
    try:
        keys = add_users(c)
        with pytest.raises(PathError, match=r"^base_model: '.*/X/storage/jobs/lf-alicejob' is in the jobs' output"):
            c.submit({**spec("m", data=f"file://{x}/storage/uploads/bob/u/d.jsonl"),
                      "base_model": str(x / "storage" / "jobs" / "lf-alicejob")}, api_key=keys["bob"])  # fmt: skip
    finally:
        c.store.close()


def test_data_paths_under_a_prefix_covering_the_storage_root_stay_out_of_others_areas(model_cluster):
    c, keys, x = model_cluster
    for field in ("data.path", "eval.data", "adapter.init_from"):
        for value, words in ((x / "storage" / "uploads" / "alice" / "u1" / "d.jsonl", "another owner's upload area"),
                             (x / "storage" / "jobs" / "lf-alicejob", "the jobs' output area")):  # fmt: skip
            with pytest.raises(PathError, match=f"^{field}: '{value}' is in {words}"):
                c.submit(with_path(spec("d"), field, str(value)), api_key=keys["bob"])
    own = c.submit(spec("own", data=str(x / "storage" / "uploads" / "bob" / "d.jsonl")), api_key=keys["bob"])
    assert c.store.get(own["id"]).spec["data"]["path"] == str(x / "storage" / "uploads" / "bob" / "d.jsonl")


def test_single_user_mode_keeps_local_base_models_as_they_are(tmp_path: Path):
    c = make_controller(tmp_path, str(tmp_path / "storage"))
    try:
        model = str(tmp_path / "models" / "tiny")  # a laptop's model directory, under no prefix
        job = c.submit({**spec("m"), "base_model": model}, "carol")
        assert c.store.get(job["id"]).spec["base_model"] == model
    finally:
        c.store.close()


# ---------------------------------------------------------------------------------- 4. workers


def test_workers_needs_a_key_and_hides_other_owners_models(model_cluster, fake_workers: _FakeActorClass):
    c, keys, x = model_cluster
    private = str((x / "models" / "m").resolve())
    job = c.submit({**spec("secret"), "base_model": private}, api_key=keys["alice"])
    c.tick()
    assert c.store.get(job["id"]).state == JobState.PROFILING
    with pytest.raises(AccessError, match="requires an API key"):
        c.workers()
    (as_bob,) = c.workers(api_key=keys["bob"])
    assert as_bob["base_model"] is None and as_bob["redacted"] is True
    assert as_bob["jobs"] == [job["id"]]  # ids stay visible, as list_jobs shows them
    listed = {j["id"]: j for j in c.list_jobs(api_key=keys["bob"])}
    assert listed[job["id"]]["worker"] == as_bob["worker_id"] and "spec" not in listed[job["id"]]
    for owner in ("alice", "root"):
        (row,) = c.workers(api_key=keys[owner])
        assert row["base_model"] == private and "redacted" not in row


def test_worker_handle_is_admin_only(model_cluster, fake_workers: _FakeActorClass):
    c, keys, _x = model_cluster
    c.submit(spec("j", data="d.jsonl"), api_key=keys["alice"])
    c.tick()
    (wid,) = [w["worker_id"] for w in c.workers(api_key=keys["root"])]
    for key in (None, keys["alice"], keys["bob"]):
        with pytest.raises(AccessError):
            c.worker_handle(wid, api_key=key)
    with pytest.raises(AccessError, match=r"only an admin may get a worker's actor handle \(you are 'bob'\)"):
        c.worker_handle(wid, api_key=keys["bob"])
    assert c.worker_handle(wid, api_key=keys["root"]) is fake_workers.handles[-1]
    with pytest.raises(LookupError, match="worker_id: no worker 'w-nope'"):
        c.worker_handle("w-nope", api_key=keys["root"])


def test_single_user_mode_workers_and_handles_need_no_key(tmp_path: Path, fake_workers: _FakeActorClass):
    c = make_controller(tmp_path, str(tmp_path / "storage"))
    try:
        c.submit(spec("j"), "carol")
        c.tick()
        (row,) = c.workers()
        assert row["base_model"] == "builtin:smollm2-135m-instruct"
        assert c.worker_handle(row["worker_id"]) is fake_workers.handles[-1]
    finally:
        c.store.close()


# ---------------------------------------------------------------------------------- 5. spec size


def test_a_spec_of_shared_references_is_refused_before_it_is_serialised(model_cluster,
                                                                         monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    """2^20 copies of one small mapping: a few hundred bytes pickled, ~20 MB of JSON (and twice that per
    level more). Refused by the walk, and json.dumps never sees it."""
    c, keys, _x = model_cluster
    bomb: Any = {"k": "v" * 8}
    for _ in range(20):
        bomb = [bomb, bomb]
    real_dumps, seen = json.dumps, []
    monkeypatch.setattr(json, "dumps", lambda obj, *a, **kw: (seen.append(obj), real_dumps(obj, *a, **kw))[1])
    started = time.perf_counter()
    with pytest.raises(ValueError, match=rf"^spec: more than {MAX_SPEC_NODES:,} values as JSON \(each reference to "
                                         r"a shared list or mapping counts again"):  # fmt: skip
        c.submit({**spec("bomb"), "pad": bomb}, api_key=keys["bob"])
    assert time.perf_counter() - started < 2.0
    assert not any(isinstance(o, dict) and o.get("pad") is bomb for o in seen), "serialised before the bound"
    assert sum(c.store.counts().values()) == 0


def test_a_deeply_nested_spec_is_refused_with_where(model_cluster):
    c, keys, _x = model_cluster
    deep: Any = "leaf"
    for _ in range(MAX_SPEC_DEPTH + 5):
        deep = {"x": deep}
    with pytest.raises(ValueError, match=rf"^spec: nested more than {MAX_SPEC_DEPTH} levels deep \(at pad\.x\.x"):
        c.submit({**spec("deep"), "pad": deep}, api_key=keys["bob"])
    cycle: dict = {}
    cycle["self"] = cycle
    with pytest.raises(ValueError, match=r"^spec: nested more than"):
        c.submit({**spec("cycle"), "pad": cycle}, api_key=keys["bob"])
    with pytest.raises(ValueError, match=r"^spec: more than 4,194,304 characters of text"):
        c.submit({**spec("text"), "pad": ["x" * (1 << 20)] * 5}, api_key=keys["bob"])
    assert sum(c.store.counts().values()) == 0


# ---------------------------------------------------------------------------------- 6. lorafleet run


@pytest.fixture
def head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The head: the admin's key in ~/.lorafleet/api_key; the Ray job's working directory is the cwd."""
    write_secret(tmp_path / "home" / ".lorafleet" / "api_key", "admin-key")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAFLEET_API_KEY", raising=False)
    work = tmp_path / "working-dir"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_lorafleet_run_key_file_must_stay_in_the_working_directory(head: Path, tmp_path: Path):
    from orchestrator.cli import UserError
    from orchestrator.commands.run import job_api_key

    admin_key = str(tmp_path / "home" / ".lorafleet" / "api_key")
    with pytest.raises(UserError, match=rf"^--api-key-file: {admin_key} is not a relative path; give a relative "
                                        r"path to a file in the job's working directory"):  # fmt: skip
        job_api_key(admin_key)
    with pytest.raises(UserError, match=r"^--api-key-file: ~/.lorafleet/api_key is not a relative path"):
        job_api_key("~/.lorafleet/api_key")
    with pytest.raises(UserError, match=r"^--api-key-file: \.\./home/\.lorafleet/api_key resolves to .*, outside "
                                        r"the job's working directory .* \(through '\.\.' or a symlink\)"):  # fmt: skip
        job_api_key("../home/.lorafleet/api_key")
    (head / "link").symlink_to(admin_key)
    with pytest.raises(UserError, match=r"^--api-key-file: link resolves to .*outside the job's working directory"):
        job_api_key("link")
    os.symlink(admin_key, head / "api_key")  # the default ./api_key, planted as a symlink
    with pytest.raises(UserError, match=r"^\./api_key: api_key resolves to .*outside the job's working directory"):
        job_api_key(None)
    (head / "api_key").unlink()
    (head / "keys").mkdir()
    (head / "keys" / "mine").write_text("bob-key\n")
    assert job_api_key("keys/mine") == "bob-key"
    (head / "inside").symlink_to(head / "keys" / "mine")  # a symlink that stays inside is fine
    assert job_api_key("inside") == "bob-key"
    assert job_api_key(None) is None  # no key at all: the controller refuses the call


def test_the_local_clusters_token_is_found_for_any_spelling_of_its_dashboard(tmp_path, monkeypatch):
    from orchestrator import client as client_mod
    from orchestrator import remote

    token = tmp_path / "ray-auth-token"
    token.write_text("t" * 64 + "\n")
    state = {"auth": "token", "token_path": str(token), "dashboard": "http://127.0.0.1:40311"}
    monkeypatch.setattr(client_mod, "recorded_local_cluster", lambda: state)
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    for address in ("http://127.0.0.1:40311", "http://localhost:40311/", "HTTP://127.0.0.1:40311"):
        assert remote._local_cluster_token(address) == "t" * 64, address
    assert remote._local_cluster_token("http://127.0.0.1:8265") is None  # another cluster: no token sent
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/elsewhere")  # Ray's own variables win
    assert remote._local_cluster_token("http://127.0.0.1:40311") is None

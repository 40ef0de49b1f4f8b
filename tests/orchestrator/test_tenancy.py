"""Multi-tenant controller logic without Ray: API-key identities, owner checks, path admission,
trust_remote_code, per-owner quotas. The controller runs with ``start_loop=False``; the quota test
drives ``tick()`` with a fake worker class in place of the Ray actor."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from orchestrator.auth import AccessError, client_api_key, hash_key, read_secret, write_secret
from orchestrator.controller import PUBLIC_FIELDS, Controller
from orchestrator.paths import PathError
from orchestrator.store import JobState


def spec(name: str, data: str = "d.jsonl", **extra: Any) -> dict:
    return {"name": name, "base_model": "builtin:smollm2-135m-instruct", "data": {"path": data, "max_seq_len": 64},
            "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "train": {"max_steps": 10, "batch_size": 4, "micro_batch_size": 2}, **extra}  # fmt: skip


@pytest.fixture
def ctl(tmp_path: Path):
    c = Controller(str(tmp_path / "store" / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"},
                   start_loop=False, num_gpus=0)  # fmt: skip
    yield c
    c.store.close()


@pytest.fixture
def users(ctl: Controller) -> dict[str, str]:
    """root (admin), alice, bob: name -> API key."""
    keys = {"root": ctl.add_user("root", admin=True)["key"]}
    keys["alice"] = ctl.add_user("alice", api_key=keys["root"])["key"]
    keys["bob"] = ctl.add_user("bob", api_key=keys["root"])["key"]
    return keys


# ---------------------------------------------------------------------------------- identity


def test_single_user_mode_trusts_the_declared_owner(ctl: Controller):
    job = ctl.submit(spec("a"), "carol")
    assert job["owner"] == "carol" and ctl.whoami()["mode"] == "single-user"
    assert ctl.status(job["id"])["owner"] == "carol"  # any caller may look: one user
    assert ctl.cancel("a", owner="carol")["state"] == "CANCELLED"
    assert ctl.status(job["id"])["events"][-1]["reason"] == "cancelled by carol"  # not "default"
    assert ctl.logs(job["id"], lines=1)[0].endswith(" cancelled by carol")
    with pytest.raises(PathError, match="owner: must match"):
        ctl.submit(spec("b"), "../x")


def test_first_user_must_be_admin_then_keys_are_required(ctl: Controller):
    with pytest.raises(ValueError, match="admin: the first user must be an admin"):
        ctl.add_user("alice")
    root = ctl.add_user("root", admin=True)["key"]
    with pytest.raises(AccessError, match="requires an API key: set LORAFLEET_API_KEY"):
        ctl.submit(spec("a"), "root")
    with pytest.raises(AccessError, match="API key not recognised"):
        ctl.list_jobs(api_key="lfk_" + "x" * 43)
    with pytest.raises(AccessError, match="only an admin may add users"):
        alice = ctl.add_user("alice", api_key=root)["key"]
        ctl.add_user("mallory", admin=True, api_key=alice)
    with pytest.raises(ValueError, match="already exists"):
        ctl.add_user("alice", api_key=root)


def test_store_keeps_only_key_hashes(ctl: Controller, users: dict[str, str]):
    path = ctl.store.path
    raw = b"".join(p.read_bytes() for p in path.parent.glob("jobs.db*"))
    for key in users.values():
        assert key.encode() not in raw
    rows = sqlite3.connect(path).execute("SELECT name, key_hash FROM users ORDER BY name").fetchall()
    assert rows == sorted((n, hash_key(k)) for n, k in users.items())


def test_owner_comes_from_the_key_not_the_declaration(ctl: Controller, users: dict[str, str]):
    job = ctl.submit(spec("a", owner="bob"), None, api_key=users["alice"])  # spec's owner field is ignored
    assert job["owner"] == "alice" and ctl.store.get(job["id"]).spec["owner"] == "alice"
    with pytest.raises(AccessError, match="owner: 'bob' is not you \\('alice'\\)"):
        ctl.submit(spec("b"), "bob", api_key=users["alice"])
    on_behalf = ctl.submit(spec("c"), "bob", api_key=users["root"])  # an admin may act for an owner
    assert on_behalf["owner"] == "bob"


@pytest.mark.parametrize("action", ["status", "cancel", "logs", "explain"])
def test_another_owners_job_is_refused_by_id_and_by_name(ctl: Controller, users: dict[str, str], action: str):
    job = ctl.submit(spec("secret-job"), api_key=users["alice"])
    for ref in (job["id"], "secret-job"):
        with pytest.raises(AccessError, match=f"job {job['id']} belongs to owner 'alice'.*you are 'bob'"):
            getattr(ctl, action)(ref, api_key=users["bob"])
    assert ctl.store.get(job["id"]).state == JobState.QUEUED
    getattr(ctl, action)(job["id"], api_key=users["alice"])  # the owner may
    if action != "cancel":
        getattr(ctl, action)(job["id"], api_key=users["root"])  # and so may an admin


def test_admin_may_cancel_any_job(ctl: Controller, users: dict[str, str]):
    job = ctl.submit(spec("a"), api_key=users["alice"])
    assert ctl.cancel(job["id"], api_key=users["root"])["state"] == "CANCELLED"
    assert "cancelled by root" in ctl.status(job["id"], api_key=users["alice"])["events"][-1]["reason"]


def test_same_name_of_two_owners_resolves_to_the_callers_own(ctl: Controller, users: dict[str, str]):
    a = ctl.submit(spec("same"), api_key=users["alice"])
    b = ctl.submit(spec("same"), api_key=users["bob"])
    assert ctl.status("same", api_key=users["alice"])["id"] == a["id"]
    assert ctl.status("same", api_key=users["bob"])["id"] == b["id"]


def test_listing_redacts_other_owners_jobs(ctl: Controller, users: dict[str, str]):
    mine = ctl.submit(spec("mine"), api_key=users["bob"])
    theirs = ctl.submit(spec("theirs"), api_key=users["alice"])
    listed = {j["id"]: j for j in ctl.list_jobs(api_key=users["bob"])}
    assert "spec" in listed[mine["id"]] and "redacted" not in listed[mine["id"]]
    assert set(listed[theirs["id"]]) == {*PUBLIC_FIELDS, "redacted"}
    assert all("spec" in j for j in ctl.list_jobs(api_key=users["root"]))
    assert [j["id"] for j in ctl.list_jobs(api_key=users["bob"], mine=True)] == [mine["id"]]


def test_admin_only_operations(ctl: Controller, users: dict[str, str]):
    for call in (lambda k: ctl.set_policy({"policy": "sjf"}, api_key=k), lambda k: ctl.list_users(api_key=k),
                 lambda k: ctl.remove_user("alice", api_key=k), lambda k: ctl.shutdown(api_key=k)):  # fmt: skip
        with pytest.raises(AccessError, match="only an admin may"):
            call(users["bob"])
    assert ctl.set_policy({"policy": "sjf"}, api_key=users["root"])["name"] == "sjf"
    assert [u["name"] for u in ctl.list_users(api_key=users["root"])] == ["alice", "bob", "root"]
    ctl.remove_user("bob", api_key=users["root"])
    with pytest.raises(AccessError, match="not recognised"):
        ctl.list_jobs(api_key=users["bob"])


def test_only_an_admin_may_prune_jobs(ctl: Controller, users: dict[str, str]):
    done = [ctl.submit(spec(f"done-{i}"), api_key=users["alice"])["id"] for i in range(22)]
    for job in done:
        ctl.cancel(job, api_key=users["alice"])
    theirs = ctl.submit(spec("bobs"), api_key=users["bob"])["id"]
    ctl.cancel(theirs, api_key=users["bob"])
    live = ctl.submit(spec("live"), api_key=users["alice"])["id"]
    with pytest.raises(AccessError, match="only an admin may prune jobs \\(you are 'alice'\\)"):
        ctl.prune_jobs(0, api_key=users["alice"])
    with pytest.raises(AccessError, match="requires an API key"):
        ctl.prune_jobs(0)
    assert len(ctl.store.list()) == 24  # the refusals deleted nothing
    with pytest.raises(ValueError, match="states: QUEUED is not a terminal state"):
        ctl.prune_jobs(0, states=["QUEUED"], api_key=users["root"])
    assert ctl.prune_jobs(3600, api_key=users["root"]) == {"deleted": 0, "ids": [], "dry_run": False, "uploads_deleted": []}
    dry = ctl.prune_jobs(0, owner="alice", dry_run=True, api_key=users["root"])
    assert dry == {"deleted": 22, "ids": done[:20], "dry_run": True, "uploads_deleted": []}  # the first 20 ids, oldest first
    assert len(ctl.store.list()) == 24
    out = ctl.prune_jobs(0, states=["CANCELLED"], owner="alice", api_key=users["root"])
    assert out == {"deleted": 22, "ids": done[:20], "dry_run": False, "uploads_deleted": []}
    assert {r.id for r in ctl.store.list()} == {theirs, live}
    with pytest.raises(LookupError):
        ctl.status(done[0], api_key=users["alice"])


def test_single_user_mode_may_prune_like_the_other_admin_calls(ctl: Controller):
    job = ctl.submit(spec("a"), "carol")["id"]
    ctl.cancel(job, owner="carol")
    assert ctl.prune_jobs(0.0) == {"deleted": 1, "ids": [job], "dry_run": False, "uploads_deleted": []}


def test_client_key_sources_and_file_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LORAFLEET_API_KEY", raising=False)
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAFLEET_API_KEY_FILE", raising=False)
    assert client_api_key() is None
    path = write_secret(tmp_path / "home" / "api_key", "lfk_file")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and client_api_key() == "lfk_file"
    monkeypatch.setenv("LORAFLEET_API_KEY", "lfk_env")
    assert client_api_key() == "lfk_env" and client_api_key("lfk_arg") == "lfk_arg"
    monkeypatch.delenv("LORAFLEET_API_KEY")
    os.chmod(path, 0o644)
    with pytest.raises(AccessError, match=r"readable by other users \(mode 644\); run `chmod 600"):
        read_secret(path, what="API key file")
    with pytest.raises(AccessError):
        client_api_key()


# ---------------------------------------------------------------------------------- admission


def _uploads(ctl: Controller, owner: str) -> Path:
    return Path(ctl.uploads_root(owner))


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("data.path", "../../etc/passwd", "escapes the job area ('..' is not allowed)"),
     ("data.path", "/etc/passwd", "is an absolute path outside the job area (allowed prefixes: "),
     ("eval.data", "../x.jsonl", "escapes the job area"),
     ("adapter.init_from", "/home/someone/adapter", "is an absolute path outside the job area")],
)  # fmt: skip
def test_paths_outside_the_area_are_refused_and_nothing_is_stored(ctl: Controller, field: str, value: str, words: str):
    doc = spec("a")
    section, key = field.split(".")
    if section == "eval":
        doc["eval"] = {"data": value}
    else:
        doc.setdefault(section, {})[key] = value
    with pytest.raises(PathError, match=rf"^{field}: .*{words[:30]}".replace("(", r"\(").replace(")", r"\)")):
        ctl.submit(doc, "alice")
    assert sum(ctl.store.counts().values()) == 0


def test_relative_paths_resolve_in_the_owners_uploads(ctl: Controller):
    job = ctl.submit(spec("a", data="set1/d.jsonl"), "alice")
    stored = ctl.store.get(job["id"]).spec
    assert stored["data"]["path"] == str(_uploads(ctl, "alice") / "set1" / "d.jsonl")
    assert stored["output"] is None  # outputs are placed by the controller, never by the spec


def test_another_owners_uploads_are_refused(ctl: Controller):
    bob_file = _uploads(ctl, "bob") / "x" / "d.jsonl"
    with pytest.raises(PathError, match=r"data.path: .* is an absolute path outside the job area"):
        ctl.submit(spec("a", data=str(bob_file)), "alice")


def test_symlink_escape_is_refused(ctl: Controller, tmp_path: Path):
    area = _uploads(ctl, "alice")
    area.mkdir(parents=True)
    (tmp_path / "outside.jsonl").write_text("{}\n")
    (area / "link.jsonl").symlink_to(tmp_path / "outside.jsonl")
    with pytest.raises(PathError, match=r"data.path: 'link.jsonl' escapes the job area through a symlink"):
        ctl.submit(spec("a", data="link.jsonl"), "alice")


def test_a_file_uri_under_an_allowed_prefix_may_not_leave_it_through_a_symlink(tmp_path: Path):
    """The same path was refused as a path ("through a symlink") and admitted as a file:// URI."""
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "jobs.db").write_text("x")
    (datasets / "link").symlink_to(tmp_path / "private")
    (datasets / "d.jsonl").write_text('{"text": "x"}\n')
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   allowed_prefixes=[f"file://{datasets}"])  # fmt: skip
    try:
        with pytest.raises(PathError, match=rf"^data.path: 'file://{datasets}/link/jobs.db' leaves the allowed "
                                            rf"prefixes through a symlink \(it leads to {tmp_path}/private/jobs.db\)"):  # fmt: skip
            c.submit(spec("a", data=f"file://{datasets}/link/jobs.db"), "alice")
        assert c.submit(spec("b", data=f"file://{datasets}/d.jsonl"), "alice")["state"] == "QUEUED"
    finally:
        c.store.close()


def test_admin_prefix_is_allowed(tmp_path: Path):
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   allowed_prefixes=[str(datasets)])  # fmt: skip
    try:
        job = c.submit(spec("a", data=str(datasets / "d.jsonl")), "alice")
        assert c.store.get(job["id"]).spec["data"]["path"] == str((datasets / "d.jsonl").resolve())
        with pytest.raises(PathError, match=rf"allowed prefixes: .*'{datasets}'\)"):
            c.submit(spec("b", data=str(tmp_path / "elsewhere.jsonl")), "alice")
    finally:
        c.store.close()


def test_uri_storage_confines_uris(tmp_path: Path):
    c = Controller(str(tmp_path / "jobs.db"), "s3://bucket/lf", {"policy": "fifo"}, start_loop=False)
    try:
        c.submit(spec("a", data="s3://bucket/lf/uploads/alice/u1/d.jsonl"), "alice")
        for bad, words in (("s3://bucket/lf/uploads/bob/u1/d.jsonl", "outside your uploads"),
                           ("s3://bucket/lf/uploads/alice/../bob/d.jsonl", "'..' is not allowed"),
                           ("relative.jsonl", "must be a URI under s3://bucket/lf/uploads/alice/")):  # fmt: skip
            with pytest.raises(PathError, match=rf"data.path: .*{words}".replace("(", r"\(").replace(")", r"\)")):
                c.submit(spec("b", data=bad), "alice")
    finally:
        c.store.close()


def test_upload_and_spec_size_limits(tmp_path: Path):
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"}, start_loop=False,
                   max_upload_bytes=100)  # fmt: skip
    try:
        big = Path(c.uploads_root("alice")) / "u" / "big.jsonl"
        big.parent.mkdir(parents=True)
        big.write_bytes(b"x" * 101)
        with pytest.raises(PathError, match=r"data.path: .* is 101 bytes; the limit is 100"):
            c.submit(spec("a", data="u/big.jsonl"), "alice")
        with pytest.raises(ValueError, match=r"spec: \d+ bytes as JSON; the limit is 1048576"):
            c.submit({**spec("b"), "pad": "x" * (1 << 20)}, "alice")
        assert sum(c.store.counts().values()) == 0
    finally:
        c.store.close()


# ---------------------------------------------------------------------------------- fake workers


class _Method:
    def __init__(self, calls: list, name: str):
        self.calls, self.name = calls, name

    def remote(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((self.name, args, kwargs))


class _FakeHandle:
    def __init__(self, worker_id: str, base_model: str, **options: Any):
        self.worker_id, self.base_model, self.options, self.calls = worker_id, base_model, options, []

    def __getattr__(self, name: str) -> _Method:
        return _Method(self.calls, name)


class _FakeActorClass:
    def __init__(self) -> None:
        self.handles: list[_FakeHandle] = []

    def options(self, **_: Any) -> _FakeActorClass:
        return self

    def remote(self, worker_id: str, base_model: str, **options: Any) -> _FakeHandle:
        self.handles.append(_FakeHandle(worker_id, base_model, **options))
        return self.handles[-1]


def test_running_jobs_quota_is_enforced_per_owner(tmp_path: Path, fake_workers: _FakeActorClass):
    """aspen with quotas {alice: 1, default: 2}: 3 queued jobs each for alice and bob, 8 GPUs free.
    After the controller's ticks alice runs 1 job and bob 2; the rest wait for a slot."""
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"),
                   {"policy": "aspen", "quotas": {"alice": 1, "default": 2}}, start_loop=False, num_gpus=8)  # fmt: skip
    try:
        root = c.add_user("root", admin=True)["key"]
        keys = {u: c.add_user(u, api_key=root)["key"] for u in ("alice", "bob")}
        for owner, key in keys.items():
            for i in range(3):
                c.submit(spec(f"{owner}-{i}"), api_key=key)
        for _ in range(3):
            c.tick()
        placed = {o: [r for r in c.store.list(owner=o) if r.state == JobState.PROFILING] for o in keys}
        assert (len(placed["alice"]), len(placed["bob"])) == (1, 2)
        assigned = [a[0] for h in fake_workers.handles for name, a, _ in h.calls if name == "assign"]
        assert sorted(assigned) == sorted(r.id for rs in placed.values() for r in rs)
        # alice's running job ends: her next job gets the slot
        done = placed["alice"][0].id
        c.store.transition(done, JobState.RUNNING)
        c.store.transition(done, JobState.SUCCEEDED)
        for w in c._workers.values():
            w.assigned.discard(done)
        c.tick()
        assert sum(r.state == JobState.PROFILING for r in c.store.list(owner="alice")) == 1
        assert c.store.get(done).state == JobState.SUCCEEDED
    finally:
        c.store.close()


def test_trust_remote_code_needs_the_admin_switch(tmp_path: Path, fake_workers: _FakeActorClass):
    off = Controller(str(tmp_path / "a.db"), str(tmp_path / "s"), {"policy": "fifo"}, start_loop=False, num_gpus=1)
    try:
        with pytest.raises(ValueError, match="trust_remote_code: this cluster does not run code shipped with "
                                             "models; an admin enables it with `lorafleet up --allow-remote-code`"):
            off.submit(spec("a", trust_remote_code=True), "alice")
        assert sum(off.store.counts().values()) == 0
        off.submit(spec("b"), "alice")
        off.tick()
        assert "trust_remote_code" not in fake_workers.handles[-1].options
    finally:
        off.store.close()
    on = Controller(str(tmp_path / "b.db"), str(tmp_path / "s"), {"policy": "fifo"}, start_loop=False, num_gpus=1,
                    allow_remote_code=True)  # fmt: skip
    try:
        on.submit(spec("a", trust_remote_code=True), "alice")
        on.tick()
        assert fake_workers.handles[-1].options.get("trust_remote_code") is True
    finally:
        on.store.close()


@pytest.mark.parametrize("first_trusts", [True, False])
def test_a_worker_running_a_models_code_takes_only_jobs_that_asked_for_it(tmp_path: Path, fake_workers, first_trusts):
    """Placement compared base models only: on one GPU, bob's job (no trust_remote_code) joined the
    worker started with the model's code for alice's, and the reverse; docs/admin.md says only the
    workers started for such jobs run it. A job like the first still joins it."""
    c = Controller(str(tmp_path / "a.db"), str(tmp_path / "s"), {"policy": "fifo"}, start_loop=False, num_gpus=1,
                   allow_remote_code=True)  # fmt: skip
    try:
        a = c.submit(spec("a", trust_remote_code=first_trusts), "alice")["id"]
        c.tick()
        like = c.submit(spec("c", trust_remote_code=first_trusts), "carol")["id"]
        b = c.submit(spec("b", trust_remote_code=not first_trusts), "bob")["id"]
        c.tick()
        (handle,) = fake_workers.handles
        assert handle.options.get("trust_remote_code", False) is first_trusts
        assert c.store.get(a).worker == c.store.get(like).worker == handle.worker_id
        assert c.store.get(b).state == JobState.QUEUED  # waits for a worker of its own kind
    finally:
        c.store.close()


# ---------------------------------------------------------------------------------- untrusted files


class _Payload:
    """Unpickling this would create ``marker``: what a hostile ``adapter_model.bin`` could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_adapter_code_never_runs(tmp_path: Path):
    import torch

    from actors.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS_BIN, read_adapter

    marker = tmp_path / "pwned"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / ADAPTER_CONFIG).write_text('{"peft_type": "LORA", "r": 4}')
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, adapter / ADAPTER_WEIGHTS_BIN)
    with pytest.raises(ValueError, match=r"adapter_model\.bin: not a readable PyTorch weights file "
                                         r"\(UnpicklingError: Weights only load failed"):
        read_adapter(adapter)  # refused as the job's error (it fails alone), the payload never runs
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, adapter / ADAPTER_WEIGHTS_BIN)  # plain tensors still load
    state, _ = read_adapter(adapter)
    assert torch.equal(state["w"], torch.ones(2))


@pytest.mark.parametrize("trust", [False, True])
def test_worker_passes_trust_remote_code_to_the_model_loader(monkeypatch: pytest.MonkeyPatch, trust: bool):
    import actors.models
    from actors.worker import TrainingWorker

    seen: dict[str, Any] = {}

    def fake_load(name: str, **kwargs: Any):
        seen.update(kwargs, name=name)
        raise RuntimeError("stop here: only the arguments matter")

    monkeypatch.setattr(actors.models, "load_base_model", fake_load)
    worker = TrainingWorker("w-test", "some/model", device="cpu", profile="off", trust_remote_code=trust, start=False)
    with pytest.raises(RuntimeError, match="stop here"):
        worker._load()
    assert seen["name"] == "some/model" and seen["trust_remote_code"] is trust


def test_gpu_quota_limits_the_workers_an_owner_occupies(tmp_path: Path, fake_workers: _FakeActorClass):
    """aspen with gpu_quotas {alice: 1}: alice's jobs on two base models need two workers, so only one
    model's jobs start; bob (no quota) gets a worker for each model. Owners come from the keys."""
    c = Controller(str(tmp_path / "jobs.db"), str(tmp_path / "storage"),
                   {"policy": "aspen", "gpu_quotas": {"alice": 1}}, start_loop=False, num_gpus=8)  # fmt: skip
    try:
        root = c.add_user("root", admin=True)["key"]
        keys = {u: c.add_user(u, api_key=root)["key"] for u in ("alice", "bob")}
        for owner, key in keys.items():
            for model in ("builtin:smollm2-135m-instruct", "org/other-model"):
                c.submit({**spec(f"{owner}-{model.split(':')[-1].split('/')[-1]}"), "base_model": model}, api_key=key)
        for _ in range(3):
            c.tick()
        workers = {o: {r.worker for r in c.store.list(owner=o) if r.state == JobState.PROFILING} for o in keys}
        assert len(workers["alice"]) == 1 and len(workers["bob"]) == 2
        assert sum(r.state == JobState.QUEUED for r in c.store.list(owner="alice")) == 1
    finally:
        c.store.close()


def test_the_only_admin_cannot_be_removed(ctl: Controller, users: dict[str, str]):
    """Before, root could remove itself (nobody could manage users, the policy or `down` again), and
    removing every user silently made every keyless caller an admin."""
    with pytest.raises(ValueError, match=r"name: 'root' is the only admin; add another admin first"):
        ctl.remove_user("root", api_key=users["root"])
    second = ctl.add_user("root2", admin=True, api_key=users["root"])["key"]
    assert ctl.remove_user("root", api_key=second) == {"removed": "root"}
    with pytest.raises(ValueError, match="'root2' is the only admin"):
        ctl.remove_user("root2", api_key=second)
    assert ctl.store.has_users() and ctl.whoami(api_key=users["alice"])["admin"] is False


def test_lorafleet_run_never_takes_the_heads_own_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`lorafleet run` runs on the head, where ~/.lorafleet/api_key is the admin's: a job submitted
    without a key ran as the admin and could name any owner."""
    from orchestrator.cli import UserError
    from orchestrator.commands.run import job_api_key

    home = tmp_path / "home"
    write_secret(home / ".lorafleet" / "api_key", "admin-key")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("LORAFLEET_API_KEY_FILE", str(home / ".lorafleet" / "api_key"))
    monkeypatch.delenv("LORAFLEET_API_KEY", raising=False)
    work = tmp_path / "working-dir"
    work.mkdir()
    monkeypatch.chdir(work)
    assert client_api_key() == "admin-key"  # what the general client would have used
    assert job_api_key(None) is None  # the controller then refuses the call on a cluster with users
    (work / "api_key").write_text("alice-key\n")  # shipped with --working-dir (a projected Secret in rayjob.yaml)
    assert job_api_key(None) == "alice-key"
    (work / "mine").write_text("bob-key")
    assert job_api_key("mine") == "bob-key"
    with pytest.raises(UserError, match="--api-key-file: nope is not in the job's working directory"):
        job_api_key("nope")
    (work / "api_key").unlink()
    monkeypatch.setenv("LORAFLEET_API_KEY", "env-key")  # outside a Ray job: this process's user's own
    assert job_api_key(None) == "env-key"
    # In a Ray job the variable may be the head's, inherited from the shell that ran `ray start` (an
    # admin with the key exported): only the job's own runtime_env env_vars count.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x"}}))
    assert job_api_key(None) is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": {"LORAFLEET_API_KEY": "alice-env"}}}))  # fmt: skip
    assert job_api_key(None) == "alice-env"


def test_single_user_mode_finds_another_owners_job_by_id(ctl: Controller):
    """Everyone is trusted as admin without users; root's shell declares owner 'root' and got
    "no job of owner 'root'" for bob's job id. Names still resolve among the declared owner's jobs."""
    bobs = ctl.submit(spec("shared"), "bob")
    assert ctl.status(bobs["id"], owner="root")["owner"] == "bob"
    with pytest.raises(LookupError, match="no job of owner 'root' with id or name 'shared'"):
        ctl.status("shared", owner="root")
    with pytest.raises(LookupError, match="no job of owner 'root' with id or name 'lf-nope'"):
        ctl.status("lf-nope", owner="root")


def test_an_unknown_builtin_name_is_refused_at_submit(ctl: Controller):
    """`builtin:../../x` was admitted as given, and the controller then read
    <cache>/models/../../x/config.json to size the job: a file read outside every prefix."""
    with pytest.raises(PathError, match=r"^base_model: unknown builtin model '\.\./\.\./secret-model'; available: "
                                        r"builtin:smollm2-135m-instruct"):  # fmt: skip
        ctl.submit({**spec("a"), "base_model": "builtin:../../secret-model"}, "alice")
    assert ctl.store.list() == []


def test_explain_does_not_name_another_owners_base_model(tmp_path, fake_workers):
    """`workers` withholds the base model of a worker running only another owner's jobs (a local path
    can say a lot); `policy explain` of the caller's own job said it ('busy with /models/...')."""
    models = tmp_path / "models"
    (models / "bob-secret-7b").mkdir(parents=True)
    c = Controller(str(tmp_path / "store" / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"},
                   start_loop=False, num_gpus=1, allowed_prefixes=[str(models)])  # fmt: skip
    try:
        root = c.add_user("root", admin=True)["key"]
        keys = {u: c.add_user(u, api_key=root)["key"] for u in ("alice", "bob")}
        c.submit({**spec("b"), "base_model": str(models / "bob-secret-7b")}, api_key=keys["bob"])
        c.tick()
        mine = c.submit(spec("a"), api_key=keys["alice"])["id"]
        c.tick()
        assert c.workers(api_key=keys["alice"])[0]["base_model"] is None
        text = c.explain(mine, api_key=keys["alice"])
        assert "bob-secret-7b" not in text and "busy with <another owner's model>" in text, text
        assert "bob-secret-7b" in c.explain(mine, api_key=root)  # an admin sees everything
    finally:
        c.store.close()

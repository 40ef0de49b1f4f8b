"""Path confinement: user paths stay in the job's area of the storage root, symlinks included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.paths import (
    MAX_UPLOAD_BYTES,
    PathError,
    check_job_name,
    check_upload_size,
    confine,
    job_area,
)


@pytest.fixture
def area(tmp_path: Path) -> Path:
    root = job_area(tmp_path / "storage", "alice", "lf-0123456789")
    root.mkdir(parents=True)
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("{}\n")
    return root


def test_job_area_layout(tmp_path: Path):
    assert job_area(tmp_path, "alice", "lf-01") == tmp_path / "jobs" / "alice" / "lf-01"
    assert job_area("relative/root", "bob", "j1").is_absolute()


@pytest.mark.parametrize(
    ("owner", "job_id", "field"),
    [("..", "j1", "owner"), ("alice", "..", "job_id"), (".", "j1", "owner"), ("a/b", "j1", "owner"),
     ("alice", "j/../x", "job_id"), ("", "j1", "owner"), ("alice", ".hidden", "job_id"), ("x" * 65, "j", "owner")],
)  # fmt: skip
def test_job_area_refuses_unsafe_components(tmp_path: Path, owner: str, job_id: str, field: str):
    with pytest.raises(PathError, match=rf"^{field}: "):
        job_area(tmp_path, owner, job_id)


@pytest.mark.parametrize("name", ["reverse-words", "a", "job_1.v2", "A-" + "x" * 62])
def test_check_job_name_accepts(name: str):
    assert check_job_name(name) == name


@pytest.mark.parametrize("name", ["..", ".", ".x", "a b", "a/b", "", "é", "x\x00", 3, None])
def test_check_job_name_refuses(name: object):
    with pytest.raises(PathError, match=r"^name: "):
        check_job_name(name)


def test_relative_paths_inside_resolve_into_the_area(area: Path):
    assert confine(area, "data/train.jsonl", field="data.path") == (area / "data" / "train.jsonl").resolve()
    assert (
        confine(area, "out/new/dir", field="output") == (area / "out" / "new" / "dir").resolve()
    )  # need not exist
    assert (
        confine(area, "./data//train.jsonl", field="data.path") == (area / "data" / "train.jsonl").resolve()
    )


@pytest.mark.parametrize("bad", ["../x", "data/../../x", "..", "data/..", "a/../b"])
def test_dotdot_is_refused_even_when_it_would_stay_inside(area: Path, bad: str):
    with pytest.raises(PathError) as err:
        confine(area, bad, field="data.path")
    assert str(err.value) == f"data.path: {bad!r} escapes the job area ('..' is not allowed)"


def test_absolute_paths_need_an_allowed_prefix(area: Path, tmp_path: Path):
    shared = tmp_path / "datasets"
    (shared / "alpaca").mkdir(parents=True)
    with pytest.raises(
        PathError, match=r"^data\.path: '/etc/passwd' is an absolute path outside the job area"
    ):
        confine(area, "/etc/passwd", field="data.path")
    with pytest.raises(PathError, match="allowed prefixes"):
        confine(area, "/etc/passwd", field="data.path", allowed_prefixes=[shared])
    ok = confine(area, str(shared / "alpaca" / "train.jsonl"), field="data.path", allowed_prefixes=[shared])
    assert ok == (shared / "alpaca" / "train.jsonl").resolve()
    # a sibling whose name merely starts with the prefix is not under it
    (tmp_path / "datasets-private").mkdir()
    with pytest.raises(PathError, match="absolute path outside"):
        confine(area, str(tmp_path / "datasets-private" / "x"), field="data.path", allowed_prefixes=[shared])


def test_symlink_escape_out_of_the_area_is_refused(area: Path, tmp_path: Path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("k")
    os.symlink(secret, area / "data" / "link")  # a directory symlink pointing out
    os.symlink(secret / "key", area / "data" / "file-link")  # a file symlink pointing out
    with pytest.raises(PathError) as err:
        confine(area, "data/link/key", field="data.path")
    assert str(err.value) == "data.path: 'data/link/key' escapes the job area through a symlink"
    with pytest.raises(PathError, match="through a symlink"):
        confine(area, "data/file-link", field="data.path")
    with pytest.raises(PathError, match="through a symlink"):
        confine(area, "data/link/not-yet-created", field="output")


def test_symlink_inside_the_area_is_fine(area: Path):
    os.symlink(area / "data", area / "alias")
    assert confine(area, "alias/train.jsonl", field="data.path") == (area / "data" / "train.jsonl").resolve()


def test_absolute_path_under_prefix_that_symlinks_out_is_refused(area: Path, tmp_path: Path):
    shared = tmp_path / "datasets"
    shared.mkdir()
    os.symlink(tmp_path / "secret", shared / "evil")
    with pytest.raises(PathError, match="leaves the allowed prefix"):
        confine(area, str(shared / "evil" / "x"), field="data.path", allowed_prefixes=[shared])


def test_root_itself_may_be_a_symlink(tmp_path: Path):
    real = tmp_path / "real"
    (real / "d").mkdir(parents=True)
    os.symlink(real, tmp_path / "root-link")
    assert confine(tmp_path / "root-link", "d", field="data.path") == (real / "d").resolve()


@pytest.mark.parametrize(
    ("bad", "words"),
    [("", "must not be empty"), ("a\x00b", "NUL byte"), (7, "must be a path string"), (None, "must be a path string"),
     (["a"], "must be a path string")],
)  # fmt: skip
def test_malformed_values_name_the_field(area: Path, bad: object, words: str):
    with pytest.raises(PathError, match=rf"^adapter\.init_from: .*{words}"):
        confine(area, bad, field="adapter.init_from")


def test_upload_size_limit(tmp_path: Path):
    f = tmp_path / "train.jsonl"
    f.write_bytes(b"x" * 100)
    assert check_upload_size(f, field="data.path", limit=100) == 100
    with pytest.raises(PathError, match=r"^data\.path: .* is 101 bytes; the limit is 100$"):
        f.write_bytes(b"x" * 101)
        check_upload_size(f, field="data.path", limit=100)
    with pytest.raises(PathError, match="not a regular file"):
        check_upload_size(tmp_path, field="data.path")
    with pytest.raises(PathError, match="cannot read"):
        check_upload_size(tmp_path / "missing", field="data.path")
    assert MAX_UPLOAD_BYTES == 1 << 30

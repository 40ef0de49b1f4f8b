"""Path confinement and size limits for untrusted input: job names, data paths, outputs, uploads.

Everything a user writes in a job spec that becomes a file-system path goes through here before
the controller or a worker touches the disk. The storage root is laid out as::

    STORAGE_ROOT/
      jobs/OWNER/JOB_ID/          job_area(): the only place a job may read or write
        data/                     uploaded data files (each at most the upload limit)
        out/                      adapter, metrics.jsonl, job.json, checkpoints/

Rules (``confine``): a user path is relative to the job's area; it may not contain a ``..``
component or a NUL byte; an absolute path is refused unless it lies under a prefix the admin
allowed (for example a read-only ``/datasets`` mount); and after resolving symlinks the result
must still lie inside the area (or the allowed prefix), so a symlink planted in the area cannot
point outside it. Every refusal is a ``PathError`` whose message starts with the spec field::

    data.path: '../x' escapes the job area ('..' is not allowed)

Limits: job specs are at most ``orchestrator.spec.MAX_SPEC_BYTES`` (1 MiB, checked by
``load_spec``); an uploaded data file is at most ``MAX_UPLOAD_BYTES`` (1 GiB) unless the caller
passes another ``limit`` (the admin's setting).

A check is only as good as the moment it is made: a path confined here can still be swapped for a
symlink before it is opened. Callers that write into a job area should therefore create files
inside a directory only the controller and workers can write (users never get a shell there).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from orchestrator.spec import MAX_SPEC_BYTES, NAME_PATTERN

MAX_UPLOAD_BYTES = 1 << 30  # one data file; an admin may pass a different ``limit``
JOBS_DIR = "jobs"

__all__ = [
    "JOBS_DIR",
    "MAX_SPEC_BYTES",
    "MAX_UPLOAD_BYTES",
    "PathError",
    "check_job_name",
    "check_upload_size",
    "confine",
    "job_area",
    "user_paths",
]

_NAME = re.compile(NAME_PATTERN)


class PathError(ValueError):
    """A user-supplied path or name is refused; the message starts with ``field: ``."""


def check_job_name(name: object, *, field: str = "name") -> str:
    """Return ``name`` if it is a safe single path component, else raise ``PathError``.

    Safe: a string matching ``[A-Za-z0-9._-]{1,64}`` (the spec's pattern) that does not start
    with a dot, so neither ``.``, ``..`` nor a hidden file name. Used for job names, owners and
    job ids, which all become directory names.
    """
    if not isinstance(name, str):
        raise PathError(f"{field}: must be a string (got {type(name).__name__})")
    if not _NAME.fullmatch(name):
        raise PathError(f"{field}: must match {NAME_PATTERN} (got {name!r})")
    if name.startswith("."):
        raise PathError(f"{field}: must not start with '.' (got {name!r})")
    return name


def job_area(storage_root: str | os.PathLike[str], owner: str, job_id: str) -> Path:
    """The directory of one job: ``STORAGE_ROOT/jobs/OWNER/JOB_ID`` (not created).

    ``owner`` and ``job_id`` must pass ``check_job_name`` (fields ``owner`` and ``job_id``), so
    the area is always a direct grandchild of ``STORAGE_ROOT/jobs``. The storage root itself is
    the admin's and trusted; it is made absolute but symlinks in it are kept.

    Raises:
        PathError: an unsafe owner or job id.
    """
    check_job_name(owner, field="owner")
    check_job_name(job_id, field="job_id")
    return Path(os.path.abspath(storage_root)) / JOBS_DIR / owner / job_id


def is_within(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def confine(
    root: str | os.PathLike[str],
    relative: object,
    *,
    field: str,
    allowed_prefixes: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Resolve a user path against ``root`` and return it, or raise if it could leave ``root``.

    ``relative`` is what the user wrote (a ``str``). A relative path is joined to ``root``; an
    absolute one is accepted only if it lies under one of ``allowed_prefixes`` (admin-set, e.g. a
    shared read-only data set mount). The returned path is absolute with symlinks resolved; it
    lies inside ``root`` (or inside the allowed prefix that matched). The path need not exist.

    Raises:
        PathError: ``relative`` is not a string, is empty, contains a NUL byte or a ``..``
            component, is absolute outside every allowed prefix, or resolves (through a symlink)
            outside ``root`` or its prefix. The message starts with ``field``.
    """
    if isinstance(relative, os.PathLike):
        relative = os.fspath(relative)
    if not isinstance(relative, str):
        raise PathError(f"{field}: must be a path string (got {type(relative).__name__})")
    if not relative:
        raise PathError(f"{field}: must not be empty")
    if "\x00" in relative:
        raise PathError(f"{field}: {relative!r} contains a NUL byte")
    pure = PurePosixPath(relative)
    if ".." in pure.parts:
        raise PathError(f"{field}: {relative!r} escapes the job area ('..' is not allowed)")
    if pure.is_absolute():
        for prefix in allowed_prefixes:
            base = Path(prefix).resolve()
            target = Path(relative).resolve()
            if is_within(Path(os.path.abspath(relative)), Path(os.path.abspath(prefix))):
                if not is_within(target, base):
                    raise PathError(f"{field}: {relative!r} leaves the allowed prefix {os.fspath(prefix)!r} "
                                    "through a symlink")  # fmt: skip
                return target
        allowed = ", ".join(repr(os.fspath(p)) for p in allowed_prefixes)
        hint = f" (allowed prefixes: {allowed})" if allowed else " (no absolute prefixes are allowed)"
        raise PathError(f"{field}: {relative!r} is an absolute path outside the job area{hint}")
    base = Path(root).resolve()
    target = (base / pure).resolve()
    if not is_within(target, base):
        raise PathError(f"{field}: {relative!r} escapes the job area through a symlink")
    return target


def check_upload_size(path: str | os.PathLike[str], *, field: str, limit: int = MAX_UPLOAD_BYTES) -> int:
    """Return the size of the file at ``path`` if it is at most ``limit`` bytes.

    Raises:
        PathError: the file is larger than ``limit``, is not a regular file, or cannot be read.
    """
    try:
        st = os.stat(path)
    except OSError as err:
        raise PathError(f"{field}: cannot read {os.fspath(path)!r}: {err.strerror or err}") from None
    if not os.path.isfile(path):
        raise PathError(f"{field}: {os.fspath(path)!r} is not a regular file")
    if st.st_size > limit:
        raise PathError(f"{field}: {os.fspath(path)!r} is {st.st_size} bytes; the limit is {limit}")
    return st.st_size


def user_paths(text: str, sources: dict[str, str]) -> str:
    """``text`` (an error) with every staged copy's path, longest first, replaced by the path the user
    gave (``sources``: ``{staged copy: the user's path}``, what the agent stages and the record keeps)."""
    for staged in sorted(sources, key=len, reverse=True):
        text = text.replace(staged, sources[staged])
    return text

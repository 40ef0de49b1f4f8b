"""The cluster side of the laptop client: ``python -m orchestrator.agent ACTION ...`` as a Ray job.

A laptop reaches only the Ray dashboard (Ray Job Submission). Each client operation submits a
short Ray job running this module on the cluster: it connects to the controller, does one thing,
prints one line ``LORAFLEET-RESULT {"ok": ..., "result": ...}`` and exits. The job's log carries
the answer back (``orchestrator.remote`` parses it). Registering many specs is ONE such job, so
1,000 submitted fine-tuning jobs never keep 1,000 processes alive.

Actions:

* ``register [--owner O] SPEC...``: validate the specs (files in the job's working directory;
  relative data paths are read relative to that directory, the current one, as ``submit`` and
  ``validate`` read them), copy each job's local data files and ``adapter.init_from`` adapter
  directory into the caller's uploads area (``<storage>/uploads/<owner>/``, a directory or a
  storage URI; a path under an admin-allowed prefix, or a URI, is kept as is), queue the jobs all
  or none (``Controller.submit_many``); result: ``[{id, name}, ...]``.
* ``call METHOD JSON_KWARGS``: a read, cancel or retry controller call (``status``, ``list_jobs``,
  ``logs``, ``logs_since``, ``job_metrics``, ``cancel``, ``retry``, ``counts``, ``whoami``).
* ``fetch [--owner O] JOB``: the finished adapter's small files, base64-encoded.

The caller's API key (``orchestrator.auth``) travels as the file ``KEY_FILE`` in the job's
working directory, never on the command line or in the runtime environment (both are shown in
Ray's job list). The agent reads it, deletes it and passes it with every controller call.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import sys
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

RESULT_PREFIX = "LORAFLEET-RESULT "
ALLOWED_CALLS = {"status", "list_jobs", "logs", "logs_since", "job_metrics", "cancel", "retry", "counts", "ping",
                 "whoami", "explain", "get_policy"}  # fmt: skip
KEYED_CALLS = {"status", "list_jobs", "logs", "logs_since", "job_metrics", "cancel", "retry", "whoami",
               "explain"}  # take the api_key  # fmt: skip
KEY_FILE = "lorafleet-key"
FETCH_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "job.json", "eval.json")
MAX_FETCH_BYTES = 512 << 20


def emit(ok: bool, payload: Any) -> None:
    body = {"ok": True, "result": payload} if ok else {"ok": False, "error": str(payload)}
    print(RESULT_PREFIX + json.dumps(body, default=str), flush=True)


def read_key(workdir: Path | None = None) -> str | None:
    """The caller's API key from ``KEY_FILE`` in the working directory (deleted once read), or None."""
    path = (workdir or Path.cwd()) / KEY_FILE
    if not path.is_file():
        return None
    key = path.read_text().strip() or None
    path.unlink(missing_ok=True)
    return key


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")  # what init_from uploads
INIT_FROM_HINT = ("to continue from an earlier job's adapter, fetch it (`lorafleet fetch JOB DIR`) and submit "
                  "with adapter.init_from: DIR (a local adapter directory is uploaded with the spec)")  # fmt: skip
PATH_SECTIONS = (("data", "path"), ("eval", "data"), ("adapter", "init_from"))


def adapter_files(directory: Path, field: str, shown: str) -> list[str]:
    """The adapter files of ``directory`` to upload (config first), or a ``ValueError`` naming ``field``."""
    if not (directory / ADAPTER_FILES[0]).is_file():
        raise ValueError(f"{field}: {shown} has no {ADAPTER_FILES[0]}: name a PEFT LoRA or MixLoRA adapter "
                         "directory (as `lorafleet fetch` writes it). Nothing was queued")  # fmt: skip
    names = [n for n in ADAPTER_FILES if (directory / n).is_file()]
    if len(names) == 1:
        raise ValueError(f"{field}: {shown} has no {ADAPTER_FILES[1]} or {ADAPTER_FILES[2]}. Nothing was queued")
    return names


UPLOAD_NAME_MAX = 100  # characters of an uploaded file's name (file systems allow 255 bytes)
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def safe_upload_name(section: str, filename: str) -> str:
    """The name a submitted file is uploaded under: ``SECTION-NAME`` with every character of ``filename``
    outside ``[A-Za-z0-9._-]`` replaced by ``_`` (so ``data-d.jsonl`` stays as it is).

    A Linux file name may hold ``%2F`` or ``?``, which the storage layer (pyarrow) decodes or strips in a
    URI: ``data-x%2F..%2Fjobs%2F...`` was written into another job's output. The prefix means the name
    never starts with a dot and is never empty; a long name keeps its end (the reader picks the format by
    the suffix, e.g. ``.jsonl`` or ``.parquet``) within :data:`UPLOAD_NAME_MAX` characters.
    """
    name = f"{section}-{_UNSAFE_NAME_CHARS.sub('_', filename)}"
    if len(name) > UPLOAD_NAME_MAX:
        suffix = "".join(PurePosixPath(name).suffixes)[-20:]
        name = name[: UPLOAD_NAME_MAX - len(suffix)] + suffix
    return name


def stage_data(spec_doc: dict, spec_dir: Path, uploads: str, *, allowed_prefixes: list[str] | tuple[str, ...] = (),
               limit: int | None = None) -> dict:  # fmt: skip
    """Copy the spec's local inputs into ``UPLOADS/UUID/`` (the owner's uploads area) and point the spec there.

    Inputs: ``data.path`` and ``eval.data`` (files, as ``UUID/data-NAME``, ``UUID/eval-NAME``, with NAME
    made safe by :func:`safe_upload_name`) and ``adapter.init_from`` (a directory: only its adapter
    files, :data:`ADAPTER_FILES`, into ``UUID/init_from/``). ``uploads`` is a local directory or a storage URI (``file://``,
    ``s3://``...: each file is uploaded, ``actors.storage.upload_file``).

    A path under an admin-allowed prefix (``allowed_prefixes``, absolute) stays as it is, and so
    does a URI: the controller admits them without a copy. Anything else must be among the
    submitted files (relative to ``spec_dir``).
    """
    from actors.storage import is_uri, upload_file
    from orchestrator.controller import confine_uri
    from orchestrator.paths import MAX_UPLOAD_BYTES, PathError, check_upload_size, confine

    area = f"{uploads.rstrip('/')}/{uuid.uuid4().hex[:12]}"
    doc = json.loads(json.dumps(spec_doc))

    def put(local: Path, name: str, field: str) -> str:
        # ``name`` is made of safe_upload_name()s; the final place is checked as the controller checks it
        # (confine_uri: no escapes, no '..', under the uploads area) before anything is written.
        if is_uri(uploads):
            uri = confine_uri(f"{area}/{name}", [uploads.rstrip("/") + "/"], field)
            upload_file(local, uri)
            return uri
        target = Path(area) / name
        if ".." in PurePosixPath(name).parts or not target.resolve().is_relative_to(Path(uploads).resolve()):
            raise PathError(f"{field}: upload name {name!r} leaves the uploads area {uploads}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)
        return str(target)

    for section, key in PATH_SECTIONS:
        value = (doc.get(section) or {}).get(key)
        if not value:
            continue
        field = f"{section}.{key}"
        if is_uri(str(value)):
            continue  # on the cluster's storage: the controller confines it (own uploads or an allowed URI prefix)
        if str(value).startswith("/"):
            try:
                doc[section][key] = str(confine(spec_dir, value, field=field, allowed_prefixes=allowed_prefixes))
            except PathError as err:
                if key == "init_from":
                    raise PathError(f"{err}; {INIT_FROM_HINT}") from None
                raise
            continue
        local = confine(spec_dir, value, field=field)
        if key == "init_from":
            if not local.is_dir():
                raise FileNotFoundError(f"{field}: directory not found in the submitted files: {value}; "
                                        f"{INIT_FROM_HINT}")  # fmt: skip
            names = adapter_files(local, field, repr(value))
            files = [confine(spec_dir, f"{value}/{n}", field=field) for n in names]  # no symlink out
            for file in files:
                check_upload_size(file, field=field, limit=limit or MAX_UPLOAD_BYTES)
            for file, name in zip(files, names, strict=True):
                put(file, f"init_from/{name}", field)
            doc[section][key] = f"{area}/init_from" if is_uri(uploads) else str(Path(area) / "init_from")
            continue
        if not local.is_file():
            raise FileNotFoundError(f"{field}: file not found in the submitted files: {value}")
        check_upload_size(local, field=field, limit=limit or MAX_UPLOAD_BYTES)
        doc[section][key] = put(local, safe_upload_name(section, local.name), field)
    return doc


def register(owner: str | None, specs: list[str], api_key: str | None = None,
             base_dir: str | Path | None = None, given: list[dict[str, str]] | None = None) -> list[dict]:
    """Validate every spec first, then stage data and queue them all (nothing is queued if one is
    invalid, if two share a name, or if the controller refuses one: ``Controller.submit_many``).

    ``owner``: the declared owner (single-user mode; with API keys the key decides it).
    ``base_dir``: where relative data paths are read (default: the current directory, as README
    says and ``submit``/``validate`` do; not the spec file's folder).
    ``given``: per spec, the path fields as the user wrote them (``{"data.path": "data/x.jsonl"}``)
    when the client rewrote them to its upload names; by default the spec's own values. Errors that
    name a staged copy (the controller's refusals here, a worker's data error later) name these.
    """
    from orchestrator.client import call
    from orchestrator.spec import SpecError, load_spec

    parsed, errors = [], []
    for path in specs:
        try:
            parsed.append((path, load_spec(path)))
        except SpecError as err:
            errors.extend(err.errors)
    if errors:
        raise ValueError("invalid job spec:\n" + "\n".join(errors))
    first: dict[tuple[str | None, str], int] = {}
    for i, (_path, spec) in enumerate(parsed):
        key = (owner or spec.owner, spec.name)  # a declared owner (or the key's) is that of every spec
        if key in first:
            raise ValueError(f"name: jobs {first[key] + 1} and {i + 1} of this submission are both named "
                             f"{spec.name!r}; job names must differ. Nothing was queued")  # fmt: skip
        first[key] = i
    me = call("whoami", api_key=api_key, owner=owner)  # refuses a missing/unknown key before any copy
    info = call("ping")
    uploads = call("uploads_root", me["name"])
    root = Path(base_dir if base_dir is not None else Path.cwd()).resolve()
    docs, shown = [], []
    for i, (_path, spec) in enumerate(parsed):
        doc = spec.model_dump(mode="json", exclude_none=True)
        staged = stage_data(doc, root, uploads,
                            allowed_prefixes=[p for p in info.get("allowed_prefixes", []) if "://" not in p],
                            limit=info.get("max_upload_bytes"))  # fmt: skip
        staged.pop("output", None)  # the controller places outputs under the storage root
        docs.append(staged)
        shown.append(staged_names(doc, staged, given[i] if given and i < len(given) else None))
    try:
        records = call("submit_many", docs, owner, api_key=api_key, sources=shown, timeout=60.0 + 0.5 * len(docs))
    except ValueError as err:  # a refusal naming an upload names the user's file instead
        from orchestrator.paths import user_paths

        raise type(err)(user_paths(str(err), {k: v for s in shown for k, v in s.items()})) from None
    return [{"id": r["id"], "name": r["name"], "state": r["state"]} for r in records]


def staged_names(doc: dict, staged: dict, given: dict[str, str] | None = None) -> dict[str, str]:
    """``{staged copy: what the user wrote}`` for each path field that staging rewrote."""
    out = {}
    for section, key in PATH_SECTIONS:
        before, after = (doc.get(section) or {}).get(key), (staged.get(section) or {}).get(key)
        if isinstance(before, str) and isinstance(after, str) and before != after:
            out[after] = str((given or {}).get(f"{section}.{key}") or before)
    return out


def fetch(owner: str | None, job: str, api_key: str | None = None) -> dict:
    """The finished adapter's files, if the caller may see the job (its owner or an admin)."""
    from actors.storage import is_uri, sync_down
    from orchestrator.client import call

    record = call("status", job, owner, api_key=api_key)
    if record["state"] != "SUCCEEDED":
        state = record["state"]
        why = ("it ended without a final adapter (its checkpoints stay in its output)"
               if state in ("FAILED", "CANCELLED") else "no final adapter to fetch yet")  # fmt: skip
        raise ValueError(f"job {record['id']} ({record['name']}) is {state}: {why}")
    source = record.get("output")
    if not source:
        raise ValueError(f"job {record['id']} has no output recorded")
    local = Path(source)
    if is_uri(source):
        local = Path(f"/tmp/lorafleet-fetch-{record['id']}")
        sync_down(source, local)
    files, total = {}, 0
    for name in FETCH_FILES:
        path = local / name
        if path.is_file():
            total += path.stat().st_size
            if total > MAX_FETCH_BYTES:
                raise ValueError(f"adapter of {record['id']} is over {MAX_FETCH_BYTES >> 20} MiB: read it from {source}")
            files[name] = base64.b64encode(path.read_bytes()).decode()
    return {"id": record["id"], "name": record["name"], "source": source, "files": files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.agent")
    sub = parser.add_subparsers(dest="action", required=True)
    reg = sub.add_parser("register")
    reg.add_argument("--owner", default=None)
    reg.add_argument("--given", default=None, help="JSON file: per spec, its path fields as the user wrote them")
    reg.add_argument("specs", nargs="+")
    c = sub.add_parser("call")
    c.add_argument("method", choices=sorted(ALLOWED_CALLS))
    c.add_argument("kwargs", nargs="?", default="{}")
    f = sub.add_parser("fetch")
    f.add_argument("--owner", default=None)
    f.add_argument("job")
    args = parser.parse_args(argv)

    from orchestrator.client import ClusterError, NoControllerError, connect

    api_key = read_key()
    try:
        connect("auto")
        if args.action == "register":
            given = json.loads(Path(args.given).read_text()) if args.given else None
            emit(True, register(args.owner, args.specs, api_key, given=given))
        elif args.action == "call":
            from orchestrator.client import call

            kwargs = json.loads(args.kwargs)
            if args.method in KEYED_CALLS:
                kwargs["api_key"] = api_key
            emit(True, call(args.method, **kwargs))
        else:
            emit(True, fetch(args.owner, args.job, api_key))
    except (NoControllerError, ClusterError, LookupError, ValueError, OSError) as exc:
        emit(False, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

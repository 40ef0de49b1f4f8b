"""The laptop client: submit, follow, cancel and fetch fine-tuning jobs through the Ray dashboard.

A laptop needs only the address a cluster publishes for Ray Job Submission (the dashboard,
``http://HEAD:8265``): the same channel ``ray job submit`` uses. Every operation runs a short Ray
job on the cluster (``orchestrator.agent``) that talks to the lorafleet controller and prints its
answer into the job's log; this client reads it back. Specs and the local files they name (data
files, and the adapter files of an ``adapter.init_from`` directory) travel in the Ray job's working
directory; the agent stages them into the owner's upload area.

    from orchestrator.remote import Client
    client = Client("http://127.0.0.1:8265")
    job = client.submit("examples/jobs/reverse.yaml")
    job.wait()
    job.fetch("adapters/reverse")          # ready for peft.PeftModel.from_pretrained

The address is ``address``, else ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS`` (an ``http(s)://``
dashboard URL), else the dashboard of the local cluster ``lorafleet up --local`` recorded on this
machine (while it runs), else ``http://127.0.0.1:8265`` (:func:`resolve_address`); with Ray token
authentication the token comes from ``token=`` or Ray's own ``RAY_AUTH_TOKEN`` /
``RAY_AUTH_TOKEN_PATH`` / ``~/.ray/auth_token``. On a cluster with users, the lorafleet API key
comes from ``api_key=``, ``LORAFLEET_API_KEY``, or ``~/.lorafleet/api_key`` (``orchestrator.auth``).
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import json
import os
import re
import shlex
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from ray.exceptions import AuthenticationError, RayError

from actors.storage import is_uri
from orchestrator.agent import (
    ADAPTER_FILES,
    FETCH_FILES,
    INIT_FROM_HINT,
    KEY_FILE,
    RESULT_PREFIX,
    adapter_files,
)
from orchestrator.auth import client_api_key, write_secret
from orchestrator.checks import SpecWarning, data_problems, max_seq_len_check
from orchestrator.spec import JobSpec, SpecError, load_spec, parse_spec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


class RemoteError(RuntimeError):
    """The cluster could not do what was asked; the message says why and what to do."""


ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's own order: the first set one wins
DASHBOARD_FORM = "the lorafleet client talks to the Ray dashboard (http://HOST:8265)"


def resolve_address(address: str | None) -> str:
    """The Ray dashboard URL to talk to; see :func:`address_and_source`."""
    return address_and_source(address)[0]


_ADDRESS_LOCK = threading.RLock()  # the address variables are hidden while a client connects (one at a time)


def address_and_source(address: str | None) -> tuple[str, str]:
    """The Ray dashboard URL and where it came from.

    In order: ``address`` (``HOST:PORT`` means ``http://HOST:PORT``; ``auto`` counts as not given),
    else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS`` (either must be an ``http(s)://`` URL:
    ``auto`` or a GCS address ``HOST:6379`` names Ray's cluster, not its dashboard), else the
    dashboard of the local cluster ``lorafleet up --local`` recorded (``LORAFLEET_HOME/local-cluster.json``)
    while its processes run, else :data:`DEFAULT_ADDRESS`. The source is ``"address"``, the variable's
    name, ``"local cluster"`` or ``"default"``.

    Raises:
        RemoteError: the address, or the variable that decides it, is not an http(s) dashboard URL.
    """
    if address and address != "auto":
        if "://" not in address:
            return f"http://{address}".rstrip("/"), "address"
        if not address.startswith(("http://", "https://")):
            raise RemoteError(f"address {address!r} is not a Ray dashboard URL: {DASHBOARD_FORM}. "
                              f"Pass --address http://HOST:8265{_local_hint()}")  # fmt: skip
        return address.rstrip("/"), "address"
    for variable in ADDRESS_VARIABLES:
        with _ADDRESS_LOCK:  # not while another thread's client has them hidden
            value = os.environ.get(variable, "").strip()
        if not value:
            continue
        if not value.startswith(("http://", "https://")):
            raise RemoteError(f"{variable}={value!r} is not a Ray dashboard URL: {DASHBOARD_FORM}. Set "
                              f"{variable}=http://HOST:8265, unset it, or pass --address{_local_hint()}")  # fmt: skip
        return value.rstrip("/"), variable
    from orchestrator.client import recorded_local_cluster

    state = recorded_local_cluster()
    if state is not None and isinstance(state.get("dashboard"), str):
        return state["dashboard"], "local cluster"
    return DEFAULT_ADDRESS, "default"


def _local_hint() -> str:
    """`` (the local cluster's is http://...)`` where ``lorafleet up --local`` recorded a running cluster."""
    from orchestrator.client import recorded_local_cluster

    state = recorded_local_cluster()
    return f" (the local cluster's is {state['dashboard']})" if state and state.get("dashboard") else ""


def _local_cluster_token(address: str) -> str | None:
    """The Ray token of the cluster ``lorafleet up --local --auth token`` recorded on this machine, when
    ``address`` is its dashboard and Ray's own token variables are unset (they win); else None."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    from orchestrator.client import recorded_local_cluster

    def same(url: object) -> str:  # http://localhost:PORT/ and http://127.0.0.1:PORT are one dashboard
        return str(url).strip().rstrip("/").lower().replace("://localhost:", "://127.0.0.1:")

    state = recorded_local_cluster()
    if (not state or state.get("auth") != "token" or not state.get("token_path")
            or same(state.get("dashboard")) != same(address)):  # fmt: skip
        return None
    try:
        return Path(state["token_path"]).read_text().strip() or None
    except OSError:
        return None


@contextlib.contextmanager
def without_address_variables() -> Iterator[None]:
    """Ray's JobSubmissionClient takes ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` over the address it
    is given (and treats one without ``http://`` as a GCS address to look the dashboard up from, ~35 s
    of retries): hide both while it is built, so the address :func:`resolve_address` chose is the one used."""
    with _ADDRESS_LOCK:  # another thread resolving an address meanwhile would not see the variables
        saved = {name: os.environ.pop(name) for name in ADDRESS_VARIABLES if name in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def default_owner() -> str:
    """The client's identity: ``LORAFLEET_OWNER``, else the login name."""
    owner = os.environ.get("LORAFLEET_OWNER") or getpass.getuser()
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in owner)[:64] or "default"


def declared_owner(owner: str | None, api_key: str | None) -> str | None:
    """The owner a client declares with each call: ``owner``, else ``LORAFLEET_OWNER``; without an
    API key (single-user mode) else the login name (:func:`default_owner`). With a key, None lets
    the key decide."""
    if api_key:
        return owner or os.environ.get("LORAFLEET_OWNER") or None
    return owner or default_owner()


class Job:
    """A submitted fine-tuning job; methods call the cluster each time."""

    def __init__(self, client: Client, job_id: str, name: str):
        self.client, self.id, self.name = client, job_id, name

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, name={self.name!r})"

    def status(self) -> dict[str, Any]:
        return self.client.status(self.id)

    def wait(self, **kwargs: Any) -> dict[str, Any]:
        return self.client.wait(self.id, **kwargs)

    def logs(self, lines: int = 50) -> list[str]:
        return self.client.logs(self.id, lines=lines)

    def cancel(self) -> dict[str, Any]:
        return self.client.cancel(self.id)

    def retry(self) -> dict[str, Any]:
        return self.client.retry(self.id)

    def fetch(self, dest: str | os.PathLike[str], *, replace: bool = False) -> Path:
        return self.client.fetch(self.id, dest, replace=replace)


class Client:
    """Talks to a lorafleet cluster through Ray Job Submission (see the module docstring).

    Args:
        address: the Ray dashboard (see :func:`resolve_address`).
        token: the Ray auth token (else Ray's own ``RAY_AUTH_TOKEN`` / token file).
        owner: the owner to declare. In single-user mode it is recorded as the job's owner
            (default: ``LORAFLEET_OWNER`` or the login name). With an API key the key decides the
            owner, and a declared owner other than the key's user is refused unless it is an admin's.
        api_key: the lorafleet API key (else ``LORAFLEET_API_KEY`` or ``~/.lorafleet/api_key``).

    Raises:
        RemoteError: the dashboard cannot be reached, or refuses the Ray token (names the
            address and how to fix it); the API key file is readable by others.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        owner: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 600.0,
    ):
        from ray.job_submission import JobSubmissionClient

        from orchestrator.auth import AccessError

        self.address, self.address_source = address_and_source(address)
        try:
            self.api_key = client_api_key(api_key)
        except AccessError as exc:
            raise RemoteError(str(exc)) from None
        self.owner = declared_owner(owner, self.api_key)
        self.timeout_s = timeout_s
        token = token or _local_cluster_token(self.address)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            with without_address_variables():
                self._ray = JobSubmissionClient(self.address, headers=headers)
        except (ConnectionError, RuntimeError, ValueError, OSError, RayError) as exc:  # RayError: RpcError, auth
            raise _connect_error(self.address, exc, self.address_source) from None

    # ---------------------------------------------------------------- the agent channel

    def _agent(self, args: Sequence[str], *, workdir: str | None = None) -> Any:
        """Run the agent with ``args`` as a Ray job and return its answer (the API key rides in ``workdir``)."""
        if self.api_key and workdir is None:
            workdir = tempfile.mkdtemp(prefix="lorafleet-call-")
            try:
                return self._agent(args, workdir=workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        if self.api_key:
            write_secret(Path(workdir) / KEY_FILE, self.api_key)
            # A fresh package per call: the agent deletes the key file from its (shared) unpacked copy.
            (Path(workdir) / "lorafleet-nonce").write_text(os.urandom(8).hex())
        entrypoint = "python -m orchestrator.agent " + shlex.join(args)
        runtime_env = {"working_dir": workdir} if workdir else None
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                ray_job = self._ray.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                               metadata={"lorafleet": args[0]})  # fmt: skip
                break
            except RayError as exc:  # e.g. a token rotated since this client connected (AuthenticationError)
                raise _connect_error(self.address, exc) from None
            except RuntimeError as exc:
                # A cluster that just started has no job agent yet; Ray says to try again.
                if "try again later" in str(exc) and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                if _is_auth_error(exc):
                    raise _connect_error(self.address, exc) from None
                raise RemoteError(f"Ray refused the request at {self.address}: {_first_line(exc)}") from None
        delay = 0.2
        while True:
            status = str(self._job_call(self._ray.get_job_status, ray_job))
            if status.upper().endswith(("SUCCEEDED", "FAILED", "STOPPED")):
                break
            if time.monotonic() > deadline:
                self._job_call(self._ray.stop_job, ray_job)
                raise RemoteError(f"the cluster did not answer within {self.timeout_s:.0f} s (Ray job {ray_job})")
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)
        logs = self._job_call(self._ray.get_job_logs, ray_job)
        for line in reversed(logs.splitlines()):
            if line.startswith(RESULT_PREFIX):
                body = json.loads(line[len(RESULT_PREFIX) :])
                if body["ok"]:
                    return body["result"]
                raise RemoteError(body["error"])
        raise RemoteError(f"the cluster's agent job {ray_job} ended {status} without an answer:\n{logs[-2000:]}")

    def _job_call(self, method: Callable[..., Any], *args: Any) -> Any:
        """One Ray Job Submission call on a submitted agent job; the dashboard going away (``lorafleet
        down``, a network error) is a one-line ``RemoteError``, not a traceback."""
        import requests

        try:
            return method(*args)
        except (requests.exceptions.RequestException, ConnectionError, RuntimeError, RayError) as exc:
            raise RemoteError(f"lost the connection to the Ray dashboard at {self.address}: "
                              f"{type(exc).__name__}: {_first_line(exc)}") from None  # fmt: skip

    # ---------------------------------------------------------------- jobs

    def submit(self, spec: str | os.PathLike[str] | Mapping[str, Any]) -> Job:
        """Validate locally, upload the spec, its data files and its ``init_from`` adapter, queue the job.
        Returns at once."""
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Sequence[str | os.PathLike[str] | Mapping[str, Any]]) -> list[Job]:
        """Submit several specs in ONE Ray job; nothing is queued if any spec is invalid.

        Every spec is checked before anything is sent, and every problem of every spec is reported,
        each line starting with the spec file it is about (as ``lorafleet validate`` prints them).

        Raises:
            SpecError: a spec is invalid (file, line, field).
            RemoteError: a local data file missing or failing the checks of ``lorafleet validate``, an
                ``init_from`` adapter missing (with the spec errors, if any), no controller, or the
                cluster refused.
        """
        specs = list(specs)
        if not specs:
            raise RemoteError("submit_many: no specs given (pass one or more spec files, paths or mappings)")
        workdir = tempfile.mkdtemp(prefix="lorafleet-submit-")
        try:
            names, given, spec_errors, local_errors = [], [], [], []
            for i, spec in enumerate(specs):
                try:
                    name, paths = self._stage(spec, Path(workdir), i)
                    names.append(name)
                    given.append(paths)
                except SpecError as err:  # its lines already name the file (and the line)
                    spec_errors.extend(err.errors)
                except RemoteError as err:  # one line per problem, each naming the spec
                    local_errors.extend(f"{_source(spec)}: {line}" for line in str(err).splitlines())
            if local_errors:
                raise RemoteError("\n".join([*spec_errors, *local_errors]))
            if spec_errors:
                raise SpecError(spec_errors)
            (Path(workdir) / "given.json").write_text(json.dumps(given))  # so errors name these paths
            result = self._agent(["register", *self._owner_args(), "--given", "given.json", *names], workdir=workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return [Job(self, r["id"], r["name"]) for r in result]

    @staticmethod
    def _stage(spec: str | os.PathLike[str] | Mapping[str, Any], workdir: Path,
               index: int) -> tuple[str, dict[str, str]]:  # fmt: skip
        """Copy one spec (rewritten) and its local inputs into the upload directory: its data files
        and its ``adapter.init_from`` adapter directory (only the adapter files). Returns the spec's
        name there and ``{field: path as the user gave it}`` for each input copied.

        An uploaded ``data.path`` gets the checks ``lorafleet validate`` runs (``checks.data_problems``:
        every record read, its format's fields; the ``eval:`` section when its data is uploaded too or
        held out of it): a bad file raises ``RemoteError`` here, one line per problem, rather than
        failing the job after its base model loaded. Paths on the cluster are the cluster's to check.
        A ``data.max_seq_len`` past the base model's positions (``checks.max_seq_len_check``, where its
        ``config.json`` is on this machine) raises ``RemoteError`` for a fixed position table (GPT-2,
        OPT, GPT-J) and warns (``SpecWarning``) for a RoPE model."""
        parsed: JobSpec = (parse_spec(dict(spec), source=f"spec {index + 1} ({spec.get('name', 'unnamed')})")
                           if isinstance(spec, Mapping) else load_spec(spec))  # fmt: skip
        doc = parsed.model_dump(mode="json", exclude_none=True)
        given: dict[str, str] = {}
        for section, key in (("data", "path"), ("eval", "data")):
            value = (doc.get(section) or {}).get(key)
            if not value or is_uri(value):
                continue  # a URI names the cluster's storage; the cluster checks it
            local = Path(value)
            if local.is_absolute() and not local.is_file():
                continue  # a data set on the cluster (an admin-allowed prefix); the cluster checks it
            if local.is_dir():
                raise RemoteError(f"{section}.{key}: {value} is a directory on this machine; give a data file")
            if not local.is_file():
                raise RemoteError(f"{section}.{key}: file not found on this machine: {value}")
            upload = f"{index}-{section}-{local.name}"
            try:
                shutil.copyfile(local, workdir / upload)
            except OSError as exc:  # unreadable (permissions), or a device error
                raise RemoteError(f"{section}.{key}: cannot read {value} on this machine: "
                                  f"{exc.strerror or exc}") from None  # fmt: skip
            doc[section][key] = upload
            given[f"{section}.{key}"] = value
        if "data.path" in given:  # the checks `lorafleet validate` runs, on the files as the user has them
            uploaded_eval = parsed.eval is None or parsed.eval.data is None or "eval.data" in given
            problems = data_problems(parsed, with_eval=uploaded_eval)
            if problems:
                raise RemoteError("\n".join(problems))
        length = max_seq_len_check(parsed)  # against the model's positions, where its config.json is here
        if length is not None and length.refuse:
            raise RemoteError(length.message)
        if length is not None:
            warnings.warn(f"{_source(spec)}: {length.message}", SpecWarning, stacklevel=2)
        init = (doc.get("adapter") or {}).get("init_from")
        if init:
            doc["adapter"]["init_from"] = _stage_adapter(init, workdir / f"{index}-init_from")
            if doc["adapter"]["init_from"] != init:
                given["adapter.init_from"] = init
        name = f"{index}-spec.yaml"
        (workdir / name).write_text(yaml.safe_dump(doc, sort_keys=False))
        return name, given

    def _owner_args(self) -> list[str]:
        return ["--owner", self.owner] if self.owner else []

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self._agent(["call", method, json.dumps(kwargs)])

    def whoami(self) -> dict[str, Any]:
        """``{name, admin, mode}``: who the cluster takes this client for."""
        return self._call("whoami", owner=self.owner)

    def status(self, job: str) -> dict[str, Any]:
        """One job (id or name) with its state history."""
        return self._call("status", job=job, owner=self.owner)

    def list(self, *, states: Sequence[str] | None = None, limit: int | None = None,
             all: bool = False) -> list[dict[str, Any]]:  # fmt: skip
        """This owner's jobs, newest first (at most ``limit``; None: all). ``all``: every owner's
        jobs; another owner's show only the controller's public fields (``PUBLIC_FIELDS``, with
        ``redacted: True``) unless the caller is an admin (single-user mode: everyone is)."""
        if all:
            return self._call("list_jobs", states=list(states) if states else None, limit=limit)
        if self.api_key and not self.owner:  # the key decides who "this owner" is
            return self._call("list_jobs", states=list(states) if states else None, mine=True, limit=limit)
        return self._call("list_jobs", states=list(states) if states else None, owner=self.owner, limit=limit)

    def logs(self, job: str, lines: int = 50) -> list[str]:
        return self._call("logs", job=job, lines=lines, owner=self.owner)

    def logs_since(self, job: str, since: int | None = None, epoch: str | None = None,
                   lines: int = 50) -> dict[str, Any]:  # fmt: skip
        """A page of a job's numbered progress lines for following it (``Controller.logs_since``):
        pass back the previous page's ``next`` and ``epoch`` to get each line exactly once."""
        return self._call("logs_since", job=job, since=since, epoch=epoch, lines=lines, owner=self.owner)

    def job_metrics(self, job: str) -> list[dict[str, Any]]:
        """A live or ended job's training curve (``Controller.job_metrics``), oldest first."""
        return self._call("job_metrics", job=job, owner=self.owner)

    def cancel(self, job: str) -> dict[str, Any]:
        return self._call("cancel", job=job, owner=self.owner)

    def retry(self, job: str) -> dict[str, Any]:
        """Queue a FAILED or CANCELLED job again under its id (``Controller.retry``): it resumes from its
        newest checkpoint. The record has ``resume_step``, or ``already_live: True`` for a live job."""
        return self._call("retry", job=job, owner=self.owner)

    def explain(self, job: str) -> str:
        """The scheduling policy's per-factor breakdown for a queued or running job (``lorafleet policy explain``)."""
        return self._call("explain", job=job)

    def policy(self) -> dict[str, Any]:
        """The controller's policy: ``name``, ``config`` (as set), ``failing`` and ``skipped`` (``policy show``)."""
        return self._call("get_policy")

    def wait(
        self,
        job: str,
        *,
        poll_s: float = 3.0,
        timeout_s: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job ends; returns its final record. ``on_update`` sees every poll."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            record = self.status(job)
            if on_update is not None:
                on_update(record)
            if record["state"] in TERMINAL:
                return record
            if deadline is not None and time.monotonic() > deadline:
                raise RemoteError(f"job {job} still {record['state']} after {timeout_s} s")
            time.sleep(poll_s)

    def fetch(self, job: str, dest: str | os.PathLike[str], *, replace: bool = False) -> Path:
        """Copy the finished adapter (config, weights, metrics, eval) into ``dest``.

        ``dest`` may be new, empty, or hold an earlier fetch of the same job (refreshed in place;
        other files there stay). Anything else (another job's adapter, other files) is refused
        unless ``replace``: the old directory then moves to ``DEST.previous-YYYYmmdd-HHMMSS``
        (nothing is deleted). The files arrive in a sibling temp directory first, so ``dest``
        never holds a mix of two adapters or half a download.
        """
        dest = Path(dest)
        if dest.exists() and not dest.is_dir():  # said before the download, not after it
            raise RemoteError(f"fetch: {dest} is a file; give a directory (created if missing)")
        held = _fetched_job(dest)
        if isinstance(held, str) and not replace:  # no marker of a fetch: refuse before downloading
            raise RemoteError(_occupied(dest, held))
        result = self._agent(["fetch", *self._owner_args(), job])
        same = isinstance(held, dict) and held.get("id") == result["id"]
        if isinstance(held, dict) and not same and not replace:
            raise RemoteError(_occupied(dest, f"the adapter of job {held.get('id')} ({held.get('name')}), not "
                                              f"{result['id']} ({result['name']})"))  # fmt: skip
        dest.parent.mkdir(parents=True, exist_ok=True)
        stage = dest.with_name(f".{dest.name}.partial-{os.getpid()}-{time.monotonic_ns()}")
        stage.mkdir()  # not mkdtemp: the folder becomes dest, with the umask's mode as mkdir gives it
        try:
            for name, data in result["files"].items():
                (stage / name).write_bytes(base64.b64decode(data))
            marker = {"id": result["id"], "name": result["name"], "source": result.get("source")}
            (stage / FETCH_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            if same:  # the same job again: its files replace theirs, a name it no longer has goes
                for name in FETCH_FILES:
                    if not (stage / name).exists():
                        (dest / name).unlink(missing_ok=True)
                for path in stage.iterdir():
                    os.replace(path, dest / path.name)
                return dest
            if held is not None:  # an empty directory, or one replaced
                if any(dest.iterdir()):
                    os.replace(dest, _previous_name(dest))
                else:
                    dest.rmdir()
            os.replace(stage, dest)
            return dest
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise RemoteError(f"fetch: cannot write the adapter into {dest}: {exc.strerror or exc}{where}") from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)


FETCH_MARKER = ".lorafleet-fetch.json"  # in a fetched directory: which job's adapter it holds


def _fetched_job(dest: Path) -> dict[str, Any] | str | None:
    """What ``dest`` holds: None (missing or empty), the marker of an earlier fetch (``{"id", "name"}``),
    or what else it holds, in words (an adapter fetched before fetches were marked, other files)."""
    if not dest.is_dir() or not any(dest.iterdir()):
        return None
    try:
        marker = json.loads((dest / FETCH_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict) and isinstance(marker.get("id"), str):
        return marker
    if {p.name for p in dest.iterdir()} <= set(FETCH_FILES):  # fetched before the marker (no job id to compare)
        try:
            name = json.loads((dest / "job.json").read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            name = None
        return f"an adapter fetched before lorafleet marked its fetches{f' (job {name})' if name else ''}"
    return "files lorafleet did not fetch"


def _previous_name(dest: Path) -> Path:
    """``DEST.previous-YYYYmmdd-HHMMSS`` (``-2``, ``-3``... when that is taken): where ``--replace`` moves ``dest``."""
    base = dest.with_name(f"{dest.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _occupied(dest: Path, what: str) -> str:
    return (f"fetch: {dest} already holds {what}; nothing was written. Give a new or empty directory, or "
            f"--replace (Client.fetch(..., replace=True)) to move the old one to {dest.name}.previous-<time>")


def _source(spec: str | os.PathLike[str] | Mapping[str, Any]) -> str:
    """How errors name a spec: its file as given, or ``<spec>`` (``parse_spec``'s name for a mapping)."""
    return "<spec>" if isinstance(spec, Mapping) else str(spec)


def _stage_adapter(value: str, dest: Path) -> str:
    """Copy the adapter files of the local directory ``value`` into ``dest``; returns the path to
    put in the spec (``dest``'s name, or ``value`` itself for a path on the cluster)."""
    local = Path(value)
    if is_uri(value) or (local.is_absolute() and not local.exists()):
        return value  # on the cluster (its storage, an admin-allowed prefix); the cluster checks it
    if local.is_file():
        raise RemoteError(f"adapter.init_from: {value} is a file; name the adapter directory (holding "
                          f"{ADAPTER_FILES[0]} and {ADAPTER_FILES[1]}). Nothing was queued")  # fmt: skip
    if not local.is_dir():
        raise RemoteError(f"adapter.init_from: directory not found on this machine: {value}; {INIT_FROM_HINT}")
    try:
        names = adapter_files(local, "adapter.init_from", value)
    except ValueError as err:
        raise RemoteError(str(err)) from None
    dest.mkdir()
    for name in names:
        shutil.copyfile(local / name, dest / name)
    return dest.name


_ADDRESSES = re.compile(r"\S+://\S*|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?|\bport=\d+")
_AUTH_WORDS = re.compile(r"\b40[13]\b|Unauthorized|Forbidden|authentication|auth token")


def _is_auth_error(exc: BaseException) -> bool:
    """Whether the dashboard refused a Ray token (401/403), read from the error's words and status codes,
    not from the addresses in it: a dashboard on port 40311 is not a 403."""
    if isinstance(exc, AuthenticationError):
        return True
    return bool(_AUTH_WORDS.search(_ADDRESSES.sub(" ", str(exc))))


def _connect_error(address: str, exc: BaseException, source: str | None = None) -> RemoteError:
    if _is_auth_error(exc):
        return RemoteError(
            f"the Ray cluster at {address} refused this client: it requires a Ray auth token "
            f"({_first_line(exc)}). Pass --token, or set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) as your admin "
            "gave it to you."
        )
    where = {"local cluster": " (the local cluster `lorafleet up --local` recorded)"}.get(source or "", "")
    return RemoteError(
        f"cannot reach the Ray dashboard at {address}{where}: {_first_line(exc)}. {_gcs_hint(address)}Check "
        "--address (or RAY_ADDRESS / RAY_API_SERVER_ADDRESS) and that the cluster is up (`lorafleet up --local`)."
    )


def _gcs_hint(address: str) -> str:
    """A sentence when ``address`` is a Ray cluster's GCS address (what ``ray.init`` takes), not its dashboard."""
    from orchestrator.client import recorded_local_cluster

    hostport = re.sub(r"^[a-z]+://", "", address.strip().lower()).rstrip("/").replace("localhost:", "127.0.0.1:")
    state = recorded_local_cluster()
    if state and str(state.get("address", "")).lower() == hostport and state.get("dashboard"):
        return (f"{hostport} is the local cluster's GCS address (for Ray drivers); its dashboard, which lorafleet "
                f"talks to, is {state['dashboard']}. ")  # fmt: skip
    if hostport.endswith(":6379"):
        return "Port 6379 is Ray's GCS port (for Ray drivers); lorafleet talks to the dashboard (port 8265 by default). "
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__

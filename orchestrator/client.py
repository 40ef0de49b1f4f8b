"""Connecting to a lorafleet cluster: Ray on loopback or a given address, the controller by name.

Functions the CLI (``up``, ``down``, ``policy``) and the laptop client build on:

* :func:`connect` ``(address)``: ``ray.init`` to a running cluster (``auto``: the one this
  machine knows). Loopback addresses stay on loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
  makes Ray resolve its own node address to 127.0.0.1 instead of the machine's interface).
* :func:`get_controller`: the controller handle, or :class:`NoControllerError` with
  "no lorafleet controller on this cluster: start one with `lorafleet up`".
* :func:`start_controller` (start or reattach), :func:`stop_controller`, :func:`call`
  (a controller method with the actor's exception unwrapped).
* :func:`start_local_cluster` / :func:`stop_local_cluster`: ``lorafleet up --local`` starts
  ``ray start --head`` bound to 127.0.0.1 with its own temp dir and records its PIDs in
  ``~/.lorafleet/local-cluster.json`` so that ``lorafleet down --local`` stops exactly those
  processes (never ``ray stop``, which would end every Ray process on the machine) and then
  deletes that temp dir. :func:`recorded_local_cluster`: the record while its cluster runs (the
  laptop client's address when it is given none).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.controller import CONTROLLER_NAME, NAMESPACE

HOME = Path(os.environ.get("LORAFLEET_HOME", Path.home() / ".lorafleet"))
LOCAL_STATE = HOME / "local-cluster.json"
TOKEN_FILE = HOME / "ray-auth-token"  # `up --local --auth token` writes the cluster's Ray token here (0600)
DEFAULT_STORE = HOME / "jobs.db"
DEFAULT_STORAGE = HOME / "storage"
NO_CONTROLLER = "no lorafleet controller on this cluster: start one with `lorafleet up`"


class NoControllerError(RuntimeError):
    """No controller actor runs on the connected cluster."""


class ClusterError(RuntimeError):
    """Ray could not be reached or started; the message says what to do."""


def loopback_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment that keeps a local Ray on 127.0.0.1 and sends no usage stats."""
    env = dict(os.environ if env is None else env)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def use_loopback() -> None:
    """Keep Ray in this process on 127.0.0.1, even when ``ray`` was imported before.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, at import, into
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``; with it true, ``ray.init`` rewrites a
    127.0.0.1 address to this machine's network address. Child processes get the variable.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def use_local_auth(state: dict[str, Any]) -> None:
    """Present the recorded local cluster's Ray token from this process (and its children).

    Must run before ``ray.init``: Ray reads ``RAY_AUTH_MODE`` and the token when it connects.
    A cluster without token auth leaves the environment as it is.
    """
    if state.get("auth") == "token" and state.get("token_path"):
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = state["token_path"]
        os.environ.pop("RAY_AUTH_TOKEN", None)
        if "ray._raylet" in sys.modules:
            # Ray caches the mode and the token when it is imported; re-read both, as Ray's own
            # `_enable_token_auth` does (no public API for this in Ray 2.60).
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()


def _is_loopback(address: str | None) -> bool:
    return bool(address) and address.split(":")[0] in ("127.0.0.1", "localhost")


GCS_ONLY = ("`lorafleet up`, `down`, `policy set` and `admin` talk to Ray itself (its GCS, HOST:6379), not to the "
            "dashboard: run them on the head node (--address auto finds its cluster) or pass --address HEAD:6379; "
            "a dashboard URL serves submit, status, list, logs, fetch, cancel, retry and `policy show` / `explain`")


def connect(address: str | None = "auto") -> None:
    """``ray.init`` to a running cluster (no-op when already connected). Raises ``ClusterError``.

    A dashboard URL is refused with what to use instead; ``RAY_ADDRESS`` set to one (as a laptop exports
    it for the other commands) is ignored, so ``auto`` finds the cluster this machine runs."""
    if address and address.startswith(("http://", "https://")):
        raise ClusterError(f"--address {address} is a Ray dashboard URL: {GCS_ONLY}")
    if address in (None, "auto") and LOCAL_STATE.is_file():
        state = json.loads(LOCAL_STATE.read_text())
        address = state["address"]
        use_local_auth(state)  # before ray is imported: it reads RAY_AUTH_MODE then
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"address": address or "auto", "namespace": NAMESPACE, "log_to_driver": False,
                              "logging_level": "WARNING"}  # fmt: skip
    if _is_loopback(address):
        use_loopback()
        kwargs["_node_ip_address"] = "127.0.0.1"
    dashboard = os.environ.get("RAY_ADDRESS", "").strip()
    if not dashboard.startswith(("http://", "https://")):
        dashboard = ""
    hidden: contextlib.AbstractContextManager = contextlib.nullcontext()
    if dashboard:  # ray.init reads RAY_ADDRESS over "auto", and refuses a dashboard URL: hidden while it connects
        from orchestrator.remote import without_address_variables

        hidden = without_address_variables()
    try:
        with hidden:
            ray.init(**kwargs)
    except ray.exceptions.AuthenticationError as exc:
        raise ClusterError(f"the Ray cluster at {address or 'auto'} refused this process: {str(exc).splitlines()[0]} "
                           "Set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the "
                           "cluster's token.") from None  # fmt: skip
    except ConnectionError as exc:
        hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
            "; if the cluster uses Ray token auth, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
            "RAY_AUTH_TOKEN_PATH)")  # fmt: skip
        if dashboard:
            hint += f"; RAY_ADDRESS={dashboard} is a dashboard URL, which this command does not use: {GCS_ONLY}"
        raise ClusterError(f"cannot reach a Ray cluster at {address or 'auto'}: {exc}; "
                           f"start one (`lorafleet up --local`) or pass --address{hint}") from None  # fmt: skip


def get_controller():
    """The controller actor handle. Raises :class:`NoControllerError`."""
    import ray

    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        raise NoControllerError(NO_CONTROLLER) from None


def call(method: str, *args: Any, timeout: float = 60.0, **kwargs: Any) -> Any:
    """Call a controller method and return its result; the controller's own exception is re-raised."""
    import ray

    handle = get_controller()
    try:
        return ray.get(getattr(handle, method).remote(*args, **kwargs), timeout=timeout)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if getattr(err, "cause", None) is not None else err
        raise cause from None


def start_controller(
    store: str | os.PathLike = DEFAULT_STORE,
    storage: str | os.PathLike = DEFAULT_STORAGE,
    policy: dict[str, Any] | None = None,
    *,
    wait_s: float = 120.0,
    api_key: str | None = None,
    **options: Any,
) -> tuple[Any, bool]:
    """Start the controller, or reattach to a running one; returns (handle, started_now).

    ``options`` go to :class:`orchestrator.controller.Controller` (``num_gpus``,
    ``worker_options``, ``loop_interval_s``, ``allowed_prefixes``, ...). A running controller
    keeps its settings; a given ``policy`` is then applied with ``set_policy`` (with ``api_key``:
    admin-only once users exist, ``AccessError`` otherwise).
    """
    import ray

    from orchestrator.controller import controller_actor_class, controller_options

    try:
        handle = get_controller()
        started = False
        if policy is not None:
            try:
                answer = ray.get(handle.set_policy.remote(policy, api_key=api_key), timeout=wait_s)
                for line in (answer.get("dry_run") or ()) if isinstance(answer, dict) else ():
                    print(f"warning: {line}", file=sys.stderr)  # as `lorafleet policy set` prints them
            except ray.exceptions.RayTaskError as err:
                raise (err.cause if getattr(err, "cause", None) is not None else err) from None
    except NoControllerError:
        storage = str(storage) if "://" in str(storage) else str(Path(storage).expanduser().resolve())
        store = str(Path(store).expanduser().resolve())
        handle = controller_actor_class().options(**controller_options()).remote(store, storage, policy, **options)
        started = True
    ray.get(handle.ping.remote(), timeout=wait_s)
    return handle, started


def stop_controller(timeout_s: float = 120.0, api_key: str | None = None) -> dict[str, Any]:
    """Checkpoint and requeue running jobs, then kill the controller for good (no restart).

    Once users exist only an admin's ``api_key`` may do this: ``AccessError`` otherwise (the
    controller keeps running).
    """
    import ray

    from orchestrator.auth import AccessError

    handle = get_controller()
    try:
        out = ray.get(handle.shutdown.remote(api_key=api_key), timeout=timeout_s)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(getattr(exc, "cause", None), AccessError):
            raise exc.cause from None
        out = {"warning": f"controller did not shut down cleanly: {exc}"}
    except (ray.exceptions.RayError, TimeoutError) as exc:
        out = {"warning": f"controller did not shut down cleanly: {exc}"}
    ray.kill(handle, no_restart=True)
    return out


# ---------------------------------------------------------------------------- local cluster


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_local_cluster(num_gpus: int = 0, num_cpus: int | None = None, port: int = 0,
                        auth: str = "disabled") -> dict[str, Any]:  # fmt: skip
    """``ray start --head`` on 127.0.0.1 with a private temp dir; records and returns its state.

    ``port`` 0 picks a free GCS port (6379 may belong to another user's Ray).
    ``auth``: ``disabled``, or ``token``: Ray token authentication (``RAY_AUTH_MODE=token``) with
    a fresh random token written to ``TOKEN_FILE`` (mode 0600); every later lorafleet command on
    this machine reads it from the recorded state, other clients need the token
    (``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``, ``--token``). The mode is always set
    explicitly, so a token lying in ``~/.ray/auth_token`` does not switch it on by surprise.
    Raises ``ClusterError`` when one is already recorded or ``ray start`` fails.
    """
    if auth not in ("disabled", "token"):
        raise ClusterError(f"auth: must be one of disabled, token (got {auth!r})")
    if LOCAL_STATE.is_file():
        state = json.loads(LOCAL_STATE.read_text())
        raise ClusterError(f"a local cluster started by lorafleet is recorded at {state['address']} "
                           f"({LOCAL_STATE}); use it, or `lorafleet down --local` first")  # fmt: skip
    port = port or free_port()
    tmp = tempfile.mkdtemp(prefix="lf-ray-", dir="/tmp")
    env = loopback_env()
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # a client's `export RAY_ADDRESS=http://...`
        env.pop(name, None)  # names a dashboard, not this cluster: its processes must not inherit it
    for name in ("LORAFLEET_API_KEY", "LORAFLEET_API_KEY_FILE"):  # this shell's identity (an admin's):
        env.pop(name, None)  # every Ray job would inherit it, and a keyless `lorafleet run` act as its owner
    env["RAY_TMPDIR"] = tmp
    env["RAY_AUTH_MODE"] = auth
    token_path = None
    if auth == "token":
        import secrets

        from orchestrator.auth import write_secret

        token_path = str(write_secret(TOKEN_FILE, secrets.token_hex(32)))
        env["RAY_AUTH_TOKEN_PATH"] = token_path
        env.pop("RAY_AUTH_TOKEN", None)
    # Ray job entrypoints (`python -m orchestrator.agent`, `lorafleet run`) resolve on this PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # Ray's fixed default ports (8265 dashboard, 52365 job agent, 10001 client, ...) may belong to
    # another Ray on this machine; a job agent that cannot bind leaves job submission hanging.
    dashboard_port = free_port()
    extra_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
    )]  # fmt: skip
    cmd = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", f"--port={port}", f"--num-gpus={num_gpus}",
           *extra_ports, f"--temp-dir={tmp}/ray", "--disable-usage-stats"]  # fmt: skip
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        if not _pids_under(tmp):  # nothing of this cluster runs: its temp dir goes too
            shutil.rmtree(tmp, ignore_errors=True)
        raise ClusterError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip() or proc.stdout.strip()}")
    pids = sorted(_pids_under(tmp))  # only processes of OUR temp dir: never another user's Ray
    # temp_dir_created: `down --local` may delete it (and only it) once the cluster's processes are gone
    state = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard_port}",
             "temp_dir": tmp, "temp_dir_created": True, "pids": pids, "num_gpus": num_gpus, "auth": auth,
             "token_path": token_path, "started": time.time()}  # fmt: skip
    LOCAL_STATE.parent.mkdir(parents=True, exist_ok=True)
    LOCAL_STATE.write_text(json.dumps(state, indent=1) + "\n")
    return state


def recorded_local_cluster() -> dict[str, Any] | None:
    """The state :func:`start_local_cluster` recorded in ``LOCAL_STATE``, if that cluster still runs
    (one of its recorded processes is alive and belongs to its temp dir, so a PID reused after a
    reboot does not count); else None. Laptop commands use its ``dashboard`` when given no address."""
    try:
        state = json.loads(LOCAL_STATE.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("temp_dir"), str):
        return None
    pids = [p for p in state.get("pids") or [] if isinstance(p, int) and not isinstance(p, bool)]
    return state if any(_alive(pid) and _belongs_to(pid, state["temp_dir"]) for pid in pids) else None


def stop_local_cluster(timeout_s: float = 30.0) -> dict[str, Any]:
    """Stop exactly the processes ``start_local_cluster`` recorded (plus any still using its temp dir),
    then delete its temp dir (Ray's logs and session files: megabytes a day) once none of them runs.

    Only a temp dir ``start_local_cluster`` created is deleted: the record says so (``temp_dir_created``),
    or, for a record written before that key, the dir is ``/tmp/lf-ray-*`` as it names them.

    Returns ``{"pids": [...], "temp_dir": str, "removed": bool, "warning": str (only when it was kept)}``.
    """
    if not LOCAL_STATE.is_file():
        raise ClusterError(f"no local cluster recorded in {LOCAL_STATE}")
    state = json.loads(LOCAL_STATE.read_text())
    temp_dir = state["temp_dir"]
    pids = sorted(set(state["pids"]) | _pids_under(temp_dir))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in pids if _alive(p)]
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout_s / 2
        while time.time() < deadline and any(_alive(p) for p in alive):
            time.sleep(0.2)
    LOCAL_STATE.unlink()
    out: dict[str, Any] = {"pids": pids, "temp_dir": temp_dir, "removed": False}
    if not _created_temp_dir(state) or not Path(temp_dir).is_dir():
        return out
    running = sorted(p for p in set(pids) | _pids_under(temp_dir) if _alive(p))
    if running:
        out["warning"] = f"kept the cluster's temp dir {temp_dir}: processes {running} still use it"
        return out
    failed: list[str] = []
    shutil.rmtree(temp_dir, onerror=lambda _f, path, info: failed.append(f"{path}: {info[1]}"))
    out["removed"] = not Path(temp_dir).exists()
    if failed:
        out["warning"] = f"could not delete all of the cluster's temp dir {temp_dir}: {failed[0]}"
    return out


def _created_temp_dir(state: dict[str, Any]) -> bool:
    """Whether ``start_local_cluster`` created the recorded temp dir (and so may delete it)."""
    if "temp_dir_created" in state:
        return state["temp_dir_created"] is True
    path = Path(state["temp_dir"])  # a record from before the key: mkdtemp(prefix="lf-ray-", dir="/tmp")
    return path.parent == Path("/tmp") and path.name.startswith("lf-ray-") and not path.is_symlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and ") Z " in stat.read_text())


def _belongs_to(pid: int, temp_dir: str) -> bool:
    """Whether process ``pid`` is one of the cluster of ``temp_dir`` (as :func:`_pids_under` finds them)."""
    proc = Path(f"/proc/{pid}")
    try:
        if temp_dir in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
            return True
        return f"RAY_TMPDIR={temp_dir}".encode() in (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _cmdlines() -> dict[int, str]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return out


def _pids_under(temp_dir: str) -> set[int]:
    """Processes of our cluster: their command line names our private temp dir (gcs, raylet), or
    they inherited ``RAY_TMPDIR=<temp dir>`` from ``ray start`` (agents and workers, whose
    command lines Ray rewrites to ``ray::...``). Never another user's Ray."""
    me = os.getpid()
    found = {pid for pid, cmd in _cmdlines().items() if temp_dir in cmd and pid != me}
    marker = f"RAY_TMPDIR={temp_dir}".encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != me:
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
                    found.add(int(d.name))
            except OSError:
                continue
    # and their descendants: the raylet's dashboard and runtime-env agents carry neither mark at times
    # (`down --local` left them running, reparented to init, once their temp dir was deleted)
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found and child != me:
                found.add(child)
                todo.append(child)
    return found

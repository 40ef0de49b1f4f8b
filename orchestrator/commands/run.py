"""``lorafleet run job.yaml``: register one job and follow it to the end, as a Ray job's entrypoint.

    ray job submit --address http://HEAD:8265 --working-dir . -- lorafleet run job.yaml

runs on the cluster: it validates the spec, stages its data into the storage root, queues the job
with the controller, prints progress lines into the Ray job's log until the job ends, and exits 0
only if it SUCCEEDED. Stopping the Ray job (``ray job stop``) cancels the fine-tuning job.
On a cluster with users, the submitter's API key travels in the working directory (``./api_key``)
or in the job's runtime environment (``LORAFLEET_API_KEY``); see :func:`job_api_key`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from orchestrator.cli import UserError
from orchestrator.progress import eval_summary, fmt_float

HELP = "register one job and follow it to the end (inside `ray job submit`)"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


KEY_FILE = "api_key"  # the submitter's key, shipped in the Ray job's working directory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="job spec file (in the Ray job's working directory)")
    parser.add_argument("--owner", default=None, help="owner recorded for the job [LORAFLEET_OWNER or login]")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between progress lines")
    parser.add_argument("--api-key-file", default=None, metavar="FILE",
                        help=f"the submitter's API key: a relative path inside the job's working directory "
                        f"[./{KEY_FILE} if present, else LORAFLEET_API_KEY]")  # fmt: skip


def job_api_key(key_file: str | None) -> str | None:
    """The API key of whoever submitted this Ray job: the key file shipped in its working directory
    (``--api-key-file``, or ``./api_key`` when present), else ``LORAFLEET_API_KEY`` as the job's
    runtime environment sets it.

    Never the head's own ``~/.lorafleet/api_key`` or ``LORAFLEET_API_KEY_FILE``, which the general
    client reads: the entrypoint runs on the head, where those are the admin's, and a submitter who
    forgot a key would act as the admin (and could name any owner) instead of being refused. For the
    same reason the key file must be a relative path that stays inside the working directory once
    symlinks are resolved (:func:`key_file_in_working_dir`): ``--api-key-file /root/.lorafleet/api_key``
    or a planted symlink to it is refused.
    """
    path = key_file_in_working_dir(key_file or KEY_FILE, given=key_file is not None)
    if path.is_file():
        key = path.read_text(encoding="utf-8", errors="replace").strip()
        if not key:
            raise UserError(f"--api-key-file: {key_file or KEY_FILE} is empty")
        return key
    if key_file:
        raise UserError(f"--api-key-file: {key_file} is not in the job's working directory")
    return _runtime_env_key()


def _runtime_env_key() -> str | None:
    """``LORAFLEET_API_KEY`` as the Ray job's own runtime environment sets it (``--runtime-env-json
    '{"env_vars": ...}'``), read from the job config Ray gives its entrypoint: the process's own
    variable may be the head's, inherited from the shell that ran ``ray start`` (an admin with the
    key exported), and would run a keyless submission as the admin. Outside a Ray job (no job
    config), the process's own environment is its user's."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw is None:
        return os.environ.get("LORAFLEET_API_KEY", "").strip() or None
    try:
        env_vars = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return None
    return str(env_vars.get("LORAFLEET_API_KEY") or "").strip() or None


def key_file_in_working_dir(name: str, *, given: bool = True) -> Path:
    """``name`` resolved inside the current (the Ray job's working) directory, or ``UserError``.

    Refused: an absolute path, and a relative one that leaves the directory through ``..`` or a
    symlink. ``given``: the user named it (``--api-key-file``); else it is the default ``./api_key``.
    """
    flag = "--api-key-file" if given else f"./{KEY_FILE}"
    allowed = ("a relative path to a file in the job's working directory (shipped with `ray job submit "
               "--working-dir`), e.g. --api-key-file api_key")  # fmt: skip
    if "\x00" in name:
        raise UserError(f"{flag}: {name!r} contains a NUL byte; give {allowed}")
    if os.path.isabs(name) or name.startswith("~"):
        raise UserError(f"{flag}: {name} is not a relative path; give {allowed} (this command runs on the head, "
                        "where other paths could name the head's own key files)")  # fmt: skip
    cwd = Path.cwd().resolve()
    path = (cwd / name).resolve()
    if not path.is_relative_to(cwd):
        raise UserError(f"{flag}: {name} resolves to {path}, outside the job's working directory {cwd} (through "
                        f"'..' or a symlink); give {allowed}")  # fmt: skip
    return path


def run(args: argparse.Namespace) -> int:
    from orchestrator.agent import register
    from orchestrator.client import ClusterError, NoControllerError, call, connect
    from orchestrator.remote import default_owner
    from orchestrator.spec import SpecError

    try:
        api_key = job_api_key(args.api_key_file)  # the submitter's, never the head's own key file
        owner = args.owner or (None if api_key else default_owner())
        connect("auto")
        job = register(owner, [args.spec], api_key)[0]
    except SpecError as err:
        lines = list(err.errors)
        if any("cannot read spec file" in line for line in lines):  # the usual cause under `ray job submit`
            lines.append("(`ray job submit` runs in its --working-dir: pass --working-dir with the spec and its data, "
                         "and the spec's path relative to it)")  # fmt: skip
        raise UserError("\n".join(lines)) from None
    except (NoControllerError, ClusterError, ValueError, OSError) as err:
        raise UserError(str(err)) from None
    job_id = job["id"]
    print(f"lorafleet job {job_id} ({job['name']}) queued", flush=True)

    def cancel_on_stop(signum: int, _frame: object) -> None:
        try:
            call("cancel", job_id, owner=owner, api_key=api_key)
            print(f"lorafleet job {job_id} cancelled (Ray job stopped)", flush=True)
        except (LookupError, ValueError) as err:
            print(f"could not cancel {job_id}: {err}", file=sys.stderr, flush=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, cancel_on_stop)
    signal.signal(signal.SIGINT, cancel_on_stop)
    last = None
    while True:
        r = call("status", job_id, api_key=api_key)
        line = (f"[{r['name']}] {r['state']} step {r.get('step') or 0}/{r.get('total_steps') or '?'} "
                f"loss {fmt_float(r.get('loss'))} tok/s {fmt_float(r.get('tokens_per_s'), 0)}")  # fmt: skip
        if line != last:
            print(line, flush=True)
            last = line
        if r["state"] in TERMINAL:
            if r.get("error"):
                print(f"[{r['name']}] error: {r['error']}", flush=True)
            if r.get("output") and r["state"] == "SUCCEEDED":  # a failed or cancelled job has no adapter there
                print(f"[{r['name']}] adapter: {r['output']}", flush=True)
            evaluation = (r.get("extra") or {}).get("eval")  # the spec's eval: section, as `submit --wait` shows it
            if evaluation:
                print(f"[{r['name']}] eval: {evaluation.get('error') or eval_summary(evaluation)}", flush=True)
            return 0 if r["state"] == "SUCCEEDED" else 1
        time.sleep(args.poll)

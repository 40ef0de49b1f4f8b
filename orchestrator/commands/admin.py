"""``lorafleet admin add-user NAME [--admin] | remove-user NAME | users | whoami | prune --older-than AGE``:
identities on a shared cluster (``orchestrator.auth``) and retention of the job store. Runs where
``lorafleet up`` runs (it talks to the controller through Ray). The first user must be an admin;
afterwards only an admin, presenting its key (``LORAFLEET_API_KEY`` or ``~/.lorafleet/api_key``), may
add or remove users or prune jobs.

``prune`` deletes ended jobs (succeeded, failed, cancelled) that ended more than AGE ago, with their
history, from the job store; it never deletes files (adapters and outputs stay in the storage)."""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

from orchestrator.cli import UserError

HELP = ("users and API keys: add-user NAME [--admin] (prints the key once), remove-user NAME, users, whoami; "
        "prune --older-than AGE deletes old ended jobs from the job store")  # fmt: skip

DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION_FORMS = "90s, 45m, 12h, 30d, or a bare number of seconds"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
PRUNE_STATES = ("succeeded", "failed", "cancelled")
PRUNE_OPTIONS = ("older_than", "state", "owner", "dry_run", "uploads")  # prune's own options, refused elsewhere
IDS_PRINTED = 10


def parse_duration(text: str, option: str = "--older-than") -> float:
    """Seconds in ``90s``, ``45m``, ``12h``, ``30d`` or a bare number (seconds); raises ``UserError``."""
    match = _DURATION.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if match is None:
        raise UserError(f"{option}: {text!r} is not a duration; use {DURATION_FORMS}")
    seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds):
        raise UserError(f"{option}: {text!r} is too large; use {DURATION_FORMS}")
    return seconds


def parse_states(text: str) -> list[str]:
    """``succeeded,failed`` -> ``["SUCCEEDED", "FAILED"]``; raises ``UserError`` for another state."""
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in PRUNE_STATES]
    if bad or not names:
        what = f"{', '.join(repr(s) for s in bad)} is not an ended state" if bad else "no state given"
        raise UserError(f"--state: {what}; use a comma-separated list of {', '.join(PRUNE_STATES)} "
                        "(only ended jobs are pruned)")  # fmt: skip
    return sorted({s.upper() for s in names})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["add-user", "remove-user", "users", "whoami", "prune"])
    parser.add_argument("name", nargs="?", help="user name (add-user, remove-user): [A-Za-z0-9._-]{1,64}")
    parser.add_argument("--admin", action="store_true", help="add-user: may act on every job, set the policy, stop")
    parser.add_argument("--key-file", metavar="FILE",
                        help="add-user: also write the new key to FILE (mode 600) instead of only printing it")
    parser.add_argument("--older-than", metavar="AGE",
                        help=f"prune: delete jobs that ended more than AGE ago ({DURATION_FORMS}); required")
    parser.add_argument("--state", metavar="STATES",
                        help=f"prune: only these ended states, comma-separated [{','.join(PRUNE_STATES)}]")
    parser.add_argument("--owner", metavar="NAME", help="prune: only this owner's jobs")
    parser.add_argument("--dry-run", action="store_true",
                        help="prune: print what would be deleted and delete nothing")
    parser.add_argument("--uploads", action="store_true",
                        help="prune: also delete the uploaded inputs (one area per submission) that only the "
                        "pruned jobs named")  # fmt: skip
    parser.add_argument("--address", default="auto", help="Ray cluster address [auto]")


def _prune_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The controller's ``prune_jobs`` arguments from the command line (checked before connecting)."""
    if args.name:
        raise UserError(f"admin prune: takes no NAME (got {args.name!r}); to prune one owner's jobs use "
                        f"--owner {args.name}")  # fmt: skip
    if args.older_than is None:
        raise UserError(f"admin prune: give --older-than AGE ({DURATION_FORMS}), e.g. --older-than 30d")
    return {"older_than_s": parse_duration(args.older_than),
            "states": parse_states(args.state) if args.state is not None else None,
            "owner": args.owner, "dry_run": bool(args.dry_run), "uploads": bool(args.uploads)}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from orchestrator import client
    from orchestrator.auth import client_api_key, write_secret

    if args.action in ("add-user", "remove-user") and not args.name:
        raise UserError(f"admin {args.action}: give the user NAME")
    prune = _prune_arguments(args) if args.action == "prune" else None
    if prune is None:
        given = [o for o in PRUNE_OPTIONS if getattr(args, o, None) not in (None, False)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UserError(f"admin {args.action}: {flag} applies only to prune")
    try:
        client.connect(args.address)
        key = client_api_key()
        if args.action == "add-user":
            out = client.call("add_user", args.name, admin=args.admin, api_key=key)
            role = "admin" if out["admin"] else "user"
            if args.key_file:
                path = write_secret(args.key_file, out["key"])
                print(f"added {role} {out['name']}; API key written to {path} (mode 600)")
            else:
                print(f"added {role} {out['name']}; API key (shown once, store it now):\n{out['key']}")
            print("the user sets LORAFLEET_API_KEY to it, or writes it to ~/.lorafleet/api_key (chmod 600)")
        elif args.action == "remove-user":
            client.call("remove_user", args.name, api_key=key)
            print(f"removed {args.name}: its key no longer works; its jobs keep their owner")
        elif args.action == "users":
            for u in client.call("list_users", api_key=key):
                print(f"{u['name']}\t{'admin' if u['admin'] else 'user'}")
        elif prune is not None:
            out = client.call("prune_jobs", api_key=key, **prune)
            print(prune_summary(out, args.older_than))
        else:
            from orchestrator.remote import declared_owner

            # The owner submit, status, ... declare (LORAFLEET_OWNER or the login name without a key):
            # single-user mode names the owner jobs from this shell get, not "default".
            me = client.call("whoami", api_key=key, owner=declared_owner(None, key))
            print(f"{me['name']} ({'admin' if me['admin'] else 'user'}, {me['mode']} mode)")
    except (client.ClusterError, client.NoControllerError, ValueError, LookupError, PermissionError) as exc:
        raise UserError(str(exc)) from None
    return 0


def prune_summary(out: dict[str, Any], age: str) -> str:
    """One or two lines for ``prune_jobs``'s result: how many jobs went (or would go) and a few ids."""
    n = out["deleted"]
    jobs = f"{n} job{'' if n == 1 else 's'} that ended more than {age} ago"
    if n == 0:
        return f"no job that ended more than {age} ago matches; nothing deleted"
    shown = out["ids"][:IDS_PRINTED]
    more = f" and {n - len(shown)} more" if n > len(shown) else ""
    ids = f"{', '.join(shown)}{more}"
    areas = out.get("uploads_deleted") or []
    uploads = f"; and {len(areas)} upload area{'' if len(areas) == 1 else 's'}" if areas else ""
    if out["dry_run"]:
        return f"would delete {jobs}{uploads} (dry run: nothing deleted): {ids}"
    kept = "their outputs in the storage are kept" if areas else "their files in the storage are kept"
    return f"deleted {jobs} from the job store{uploads} ({kept}): {ids}"
